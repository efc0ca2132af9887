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
//! channel; its end (EOF: the process died) or silence past [`Config::peer_timeout`] loses
//! the peer.
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

pub mod side;
mod sys;

use std::collections::{HashMap, VecDeque};
use std::ffi::c_void;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dragon_shm::heap::{Block, BlockRef};

use crate::common::{self, lock, wait_until};
use crate::wire::{decode_ref, encode_ref, u64_at};
use crate::{auth, Completion, Config, Event, NodeId, PeerAddr, Result, Transport, TransportError};

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

/// Prints `msg` on stderr when `DRAGON_TRANSPORT_DEBUG` is set (why peers are lost).
fn debug(msg: &str) {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *ON.get_or_init(|| std::env::var_os("DRAGON_TRANSPORT_DEBUG").is_some()) {
        eprintln!("dragon-transport: ofi: {msg}");
    }
}

/// Prints `dragon-transport: libfabric not available (REASON); using tcp` on stderr, once
/// per process.
pub(crate) fn fallback_notice(reason: &str) {
    NOTICE
        .call_once(|| eprintln!("dragon-transport: libfabric not available ({reason}); using tcp"));
}

// ---- memory --------------------------------------------------------------------------------

/// Page-aligned, zeroed memory owned by the endpoint, freed on drop.
struct Slab {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

// SAFETY: the slab is plain memory; who writes which part when is governed by the slot
// protocol (a slot belongs either to the provider, between post and completion, or to the
// thread that holds it under the state lock).
unsafe impl Send for Slab {}
// SAFETY: as above.
unsafe impl Sync for Slab {}

impl Slab {
    fn new(len: usize) -> Result<Slab> {
        let layout = std::alloc::Layout::from_size_align(len.max(4096), 4096)
            .map_err(|_| TransportError::Protocol("bad slab size"))?;
        // SAFETY: the layout has nonzero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(TransportError::Io(io::ErrorKind::OutOfMemory));
        }
        Ok(Slab { ptr, layout })
    }

    /// Start of byte `off` (callers keep `off` within the slab).
    fn at(&self, off: usize) -> *mut u8 {
        debug_assert!(off <= self.layout.size());
        self.ptr.wrapping_add(off)
    }
}

impl Drop for Slab {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

/// The registered regions; closed (before the endpoint's domain) at teardown.
struct Regions {
    pool: sys::Mr,
    tx: sys::Mr,
    rx: sys::Mr,
}

// ---- operations in flight ------------------------------------------------------------------

/// Operations keyed by id that count themselves into the endpoint's `inflight` total: while
/// anything is in flight the progress thread keeps polling instead of sleeping (the providers
/// move RMA data only while both sides read their CQ).
struct Counted<V> {
    map: HashMap<u64, V>,
    total: Arc<AtomicI64>,
}

impl<V> common::OpTable<V> for Counted<V> {
    fn insert_op(&mut self, op: u64, v: V) {
        self.insert(op, v);
    }
}

impl<V> Counted<V> {
    fn new(total: &Arc<AtomicI64>) -> Self {
        Counted {
            map: HashMap::new(),
            total: total.clone(),
        }
    }
    fn insert(&mut self, k: u64, v: V) {
        if self.map.insert(k, v).is_none() {
            self.total.fetch_add(1, Ordering::AcqRel);
        }
    }
    fn remove(&mut self, k: &u64) -> Option<V> {
        let r = self.map.remove(k);
        if r.is_some() {
            self.total.fetch_sub(1, Ordering::AcqRel);
        }
        r
    }
    fn take_all(&mut self) -> Vec<V> {
        self.total
            .fetch_sub(self.map.len() as i64, Ordering::AcqRel);
        self.map.drain().map(|(_, v)| v).collect()
    }
    fn len(&self) -> usize {
        self.map.len()
    }
    fn contains_key(&self, k: &u64) -> bool {
        self.map.contains_key(k)
    }
    fn get(&self, k: &u64) -> Option<&V> {
        self.map.get(k)
    }
    fn get_mut(&mut self, k: &u64) -> Option<&mut V> {
        self.map.get_mut(k)
    }
    fn values(&self) -> impl Iterator<Item = &V> {
        self.map.values()
    }
}

impl<V> Drop for Counted<V> {
    fn drop(&mut self) {
        self.total
            .fetch_sub(self.map.len() as i64, Ordering::AcqRel);
    }
}

// ---- per-peer state ----------------------------------------------------------------------

/// A peer's registered pool region, as it told us.
#[derive(Debug, Clone, Copy)]
struct Region {
    base: u64,
    len: u64,
    key: u64,
}

impl Region {
    /// Remote address of `[off, off + len)`, if that range lies inside the region.
    fn addr(&self, off: u64, len: u64) -> Option<u64> {
        let end = off.checked_add(len)?;
        (end <= self.len).then(|| self.base.wrapping_add(off))
    }
}

/// An operation this node started, waiting for the peer.
enum Pending {
    Put {
        done: Completion,
        _src: Block,
    },
    Get {
        done: Completion,
        dst: Block,
        len: u64,
    },
}

/// The pending put `op` that a put answer names. A get of that number fails (`PeerLost`) and
/// the frame, like one naming no pending op, is a protocol error.
fn take_put(p: &Peer, op: u64) -> Result<Completion> {
    match lock(&p.pending).remove(&op) {
        Some(Pending::Put { done, .. }) => Ok(done),
        Some(Pending::Get { done, .. }) => {
            done.complete(Err(TransportError::PeerLost));
            Err(TransportError::Protocol("put answer to a get"))
        }
        None => Err(TransportError::Protocol("answer to an unknown put")),
    }
}

/// The pending get `op` that a get answer names (its completion, destination and length),
/// under the rules of [`take_put`].
fn take_get(p: &Peer, op: u64) -> Result<(Completion, Block, u64)> {
    match lock(&p.pending).remove(&op) {
        Some(Pending::Get { done, dst, len }) => Ok((done, dst, len)),
        Some(Pending::Put { done, .. }) => {
            done.complete(Err(TransportError::PeerLost));
            Err(TransportError::Protocol("get answer to a put"))
        }
        None => Err(TransportError::Protocol("answer to an unknown get")),
    }
}

/// A put request being served (target side), in arrival order.
struct PutSlot {
    op: u64,
    /// `None` while the bytes are moving.
    outcome: Option<std::result::Result<(BlockRef, u64, u64), u64>>,
}

/// Receive side of a peer (touched only by completion handlers, which `poll_lock`
/// serializes).
#[derive(Default)]
struct RxState {
    /// Sequence number of the next frame to handle.
    next: u64,
    /// Frames that came early, by sequence number.
    held: std::collections::BTreeMap<u64, Vec<u8>>,
    /// A message being reassembled: bytes so far and total length.
    partial: Option<(Vec<u8>, u64)>,
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
    fi_addr: u64,
    /// Token we put into frames to this peer.
    tx_token: u64,
    /// Token this peer puts into frames to us.
    rx_token: u64,
    region: Region,
    /// Longest message either side accepts.
    max_message: usize,
    /// Credit window of this pair: the smaller of the two `queue_depth`s.
    window: u64,
    /// Side channel (shutdown, heartbeats).
    side: TcpStream,
    lost: AtomicBool,
    credits: Mutex<u64>,
    credit_cv: Condvar,
    /// Messages of this peer taken by our application, not yet credited back.
    consumed: AtomicU64,
    /// Messages of this peer in our inbox.
    unconsumed: AtomicU64,
    /// Sequence number of our next message (assigned under the state lock).
    tx_seq: AtomicU64,
    rx: Mutex<RxState>,
    puts: Mutex<VecDeque<PutSlot>>,
    pending: Mutex<Counted<Pending>>,
    /// Our blocks this peer is reading (get sources), by its op id.
    exposed: Mutex<Counted<Block>>,
}

// ---- fabric state (under one lock) ----------------------------------------------------------

/// A post the provider refused for now, retried by the progress thread in order.
enum Post {
    Send { peer: Arc<Peer>, frame: Vec<u8> },
    Recv { slot: usize },
}

enum XferKind {
    /// We serve a peer's put: reading its block into ours.
    PutTarget { op: u64, tag: u64, dst: BlockRef },
    /// Our get: reading the peer's block into ours.
    GetInit { op: u64, done: Completion },
}

/// A block transfer this node drives with RMA reads.
struct Xfer {
    peer: Arc<Peer>,
    kind: XferKind,
    /// The local block the reads write (held until they have all completed).
    block: Block,
    len: u64,
    raddr: u64,
    key: u64,
    issued: u64,
    outstanding: usize,
    failed: bool,
}

/// Work left for after the state lock is released.
enum Action {
    PutFinished {
        peer: Arc<Peer>,
        op: u64,
        outcome: std::result::Result<(BlockRef, u64, u64), u64>,
    },
    GetFinished {
        peer: Arc<Peer>,
        op: u64,
        done: Completion,
        ok: bool,
    },
}

struct State {
    /// The endpoint is closed: nothing may be posted any more.
    dead: bool,
    backlog: VecDeque<Post>,
    free_tx: Vec<usize>,
    /// Peer of each send slot in flight (a failed send loses it).
    tx_peer: Vec<Option<Arc<Peer>>>,
    free_rma: Vec<usize>,
    /// Transfer of each RMA slot in flight.
    rma: Vec<Option<u64>>,
    xfers: Counted<Xfer>,
    /// Transfers with reads still to issue, in order.
    rma_wait: VecDeque<u64>,
    next_xfer: u64,
    actions: Vec<Action>,
}

struct Inner {
    cfg: Config,
    ep: sys::Ep,
    st: Mutex<State>,
    regions: Mutex<Option<Regions>>,
    pool_desc: usize,
    tx_desc: usize,
    rx_desc: usize,
    /// Our (registered) mapping of the pool segment.
    pool_ptr: usize,
    pool_len: u64,
    /// What peers use as the remote address of byte 0 of our segment.
    pool_base: u64,
    pool_key: u64,
    tx_slab: Slab,
    rx_slab: Slab,
    ctxs: Slab,
    my_addr: Vec<u8>,
    listener: TcpListener,
    addr: SocketAddr,
    closed: AtomicBool,
    torn_down: AtomicBool,
    peers: Mutex<HashMap<NodeId, Arc<Peer>>>,
    peers_cv: Condvar,
    /// Authenticated peers by the token their frames carry.
    tokens: Mutex<HashMap<u64, Arc<Peer>>>,
    /// Nodes whose side-channel exchange is under way on the accepting side.
    joining: Mutex<std::collections::HashSet<NodeId>>,
    inbox: Mutex<VecDeque<(Event, Option<Arc<Peer>>)>>,
    inbox_cv: Condvar,
    /// Events in `inbox` (read without its lock by spinning receivers).
    queued: AtomicU64,
    next_op: AtomicU64,
    threads: Mutex<Vec<JoinHandle<()>>>,
    handshaking: Mutex<HashMap<u64, TcpStream>>,
    next_hs: AtomicU64,
    auth_failures: AtomicU64,
    rejected: AtomicU64,
    /// Microseconds since `epoch` of the last post (see `BUSY_SPIN`).
    last_post: AtomicU64,
    /// Microseconds since `epoch` of the last completion read (by any thread).
    last_cq: AtomicU64,
    /// Microseconds since `epoch` of the last event `recv` returned.
    last_event: AtomicU64,
    epoch: Instant,
    /// Serializes readers of the CQ (the progress thread and threads waiting in `recv`),
    /// so that completions are handled in order.
    poll_lock: Mutex<()>,
    /// Threads polling the CQ from `recv` right now.
    app_polling: AtomicU64,
    /// The progress thread waits here while `app_polling` is nonzero.
    gate: Mutex<()>,
    gate_cv: Condvar,
    /// The progress thread is (about to be) waiting on `gate_cv`.
    gate_waiting: AtomicBool,
    /// Operations in flight (pending, exposed, transfers: see [`Counted`]; and sends).
    inflight: Arc<AtomicI64>,
    cq_warned: AtomicBool,
    /// The progress thread is (about to be) blocked in `poll()` on the CQ's descriptor.
    sleeping: AtomicBool,
    /// Posts wait in the backlog (or reads for RMA slots): the progress thread keeps polling.
    backlogged: AtomicBool,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OfiTransport")
            .field("node", &self.cfg.node)
            .field("provider", &self.ep.attrs.prov)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
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
    eprintln!("dragon-transport: ofi: {what}: {}", sys::strerror(code));
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
    /// Opens an endpoint of `provider` (e.g. `tcp;ofi_rxm`, `shm`) and starts listening on
    /// [`Config::listen`] for side-channel connections. Fails with
    /// [`TransportError::Unavailable`] when libfabric or the provider cannot be used (the
    /// reason is printed on stderr).
    pub fn open(cfg: Config, provider: &str) -> Result<OfiTransport> {
        if cfg.queue_depth == 0 || cfg.max_message > u32::MAX as usize {
            return Err(TransportError::Protocol("bad configuration"));
        }
        if let Err(e) = available() {
            eprintln!("dragon-transport: ofi: {e}");
            return Err(TransportError::Unavailable);
        }
        let node = node_for(provider, &cfg.listen);
        let ep = sys::Ep::open(provider, node.as_deref()).map_err(|e| {
            eprintln!("dragon-transport: ofi: {e}");
            TransportError::Unavailable
        })?;
        let my_addr = ep.name().map_err(|e| fi_err("fi_getname", e.into()))?;
        let tx_slab = Slab::new(TX_SLOTS * SLOT)?;
        let rx_slab = Slab::new(RX_SLOTS * SLOT)?;
        let ctxs = Slab::new((RX_SLOTS + TX_SLOTS + RMA_SLOTS) * CTX)?;
        let seg = cfg.pool.segment();
        let pool_ptr = seg.base();
        let pool_len = seg.len();
        let key_mask = if ep.attrs.mr_key_size >= 8 {
            u64::MAX
        } else {
            (1u64 << (8 * ep.attrs.mr_key_size.max(1))) - 1
        };
        let reg = |ptr: *mut u8, len: usize, access: u64| -> Result<sys::Mr> {
            let mut last = 0;
            for _ in 0..8 {
                let key = random_nonzero() & key_mask;
                // SAFETY: the memory (the pool mapping or a slab) stays mapped for the
                // endpoint's life: the pool handle and the slabs are owned by Inner, and the
                // regions are closed in teardown, before either goes away and before the
                // domain closes (or right below when opening fails).
                match unsafe { ep.mr_reg(ptr, len, access, key) } {
                    Ok(m) => return Ok(m),
                    Err(e) if -e == sys::FI_ENOKEY => last = e,
                    Err(e) => return Err(fi_err("fi_mr_reg", e.into())),
                }
            }
            Err(fi_err("fi_mr_reg", last.into()))
        };
        let mut regs: Vec<sys::Mr> = Vec::new();
        let listener = (|| -> Result<TcpListener> {
            regs.push(reg(pool_ptr, pool_len, sys::FI_READ | sys::FI_REMOTE_READ)?);
            regs.push(reg(tx_slab.ptr, TX_SLOTS * SLOT, sys::FI_SEND)?);
            regs.push(reg(rx_slab.ptr, RX_SLOTS * SLOT, sys::FI_RECV)?);
            Ok(TcpListener::bind(&cfg.listen)?)
        })();
        let listener = match listener {
            Ok(l) => l,
            Err(e) => {
                for m in regs {
                    m.close();
                }
                return Err(e);
            }
        };
        let addr = listener.local_addr()?;
        let rx_mr = regs.pop();
        let tx_mr = regs.pop();
        let pool_mr = regs.pop();
        let (Some(pool_mr), Some(tx_mr), Some(rx_mr)) = (pool_mr, tx_mr, rx_mr) else {
            return Err(TransportError::Protocol("memory registration"));
        };
        let pool_base = if ep.attrs.mr_mode & sys::FI_MR_VIRT_ADDR != 0 {
            pool_ptr as u64
        } else {
            0
        };
        let inflight = Arc::new(AtomicI64::new(0));
        let inner = Arc::new(Inner {
            pool_desc: pool_mr.desc as usize,
            tx_desc: tx_mr.desc as usize,
            rx_desc: rx_mr.desc as usize,
            pool_key: pool_mr.key,
            regions: Mutex::new(Some(Regions {
                pool: pool_mr,
                tx: tx_mr,
                rx: rx_mr,
            })),
            cfg,
            ep,
            st: Mutex::new(State {
                dead: false,
                backlog: VecDeque::new(),
                free_tx: (0..TX_SLOTS).rev().collect(),
                tx_peer: (0..TX_SLOTS).map(|_| None).collect(),
                free_rma: (0..RMA_SLOTS).rev().collect(),
                rma: vec![None; RMA_SLOTS],
                xfers: Counted::new(&inflight),
                rma_wait: VecDeque::new(),
                next_xfer: 1,
                actions: Vec::new(),
            }),
            pool_ptr: pool_ptr as usize,
            pool_len: pool_len as u64,
            pool_base,
            tx_slab,
            rx_slab,
            ctxs,
            my_addr,
            listener,
            addr,
            closed: AtomicBool::new(false),
            torn_down: AtomicBool::new(false),
            peers: Mutex::new(HashMap::new()),
            peers_cv: Condvar::new(),
            tokens: Mutex::new(HashMap::new()),
            joining: Mutex::new(std::collections::HashSet::new()),
            inbox: Mutex::new(VecDeque::new()),
            inbox_cv: Condvar::new(),
            queued: AtomicU64::new(0),
            next_op: AtomicU64::new(1),
            threads: Mutex::new(Vec::new()),
            handshaking: Mutex::new(HashMap::new()),
            next_hs: AtomicU64::new(0),
            auth_failures: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            last_post: AtomicU64::new(0),
            last_cq: AtomicU64::new(0),
            last_event: AtomicU64::new(0),
            epoch: Instant::now(),
            poll_lock: Mutex::new(()),
            app_polling: AtomicU64::new(0),
            gate: Mutex::new(()),
            gate_cv: Condvar::new(),
            gate_waiting: AtomicBool::new(false),
            inflight,
            cq_warned: AtomicBool::new(false),
            sleeping: AtomicBool::new(false),
            backlogged: AtomicBool::new(false),
        });
        {
            let mut st = lock(&inner.st);
            for slot in 0..RX_SLOTS {
                inner.post_recv(&mut st, slot);
            }
        }
        let t = OfiTransport { inner };
        t.inner.spawn("dt-ofi-progress", |me| me.progress_loop());
        t.inner.spawn("dt-ofi-listen", |me| me.listen_loop());
        Ok(t)
    }

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

/// See [`Inner::app_poll`].
struct AppPoll<'a>(&'a Inner);

impl Drop for AppPoll<'_> {
    fn drop(&mut self) {
        if self.0.app_polling.fetch_sub(1, Ordering::AcqRel) == 1
            && self.0.gate_waiting.load(Ordering::SeqCst)
        {
            drop(lock(&self.0.gate));
            self.0.gate_cv.notify_one();
        }
    }
}

impl Drop for OfiTransport {
    fn drop(&mut self) {
        self.inner.close();
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.teardown();
    }
}

impl Inner {
    fn spawn(self: &Arc<Self>, name: &str, f: impl FnOnce(Arc<Inner>) + Send + 'static) {
        let me = self.clone();
        if let Ok(h) = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || f(me))
        {
            lock(&self.threads).push(h);
        }
    }

    fn ctx(&self, i: usize) -> *mut c_void {
        self.ctxs.at(i * CTX).cast()
    }

    fn ctx_index(&self, p: *mut c_void) -> Option<usize> {
        let off = (p as usize).checked_sub(self.ctxs.ptr as usize)?;
        let i = off / CTX;
        (off % CTX == 0 && i < RX_SLOTS + TX_SLOTS + RMA_SLOTS).then_some(i)
    }

    fn wake_progress(&self) {
        if self.sleeping.load(Ordering::SeqCst) {
            self.ep.cq_signal();
        }
    }

    /// Releases the state lock, then runs the actions queued under it.
    fn release(&self, mut st: MutexGuard<'_, State>) {
        let acts = std::mem::take(&mut st.actions);
        drop(st);
        for a in acts {
            self.run(a);
        }
    }

    // ---- posting (under the state lock) ----------------------------------------------------

    /// Posts receive slot `slot` to the endpoint; the provider's return code.
    ///
    /// # Safety
    /// The slot must be ours (its previous completion read, or never posted). Its bytes and
    /// its context then stay valid until its completion or the endpoint's closing (teardown
    /// closes the endpoint before the slabs are freed).
    unsafe fn raw_post_recv(&self, slot: usize) -> isize {
        // SAFETY: the caller owns the slot (above); the slab, descriptor and context are the
        // endpoint's own, alive as long as it is.
        unsafe {
            self.ep.recv(
                self.rx_slab.at(slot * SLOT),
                SLOT,
                self.rx_desc as *mut c_void,
                self.ctx(slot),
            )
        }
    }

    fn post_recv(&self, st: &mut State, slot: usize) {
        if st.dead {
            return;
        }
        // SAFETY: receive slot `slot` is ours (its previous completion was read, or it was
        // never posted).
        let r = unsafe { self.raw_post_recv(slot) };
        if r == -sys::FI_EAGAIN {
            st.backlog.push_back(Post::Recv { slot });
            self.backlogged.store(true, Ordering::SeqCst);
            self.wake_progress();
        } else if r != 0 {
            eprintln!(
                "dragon-transport: ofi: fi_recv: {}",
                sys::strerror(r as i64)
            );
        }
    }

    /// Tries to hand the frame `hdr + body` to the provider now. `Ok(false)`: not now.
    fn try_post(&self, st: &mut State, p: &Arc<Peer>, hdr: &[u8], body: &[u8]) -> Result<bool> {
        let n = hdr.len() + body.len();
        debug_assert!(n <= SLOT);
        if n <= self.ep.attrs.inject_size && n <= INJECT_MAX {
            let mut f = [0u8; INJECT_MAX];
            f[..hdr.len()].copy_from_slice(hdr);
            f[hdr.len()..n].copy_from_slice(body);
            return match self.ep.inject(&f[..n], p.fi_addr) {
                0 => Ok(true),
                r if r == -sys::FI_EAGAIN => Ok(false),
                _ => Err(TransportError::PeerLost),
            };
        }
        let Some(slot) = st.free_tx.pop() else {
            return Ok(false);
        };
        let dst = self.tx_slab.at(slot * SLOT);
        // SAFETY: send slot `slot` was free (not posted), so nothing else reads or writes
        // it; n <= SLOT.
        unsafe {
            std::ptr::copy_nonoverlapping(hdr.as_ptr(), dst, hdr.len());
            std::ptr::copy_nonoverlapping(body.as_ptr(), dst.add(hdr.len()), body.len());
        }
        // SAFETY: the slot keeps these bytes unchanged until the send completes (it returns
        // to `free_tx` only in the completion handler, or here when the post fails, or at
        // teardown after the endpoint closed); its context slot is reserved for it.
        let r = unsafe {
            self.ep.send(
                dst,
                n,
                self.tx_desc as *mut c_void,
                p.fi_addr,
                self.ctx(RX_SLOTS + slot),
            )
        };
        if r == 0 {
            st.tx_peer[slot] = Some(p.clone());
            self.inflight.fetch_add(1, Ordering::AcqRel);
            return Ok(true);
        }
        st.free_tx.push(slot);
        if r == -sys::FI_EAGAIN {
            Ok(false)
        } else {
            Err(TransportError::PeerLost)
        }
    }

    /// Sends the frame `hdr + body` (at most [`SLOT`] bytes, token included) after everything
    /// posted before it.
    fn post(&self, st: &mut State, p: &Arc<Peer>, hdr: [u8; FRAME_HDR], body: &[u8]) -> Result<()> {
        self.post_as(st, p, hdr, body, true)
    }

    /// [`post`](Self::post), numbering the frame only when `numbered` (test frames that
    /// pose as another sender's must not use up a number of this one's).
    fn post_as(
        &self,
        st: &mut State,
        p: &Arc<Peer>,
        mut hdr: [u8; FRAME_HDR],
        body: &[u8],
        numbered: bool,
    ) -> Result<()> {
        if st.dead {
            return Err(TransportError::Closed);
        }
        if numbered {
            // Numbered here, under the state lock, so numbers follow the order of posting.
            let seq = p.tx_seq.fetch_add(1, Ordering::Relaxed);
            hdr[8..16].copy_from_slice(&seq.to_le_bytes());
        }
        let hdr = &hdr[..];
        self.last_post
            .store(self.epoch.elapsed().as_micros() as u64, Ordering::Relaxed);
        if st.backlog.is_empty() && self.try_post(st, p, hdr, body)? {
            return Ok(());
        }
        let mut frame = Vec::with_capacity(hdr.len() + body.len());
        frame.extend_from_slice(hdr);
        frame.extend_from_slice(body);
        st.backlog.push_back(Post::Send {
            peer: p.clone(),
            frame,
        });
        self.backlogged.store(true, Ordering::SeqCst);
        self.wake_progress();
        Ok(())
    }

    /// Posts a control frame, losing the peer when that fails.
    fn ctl(&self, p: &Arc<Peer>, k: u8, a: u64, b: u64, body: &[u8]) {
        let h = frame_header(p.tx_token, k, body.len(), a, b, 0);
        let r = {
            let mut st = lock(&self.st);
            self.post(&mut st, p, h, body)
        };
        if r == Err(TransportError::PeerLost) {
            self.lose(p);
        }
    }

    fn drain_backlog(&self) {
        let mut lost = Vec::new();
        let mut st = lock(&self.st);
        while let Some(front) = st.backlog.pop_front() {
            if st.dead {
                st.backlog.clear();
                break;
            }
            match front {
                Post::Recv { slot } => {
                    // SAFETY: as in post_recv: the slot is ours until this post.
                    let r = unsafe { self.raw_post_recv(slot) };
                    if r == -sys::FI_EAGAIN {
                        st.backlog.push_front(Post::Recv { slot });
                        break;
                    }
                }
                Post::Send { peer, frame } => {
                    if peer.lost.load(Ordering::Acquire) {
                        continue;
                    }
                    match self.try_post(&mut st, &peer, &frame, &[]) {
                        Ok(true) => {}
                        Ok(false) => {
                            st.backlog.push_front(Post::Send { peer, frame });
                            break;
                        }
                        Err(_) => lost.push(peer),
                    }
                }
            }
        }
        let busy = !st.backlog.is_empty();
        self.backlogged.store(busy, Ordering::SeqCst);
        self.pump_rma(&mut st);
        self.release(st);
        for p in lost {
            self.lose(&p);
        }
    }

    /// Issues the reads of waiting transfers while RMA slots are free.
    fn pump_rma(&self, st: &mut State) {
        while let Some(&x) = st.rma_wait.front() {
            if st.dead {
                return;
            }
            let Some(xf) = st.xfers.get(&x) else {
                st.rma_wait.pop_front();
                continue;
            };
            if xf.issued >= xf.len || xf.failed || xf.peer.lost.load(Ordering::Acquire) {
                st.rma_wait.pop_front();
                self.finish_if_done(st, x);
                continue;
            }
            let Some(slot) = st.free_rma.pop() else {
                return;
            };
            let n = ((xf.len - xf.issued) as usize)
                .min(rma_chunk())
                .min(self.ep.attrs.max_msg_size.max(4096));
            let local = self.pool_ptr + xf.block.block_ref().offset as usize + xf.issued as usize;
            // SAFETY: `local .. local + n` lies inside the block `xf.block` (issued + n <= len
            // <= the block's length, checked when the transfer was made) in our registered
            // mapping of the pool; the Xfer holds the block until every read into it has
            // completed (or the endpoint is closed); the context slot is this RMA slot's.
            let r = unsafe {
                self.ep.read(
                    local as *mut u8,
                    n,
                    self.pool_desc as *mut c_void,
                    xf.peer.fi_addr,
                    xf.raddr.wrapping_add(xf.issued),
                    xf.key,
                    self.ctx(RX_SLOTS + TX_SLOTS + slot),
                )
            };
            if r == -sys::FI_EAGAIN {
                st.free_rma.push(slot);
                self.backlogged.store(true, Ordering::SeqCst);
                return;
            }
            let Some(xf) = st.xfers.get_mut(&x) else {
                st.free_rma.push(slot);
                return;
            };
            if r != 0 {
                st.free_rma.push(slot);
                xf.failed = true;
                continue;
            }
            xf.issued += n as u64;
            xf.outstanding += 1;
            st.rma[slot] = Some(x);
        }
    }

    /// Ends transfer `x` if nothing of it is in flight and nothing more will be issued,
    /// queueing what follows as an action.
    fn finish_if_done(&self, st: &mut State, x: u64) {
        let Some(xf) = st.xfers.get(&x) else {
            return;
        };
        let lost = xf.peer.lost.load(Ordering::Acquire);
        if xf.outstanding > 0 || !(xf.issued >= xf.len || xf.failed || lost) {
            return;
        }
        let Some(xf) = st.xfers.remove(&x) else {
            return;
        };
        let ok = !xf.failed && !lost && xf.issued >= xf.len;
        let Xfer {
            peer,
            kind,
            block,
            len,
            ..
        } = xf;
        drop(block);
        st.actions.push(match kind {
            XferKind::PutTarget { op, tag, dst } => Action::PutFinished {
                peer,
                op,
                outcome: if ok { Ok((dst, len, tag)) } else { Err(ERR_IO) },
            },
            XferKind::GetInit { op, done } => Action::GetFinished { peer, op, done, ok },
        });
    }

    fn start_xfer(&self, p: &Arc<Peer>, kind: XferKind, block: Block, len: u64, raddr: u64) {
        let mut st = lock(&self.st);
        if st.dead {
            if let XferKind::GetInit { done, .. } = kind {
                done.complete(Err(TransportError::Closed));
            }
            return;
        }
        let x = st.next_xfer;
        st.next_xfer += 1;
        st.xfers.insert(
            x,
            Xfer {
                peer: p.clone(),
                kind,
                block,
                len,
                raddr,
                key: p.region.key,
                issued: 0,
                outstanding: 0,
                failed: false,
            },
        );
        st.rma_wait.push_back(x);
        self.pump_rma(&mut st);
        self.release(st);
    }

    fn run(&self, a: Action) {
        match a {
            Action::PutFinished { peer, op, outcome } => {
                if peer.lost.load(Ordering::Acquire) {
                    return;
                }
                if let Some(s) = lock(&peer.puts).iter_mut().find(|s| s.op == op) {
                    s.outcome = Some(outcome);
                }
                self.flush_puts(&peer);
            }
            Action::GetFinished { peer, op, done, ok } => {
                let lost = peer.lost.load(Ordering::Acquire);
                done.complete(if ok {
                    Ok(())
                } else if lost {
                    Err(self.lost_err())
                } else {
                    Err(TransportError::Io(io::ErrorKind::Other))
                });
                if !lost {
                    self.ctl(&peer, kind::GET_DONE, op, 0, &[]);
                }
            }
        }
    }

    /// Reports the puts of `p` that are finished, in the order they were requested.
    fn flush_puts(&self, p: &Arc<Peer>) {
        loop {
            let front = {
                let mut q = lock(&p.puts);
                match q.front() {
                    Some(s) if s.outcome.is_some() => q.pop_front(),
                    _ => None,
                }
            };
            let Some(PutSlot {
                op,
                outcome: Some(outcome),
            }) = front
            else {
                return;
            };
            match outcome {
                Ok((block, len, tag)) => {
                    self.push_event(
                        Event::BlockFilled {
                            peer: p.id,
                            block,
                            len,
                            tag,
                        },
                        None,
                    );
                    self.ctl(p, kind::PUT_ACK, op, 0, &[]);
                }
                Err(code) => self.ctl(p, kind::PUT_NACK, op, code, &[]),
            }
        }
    }

    // ---- completions ------------------------------------------------------------------------

    fn on_cqe(&self, e: &sys::Cqe) {
        let Some(i) = self.ctx_index(e.ctx) else {
            return;
        };
        if i < RX_SLOTS {
            self.on_recv(i, e.len as usize);
        } else if i < RX_SLOTS + TX_SLOTS {
            let mut st = lock(&self.st);
            let s = i - RX_SLOTS;
            if st.tx_peer[s].take().is_some() {
                st.free_tx.push(s);
                self.inflight.fetch_sub(1, Ordering::AcqRel);
            }
            if !st.backlog.is_empty() {
                self.backlogged.store(true, Ordering::SeqCst);
            }
        } else {
            self.on_rma(i - RX_SLOTS - TX_SLOTS, false);
        }
    }

    fn on_cq_err(&self, e: &sys::CqErr) {
        let Some(i) = self.ctx_index(e.ctx) else {
            return;
        };
        if i < RX_SLOTS {
            // A receive failed (e.g. truncated: a frame larger than a slot). Its sender is
            // unknown: repost and go on.
            let mut st = lock(&self.st);
            self.post_recv(&mut st, i);
        } else if i < RX_SLOTS + TX_SLOTS {
            let p = {
                let mut st = lock(&self.st);
                let s = i - RX_SLOTS;
                let p = st.tx_peer[s].take();
                if p.is_some() {
                    st.free_tx.push(s);
                    self.inflight.fetch_sub(1, Ordering::AcqRel);
                }
                p
            };
            if let Some(p) = p {
                debug(&format!(
                    "{}: send to {} failed: {}",
                    self.cfg.node,
                    p.id,
                    sys::strerror(e.err.into())
                ));
                if e.err != sys::FI_ECANCELED {
                    self.lose(&p);
                }
            }
        } else {
            self.on_rma(i - RX_SLOTS - TX_SLOTS, true);
        }
    }

    fn on_rma(&self, slot: usize, failed: bool) {
        let mut st = lock(&self.st);
        let Some(x) = st.rma[slot].take() else {
            return;
        };
        st.free_rma.push(slot);
        if let Some(xf) = st.xfers.get_mut(&x) {
            xf.outstanding -= 1;
            xf.failed |= failed;
        }
        self.finish_if_done(&mut st, x);
        self.pump_rma(&mut st);
        self.release(st);
    }

    fn on_recv(&self, slot: usize, len: usize) {
        let len = len.min(SLOT);
        // SAFETY: the receive's completion was read, so the provider no longer writes this
        // slot until we repost it below; `len` bytes of it were filled.
        let f: &[u8] = unsafe { std::slice::from_raw_parts(self.rx_slab.at(slot * SLOT), len) };
        let peer = if len >= FRAME_HDR {
            lock(&self.tokens).get(&u64_at(f, 0)).cloned()
        } else {
            None
        };
        let failed = match peer {
            None => {
                // Not from an authenticated peer (or a lost one): dropped unread.
                self.rejected.fetch_add(1, Ordering::Relaxed);
                None
            }
            Some(p) if p.lost.load(Ordering::Acquire) => None,
            Some(p) => match self.on_frames(&p, f) {
                Ok(()) => None,
                Err(e) => {
                    debug(&format!(
                        "{}: {} broke the protocol: {e}",
                        self.cfg.node, p.id
                    ));
                    Some(p)
                }
            },
        };
        {
            let mut st = lock(&self.st);
            self.post_recv(&mut st, slot);
        }
        if let Some(p) = failed {
            self.lose(&p);
        }
    }

    /// Handles frame `f` of the authenticated peer `p` and then the held frames that follow it,
    /// or holds `f` when it came early. Any error loses the peer.
    fn on_frames(&self, p: &Arc<Peer>, f: &[u8]) -> Result<()> {
        let seq = u64_at(f, 8);
        {
            let mut rx = lock(&p.rx);
            if seq < rx.next || rx.held.contains_key(&seq) {
                return Err(TransportError::Protocol("repeated frame"));
            }
            if seq > rx.next {
                if rx.held.len() >= MAX_HELD {
                    return Err(TransportError::Protocol("too many frames out of order"));
                }
                rx.held.insert(seq, f.to_vec());
                return Ok(());
            }
            rx.next += 1;
        }
        self.on_frame(p, f)?;
        loop {
            let next = {
                let mut rx = lock(&p.rx);
                let n = rx.next;
                match rx.held.remove(&n) {
                    Some(x) => {
                        rx.next += 1;
                        x
                    }
                    None => return Ok(()),
                }
            };
            if p.lost.load(Ordering::Acquire) {
                return Ok(());
            }
            self.on_frame(p, &next)?;
        }
    }

    /// Decodes one frame of the authenticated peer `p`, in order. Any error loses the peer.
    fn on_frame(&self, p: &Arc<Peer>, f: &[u8]) -> Result<()> {
        if f[17..20] != [0, 0, 0] {
            return Err(TransportError::Protocol("nonzero reserved bytes"));
        }
        let blen = u32::from_le_bytes([f[20], f[21], f[22], f[23]]) as usize;
        if blen != f.len() - FRAME_HDR {
            return Err(TransportError::Protocol("frame length"));
        }
        let (a, b, c) = (u64_at(f, 24), u64_at(f, 32), u64_at(f, 40));
        let body = &f[FRAME_HDR..];
        let no_body = || {
            if body.is_empty() {
                Ok(())
            } else {
                Err(TransportError::Protocol("unexpected frame body"))
            }
        };
        let pool = &self.cfg.pool;
        match f[16] {
            kind::MSG => {
                if c != 0 {
                    return Err(TransportError::Protocol("bad message header"));
                }
                self.on_msg(p, a, b, body)
            }
            kind::CREDIT => {
                no_body()?;
                let mut cr = lock(&p.credits);
                *cr = cr.saturating_add(a);
                if *cr > p.window {
                    return Err(TransportError::Protocol("too many credits"));
                }
                drop(cr);
                p.credit_cv.notify_all();
                Ok(())
            }
            kind::PUT_REQ => {
                if body.len() != 48 {
                    return Err(TransportError::Protocol("bad put request"));
                }
                let dst = decode_ref(&body[..32]);
                let tag = u64_at(body, 32);
                let src_off = u64_at(body, 40);
                let (op, len) = (a, b);
                let block = pool.block(dst).ok().filter(|bk| len <= bk.len() as u64);
                let raddr = p.region.addr(src_off, len);
                let mut q = lock(&p.puts);
                if q.len() >= MAX_EXPOSED {
                    return Err(TransportError::Protocol("too many puts in flight"));
                }
                let start = match (block, raddr) {
                    (Some(block), Some(raddr)) if len > 0 => {
                        q.push_back(PutSlot { op, outcome: None });
                        Some((block, raddr))
                    }
                    (Some(_), Some(_)) => {
                        q.push_back(PutSlot {
                            op,
                            outcome: Some(Ok((dst, 0, tag))),
                        });
                        None
                    }
                    _ => {
                        q.push_back(PutSlot {
                            op,
                            outcome: Some(Err(ERR_BAD_REF)),
                        });
                        None
                    }
                };
                drop(q);
                if let Some((block, raddr)) = start {
                    self.start_xfer(p, XferKind::PutTarget { op, tag, dst }, block, len, raddr);
                }
                self.flush_puts(p);
                Ok(())
            }
            kind::PUT_ACK | kind::PUT_NACK => {
                no_body()?;
                take_put(p, a)?.complete(match (f[16], b) {
                    (kind::PUT_ACK, _) => Ok(()),
                    (_, ERR_BAD_REF) => Err(TransportError::BadRef),
                    _ => Err(TransportError::Io(io::ErrorKind::Other)),
                });
                Ok(())
            }
            kind::GET_REQ => {
                if body.len() != 32 {
                    return Err(TransportError::Protocol("bad get request"));
                }
                let src = decode_ref(body);
                let (op, len) = (a, b);
                match pool
                    .block(src)
                    .ok()
                    .filter(|bk| len > 0 && len <= bk.len() as u64)
                {
                    Some(bk) => {
                        let mut ex = lock(&p.exposed);
                        if ex.len() >= MAX_EXPOSED || ex.contains_key(&op) {
                            return Err(TransportError::Protocol("too many gets in flight"));
                        }
                        ex.insert(op, bk);
                        drop(ex);
                        self.ctl(p, kind::GET_GRANT, op, src.offset, &[]);
                    }
                    None => self.ctl(p, kind::GET_NACK, op, ERR_BAD_REF, &[]),
                }
                Ok(())
            }
            kind::GET_GRANT => {
                no_body()?;
                let (done, dst, len) = take_get(p, a)?;
                match p.region.addr(b, len) {
                    Some(raddr) => {
                        self.start_xfer(p, XferKind::GetInit { op: a, done }, dst, len, raddr)
                    }
                    None => {
                        done.complete(Err(TransportError::BadRef));
                        self.ctl(p, kind::GET_DONE, a, 0, &[]);
                    }
                }
                Ok(())
            }
            kind::GET_NACK => {
                no_body()?;
                let (done, _, _) = take_get(p, a)?;
                done.complete(Err(if b == ERR_BAD_REF {
                    TransportError::BadRef
                } else {
                    TransportError::Io(io::ErrorKind::Other)
                }));
                Ok(())
            }
            kind::GET_DONE => {
                no_body()?;
                match lock(&p.exposed).remove(&a) {
                    Some(_) => Ok(()),
                    None => Err(TransportError::Protocol("end of an unknown get")),
                }
            }
            _ => Err(TransportError::Protocol("unknown frame kind")),
        }
    }

    fn on_msg(&self, p: &Arc<Peer>, total: u64, off: u64, body: &[u8]) -> Result<()> {
        if total > p.max_message as u64 || total > self.cfg.max_message as u64 {
            return Err(TransportError::Protocol("message too long"));
        }
        let blen = body.len() as u64;
        let mut rx = lock(&p.rx);
        let data = if off == 0 {
            if rx.partial.is_some() {
                return Err(TransportError::Protocol("message fragment missing"));
            }
            if blen > total || (blen == 0 && total > 0) {
                return Err(TransportError::Protocol("bad message fragment"));
            }
            let n = p.unconsumed.fetch_add(1, Ordering::AcqRel) + 1;
            if n > p.window {
                return Err(TransportError::Protocol("credit window exceeded"));
            }
            if blen == total {
                body.to_vec()
            } else {
                let mut v = Vec::with_capacity(total as usize);
                v.extend_from_slice(body);
                rx.partial = Some((v, total));
                return Ok(());
            }
        } else {
            let Some((buf, t)) = rx.partial.as_mut() else {
                return Err(TransportError::Protocol("fragment without a start"));
            };
            if *t != total
                || buf.len() as u64 != off
                || blen == 0
                || off.checked_add(blen).is_none_or(|e| e > total)
            {
                return Err(TransportError::Protocol("bad message fragment"));
            }
            buf.extend_from_slice(body);
            if (buf.len() as u64) < total {
                return Ok(());
            }
            match rx.partial.take() {
                Some((v, _)) => v,
                None => return Ok(()),
            }
        };
        drop(rx);
        self.push_event(Event::Message { peer: p.id, data }, Some(p.clone()));
        Ok(())
    }

    // ---- progress thread ------------------------------------------------------------------

    /// Reads and handles the completions waiting now (at most `buf.len()`, plus one error
    /// completion). The caller holds `poll_lock`, so completions are handled in CQ order.
    fn poll_once(&self, buf: &mut [sys::Cqe]) -> usize {
        if self.torn_down.load(Ordering::Acquire) {
            return 0;
        }
        let n = self.ep.cq_read(buf);
        if n > 0 {
            self.last_cq
                .store(self.epoch.elapsed().as_micros() as u64, Ordering::Relaxed);
            for e in &buf[..n as usize] {
                self.on_cqe(e);
            }
            return n as usize;
        }
        if n == -sys::FI_EAVAIL {
            if let Some(e) = self.ep.cq_readerr() {
                self.on_cq_err(&e);
            }
            return 1;
        }
        if n < 0 && !self.cq_warned.swap(true, Ordering::Relaxed) {
            eprintln!(
                "dragon-transport: ofi: fi_cq_read: {}",
                sys::strerror(n as i64)
            );
        }
        0
    }

    /// Marks this thread as polling the CQ from the application side (the progress thread
    /// stays out of the way) until the guard drops.
    fn app_poll(&self) -> AppPoll<'_> {
        self.app_polling.fetch_add(1, Ordering::AcqRel);
        AppPoll(self)
    }

    /// A completion whose `wait` polls the CQ itself for a while before it parks.
    fn completion(self: &Arc<Self>) -> Completion {
        let w = Arc::downgrade(self);
        Completion::with_poller(Arc::new(move || match w.upgrade() {
            Some(i) if !i.closed.load(Ordering::Acquire) => {
                let _p = i.app_poll();
                i.try_poll()
            }
            _ => 0,
        }))
    }

    /// Polls the CQ if no other thread does (for threads waiting for an event).
    fn try_poll(&self) -> usize {
        match self.poll_lock.try_lock() {
            Ok(_g) => {
                let mut buf = [sys::Cqe::default(); 16];
                let n = self.poll_once(&mut buf);
                // The progress thread stays away while we poll: retry refused posts too.
                if self.backlogged.load(Ordering::SeqCst) && !self.torn_down.load(Ordering::Acquire)
                {
                    self.drain_backlog();
                }
                n
            }
            Err(_) => 0,
        }
    }

    /// The progress thread: reads the CQ (the tcp and shm providers move RMA data only while
    /// the target reads its CQ), retries refused posts, sends heartbeats. When idle it
    /// blocks in `poll()` on the CQ's wait descriptor, or (providers without one) sleeps in
    /// steps that grow with idleness, up to 1 ms.
    fn progress_loop(self: Arc<Self>) {
        let mut buf = [sys::Cqe::default(); 32];
        let hb = self.cfg.heartbeat.max(Duration::from_millis(1));
        let mut next_hb = Instant::now() + hb;
        while !self.closed.load(Ordering::Acquire) {
            // A thread waiting in recv() is reading the CQ: leave it the CPU and the lock.
            let n = if self.app_polling.load(Ordering::Acquire) > 0 {
                let g = lock(&self.gate);
                self.gate_waiting.store(true, Ordering::SeqCst);
                if self.app_polling.load(Ordering::SeqCst) > 0 {
                    let _ = self.gate_cv.wait_timeout(g, Duration::from_millis(5));
                }
                self.gate_waiting.store(false, Ordering::SeqCst);
                0
            } else {
                let _g = lock(&self.poll_lock);
                self.poll_once(&mut buf)
            };
            if self.backlogged.load(Ordering::SeqCst) {
                // Under poll_lock: transfers it starts may finish here, and their events must
                // not race with those of completion handlers.
                let _g = lock(&self.poll_lock);
                self.drain_backlog();
            }
            let now = Instant::now();
            if now >= next_hb {
                self.heartbeats();
                next_hb = now + hb;
            }
            if n > 0 || self.backlogged.load(Ordering::SeqCst) {
                continue;
            }
            // Completions handled by any thread count as activity.
            let idle = Duration::from_micros(
                (self.epoch.elapsed().as_micros() as u64)
                    .saturating_sub(self.last_cq.load(Ordering::Relaxed)),
            );
            let busy = self.inflight.load(Ordering::Acquire) > 0 && {
                let posted = self.last_post.load(Ordering::Relaxed);
                let since_post = (self.epoch.elapsed().as_micros() as u64).saturating_sub(posted);
                idle.min(Duration::from_micros(since_post)) < BUSY_SPIN
            };
            if idle < PROGRESS_SPIN || busy {
                std::thread::yield_now();
                continue;
            }
            match self.ep.attrs.wait_fd {
                Some(fd) => {
                    if !self.ep.trywait() {
                        continue;
                    }
                    let ms = next_hb
                        .saturating_duration_since(now)
                        .as_millis()
                        .clamp(1, 100) as i32;
                    self.sleeping.store(true, Ordering::SeqCst);
                    // A waker that saw `sleeping` false did not signal: look again first.
                    if !self.backlogged.load(Ordering::SeqCst)
                        && !self.closed.load(Ordering::SeqCst)
                    {
                        let mut p = libc::pollfd {
                            fd,
                            events: libc::POLLIN,
                            revents: 0,
                        };
                        // SAFETY: `p` is one valid pollfd; the descriptor belongs to the CQ,
                        // which stays open until teardown, after this thread has ended.
                        unsafe { libc::poll(&mut p, 1, ms) };
                    }
                    self.sleeping.store(false, Ordering::SeqCst);
                }
                None => {
                    let us = (idle.as_micros() / 20).clamp(10, 1000) as u64;
                    std::thread::sleep(Duration::from_micros(us));
                }
            }
        }
    }

    fn heartbeats(&self) {
        let ps: Vec<Arc<Peer>> = lock(&self.peers)
            .values()
            .filter(|p| !p.lost.load(Ordering::Acquire))
            .cloned()
            .collect();
        let h = side::header(side::HEARTBEAT, 0);
        for p in ps {
            // SAFETY: the descriptor belongs to `p.side`, open while we hold the Arc; the
            // buffer has h.len() readable bytes. MSG_DONTWAIT: never blocks the progress
            // thread (a peer that does not drain its socket is lost by its own timeout).
            unsafe {
                libc::send(
                    p.side.as_raw_fd(),
                    h.as_ptr().cast(),
                    h.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
        }
    }

    // ---- side channel -----------------------------------------------------------------------

    fn listen_loop(self: Arc<Self>) {
        loop {
            let r = self.listener.accept();
            if self.closed.load(Ordering::Acquire) {
                return;
            }
            match r {
                Ok((s, _)) => self.spawn("dt-ofi-auth", move |me| me.accept_one(s)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    fn my_hello(&self, token: u64) -> side::Hello {
        side::Hello {
            provider: self.ep.attrs.prov.clone(),
            addr: self.my_addr.clone(),
            base: self.pool_base,
            len: self.pool_len,
            key: self.pool_key,
            token,
            max_message: self.cfg.max_message as u64,
            queue_depth: self.cfg.queue_depth as u64,
        }
    }

    /// A peer from its (authenticated) hello: its address goes into the AV.
    fn make_peer(
        &self,
        id: NodeId,
        h: &side::Hello,
        rx_token: u64,
        side: TcpStream,
    ) -> Result<Arc<Peer>> {
        if h.provider != self.ep.attrs.prov {
            return Err(TransportError::Protocol("peer uses another provider"));
        }
        let fi_addr = {
            let st = lock(&self.st);
            if st.dead {
                return Err(TransportError::Closed);
            }
            self.ep
                .av_insert(&h.addr)
                .map_err(|_| TransportError::Protocol("bad fabric address"))?
        };
        // Both sides use the smaller window, so credit batches and checks agree.
        let window = h.queue_depth.min(self.cfg.queue_depth as u64);
        Ok(Arc::new(Peer {
            id,
            fi_addr,
            tx_token: h.token,
            rx_token,
            region: Region {
                base: h.base,
                len: h.len,
                key: h.key,
            },
            max_message: (h.max_message.min(usize::MAX as u64) as usize).min(self.cfg.max_message),
            window,
            side,
            lost: AtomicBool::new(false),
            credits: Mutex::new(window),
            credit_cv: Condvar::new(),
            consumed: AtomicU64::new(0),
            unconsumed: AtomicU64::new(0),
            tx_seq: AtomicU64::new(0),
            rx: Mutex::new(RxState::default()),
            puts: Mutex::new(VecDeque::new()),
            pending: Mutex::new(Counted::new(&self.inflight)),
            exposed: Mutex::new(Counted::new(&self.inflight)),
        }))
    }

    fn register_token(&self, p: &Arc<Peer>) {
        lock(&self.tokens).insert(p.rx_token, p.clone());
    }

    fn forget_token(&self, p: &Arc<Peer>) {
        let mut t = lock(&self.tokens);
        if t.get(&p.rx_token).is_some_and(|x| Arc::ptr_eq(x, p)) {
            t.remove(&p.rx_token);
        }
    }

    /// Makes `p` the peer of its node and starts its side-channel reader.
    fn install(self: &Arc<Self>, p: Arc<Peer>, reader: TcpStream) -> Result<()> {
        reader.set_read_timeout(Some(self.cfg.peer_timeout))?;
        let mut peers = lock(&self.peers);
        let dup = peers
            .get(&p.id)
            .is_some_and(|old| !old.lost.load(Ordering::Acquire));
        if self.closed.load(Ordering::Acquire) || dup {
            drop(peers);
            self.forget_token(&p);
            let _ = p.side.shutdown(Shutdown::Both);
            return Err(if dup {
                TransportError::Protocol("duplicate connection")
            } else {
                TransportError::Closed
            });
        }
        peers.insert(p.id, p.clone());
        self.spawn("dt-ofi-side", move |me| me.side_loop(p, reader));
        drop(peers);
        self.peers_cv.notify_all();
        Ok(())
    }

    fn side_loop(self: Arc<Self>, p: Arc<Peer>, mut s: TcpStream) {
        while let Ok((side::HEARTBEAT, 0)) = side::read_header(&mut s, 0) {}
        self.lose(&p);
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
        let mut ds = crate::tcp::DeadlineStream {
            s: &s,
            deadline: Instant::now() + self.cfg.handshake_timeout,
        };
        let r = (|| -> Result<()> {
            let client = auth::server_handshake(&mut ds, &self.cfg.secret, self.cfg.node)?;
            if client == self.cfg.node || common::is_live(&self.peers, client) {
                return Err(TransportError::Protocol("unexpected node id"));
            }
            let theirs = side::read_hello(&mut ds)?;
            let rx_token = random_nonzero();
            let p = self.make_peer(client, &theirs, rx_token, s.try_clone()?)?;
            // From here on the dialer's fabric messages are accepted: it sends only after it
            // has our hello, which follows.
            self.register_token(&p);
            lock(&self.joining).insert(client);
            let r = side::write_frame(&mut ds, side::HELLO, &self.my_hello(rx_token).encode())
                .and_then(|()| side::read_ready(&mut ds))
                .and_then(|()| Ok(s.try_clone()?))
                .and_then(|reader| self.install(p.clone(), reader));
            if r.is_err() {
                self.forget_token(&p);
            }
            lock(&self.joining).remove(&client);
            drop(lock(&self.peers));
            self.peers_cv.notify_all();
            r
        })();
        lock(&self.handshaking).remove(&id);
        if r.is_err() {
            self.auth_failures.fetch_add(1, Ordering::Relaxed);
            let _ = s.shutdown(Shutdown::Both);
        }
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
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e.into()),
            }
        };
        s.set_nodelay(true)?;
        let mut ds = crate::tcp::DeadlineStream {
            s: &s,
            deadline: deadline.min(Instant::now() + self.cfg.handshake_timeout),
        };
        let got = auth::client_handshake(&mut ds, &self.cfg.secret, self.cfg.node, Some(p.node))?;
        let rx_token = random_nonzero();
        side::write_frame(&mut ds, side::HELLO, &self.my_hello(rx_token).encode())?;
        let theirs = side::read_hello(&mut ds)?;
        let peer = self.make_peer(got, &theirs, rx_token, s.try_clone()?)?;
        self.register_token(&peer);
        if let Err(e) = self.install(peer.clone(), s.try_clone()?) {
            self.forget_token(&peer);
            return Err(e);
        }
        if let Err(e) = side::write_frame(&mut ds, side::READY, &[]) {
            self.lose(&peer);
            return Err(e);
        }
        Ok(())
    }

    /// The peer `id`. A peer still joining (its frames may already have arrived: the dialer
    /// starts sending as soon as it has our hello, and its `READY` comes on another channel)
    /// is waited for, up to the handshake timeout.
    fn peer(&self, id: NodeId) -> Result<Arc<Peer>> {
        let deadline = Instant::now() + self.cfg.handshake_timeout;
        let mut g = lock(&self.peers);
        loop {
            if self.closed.load(Ordering::Acquire) {
                return Err(TransportError::Closed);
            }
            if let Some(p) = g.get(&id) {
                return Ok(p.clone());
            }
            if !lock(&self.joining).contains(&id) {
                return Err(TransportError::UnknownPeer);
            }
            g = wait_until(&self.peers_cv, g, Some(deadline))
                .map_err(|_| TransportError::UnknownPeer)?;
        }
    }

    fn lost_err(&self) -> TransportError {
        if self.closed.load(Ordering::Acquire) {
            TransportError::Closed
        } else {
            TransportError::PeerLost
        }
    }

    /// Turns peer `p` down and fails everything pending towards it.
    fn lose(&self, p: &Arc<Peer>) {
        if p.lost.swap(true, Ordering::AcqRel) {
            return;
        }
        debug(&format!("{}: lost {}", self.cfg.node, p.id));
        let _ = p.side.shutdown(Shutdown::Both);
        self.forget_token(p);
        drop(lock(&p.credits));
        p.credit_cv.notify_all();
        let err = self.lost_err();
        let pend: Vec<Pending> = lock(&p.pending).take_all();
        for x in pend {
            match x {
                Pending::Put { done, .. } | Pending::Get { done, .. } => done.complete(Err(err)),
            }
        }
        drop(lock(&p.exposed).take_all());
        lock(&p.puts).clear();
        {
            let mut rx = lock(&p.rx);
            rx.partial = None;
            rx.held.clear();
        }
        {
            let mut st = lock(&self.st);
            for xf in st.xfers.values() {
                if let (true, XferKind::GetInit { done, .. }) = (Arc::ptr_eq(&xf.peer, p), &xf.kind)
                {
                    done.complete(Err(err));
                }
            }
            st.backlog.retain(|x| match x {
                Post::Send { peer, .. } => !Arc::ptr_eq(peer, p),
                Post::Recv { .. } => true,
            });
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
        self.ep.cq_signal();
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
        self.teardown();
        lock(&self.inbox).clear();
        self.queued.store(0, Ordering::Release);
    }

    /// Closes the endpoint and the regions. Afterwards the provider touches none of our
    /// memory, so held blocks and slabs may go.
    fn teardown(&self) {
        // Readers of the CQ hold poll_lock: none is inside libfabric after this.
        let _p = lock(&self.poll_lock);
        if self.torn_down.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut st = lock(&self.st);
        st.dead = true;
        self.ep.close_ep();
        drop(st.xfers.take_all());
        st.backlog.clear();
        st.actions.clear();
        st.rma_wait.clear();
        for t in st.tx_peer.iter_mut() {
            *t = None;
        }
        drop(st);
        if let Some(r) = lock(&self.regions).take() {
            r.pool.close();
            r.tx.close();
            r.rx.close();
        }
    }

    // ---- messages ---------------------------------------------------------------------------

    fn send_msg(&self, peer: NodeId, msg: &[u8], wait: Option<Option<Instant>>) -> Result<()> {
        if msg.len() > self.cfg.max_message {
            return Err(TransportError::TooLarge);
        }
        let p = self.peer(peer)?;
        if msg.len() > p.max_message {
            return Err(TransportError::TooLarge);
        }
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
        let r = {
            let mut st = lock(&self.st);
            if p.lost.load(Ordering::Acquire) {
                return Err(self.lost_err());
            }
            let total = msg.len();
            let frag = SLOT - FRAME_HDR;
            let mut off = 0;
            loop {
                let n = (total - off).min(frag);
                let h = frame_header(p.tx_token, kind::MSG, n, total as u64, off as u64, 0);
                if let Err(e) = self.post(&mut st, &p, h, &msg[off..off + n]) {
                    break Err(e);
                }
                off += n;
                if off >= total {
                    break Ok(());
                }
            }
        };
        match r {
            Err(TransportError::PeerLost) => {
                self.lose(&p);
                Err(self.lost_err())
            }
            r => r,
        }
    }

    /// Our application took a message of `p`: return credit in batches.
    fn consumed(&self, p: &Arc<Peer>) {
        p.unconsumed.fetch_sub(1, Ordering::AcqRel);
        let batch = (p.window / 4).max(1);
        let c = p.consumed.fetch_add(1, Ordering::AcqRel) + 1;
        if c >= batch
            && p.consumed
                .compare_exchange(c, 0, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            && !p.lost.load(Ordering::Acquire)
        {
            self.ctl(p, kind::CREDIT, c, 0, &[]);
        }
    }

    /// Posts the request frame of the pending operation `op`; on failure forgets `op` (and
    /// loses the peer when the failure says it is gone).
    fn post_request(&self, p: &Arc<Peer>, op: u64, h: [u8; FRAME_HDR], body: &[u8]) -> Result<()> {
        let r = {
            let mut st = lock(&self.st);
            self.post(&mut st, p, h, body)
        };
        if let Err(e) = r {
            lock(&p.pending).remove(&op);
            if e == TransportError::PeerLost {
                self.lose(p);
                return Err(self.lost_err());
            }
            return Err(e);
        }
        Ok(())
    }

    fn push_event(&self, ev: Event, p: Option<Arc<Peer>>) {
        let mut g = lock(&self.inbox);
        g.push_back((ev, p));
        self.queued.fetch_add(1, Ordering::AcqRel);
        drop(g);
        self.inbox_cv.notify_one();
    }
}

impl Transport for OfiTransport {
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
        let hold = src.try_clone().map_err(|_| TransportError::BadRef)?;
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
        if len > dst.len() || len as u64 > src.len || dst.pool().name() != inner.cfg.pool.name() {
            return Err(TransportError::BadRef);
        }
        let p = inner.peer(peer)?;
        let done = inner.completion();
        if len == 0 {
            done.complete(Ok(()));
            return Ok(done);
        }
        let hold = dst.try_clone().map_err(|_| TransportError::BadRef)?;
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
