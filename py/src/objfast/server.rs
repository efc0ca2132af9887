//! The fast object server: a listener per node, a thread per client connection, request
//! framing and replies (the operations themselves: `calls`).

use super::calls::*;
use super::*;

/// An object a server thread works on.
pub(super) enum Obj {
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

pub(super) type Key = (u8, String, RefTuple);

pub(super) struct Server {
    pub(super) node: u32,
    pub(super) ticket: [u8; TICKET_LEN],
    pub(super) objects: Mutex<HashMap<Key, Arc<Obj>>>,
    pub(super) stop: AtomicBool,
    pub(super) port: u16,
}

pub(super) static SERVER: Mutex<Option<Arc<Server>>> = Mutex::new(None);

impl Server {
    pub(super) fn object(&self, kind: u8, pool: &str, r: RefTuple) -> Result<Arc<Obj>> {
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
pub(super) fn gone(s: &TcpStream) -> bool {
    match super::peek(s) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != io::ErrorKind::WouldBlock,
    }
}

/// The client left while its call waited.
pub(super) struct Left;

/// Runs `f` in slices until it is done or `timeout` passes (`Ok(None)`); between slices,
/// `Err(Left)` when the client left.
pub(super) fn wait_for<T>(
    s: &TcpStream,
    timeout: Option<Duration>,
    f: impl Fn(&WaitOpts) -> Slice<T>,
) -> std::result::Result<Option<T>, Left> {
    let end = timeout.map(|t| Instant::now() + t);
    let mut first = true;
    loop {
        let o = crate::blocking::slice_opts(end, SLICE, first, false);
        first = false;
        if let Slice::Done(v) = f(&o) {
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

pub(super) fn sync_step<T>(r: std::result::Result<T, SyncError>) -> Slice<Result<T>> {
    match r {
        Err(SyncError::TimedOut) | Err(SyncError::Interrupted) => Slice::Again,
        r => Slice::Done(r.map_err(Error::from)),
    }
}

/// A decoded request.
pub(super) struct Request<'a> {
    pub(super) op: u8,
    pub(super) kind: u8,
    pub(super) block: bool,
    pub(super) as_block: bool,
    /// The client takes (a receive) or gives (a block send) a large block message by RMA.
    pub(super) rma: bool,
    pub(super) n: u32,
    pub(super) timeout: Option<Duration>,
    pub(super) r: RefTuple,
    pub(super) pool: &'a str,
    pub(super) payload: &'a [u8],
}

pub(super) fn parse(body: &[u8]) -> Option<Request<'_>> {
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
        rma: body[2] & F_RMA != 0,
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
pub(super) enum Reply {
    None,
    Bool(bool),
    Int(u64),
    Msg(Message),
    /// Bytes read from a block.
    Data(Vec<u8>),
    /// A DDict manager's working set and the value of a key (if any).
    RangeGet((u64, u64), Option<dragon_shm::heap::Block>),
}

/// Reads the next `n` bytes of the request into a new block of `ch`'s pool. When no block
/// can be had, the bytes are read and dropped (the connection stays in step) and the
/// allocation's error is the inner result; an outer error is a lost connection.
pub(super) fn receive_block(
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

/// A block message to send whose `n` payload bytes are still on the socket: read straight
/// into a block of the channel's pool, then sent. Any other object, or none, reads and drops
/// them and answers the error. `Left`: the connection is lost or the client left.
pub(super) fn serve_block_send(
    s: &mut TcpStream,
    o: Result<Arc<Obj>>,
    q: &Request<'_>,
    n: u64,
) -> std::result::Result<Result<Reply>, Left> {
    let refuse = |s: &mut TcpStream, e: Error| skip(s, n).map(|_| Err(e)).map_err(|_| Left);
    let o = match o {
        Ok(o) => o,
        Err(e) => return refuse(s, e),
    };
    let Obj::Channel(ch) = &*o else {
        return refuse(s, Error::value("no such operation on this object"));
    };
    match receive_block(s, ch, n as usize) {
        Ok(Ok(b)) => channel_send_block(s, ch, b, q.timeout),
        Ok(Err(e)) => Ok(Err(e)),
        Err(_) => Err(Left),
    }
}

/// Reads and drops the next `n` bytes.
pub(super) fn skip(s: &mut TcpStream, n: u64) -> io::Result<()> {
    let got = io::copy(&mut Read::by_ref(s).take(n), &mut io::sink())?;
    if got < n {
        return Err(io::Error::other("the connection ended"));
    }
    Ok(())
}

pub(super) fn frame(out: &mut [u8]) {
    let n = (out.len() - 8) as u64;
    out[..8].copy_from_slice(&n.to_le_bytes());
}

/// Writes `reply` (a large block message by RMA when the client asked, `rma`, and this
/// server can); a message that cannot be delivered goes back into its channel.
pub(super) fn send_reply(
    s: &mut TcpStream,
    o: Option<&Arc<Obj>>,
    reply: Result<Reply>,
    rma: bool,
) -> io::Result<()> {
    let mut out = vec![0u8; 8];
    match reply {
        Ok(Reply::Msg(m)) => {
            if let (Message::Block(b), true, Some(mv)) = (&m, rma, super::rma::mover()) {
                if b.as_slice().len() >= super::rma::RMA_MIN {
                    match super::rma::offer(s, mv, b) {
                        Ok(true) => return Ok(()),
                        Ok(false) => {}
                        Err(e) => {
                            if let Some(Obj::Channel(ch)) = o.map(|o| &**o) {
                                put_back(ch, m);
                            }
                            return Err(e);
                        }
                    }
                }
            }
            let (tag, bytes): (u8, &[u8]) = match &m {
                Message::Inline(v) => (4, v),
                Message::Block(b) => (5, b.as_slice()),
            };
            out.extend_from_slice(&[0, tag]);
            let n = (out.len() - 8 + bytes.len()) as u64;
            out[..8].copy_from_slice(&n.to_le_bytes());
            let r = super::write_parts(s, [&out[..], bytes]);
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
            return super::write_parts(s, [&out[..], bytes]);
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

pub(super) fn put_back(ch: &Channel, m: Message) {
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

pub(super) fn serve(srv: Arc<Server>, mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let mut ticket = [0u8; TICKET_LEN];
    if s.read_exact(&mut ticket).is_err() || ticket != srv.ticket {
        return;
    }
    let _ = s.set_read_timeout(None);
    // 2: this server moves large block messages by RMA (`rma`).
    let ack = if super::rma::mover().is_some() { 2 } else { 1 };
    if s.write_all(&[ack]).is_err() {
        return;
    }
    let mut held: Held = Vec::new();
    let mut body = Vec::new();
    // Whether to spin for the next request: after a small one (a client in a loop of small
    // calls sends its next soon); after a large one, the CPU is better left to the others.
    let mut spin = true;
    loop {
        let mut len = [0u8; 8];
        if spin {
            super::spin_readable(&s);
        }
        if s.read_exact(&mut len).is_err() {
            break;
        }
        let n = u64::from_le_bytes(len);
        spin = n <= super::SPIN_REQUEST_MAX as u64;
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
        let into_block = body[0] == OP_SEND && body[2] & (F_AS_BLOCK | F_RMA) == F_AS_BLOCK;
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
            let Ok(reply) = serve_block_send(&mut s, o, &q, payload_len) else {
                break;
            };
            if send_reply(&mut s, None, reply, false).is_err() {
                break;
            }
            continue;
        }
        if q.op == OP_SEND && q.as_block && q.rma {
            let Ok(reply) = super::rma::serve_send(&s, o, &q) else {
                break;
            };
            if send_reply(&mut s, None, reply, false).is_err() {
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
        if send_reply(&mut s, obj.as_ref(), reply, q.rma).is_err() {
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
