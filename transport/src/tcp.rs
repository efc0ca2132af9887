//! The `tcp` back end: one authenticated TCP connection per peer pair.
//!
//! * The node with the lower id dials; the other accepts (a listener thread; each incoming
//!   connection authenticates on its own thread within [`Config::handshake_timeout`], so a
//!   silent or garbage-sending client never delays anyone else).
//! * Per peer: a reader thread (decodes frames, writes put/get payloads straight into the
//!   target block, never blocks on anything but the socket) and a writer thread (drains the
//!   small-frame queue, then sends block payloads in [`CHUNK`]-sized frames, heartbeats when
//!   idle). A sending thread writes a small frame itself when the socket is free and nothing
//!   is queued, which keeps latency at one hand-off (the receiver's).
//! * Flow control: a credit window of [`Config::queue_depth`] messages per peer, returned by
//!   the receiver as its application takes messages (in batches of a quarter window).
//! * Faults: socket errors, EOF, a peer silent for [`Config::peer_timeout`] (heartbeats every
//!   [`Config::heartbeat`]), a write stuck that long, or any protocol violation lose the
//!   peer: its socket is shut down and everything pending towards it fails with `PeerLost`.
//!
//! Payload bytes go between the socket and pool memory directly: reads into the block's
//! slice (through a 64 KiB `BufReader` that std bypasses for reads larger than its buffer),
//! writes from the block's slice with `writev` (header + payload).

use std::collections::{HashMap, VecDeque};
use std::io::{self, BufReader, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dragon_shm::heap::{Block, BlockRef};

use crate::common::{self, lock, wait_until};
use crate::wire::{self, decode_ref, encode_ref, u64_at, Header, Kind, HEADER_LEN};
use crate::{auth, Completion, Config, Event, NodeId, PeerAddr, Result, Transport, TransportError};

/// Bytes of payload per data frame.
pub const CHUNK: usize = 2 << 20;
/// How long `recv` spins for an event before it parks.
const SPIN: Duration = Duration::from_micros(20);
/// Receive buffer for headers and small messages.
const RBUF: usize = 64 << 10;

/// Writes a header and a body with `writev`, to the end.
fn write_frame(s: &mut TcpStream, hdr: &[u8], body: &[u8]) -> io::Result<()> {
    let mut bufs = [IoSlice::new(hdr), IoSlice::new(body)];
    let mut bufs: &mut [IoSlice<'_>] = &mut bufs;
    while !bufs.is_empty() {
        match s.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A stream whose reads and writes all end by one deadline (handshakes).
pub(crate) struct DeadlineStream<'a> {
    pub(crate) s: &'a TcpStream,
    pub(crate) deadline: Instant,
}

impl DeadlineStream<'_> {
    fn remaining(&self) -> io::Result<Duration> {
        let now = Instant::now();
        if now >= self.deadline {
            return Err(io::ErrorKind::TimedOut.into());
        }
        Ok((self.deadline - now).max(Duration::from_millis(1)))
    }
}

impl Read for DeadlineStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.s.set_read_timeout(Some(self.remaining()?))?;
        (&mut &*self.s).read(buf)
    }
}

impl Write for DeadlineStream<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.s.set_write_timeout(Some(self.remaining()?))?;
        (&mut &*self.s).write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A block transfer the writer streams.
enum Bulk {
    Put {
        op: u64,
        src: Block,
        len: u64,
        dst: BlockRef,
        tag: u64,
    },
    GetReply {
        op: u64,
        src: Block,
        len: u64,
    },
}

/// The writer's transfer in progress.
struct Cur {
    bulk: Bulk,
    sent: u64,
    begun: bool,
}

#[derive(Default)]
struct OutQ {
    small: VecDeque<Vec<u8>>,
    bulk: VecDeque<Bulk>,
    closed: bool,
}

/// An operation this node started, waiting for the peer.
enum Pending {
    Put(Completion),
    Get {
        done: Completion,
        dst: Block,
        len: u64,
    },
}

/// A transfer the reader is receiving.
enum InBulk {
    Put {
        op: u64,
        /// `None`: the target was refused; the bytes are drained and a NACK follows.
        block: Option<Block>,
        r: BlockRef,
        total: u64,
        got: u64,
        tag: u64,
    },
    Get {
        op: u64,
        done: Completion,
        dst: Block,
        len: u64,
        got: u64,
    },
}

impl common::PeerState for Peer {
    fn node(&self) -> NodeId {
        self.id
    }
    fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }
}

struct Peer {
    id: NodeId,
    /// A handle used only to shut the connection down.
    ctl: TcpStream,
    /// The write side; whoever holds it writes whole frames.
    sock: Mutex<TcpStream>,
    q: Mutex<OutQ>,
    q_cv: Condvar,
    /// Messages we may still send.
    credits: Mutex<u64>,
    credit_cv: Condvar,
    lost: AtomicBool,
    pending: Mutex<HashMap<u64, Pending>>,
    /// Milliseconds since `Inner::epoch` of the last write.
    last_tx: AtomicU64,
    /// Messages of this peer taken by our application, not yet credited back.
    consumed: AtomicU64,
    /// Messages of this peer in our inbox.
    unconsumed: AtomicU64,
}

impl Peer {
    /// Queues a frame for the writer thread.
    fn queue(&self, hdr: Header, body: &[u8]) -> Result<()> {
        let mut f = Vec::with_capacity(HEADER_LEN + body.len());
        f.extend_from_slice(&hdr.encode());
        f.extend_from_slice(body);
        let mut q = lock(&self.q);
        if q.closed {
            return Err(TransportError::PeerLost);
        }
        q.small.push_back(f);
        drop(q);
        self.q_cv.notify_one();
        Ok(())
    }
}

struct Inner {
    cfg: Config,
    addr: SocketAddr,
    listener: TcpListener,
    closed: AtomicBool,
    peers: Mutex<HashMap<NodeId, Arc<Peer>>>,
    peers_cv: Condvar,
    inbox: Mutex<VecDeque<(Event, Option<Arc<Peer>>)>>,
    inbox_cv: Condvar,
    /// Events in `inbox` (read without its lock by spinning receivers).
    queued: AtomicU64,
    next_op: AtomicU64,
    threads: Mutex<Vec<JoinHandle<()>>>,
    handshaking: Mutex<HashMap<u64, TcpStream>>,
    next_hs: AtomicU64,
    epoch: Instant,
    auth_failures: AtomicU64,
}

/// The TCP endpoint of one node. Dropping it closes it.
#[derive(Debug)]
pub struct TcpTransport {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpTransport")
            .field("node", &self.cfg.node)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl TcpTransport {
    /// Starts listening on [`Config::listen`].
    pub fn bind(cfg: Config) -> Result<TcpTransport> {
        if cfg.queue_depth == 0 || cfg.max_message > u32::MAX as usize {
            return Err(TransportError::Protocol("bad configuration"));
        }
        let listener = TcpListener::bind(&cfg.listen)?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            cfg,
            addr,
            listener,
            closed: AtomicBool::new(false),
            peers: Mutex::new(HashMap::new()),
            peers_cv: Condvar::new(),
            inbox: Mutex::new(VecDeque::new()),
            inbox_cv: Condvar::new(),
            queued: AtomicU64::new(0),
            next_op: AtomicU64::new(1),
            threads: Mutex::new(Vec::new()),
            handshaking: Mutex::new(HashMap::new()),
            next_hs: AtomicU64::new(0),
            epoch: Instant::now(),
            auth_failures: AtomicU64::new(0),
        });
        let i2 = inner.clone();
        let h = std::thread::Builder::new()
            .name("dt-listen".into())
            .spawn(move || i2.listen_loop())?;
        lock(&inner.threads).push(h);
        Ok(TcpTransport { inner })
    }

    /// Incoming connections refused so far because they failed authentication.
    pub fn auth_failures(&self) -> u64 {
        self.inner.auth_failures.load(Ordering::Relaxed)
    }
}

impl Drop for TcpTransport {
    fn drop(&mut self) {
        self.inner.close();
    }
}

impl Inner {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn spawn(self: &Arc<Self>, name: &str, f: impl FnOnce(Arc<Inner>) + Send + 'static) {
        let me = self.clone();
        if let Ok(h) = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || f(me))
        {
            lock(&self.threads).push(h);
        }
    }

    fn listen_loop(self: Arc<Self>) {
        loop {
            let r = self.listener.accept();
            if self.closed.load(Ordering::Acquire) {
                return;
            }
            match r {
                Ok((s, _)) => self.spawn("dt-auth", move |me| me.accept_one(s)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    // Out of descriptors or similar: back off instead of spinning.
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }

    fn accept_one(self: Arc<Self>, s: TcpStream) {
        let id = self.next_hs.fetch_add(1, Ordering::Relaxed);
        if let Ok(c) = s.try_clone() {
            lock(&self.handshaking).insert(id, c);
        }
        if self.closed.load(Ordering::Acquire) {
            lock(&self.handshaking).remove(&id);
            return;
        }
        let _ = s.set_nodelay(true);
        let r = auth::server_handshake(
            &mut DeadlineStream {
                s: &s,
                deadline: Instant::now() + self.cfg.handshake_timeout,
            },
            &self.cfg.secret,
            self.cfg.node,
        );
        lock(&self.handshaking).remove(&id);
        match r {
            Ok(peer) if peer != self.cfg.node => {
                let _ = self.install(peer, s);
            }
            _ => {
                self.auth_failures.fetch_add(1, Ordering::Relaxed);
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }

    /// Makes an authenticated connection the one to `id`.
    fn install(self: &Arc<Self>, id: NodeId, s: TcpStream) -> Result<()> {
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(self.cfg.peer_timeout))?;
        s.set_write_timeout(Some(self.cfg.peer_timeout))?;
        let reader = s.try_clone()?;
        let ctl = s.try_clone()?;
        let peer = Arc::new(Peer {
            id,
            ctl,
            sock: Mutex::new(s),
            q: Mutex::new(OutQ::default()),
            q_cv: Condvar::new(),
            credits: Mutex::new(self.cfg.queue_depth as u64),
            credit_cv: Condvar::new(),
            lost: AtomicBool::new(false),
            pending: Mutex::new(HashMap::new()),
            last_tx: AtomicU64::new(self.now_ms()),
            consumed: AtomicU64::new(0),
            unconsumed: AtomicU64::new(0),
        });
        let mut peers = lock(&self.peers);
        let dup = peers
            .get(&id)
            .is_some_and(|old| !old.lost.load(Ordering::Acquire));
        if self.closed.load(Ordering::Acquire) || dup {
            let _ = peer.ctl.shutdown(Shutdown::Both);
            return Err(if dup {
                TransportError::Protocol("duplicate connection")
            } else {
                TransportError::Closed
            });
        }
        peers.insert(id, peer.clone());
        let p2 = peer.clone();
        self.spawn("dt-read", move |me| me.reader_loop(p2, reader));
        self.spawn("dt-write", move |me| me.writer_loop(peer));
        drop(peers);
        self.peers_cv.notify_all();
        Ok(())
    }

    fn dial(self: &Arc<Self>, p: &PeerAddr, deadline: Instant) -> Result<()> {
        let addrs: Vec<SocketAddr> = p
            .addr
            .to_socket_addrs()
            .map_err(|_| TransportError::Protocol("bad peer address"))?
            .collect();
        let addr = *addrs
            .first()
            .ok_or(TransportError::Protocol("bad peer address"))?;
        let s = loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(TransportError::TimedOut);
            }
            match TcpStream::connect_timeout(&addr, deadline - now) {
                Ok(s) => break s,
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    // The peer's listener is not up yet: retry until the deadline.
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e.into()),
            }
        };
        s.set_nodelay(true)?;
        let hs_deadline = deadline.min(Instant::now() + self.cfg.handshake_timeout);
        let got = auth::client_handshake(
            &mut DeadlineStream {
                s: &s,
                deadline: hs_deadline,
            },
            &self.cfg.secret,
            self.cfg.node,
            Some(p.node),
        )?;
        self.install(got, s)
    }

    fn peer(&self, id: NodeId) -> Result<Arc<Peer>> {
        if self.closed.load(Ordering::Acquire) {
            return Err(TransportError::Closed);
        }
        lock(&self.peers)
            .get(&id)
            .cloned()
            .ok_or(TransportError::UnknownPeer)
    }

    fn lost_err(&self) -> TransportError {
        if self.closed.load(Ordering::Acquire) {
            TransportError::Closed
        } else {
            TransportError::PeerLost
        }
    }

    /// Turns the connection to `p` down and fails everything pending towards it.
    fn lose(&self, p: &Arc<Peer>) {
        if p.lost.swap(true, Ordering::AcqRel) {
            return;
        }
        let _ = p.ctl.shutdown(Shutdown::Both);
        let err = self.lost_err();
        {
            let mut q = lock(&p.q);
            q.closed = true;
            q.small.clear();
            q.bulk.clear();
        }
        p.q_cv.notify_all();
        drop(lock(&p.credits));
        p.credit_cv.notify_all();
        let pend: Vec<Pending> = lock(&p.pending).drain().map(|(_, v)| v).collect();
        for x in pend {
            match x {
                Pending::Put(c) => c.complete(Err(err)),
                Pending::Get { done, .. } => done.complete(Err(err)),
            }
        }
        if !self.closed.load(Ordering::Acquire) {
            self.push_event(Event::PeerLost { peer: p.id }, None);
        }
        drop(lock(&self.peers));
        self.peers_cv.notify_all();
    }

    fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        // SAFETY: the listener is owned by `self`, so its descriptor is open; shutting a
        // listening socket down makes a blocked accept() return (Linux).
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        for (_, s) in lock(&self.handshaking).drain() {
            let _ = s.shutdown(Shutdown::Both);
        }
        let peers: Vec<Arc<Peer>> = lock(&self.peers).values().cloned().collect();
        for p in &peers {
            self.lose(p);
        }
        drop(lock(&self.inbox));
        self.inbox_cv.notify_all();
        drop(lock(&self.peers));
        self.peers_cv.notify_all();
        let me = std::thread::current().id();
        loop {
            let hs: Vec<JoinHandle<()>> = lock(&self.threads).drain(..).collect();
            if hs.is_empty() {
                break;
            }
            for h in hs {
                if h.thread().id() != me {
                    let _ = h.join();
                }
            }
        }
        lock(&self.inbox).clear();
        self.queued.store(0, Ordering::Release);
    }

    /// Sends a frame: written at once by this thread when the socket is free and nothing
    /// is queued before it (so order is kept), otherwise queued for the writer thread.
    fn emit(&self, p: &Arc<Peer>, hdr: Header, body: &[u8]) -> Result<()> {
        if let Ok(mut s) = p.sock.try_lock() {
            // The writer pops frames only while holding `sock`, so an empty queue seen
            // under `sock` means every earlier frame is fully written.
            if lock(&p.q).small.is_empty() && !p.lost.load(Ordering::Acquire) {
                let r = write_frame(&mut s, &hdr.encode(), body);
                drop(s);
                return match r {
                    Ok(()) => {
                        p.last_tx.store(self.now_ms(), Ordering::Relaxed);
                        Ok(())
                    }
                    Err(_) => {
                        self.lose(p);
                        Err(self.lost_err())
                    }
                };
            }
        }
        p.queue(hdr, body).map_err(|_| self.lost_err())
    }

    fn send_msg(&self, peer: NodeId, msg: &[u8], wait: Option<Option<Instant>>) -> Result<()> {
        if msg.len() > self.cfg.max_message {
            return Err(TransportError::TooLarge);
        }
        let p = self.peer(peer)?;
        {
            let mut c = lock(&p.credits);
            loop {
                if p.lost.load(Ordering::Acquire) {
                    return Err(self.lost_err());
                }
                if *c > 0 {
                    *c -= 1;
                    break;
                }
                match wait {
                    None => return Err(TransportError::Full),
                    Some(deadline) => {
                        c = wait_until(&p.credit_cv, c, deadline)
                            .map_err(|_| TransportError::TimedOut)?;
                    }
                }
            }
        }
        self.emit(&p, Header::new(Kind::Msg, msg.len() as u32, 0, 0), msg)
    }

    /// Our application took a message of `p`: return credit in batches.
    fn consumed(&self, p: &Arc<Peer>) {
        p.unconsumed.fetch_sub(1, Ordering::AcqRel);
        let batch = (self.cfg.queue_depth as u64 / 4).max(1);
        let c = p.consumed.fetch_add(1, Ordering::AcqRel) + 1;
        if c >= batch
            && p.consumed
                .compare_exchange(c, 0, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            let _ = self.emit(p, Header::new(Kind::Credit, 0, 0, c), &[]);
        }
    }

    fn push_event(&self, ev: Event, p: Option<Arc<Peer>>) {
        let mut g = lock(&self.inbox);
        g.push_back((ev, p));
        self.queued.fetch_add(1, Ordering::AcqRel);
        drop(g);
        self.inbox_cv.notify_one();
    }

    // ---- writer ------------------------------------------------------------------------

    fn writer_loop(self: Arc<Self>, p: Arc<Peer>) {
        let hb = self.cfg.heartbeat.as_millis().max(1) as u64;
        let mut cur: Option<Cur> = None;
        loop {
            {
                let mut q = lock(&p.q);
                loop {
                    if q.closed {
                        return;
                    }
                    if cur.is_none() {
                        cur = q.bulk.pop_front().map(|bulk| Cur {
                            bulk,
                            sent: 0,
                            begun: false,
                        });
                    }
                    if !q.small.is_empty() || cur.is_some() {
                        break;
                    }
                    let idle = self
                        .now_ms()
                        .saturating_sub(p.last_tx.load(Ordering::Relaxed));
                    if idle >= hb {
                        break;
                    }
                    q = p
                        .q_cv
                        .wait_timeout(q, Duration::from_millis(hb - idle))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
            let r = (|| -> io::Result<()> {
                let mut s = lock(&p.sock);
                let mut wrote = false;
                loop {
                    let f = lock(&p.q).small.pop_front();
                    match f {
                        Some(f) => {
                            s.write_all(&f)?;
                            wrote = true;
                        }
                        None => break,
                    }
                }
                if let Some(c) = cur.as_mut() {
                    if write_step(&mut s, c)? {
                        cur = None;
                    }
                    wrote = true;
                }
                if !wrote {
                    s.write_all(&Header::new(Kind::Heartbeat, 0, 0, 0).encode())?;
                }
                p.last_tx.store(self.now_ms(), Ordering::Relaxed);
                Ok(())
            })();
            if r.is_err() {
                self.lose(&p);
                return;
            }
        }
    }

    // ---- reader ------------------------------------------------------------------------

    fn reader_loop(self: Arc<Self>, p: Arc<Peer>, s: TcpStream) {
        let mut r = BufReader::with_capacity(RBUF, s);
        let mut cur: Option<InBulk> = None;
        let _ = self.read_frames(&p, &mut r, &mut cur);
        if let Some(InBulk::Get { done, .. }) = cur {
            done.complete(Err(self.lost_err()));
        }
        self.lose(&p);
    }

    fn read_frames(
        &self,
        p: &Arc<Peer>,
        r: &mut BufReader<TcpStream>,
        cur: &mut Option<InBulk>,
    ) -> Result<()> {
        let pool = &self.cfg.pool;
        loop {
            let mut hb = [0u8; HEADER_LEN];
            r.read_exact(&mut hb)?;
            let h = Header::decode(&hb).map_err(TransportError::Protocol)?;
            let len = h.len as usize;
            let no_body = |h: &Header| {
                if h.len == 0 {
                    Ok(())
                } else {
                    Err(TransportError::Protocol("unexpected frame body"))
                }
            };
            match h.kind {
                Kind::Msg => {
                    if len > self.cfg.max_message {
                        return Err(TransportError::Protocol("message too long"));
                    }
                    let n = p.unconsumed.fetch_add(1, Ordering::AcqRel) + 1;
                    if n > self.cfg.queue_depth as u64 {
                        return Err(TransportError::Protocol("credit window exceeded"));
                    }
                    let mut data = vec![0u8; len];
                    r.read_exact(&mut data)?;
                    self.push_event(Event::Message { peer: p.id, data }, Some(p.clone()));
                }
                Kind::Credit => {
                    no_body(&h)?;
                    let mut c = lock(&p.credits);
                    *c = c.saturating_add(h.arg);
                    if *c > self.cfg.queue_depth as u64 {
                        return Err(TransportError::Protocol("too many credits"));
                    }
                    drop(c);
                    p.credit_cv.notify_all();
                }
                Kind::Heartbeat => no_body(&h)?,
                Kind::PutBegin => {
                    if len != wire::PUT_BEGIN_BODY || cur.is_some() {
                        return Err(TransportError::Protocol("bad put start"));
                    }
                    let mut b = [0u8; wire::PUT_BEGIN_BODY];
                    r.read_exact(&mut b)?;
                    let br = decode_ref(&b[..32]);
                    let tag = u64_at(&b, 32);
                    let total = h.arg;
                    let block = pool.block(br).ok().filter(|blk| total <= blk.len() as u64);
                    *cur = Some(InBulk::Put {
                        op: h.op,
                        block,
                        r: br,
                        total,
                        got: 0,
                        tag,
                    });
                    if total == 0 {
                        self.finish_put(p, cur.take())?;
                    }
                }
                Kind::PutData => {
                    let Some(InBulk::Put {
                        op,
                        block,
                        total,
                        got,
                        ..
                    }) = cur.as_mut()
                    else {
                        return Err(TransportError::Protocol("put data without start"));
                    };
                    if *op != h.op || h.arg != *got || *total - *got < len as u64 || len == 0 {
                        return Err(TransportError::Protocol("put data out of range"));
                    }
                    let at = *got as usize;
                    match block {
                        // In range: at + len <= total <= block length (checked at start).
                        Some(b) => r.read_exact(&mut b.as_mut_slice()[at..at + len])?,
                        None => drain(r, len)?,
                    }
                    *got += len as u64;
                    if *got == *total {
                        self.finish_put(p, cur.take())?;
                    }
                }
                Kind::PutAck | Kind::PutNack => {
                    no_body(&h)?;
                    match lock(&p.pending).remove(&h.op) {
                        Some(Pending::Put(c)) => c.complete(if h.kind == Kind::PutAck {
                            Ok(())
                        } else {
                            Err(TransportError::BadRef)
                        }),
                        _ => return Err(TransportError::Protocol("ack of unknown put")),
                    }
                }
                Kind::GetReq => {
                    if len != wire::GET_REQ_BODY {
                        return Err(TransportError::Protocol("bad get request"));
                    }
                    let mut b = [0u8; wire::GET_REQ_BODY];
                    r.read_exact(&mut b)?;
                    let br = decode_ref(&b);
                    let total = h.arg;
                    let src = pool
                        .block(br)
                        .ok()
                        .filter(|blk| total > 0 && total <= blk.len() as u64);
                    match src {
                        Some(src) => {
                            let mut q = lock(&p.q);
                            if q.closed {
                                return Err(TransportError::PeerLost);
                            }
                            q.bulk.push_back(Bulk::GetReply {
                                op: h.op,
                                src,
                                len: total,
                            });
                            drop(q);
                            p.q_cv.notify_one();
                        }
                        None => {
                            p.queue(Header::new(Kind::GetNack, 0, h.op, wire::ERR_BAD_REF), &[])?
                        }
                    }
                }
                Kind::GetData => {
                    if cur.is_none() {
                        match lock(&p.pending).remove(&h.op) {
                            Some(Pending::Get { done, dst, len }) => {
                                *cur = Some(InBulk::Get {
                                    op: h.op,
                                    done,
                                    dst,
                                    len,
                                    got: 0,
                                })
                            }
                            _ => return Err(TransportError::Protocol("data of unknown get")),
                        }
                    }
                    let Some(InBulk::Get {
                        op,
                        dst,
                        len: total,
                        got,
                        ..
                    }) = cur.as_mut()
                    else {
                        return Err(TransportError::Protocol("get data inside a put"));
                    };
                    if *op != h.op || h.arg != *got || *total - *got < len as u64 || len == 0 {
                        return Err(TransportError::Protocol("get data out of range"));
                    }
                    let at = *got as usize;
                    // In range: at + len <= total <= dst length (checked by get_block).
                    r.read_exact(&mut dst.as_mut_slice()[at..at + len])?;
                    *got += len as u64;
                    if *got == *total {
                        if let Some(InBulk::Get { done, .. }) = cur.take() {
                            done.complete(Ok(()));
                        }
                    }
                }
                Kind::GetNack => {
                    no_body(&h)?;
                    match lock(&p.pending).remove(&h.op) {
                        Some(Pending::Get { done, .. }) => {
                            done.complete(Err(TransportError::BadRef))
                        }
                        _ => return Err(TransportError::Protocol("nack of unknown get")),
                    }
                }
            }
        }
    }

    fn finish_put(&self, p: &Arc<Peer>, done: Option<InBulk>) -> Result<()> {
        let Some(InBulk::Put {
            op,
            block,
            r,
            total,
            tag,
            ..
        }) = done
        else {
            return Ok(());
        };
        match block {
            Some(b) => {
                drop(b);
                self.push_event(
                    Event::BlockFilled {
                        peer: p.id,
                        block: r,
                        len: total,
                        tag,
                    },
                    None,
                );
                p.queue(Header::new(Kind::PutAck, 0, op, 0), &[])
            }
            None => p.queue(Header::new(Kind::PutNack, 0, op, wire::ERR_BAD_REF), &[]),
        }
    }
}

/// Writes the next frame of a transfer; true when it is finished.
fn write_step(s: &mut TcpStream, c: &mut Cur) -> io::Result<bool> {
    let (op, src, len, data_kind) = match &c.bulk {
        Bulk::Put {
            op,
            src,
            len,
            dst,
            tag,
        } => {
            if !c.begun {
                c.begun = true;
                let mut b = [0u8; wire::PUT_BEGIN_BODY];
                b[..32].copy_from_slice(&encode_ref(dst));
                b[32..].copy_from_slice(&tag.to_le_bytes());
                let h = Header::new(Kind::PutBegin, b.len() as u32, *op, *len);
                write_frame(s, &h.encode(), &b)?;
                if *len == 0 {
                    return Ok(true);
                }
            }
            (*op, src, *len, Kind::PutData)
        }
        Bulk::GetReply { op, src, len } => (*op, src, *len, Kind::GetData),
    };
    if c.sent >= len {
        return Ok(true);
    }
    let n = ((len - c.sent) as usize).min(CHUNK);
    let at = c.sent as usize;
    let h = Header::new(data_kind, n as u32, op, c.sent);
    write_frame(s, &h.encode(), &src.as_slice()[at..at + n])?;
    c.sent += n as u64;
    Ok(c.sent == len)
}

fn drain(r: &mut BufReader<TcpStream>, mut n: usize) -> Result<()> {
    let mut scratch = [0u8; 8192];
    while n > 0 {
        let k = n.min(scratch.len());
        r.read_exact(&mut scratch[..k])?;
        n -= k;
    }
    Ok(())
}

impl Transport for TcpTransport {
    fn node(&self) -> NodeId {
        self.inner.cfg.node
    }

    fn address(&self) -> String {
        self.inner.addr.to_string()
    }

    fn connect(&self, peers: &[PeerAddr], timeout: Duration) -> Result<()> {
        let inner = &self.inner;
        common::connect(
            &inner.peers,
            &inner.peers_cv,
            &inner.closed,
            inner.cfg.node,
            peers,
            timeout,
            |p, deadline| inner.dial(p, deadline),
        )
    }

    fn peers(&self) -> Vec<NodeId> {
        common::live_peers(&self.inner.peers)
    }

    fn send(&self, peer: NodeId, msg: &[u8], timeout: Option<Duration>) -> Result<()> {
        let deadline = timeout.map(|t| Instant::now() + t);
        self.inner.send_msg(peer, msg, Some(deadline))
    }

    fn try_send(&self, peer: NodeId, msg: &[u8]) -> Result<()> {
        self.inner.send_msg(peer, msg, None)
    }

    fn recv(&self, timeout: Option<Duration>) -> Result<Event> {
        let inner = &self.inner;
        let deadline = timeout.map(|t| Instant::now() + t);
        if inner.queued.load(Ordering::Acquire) == 0 && timeout != Some(Duration::ZERO) {
            // A reply usually comes within a few microseconds: spin briefly before parking
            // (a futex wake-up costs more than the wait).
            let t0 = Instant::now();
            while inner.queued.load(Ordering::Acquire) == 0 && t0.elapsed() < SPIN {
                std::hint::spin_loop();
            }
        }
        let mut g = lock(&inner.inbox);
        loop {
            if inner.closed.load(Ordering::Acquire) {
                return Err(TransportError::Closed);
            }
            if let Some((ev, p)) = g.pop_front() {
                inner.queued.fetch_sub(1, Ordering::AcqRel);
                drop(g);
                if let Some(p) = p {
                    inner.consumed(&p);
                }
                return Ok(ev);
            }
            g = wait_until(&inner.inbox_cv, g, deadline).map_err(|_| TransportError::TimedOut)?;
        }
    }

    fn put_block(
        &self,
        peer: NodeId,
        src: &Block,
        len: usize,
        dst: BlockRef,
        tag: u64,
    ) -> Result<Completion> {
        let inner = &self.inner;
        if len > src.len() || len as u64 > dst.len {
            return Err(TransportError::BadRef);
        }
        let p = inner.peer(peer)?;
        let src = src.try_clone().map_err(|_| TransportError::BadRef)?;
        let op = inner.next_op.fetch_add(1, Ordering::Relaxed);
        let done = Completion::new();
        if !common::add_pending(&p.pending, &p.lost, op, Pending::Put(done.clone())) {
            return Err(inner.lost_err());
        }
        let mut q = lock(&p.q);
        if q.closed {
            drop(q);
            lock(&p.pending).remove(&op);
            return Err(inner.lost_err());
        }
        q.bulk.push_back(Bulk::Put {
            op,
            src,
            len: len as u64,
            dst,
            tag,
        });
        drop(q);
        p.q_cv.notify_one();
        Ok(done)
    }

    fn get_block(
        &self,
        peer: NodeId,
        src: BlockRef,
        dst: &Block,
        len: usize,
    ) -> Result<Completion> {
        let inner = &self.inner;
        if len > dst.len() || len as u64 > src.len {
            return Err(TransportError::BadRef);
        }
        let p = inner.peer(peer)?;
        let done = Completion::new();
        if len == 0 {
            done.complete(Ok(()));
            return Ok(done);
        }
        let dst = dst.try_clone().map_err(|_| TransportError::BadRef)?;
        let op = inner.next_op.fetch_add(1, Ordering::Relaxed);
        if !common::add_pending(
            &p.pending,
            &p.lost,
            op,
            Pending::Get {
                done: done.clone(),
                dst,
                len: len as u64,
            },
        ) {
            return Err(inner.lost_err());
        }
        let h = Header::new(Kind::GetReq, wire::GET_REQ_BODY as u32, op, len as u64);
        if let Err(e) = inner.emit(&p, h, &encode_ref(&src)) {
            lock(&p.pending).remove(&op);
            return Err(e);
        }
        Ok(done)
    }

    fn close(&self) {
        self.inner.close();
    }
}
