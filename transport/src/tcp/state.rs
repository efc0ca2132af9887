//! What the `tcp` back end keeps: [`Inner`] (everything its threads share), per peer [`Peer`]
//! (socket, outgoing queue, credits, pending operations) and the block transfers in both
//! directions ([`Bulk`] out, [`InBulk`] in).

use std::collections::{HashMap, VecDeque};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use dragon_shm::heap::{Block, BlockRef};

use crate::common::{self, lock};
use crate::wire::{Header, HEADER_LEN};
use crate::{Completion, Config, Event, NodeId, Result, TransportError};

/// A block transfer the writer streams.
pub(super) enum Bulk {
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
pub(super) struct Cur {
    pub(super) bulk: Bulk,
    pub(super) sent: u64,
    pub(super) begun: bool,
}

#[derive(Default)]
pub(super) struct OutQ {
    pub(super) small: VecDeque<Vec<u8>>,
    pub(super) bulk: VecDeque<Bulk>,
    pub(super) closed: bool,
}

/// An operation this node started, waiting for the peer.
pub(super) enum Pending {
    Put(Completion),
    Get {
        done: Completion,
        dst: Block,
        len: u64,
    },
}

/// A transfer the reader is receiving.
pub(super) enum InBulk {
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

pub(super) struct Peer {
    pub(super) id: NodeId,
    /// A handle used only to shut the connection down.
    pub(super) ctl: TcpStream,
    /// The write side; whoever holds it writes whole frames.
    pub(super) sock: Mutex<TcpStream>,
    pub(super) q: Mutex<OutQ>,
    pub(super) q_cv: Condvar,
    /// Messages we may still send.
    pub(super) credits: Mutex<u64>,
    pub(super) credit_cv: Condvar,
    pub(super) lost: AtomicBool,
    pub(super) pending: Mutex<HashMap<u64, Pending>>,
    /// Milliseconds since `Inner::epoch` of the last write.
    pub(super) last_tx: AtomicU64,
    /// Messages of this peer taken by our application, not yet credited back.
    pub(super) consumed: AtomicU64,
    /// Messages of this peer in our inbox.
    pub(super) unconsumed: AtomicU64,
}

impl Peer {
    /// Queues a frame for the writer thread.
    pub(super) fn queue(&self, hdr: Header, body: &[u8]) -> Result<()> {
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

pub(super) struct Inner {
    pub(super) cfg: Config,
    pub(super) addr: SocketAddr,
    pub(super) listener: TcpListener,
    pub(super) closed: AtomicBool,
    pub(super) peers: Mutex<HashMap<NodeId, Arc<Peer>>>,
    pub(super) peers_cv: Condvar,
    pub(super) inbox: Mutex<VecDeque<(Event, Option<Arc<Peer>>)>>,
    pub(super) inbox_cv: Condvar,
    /// Events in `inbox` (read without its lock by spinning receivers).
    pub(super) queued: AtomicU64,
    pub(super) next_op: AtomicU64,
    pub(super) threads: Mutex<Vec<JoinHandle<()>>>,
    pub(super) handshaking: Mutex<HashMap<u64, TcpStream>>,
    pub(super) next_hs: AtomicU64,
    pub(super) epoch: Instant,
    pub(super) auth_failures: AtomicU64,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpTransport")
            .field("node", &self.cfg.node)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Inner {
    pub(super) fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub(super) fn spawn(self: &Arc<Self>, name: &str, f: impl FnOnce(Arc<Inner>) + Send + 'static) {
        let me = self.clone();
        if let Ok(h) = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || f(me))
        {
            crate::common::keep_thread(&self.threads, h);
        }
    }
}
