//! The `ofi` back end: libfabric RDM endpoints, messages by `fi_send`, pool blocks by RMA.
//!
//! Setup (one endpoint per node, [`OfiTransport::open`]): an `FI_EP_RDM` endpoint with
//! `FI_MSG | FI_RMA` of the configured provider ([`crate::config::ofi_provider`]: `tcp;ofi_rxm`
//! here, `verbs;ofi_rxm` or `cxi` on real fabrics, `shm` within a node), one completion queue,
//! a table AV, the node's pool segment registered as one memory region (remote read only:
//! peers can never write our memory), and two small registered slabs of send and receive
//! slots. libfabric is loaded at run time ([`available`]); without it [`crate::open`] fails with
//! [`TransportError::Unavailable`] and [`crate::open_or_fallback`] falls back to tcp.
//!
//! Bootstrap and authentication: [`Transport::address`] is a TCP `host:port`, the *side
//! channel* ([`side`]). The lower node id dials; every side connection first runs the mutual
//! HMAC handshake of [`crate::auth`]; only then do the two sides exchange fabric addresses,
//! region base, length and key, and a random 64-bit *token* per direction. Every fabric
//! message carries the receiver's token for its sender: a message whose token names no
//! authenticated peer is dropped before anything else in it is read (the fabric endpoint
//! itself is reachable by anyone who can reach the node). Heartbeats go over the side
//! channel; its end (EOF: the process died) or silence past
//! [`Config::peer_timeout`](crate::Config::peer_timeout) loses the peer.
//!
//! Fabric frames (little-endian), [`FRAME_HDR`] = 48 bytes then the body:
//!
//! | off | size | field |
//! |---|---|---|
//! | 0 | 8 | token of the receiver for this sender |
//! | 8 | 8 | frame sequence number (per sender and receiver, from 0) |
//! | 16 | 1 | kind |
//! | 17 | 3 | zero |
//! | 20 | 4 | body length (must equal the received length minus 48) |
//! | 24 | 8 | `a` |
//! | 32 | 8 | `b` |
//! | 40 | 8 | `c` |
//!
//! | kind | a | b | body |
//! |---|---|---|---|
//! | `MSG` 1 | total length | offset of this fragment | fragment |
//! | `CREDIT` 2 | messages credited | | |
//! | `PUT_REQ` 3 | op | length | target `BlockRef` (32) + tag (8) + source offset (8) |
//! | `PUT_ACK` 4 | op | | |
//! | `PUT_NACK` 5 | op | error code | |
//! | `GET_REQ` 6 | op | length | source `BlockRef` (32) |
//! | `GET_GRANT` 7 | op | offset of the block in the granter's region | |
//! | `GET_NACK` 8 | op | error code | |
//! | `GET_DONE` 9 | op | | |
//!
//! Order: libfabric keeps sends in order (`FI_ORDER_SAS`) but may report their completions
//! out of order (rxm completes large messages after later small ones), so every frame
//! carries a sequence number and the receiver handles a peer's frames strictly in that order,
//! holding early ones (at most [`MAX_HELD`]; a gap beyond that, or a repeated number, loses
//! the peer).
//!
//! Messages: messages longer than a slot are sent as consecutive fragments; the receiver
//! checks lengths and offsets and drops the peer on any inconsistency. Credits as in
//! [`crate::tcp`]: at most `queue_depth` messages not yet taken by the receiving application
//! (the smaller of the two sides' `queue_depth`, exchanged in the hello).
//!
//! Blocks: the side that owns the named block checks it (`Pool::block`: segment, offset,
//! generation, length) before any byte moves, and then the bytes move by `fi_read`, whose
//! completion means they are in local memory:
//! * put: `PUT_REQ` to the target; the target checks the destination block and that the
//!   source range lies inside the initiator's region, reads the bytes straight from the
//!   initiator's block into its own (in [`RMA_CHUNK`] pieces), queues
//!   [`Event::BlockFilled`] and answers `PUT_ACK` (or `PUT_NACK`). Puts of one peer finish
//!   in the order they were requested.
//! * get: `GET_REQ` to the source; the source checks its block, holds it and answers
//!   `GET_GRANT` with its offset; the initiator checks the range against the source's region,
//!   reads into its block, completes, and sends `GET_DONE` so the source lets go.
//!
//! Progress: one thread per endpoint polls the completion queue (spinning briefly after
//! activity and while block transfers are in flight, then blocking in `poll()` on the CQ's
//! wait descriptor, or sleeping in short steps for providers without one, like shm), because
//! the tcp and shm providers move RMA data only while *both* sides poll. It also reposts receive slots, retries operations the
//! provider refused with `FI_EAGAIN`, and sends the heartbeats. A thread waiting in
//! [`Transport::recv`] polls the CQ itself for a few microseconds first (the CQ is read under
//! one lock, so completions are handled in order whoever reads them).
//!
//! Faults: a lost peer (side channel closed or silent, a failed send, a protocol violation)
//! fails every pending operation towards it with [`TransportError::PeerLost`] and queues
//! [`Event::PeerLost`]; its token is forgotten at once. Local blocks that fabric operations
//! still use stay held until those operations complete (or the endpoint closes), so the
//! provider never touches freed memory.

mod completions;
mod connect;
mod endpoint;
mod messages;
mod mr;
mod peer;
mod post;
mod progress;
mod rma;
pub mod side;
mod state;
mod sys;
#[cfg(test)]
mod tests;

use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use dragon_shm::heap::{Block, BlockRef};

use crate::common::{self, lock, wait_until};
use crate::wire::encode_ref;
use crate::{Completion, Event, NodeId, PeerAddr, Result, Transport, TransportError};
use peer::Pending;
use state::Inner;

/// Bytes of a fabric frame header.
pub const FRAME_HDR: usize = 48;
/// Bytes of one send or receive slot (header included): the largest fabric message. Small
/// enough to be an eager message for rxm (whose default buffer is 16 KiB), so frames are
/// rarely completed out of order.
pub const SLOT: usize = 8 << 10;
/// Receive slots posted per endpoint.
const RX_SLOTS: usize = 256;
/// Frames of one peer held while an earlier one is missing.
pub const MAX_HELD: usize = 4096;
/// Send slots per endpoint.
const TX_SLOTS: usize = 64;
/// RMA operations in flight per endpoint.
const RMA_SLOTS: usize = 128;
/// Bytes per RMA read (default; `DRAGON_OFI_RMA_CHUNK` overrides it, for tuning).
pub const RMA_CHUNK: usize = 1 << 20;

fn rma_chunk() -> usize {
    static C: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *C.get_or_init(|| {
        std::env::var("DRAGON_OFI_RMA_CHUNK")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&n: &usize| n >= 4096)
            .unwrap_or(RMA_CHUNK)
    })
}
/// Bytes of one operation context (`struct fi_context2`).
const CTX: usize = 64;
/// Sources of gets a peer may have us hold at once.
const MAX_EXPOSED: usize = 4096;
/// How long `recv` polls for an event before it parks.
const SPIN: Duration = Duration::from_micros(100);
/// How long `recv` polls when the previous event came less than [`BUSY_RECV`] ago.
const BUSY_RECV_SPIN: Duration = Duration::from_millis(1);
/// See [`BUSY_RECV_SPIN`].
const BUSY_RECV: Duration = Duration::from_millis(5);
/// How long the progress thread polls without blocking after the last completion.
const PROGRESS_SPIN: Duration = Duration::from_micros(60);
/// With operations in flight the progress thread keeps polling, until nothing has happened
/// (no post, no completion) for this long; then it waits as when idle.
const BUSY_SPIN: Duration = Duration::from_millis(100);

/// One pause of a polling loop started at `t0`: a CPU hint during the first microseconds,
/// then `sched_yield`, so that a thread sharing this core (often the very one that will
/// answer: with two cores, two spinning processes easily end up on one) gets to run.
pub(crate) fn relax(t0: Instant) {
    if t0.elapsed() < PURE_SPIN {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

/// See [`relax`].
const PURE_SPIN: Duration = Duration::from_micros(10);

/// Frame kinds (see the module documentation).
pub mod kind {
    /// A message or a fragment of one.
    pub const MSG: u8 = 1;
    /// Credits returned.
    pub const CREDIT: u8 = 2;
    /// Request to read a block of the sender into a block of the receiver.
    pub const PUT_REQ: u8 = 3;
    /// The put landed.
    pub const PUT_ACK: u8 = 4;
    /// The put failed at the target.
    pub const PUT_NACK: u8 = 5;
    /// Request to read a block of the receiver.
    pub const GET_REQ: u8 = 6;
    /// The source block is held; read it.
    pub const GET_GRANT: u8 = 7;
    /// The get was refused.
    pub const GET_NACK: u8 = 8;
    /// The initiator has read the bytes; the source may let go.
    pub const GET_DONE: u8 = 9;
}

/// Error code in `PUT_NACK`/`GET_NACK`: bad block handle or range.
pub const ERR_BAD_REF: u64 = 1;
/// Error code in `PUT_NACK`: the RMA transfer failed.
pub const ERR_IO: u64 = 2;

// ---- loading and availability ---------------------------------------------------------------

/// Loads libfabric (from [`crate::config::ofi_runtime_lib`]) if not done yet. Returns its
/// version, or why the `ofi` back end cannot be used in this process.
pub fn available() -> std::result::Result<String, String> {
    sys::load(&crate::config::ofi_runtime_lib())
}

/// Checks that `provider` can open an endpoint here (loads libfabric, opens and closes one
/// endpoint on 127.0.0.1 for IP providers).
pub fn probe(provider: &str) -> std::result::Result<(), String> {
    available()?;
    let node = node_for(provider, "127.0.0.1:0");
    sys::Ep::open(provider, node.as_deref()).map(drop)
}

/// The `node` argument of `fi_getinfo` for a listen address: its host for IP providers,
/// none for `shm` or a wildcard host.
fn node_for(provider: &str, listen: &str) -> Option<String> {
    if provider.split(';').next() == Some("shm") {
        return None;
    }
    let host = match listen.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
        None => listen,
    };
    if host.is_empty() || host == "0.0.0.0" || host == "::" {
        None
    } else {
        Some(host.to_string())
    }
}

static NOTICE: Once = Once::new();

/// Logs `libfabric not available (REASON); using tcp` (a warning), once per process.
pub(crate) fn fallback_notice(reason: &str) {
    // A notice for the user (DESIGN 5: one line, never a failure), not only a log record:
    // the runtime's processes send their logs to files.
    NOTICE.call_once(|| {
        eprintln!("dragon-transport: libfabric not available ({reason}); using tcp");
        tracing::warn!("libfabric not available ({reason}); using tcp");
    });
}

/// The libfabric endpoint of one node. Dropping it closes it.
#[derive(Debug)]
pub struct OfiTransport {
    inner: Arc<Inner>,
}

fn random_nonzero() -> u64 {
    loop {
        let x = dragon_shm::platform::random_u64();
        if x != 0 {
            return x;
        }
    }
}

fn fi_err(what: &str, code: i64) -> TransportError {
    tracing::error!("ofi: {what}: {}", sys::strerror(code));
    TransportError::Io(io::ErrorKind::Other)
}

/// A fabric frame header (see the module documentation) with sequence number 0: the
/// sequence number is set when the frame is posted.
pub fn frame_header(
    token: u64,
    kind: u8,
    body_len: usize,
    a: u64,
    b: u64,
    c: u64,
) -> [u8; FRAME_HDR] {
    let mut h = [0u8; FRAME_HDR];
    h[..8].copy_from_slice(&token.to_le_bytes());
    h[16] = kind;
    h[20..24].copy_from_slice(&(body_len as u32).to_le_bytes());
    h[24..32].copy_from_slice(&a.to_le_bytes());
    h[32..40].copy_from_slice(&b.to_le_bytes());
    h[40..48].copy_from_slice(&c.to_le_bytes());
    h
}

/// Largest frame sent with `fi_inject` (from a stack buffer).
const INJECT_MAX: usize = 4096;

impl OfiTransport {
    /// The provider in use (as libfabric names it).
    pub fn provider(&self) -> &str {
        &self.inner.ep.attrs.prov
    }

    /// This endpoint's fabric address (what the side channel hands to peers).
    pub fn fabric_address(&self) -> &[u8] {
        &self.inner.my_addr
    }

    /// The fabric in use (e.g. `127.0.0.1/32` for tcp, `shm`).
    pub fn fabric(&self) -> &str {
        &self.inner.ep.attrs.fabric
    }

    /// Whether remote addresses are virtual addresses (`FI_MR_VIRT_ADDR`) rather than
    /// offsets into the region.
    pub fn virt_addr(&self) -> bool {
        self.inner.ep.attrs.mr_mode & sys::FI_MR_VIRT_ADDR != 0
    }

    /// Incoming side connections refused so far (failed authentication or exchange).
    pub fn auth_failures(&self) -> u64 {
        self.inner.auth_failures.load(Ordering::Relaxed)
    }

    /// Fabric messages dropped unread because their token named no authenticated peer.
    pub fn rejected_messages(&self) -> u64 {
        self.inner.rejected.load(Ordering::Relaxed)
    }

    /// Testing aid: sends a frame to `peer` whose header from its `kind` byte on (32 bytes)
    /// and body are `frame`; the transport puts in front the peer's real token and the next
    /// sequence number, or, with `Some(token)`, that token and number 0 (a frame posing as
    /// another sender's).
    #[doc(hidden)]
    pub fn send_raw(&self, peer: NodeId, token: Option<u64>, frame: &[u8]) -> Result<()> {
        let p = self.inner.peer(peer)?;
        if frame.len() < FRAME_HDR - 16 || frame.len() + 16 > SLOT {
            return Err(TransportError::TooLarge);
        }
        let mut h = [0u8; FRAME_HDR];
        h[..8].copy_from_slice(&token.unwrap_or(p.tx_token).to_le_bytes());
        h[16..].copy_from_slice(&frame[..FRAME_HDR - 16]);
        let mut st = lock(&self.inner.st);
        self.inner
            .post_as(&mut st, &p, h, &frame[FRAME_HDR - 16..], token.is_none())
    }
}

impl Drop for OfiTransport {
    fn drop(&mut self) {
        self.inner.close();
    }
}

impl Transport for OfiTransport {
    fn node(&self) -> NodeId {
        self.inner.cfg.node
    }

    fn backend(&self) -> &'static str {
        "ofi"
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
            // Poll the CQ ourselves for a while: a reply usually comes within microseconds,
            // and handling it on this thread saves waking two others.
            // While messages are flowing, wait longer: a partner that has fallen back to its
            // parked (slow) path would otherwise make us fall back too, for good.
            let now_us = inner.epoch.elapsed().as_micros() as u64;
            let recent = now_us.saturating_sub(inner.last_event.load(Ordering::Relaxed))
                < BUSY_RECV.as_micros() as u64;
            let spin = if recent { BUSY_RECV_SPIN } else { SPIN };
            let t0 = Instant::now();
            let _p = inner.app_poll();
            while inner.queued.load(Ordering::Acquire) == 0 && t0.elapsed() < spin {
                if inner.try_poll() == 0 {
                    relax(t0);
                }
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
                inner
                    .last_event
                    .store(inner.epoch.elapsed().as_micros() as u64, Ordering::Relaxed);
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
        if len > src.len() || len as u64 > dst.len || src.pool().name() != inner.cfg.pool.name() {
            return Err(TransportError::BadRef);
        }
        let p = inner.peer(peer)?;
        // SAFETY: the transport only reads the source of a transfer (shared borrows); the memory
        // contract of `Transport::put_block`/`get_block` forbids writing it until it completes.
        let hold = unsafe { src.try_clone() }.map_err(|_| TransportError::BadRef)?;
        let op = inner.next_op.fetch_add(1, Ordering::Relaxed);
        let done = inner.completion();
        if !common::add_pending(
            &p.pending,
            &p.lost,
            op,
            Pending::Put {
                done: done.clone(),
                _src: hold,
            },
        ) {
            return Err(inner.lost_err());
        }
        let mut body = [0u8; 48];
        body[..32].copy_from_slice(&encode_ref(&dst));
        body[32..40].copy_from_slice(&tag.to_le_bytes());
        body[40..48].copy_from_slice(&src.block_ref().offset.to_le_bytes());
        let h = frame_header(p.tx_token, kind::PUT_REQ, body.len(), op, len as u64, 0);
        inner.post_request(&p, op, h, &body)?;
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
        if !dst.is_writable()
            || len > dst.len()
            || len as u64 > src.len
            || dst.pool().name() != inner.cfg.pool.name()
        {
            return Err(TransportError::BadRef);
        }
        let p = inner.peer(peer)?;
        let done = inner.completion();
        if len == 0 {
            done.complete(Ok(()));
            return Ok(done);
        }
        // SAFETY: the destination of a transfer is the transport's to write until the transfer
        // completes (the memory contract of `Transport::put_block`/`get_block`): no other
        // handle of this process borrows these bytes meanwhile.
        let hold = unsafe { dst.try_clone() }.map_err(|_| TransportError::BadRef)?;
        let op = inner.next_op.fetch_add(1, Ordering::Relaxed);
        if !common::add_pending(
            &p.pending,
            &p.lost,
            op,
            Pending::Get {
                done: done.clone(),
                dst: hold,
                len: len as u64,
            },
        ) {
            return Err(inner.lost_err());
        }
        let body = encode_ref(&src);
        let h = frame_header(p.tx_token, kind::GET_REQ, body.len(), op, len as u64, 0);
        inner.post_request(&p, op, h, &body)?;
        Ok(done)
    }

    fn close(&self) {
        self.inner.close();
    }
}
