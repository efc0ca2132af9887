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
//!                              pool_id, closed, wake_epoch, send/recv wait queues
//! 128   head cursor (u64, own 128-byte line)
//! 256   tail cursor (u64, own 128-byte line)
//! 384   slots[capacity], each `stride` bytes (multiple of 64):
//!         stamp u64 | kind u32 | len u32 | payload[slot_size]
//! ```
//! The ring protocol on `head`, `tail` and the stamps is documented in [`crate::ring`].
//!
//! # Blocking
//! Senders sleep on `send_wq` (woken by each receive), receivers on `recv_wq` (woken by each
//! send), through [`WaitQueue`]: no syscall when nobody sleeps. `close` and `wake_all` wake
//! everyone. A blocked operation ends with [`ChannelError::Closed`] once the channel is
//! closed (receivers first drain what is left), or with [`ChannelError::PeerLost`] when an
//! owner called [`Channel::wake_all`] after noticing a dead peer.
//!
//! # Crash behaviour
//! A process killed between reserving a slot and committing it leaves that position
//! unreadable (receivers see the ring as empty there); [`Channel::stats`] shows it as
//! `depth > 0` with nothing receivable, and the owner recovers by closing the channel.
//! A block whose sender or receiver dies in the few instructions between handing over the
//! hold and committing the slot stays allocated until the pool is destroyed.

use std::sync::OnceLock;
use std::time::Duration;

use crate::error::SegmentError;
use crate::heap::{AllocError, Block, BlockRef, Pool};
use crate::name::{SegmentKind, SegmentName};
use crate::ring::{Ring, RingError, Ticket};
use crate::segment::{Segment, DEFAULT_INIT_TIMEOUT, HEADER_SIZE};
use crate::waitqueue::{WaitError, WaitOpts, WaitQueue};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// First word of a channel header.
pub const CHANNEL_MAGIC: u32 = u32::from_le_bytes(*b"DCHN");
/// Channel layout version.
pub const CHANNEL_VERSION: u32 = 1;
/// Smallest payload area of a slot (a [`BlockRef`] must fit).
pub const MIN_SLOT_SIZE: usize = 32;
const CH_OFF: usize = 0;
const HEAD_OFF: usize = 128;
const TAIL_OFF: usize = 256;
const SLOTS_OFF: usize = 384;
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
    reserved: [AtomicU64; 8],
}

const _: () = assert!(std::mem::size_of::<ChannelHeader>() == 128);

/// Slot header: the ring stamp, then what the payload holds.
#[repr(C)]
#[derive(Debug)]
struct SlotHeader {
    stamp: AtomicU64,
    kind: AtomicU32,
    len: AtomicU32,
}

/// Errors of channel operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelError {
    /// `try_send` found no free slot.
    Full,
    /// `try_recv` found no message.
    Empty,
    /// The channel is closed (and, for receivers, drained).
    Closed,
    /// A blocking operation ran out of time.
    TimedOut,
    /// A signal arrived during an interruptible wait.
    Interrupted,
    /// An owner woke all waiters because a peer died ([`Channel::wake_all`]).
    PeerLost,
    /// The message needs a pool block but the channel has no pool, or is larger than the pool.
    TooLarge,
    /// Allocating or claiming a block failed.
    Alloc(AllocError),
    /// The segment failed a check.
    Segment(SegmentError),
    /// A slot held something this build cannot read.
    Corrupt,
}

impl std::fmt::Display for ChannelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChannelError::Full => f.write_str("channel is full"),
            ChannelError::Empty => f.write_str("channel is empty"),
            ChannelError::Closed => f.write_str("channel is closed"),
            ChannelError::TimedOut => f.write_str("timed out"),
            ChannelError::Interrupted => f.write_str("interrupted by a signal"),
            ChannelError::PeerLost => f.write_str("a peer of the channel died"),
            ChannelError::TooLarge => f.write_str("message too large for this channel"),
            ChannelError::Alloc(e) => write!(f, "{e}"),
            ChannelError::Segment(e) => write!(f, "{e}"),
            ChannelError::Corrupt => f.write_str("channel slot failed a consistency check"),
        }
    }
}

impl std::error::Error for ChannelError {}

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

impl From<SegmentError> for ChannelError {
    fn from(e: SegmentError) -> Self {
        ChannelError::Segment(e)
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
}

/// The bytes a channel region of `capacity` slots of `slot_size` payload bytes needs.
pub fn region_size(capacity: u64, slot_size: usize) -> Option<usize> {
    let stride = stride_of(slot_size.max(MIN_SLOT_SIZE))?;
    usize::try_from(capacity)
        .ok()?
        .checked_mul(stride)?
        .checked_add(SLOTS_OFF)
}

/// The segment size a `chan` segment of `capacity` slots of `slot_size` bytes needs.
pub fn segment_size(capacity: u64, slot_size: usize) -> Option<usize> {
    region_size(capacity, slot_size)?.checked_add(HEADER_SIZE)
}

fn stride_of(slot_size: usize) -> Option<usize> {
    let s = slot_size.checked_add(SLOT_HDR)?.checked_add(63)?;
    Some(s / 64 * 64)
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
}

// SAFETY: `base` points into memory owned by `home` (a mapping or a held block), which lives
// as long as the handle; every access to the region goes through atomics or through slots
// owned exclusively by a ring ticket, so handles may move and be shared between threads.
unsafe impl Send for Channel {}
// SAFETY: see above.
unsafe impl Sync for Channel {}

/// Checks a channel region's header against its length.
///
/// # Safety
/// `base` must point to `len` readable bytes, 64-byte aligned, that stay mapped meanwhile.
unsafe fn validate(base: *const u8, len: usize) -> Result<(u64, usize, usize, u64), SegmentError> {
    if len < SLOTS_OFF || !(base as usize).is_multiple_of(64) {
        return Err(SegmentError::BadSize);
    }
    // SAFETY: the header (128 B) lies inside the region (len >= SLOTS_OFF, checked); all
    // atomics, valid for any bits.
    let h = unsafe { &*(base.add(CH_OFF) as *const ChannelHeader) };
    if h.magic.load(Ordering::Relaxed) != CHANNEL_MAGIC {
        return Err(SegmentError::BadMagic);
    }
    let v = h.version.load(Ordering::Relaxed);
    if v != CHANNEL_VERSION {
        return Err(SegmentError::BadVersion {
            found: v,
            expected: CHANNEL_VERSION,
        });
    }
    let cap = h.capacity.load(Ordering::Relaxed);
    let slot_size = h.slot_size.load(Ordering::Relaxed) as usize;
    let stride = h.stride.load(Ordering::Relaxed) as usize;
    if cap == 0
        || slot_size < MIN_SLOT_SIZE
        || stride_of(slot_size) != Some(stride)
        || region_size(cap, slot_size).is_none_or(|need| need > len)
    {
        return Err(SegmentError::Corrupt);
    }
    Ok((cap, slot_size, stride, h.pool_id.load(Ordering::Relaxed)))
}

/// Reads the figures of a validated region.
///
/// # Safety
/// As for [`validate`], and the region must have passed it.
unsafe fn stats_at(base: *const u8, cap: u64, slot_size: usize, pool_id: u64) -> ChannelStats {
    // SAFETY: validated region: header and cursors lie inside; all atomics.
    let (h, head, tail) = unsafe {
        (
            &*(base.add(CH_OFF) as *const ChannelHeader),
            (*(base.add(HEAD_OFF) as *const AtomicU64)).load(Ordering::Acquire),
            (*(base.add(TAIL_OFF) as *const AtomicU64)).load(Ordering::Acquire),
        )
    };
    ChannelStats {
        capacity: cap,
        depth: tail.saturating_sub(head),
        slot_size: slot_size as u64,
        pool_id,
        closed: h.closed.load(Ordering::Acquire) != 0,
        send_waiters: h.send_wq.waiters(),
        recv_waiters: h.recv_wq.waiters(),
        sent: tail,
        received: head,
    }
}

/// Reads a channel's figures from any mapping of its `chan` segment (read-only is enough).
pub fn stats_of(seg: &Segment) -> Result<ChannelStats, SegmentError> {
    if seg.len() < HEADER_SIZE {
        return Err(SegmentError::BadSize);
    }
    // SAFETY: the mapping holds seg.len() bytes from a page-aligned base.
    let base = unsafe { seg.base().add(HEADER_SIZE) };
    let len = seg.len() - HEADER_SIZE;
    // SAFETY: as above; `validate` checks everything it reads.
    let (cap, slot_size, _, pool_id) = unsafe { validate(base, len)? };
    if segment_size(cap, slot_size) != Some(seg.len()) {
        return Err(SegmentError::BadSize);
    }
    // SAFETY: validated just above.
    Ok(unsafe { stats_at(base, cap, slot_size, pool_id) })
}

/// Initializes a fresh, zeroed region.
///
/// # Safety
/// `base` must point to `region_size(capacity, slot_size)` writable bytes, 64-aligned,
/// which no other party uses yet.
unsafe fn init_region(base: *mut u8, capacity: u64, slot_size: usize, pool_id: u64) {
    let stride = stride_of(slot_size).expect("checked by caller");
    // SAFETY: caller's contract: the region is ours and large enough; all atomics.
    let (h, head, tail) = unsafe {
        (
            &*(base.add(CH_OFF) as *const ChannelHeader),
            &*(base.add(HEAD_OFF) as *const AtomicU64),
            &*(base.add(TAIL_OFF) as *const AtomicU64),
        )
    };
    h.capacity.store(capacity, Ordering::Relaxed);
    h.slot_size.store(slot_size as u64, Ordering::Relaxed);
    h.stride.store(stride as u64, Ordering::Relaxed);
    h.pool_id.store(pool_id, Ordering::Relaxed);
    h.closed.store(0, Ordering::Relaxed);
    h.wake_epoch.store(0, Ordering::Relaxed);
    let b = base as usize;
    Ring::new(head, tail, capacity, |i| {
        // SAFETY: i < capacity; the slot array lies inside the region (caller's contract).
        unsafe { &*((b + SLOTS_OFF + i * stride) as *const AtomicU64) }
    })
    .init();
    h.magic.store(CHANNEL_MAGIC, Ordering::Relaxed);
    // Published to other processes by whatever hands them the channel (segment version
    // store, or the BlockRef travelling through a synchronizing channel).
    h.version.store(CHANNEL_VERSION, Ordering::Release);
}

fn check_params(capacity: u64, slot_size: usize) -> Result<usize, ChannelError> {
    if capacity == 0 || slot_size > u32::MAX as usize {
        return Err(SegmentError::BadSize.into());
    }
    region_size(capacity, slot_size).ok_or_else(|| SegmentError::BadSize.into())
}

impl Channel {
    /// Creates a channel of `capacity` slots with `slot_size` inline payload bytes each
    /// (at least [`MIN_SLOT_SIZE`]); larger messages go through `pool`, which must live on
    /// the same node and runtime. The creator's handle destroys the channel on drop.
    pub fn create(
        name: &SegmentName,
        capacity: u64,
        slot_size: usize,
        pool: Option<Pool>,
    ) -> Result<Channel, ChannelError> {
        if name.kind != SegmentKind::Channel {
            return Err(SegmentError::WrongKind {
                found: name.kind as u32,
            }
            .into());
        }
        let slot_size = slot_size.max(MIN_SLOT_SIZE);
        let stride = stride_of(slot_size).ok_or(SegmentError::BadSize)?;
        check_params(capacity, slot_size)?;
        let size = segment_size(capacity, slot_size).ok_or(SegmentError::BadSize)?;
        let pool_id = pool.as_ref().map_or(0, |p| p.id());
        if let Some(p) = &pool {
            let pn = p.name();
            if pn.runtime != name.runtime || pn.node != name.node {
                return Err(SegmentError::BadName.into());
            }
        }
        let seg = Segment::create(name, size, |seg| {
            seg.check_range(HEADER_SIZE, size - HEADER_SIZE, 64)?;
            // SAFETY: the region after the header is ours (fresh segment, checked range).
            unsafe { init_region(seg.base().add(HEADER_SIZE), capacity, slot_size, pool_id) };
            Ok(())
        })?;
        // SAFETY: the segment is at least HEADER_SIZE long.
        let base = unsafe { seg.base().add(HEADER_SIZE) };
        let ch = Channel {
            home: Home::Segment(seg),
            base,
            cap: capacity,
            slot_size,
            stride,
            pool_id,
            pool: OnceLock::new(),
            destroy_on_drop: true,
            owner_pid: std::process::id(),
        };
        if let Some(p) = pool {
            let _ = ch.pool.set(p);
        }
        Ok(ch)
    }

    /// Opens an existing channel. Its pool (if any) is `pool` when given and matching,
    /// otherwise opened by name on first use.
    pub fn open(name: &SegmentName, pool: Option<Pool>) -> Result<Channel, ChannelError> {
        let seg = Segment::open(name, DEFAULT_INIT_TIMEOUT, true)?;
        stats_of(&seg)?; // validates header and size
                         // SAFETY: validated by stats_of: the region after the header is a channel.
        let base = unsafe { seg.base().add(HEADER_SIZE) };
        // SAFETY: as above.
        let (cap, slot_size, stride, pool_id) = unsafe { validate(base, seg.len() - HEADER_SIZE)? };
        let ch = Channel {
            home: Home::Segment(seg),
            base,
            cap,
            slot_size,
            stride,
            pool_id,
            pool: OnceLock::new(),
            destroy_on_drop: false,
            owner_pid: std::process::id(),
        };
        if let Some(p) = pool.filter(|p| p.id() == pool_id && pool_id != 0) {
            let _ = ch.pool.set(p);
        }
        Ok(ch)
    }

    /// Creates a channel in a block of `pool` (large messages use the same pool). Others
    /// attach with [`Channel::attach`] on `pool.block(ch.block_ref().unwrap())`. The creator's
    /// handle closes and drains the channel on drop; the block goes with its last hold.
    pub fn create_in(
        pool: &Pool,
        capacity: u64,
        slot_size: usize,
    ) -> Result<Channel, ChannelError> {
        let slot_size = slot_size.max(MIN_SLOT_SIZE);
        let size = check_params(capacity, slot_size)?;
        let block = pool.alloc_zeroed(size)?;
        // SAFETY: a fresh zeroed block of `size` bytes, 64-aligned, not yet shared.
        unsafe { init_region(block.as_ptr(), capacity, slot_size, pool.id()) };
        Self::from_block(block, true)
    }

    /// Attaches to a channel living in `block` (a hold taken with [`Pool::block`]).
    pub fn attach(block: Block) -> Result<Channel, ChannelError> {
        Self::from_block(block, false)
    }

    fn from_block(block: Block, destroy_on_drop: bool) -> Result<Channel, ChannelError> {
        let base = block.as_ptr();
        // SAFETY: the block's bytes stay valid while we hold it; 64-aligned.
        let (cap, slot_size, stride, pool_id) = unsafe { validate(base, block.len())? };
        if pool_id != block.pool().id() {
            return Err(SegmentError::Corrupt.into());
        }
        let pool = block.pool().clone();
        let ch = Channel {
            home: Home::Block(block),
            base,
            cap,
            slot_size,
            stride,
            pool_id,
            pool: OnceLock::new(),
            destroy_on_drop,
            owner_pid: std::process::id(),
        };
        let _ = ch.pool.set(pool);
        Ok(ch)
    }

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
        let base = self.base;
        let stride = self.stride;
        // SAFETY: HEAD_OFF/TAIL_OFF lie in the validated segment; AtomicU64 is valid for any
        // bits.
        let (head, tail) = unsafe {
            (
                &*(base.add(HEAD_OFF) as *const AtomicU64),
                &*(base.add(TAIL_OFF) as *const AtomicU64),
            )
        };
        Ring::new(head, tail, self.cap, move |i| {
            // SAFETY: i < cap (the ring only asks for slot indices); the slot array was
            // validated to fit the segment; stamps are 64-aligned AtomicU64s.
            unsafe { &*(base.add(SLOTS_OFF + i * stride) as *const AtomicU64) }
        })
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

    // ----- sending -----

    fn reserve_send(&self, opts: Option<&WaitOpts>) -> Result<Ticket, ChannelError> {
        let ring = self.ring();
        let h = self.hdr();
        let try_once = || -> Option<Result<Ticket, ChannelError>> {
            if h.closed.load(Ordering::Acquire) != 0 {
                return Some(Err(ChannelError::Closed));
            }
            match ring.reserve_send() {
                Ok(t) => Some(Ok(t)),
                Err(_) => None,
            }
        };
        self.attempt(&h.send_wq, opts, ChannelError::Full, try_once)
    }

    fn commit_send(&self, t: Ticket, kind: u32, len: u32) {
        let (sh, _) = self.slot(t);
        sh.kind.store(kind, Ordering::Relaxed);
        sh.len.store(len, Ordering::Relaxed);
        self.ring().commit_send(t);
        self.hdr().recv_wq.notify_one();
    }

    fn send_inline(&self, data: &[u8], opts: Option<&WaitOpts>) -> Result<(), ChannelError> {
        let t = self.reserve_send(opts)?;
        let (_, payload) = self.slot(t);
        // SAFETY: the ticket gives this process exclusive use of the slot's payload until
        // commit; data.len() <= slot_size, the payload area's size.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), payload, data.len()) };
        self.commit_send(t, KIND_INLINE, data.len() as u32);
        Ok(())
    }

    fn write_ref(&self, t: Ticket, r: BlockRef) {
        let (_, payload) = self.slot(t);
        let bytes = bytemuck::bytes_of(&r);
        // SAFETY: exclusive slot (ticket); a BlockRef (32 B) fits MIN_SLOT_SIZE.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), payload, bytes.len()) };
        self.commit_send(t, KIND_BLOCK, bytes.len() as u32);
    }

    /// Sends a copy of `data`, waiting at most `timeout` for room (`None`: forever). Payloads
    /// larger than a slot are copied once into a pool block that the receiver then owns.
    pub fn send(&self, data: &[u8], timeout: Option<Duration>) -> Result<(), ChannelError> {
        // Fast path without reading the clock: a free slot needs no deadline.
        if data.len() <= self.slot_size {
            match self.send_inline(data, None) {
                Err(ChannelError::Full) => {}
                r => return r,
            }
        }
        self.send_opts(data, &WaitOpts::timeout(timeout))
    }

    /// [`send`](Self::send) with full wait options (interruptible waits, spin budget).
    pub fn send_opts(&self, data: &[u8], opts: &WaitOpts) -> Result<(), ChannelError> {
        if data.len() <= self.slot_size {
            return self.send_inline(data, Some(opts));
        }
        let pool = self.pool()?;
        let remaining = opts
            .deadline
            .map(|d| d.saturating_duration_since(std::time::Instant::now()));
        let mut b = pool.alloc_timeout(data.len(), remaining)?;
        b.as_mut_slice().copy_from_slice(data);
        self.send_block_opts(b, opts).map_err(|e| e.error)
    }

    /// Sends without waiting: `Full` when no slot is free.
    pub fn try_send(&self, data: &[u8]) -> Result<(), ChannelError> {
        if data.len() <= self.slot_size {
            return self.send_inline(data, None);
        }
        if self.ring().len() >= self.cap {
            return Err(ChannelError::Full);
        }
        let pool = self.pool()?;
        let mut b = pool.alloc(data.len())?;
        b.as_mut_slice().copy_from_slice(data);
        self.send_block_inner(b, None).map_err(|e| e.error)
    }

    /// Moves a block to the receiver without copying its bytes. On failure the block comes
    /// back in the error.
    pub fn send_block(&self, b: Block, timeout: Option<Duration>) -> Result<(), SendError<Block>> {
        // Fast path without reading the clock.
        match self.send_block_inner(b, None) {
            Err(SendError {
                error: ChannelError::Full,
                value,
            }) => self.send_block_opts(value, &WaitOpts::timeout(timeout)),
            r => r,
        }
    }

    /// [`send_block`](Self::send_block) with full wait options.
    pub fn send_block_opts(&self, b: Block, opts: &WaitOpts) -> Result<(), SendError<Block>> {
        self.send_block_inner(b, Some(opts))
    }

    fn send_block_inner(&self, b: Block, opts: Option<&WaitOpts>) -> Result<(), SendError<Block>> {
        if b.pool().id() != self.pool_id {
            return Err(SendError {
                error: ChannelError::TooLarge,
                value: b,
            });
        }
        // Reserve first, then hand the hold over: a failed hand-over leaves a reserved slot,
        // which is committed as a hole that receivers skip, and the block comes back.
        let t = match self.reserve_send(opts) {
            Ok(t) => t,
            Err(error) => return Err(SendError { error, value: b }),
        };
        match b.try_into_transit() {
            Ok(r) => {
                self.write_ref(t, r);
                Ok(())
            }
            Err((e, value)) => {
                self.commit_send(t, KIND_HOLE, 0);
                Err(SendError {
                    error: e.into(),
                    value,
                })
            }
        }
    }

    // ----- receiving -----

    fn reserve_recv(&self, opts: Option<&WaitOpts>) -> Result<Ticket, ChannelError> {
        let ring = self.ring();
        let h = self.hdr();
        let try_once = || -> Option<Result<Ticket, ChannelError>> {
            match ring.reserve_recv() {
                Ok(t) => Some(Ok(t)),
                Err(RingError::Empty) | Err(RingError::Full) => {
                    // SYNC POINT: `closed` is read after the ring came up empty, so a
                    // message committed before `close` is always received first.
                    if h.closed.load(Ordering::Acquire) != 0 {
                        match ring.reserve_recv() {
                            Ok(t) => Some(Ok(t)),
                            Err(_) => Some(Err(ChannelError::Closed)),
                        }
                    } else {
                        None
                    }
                }
            }
        };
        self.attempt(&h.recv_wq, opts, ChannelError::Empty, try_once)
    }

    /// One try without `opts` (`none` when it finds nothing), else waits on `wq` until
    /// `try_once` yields, the deadline passes, or `wake_all` ends the wait with `PeerLost`.
    fn attempt(
        &self,
        wq: &WaitQueue,
        opts: Option<&WaitOpts>,
        none: ChannelError,
        try_once: impl Fn() -> Option<Result<Ticket, ChannelError>>,
    ) -> Result<Ticket, ChannelError> {
        let Some(o) = opts else {
            return try_once().unwrap_or(Err(none));
        };
        let epoch = self.hdr().wake_epoch.load(Ordering::Acquire);
        wq.wait_until(
            || {
                try_once().or_else(|| {
                    (self.hdr().wake_epoch.load(Ordering::Acquire) != epoch)
                        .then_some(Err(ChannelError::PeerLost))
                })
            },
            o,
        )?
    }

    /// Reads the slot of `t`, hands its payload to `f`, frees the slot. Block payloads are
    /// claimed first, so `f` sees either inline bytes or the block.
    fn take<R>(
        &self,
        t: Ticket,
        f: impl FnOnce(Result<&[u8], Block>) -> R,
    ) -> Result<R, ChannelError> {
        let (sh, payload) = self.slot(t);
        let kind = sh.kind.load(Ordering::Relaxed);
        let len = sh.len.load(Ordering::Relaxed) as usize;
        match kind {
            KIND_INLINE if len <= self.slot_size => {
                // SAFETY: the ticket gives this process exclusive use of the committed slot
                // until commit_recv; len <= slot_size (checked).
                let bytes = unsafe { std::slice::from_raw_parts(payload, len) };
                let r = f(Ok(bytes));
                self.finish_recv(t);
                Ok(r)
            }
            KIND_BLOCK if len == std::mem::size_of::<BlockRef>() => {
                let mut r: BlockRef = bytemuck::Zeroable::zeroed();
                // SAFETY: exclusive slot; 32 bytes inside the payload area.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        payload,
                        bytemuck::bytes_of_mut(&mut r).as_mut_ptr(),
                        len,
                    )
                };
                let claimed = self
                    .pool()
                    .and_then(|p| p.claim_transit(r).map_err(Into::into));
                self.finish_recv(t);
                claimed.map(|b| f(Err(b)))
            }
            KIND_HOLE => {
                // A hole carries nothing (only `drain` gets here; `next` skips holes).
                self.finish_recv(t);
                Err(ChannelError::Empty)
            }
            _ => {
                self.finish_recv(t);
                Err(ChannelError::Corrupt)
            }
        }
    }

    fn finish_recv(&self, t: Ticket) {
        self.ring().commit_recv(t);
        self.hdr().send_wq.notify_one();
    }

    /// Reserves the next real message, skipping holes left by failed block hand-overs.
    fn next(&self, opts: Option<&WaitOpts>) -> Result<Ticket, ChannelError> {
        loop {
            let t = self.reserve_recv(opts)?;
            if self.slot(t).0.kind.load(Ordering::Relaxed) != KIND_HOLE {
                return Ok(t);
            }
            self.finish_recv(t);
        }
    }

    fn recv_inner(&self, opts: Option<&WaitOpts>) -> Result<Message, ChannelError> {
        let t = self.next(opts)?;
        self.take(t, |p| match p {
            Ok(bytes) => Message::Inline(bytes.to_vec()),
            Err(b) => Message::Block(b),
        })
    }

    /// Receives the next message, waiting at most `timeout` (`None`: forever).
    pub fn recv(&self, timeout: Option<Duration>) -> Result<Message, ChannelError> {
        match self.recv_inner(None) {
            Err(ChannelError::Empty) => self.recv_inner(Some(&WaitOpts::timeout(timeout))),
            r => r,
        }
    }

    /// [`recv`](Self::recv) with full wait options.
    pub fn recv_opts(&self, opts: &WaitOpts) -> Result<Message, ChannelError> {
        self.recv_inner(Some(opts))
    }

    /// Receives without waiting: `Empty` when nothing is there.
    pub fn try_recv(&self) -> Result<Message, ChannelError> {
        self.recv_inner(None)
    }

    /// Receives the next message and passes its bytes to `f` in place (no copy for inline
    /// messages: `f` reads the slot; keep it short, the slot is held meanwhile).
    pub fn recv_with<R>(
        &self,
        timeout: Option<Duration>,
        f: impl FnOnce(&[u8]) -> R,
    ) -> Result<R, ChannelError> {
        let t = match self.next(None) {
            Err(ChannelError::Empty) => self.next(Some(&WaitOpts::timeout(timeout)))?,
            r => r?,
        };
        self.take(t, |p| match p {
            Ok(bytes) => f(bytes),
            Err(b) => f(b.as_slice()),
        })
    }

    /// Closes the channel and releases every message still in it (block holds included).
    /// Returns how many messages were dropped.
    pub fn drain(&self) -> usize {
        self.close();
        let mut n = 0;
        while let Ok(t) = self.ring().reserve_recv() {
            let _ = self.take(t, |p| drop(p));
            n += 1;
        }
        n
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
mod tests {
    use super::*;
    use crate::testing::{leftovers, test_runtime};
    use std::sync::Arc;
    use std::time::Instant;

    fn setup(rt: u64, cap: u64, slot: usize) -> (Pool, Channel) {
        let pool = Pool::create(&SegmentName::new(rt, 0, SegmentKind::Pool, 1), 8 << 20).unwrap();
        let name = SegmentName::new(rt, 0, SegmentKind::Channel, 2);
        let ch = Channel::create(&name, cap, slot, Some(pool.clone())).unwrap();
        (pool, ch)
    }

    #[test]
    fn inline_and_block_messages_fifo() {
        let rt = test_runtime();
        {
            let (pool, ch) = setup(rt, 4, 64);
            ch.send(b"hello", None).unwrap();
            let big: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
            ch.send(&big, None).unwrap();
            let mut b = pool.alloc(1000).unwrap();
            b.as_mut_slice().fill(9);
            let ptr = b.as_ptr();
            ch.send_block(b, None).unwrap();
            assert_eq!(ch.len(), 3);
            match ch.recv(None).unwrap() {
                Message::Inline(v) => assert_eq!(v, b"hello"),
                m => panic!("expected inline, got {m:?}"),
            }
            match ch.recv(None).unwrap() {
                Message::Block(b) => assert_eq!(b.as_slice(), &big[..]),
                m => panic!("expected block, got {m:?}"),
            }
            match ch.recv(None).unwrap() {
                Message::Block(b) => {
                    assert_eq!(b.as_ptr(), ptr, "block must move without copy");
                    assert!(b.as_slice().iter().all(|&x| x == 9));
                }
                m => panic!("expected block, got {m:?}"),
            }
            assert_eq!(ch.try_recv().unwrap_err(), ChannelError::Empty);
            assert_eq!(pool.stats().blocks, 0, "received blocks freed on drop");
            pool.verify().unwrap();
        }
        assert!(leftovers(rt).is_empty());
    }

    #[test]
    fn full_timeout_close_and_drain() {
        let rt = test_runtime();
        {
            let (pool, ch) = setup(rt, 2, 32);
            ch.try_send(&[1]).unwrap();
            ch.send(&[0u8; 500], None).unwrap();
            assert_eq!(ch.try_send(&[3]).unwrap_err(), ChannelError::Full);
            let t0 = Instant::now();
            assert_eq!(
                ch.send(&[3], Some(Duration::from_millis(30))).unwrap_err(),
                ChannelError::TimedOut
            );
            assert!(t0.elapsed() >= Duration::from_millis(30));
            let b = pool.alloc(10).unwrap();
            let e = ch
                .send_block(b, Some(Duration::from_millis(1)))
                .unwrap_err();
            assert_eq!(e.error, ChannelError::TimedOut);
            assert_eq!(e.value.len(), 10, "the unsent block comes back");
            drop(e);
            assert_eq!(pool.stats().blocks, 1, "only the queued block is live");
            let s = ch.stats();
            assert_eq!((s.capacity, s.depth, s.sent, s.received), (2, 2, 2, 0));
            ch.close();
            assert_eq!(ch.try_send(&[4]).unwrap_err(), ChannelError::Closed);
            assert_eq!(ch.recv(None).unwrap().bytes(), &[1]);
            assert_eq!(ch.recv(None).unwrap().bytes().len(), 500);
            assert_eq!(ch.recv(None).unwrap_err(), ChannelError::Closed);
            assert_eq!(pool.stats().blocks, 0);
        }
        assert!(leftovers(rt).is_empty());
    }

    #[test]
    fn drop_of_creator_releases_queued_blocks() {
        let rt = test_runtime();
        let pool = Pool::create(&SegmentName::new(rt, 0, SegmentKind::Pool, 1), 1 << 20).unwrap();
        {
            let name = SegmentName::new(rt, 0, SegmentKind::Channel, 2);
            let ch = Channel::create(&name, 8, 32, Some(pool.clone())).unwrap();
            for _ in 0..5 {
                ch.send(&[7u8; 4000], None).unwrap();
            }
            assert_eq!(pool.stats().blocks, 5);
        }
        assert_eq!(pool.stats().blocks, 0);
        assert_eq!(pool.stats().holds, 0);
        drop(pool);
        assert!(leftovers(rt).is_empty());
    }

    #[test]
    fn close_and_wake_all_wake_blocked_threads() {
        let rt = test_runtime();
        {
            let (_pool, ch) = setup(rt, 2, 32);
            let ch = Arc::new(ch);
            let c2 = ch.clone();
            let t = std::thread::spawn(move || c2.recv(None).map(|m| m.bytes().to_vec()));
            while ch.stats().recv_waiters == 0 {
                std::thread::yield_now();
            }
            ch.wake_all();
            assert_eq!(t.join().unwrap().unwrap_err(), ChannelError::PeerLost);
            let c2 = ch.clone();
            let t = std::thread::spawn(move || c2.recv(None).map(|m| m.bytes().to_vec()));
            while ch.stats().recv_waiters == 0 {
                std::thread::yield_now();
            }
            ch.close();
            assert_eq!(t.join().unwrap().unwrap_err(), ChannelError::Closed);
            let ch = Arc::try_unwrap(ch).unwrap();
            drop(ch);
        }
        assert!(leftovers(rt).is_empty());
    }

    #[test]
    fn open_checks_layout_and_no_pool_is_too_large() {
        let rt = test_runtime();
        {
            let name = SegmentName::new(rt, 0, SegmentKind::Channel, 3);
            let ch = Channel::create(&name, 4, 40, None).unwrap();
            assert_eq!(
                ch.send(&[0u8; 100], None).unwrap_err(),
                ChannelError::TooLarge
            );
            let other = Channel::open(&name, None).unwrap();
            other.send(b"x", None).unwrap();
            let mut got = Vec::new();
            ch.recv_with(None, |b| got.extend_from_slice(b)).unwrap();
            assert_eq!(got, b"x");
            // A pool name opened as a channel is refused with a clear error.
            let pn = SegmentName::new(rt, 0, SegmentKind::Pool, 1);
            let _pool = Pool::create(&pn, 1 << 20).unwrap();
            let fake = SegmentName {
                kind: SegmentKind::Channel,
                ..pn
            };
            assert!(Channel::open(&fake, None).is_err());
        }
        assert!(leftovers(rt).is_empty());
    }

    #[test]
    fn channel_in_a_pool_block() {
        let rt = test_runtime();
        {
            let pool =
                Pool::create(&SegmentName::new(rt, 0, SegmentKind::Pool, 1), 4 << 20).unwrap();
            let before = pool.stats().blocks;
            let ch = Channel::create_in(&pool, 4, 48).unwrap();
            assert!(ch.name().is_none());
            let r = ch.block_ref().unwrap();
            assert_eq!(pool.stats().blocks, before + 1);
            // Another handle attaches through the BlockRef (as another process would).
            let other = Channel::attach(pool.block(r).unwrap()).unwrap();
            ch.send(b"small", None).unwrap();
            ch.send(&vec![5u8; 10_000], None).unwrap();
            assert_eq!(other.recv(None).unwrap().bytes(), b"small");
            match other.recv(None).unwrap() {
                Message::Block(b) => assert!(b.as_slice().iter().all(|&x| x == 5)),
                m => panic!("expected a block, got {m:?}"),
            }
            assert_eq!(other.stats().received, 2);
            ch.send(&vec![6u8; 10_000], None).unwrap(); // left undelivered
            drop(other);
            drop(ch); // creator: closes, drains (frees the undelivered block), drops its hold
            assert_eq!(
                pool.stats().blocks,
                before,
                "ring block and messages all freed"
            );
            assert_eq!(pool.stats().holds, 0);
            // A block that is not a channel is refused.
            let junk = pool.alloc_zeroed(4096).unwrap();
            assert_eq!(
                Channel::attach(junk).unwrap_err(),
                ChannelError::Segment(SegmentError::BadMagic)
            );
        }
        assert!(leftovers(rt).is_empty());
    }
}
