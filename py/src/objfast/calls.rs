//! What the fast object server does per request, per kind of object: channels (including
//! block messages and the fused lock + message calls), locks and semaphores, events, a
//! `Value`/`Array`'s bytes, a DDict manager's index.

use super::server::*;
use super::*;

/// Locks a client took through its connection and did not release, by object.
pub(super) type Held = Vec<(Arc<Obj>, u32)>;

pub(super) fn note_held(held: &mut Held, o: &Arc<Obj>, delta: i32) {
    match held.iter_mut().position(|(h, _)| Arc::ptr_eq(h, o)) {
        Some(i) => {
            let n = held[i].1 as i64 + delta as i64;
            if n <= 0 {
                held.swap_remove(i);
            } else {
                held[i].1 = n as u32;
            }
        }
        None if delta > 0 => held.push((o.clone(), delta as u32)),
        None => {}
    }
}

pub(super) fn serve_call(
    srv: &Server,
    s: &TcpStream,
    o: &Arc<Obj>,
    q: &Request<'_>,
    held: &mut Held,
) -> std::result::Result<Result<Reply>, Left> {
    let bad = || Ok(Err(Error::value("no such operation on this object")));
    Ok(Ok(match (&**o, q.op) {
        (Obj::Channel(ch), OP_SEND) => {
            let r = channel_send(s, ch, q.payload, q.block, q.timeout)?;
            return Ok(done(r, ChannelError::Full).map(|_| Reply::None));
        }
        (Obj::Channel(ch), OP_RECV) => {
            let r = channel_recv(s, ch, q.block, q.timeout)?;
            return Ok(done(r, ChannelError::Empty).map(Reply::Msg));
        }
        (Obj::Channel(ch), OP_LEN) => Reply::Int(ch.len()),
        (Obj::Lock(l), OP_ACQUIRE) => {
            let now = l.acquire(false, None).is_some();
            return acquire_held(s, q, held, o, now, |w| l.acquire_with(w), || l.release());
        }
        (Obj::RLock(l), OP_ACQUIRE) => {
            let now = l.acquire(false, None).is_some();
            return acquire_held(s, q, held, o, now, |w| l.acquire_with(w), || l.release());
        }
        (Obj::Sem(x), OP_ACQUIRE) => sem_acquire(
            s,
            q,
            x.acquire(false, None),
            |w| sync_step(x.acquire_with(w)),
            || x.release(),
        )?,
        (Obj::BSem(x), OP_ACQUIRE) => sem_acquire(
            s,
            q,
            x.acquire(false, None),
            |w| sync_step(x.acquire_with(w)),
            || x.release(),
        )?,
        (Obj::Lock(l), OP_RELEASE) => match l.release() {
            Ok(()) => {
                note_held(held, o, -1);
                Reply::None
            }
            Err(e) => return Ok(Err(e.into())),
        },
        (Obj::RLock(l), OP_RELEASE) => match l.release() {
            Ok(()) => {
                note_held(held, o, -1);
                Reply::None
            }
            Err(SyncError::NotHeld) => return Ok(Err(SyncError::NotOwner.into())),
            Err(e) => return Ok(Err(e.into())),
        },
        (Obj::Sem(x), OP_RELEASE) => {
            return Ok(x.release_n(q.n).map(|_| Reply::None).map_err(Error::from))
        }
        (Obj::BSem(x), OP_RELEASE) => {
            return Ok(x.release_n(q.n).map(|_| Reply::None).map_err(Error::from))
        }
        (Obj::Lock(l), OP_VALUE) => Reply::Bool(l.is_locked()),
        (Obj::RLock(l), OP_VALUE) => Reply::Int(l.count() as u64),
        (Obj::RLock(l), OP_IS_MINE) => Reply::Bool(l.is_mine()),
        (Obj::Sem(x), OP_VALUE) => Reply::Int(x.get_value() as u64),
        (Obj::BSem(x), OP_VALUE) => Reply::Int(x.get_value() as u64),
        (Obj::Event(e), OP_VALUE) => Reply::Bool(e.is_set()),
        (Obj::Event(e), OP_SET) => {
            e.set();
            Reply::None
        }
        (Obj::Event(e), OP_CLEAR) => {
            e.clear();
            Reply::None
        }
        (Obj::Event(e), OP_WAIT) => {
            if e.is_set() {
                Reply::Bool(true)
            } else {
                let r = wait_for(s, q.timeout, |w| sync_step(e.wait_with(w)))?;
                match r {
                    Some(Err(err)) => return Ok(Err(err)),
                    Some(Ok(())) => Reply::Bool(true),
                    None => Reply::Bool(e.is_set()),
                }
            }
        }
        (Obj::Channel(ch), OP_LOCKED_RECV | OP_LOCKED_SEND) => {
            let Some((lock, rest)) = lock_of(srv, q.payload) else {
                return bad();
            };
            // A receive may name a second semaphore, released once the message is taken
            // (what a Queue's get does after it: its count of items).
            if q.op == OP_LOCKED_RECV && !rest.is_empty() {
                let Some((then, _)) = lock_of(srv, rest) else {
                    return bad();
                };
                let r = locked(s, ch, &lock, q, &[])?;
                return Ok(match r {
                    Ok(Reply::Msg(m)) => match lock_release(&then) {
                        Ok(()) => Ok(Reply::Msg(m)),
                        Err(e) => {
                            put_back(ch, m);
                            Err(e.into())
                        }
                    },
                    r => r,
                });
            }
            return locked(s, ch, &lock, q, rest);
        }
        (Obj::Block(b), OP_LEN) => Reply::Int(b.len() as u64),
        (Obj::Block(b), OP_READ) => return Ok(block_read(b, q.payload)),
        (Obj::Block(b), OP_WRITE) => return Ok(block_write(b, q.payload)),
        (Obj::Block(b), OP_LOCKED_READ | OP_LOCKED_WRITE) => {
            // `with lock: read or write`, as CPython's synchronized wrappers do per access.
            let Some((lock, rest)) = lock_of(srv, q.payload) else {
                return bad();
            };
            match wait_for(s, q.timeout, |w| sync_step(lock_acquire(&lock, w)))? {
                Some(Ok(())) => {}
                Some(Err(e)) => return Ok(Err(e)),
                None => return Ok(Err(SyncError::TimedOut.into())),
            }
            let r = if q.op == OP_LOCKED_READ {
                block_read(b, rest)
            } else {
                block_write(b, rest)
            };
            let _ = lock_release(&lock);
            return Ok(r);
        }
        (Obj::Kv(kv), OP_KV_PUT_IN_RANGE) => return Ok(kv_put_in_range(kv, q)),
        (Obj::Kv(kv), OP_KV_RANGE_GET) => {
            let range = kv.chkpt_range();
            match kv.get(q.payload) {
                Ok(b) => Reply::RangeGet(range, b),
                Err(e) => return Ok(Err(e.into())),
            }
        }
        _ => return bad(),
    }))
}

/// Bytes `[off, off + n)` of `b` (`payload`: `off u64, n u64`).
pub(super) fn block_read(b: &dragon_shm::heap::Block, payload: &[u8]) -> Result<Reply> {
    let Some((off, n)) = byte_range(b, le_u64(payload, 0), le_u64(payload, 8)) else {
        return Err(Error::value("read or write beyond the block"));
    };
    let mut v = vec![0u8; n];
    // SAFETY: [off, off + n) lies inside the block (byte_range), which this handle keeps
    // mapped; no Rust reference to the shared bytes is made, as processes of the Value may
    // write them at any time (their lock orders the accesses).
    unsafe { std::ptr::copy_nonoverlapping(b.as_ptr().add(off), v.as_mut_ptr(), n) };
    Ok(Reply::Data(v))
}

/// Stores the bytes after `payload`'s `off u64` at `off` in `b`.
pub(super) fn block_write(b: &dragon_shm::heap::Block, payload: &[u8]) -> Result<Reply> {
    let data = payload.get(8..).unwrap_or(&[]);
    let Some((off, n)) = byte_range(b, le_u64(payload, 0), Some(data.len() as u64)) else {
        return Err(Error::value("read or write beyond the block"));
    };
    // SAFETY: as in block_read: in bounds, mapped, written through the raw pointer only.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), b.as_ptr().add(off), n) };
    Ok(Reply::None)
}

/// The little-endian u64 at byte `i` of `b`, if `b` is long enough.
pub(super) fn le_u64(b: &[u8], i: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(i..i + 8)?.try_into().ok()?))
}

/// `(off, n)` as a byte range of block `b`, if both are given and the range lies inside it.
pub(super) fn byte_range(
    b: &dragon_shm::heap::Block,
    off: Option<u64>,
    n: Option<u64>,
) -> Option<(usize, usize)> {
    let (off, n) = (usize::try_from(off?).ok()?, usize::try_from(n?).ok()?);
    (off.checked_add(n)? <= b.len()).then_some((off, n))
}

/// Sends `data` (in the parts layout) as a block message: one block of the channel's pool.
pub(super) fn channel_send_data_block(
    s: &TcpStream,
    ch: &Channel,
    data: &[u8],
    timeout: Option<Duration>,
) -> std::result::Result<Result<Reply>, Left> {
    let pool = match ch.pool() {
        Ok(p) => p,
        Err(e) => return Ok(Err(e.into())),
    };
    let mut b = match pool.alloc(data.len().max(1)) {
        Ok(b) => b,
        Err(e) => return Ok(Err(e.into())),
    };
    b.as_mut_slice()[..data.len()].copy_from_slice(data);
    channel_send_block(s, ch, b, timeout)
}

/// Sends block `b` as one message, waiting up to `timeout` for room.
pub(super) fn channel_send_block(
    s: &TcpStream,
    ch: &Channel,
    b: dragon_shm::heap::Block,
    timeout: Option<Duration>,
) -> std::result::Result<Result<Reply>, Left> {
    let slot = Mutex::new(Some(b));
    let r = wait_for(s, timeout, |w| {
        crate::channel::send_block_slice(ch, &slot, w)
    })?;
    Ok(match r {
        Some(Ok(())) => Ok(Reply::None),
        Some(Err(e)) => Err(e.into()),
        None => Err(ChannelError::Full.into()),
    })
}

/// The lock a fused call names at the start of its payload (`kind u8, ref, pool name length
/// u16, pool name`), and the rest of the payload.
pub(super) fn lock_of<'a>(srv: &Server, p: &'a [u8]) -> Option<(Arc<Obj>, &'a [u8])> {
    if p.len() < 31 {
        return None;
    }
    let u64_at = |i: usize| u64::from_le_bytes(p[i..i + 8].try_into().expect("8 bytes"));
    let r = (
        u64_at(1),
        u64_at(9),
        u64_at(17),
        u32::from_le_bytes(p[25..29].try_into().expect("4 bytes")),
    );
    let n = u16::from_le_bytes([p[29], p[30]]) as usize;
    let pool = std::str::from_utf8(p.get(31..31 + n)?).ok()?;
    if !matches!(p[0], K_LOCK | K_SEM | K_BSEM) {
        return None;
    }
    let o = srv.object(p[0], pool, r).ok()?;
    Some((o, &p[31 + n..]))
}

pub(super) fn lock_acquire(o: &Obj, w: &WaitOpts) -> std::result::Result<(), SyncError> {
    match o {
        Obj::Lock(l) => l.acquire_with(w).map(|_| ()),
        Obj::Sem(x) => x.acquire_with(w),
        Obj::BSem(x) => x.acquire_with(w),
        _ => Err(SyncError::BadLayout("not a lock")),
    }
}

pub(super) fn lock_release(o: &Obj) -> std::result::Result<(), SyncError> {
    match o {
        Obj::Lock(l) => l.release(),
        Obj::Sem(x) => x.release(),
        Obj::BSem(x) => x.release(),
        _ => Err(SyncError::BadLayout("not a lock")),
    }
}

/// `with lock: channel.recv()` (or `send(rest)`) in one call: what CPython's queues do around
/// each message, done where the objects are. The lock is taken with the call's time-out;
/// the channel operation waits as long as it must; the lock is always given back.
pub(super) fn locked(
    s: &TcpStream,
    ch: &Channel,
    lock: &Obj,
    q: &Request<'_>,
    rest: &[u8],
) -> std::result::Result<Result<Reply>, Left> {
    match wait_for(s, q.timeout, |w| sync_step(lock_acquire(lock, w)))? {
        Some(Ok(())) => {}
        Some(Err(e)) => return Ok(Err(e)),
        None => return Ok(Ok(Reply::Bool(false))),
    }
    let r = if q.op == OP_LOCKED_SEND && q.as_block {
        channel_send_data_block(s, ch, rest, None)
    } else if q.op == OP_LOCKED_SEND {
        channel_send(s, ch, rest, true, None)
            .map(|r| done(r, ChannelError::Full).map(|_| Reply::None))
    } else {
        channel_recv(s, ch, true, None).map(|r| done(r, ChannelError::Empty).map(Reply::Msg))
    };
    let _ = lock_release(lock);
    r
}

/// Sends `data` on `ch`: at once, or (`block`) waiting up to `timeout` for room (`None`: it
/// passed first).
fn channel_send(
    s: &TcpStream,
    ch: &Channel,
    data: &[u8],
    block: bool,
    timeout: Option<Duration>,
) -> std::result::Result<Option<std::result::Result<(), ChannelError>>, Left> {
    match ch.try_send(data) {
        Err(ChannelError::Full) if block => {}
        r => return Ok(Some(r)),
    }
    wait_for(s, timeout, |w| match ch.send_opts(data, w) {
        Err(ChannelError::TimedOut) | Err(ChannelError::Interrupted) => Slice::Again,
        r => Slice::Done(r),
    })
}

/// The next message of `ch`: at once, or (`block`) waiting up to `timeout` (`None`: it
/// passed first). One taken after a wait, in the slice in which the client left, goes back
/// into the channel (`Left`): a write to the client's closed socket could still succeed.
fn channel_recv(
    s: &TcpStream,
    ch: &Channel,
    block: bool,
    timeout: Option<Duration>,
) -> std::result::Result<Option<std::result::Result<Message, ChannelError>>, Left> {
    match ch.try_recv() {
        Err(ChannelError::Empty) if block => {}
        r => return Ok(Some(r)),
    }
    let r = wait_for(s, timeout, |w| match ch.recv_opts(w) {
        Err(ChannelError::TimedOut) | Err(ChannelError::Interrupted) => Slice::Again,
        r => Slice::Done(r),
    })?;
    match r {
        Some(Ok(m)) if gone(s) => {
            put_back(ch, m);
            Err(Left)
        }
        r => Ok(r),
    }
}

/// A channel call's answer: `none` when its time-out passed first.
fn done<T>(r: Option<std::result::Result<T, ChannelError>>, none: ChannelError) -> Result<T> {
    r.unwrap_or(Err(none)).map_err(Error::from)
}

/// A DDict put that only a checkpoint in the working set takes: payload `c u64`, then the
/// key (`n` bytes), then the value in the parts layout.
pub(super) fn kv_put_in_range(kv: &Kv, q: &Request<'_>) -> Result<Reply> {
    let k = q.n as usize;
    if q.payload.len() < 8 + k {
        return Err(Error::value("a short DDict put"));
    }
    let c = u64::from_le_bytes(q.payload[..8].try_into().expect("8 bytes"));
    let (key, value) = q.payload[8..].split_at(k);
    let mut block = kv.pool().alloc(value.len().max(1)).map_err(KvError::from)?;
    block.as_mut_slice()[..value.len()].copy_from_slice(value);
    let (old, new) = kv.chkpt_range();
    if !(old <= c && c <= new) {
        return Ok(Reply::Bool(false));
    }
    kv.put(key, block)?;
    Ok(Reply::Bool(true))
}

/// A `Lock`'s or `RLock`'s acquire for a client (`now`: it was free): else, when the call
/// may wait, within its time-out (errors answered); one got in the slice in which the
/// client left is given back, one the client got is noted in `held`.
fn acquire_held<G>(
    s: &TcpStream,
    q: &Request<'_>,
    held: &mut Held,
    o: &Arc<Obj>,
    now: bool,
    wait: impl Fn(&WaitOpts) -> std::result::Result<G, SyncError>,
    give_back: impl Fn() -> std::result::Result<(), SyncError>,
) -> std::result::Result<Result<Reply>, Left> {
    let mut ok = now;
    if !ok && q.block {
        match wait_for(s, q.timeout, |w| sync_step(wait(w)))? {
            Some(Err(e)) => return Ok(Err(e)),
            Some(Ok(_)) => ok = true,
            None => {}
        }
        if ok && gone(s) {
            let _ = give_back();
            return Err(Left);
        }
    }
    if ok {
        note_held(held, o, 1);
    }
    Ok(Ok(Reply::Bool(ok)))
}

pub(super) fn sem_acquire(
    s: &TcpStream,
    q: &Request<'_>,
    now: bool,
    wait: impl Fn(&WaitOpts) -> Slice<Result<()>>,
    give_back: impl Fn() -> std::result::Result<(), SyncError>,
) -> std::result::Result<Reply, Left> {
    if now || !q.block {
        return Ok(Reply::Bool(now));
    }
    match wait_for(s, q.timeout, wait)? {
        Some(Ok(())) => {
            if gone(s) {
                let _ = give_back();
                return Err(Left);
            }
            Ok(Reply::Bool(true))
        }
        // Errors of a semaphore's wait are time-outs and signals, retried above.
        Some(Err(_)) | None => Ok(Reply::Bool(false)),
    }
}
