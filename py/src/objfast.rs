//! The object fast path across nodes: a node's object server in Rust, and its client.
//!
//! `dragon._objserver` (Python) serves every kind of shared object to processes of other
//! nodes. The operations a program repeats in a loop (a queue's send and receive, a lock's
//! acquire and release, a semaphore, an event) go through this server instead: its threads
//! never take the GIL, and its frames are fixed binary headers, so a remote call costs little
//! more than a TCP round trip. Both servers of a node share one ticket; the node table's
//! `objects` entry names both ports.
//!
//! Frames, little-endian, each prefixed by its body length as a `u64`:
//!
//! * request: `op u8, kind u8, flags u8 (1: block), 0 u8, n u32, timeout f64 (negative:
//!   none), ref (segment u64, offset u64, len u64, gen u32), pool name length u16`, the pool
//!   name, then the payload (a message to send);
//! * reply: `0 u8` then a value (`0` none, `1` false, `2` true, `3` + `u64`, `4` + inline
//!   message bytes, `5` + block message bytes), or `1 u8` then an error (`1` + channel error
//!   code, `2` + sync error code, `3` + exception class; then its message).
//!
//! A server thread waiting for a client (a receive, an acquire, an event) looks every
//! [`SLICE`] whether the client is still there; one that left stops waiting, a message taken
//! for it goes back into its channel, and locks it held are released, as the Python server
//! does.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dragon_shm::channel::{Channel, ChannelError, Message};
use dragon_shm::heap::AllocError;
use dragon_shm::kv::{Kv, KvError};
use dragon_shm::sync::{self, SyncError, WaitOpts};
use dragon_shm::waitqueue::default_spin;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use pyo3::IntoPyObjectExt;

use crate::errors::{Class, Error, Result};
use crate::pool::{block_of, open_pool, PyBlock, PyPool};
use crate::segment::RefTuple;

/// How long a server thread waits for an object before looking whether its client left.
const SLICE: Duration = Duration::from_millis(250);
/// How long a client waits for a reply before running Python's signal handlers.
const CLIENT_SLICE: Duration = Duration::from_millis(100);
/// The ticket's length (`dragon._objserver.TICKET_LEN`).
const TICKET_LEN: usize = 16;
/// The largest request body a server reads (clients send larger messages the Python way).
const MAX_REQUEST: u64 = 4 << 20;
/// Bytes of a request before the pool name.
const HEAD: usize = 46;

const OP_SEND: u8 = 1;
const OP_RECV: u8 = 2;
const OP_LEN: u8 = 3;
const OP_ACQUIRE: u8 = 4;
const OP_RELEASE: u8 = 5;
const OP_VALUE: u8 = 6;
const OP_IS_MINE: u8 = 7;
const OP_SET: u8 = 8;
const OP_CLEAR: u8 = 9;
const OP_WAIT: u8 = 10;
const OP_KV_PUT_IN_RANGE: u8 = 11;
const OP_KV_RANGE_GET: u8 = 12;
const OP_LOCKED_RECV: u8 = 13;
const OP_LOCKED_SEND: u8 = 14;
const OP_READ: u8 = 15;
const OP_WRITE: u8 = 16;
const OP_LOCKED_READ: u8 = 17;
const OP_LOCKED_WRITE: u8 = 18;

/// Request flag: the call may wait.
const F_BLOCK: u8 = 1;
/// Request flag: the message goes as a block message (its bytes in the parts layout).
const F_AS_BLOCK: u8 = 2;

const K_CHANNEL: u8 = 1;
const K_LOCK: u8 = 2;
const K_RLOCK: u8 = 3;
const K_SEM: u8 = 4;
const K_BSEM: u8 = 5;
const K_EVENT: u8 = 6;
const K_KV: u8 = 7;
const K_BLOCK: u8 = 8;

fn op_code(op: &str) -> Option<u8> {
    Some(match op {
        "send" => OP_SEND,
        "recv" => OP_RECV,
        "len" => OP_LEN,
        "acquire" => OP_ACQUIRE,
        "release" => OP_RELEASE,
        "value" => OP_VALUE,
        "is_mine" => OP_IS_MINE,
        "set" => OP_SET,
        "clear" => OP_CLEAR,
        "wait" => OP_WAIT,
        "put_in_range" => OP_KV_PUT_IN_RANGE,
        "range_and_get" => OP_KV_RANGE_GET,
        "locked_recv" => OP_LOCKED_RECV,
        "locked_send" => OP_LOCKED_SEND,
        "read" => OP_READ,
        "write" => OP_WRITE,
        "locked_read" => OP_LOCKED_READ,
        "locked_write" => OP_LOCKED_WRITE,
        _ => return None,
    })
}

fn kind_code(kind: &str) -> Option<u8> {
    Some(match kind {
        "Channel" => K_CHANNEL,
        "Lock" => K_LOCK,
        "RLock" => K_RLOCK,
        "Semaphore" => K_SEM,
        "BoundedSemaphore" => K_BSEM,
        "Event" => K_EVENT,
        "Kv" => K_KV,
        "Block" => K_BLOCK,
        _ => return None,
    })
}

// ----- errors on the wire ------------------------------------------------------------------

const CHANNEL_CODES: [ChannelError; 7] = [
    ChannelError::Full,
    ChannelError::Empty,
    ChannelError::Closed,
    ChannelError::TimedOut,
    ChannelError::PeerLost,
    ChannelError::TooLarge,
    ChannelError::Corrupt,
];

const SYNC_CODES: [SyncError; 5] = [
    SyncError::TimedOut,
    SyncError::Broken,
    SyncError::Overflow,
    SyncError::NotOwner,
    SyncError::NotHeld,
];

/// An error as the server sends it: (tag, code, message).
fn wire_error(e: &Error) -> (u8, u8, String) {
    match e {
        Error::Channel(ChannelError::Alloc(a)) => alloc_wire(a),
        Error::Channel(c) => match CHANNEL_CODES.iter().position(|x| x == c) {
            Some(i) => (1, i as u8, String::new()),
            None => (3, Class::Runtime as u8, c.to_string()),
        },
        Error::Sync(s) => match SYNC_CODES.iter().position(|x| x == s) {
            Some(i) => (2, i as u8, String::new()),
            None => (3, Class::Value as u8, s.to_string()),
        },
        Error::Raise(class, msg) => (3, *class as u8, msg.clone()),
        Error::Kv(KvError::Full) => (
            3,
            Class::DDictFull as u8,
            "the DDict manager's memory is full (delete keys or make the DDict larger)".into(),
        ),
        Error::Kv(KvError::Frozen) => (
            3,
            Class::DDictFrozen as u8,
            "the DDict is frozen (read-only): unfreeze() it to write".into(),
        ),
        Error::Kv(KvError::Alloc(a)) | Error::Alloc(a) => alloc_wire(a),
        e => (3, Class::Runtime as u8, e.to_string()),
    }
}

/// A pool's allocation error, as `errors.rs` raises it.
fn alloc_wire(a: &AllocError) -> (u8, u8, String) {
    let class = match a {
        AllocError::Full | AllocError::HoldTableFull | AllocError::ProcessTableFull => {
            Class::PoolFull
        }
        AllocError::TooLarge | AllocError::ZeroSize | AllocError::BadRef => Class::Value,
        AllocError::TimedOut => Class::Timeout,
        _ => Class::Runtime,
    };
    (3, class as u8, format!("dragon pool: {a}"))
}

/// The error a client raises for what the server sent.
fn error_of(tag: u8, code: u8, msg: &[u8]) -> Error {
    let msg = String::from_utf8_lossy(msg).into_owned();
    match tag {
        1 => match CHANNEL_CODES.get(code as usize) {
            Some(c) => Error::Channel(*c),
            None => Error::runtime(msg),
        },
        2 => match SYNC_CODES.get(code as usize) {
            Some(s) => Error::Sync(*s),
            None => Error::runtime(msg),
        },
        _ => Error::Raise(Class::from_code(code).unwrap_or(Class::Runtime), msg),
    }
}

// ----- the server --------------------------------------------------------------------------

/// An object a server thread works on.
enum Obj {
    Channel(Channel),
    Lock(sync::Lock),
    RLock(sync::RLock),
    Sem(sync::Semaphore),
    BSem(sync::BoundedSemaphore),
    Event(sync::Event),
    Kv(Kv),
    /// The bytes of a `Value`/`Array`, read and written by byte range through
    /// [`Block::as_ptr`](dragon_shm::heap::Block::as_ptr) only.
    Block(dragon_shm::heap::Block),
}

type Key = (u8, String, RefTuple);

struct Server {
    node: u32,
    ticket: [u8; TICKET_LEN],
    objects: Mutex<HashMap<Key, Arc<Obj>>>,
    stop: AtomicBool,
    port: u16,
}

static SERVER: Mutex<Option<Arc<Server>>> = Mutex::new(None);

impl Server {
    fn object(&self, kind: u8, pool: &str, r: RefTuple) -> Result<Arc<Obj>> {
        let key = (kind, pool.to_string(), r);
        let mut objects = self.objects.lock().expect("not poisoned");
        if let Some(o) = objects.get(&key) {
            return Ok(o.clone());
        }
        // A new object: first let go of the objects (and mappings) of pools that are gone.
        objects.retain(|(_, p, _), _| {
            std::path::Path::new("/dev/shm")
                .join(p.trim_start_matches('/'))
                .exists()
        });
        let node_ok = pool
            .trim_start_matches('/')
            .split('-')
            .nth(2)
            .is_some_and(|n| n == self.node.to_string());
        if !node_ok {
            return Err(Error::value(format!(
                "{pool} is not a pool of node {}",
                self.node
            )));
        }
        if kind == K_KV {
            let kv = Kv::attach(&open_pool(pool)?, crate::segment::ref_of(r))?;
            let o = Arc::new(Obj::Kv(kv));
            objects.insert(key, o.clone());
            return Ok(o);
        }
        let b = block_of(pool, r)?;
        let o = Arc::new(match kind {
            K_CHANNEL => Obj::Channel(Channel::attach(b)?),
            K_LOCK => Obj::Lock(sync::Lock::attach(b)?),
            K_RLOCK => Obj::RLock(sync::RLock::attach(b)?),
            K_SEM => Obj::Sem(sync::Semaphore::attach(b)?),
            K_BSEM => Obj::BSem(sync::BoundedSemaphore::attach(b)?),
            K_EVENT => Obj::Event(sync::Event::attach(b)?),
            K_BLOCK => Obj::Block(b),
            _ => return Err(Error::value("not an object kind of the fast path")),
        });
        objects.insert(key, o.clone());
        Ok(o)
    }
}

/// Whether the client closed its end (it sends nothing while it waits for a reply).
fn gone(s: &TcpStream) -> bool {
    if s.set_nonblocking(true).is_err() {
        return true;
    }
    let mut b = [0u8; 1];
    let r = s.peek(&mut b);
    let _ = s.set_nonblocking(false);
    match r {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != io::ErrorKind::WouldBlock,
    }
}

/// The client left while its call waited.
struct Left;

enum Step<T> {
    Done(T),
    Again,
}

/// Runs `f` in slices until it is done or `timeout` passes (`Ok(None)`); between slices,
/// `Err(Left)` when the client left.
fn wait_for<T>(
    s: &TcpStream,
    timeout: Option<Duration>,
    f: impl Fn(&WaitOpts) -> Step<T>,
) -> std::result::Result<Option<T>, Left> {
    let end = timeout.map(|t| Instant::now() + t);
    let mut first = true;
    loop {
        let slice_end = Instant::now() + SLICE;
        let deadline = match end {
            Some(e) if e <= slice_end => e,
            _ => slice_end,
        };
        let o = WaitOpts {
            deadline: Some(deadline),
            spin: if first {
                default_spin()
            } else {
                Duration::ZERO
            },
            interruptible: false,
            poll_every: None,
        };
        first = false;
        if let Step::Done(v) = f(&o) {
            return Ok(Some(v));
        }
        if end.is_some_and(|e| Instant::now() >= e) {
            return Ok(None);
        }
        if gone(s) {
            return Err(Left);
        }
    }
}

fn sync_step<T>(r: std::result::Result<T, SyncError>) -> Step<Result<T>> {
    match r {
        Err(SyncError::TimedOut) | Err(SyncError::Interrupted) => Step::Again,
        r => Step::Done(r.map_err(Error::from)),
    }
}

/// A decoded request.
struct Request<'a> {
    op: u8,
    kind: u8,
    block: bool,
    as_block: bool,
    n: u32,
    timeout: Option<Duration>,
    r: RefTuple,
    pool: &'a str,
    payload: &'a [u8],
}

fn parse(body: &[u8]) -> Option<Request<'_>> {
    if body.len() < HEAD {
        return None;
    }
    let u64_at = |i: usize| u64::from_le_bytes(body[i..i + 8].try_into().expect("8 bytes"));
    let u32_at = |i: usize| u32::from_le_bytes(body[i..i + 4].try_into().expect("4 bytes"));
    let t = f64::from_le_bytes(body[8..16].try_into().expect("8 bytes"));
    let pool_len = u16::from_le_bytes([body[44], body[45]]) as usize;
    let pool = std::str::from_utf8(body.get(HEAD..HEAD + pool_len)?).ok()?;
    Some(Request {
        op: body[0],
        kind: body[1],
        block: body[2] & F_BLOCK != 0,
        as_block: body[2] & F_AS_BLOCK != 0,
        n: u32_at(4),
        timeout: if t < 0.0 || t.is_nan() {
            None
        } else {
            Some(Duration::from_secs_f64(t.min(1e9)))
        },
        r: (u64_at(16), u64_at(24), u64_at(32), u32_at(40)),
        pool,
        payload: &body[HEAD + pool_len..],
    })
}

/// What a served call answers.
enum Reply {
    None,
    Bool(bool),
    Int(u64),
    Msg(Message),
    /// Bytes read from a block.
    Data(Vec<u8>),
    /// A DDict manager's working set and the value of a key (if any).
    RangeGet((u64, u64), Option<dragon_shm::heap::Block>),
}

/// Locks a client took through its connection and did not release, by object.
type Held = Vec<(Arc<Obj>, u32)>;

fn note_held(held: &mut Held, o: &Arc<Obj>, delta: i32) {
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

fn serve_call(
    srv: &Server,
    s: &TcpStream,
    o: &Arc<Obj>,
    q: &Request<'_>,
    held: &mut Held,
) -> std::result::Result<Result<Reply>, Left> {
    let bad = || Ok(Err(Error::value("no such operation on this object")));
    Ok(Ok(match (&**o, q.op) {
        (Obj::Channel(ch), OP_SEND) if q.as_block => {
            return channel_send_data_block(s, ch, q.payload, q.timeout);
        }
        (Obj::Channel(ch), OP_SEND) => {
            let data = q.payload;
            match ch.try_send(data) {
                Err(ChannelError::Full) if q.block => {}
                r => return Ok(r.map(|_| Reply::None).map_err(Error::from)),
            }
            let r = wait_for(s, q.timeout, |w| match ch.send_opts(data, w) {
                Err(ChannelError::TimedOut) | Err(ChannelError::Interrupted) => Step::Again,
                r => Step::Done(r),
            })?;
            match r {
                Some(Ok(())) => Reply::None,
                Some(Err(e)) => return Ok(Err(e.into())),
                None => return Ok(Err(ChannelError::Full.into())),
            }
        }
        (Obj::Channel(ch), OP_RECV) => {
            let r = match ch.try_recv() {
                Err(ChannelError::Empty) if q.block => {
                    let r = wait_for(s, q.timeout, |w| match ch.recv_opts(w) {
                        Err(ChannelError::TimedOut) | Err(ChannelError::Interrupted) => Step::Again,
                        r => Step::Done(r),
                    })?;
                    if let Some(Ok(m)) = r {
                        if gone(s) {
                            // Taken in the slice in which the client left: a write to its
                            // closed socket could still succeed, so look before sending.
                            put_back(ch, m);
                            return Err(Left);
                        }
                        Some(Ok(m))
                    } else {
                        r
                    }
                }
                r => Some(r),
            };
            match r {
                Some(Ok(m)) => Reply::Msg(m),
                Some(Err(e)) => return Ok(Err(e.into())),
                None => return Ok(Err(ChannelError::Empty.into())),
            }
        }
        (Obj::Channel(ch), OP_LEN) => Reply::Int(ch.len()),
        (Obj::Lock(l), OP_ACQUIRE) => {
            let mut ok = l.acquire(false, None).is_some();
            if !ok && q.block {
                match wait_for(s, q.timeout, |w| sync_step(l.acquire_with(w)))? {
                    Some(Err(e)) => return Ok(Err(e)),
                    Some(Ok(_)) => ok = true,
                    None => {}
                }
                if ok && gone(s) {
                    let _ = l.release(); // got in the slice in which the client left
                    return Err(Left);
                }
            }
            if ok {
                note_held(held, o, 1);
            }
            Reply::Bool(ok)
        }
        (Obj::RLock(l), OP_ACQUIRE) => {
            let mut ok = l.acquire(false, None).is_some();
            if !ok && q.block {
                match wait_for(s, q.timeout, |w| sync_step(l.acquire_with(w)))? {
                    Some(Err(e)) => return Ok(Err(e)),
                    Some(Ok(_)) => ok = true,
                    None => {}
                }
                if ok && gone(s) {
                    let _ = l.release();
                    return Err(Left);
                }
            }
            if ok {
                note_held(held, o, 1);
            }
            Reply::Bool(ok)
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
fn block_read(b: &dragon_shm::heap::Block, payload: &[u8]) -> Result<Reply> {
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
fn block_write(b: &dragon_shm::heap::Block, payload: &[u8]) -> Result<Reply> {
    let data = payload.get(8..).unwrap_or(&[]);
    let Some((off, n)) = byte_range(b, le_u64(payload, 0), Some(data.len() as u64)) else {
        return Err(Error::value("read or write beyond the block"));
    };
    // SAFETY: as in block_read: in bounds, mapped, written through the raw pointer only.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), b.as_ptr().add(off), n) };
    Ok(Reply::None)
}

/// The little-endian u64 at byte `i` of `b`, if `b` is long enough.
fn le_u64(b: &[u8], i: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(i..i + 8)?.try_into().ok()?))
}

/// `(off, n)` as a byte range of block `b`, if both are given and the range lies inside it.
fn byte_range(
    b: &dragon_shm::heap::Block,
    off: Option<u64>,
    n: Option<u64>,
) -> Option<(usize, usize)> {
    let (off, n) = (usize::try_from(off?).ok()?, usize::try_from(n?).ok()?);
    (off.checked_add(n)? <= b.len()).then_some((off, n))
}

/// Reads the next `n` bytes of the request into a new block of `ch`'s pool. When no block
/// can be had, the bytes are read and dropped (the connection stays in step) and the
/// allocation's error is the inner result; an outer error is a lost connection.
fn receive_block(
    s: &mut TcpStream,
    ch: &Channel,
    n: usize,
) -> io::Result<Result<dragon_shm::heap::Block>> {
    let b = ch
        .pool()
        .map_err(Error::from)
        .and_then(|p| p.alloc(n.max(1)).map_err(Error::from));
    match b {
        Ok(mut b) => {
            s.read_exact(&mut b.as_mut_slice()[..n])?;
            Ok(Ok(b))
        }
        Err(e) => {
            skip(s, n as u64)?;
            Ok(Err(e))
        }
    }
}

/// Reads and drops the next `n` bytes.
fn skip(s: &mut TcpStream, n: u64) -> io::Result<()> {
    let got = io::copy(&mut Read::by_ref(s).take(n), &mut io::sink())?;
    if got < n {
        return Err(io::Error::other("the connection ended"));
    }
    Ok(())
}

/// Sends `data` (in the parts layout) as a block message: one block of the channel's pool.
fn channel_send_data_block(
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
fn channel_send_block(
    s: &TcpStream,
    ch: &Channel,
    b: dragon_shm::heap::Block,
    timeout: Option<Duration>,
) -> std::result::Result<Result<Reply>, Left> {
    let slot = Mutex::new(Some(b));
    let r = wait_for(s, timeout, |w| {
        let Some(b) = slot.lock().expect("not poisoned").take() else {
            return Step::Done(Err(ChannelError::Corrupt));
        };
        match ch.send_block_opts(b, w) {
            Ok(()) => Step::Done(Ok(())),
            Err(e) => {
                let again = matches!(e.error, ChannelError::TimedOut | ChannelError::Interrupted);
                *slot.lock().expect("not poisoned") = Some(e.value);
                if again {
                    Step::Again
                } else {
                    Step::Done(Err(e.error))
                }
            }
        }
    })?;
    Ok(match r {
        Some(Ok(())) => Ok(Reply::None),
        Some(Err(e)) => Err(e.into()),
        None => Err(ChannelError::Full.into()),
    })
}

/// The lock a fused call names at the start of its payload (`kind u8, ref, pool name length
/// u16, pool name`), and the rest of the payload.
fn lock_of<'a>(srv: &Server, p: &'a [u8]) -> Option<(Arc<Obj>, &'a [u8])> {
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

fn lock_acquire(o: &Obj, w: &WaitOpts) -> std::result::Result<(), SyncError> {
    match o {
        Obj::Lock(l) => l.acquire_with(w).map(|_| ()),
        Obj::Sem(x) => x.acquire_with(w),
        Obj::BSem(x) => x.acquire_with(w),
        _ => Err(SyncError::BadLayout("not a lock")),
    }
}

fn lock_release(o: &Obj) -> std::result::Result<(), SyncError> {
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
fn locked(
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
    let r = if q.op == OP_LOCKED_SEND {
        if q.as_block {
            channel_send_data_block(s, ch, rest, None)
        } else {
            match ch.try_send(rest) {
                Err(ChannelError::Full) => wait_for(s, None, |w| match ch.send_opts(rest, w) {
                    Err(ChannelError::TimedOut) | Err(ChannelError::Interrupted) => Step::Again,
                    r => Step::Done(r),
                })
                .map(|r| match r {
                    Some(r) => r.map(|_| Reply::None).map_err(Error::from),
                    None => Err(ChannelError::Full.into()),
                }),
                r => Ok(r.map(|_| Reply::None).map_err(Error::from)),
            }
        }
    } else {
        let r = match ch.try_recv() {
            Err(ChannelError::Empty) => wait_for(s, None, |w| match ch.recv_opts(w) {
                Err(ChannelError::TimedOut) | Err(ChannelError::Interrupted) => Step::Again,
                r => Step::Done(r),
            })
            .map(|r| r.unwrap_or(Err(ChannelError::Empty))),
            r => Ok(r),
        };
        match r {
            Ok(Ok(m)) if gone(s) => {
                put_back(ch, m);
                Err(Left)
            }
            Ok(r) => Ok(r.map(Reply::Msg).map_err(Error::from)),
            Err(Left) => Err(Left),
        }
    };
    let _ = lock_release(lock);
    r
}

/// A DDict put that only a checkpoint in the working set takes: payload `c u64`, then the
/// key (`n` bytes), then the value in the parts layout.
fn kv_put_in_range(kv: &Kv, q: &Request<'_>) -> Result<Reply> {
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

fn sem_acquire(
    s: &TcpStream,
    q: &Request<'_>,
    now: bool,
    wait: impl Fn(&WaitOpts) -> Step<Result<()>>,
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

fn frame(out: &mut [u8]) {
    let n = (out.len() - 8) as u64;
    out[..8].copy_from_slice(&n.to_le_bytes());
}

/// Writes `reply`; a message that cannot be delivered goes back into its channel.
fn send_reply(s: &mut TcpStream, o: Option<&Arc<Obj>>, reply: Result<Reply>) -> io::Result<()> {
    let mut out = vec![0u8; 8];
    match reply {
        Ok(Reply::Msg(m)) => {
            let (tag, bytes): (u8, &[u8]) = match &m {
                Message::Inline(v) => (4, v),
                Message::Block(b) => (5, b.as_slice()),
            };
            out.extend_from_slice(&[0, tag]);
            let n = (out.len() - 8 + bytes.len()) as u64;
            out[..8].copy_from_slice(&n.to_le_bytes());
            let r = s.write_all(&out).and_then(|_| s.write_all(bytes));
            if r.is_err() {
                if let Some(Obj::Channel(ch)) = o.map(|o| &**o) {
                    put_back(ch, m);
                }
            }
            return r;
        }
        Ok(Reply::RangeGet((old, new), b)) => {
            out.extend_from_slice(&[0, 6]);
            out.extend_from_slice(&old.to_le_bytes());
            out.extend_from_slice(&new.to_le_bytes());
            out.push(b.is_some() as u8);
            let bytes = b.as_ref().map_or(&[][..], |b| b.as_slice());
            let n = (out.len() - 8 + bytes.len()) as u64;
            out[..8].copy_from_slice(&n.to_le_bytes());
            return s.write_all(&out).and_then(|_| s.write_all(bytes));
        }
        Ok(Reply::Data(v)) => {
            out.extend_from_slice(&[0, 4]);
            out.extend_from_slice(&v);
        }
        Ok(v) => {
            out.push(0);
            match v {
                Reply::None => out.push(0),
                Reply::Bool(b) => out.push(1 + b as u8),
                Reply::Int(i) => {
                    out.push(3);
                    out.extend_from_slice(&i.to_le_bytes());
                }
                Reply::Msg(_) | Reply::RangeGet(..) | Reply::Data(_) => {
                    unreachable!("handled above")
                }
            }
        }
        Err(e) => {
            let (tag, code, msg) = wire_error(&e);
            out.extend_from_slice(&[1, tag, code]);
            out.extend_from_slice(msg.as_bytes());
        }
    }
    frame(&mut out);
    s.write_all(&out)
}

fn put_back(ch: &Channel, m: Message) {
    let r = match m {
        Message::Inline(v) => ch.send(&v, Some(Duration::from_secs(1))),
        Message::Block(b) => ch
            .send_block(b, Some(Duration::from_secs(1)))
            .map_err(|e| e.error),
    };
    if let Err(e) = r {
        log::error!(target: "dragon.objserver", "a message for a client that left was dropped: {e}");
    }
}

fn serve(srv: Arc<Server>, mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let mut ticket = [0u8; TICKET_LEN];
    if s.read_exact(&mut ticket).is_err() || ticket != srv.ticket {
        return;
    }
    let _ = s.set_read_timeout(None);
    if s.write_all(&[1]).is_err() {
        return;
    }
    let mut held: Held = Vec::new();
    let mut body = Vec::new();
    loop {
        let mut len = [0u8; 8];
        if s.read_exact(&mut len).is_err() {
            break;
        }
        let n = u64::from_le_bytes(len);
        body.resize(HEAD, 0);
        if n < HEAD as u64 || s.read_exact(&mut body).is_err() {
            break;
        }
        let pool_len = u16::from_le_bytes([body[44], body[45]]) as u64;
        let Some(payload_len) = n.checked_sub(HEAD as u64 + pool_len) else {
            break;
        };
        // A block message goes from the socket straight into a block of the channel's pool;
        // anything else is read whole first (and is small).
        let into_block = body[0] == OP_SEND && body[2] & F_AS_BLOCK != 0;
        let keep = if into_block {
            pool_len
        } else {
            pool_len + payload_len
        };
        if keep > MAX_REQUEST {
            break;
        }
        body.resize(HEAD + keep as usize, 0);
        if s.read_exact(&mut body[HEAD..]).is_err() {
            break;
        }
        let Some(q) = parse(&body) else { break };
        let o = srv.object(q.kind, q.pool, q.r);
        if into_block {
            let reply = match o {
                Ok(o) => match &*o {
                    Obj::Channel(ch) => match receive_block(&mut s, ch, payload_len as usize) {
                        Ok(Ok(b)) => match channel_send_block(&s, ch, b, q.timeout) {
                            Ok(r) => r,
                            Err(Left) => break,
                        },
                        Ok(Err(e)) => Err(e),
                        Err(_) => break,
                    },
                    _ => {
                        if skip(&mut s, payload_len).is_err() {
                            break;
                        }
                        Err(Error::value("no such operation on this object"))
                    }
                },
                Err(e) => {
                    if skip(&mut s, payload_len).is_err() {
                        break;
                    }
                    Err(e)
                }
            };
            if send_reply(&mut s, None, reply).is_err() {
                break;
            }
            continue;
        }
        let (obj, reply) = match o {
            Ok(o) => match serve_call(&srv, &s, &o, &q, &mut held) {
                Ok(r) => (Some(o), r),
                Err(Left) => break,
            },
            Err(e) => (None, Err(e)),
        };
        if send_reply(&mut s, obj.as_ref(), reply).is_err() {
            break;
        }
    }
    for (o, n) in held {
        for _ in 0..n {
            let r = match &*o {
                Obj::Lock(l) => l.release(),
                Obj::RLock(l) => l.release(),
                _ => Ok(()),
            };
            if r.is_err() {
                break;
            }
        }
    }
}

/// Starts this process's fast object server on `ip` (port chosen by the OS) for node `node`'s
/// objects, with the node's object ticket; returns its port. Started once per process.
#[pyfunction]
pub(crate) fn objserver_start(py: Python<'_>, ip: &str, node: u32, ticket: &[u8]) -> Result<u16> {
    let mut slot = SERVER.lock().expect("not poisoned");
    if let Some(s) = slot.as_ref() {
        return Ok(s.port);
    }
    let t: [u8; TICKET_LEN] = ticket
        .try_into()
        .map_err(|_| Error::value("the ticket is 16 bytes"))?;
    let host = ip.trim_start_matches('[').trim_end_matches(']');
    let listener = py
        .detach(|| TcpListener::bind((host, 0)))
        .map_err(|e| Error::runtime(format!("object server on {ip}: {e}")))?;
    let port = listener
        .local_addr()
        .map_err(|e| Error::runtime(e.to_string()))?
        .port();
    let srv = Arc::new(Server {
        node,
        ticket: t,
        objects: Mutex::new(HashMap::new()),
        stop: AtomicBool::new(false),
        port,
    });
    let me = srv.clone();
    std::thread::Builder::new()
        .name("dragon-objfast".into())
        .spawn(move || {
            for c in listener.incoming() {
                if me.stop.load(Ordering::Acquire) {
                    break;
                }
                let Ok(c) = c else { continue };
                let srv = me.clone();
                let _ = std::thread::Builder::new()
                    .name("dragon-objfast-conn".into())
                    .spawn(move || serve(srv, c));
            }
        })
        .map_err(|e| Error::runtime(format!("object server thread: {e}")))?;
    *slot = Some(srv);
    Ok(port)
}

/// Stops accepting connections on this process's fast object server (if started).
#[pyfunction]
pub(crate) fn objserver_stop(py: Python<'_>, ip: &str) {
    let srv = SERVER.lock().expect("not poisoned").take();
    if let Some(s) = srv {
        s.stop.store(true, Ordering::Release);
        let host = ip.trim_start_matches('[').trim_end_matches(']');
        // Wakes the accepting thread, which sees `stop`.
        let _ = py.detach(|| TcpStream::connect((host, s.port)));
    }
}

// ----- the client --------------------------------------------------------------------------

/// One connection of this thread to a node's fast object server.
struct Conn {
    s: TcpStream,
    pid: u32,
}

thread_local! {
    static CONNS: RefCell<HashMap<String, Conn>> = RefCell::new(HashMap::new());
}

fn keepalive(s: &TcpStream) {
    let fd = s.as_raw_fd();
    for (level, opt, v) in [
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 2),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3),
    ] {
        let v: libc::c_int = v;
        // SAFETY: `fd` is the open socket `s` owns for this call; `v` is a c_int that lives
        // across the call and its size is passed with it.
        unsafe {
            libc::setsockopt(
                fd,
                level,
                opt,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

fn connect(addr: &str, ticket: &[u8]) -> io::Result<TcpStream> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| io::Error::other("bad address"))?;
    let port: u16 = port.parse().map_err(|_| io::Error::other("bad port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let sa = (host, port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::other("no address"))?;
    let mut s = TcpStream::connect_timeout(&sa, Duration::from_secs(10))?;
    s.set_nodelay(true)?;
    keepalive(&s);
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(&ticket[..TICKET_LEN.min(ticket.len())])?;
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack)?;
    if ack[0] != 1 {
        return Err(io::Error::other("the object server refused the ticket"));
    }
    Ok(s)
}

/// Where the reading of one reply stands.
#[derive(Default)]
struct ReplyIn {
    len: [u8; 8],
    got_len: usize,
    head: Vec<u8>,
    /// A DDict read's working set and found flag (17 bytes), before its value.
    prefix: Vec<u8>,
    body: Option<Vec<u8>>,
    block: Option<dragon_shm::heap::Block>,
    /// Why no local block took a block message (it is read, then this is raised).
    alloc_err: Option<dragon_shm::heap::AllocError>,
    filled: usize,
}

enum Progress {
    Done,
    Pending,
}

/// Reads on from where `st` stands, for at most one read time-out.
fn read_reply(s: &mut TcpStream, st: &mut ReplyIn, pool: Option<&PyPool>) -> io::Result<Progress> {
    let pending = |e: &io::Error| {
        matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
        )
    };
    macro_rules! read_into {
        ($buf:expr) => {
            match s.read($buf) {
                Ok(0) => return Err(io::Error::other("the connection ended")),
                Ok(k) => k,
                Err(e) if pending(&e) => return Ok(Progress::Pending),
                Err(e) => return Err(e),
            }
        };
    }
    while st.got_len < 8 {
        let k = read_into!(&mut st.len[st.got_len..]);
        st.got_len += k;
    }
    let total = u64::from_le_bytes(st.len) as usize;
    if total < 2 {
        return Err(io::Error::other("a short reply"));
    }
    while st.head.len() < 2 {
        let mut b = [0u8; 2];
        let want = 2 - st.head.len();
        let k = read_into!(&mut b[..want]);
        st.head.extend_from_slice(&b[..k]);
    }
    let want = if st.head == [0, 6] { 17 } else { 0 };
    if total < 2 + want {
        return Err(io::Error::other("a short reply"));
    }
    while st.prefix.len() < want {
        let mut b = [0u8; 17];
        let left = want - st.prefix.len();
        let k = read_into!(&mut b[..left]);
        st.prefix.extend_from_slice(&b[..k]);
    }
    let rest = total - 2 - want;
    let block_msg = st.head == [0, 5] || (st.head == [0, 6] && st.prefix[16] == 1);
    if st.body.is_none() && st.block.is_none() {
        if block_msg && rest > 0 {
            if let Some(p) = pool {
                match p.inner.alloc(rest) {
                    Ok(b) => st.block = Some(b),
                    Err(e) => st.alloc_err = Some(e),
                }
            }
        }
        if st.block.is_none() {
            st.body = Some(vec![0u8; rest]);
        }
    }
    let buf: &mut [u8] = match (&mut st.block, &mut st.body) {
        (Some(b), _) => &mut b.as_mut_slice()[..rest],
        (None, Some(v)) => v,
        (None, None) => unreachable!("one of them is set above"),
    };
    while st.filled < rest {
        let k = read_into!(&mut buf[st.filled..]);
        st.filled += k;
    }
    Ok(Progress::Done)
}

/// Runs `op` on the object `kind` at `ref` of pool `pool`, served by the fast object server
/// at `addr` (`ip:port`, ticket `ticket`): `send` (payload `data`), `recv`, `len`, `acquire`
/// (`block`, `timeout`), `release` (`n` units), `value` (`is_locked`, `count`, `get_value`
/// or `is_set`), `is_mine`, `set`, `clear`, `wait` (`timeout`). A received message larger
/// than the channel's slots lands in a block of `local_pool` (returned as a `Block`; a
/// `bytearray` when that pool has no room), a smaller one is `bytes`. A server that cannot be reached or is lost is `NodeLostError`.
#[pyfunction]
#[pyo3(signature = (addr, ticket, op, kind, pool, r, block=true, timeout=None, n=1, data=None, local_pool=None, as_block=false, parts=None))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn objcall(
    py: Python<'_>,
    addr: &str,
    ticket: &[u8],
    op: &str,
    kind: &str,
    pool: &str,
    r: RefTuple,
    block: bool,
    timeout: Option<f64>,
    n: u32,
    data: Option<pyo3::buffer::PyBuffer<u8>>,
    local_pool: Option<&PyPool>,
    as_block: bool,
    parts: Option<Vec<pyo3::buffer::PyBuffer<u8>>>,
) -> Result<Py<PyAny>> {
    let (Some(opc), Some(kc)) = (op_code(op), kind_code(kind)) else {
        return Err(Error::value(format!(
            "no fast operation {op:?} on a {kind}"
        )));
    };
    if let Some(t) = timeout {
        if t.is_nan() {
            return Err(Error::value("timeout must be a number"));
        }
    }
    let mut req = Vec::with_capacity(8 + HEAD + pool.len() + 64);
    req.extend_from_slice(&[0u8; 8]);
    let flags = if block { F_BLOCK } else { 0 } | if as_block { F_AS_BLOCK } else { 0 };
    req.extend_from_slice(&[opc, kc, flags, 0]);
    req.extend_from_slice(&n.to_le_bytes());
    req.extend_from_slice(&timeout.map_or(-1.0, |t| t.max(0.0)).to_le_bytes());
    req.extend_from_slice(&r.0.to_le_bytes());
    req.extend_from_slice(&r.1.to_le_bytes());
    req.extend_from_slice(&r.2.to_le_bytes());
    req.extend_from_slice(&r.3.to_le_bytes());
    req.extend_from_slice(&(pool.len() as u16).to_le_bytes());
    req.extend_from_slice(pool.as_bytes());
    if let Some(d) = &data {
        if !d.is_c_contiguous() {
            return Err(Error::value("send takes a C-contiguous buffer"));
        }
        let len = d.len_bytes();
        if len > 0 {
            let at = req.len();
            req.resize(at + len, 0);
            d.copy_to_slice(py, &mut req[at..])?;
        }
    }
    // Buffers sent after `data` as they are, with the GIL released (a large block message:
    // no copy on this side; the server reads it straight into a block).
    let mut spans: Vec<&[u8]> = Vec::new();
    for b in parts.iter().flatten() {
        if !b.is_c_contiguous() {
            return Err(Error::value("send takes C-contiguous buffers"));
        }
        if b.len_bytes() > 0 {
            // SAFETY: `b` is a C-contiguous export of `len_bytes()` bytes held (in `parts`)
            // until this call returns, so the memory stays valid and unresized; as for any
            // send, a writer racing with it in another thread is the program's own race.
            spans.push(unsafe {
                std::slice::from_raw_parts(b.buf_ptr() as *const u8, b.len_bytes())
            });
        }
    }
    let extra: usize = spans.iter().map(|s| s.len()).sum();
    let total = (req.len() - 8 + extra) as u64;
    req[..8].copy_from_slice(&total.to_le_bytes());

    let lost = |e: io::Error| {
        let node = pool
            .trim_start_matches('/')
            .split('-')
            .nth(2)
            .unwrap_or("?");
        Error::Raise(
            Class::NodeLost,
            format!("node {node} was lost (its object server at {addr}: {e})"),
        )
    };
    let pid = std::process::id();
    let conn = CONNS.with(|c| c.borrow_mut().remove(addr));
    let mut conn = match conn {
        Some(c) if c.pid == pid => c,
        _ => {
            let s = py.detach(|| connect(addr, ticket)).map_err(lost)?;
            Conn { s, pid }
        }
    };
    py.detach(|| {
        conn.s.set_read_timeout(Some(CLIENT_SLICE))?;
        conn.s.write_all(&req)?;
        for sp in &spans {
            conn.s.write_all(sp)?;
        }
        Ok::<(), io::Error>(())
    })
    .map_err(lost)?;
    let mut st = ReplyIn::default();
    loop {
        match py.detach(|| read_reply(&mut conn.s, &mut st, local_pool)) {
            Ok(Progress::Done) => break,
            Ok(Progress::Pending) => py.check_signals()?, // an exception drops `conn`
            Err(e) => return Err(lost(e)),
        }
    }
    CONNS.with(|c| c.borrow_mut().insert(addr.to_string(), conn));
    // A message taken from its channel is never dropped: when no local block could be had
    // it arrives in process memory (a bytearray in the same parts layout). A DDict read
    // (range_and_get) takes nothing away, so it raises the pool's error.
    if let Some(e) = st.alloc_err {
        if st.head != [0, 5] {
            return Err(e.into());
        }
        let body = st.body.as_deref().unwrap_or(&[]);
        return Ok(pyo3::types::PyByteArray::new(py, body).into_any().unbind());
    }
    let body = st.body.as_deref().unwrap_or(&[]);
    match st.head[0] {
        0 => Ok(match st.head[1] {
            0 => py.None(),
            1 => false.into_py_any(py)?,
            2 => true.into_py_any(py)?,
            3 if body.len() == 8 => {
                let v = u64::from_le_bytes(body.try_into().expect("8 bytes"));
                v.into_py_any(py)?
            }
            4 => PyBytes::new(py, body).into_any().unbind(),
            5 => match st.block.take() {
                Some(b) => Py::new(
                    py,
                    PyBlock {
                        inner: b,
                        readonly: false,
                    },
                )?
                .into_any(),
                None => PyBytes::new(py, body).into_any().unbind(),
            },
            6 => {
                let u = |i: usize| u64::from_le_bytes(st.prefix[i..i + 8].try_into().expect("8"));
                let range = (u(0), u(8));
                let value = match (st.prefix[16], st.block.take()) {
                    (0, _) => py.None(),
                    (_, Some(b)) => Py::new(
                        py,
                        PyBlock {
                            inner: b,
                            readonly: true,
                        },
                    )?
                    .into_any(),
                    (_, None) => PyBytes::new(py, body).into_any().unbind(),
                };
                (range, value).into_py_any(py)?
            }
            _ => return Err(Error::runtime("the object server sent a bad reply")),
        }),
        _ if !body.is_empty() => Err(error_of(st.head[1], body[0], &body[1..])),
        _ => Err(Error::runtime("the object server sent a bad reply")),
    }
}
