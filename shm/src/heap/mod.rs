//! The pool: a heap allocator living inside one shared-memory segment, safe for many
//! processes at once and for processes killed at any instruction.
//!
//! # Layout (offsets from the segment start; version [`POOL_VERSION`])
//! ```text
//! 0      SegmentHeader (128 B)
//! 128    PoolHeader: magic, version, robust mutex, table offsets, counters, free lists
//! ...    process table: PROC_SLOTS x u64 (packed ProcessId; 0 = free slot)
//! ...    hold table A, hold table B: hold_slots x HoldEntry (16 B); one is active
//! ...    heap: blocks, each a 64-byte BlockHeader followed by its data, then an end
//!        sentinel header (size 0, used)
//! ```
//!
//! # What is true and what is derived
//! Crash safety rests on keeping the *truth* small and changing it with single aligned
//! stores, in an order where every intermediate state is one recovery can read:
//! * the block chain: each header's `size_state` word (size | used flag | tag), walked from
//!   the heap start. A split first writes the new tail header (unreachable until the next
//!   store) and then shrinks the block in one store; a merge grows a block in one store.
//! * the hold table: entries `(block, holder, count)`; an entry is published by storing its
//!   block offset last and removed by storing a tombstone.
//!
//! Everything else (free lists, `prev_size`, refcounts, counters) is *derived*. All mutation
//! happens under the pool's [`RobustMutex`]; when a process dies holding it, the next locker
//! is told and rebuilds the derived state from the truth: used blocks without holds are
//! freed, holds naming no used block are dropped, adjacent free blocks are merged.
//!
//! # Holds
//! A hold says "holder H keeps block B alive". Holders are slots of the process table (one
//! per process using the pool) or [`TRANSIT`] for blocks in flight inside a channel. A block
//! is freed when its last hold goes. [`Pool::sweep`] releases every hold of a dead process
//! and is run by whoever notices a death (a full pool tries it before failing).
//!
//! An entry's value word packs `count` (bits 0..20), `holder` (bits 20..32; `0xFFF` is
//! [`TRANSIT`]), the table generation `tgen` (bits 32..63) and a `FROZEN` bit (63).
//!
//! # Lock-free hand-over
//! Moving a single hold between holders (a channel send: owner -> `TRANSIT`; a receive:
//! `TRANSIT` -> receiver) is one CAS on the entry's value word, without the pool lock: the
//! holder and the count change together, the refcount does not. Everything that changes a
//! value word under the lock does so by CAS too, so the two never lose each other's update.
//! The only writer that moves entries, `rehash`, first sets `FROZEN` on each source entry
//! (`fetch_or`, capturing its value at that instant): a hand-over that lost the race sees
//! `FROZEN`, fails its CAS and takes the locked path. `tgen` changes with every rehash, so a
//! stalled hand-over can never match an entry that a later rehash wrote into the same slot.
//!
//! # Where the code is
//! * `mod.rs` (this file): the public types ([`Pool`], [`Block`], [`BlockRef`],
//!   [`PoolConfig`], [`PoolStats`], [`AllocError`]), the shared-memory format (constants,
//!   `PoolHeader`, `BlockHeader`, `HoldEntry`, the value-word encoding `hv_*`, `layout` and
//!   `validate`), creating and opening a pool, and what a [`Block`] handle offers.
//! * `alloc.rs`: the free lists, [`Pool::alloc`] and its variants, another hold on a live
//!   block ([`Pool::block`]), and releasing: `release`, `unref`, `free_block` (merging).
//! * `holds.rs`: holder registration (process slots), the hold table (add, retag, drop,
//!   rehash), the lock-free hand-over, channel transit ([`Pool::claim_transit`],
//!   [`Pool::release_transit`]) and giving the process slot back when the last handle drops.
//! * `recovery.rs`: taking the pool lock (`lock`, which repairs first when the previous
//!   holder died), `recover` (rebuilds the derived state) and [`Pool::sweep`] of dead holders.
//! * `inspect.rs`: reading without changing: [`Pool::verify`] (every invariant),
//!   [`Pool::stats`], [`Pool::usage`], and [`stats_of`] / [`first_block_of`] for any mapping.
//! * `tests.rs`: the unit tests (one process; the multi-process crash tests are in the
//!   `dragon-tests` crate).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use crate::error::SegmentError;
use crate::lock::RobustMutex;
use crate::name::{SegmentKind, SegmentName};
use crate::segment::{Segment, DEFAULT_INIT_TIMEOUT, HEADER_SIZE};
use crate::waitqueue::WaitQueue;

mod alloc;
mod holds;
mod inspect;
mod recovery;

pub use inspect::{first_block_of, stats_of};

/// "DPOOL" magic of the pool header.
pub const POOL_MAGIC: u32 = 0x4450_4f4c;
/// Version of the pool layout described in the module docs (3: its robust mutex keeps the
/// owner's identity in the lock word, [`crate::lock::MUTEX_LAYOUT`] 2; 4: `repair_due`).
pub const POOL_VERSION: u32 = 4;
/// Number of process slots (processes holding blocks of one pool at once).
pub const PROC_SLOTS: usize = 1024;
/// Holder id of blocks in flight inside a channel.
pub const TRANSIT: u32 = u32::MAX;

const ALIGN: u64 = 64;
const BLOCK_HDR: u64 = 64;
const MIN_BLOCK: u64 = 128;
const NCLASSES: usize = 64;
const USED: u64 = 1;
const TAG: u64 = 0b10_1000;
const FLAG_MASK: u64 = ALIGN - 1;
const EMPTY: u64 = 0;
const TOMB: u64 = 1;

const HV_COUNT_MASK: u64 = (1 << 20) - 1;
const HV_HOLDER_SHIFT: u32 = 20;
const HV_HOLDER_MASK: u64 = 0xFFF;
const HV_TRANSIT: u64 = 0xFFF;
const HV_TGEN_SHIFT: u32 = 32;
const HV_TGEN_MASK: u64 = (1 << 31) - 1;
const HV_FROZEN: u64 = 1 << 63;

fn hv_count(v: u64) -> u32 {
    (v & HV_COUNT_MASK) as u32
}

fn hv_holder(v: u64) -> u32 {
    match (v >> HV_HOLDER_SHIFT) & HV_HOLDER_MASK {
        HV_TRANSIT => TRANSIT,
        h => h as u32,
    }
}

fn hv_holder_bits(holder: u32) -> u64 {
    if holder == TRANSIT {
        HV_TRANSIT << HV_HOLDER_SHIFT
    } else {
        (u64::from(holder) & HV_HOLDER_MASK) << HV_HOLDER_SHIFT
    }
}

fn hv_make(holder: u32, count: u32, tgen: u32) -> u64 {
    (u64::from(count) & HV_COUNT_MASK)
        | hv_holder_bits(holder)
        | ((u64::from(tgen) & HV_TGEN_MASK) << HV_TGEN_SHIFT)
}

fn hv_with_holder(v: u64, holder: u32) -> u64 {
    (v & !(HV_HOLDER_MASK << HV_HOLDER_SHIFT)) | hv_holder_bits(holder)
}

fn hv_with_count(v: u64, count: u32) -> u64 {
    (v & !HV_COUNT_MASK) | (u64::from(count) & HV_COUNT_MASK)
}

fn hv_with_tgen(v: u64, tgen: u32) -> u64 {
    (v & !(HV_TGEN_MASK << HV_TGEN_SHIFT) & !HV_FROZEN)
        | ((u64::from(tgen) & HV_TGEN_MASK) << HV_TGEN_SHIFT)
}

/// 32-byte plain-old-data handle to a block that any process of the node can resolve.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockRef {
    /// Id of the pool segment (its name's id).
    pub segment: u64,
    /// Offset of the block's data from the segment start.
    pub offset: u64,
    /// Length the block was allocated with.
    pub len: u64,
    /// Allocation generation: a stale handle to a reused block is refused.
    pub gen: u32,
    /// Zero.
    pub _pad: u32,
}

/// Errors of allocation and hold operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AllocError {
    /// No free block is large enough now.
    #[error("pool is full")]
    Full,
    /// Larger than the pool could ever hold.
    #[error("allocation larger than the pool")]
    TooLarge,
    /// A read-only handle cannot be put in flight (the receiver would get it writable).
    #[error("a read-only block cannot be put in flight")]
    ReadOnly,
    /// Zero-byte allocations are refused.
    #[error("zero-byte allocation")]
    ZeroSize,
    /// The hold table has no room for another hold.
    #[error("pool hold table is full")]
    HoldTableFull,
    /// Too many processes use this pool at once.
    #[error("too many processes use this pool")]
    ProcessTableFull,
    /// A blocking allocation ran out of time.
    #[error("timed out waiting for pool space")]
    TimedOut,
    /// A signal interrupted a blocking call.
    #[error("interrupted by a signal")]
    Interrupted,
    /// The handle names no live block of this pool (freed, reused, foreign or corrupt).
    #[error("block handle names no live block of this pool")]
    BadRef,
    /// The segment itself failed a check.
    #[error(transparent)]
    Segment(#[from] SegmentError),
}

/// Figures about a pool, readable while others allocate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolStats {
    /// Bytes of the heap area (block headers included).
    pub capacity: u64,
    /// Bytes in used blocks (headers included).
    pub used: u64,
    /// Bytes in free blocks (headers included).
    pub free: u64,
    /// Largest data length one allocation could get now.
    pub largest_free: u64,
    /// Number of used blocks.
    pub blocks: u64,
    /// Number of free blocks.
    pub free_blocks: u64,
    /// Live hold entries.
    pub holds: u64,
    /// Processes registered as holders.
    pub processes: u64,
}

/// The pool header at offset [`HEADER_SIZE`]; all atomics.
#[repr(C)]
#[derive(Debug)]
struct PoolHeader {
    magic: AtomicU32,
    version: AtomicU32,
    lock: RobustMutex,
    proc_off: AtomicU64,
    hold_off: [AtomicU64; 2],
    hold_slots: AtomicU64,
    active: AtomicU32,
    gen: AtomicU32,
    heap_start: AtomicU64,
    heap_end: AtomicU64,
    hold_live: AtomicU64,
    hold_used: AtomicU64,
    used_bytes: AtomicU64,
    used_blocks: AtomicU64,
    free_blocks: AtomicU64,
    frees: AtomicU32,
    recoveries: AtomicU32,
    free_wait: WaitQueue,
    free_heads: [AtomicU64; NCLASSES],
    /// Generation of the active hold table (see "Lock-free hand-over").
    hold_tgen: AtomicU32,
    /// Non-zero while a dead lock holder's state still needs `recover`: set before it runs,
    /// cleared when it succeeds, so a recovery that fails is retried by the next locker.
    repair_due: AtomicU32,
}

/// Header of every block; 64 bytes, data follows.
#[repr(C)]
#[derive(Debug)]
struct BlockHeader {
    size_state: AtomicU64,
    prev_size: AtomicU64,
    refcount: AtomicU32,
    gen: AtomicU32,
    next_free: AtomicU64,
    prev_free: AtomicU64,
    len: AtomicU64,
    _reserved: [AtomicU64; 2],
}

const _: () = assert!(std::mem::size_of::<BlockHeader>() == BLOCK_HDR as usize);

#[repr(C)]
#[derive(Debug)]
struct HoldEntry {
    block: AtomicU64,
    val: AtomicU64, // holder << 32 | count
}

fn round_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

fn class_of(size: u64) -> usize {
    // `max(1)`: a size read from a corrupt block header may be 0 (63 - 64 would wrap to an
    // index far outside `free_heads`).
    (63 - size.max(1).leading_zeros()) as usize
}

/// Hash of a hold entry's slot: by block only, so every hold on one block sits in one probe
/// chain and a hold can change holder in place (one store) when it goes into transit.
fn hold_hash(block: u64) -> u64 {
    (block >> 6).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

#[derive(Debug)]
struct PoolInner {
    seg: Segment,
    id: u64,
    /// pid << 32 | (slot + 1) of this process, or 0 when not registered.
    me: AtomicU64,
    /// Holds of this process whose release could not take the pool lock (`Drop` of a
    /// [`Block`] cannot return the error): released by the next successful `lock`.
    deferred: std::sync::Mutex<Vec<BlockRef>>,
    /// Whether `deferred` is non-empty (checked on every lock without the mutex).
    has_deferred: std::sync::atomic::AtomicBool,
}

impl PoolInner {
    fn new(seg: Segment, id: u64) -> Self {
        PoolInner {
            seg,
            id,
            me: AtomicU64::new(0),
            deferred: std::sync::Mutex::new(Vec::new()),
            has_deferred: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

/// A handle to a pool segment. Cheap to clone; `Send + Sync`.
#[derive(Debug, Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

/// One hold on a block by this process; dropping it releases the hold.
///
/// # Aliasing
/// Several handles of one process may name the same block (each is a hold). Safe code can
/// never borrow the same bytes mutably through one and at all through another: a second
/// handle comes only from `unsafe` functions whose contract forbids it ([`Pool::block`],
/// [`Block::try_clone`], [`Pool::claim_transit`]), or is read-only ([`Block::read_only`], as
/// the values [`crate::kv::Kv::get`] hands out), and [`Block::as_mut_slice`] panics on a
/// read-only handle.
#[derive(Debug)]
pub struct Block {
    pool: Pool,
    r: BlockRef,
    /// False for read-only handles: `as_mut_slice` refuses them.
    writable: bool,
}

/// Sizing knobs for [`Pool::create_with`].
#[derive(Debug, Clone, Copy)]
pub struct PoolConfig {
    /// Entries per hold table (rounded up to a power of two); at most 3/4 can be live.
    pub hold_slots: u64,
}

impl PoolConfig {
    /// Defaults for a pool segment of `size` bytes: one hold slot per KiB, at least 4096.
    pub fn for_size(size: usize) -> Self {
        PoolConfig {
            hold_slots: (size as u64 / 1024).max(4096),
        }
    }
}

struct Layout {
    proc_off: u64,
    hold_off: [u64; 2],
    hold_slots: u64,
    heap_start: u64,
    heap_end: u64,
}

fn layout(size: u64, hold_slots: u64) -> Option<Layout> {
    let hold_slots = hold_slots.max(64).checked_next_power_of_two()?;
    let ph = round_up(std::mem::size_of::<PoolHeader>() as u64, ALIGN);
    let proc_off = HEADER_SIZE as u64 + ph;
    let hold0 = proc_off + round_up(PROC_SLOTS as u64 * 8, ALIGN);
    let hold_bytes = hold_slots.checked_mul(16)?;
    let hold1 = hold0.checked_add(hold_bytes)?;
    let heap_start = round_up(hold1.checked_add(hold_bytes)?, ALIGN);
    let heap_end = (size.checked_sub(BLOCK_HDR)? / ALIGN) * ALIGN;
    if heap_end < heap_start + MIN_BLOCK {
        return None;
    }
    Some(Layout {
        proc_off,
        hold_off: [hold0, hold1],
        hold_slots,
        heap_start,
        heap_end,
    })
}

impl Pool {
    /// Creates a pool segment of `size` bytes with default sizing.
    pub fn create(name: &SegmentName, size: usize) -> Result<Pool, SegmentError> {
        Self::create_with(name, size, PoolConfig::for_size(size))
    }

    /// Creates a pool segment of `size` bytes.
    pub fn create_with(
        name: &SegmentName,
        size: usize,
        cfg: PoolConfig,
    ) -> Result<Pool, SegmentError> {
        if name.kind != SegmentKind::Pool {
            return Err(SegmentError::WrongKind {
                found: name.kind as u32,
            });
        }
        if name.id == 0 {
            // Id 0 means "no pool" in channel headers: pool ids start at 1.
            return Err(SegmentError::BadName);
        }
        let l = layout(size as u64, cfg.hold_slots).ok_or(SegmentError::BadSize)?;
        let seg = Segment::create(name, size, |seg| {
            // SAFETY: PoolHeader is all atomics; the segment is fresh and zero-filled.
            let h: &PoolHeader = unsafe { seg.at(HEADER_SIZE)? };
            h.lock.init();
            h.proc_off.store(l.proc_off, Ordering::Relaxed);
            h.hold_off[0].store(l.hold_off[0], Ordering::Relaxed);
            h.hold_off[1].store(l.hold_off[1], Ordering::Relaxed);
            h.hold_slots.store(l.hold_slots, Ordering::Relaxed);
            h.heap_start.store(l.heap_start, Ordering::Relaxed);
            h.heap_end.store(l.heap_end, Ordering::Relaxed);
            // SAFETY: offsets computed by `layout` lie inside the segment; BlockHeader is
            // all atomics.
            let first: &BlockHeader = unsafe { seg.at(l.heap_start as usize)? };
            first
                .size_state
                .store((l.heap_end - l.heap_start) | TAG, Ordering::Relaxed);
            // SAFETY: as above; the sentinel header fits before the segment end.
            let sentinel: &BlockHeader = unsafe { seg.at(l.heap_end as usize)? };
            sentinel.size_state.store(USED | TAG, Ordering::Relaxed);
            sentinel
                .prev_size
                .store(l.heap_end - l.heap_start, Ordering::Relaxed);
            h.free_blocks.store(1, Ordering::Relaxed);
            h.free_heads[class_of(l.heap_end - l.heap_start)]
                .store(l.heap_start, Ordering::Relaxed);
            h.magic.store(POOL_MAGIC, Ordering::Relaxed);
            h.version.store(POOL_VERSION, Ordering::Relaxed);
            Ok(())
        })?;
        Ok(Pool {
            inner: Arc::new(PoolInner::new(seg, name.id)),
        })
    }

    /// Opens an existing pool read-write.
    pub fn open(name: &SegmentName) -> Result<Pool, SegmentError> {
        let seg = Segment::open(name, DEFAULT_INIT_TIMEOUT, true)?;
        validate(&seg)?;
        Ok(Pool {
            inner: Arc::new(PoolInner::new(seg, name.id)),
        })
    }

    /// The pool's segment name.
    pub fn name(&self) -> &SegmentName {
        self.inner.seg.name()
    }

    /// The underlying segment.
    pub fn segment(&self) -> &Segment {
        &self.inner.seg
    }

    /// The pool's id ([`BlockRef::segment`] of its blocks).
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// Makes the creator's handle leave the segment in place on drop (or not).
    pub fn set_unlink_on_drop(&mut self, yes: bool) -> bool {
        match Arc::get_mut(&mut self.inner) {
            Some(i) => {
                i.seg.set_unlink_on_drop(yes);
                true
            }
            None => false,
        }
    }

    fn header(&self) -> &PoolHeader {
        // SAFETY: validated on open/create: in bounds, aligned, all atomics.
        unsafe { &*(self.inner.seg.base().add(HEADER_SIZE) as *const PoolHeader) }
    }

    /// A block header at `off`, after checking it lies in the heap (sentinel included).
    fn bh(&self, off: u64) -> Result<&BlockHeader, AllocError> {
        let h = self.header();
        let (s, e) = (
            h.heap_start.load(Ordering::Relaxed),
            h.heap_end.load(Ordering::Relaxed),
        );
        if off < s || off > e || !(off - s).is_multiple_of(ALIGN) {
            return Err(AllocError::Segment(SegmentError::Corrupt));
        }
        // SAFETY: heap bounds were validated against the segment length at open; the
        // offset is inside them and 64-aligned; BlockHeader is all atomics.
        Ok(unsafe { &*(self.inner.seg.base().add(off as usize) as *const BlockHeader) })
    }

    fn proc_slot(&self, i: usize) -> &AtomicU64 {
        let off = self.header().proc_off.load(Ordering::Relaxed) as usize + i * 8;
        debug_assert!(i < PROC_SLOTS);
        // SAFETY: the process table lies inside the segment (validated) and i < PROC_SLOTS.
        unsafe { &*(self.inner.seg.base().add(off) as *const AtomicU64) }
    }

    fn hold_entry(&self, table: u32, i: u64) -> &HoldEntry {
        let h = self.header();
        let off = h.hold_off[table as usize & 1].load(Ordering::Relaxed) + i * 16;
        // SAFETY: both tables lie inside the segment (validated) and i < hold_slots.
        unsafe { &*(self.inner.seg.base().add(off as usize) as *const HoldEntry) }
    }
}

/// Checks a pool segment's header and table offsets against its size.
fn validate(seg: &Segment) -> Result<(), SegmentError> {
    // SAFETY: PoolHeader is all atomics; `at` checks bounds and alignment.
    let h: &PoolHeader = unsafe { seg.at(HEADER_SIZE)? };
    if h.magic.load(Ordering::Relaxed) != POOL_MAGIC {
        return Err(SegmentError::BadMagic);
    }
    let v = h.version.load(Ordering::Relaxed);
    if v != POOL_VERSION {
        return Err(SegmentError::BadVersion {
            found: v,
            expected: POOL_VERSION,
        });
    }
    let slots = h.hold_slots.load(Ordering::Relaxed);
    let l = layout(seg.len() as u64, slots).ok_or(SegmentError::Corrupt)?;
    if !slots.is_power_of_two()
        || l.hold_slots != slots
        || h.proc_off.load(Ordering::Relaxed) != l.proc_off
        || h.hold_off[0].load(Ordering::Relaxed) != l.hold_off[0]
        || h.hold_off[1].load(Ordering::Relaxed) != l.hold_off[1]
        || h.heap_start.load(Ordering::Relaxed) != l.heap_start
        || h.heap_end.load(Ordering::Relaxed) != l.heap_end
    {
        return Err(SegmentError::Corrupt);
    }
    Ok(())
}

impl Block {
    /// The handle other processes resolve.
    pub fn block_ref(&self) -> BlockRef {
        self.r
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.r.len as usize
    }

    /// Never true: zero-byte blocks are refused.
    pub fn is_empty(&self) -> bool {
        self.r.len == 0
    }

    /// Start of the data, 64-byte aligned, valid while `self` lives.
    pub fn as_ptr(&self) -> *mut u8 {
        // SAFETY: check_ref/alloc established that [offset, offset+len) lies in the heap.
        unsafe { self.pool.inner.seg.base().add(self.r.offset as usize) }
    }

    /// The data. Other holders in other processes may write it; the layers above decide who
    /// writes when.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: in bounds (see as_ptr) and kept mapped by the Pool handle we own.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.len()) }
    }

    /// The data, writable.
    ///
    /// # Panics
    /// On a read-only handle ([`Block::read_only`]).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        assert!(
            self.writable,
            "as_mut_slice on a read-only Block: other handles may view these bytes"
        );
        // SAFETY: in bounds and mapped as for as_slice; `&mut self` excludes other borrows
        // through this handle, and no other handle of this process borrows the same bytes
        // meanwhile: safe code gets a second handle only read-only (refused above) or through
        // an `unsafe` function whose contract forbids exactly that (see "Aliasing").
        unsafe { std::slice::from_raw_parts_mut(self.as_ptr(), self.len()) }
    }

    /// This handle made read-only: [`as_mut_slice`](Self::as_mut_slice) panics on it, so it
    /// may coexist with other handles on the same block.
    pub fn read_only(mut self) -> Block {
        self.writable = false;
        self
    }

    /// Whether [`as_mut_slice`](Self::as_mut_slice) is allowed on this handle.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// The pool it belongs to.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Another hold by this process on the same block (read-only if this one is).
    ///
    /// # Safety
    /// As for [`Pool::block`]: while both handles live, no borrow of the bytes through one
    /// ([`as_mut_slice`](Self::as_mut_slice)) may be mutable while any borrow through the
    /// other is alive. [`Block::read_only`] on either handle meets this.
    pub unsafe fn try_clone(&self) -> Result<Block, AllocError> {
        // SAFETY: the caller takes over our contract for the new handle.
        let b = unsafe { self.pool.block(self.r) }?;
        Ok(if self.writable { b } else { b.read_only() })
    }

    /// Hands the hold to "in flight" (a channel); the receiver claims it with
    /// [`Pool::claim_transit`]. On error the block is released.
    pub fn into_transit(self) -> Result<BlockRef, AllocError> {
        self.try_into_transit().map_err(|(e, _)| e)
    }

    /// Like [`into_transit`](Self::into_transit), but on error the block comes back.
    /// A read-only handle is refused ([`AllocError::ReadOnly`]): whoever claims the hold
    /// gets a writable handle, while other read-only views of the bytes may live on.
    pub fn try_into_transit(self) -> Result<BlockRef, (AllocError, Block)> {
        if !self.writable {
            return Err((AllocError::ReadOnly, self));
        }
        let r = self.r;
        match self.pool.hand_to_transit(r) {
            Ok(()) => {
                // The hold is no longer ours: skip Drop's release, but drop the pool handle.
                let this = std::mem::ManuallyDrop::new(self);
                // SAFETY: `this` is never used or dropped again, so the pool handle is moved
                // out exactly once.
                drop(unsafe { std::ptr::read(&this.pool) });
                Ok(r)
            }
            Err(e) => Err((e, self)),
        }
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.pool.release(self.r);
    }
}

#[cfg(test)]
mod tests;

// The shared layouts of this file, fixed: a change here changes what other processes (and
// other versions) read, so it must come with a layout version bump. (Loom's atomics differ.)
#[cfg(not(loom))]
const _: () = assert!(std::mem::size_of::<PoolHeader>() == 656);
#[cfg(not(loom))]
const _: () = assert!(std::mem::size_of::<HoldEntry>() == 16);
#[cfg(not(loom))]
const _: () = assert!(std::mem::size_of::<BlockRef>() == 32);
#[cfg(not(loom))]
const _: () = assert!(std::mem::offset_of!(PoolHeader, magic) == 0);
#[cfg(not(loom))]
const _: () = assert!(std::mem::offset_of!(PoolHeader, version) == 4);
#[cfg(not(loom))]
const _: () = assert!(std::mem::offset_of!(PoolHeader, lock) == 8);
