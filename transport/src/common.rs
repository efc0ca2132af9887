//! Pieces both back ends share: poison-tolerant locking, deadline waits, connecting, and the
//! peer table's "wait until connected" and "who is live" queries.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::{NodeId, PeerAddr, Result, TransportError};

/// Locks `m`, ignoring poisoning (a panicked holder leaves plain data behind).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Waits on `cv` until notified or `deadline` (`None`: no deadline); `Err` with the guard
/// back when the deadline has passed.
pub(crate) fn wait_until<'a, T>(
    cv: &Condvar,
    g: MutexGuard<'a, T>,
    deadline: Option<Instant>,
) -> std::result::Result<MutexGuard<'a, T>, MutexGuard<'a, T>> {
    match deadline {
        None => Ok(cv.wait(g).unwrap_or_else(|e| e.into_inner())),
        Some(d) => {
            let now = Instant::now();
            if now >= d {
                return Err(g);
            }
            Ok(cv
                .wait_timeout(g, d - now)
                .unwrap_or_else(|e| e.into_inner())
                .0)
        }
    }
}

/// A connected peer as the peer table sees it.
pub(crate) trait PeerState {
    /// The peer's node id.
    fn node(&self) -> NodeId;
    /// Whether the connection was lost.
    fn is_lost(&self) -> bool;
}

/// A back end's peer table: node id -> peer, with a condition variable signalled on changes.
pub(crate) type PeerTable<P> = Mutex<HashMap<NodeId, Arc<P>>>;

/// Records pending operation `op` of a peer unless the peer is `lost`: checked under the
/// lock of `pending`, which a back end drains (failing every op) after setting `lost`, so
/// an op recorded here is always answered or failed. False when the peer is lost.
pub(crate) fn add_pending<V, M: OpTable<V>>(
    pending: &Mutex<M>,
    lost: &AtomicBool,
    op: u64,
    v: V,
) -> bool {
    let mut g = lock(pending);
    if lost.load(Ordering::Acquire) {
        return false;
    }
    g.insert_op(op, v);
    true
}

/// A table of pending operations keyed by operation id.
pub(crate) trait OpTable<V> {
    /// Records `v` as operation `op`.
    fn insert_op(&mut self, op: u64, v: V);
}

impl<V> OpTable<V> for HashMap<u64, V> {
    fn insert_op(&mut self, op: u64, v: V) {
        self.insert(op, v);
    }
}

/// Whether `peers` has a live entry for node `id`.
pub(crate) fn is_live<P: PeerState>(peers: &PeerTable<P>, id: NodeId) -> bool {
    lock(peers).get(&id).is_some_and(|p| !p.is_lost())
}

/// `Transport::connect` of both back ends: this node dials every peer of `want` with a
/// higher node id that is not live yet (so each pair connects once, from its lower id),
/// then waits until every peer of `want` is connected, within `timeout`.
pub(crate) fn connect<P: PeerState>(
    peers: &PeerTable<P>,
    changed: &Condvar,
    closed: &AtomicBool,
    me: NodeId,
    want: &[PeerAddr],
    timeout: Duration,
    dial: impl Fn(&PeerAddr, Instant) -> Result<()>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    for p in want {
        if closed.load(Ordering::Acquire) {
            return Err(TransportError::Closed);
        }
        if me < p.node && !is_live(peers, p.node) {
            dial(p, deadline)?;
        }
    }
    wait_connected(peers, changed, closed, me, want, deadline)
}

/// Waits until every node of `want` other than `me` has a live entry in `peers`.
pub(crate) fn wait_connected<P: PeerState>(
    peers: &PeerTable<P>,
    changed: &Condvar,
    closed: &AtomicBool,
    me: NodeId,
    want: &[PeerAddr],
    deadline: Instant,
) -> Result<()> {
    let mut g = lock(peers);
    loop {
        if closed.load(Ordering::Acquire) {
            return Err(TransportError::Closed);
        }
        let all = want
            .iter()
            .all(|p| p.node == me || g.get(&p.node).is_some_and(|x| !x.is_lost()));
        if all {
            return Ok(());
        }
        g = wait_until(changed, g, Some(deadline)).map_err(|_| TransportError::TimedOut)?;
    }
}

/// The node ids of live peers, sorted.
pub(crate) fn live_peers<P: PeerState>(peers: &PeerTable<P>) -> Vec<NodeId> {
    let mut v: Vec<NodeId> = lock(peers)
        .values()
        .filter(|p| !p.is_lost())
        .map(|p| p.node())
        .collect();
    v.sort();
    v
}

/// Keeps `h` among a transport's threads (joined on close), first joining the ones that have
/// finished: a thread's stack stays mapped until it is joined, so keeping every handle of a
/// connection's threads (one per incoming connection, two per peer) until close made a
/// transport that sees many connections run out of mappings (found by the TCP reader fuzz
/// target, after ~15 000 connections).
pub(crate) fn keep_thread(
    threads: &std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>,
    h: std::thread::JoinHandle<()>,
) {
    let mut ts = lock(threads);
    let (done, live): (Vec<_>, Vec<_>) = std::mem::take(&mut *ts)
        .into_iter()
        .partition(|t| t.is_finished());
    *ts = live;
    ts.push(h);
    drop(ts);
    for t in done {
        // Finished: returns at once.
        let _ = t.join();
    }
}
