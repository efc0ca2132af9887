//! The endpoint's shared state: [`Inner`] (everything the threads share), the fabric state
//! under one lock ([`State`]: slots, backlog, transfers) and [`Counted`], the operation tables
//! that keep the in-flight total the progress thread watches.

use std::collections::{HashMap, VecDeque};
use std::ffi::c_void;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use dragon_shm::heap::{Block, BlockRef};

use super::mr::{Regions, Slab};
use super::peer::Peer;
use super::{sys, CTX, RMA_SLOTS, RX_SLOTS, TX_SLOTS};
use crate::common;
use crate::{Completion, Config, Event, NodeId};

/// Operations keyed by id that count themselves into the endpoint's `inflight` total: while
/// anything is in flight the progress thread keeps polling instead of sleeping (the providers
/// move RMA data only while both sides read their CQ).
pub(super) struct Counted<V> {
    pub(super) map: HashMap<u64, V>,
    pub(super) total: Arc<AtomicI64>,
}

impl<V> common::OpTable<V> for Counted<V> {
    fn insert_op(&mut self, op: u64, v: V) {
        self.insert(op, v);
    }
}

impl<V> Counted<V> {
    pub(super) fn new(total: &Arc<AtomicI64>) -> Self {
        Counted {
            map: HashMap::new(),
            total: total.clone(),
        }
    }
    pub(super) fn insert(&mut self, k: u64, v: V) {
        if self.map.insert(k, v).is_none() {
            self.total.fetch_add(1, Ordering::AcqRel);
        }
    }
    pub(super) fn remove(&mut self, k: &u64) -> Option<V> {
        let r = self.map.remove(k);
        if r.is_some() {
            self.total.fetch_sub(1, Ordering::AcqRel);
        }
        r
    }
    pub(super) fn take_all(&mut self) -> Vec<V> {
        self.total
            .fetch_sub(self.map.len() as i64, Ordering::AcqRel);
        self.map.drain().map(|(_, v)| v).collect()
    }
    pub(super) fn len(&self) -> usize {
        self.map.len()
    }
    pub(super) fn contains_key(&self, k: &u64) -> bool {
        self.map.contains_key(k)
    }
    pub(super) fn get(&self, k: &u64) -> Option<&V> {
        self.map.get(k)
    }
    pub(super) fn get_mut(&mut self, k: &u64) -> Option<&mut V> {
        self.map.get_mut(k)
    }
    pub(super) fn values(&self) -> impl Iterator<Item = &V> {
        self.map.values()
    }
}

impl<V> Drop for Counted<V> {
    fn drop(&mut self) {
        self.total
            .fetch_sub(self.map.len() as i64, Ordering::AcqRel);
    }
}

/// A post the provider refused for now, retried by the progress thread in order.
pub(super) enum Post {
    Send { peer: Arc<Peer>, frame: Vec<u8> },
    Recv { slot: usize },
}

pub(super) enum XferKind {
    /// We serve a peer's put: reading its block into ours.
    PutTarget { op: u64, tag: u64, dst: BlockRef },
    /// Our get: reading the peer's block into ours.
    GetInit { op: u64, done: Completion },
}

/// A block transfer this node drives with RMA reads.
pub(super) struct Xfer {
    pub(super) peer: Arc<Peer>,
    pub(super) kind: XferKind,
    /// The local block the reads write (held until they have all completed).
    pub(super) block: Block,
    pub(super) len: u64,
    pub(super) raddr: u64,
    pub(super) key: u64,
    pub(super) issued: u64,
    pub(super) outstanding: usize,
    pub(super) failed: bool,
}

/// Work left for after the state lock is released.
pub(super) enum Action {
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

pub(super) struct State {
    /// The endpoint is closed: nothing may be posted any more.
    pub(super) dead: bool,
    pub(super) backlog: VecDeque<Post>,
    pub(super) free_tx: Vec<usize>,
    /// Peer of each send slot in flight (a failed send loses it).
    pub(super) tx_peer: Vec<Option<Arc<Peer>>>,
    pub(super) free_rma: Vec<usize>,
    /// Transfer of each RMA slot in flight.
    pub(super) rma: Vec<Option<u64>>,
    pub(super) xfers: Counted<Xfer>,
    /// Transfers with reads still to issue, in order.
    pub(super) rma_wait: VecDeque<u64>,
    pub(super) next_xfer: u64,
    pub(super) actions: Vec<Action>,
}

pub(super) struct Inner {
    pub(super) cfg: Config,
    pub(super) ep: sys::Ep,
    pub(super) st: Mutex<State>,
    pub(super) regions: Mutex<Option<Regions>>,
    pub(super) pool_desc: usize,
    pub(super) tx_desc: usize,
    pub(super) rx_desc: usize,
    /// Our (registered) mapping of the pool segment.
    pub(super) pool_ptr: usize,
    pub(super) pool_len: u64,
    /// What peers use as the remote address of byte 0 of our segment.
    pub(super) pool_base: u64,
    pub(super) pool_key: u64,
    pub(super) tx_slab: Slab,
    pub(super) rx_slab: Slab,
    pub(super) ctxs: Slab,
    pub(super) my_addr: Vec<u8>,
    pub(super) listener: TcpListener,
    pub(super) addr: SocketAddr,
    pub(super) closed: AtomicBool,
    pub(super) torn_down: AtomicBool,
    pub(super) peers: Mutex<HashMap<NodeId, Arc<Peer>>>,
    pub(super) peers_cv: Condvar,
    /// Authenticated peers by the token their frames carry.
    pub(super) tokens: Mutex<HashMap<u64, Arc<Peer>>>,
    /// Nodes whose side-channel exchange is under way on the accepting side.
    pub(super) joining: Mutex<std::collections::HashSet<NodeId>>,
    pub(super) inbox: Mutex<VecDeque<(Event, Option<Arc<Peer>>)>>,
    pub(super) inbox_cv: Condvar,
    /// Events in `inbox` (read without its lock by spinning receivers).
    pub(super) queued: AtomicU64,
    pub(super) next_op: AtomicU64,
    pub(super) threads: Mutex<Vec<JoinHandle<()>>>,
    pub(super) handshaking: Mutex<HashMap<u64, TcpStream>>,
    pub(super) next_hs: AtomicU64,
    pub(super) auth_failures: AtomicU64,
    pub(super) rejected: AtomicU64,
    /// Microseconds since `epoch` of the last post (see `BUSY_SPIN`).
    pub(super) last_post: AtomicU64,
    /// Microseconds since `epoch` of the last completion read (by any thread).
    pub(super) last_cq: AtomicU64,
    /// Microseconds since `epoch` of the last event `recv` returned.
    pub(super) last_event: AtomicU64,
    pub(super) epoch: Instant,
    /// Serializes readers of the CQ (the progress thread and threads waiting in `recv`),
    /// so that completions are handled in order.
    pub(super) poll_lock: Mutex<()>,
    /// Threads polling the CQ from `recv` right now.
    pub(super) app_polling: AtomicU64,
    /// The progress thread waits here while `app_polling` is nonzero.
    pub(super) gate: Mutex<()>,
    pub(super) gate_cv: Condvar,
    /// The progress thread is (about to be) waiting on `gate_cv`.
    pub(super) gate_waiting: AtomicBool,
    /// Operations in flight (pending, exposed, transfers: see [`Counted`]; and sends).
    pub(super) inflight: Arc<AtomicI64>,
    pub(super) cq_warned: AtomicBool,
    /// The progress thread is (about to be) blocked in `poll()` on the CQ's descriptor.
    pub(super) sleeping: AtomicBool,
    /// Posts wait in the backlog (or reads for RMA slots): the progress thread keeps polling.
    pub(super) backlogged: AtomicBool,
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

impl Inner {
    pub(super) fn spawn(self: &Arc<Self>, name: &str, f: impl FnOnce(Arc<Inner>) + Send + 'static) {
        let me = self.clone();
        if let Ok(h) = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || f(me))
        {
            crate::common::keep_thread(&self.threads, h);
        }
    }

    pub(super) fn ctx(&self, i: usize) -> *mut c_void {
        self.ctxs.at(i * CTX).cast()
    }

    pub(super) fn ctx_index(&self, p: *mut c_void) -> Option<usize> {
        let off = (p as usize).checked_sub(self.ctxs.ptr as usize)?;
        let i = off / CTX;
        (off % CTX == 0 && i < RX_SLOTS + TX_SLOTS + RMA_SLOTS).then_some(i)
    }

    pub(super) fn wake_progress(&self) {
        if self.sleeping.load(Ordering::SeqCst) {
            self.ep.cq_signal();
        }
    }

    /// Releases the state lock, then runs the actions queued under it.
    pub(super) fn release(&self, mut st: MutexGuard<'_, State>) {
        let acts = std::mem::take(&mut st.actions);
        drop(st);
        for a in acts {
            self.run(a);
        }
    }
}
