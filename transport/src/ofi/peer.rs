//! What this node keeps per connected peer: its region, the operations waiting for it, the
//! puts being served for it and the reassembly of its frames.

use std::collections::VecDeque;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};

use dragon_shm::heap::{Block, BlockRef};

use super::state::Counted;
use crate::common::{self, lock};
use crate::{Completion, NodeId, Result, TransportError};

/// A peer's registered pool region, as it told us.
#[derive(Debug, Clone, Copy)]
pub(super) struct Region {
    pub(super) base: u64,
    pub(super) len: u64,
    pub(super) key: u64,
}

impl Region {
    /// Remote address of `[off, off + len)`, if that range lies inside the region.
    pub(super) fn addr(&self, off: u64, len: u64) -> Option<u64> {
        let end = off.checked_add(len)?;
        (end <= self.len).then(|| self.base.wrapping_add(off))
    }
}

/// An operation this node started, waiting for the peer.
pub(super) enum Pending {
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
pub(super) fn take_put(p: &Peer, op: u64) -> Result<Completion> {
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
pub(super) fn take_get(p: &Peer, op: u64) -> Result<(Completion, Block, u64)> {
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
pub(super) struct PutSlot {
    pub(super) op: u64,
    /// `None` while the bytes are moving.
    pub(super) outcome: Option<std::result::Result<(BlockRef, u64, u64), u64>>,
}

/// Receive side of a peer (touched only by completion handlers, which `poll_lock`
/// serializes).
#[derive(Default)]
pub(super) struct RxState {
    /// Sequence number of the next frame to handle.
    pub(super) next: u64,
    /// Frames that came early, by sequence number.
    pub(super) held: std::collections::BTreeMap<u64, Vec<u8>>,
    /// A message being reassembled: bytes so far and total length.
    pub(super) partial: Option<(Vec<u8>, u64)>,
}

impl common::PeerState for Peer {
    fn node(&self) -> NodeId {
        self.id
    }
    fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }
}

pub(super) struct Peer {
    pub(super) id: NodeId,
    pub(super) fi_addr: u64,
    /// Token we put into frames to this peer.
    pub(super) tx_token: u64,
    /// Token this peer puts into frames to us.
    pub(super) rx_token: u64,
    pub(super) region: Region,
    /// Longest message either side accepts.
    pub(super) max_message: usize,
    /// Credit window of this pair: the smaller of the two `queue_depth`s.
    pub(super) window: u64,
    /// Side channel (shutdown, heartbeats).
    pub(super) side: TcpStream,
    pub(super) lost: AtomicBool,
    pub(super) credits: Mutex<u64>,
    pub(super) credit_cv: Condvar,
    /// Messages of this peer taken by our application, not yet credited back.
    pub(super) consumed: AtomicU64,
    /// Messages of this peer in our inbox.
    pub(super) unconsumed: AtomicU64,
    /// Sequence number of our next message (assigned under the state lock).
    pub(super) tx_seq: AtomicU64,
    pub(super) rx: Mutex<RxState>,
    pub(super) puts: Mutex<VecDeque<PutSlot>>,
    pub(super) pending: Mutex<Counted<Pending>>,
    /// Our blocks this peer is reading (get sources), by its op id.
    pub(super) exposed: Mutex<Counted<Block>>,
}
