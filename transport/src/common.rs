//! Pieces both back ends share: poison-tolerant locking, deadline waits, and the peer table's
//! "wait until connected" and "who is live" queries.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

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
