//! Channels: a bounded MPMC ring of fixed-size slots, living either in a block of a pool
//! (the runtime's Queue rings: a process maps a constant number of segments) or in a
//! segment of its own (kind `chan`, inspectable with `dragon-shm show`).
//!
//! Small messages are copied into the slot (**inline**). Larger ones travel as a
//! [`BlockRef`] to a block of the channel's pool: the sender's hold on the block becomes an
//! in-flight (transit) hold when it is sent, and the receiver claims that hold, so ownership
//! moves and the payload is never copied on the node.
//!
//! # Layout (version [`CHANNEL_VERSION`]), offsets from the start of the channel region
//! (offset 128 of a `chan` segment, after its SegmentHeader; offset 0 of a pool block)
//! ```text
//! 0     ChannelHeader  (128 B): magic "DCHN", version, capacity, slot_size, stride,
//!                              pool_id, closed, wake_epoch, send/recv wait queues,
//!                              recovering (packed ProcessId of the recovery lock's holder)
//! 128   head cursor (u64, own 128-byte line)
//! 256   tail cursor (u64, own 128-byte line)
//! 384   intents[64], 16 bytes each: owner u64 (packed ProcessId, 0 free) | pos u64
//! 1408  slots[capacity], each `stride` bytes (multiple of 64):
//!         stamp u64 | kind u32 | len u32 | payload[slot_size]
//! ```
//! The ring protocol on `head`, `tail`, the stamps and the intents is documented in
//! [`crate::ring`].
//!
//! # Blocking
//! Senders sleep on `send_wq` (woken by each receive), receivers on `recv_wq` (woken by each
//! send), through [`WaitQueue`]: no syscall when nobody sleeps. `close` and `wake_all` wake
//! everyone. A blocked operation ends with [`ChannelError::Closed`] once the channel is
//! closed (receivers first drain what is left), or with [`ChannelError::PeerLost`] when an
//! owner called [`Channel::wake_all`] after noticing a dead peer.
//!
//! # Crash behaviour
//! Every send and receive announces itself in the intent table before it reserves a slot
//! and withdraws after its commit (`recover.rs`). A process killed between reserving and
//! committing leaves its position unpublished; a party that finds the ring stuck at such a
//! position for [`STUCK_GRACE`] checks the table, and when no live process may hold it,
//! publishes it: a dead sender's position becomes a hole that receivers skip, a dead
//! receiver's slot is freed for the next lap (its message went with it, as if received).
//! A block whose sender or receiver dies in the few instructions between handing over the
//! hold and committing the slot stays allocated until the pool is destroyed.
//!
//! # Where the code is
//! * `mod.rs` (this file): the public types ([`Channel`], [`ChannelError`], [`SendError`],
//!   [`Message`], [`ChannelStats`]), the shared-memory format (constants, `ChannelHeader`,
//!   `SlotHeader`), the handle's accessors, `close`/`wake_all`, and drop.
//! * `region.rs`: the channel region on its own: sizes ([`region_size`], [`segment_size`]),
//!   `init_region`, `validate`, and the figures ([`stats_of`] for any mapping).
//! * `open.rs`: making a handle: [`Channel::create`]/[`Channel::open`] for a `chan` segment,
//!   [`Channel::create_in`]/[`Channel::attach`] for a pool block.
//! * `send.rs`: sending inline copies and blocks ([`Channel::send`],
//!   [`Channel::send_block`] and their variants).
//! * `recv.rs`: the shared wait loop `attempt`, receiving ([`Channel::recv`] and its
//!   variants, [`Channel::recv_with`]), skipping holes, and [`Channel::drain`].
//! * `recover.rs`: announcing reservations in the intent table, and publishing positions
//!   that dead processes reserved.
//! * `tests.rs`: the unit tests (the multi-process ones are in the `dragon-tests` crate).

use std::sync::OnceLock;

use crate::error::SegmentError;
use crate::heap::{AllocError, Block, BlockRef, Pool};
use crate::name::{SegmentKind, SegmentName};
use crate::ring::{Ring, Ticket};
use crate::segment::Segment;
use crate::waitqueue::{WaitError, WaitQueue};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

mod open;
mod recover;
mod recv;
mod region;
mod send;

pub use recover::STUCK_GRACE;

use region::stats_at;
pub use region::{region_size, segment_size, stats_of};

/// First word of a channel header.
pub const CHANNEL_MAGIC: u32 = u32::from_le_bytes(*b"DCHN");
/// Channel layout version (2: the intent table and the recovery lock).
pub const CHANNEL_VERSION: u32 = 2;
/// Smallest payload area of a slot (a [`BlockRef`] must fit).
pub const MIN_SLOT_SIZE: usize = 32;
const CH_OFF: usize = 0;
const HEAD_OFF: usize = 128;
const TAIL_OFF: usize = 256;
const INTENT_OFF: usize = 384;
/// Entries of the intent table: parties between reserving and committing at once.
const INTENTS: usize = 64;
const SLOTS_OFF: usize = INTENT_OFF + INTENTS * std::mem::size_of::<crate::ring::Intent>();
const SLOT_HDR: usize = 16;
const KIND_INLINE: u32 = 1;
const KIND_BLOCK: u32 = 2;
const KIND_HOLE: u32 = 3;

/// The channel header at offset 128. All atomics; written before the segment is published.
#[repr(C)]
#[derive(Debug)]
struct ChannelHeader {
    magic: AtomicU32,
    version: AtomicU32,
    capacity: AtomicU64,
    slot_size: AtomicU64,
    stride: AtomicU64,
    pool_id: AtomicU64,
    closed: AtomicU32,
    wake_epoch: AtomicU32,
    send_wq: WaitQueue,
    recv_wq: WaitQueue,
    /// The packed `ProcessId` of the process publishing an abandoned position (0: none).
    recovering: AtomicU64,
    reserved: [AtomicU64; 7],
}

const _: () = assert!(std::mem::size_of::<ChannelHeader>() == 128);
const _: () = assert!(SLOTS_OFF == 1408 && SLOTS_OFF.is_multiple_of(64));

/// Slot header: the ring stamp, then what the payload holds.
#[repr(C)]
#[derive(Debug)]
struct SlotHeader {
    stamp: AtomicU64,
    kind: AtomicU32,
    len: AtomicU32,
}

/// Errors of channel operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChannelError {
    /// `try_send` found no free slot.
    #[error("channel is full")]
    Full,
    /// `try_recv` found no message.
    #[error("channel is empty")]
    Empty,
    /// The channel is closed (and, for receivers, drained).
    #[error("channel is closed")]
    Closed,
    /// A blocking operation ran out of time.
    #[error("timed out")]
    TimedOut,
    /// A signal arrived during an interruptible wait.
    #[error("interrupted by a signal")]
    Interrupted,
    /// An owner woke all waiters because a peer died ([`Channel::wake_all`]).
    #[error("a peer of the channel died")]
    PeerLost,
    /// The message needs a pool block but the channel has no pool, or is larger than the pool.
    #[error("message too large for this channel")]
    TooLarge,
    /// Allocating or claiming a block failed.
    #[error(transparent)]
    Alloc(AllocError),
    /// The segment failed a check.
    #[error(transparent)]
    Segment(#[from] SegmentError),
    /// A slot held something this build cannot read.
    #[error("channel slot failed a consistency check")]
    Corrupt,
}

impl From<AllocError> for ChannelError {
    fn from(e: AllocError) -> Self {
        match e {
            AllocError::TimedOut => ChannelError::TimedOut,
            AllocError::Interrupted => ChannelError::Interrupted,
            AllocError::TooLarge => ChannelError::TooLarge,
            e => ChannelError::Alloc(e),
        }
    }
}

impl From<WaitError> for ChannelError {
    fn from(e: WaitError) -> Self {
        match e {
            WaitError::TimedOut => ChannelError::TimedOut,
            WaitError::Interrupted => ChannelError::Interrupted,
        }
    }
}

/// A failed send that hands the value back.
#[derive(Debug)]
pub struct SendError<T> {
    /// Why it failed.
    pub error: ChannelError,
    /// The value that was not sent.
    pub value: T,
}

/// A received message.
#[derive(Debug)]
pub enum Message {
    /// A small message copied out of its slot.
    Inline(Vec<u8>),
    /// A large message: the block now held by this process.
    Block(Block),
}

impl Message {
    /// The payload bytes.
    pub fn bytes(&self) -> &[u8] {
        match self {
            Message::Inline(v) => v,
            Message::Block(b) => b.as_slice(),
        }
    }
}

/// Figures about a channel, readable from a read-only mapping while others use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelStats {
    /// Slots in the ring.
    pub capacity: u64,
    /// Messages sent and not yet received.
    pub depth: u64,
    /// Largest inline payload.
    pub slot_size: u64,
    /// Pool for large messages (0: none).
    pub pool_id: u64,
    /// Whether the channel is closed.
    pub closed: bool,
    /// Senders announced as sleeping.
    pub send_waiters: u32,
    /// Receivers announced as sleeping.
    pub recv_waiters: u32,
    /// Messages sent so far.
    pub sent: u64,
    /// Messages received so far.
    pub received: u64,
    /// Parties between announcing a reservation and withdrawing it (mid-send or
    /// mid-receive, or dead there and not yet taken over).
    pub mid_operation: u32,
    /// The position at `head` that a sender reserved and has not committed while later ones
    /// were reserved (a live sender mid-copy, or a dead one whose position the next
    /// receiver publishes as a hole).
    pub uncommitted_send: Option<u64>,
    /// The position a receiver reserved and has not given back, keeping the next lap's
    /// sender out (a live receiver mid-read, or a dead one whose slot the next party frees).
    pub uncommitted_recv: Option<u64>,
}

/// Where a channel's memory lives.
#[derive(Debug)]
enum Home {
    /// A `chan` segment; the region starts after its header.
    Segment(Segment),
    /// A block of a pool; the region is the block.
    Block(Block),
}

/// A handle to a channel. `Send + Sync`; open or attach another handle per process.
#[derive(Debug)]
pub struct Channel {
    home: Home,
    /// Start of the channel region (64-aligned), valid while `home` lives.
    base: *mut u8,
    cap: u64,
    slot_size: usize,
    stride: usize,
    pool_id: u64,
    pool: OnceLock<Pool>,
    destroy_on_drop: bool,
    /// The process that made this handle: a copy inherited through `fork` never destroys.
    owner_pid: u32,
    /// The stuck position this handle last saw at each end, and since when (`recover.rs`).
    stuck: [recover::Seen; 2],
}

// SAFETY: `base` points into memory owned by `home` (a mapping or a held block), which lives
// as long as the handle; every access to the region goes through atomics or through slots
// owned exclusively by a ring ticket, so handles may move and be shared between threads.
unsafe impl Send for Channel {}
// SAFETY: see above.
unsafe impl Sync for Channel {}

impl Channel {
    /// The `chan` segment's name, for a channel in its own segment.
    pub fn name(&self) -> Option<&SegmentName> {
        match &self.home {
            Home::Segment(s) => Some(s.name()),
            Home::Block(_) => None,
        }
    }

    /// The underlying segment, for a channel in its own segment.
    pub fn segment(&self) -> Option<&Segment> {
        match &self.home {
            Home::Segment(s) => Some(s),
            Home::Block(_) => None,
        }
    }

    /// The block holding the channel, for a channel in a pool block.
    pub fn block_ref(&self) -> Option<BlockRef> {
        match &self.home {
            Home::Segment(_) => None,
            Home::Block(b) => Some(b.block_ref()),
        }
    }

    /// Slots in the ring.
    pub fn capacity(&self) -> u64 {
        self.cap
    }

    /// Largest payload sent inline.
    pub fn slot_size(&self) -> usize {
        self.slot_size
    }

    /// Whether dropping this handle closes, drains and unlinks the channel (true for the
    /// creator's handle). Returns the previous setting.
    pub fn set_destroy_on_drop(&mut self, yes: bool) -> bool {
        std::mem::replace(&mut self.destroy_on_drop, yes)
    }

    /// The pool large messages use, opened on first call.
    pub fn pool(&self) -> Result<&Pool, ChannelError> {
        if self.pool_id == 0 {
            return Err(ChannelError::TooLarge);
        }
        if let Some(p) = self.pool.get() {
            return Ok(p);
        }
        let Home::Segment(seg) = &self.home else {
            return Err(ChannelError::Corrupt); // block channels always know their pool
        };
        let n = seg.name();
        let pn = SegmentName::new(n.runtime, n.node, SegmentKind::Pool, self.pool_id);
        let p = Pool::open(&pn)?;
        Ok(self.pool.get_or_init(|| p))
    }

    fn hdr(&self) -> &ChannelHeader {
        // SAFETY: validated at create/open; all atomics.
        unsafe { &*(self.base.add(CH_OFF) as *const ChannelHeader) }
    }

    fn ring<'a>(&'a self) -> Ring<'a, impl Fn(usize) -> &'a AtomicU64 + 'a> {
        // SAFETY: the region was validated (or initialized) for `cap` slots of `stride`
        // bytes, and `home` keeps it mapped while `self` lives.
        unsafe { region::ring_at(self.base, self.cap, self.stride) }
    }

    fn slot(&self, t: Ticket) -> (&SlotHeader, *mut u8) {
        let off = SLOTS_OFF + t.slot * self.stride;
        // SAFETY: slot index < cap, validated to fit; SlotHeader is all atomics.
        unsafe {
            let p = self.base.add(off);
            (&*(p as *const SlotHeader), p.add(SLOT_HDR))
        }
    }

    /// Whether the channel is closed.
    pub fn is_closed(&self) -> bool {
        self.hdr().closed.load(Ordering::Acquire) != 0
    }

    /// Closes the channel: sends fail with `Closed` from now on, receivers get what is left
    /// and then `Closed`; every blocked process wakes.
    pub fn close(&self) {
        self.hdr().closed.store(1, Ordering::Release);
        self.hdr().send_wq.notify_all();
        self.hdr().recv_wq.notify_all();
    }

    /// Wakes every blocked sender and receiver with [`ChannelError::PeerLost`] (an owner
    /// calls this after noticing that a peer died, so nobody waits for it forever).
    pub fn wake_all(&self) {
        self.hdr().wake_epoch.fetch_add(1, Ordering::AcqRel);
        self.hdr().send_wq.notify_all();
        self.hdr().recv_wq.notify_all();
    }

    /// This channel's figures.
    pub fn stats(&self) -> ChannelStats {
        // SAFETY: validated at create/open/attach; memory owned by `home`.
        unsafe { stats_at(self.base, self.cap, self.slot_size, self.pool_id) }
    }

    /// Messages waiting (racy snapshot).
    pub fn len(&self) -> u64 {
        self.ring().len()
    }

    /// True when no message waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Closes, drains and unlinks the channel.
    pub fn destroy(mut self) {
        self.destroy_on_drop = true;
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        if self.destroy_on_drop && std::process::id() == self.owner_pid {
            self.drain();
            if let Home::Segment(seg) = &mut self.home {
                let _ = seg.unlink();
            }
        }
    }
}

#[cfg(test)]
mod tests;

// The shared layouts of this file, fixed: a change here changes what other processes (and
// other versions) read, so it must come with a layout version bump. (Loom's atomics differ.)
#[cfg(not(loom))]
const _: () = assert!(std::mem::size_of::<SlotHeader>() == 16);
