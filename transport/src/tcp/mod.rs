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

mod connection;
mod reader;
mod state;
mod writer;

pub(crate) use connection::DeadlineStream;

use std::collections::{HashMap, VecDeque};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use dragon_shm::heap::{Block, BlockRef};

use crate::common::{self, lock, wait_until};
use crate::wire::{self, encode_ref, Header, Kind};
use crate::{Completion, Config, Event, NodeId, PeerAddr, Result, Transport, TransportError};
use state::{Bulk, Inner, Pending};

/// Bytes of payload per data frame.
pub const CHUNK: usize = 2 << 20;
/// How long `recv` spins for an event before it parks.
const SPIN: Duration = Duration::from_micros(20);
/// Receive buffer for headers and small messages.
const RBUF: usize = 64 << 10;

/// The TCP endpoint of one node. Dropping it closes it.
#[derive(Debug)]
pub struct TcpTransport {
    inner: Arc<Inner>,
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

impl Transport for TcpTransport {
    fn node(&self) -> NodeId {
        self.inner.cfg.node
    }

    fn backend(&self) -> &'static str {
        "tcp"
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
        // SAFETY: the transport only reads the source of a transfer (shared borrows); the memory
        // contract of `Transport::put_block`/`get_block` forbids writing it until it completes.
        let src = unsafe { src.try_clone() }.map_err(|_| TransportError::BadRef)?;
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
        // A read-only handle (e.g. a DDict value) is never written through.
        if !dst.is_writable() || len > dst.len() || len as u64 > src.len {
            return Err(TransportError::BadRef);
        }
        let p = inner.peer(peer)?;
        let done = Completion::new();
        if len == 0 {
            done.complete(Ok(()));
            return Ok(done);
        }
        // SAFETY: the destination of a transfer is the transport's to write until the transfer
        // completes (the memory contract of `Transport::put_block`/`get_block`): no other
        // handle of this process borrows these bytes meanwhile.
        let dst = unsafe { dst.try_clone() }.map_err(|_| TransportError::BadRef)?;
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
