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

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::SegmentError;
use crate::lock::{LockError, RobustGuard, RobustMutex};
use crate::name::{SegmentKind, SegmentName};
use crate::platform::ProcessId;
use crate::segment::{Segment, DEFAULT_INIT_TIMEOUT, HEADER_SIZE};
use crate::waitqueue::{WaitError, WaitOpts, WaitQueue};

/// "DPOOL" magic of the pool header.
pub const POOL_MAGIC: u32 = 0x4450_4f4c;
/// Version of the pool layout described in the module docs.
pub const POOL_VERSION: u32 = 2;
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllocError {
    /// No free block is large enough now.
    Full,
    /// Larger than the pool could ever hold.
    TooLarge,
    /// Zero-byte allocations are refused.
    ZeroSize,
    /// The hold table has no room for another hold.
    HoldTableFull,
    /// Too many processes use this pool at once.
    ProcessTableFull,
    /// A blocking allocation ran out of time.
    TimedOut,
    /// A signal interrupted a blocking call.
    Interrupted,
    /// The handle names no live block of this pool (freed, reused, foreign or corrupt).
    BadRef,
    /// The segment itself failed a check.
    Segment(SegmentError),
}

impl std::fmt::Display for AllocError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AllocError::Full => f.write_str("pool is full"),
            AllocError::TooLarge => f.write_str("allocation larger than the pool"),
            AllocError::ZeroSize => f.write_str("zero-byte allocation"),
            AllocError::HoldTableFull => f.write_str("pool hold table is full"),
            AllocError::ProcessTableFull => f.write_str("too many processes use this pool"),
            AllocError::TimedOut => f.write_str("timed out waiting for pool space"),
            AllocError::Interrupted => f.write_str("interrupted by a signal"),
            AllocError::BadRef => f.write_str("block handle names no live block of this pool"),
            AllocError::Segment(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for AllocError {}

impl From<SegmentError> for AllocError {
    fn from(e: SegmentError) -> Self {
        AllocError::Segment(e)
    }
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
    (63 - size.leading_zeros()) as usize
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
}

/// A handle to a pool segment. Cheap to clone; `Send + Sync`.
#[derive(Debug, Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

/// One hold on a block by this process; dropping it releases the hold.
#[derive(Debug)]
pub struct Block {
    pool: Pool,
    r: BlockRef,
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
            inner: Arc::new(PoolInner {
                seg,
                id: name.id,
                me: AtomicU64::new(0),
            }),
        })
    }

    /// Opens an existing pool read-write.
    pub fn open(name: &SegmentName) -> Result<Pool, SegmentError> {
        let seg = Segment::open(name, DEFAULT_INIT_TIMEOUT, true)?;
        validate(&seg)?;
        Ok(Pool {
            inner: Arc::new(PoolInner {
                seg,
                id: name.id,
                me: AtomicU64::new(0),
            }),
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

    fn lock(&self, deadline: Option<Instant>) -> Result<RobustGuard<'_>, AllocError> {
        let g = self
            .header()
            .lock
            .lock_until(deadline, false)
            .map_err(|e| match e {
                LockError::TimedOut => AllocError::TimedOut,
                LockError::Interrupted => AllocError::Interrupted,
            })?;
        if g.recovered() {
            self.header().recoveries.fetch_add(1, Ordering::Relaxed);
            self.recover()?;
        }
        Ok(g)
    }

    // ---- holder registration ------------------------------------------------------------

    /// This process's holder id, registering it (under the lock) if needed.
    fn my_holder(&self) -> Result<u32, AllocError> {
        let me = ProcessId::current();
        let cached = self.inner.me.load(Ordering::Relaxed);
        if cached != 0 && (cached >> 32) as u32 == me.pid {
            return Ok(cached as u32 - 1);
        }
        let tag = me.packed();
        for pass in 0..2 {
            for i in 0..PROC_SLOTS {
                let s = self.proc_slot(i);
                let v = s.load(Ordering::Relaxed);
                if v == tag
                    || (v == 0
                        && s.compare_exchange(0, tag, Ordering::Relaxed, Ordering::Relaxed)
                            .is_ok())
                {
                    self.inner.me.store(
                        (u64::from(me.pid) << 32) | (i as u64 + 1),
                        Ordering::Relaxed,
                    );
                    return Ok(i as u32);
                }
            }
            if pass == 0 {
                self.sweep_locked();
            }
        }
        Err(AllocError::ProcessTableFull)
    }

    // ---- hold table ---------------------------------------------------------------------

    fn find_hold(&self, block: u64, holder: u32) -> Option<&HoldEntry> {
        let h = self.header();
        let t = h.active.load(Ordering::Relaxed);
        let n = h.hold_slots.load(Ordering::Relaxed);
        let mut i = hold_hash(block) & (n - 1);
        for _ in 0..n {
            let e = self.hold_entry(t, i);
            let b = e.block.load(Ordering::Relaxed);
            if b == EMPTY {
                return None;
            }
            if b == block && hv_holder(e.val.load(Ordering::Acquire)) == holder {
                return Some(e);
            }
            i = (i + 1) & (n - 1);
        }
        None
    }

    /// Adds `count` holds of `holder` on `block` (lock held).
    fn add_hold(&self, block: u64, holder: u32, count: u32) -> Result<(), AllocError> {
        if let Some(e) = self.find_hold(block, holder) {
            let mut v = e.val.load(Ordering::Acquire);
            loop {
                let c = hv_count(v)
                    .checked_add(count)
                    .filter(|&c| u64::from(c) <= HV_COUNT_MASK)
                    .ok_or(AllocError::HoldTableFull)?;
                if hv_holder(v) != holder {
                    // Handed over lock-free meanwhile: insert a fresh entry instead.
                    break;
                }
                match e.val.compare_exchange(
                    v,
                    hv_with_count(v, c),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => return Ok(()),
                    Err(cur) => v = cur,
                }
            }
        }
        let h = self.header();
        let n = h.hold_slots.load(Ordering::Relaxed);
        if (h.hold_used.load(Ordering::Relaxed) + 1) * 4 > n * 3 {
            self.rehash();
            if (h.hold_live.load(Ordering::Relaxed) + 1) * 4 > n * 3 {
                return Err(AllocError::HoldTableFull);
            }
        }
        let t = h.active.load(Ordering::Relaxed);
        let mut i = hold_hash(block) & (n - 1);
        loop {
            let e = self.hold_entry(t, i);
            let b = e.block.load(Ordering::Relaxed);
            if b == EMPTY || b == TOMB {
                e.val.store(
                    hv_make(holder, count, h.hold_tgen.load(Ordering::Relaxed)),
                    Ordering::Relaxed,
                );
                // Publish last: a crash before this store leaves no entry.
                e.block.store(block, Ordering::Relaxed);
                if b == EMPTY {
                    h.hold_used.fetch_add(1, Ordering::Relaxed);
                }
                h.hold_live.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            i = (i + 1) & (n - 1);
        }
    }

    /// Moves one hold on `block` from `from` to `to` (lock held). The common case, a single
    /// hold and none yet for `to`, is one store of the entry's `val` word (holder and count
    /// change together), so a crash leaves the hold with one holder or the other; the
    /// block's refcount does not change.
    fn retag_hold(&self, block: u64, from: u32, to: u32) -> Result<(), AllocError> {
        let e = self.find_hold(block, from).ok_or(AllocError::BadRef)?;
        let v = e.val.load(Ordering::Acquire);
        if hv_count(v) == 1
            && self.find_hold(block, to).is_none()
            && e.val
                .compare_exchange(
                    v,
                    hv_with_holder(v, to),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
        {
            return Ok(());
        }
        self.add_hold(block, to, 1)?;
        self.drop_hold(block, from);
        Ok(())
    }

    /// This process's holder id if it is registered already (no lock).
    fn cached_holder(&self) -> Option<u32> {
        let cached = self.inner.me.load(Ordering::Relaxed);
        (cached != 0 && (cached >> 32) as u32 == ProcessId::current().pid)
            .then(|| cached as u32 - 1)
    }

    /// Moves one hold on `r` from `from` to `to` without the pool lock, when the entry holds
    /// exactly that one hold: a single CAS on its value word (module docs, "Lock-free
    /// hand-over"). False means "take the locked path" (nothing changed).
    fn retag_fast(&self, r: BlockRef, from: u32, to: u32) -> bool {
        // The block cannot be freed meanwhile: the hold being moved keeps it alive.
        let Ok(off) = self.check_ref(r) else {
            return false;
        };
        let h = self.header();
        let t = h.active.load(Ordering::Acquire);
        let n = h.hold_slots.load(Ordering::Relaxed);
        let mut i = hold_hash(off) & (n - 1);
        for _ in 0..n {
            let e = self.hold_entry(t, i);
            let b = e.block.load(Ordering::Acquire);
            if b == EMPTY {
                return false;
            }
            if b == off {
                let v = e.val.load(Ordering::Acquire);
                if v & HV_FROZEN == 0 && hv_holder(v) == from && hv_count(v) == 1 {
                    // SYNC POINT: AcqRel pairs with the rehash's fetch_or (FROZEN) and with
                    // the locked CAS updates of the same word.
                    return e
                        .val
                        .compare_exchange(
                            v,
                            hv_with_holder(v, to),
                            Ordering::AcqRel,
                            Ordering::Relaxed,
                        )
                        .is_ok();
                }
            }
            i = (i + 1) & (n - 1);
        }
        false
    }

    /// Removes one hold of `holder` on `block`; returns false if there was none (lock held).
    fn drop_hold(&self, block: u64, holder: u32) -> bool {
        let Some(e) = self.find_hold(block, holder) else {
            return false;
        };
        let mut v = e.val.load(Ordering::Acquire);
        loop {
            if hv_count(v) <= 1 {
                // The last hold of this entry is ours alone: nobody else changes it.
                e.block.store(TOMB, Ordering::Relaxed);
                self.header().hold_live.fetch_sub(1, Ordering::Relaxed);
                return true;
            }
            match e.val.compare_exchange(
                v,
                hv_with_count(v, hv_count(v) - 1),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(cur) if hv_holder(cur) == holder => v = cur,
                // Its holder changed under us (a lock-free hand-over of another hold):
                // look again.
                Err(_) => return self.drop_hold(block, holder),
            }
        }
    }

    /// Copies live holds into the inactive table and flips `active` in one store, so a
    /// crash at any point leaves one complete table.
    fn rehash(&self) {
        let h = self.header();
        let n = h.hold_slots.load(Ordering::Relaxed);
        let from = h.active.load(Ordering::Relaxed);
        let to = from ^ 1;
        let tgen = h.hold_tgen.load(Ordering::Relaxed).wrapping_add(1) & HV_TGEN_MASK as u32;
        for i in 0..n {
            let e = self.hold_entry(to, i);
            e.block.store(EMPTY, Ordering::Relaxed);
            e.val.store(0, Ordering::Relaxed);
        }
        let mut live = 0;
        for i in 0..n {
            let e = self.hold_entry(from, i);
            let b = e.block.load(Ordering::Relaxed);
            if b == EMPTY || b == TOMB {
                continue;
            }
            // Freeze the source: a lock-free hand-over after this point fails its CAS.
            let v = hv_with_tgen(e.val.fetch_or(HV_FROZEN, Ordering::AcqRel), tgen);
            let mut j = hold_hash(b) & (n - 1);
            loop {
                let d = self.hold_entry(to, j);
                if d.block.load(Ordering::Relaxed) == EMPTY {
                    d.val.store(v, Ordering::Relaxed);
                    d.block.store(b, Ordering::Release);
                    break;
                }
                j = (j + 1) & (n - 1);
            }
            live += 1;
        }
        h.hold_tgen.store(tgen, Ordering::Relaxed);
        h.active.store(to, Ordering::Release);
        h.hold_live.store(live, Ordering::Relaxed);
        h.hold_used.store(live, Ordering::Relaxed);
    }

    // ---- free lists (derived) -----------------------------------------------------------

    fn list_push(&self, off: u64, size: u64) -> Result<(), AllocError> {
        let h = self.header();
        let head = &h.free_heads[class_of(size)];
        let b = self.bh(off)?;
        let old = head.load(Ordering::Relaxed);
        b.prev_free.store(0, Ordering::Relaxed);
        b.next_free.store(old, Ordering::Relaxed);
        if old != 0 {
            self.bh(old)?.prev_free.store(off, Ordering::Relaxed);
        }
        head.store(off, Ordering::Relaxed);
        h.free_blocks.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn list_remove(&self, off: u64, size: u64) -> Result<(), AllocError> {
        let h = self.header();
        let b = self.bh(off)?;
        let (p, n) = (
            b.prev_free.load(Ordering::Relaxed),
            b.next_free.load(Ordering::Relaxed),
        );
        if p != 0 {
            self.bh(p)?.next_free.store(n, Ordering::Relaxed);
        } else {
            h.free_heads[class_of(size)].store(n, Ordering::Relaxed);
        }
        if n != 0 {
            self.bh(n)?.prev_free.store(p, Ordering::Relaxed);
        }
        h.free_blocks.fetch_sub(1, Ordering::Relaxed);
        Ok(())
    }

    /// Finds a free block of at least `need` bytes (lock held).
    fn find_free(&self, need: u64) -> Result<Option<(u64, u64)>, AllocError> {
        let h = self.header();
        let c = class_of(need);
        // In the exact class blocks may be too small: scan a few.
        let mut off = h.free_heads[c].load(Ordering::Relaxed);
        let mut steps = 0;
        while off != 0 && steps < 64 {
            let size = self.bh(off)?.size_state.load(Ordering::Relaxed) & !FLAG_MASK;
            if size >= need {
                return Ok(Some((off, size)));
            }
            off = self.bh(off)?.next_free.load(Ordering::Relaxed);
            steps += 1;
        }
        for head in &h.free_heads[c + 1..] {
            let off = head.load(Ordering::Relaxed);
            if off != 0 {
                let size = self.bh(off)?.size_state.load(Ordering::Relaxed) & !FLAG_MASK;
                return Ok(Some((off, size)));
            }
        }
        // Rare: the exact class held a fitting block past the scan limit.
        let mut off = h.free_heads[c].load(Ordering::Relaxed);
        while off != 0 {
            let size = self.bh(off)?.size_state.load(Ordering::Relaxed) & !FLAG_MASK;
            if size >= need {
                return Ok(Some((off, size)));
            }
            off = self.bh(off)?.next_free.load(Ordering::Relaxed);
        }
        Ok(None)
    }

    // ---- allocation ---------------------------------------------------------------------

    /// Allocates `len` bytes (contents unspecified). Fails with `Full` when no block fits,
    /// after sweeping holds of dead processes once.
    pub fn alloc(&self, len: usize) -> Result<Block, AllocError> {
        self.alloc_inner(len, None)
    }

    /// Allocates `len` zeroed bytes.
    pub fn alloc_zeroed(&self, len: usize) -> Result<Block, AllocError> {
        let mut b = self.alloc(len)?;
        b.as_mut_slice().fill(0);
        Ok(b)
    }

    /// Allocates, waiting up to `timeout` (`None`: forever) for other holders to free space.
    pub fn alloc_timeout(
        &self,
        len: usize,
        timeout: Option<Duration>,
    ) -> Result<Block, AllocError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let h = self.header();
        loop {
            let seen = h.frees.load(Ordering::Acquire);
            match self.alloc_inner(len, deadline) {
                Err(AllocError::Full) => {}
                r => return r,
            }
            let opts = WaitOpts {
                deadline,
                poll_every: Some(Duration::from_millis(100)),
                ..Default::default()
            };
            match h.free_wait.wait_until(
                || (h.frees.load(Ordering::Acquire) != seen).then_some(()),
                &opts,
            ) {
                Ok(()) => {}
                Err(WaitError::TimedOut) => {
                    // One last try: a poll slice may have ended right at the deadline.
                    return self.alloc_inner(len, None).map_err(|e| {
                        if e == AllocError::Full {
                            AllocError::TimedOut
                        } else {
                            e
                        }
                    });
                }
                Err(WaitError::Interrupted) => return Err(AllocError::Interrupted),
            }
        }
    }

    fn alloc_inner(&self, len: usize, deadline: Option<Instant>) -> Result<Block, AllocError> {
        if len == 0 {
            return Err(AllocError::ZeroSize);
        }
        let need = round_up(
            (len as u64)
                .checked_add(BLOCK_HDR)
                .ok_or(AllocError::TooLarge)?,
            ALIGN,
        )
        .max(MIN_BLOCK);
        let h = self.header();
        if need > h.heap_end.load(Ordering::Relaxed) - h.heap_start.load(Ordering::Relaxed) {
            return Err(AllocError::TooLarge);
        }
        let _g = self.lock(deadline)?;
        let holder = self.my_holder()?;
        let found = match self.find_free(need)? {
            Some(f) => Some(f),
            None => {
                if self.sweep_locked() > 0 {
                    self.find_free(need)?
                } else {
                    None
                }
            }
        };
        let Some((off, size)) = found else {
            return Err(AllocError::Full);
        };
        // Room for the hold first, so that failing there changes nothing.
        let hn = h.hold_slots.load(Ordering::Relaxed);
        if (h.hold_live.load(Ordering::Relaxed) + 1) * 4 > hn * 3 {
            self.rehash();
            if (h.hold_live.load(Ordering::Relaxed) + 1) * 4 > hn * 3 {
                return Err(AllocError::HoldTableFull);
            }
        }
        self.list_remove(off, size)?;
        let b = self.bh(off)?;
        let mut used = size;
        if size - need >= MIN_BLOCK {
            let rest = off + need;
            let rb = self.bh(rest)?;
            rb.size_state.store((size - need) | TAG, Ordering::Relaxed);
            rb.prev_size.store(need, Ordering::Relaxed);
            rb.refcount.store(0, Ordering::Relaxed);
            // One store splits the block and marks the head used.
            b.size_state.store(need | USED | TAG, Ordering::Relaxed);
            self.bh(rest + size - need)?
                .prev_size
                .store(size - need, Ordering::Relaxed);
            self.list_push(rest, size - need)?;
            used = need;
        } else {
            b.size_state.store(size | USED | TAG, Ordering::Relaxed);
        }
        let gen = h.gen.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
        b.gen.store(gen, Ordering::Relaxed);
        b.len.store(len as u64, Ordering::Relaxed);
        b.refcount.store(1, Ordering::Relaxed);
        self.add_hold(off, holder, 1)?;
        h.used_bytes.fetch_add(used, Ordering::Relaxed);
        h.used_blocks.fetch_add(1, Ordering::Relaxed);
        let r = BlockRef {
            segment: self.id(),
            offset: off + BLOCK_HDR,
            len: len as u64,
            gen,
            _pad: 0,
        };
        Ok(Block {
            pool: self.clone(),
            r,
        })
    }

    /// Checks that `r` names a live block of this pool (lock held); returns its header offset.
    fn check_ref(&self, r: BlockRef) -> Result<u64, AllocError> {
        if r.segment != self.id() || r.offset < BLOCK_HDR {
            return Err(AllocError::BadRef);
        }
        let off = r.offset - BLOCK_HDR;
        let b = self.bh(off).map_err(|_| AllocError::BadRef)?;
        let ss = b.size_state.load(Ordering::Relaxed);
        let h = self.header();
        if ss & (USED | TAG) != (USED | TAG)
            || off == h.heap_end.load(Ordering::Relaxed)
            || b.gen.load(Ordering::Relaxed) != r.gen
            || b.len.load(Ordering::Relaxed) != r.len
            || r.len > (ss & !FLAG_MASK) - BLOCK_HDR
        {
            return Err(AllocError::BadRef);
        }
        Ok(off)
    }

    /// Pointer to the data of `r` after a bounds check against this pool's segment, without
    /// taking a hold: the caller's protocol must keep the block alive (another hold) while
    /// it uses the pointer.
    pub fn data_ptr(&self, r: BlockRef) -> Result<*mut u8, AllocError> {
        if r.segment != self.id() || r.offset < BLOCK_HDR {
            return Err(AllocError::BadRef);
        }
        self.inner
            .seg
            .check_range(r.offset as usize, r.len as usize, 1)
            .map_err(|_| AllocError::BadRef)?;
        // SAFETY: check_range proved [offset, offset + len) lies inside the mapping.
        Ok(unsafe { self.inner.seg.base().add(r.offset as usize) })
    }

    /// Takes another hold (for this process) on the live block `r`.
    pub fn block(&self, r: BlockRef) -> Result<Block, AllocError> {
        let _g = self.lock(None)?;
        let off = self.check_ref(r)?;
        let holder = self.my_holder()?;
        self.add_hold(off, holder, 1)?;
        self.bh(off)?.refcount.fetch_add(1, Ordering::Relaxed);
        Ok(Block {
            pool: self.clone(),
            r,
        })
    }

    /// Turns one in-flight hold on `r` into a hold of this process.
    pub fn claim_transit(&self, r: BlockRef) -> Result<Block, AllocError> {
        if let Some(me) = self.cached_holder() {
            if self.retag_fast(r, TRANSIT, me) {
                return Ok(Block {
                    pool: self.clone(),
                    r,
                });
            }
        }
        let _g = self.lock(None)?;
        let off = self.check_ref(r)?;
        let holder = self.my_holder()?;
        self.retag_hold(off, TRANSIT, holder)?;
        Ok(Block {
            pool: self.clone(),
            r,
        })
    }

    /// Drops one in-flight hold on `r` (a channel destroyed with the message undelivered).
    pub fn release_transit(&self, r: BlockRef) -> Result<(), AllocError> {
        let _g = self.lock(None)?;
        let off = self.check_ref(r)?;
        if !self.drop_hold(off, TRANSIT) {
            return Err(AllocError::BadRef);
        }
        self.unref(off)
    }

    fn hand_to_transit(&self, r: BlockRef) -> Result<(), AllocError> {
        if let Some(me) = self.cached_holder() {
            if self.retag_fast(r, me, TRANSIT) {
                return Ok(());
            }
        }
        let _g = self.lock(None)?;
        let off = self.check_ref(r)?;
        let holder = self.my_holder()?;
        self.retag_hold(off, holder, TRANSIT)
    }

    fn release(&self, r: BlockRef) {
        let Ok(_g) = self.lock(None) else { return };
        let Ok(off) = self.check_ref(r) else { return };
        let Ok(holder) = self.my_holder() else { return };
        if self.drop_hold(off, holder) {
            let _ = self.unref(off);
        }
    }

    /// One hold on the block at `off` is gone: decrement, free at zero (lock held).
    fn unref(&self, off: u64) -> Result<(), AllocError> {
        let b = self.bh(off)?;
        let rc = b.refcount.load(Ordering::Relaxed).saturating_sub(1);
        b.refcount.store(rc, Ordering::Relaxed);
        if rc == 0 {
            self.free_block(off)?;
        }
        Ok(())
    }

    /// Marks a used block free and merges it with free neighbours (lock held).
    fn free_block(&self, off: u64) -> Result<(), AllocError> {
        let h = self.header();
        let b = self.bh(off)?;
        let mut size = b.size_state.load(Ordering::Relaxed) & !FLAG_MASK;
        h.used_bytes.fetch_sub(size, Ordering::Relaxed);
        h.used_blocks.fetch_sub(1, Ordering::Relaxed);
        b.size_state.store(size | TAG, Ordering::Relaxed);
        let mut start = off;
        let next = self.bh(off + size)?;
        let nss = next.size_state.load(Ordering::Relaxed);
        if nss & USED == 0 {
            let nsize = nss & !FLAG_MASK;
            self.list_remove(off + size, nsize)?;
            size += nsize;
            b.size_state.store(size | TAG, Ordering::Relaxed);
        }
        let ps = b.prev_size.load(Ordering::Relaxed);
        if ps != 0 {
            let p = self.bh(off - ps)?;
            let pss = p.size_state.load(Ordering::Relaxed);
            if pss & USED == 0 && pss & !FLAG_MASK == ps {
                self.list_remove(off - ps, ps)?;
                start = off - ps;
                size += ps;
                p.size_state.store(size | TAG, Ordering::Relaxed);
            }
        }
        self.bh(start + size)?
            .prev_size
            .store(size, Ordering::Relaxed);
        self.list_push(start, size)?;
        // SYNC POINT: Release pairs with the Acquire loads in `alloc_timeout`.
        h.frees.fetch_add(1, Ordering::Release);
        h.free_wait.notify_all();
        Ok(())
    }

    // ---- death ----------------------------------------------------------------------------

    /// Releases every hold of processes that died, freeing blocks nobody else holds.
    /// Returns the number of dead processes swept.
    pub fn sweep(&self) -> usize {
        match self.lock(None) {
            Ok(_g) => self.sweep_locked(),
            Err(_) => 0,
        }
    }

    fn sweep_locked(&self) -> usize {
        let mut dead = Vec::new();
        for i in 0..PROC_SLOTS {
            let v = self.proc_slot(i).load(Ordering::Relaxed);
            if v != 0 && !ProcessId::from_packed(v).is_alive() {
                dead.push(i as u32);
            }
        }
        if dead.is_empty() {
            return 0;
        }
        let h = self.header();
        let n = h.hold_slots.load(Ordering::Relaxed);
        let t = h.active.load(Ordering::Relaxed);
        for i in 0..n {
            let e = self.hold_entry(t, i);
            let b = e.block.load(Ordering::Relaxed);
            if b == EMPTY || b == TOMB {
                continue;
            }
            let v = e.val.load(Ordering::Acquire);
            if dead.contains(&hv_holder(v)) {
                e.block.store(TOMB, Ordering::Relaxed);
                h.hold_live.fetch_sub(1, Ordering::Relaxed);
                if let Ok(bh) = self.bh(b) {
                    let rc = bh
                        .refcount
                        .load(Ordering::Relaxed)
                        .saturating_sub(hv_count(v));
                    bh.refcount.store(rc, Ordering::Relaxed);
                    if rc == 0 {
                        let _ = self.free_block(b);
                    }
                }
            }
        }
        for &i in &dead {
            self.proc_slot(i as usize).store(0, Ordering::Relaxed);
        }
        dead.len()
    }

    /// Rebuilds all derived state from the truth (block chain + hold table) after a process
    /// died holding the lock. See the module docs.
    fn recover(&self) -> Result<(), AllocError> {
        let h = self.header();
        let (start, end) = (
            h.heap_start.load(Ordering::Relaxed),
            h.heap_end.load(Ordering::Relaxed),
        );
        // 1. The chain: collect blocks, zero refcounts.
        let mut blocks: Vec<(u64, u64, bool)> = Vec::new();
        let mut off = start;
        while off < end {
            let ss = self.bh(off)?.size_state.load(Ordering::Relaxed);
            let size = ss & !FLAG_MASK;
            if ss & TAG != TAG || size < MIN_BLOCK || off + size > end {
                return Err(AllocError::Segment(SegmentError::Corrupt));
            }
            self.bh(off)?.refcount.store(0, Ordering::Relaxed);
            blocks.push((off, size, ss & USED != 0));
            off += size;
        }
        // 2. Holds: drop entries naming no used block, count the rest.
        self.rehash();
        let n = h.hold_slots.load(Ordering::Relaxed);
        let t = h.active.load(Ordering::Relaxed);
        for i in 0..n {
            let e = self.hold_entry(t, i);
            let b = e.block.load(Ordering::Relaxed);
            if b == EMPTY || b == TOMB {
                continue;
            }
            match blocks.binary_search_by_key(&b, |x| x.0) {
                Ok(k) if blocks[k].2 => {
                    let bh = self.bh(b)?;
                    let c = hv_count(e.val.load(Ordering::Acquire));
                    bh.refcount
                        .store(bh.refcount.load(Ordering::Relaxed) + c, Ordering::Relaxed);
                }
                _ => {
                    e.block.store(TOMB, Ordering::Relaxed);
                    h.hold_live.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
        // 3. Used blocks nobody holds become free; merge free runs; rebuild lists, counters.
        for head in &h.free_heads {
            head.store(0, Ordering::Relaxed);
        }
        h.free_blocks.store(0, Ordering::Relaxed);
        let (mut used_bytes, mut used_blocks) = (0, 0);
        let mut prev = 0u64;
        let mut i = 0;
        while i < blocks.len() {
            let (off, mut size, used) = blocks[i];
            let bh = self.bh(off)?;
            let used = used && bh.refcount.load(Ordering::Relaxed) > 0;
            i += 1;
            if used {
                used_bytes += size;
                used_blocks += 1;
            } else {
                while i < blocks.len() {
                    let (o2, s2, u2) = blocks[i];
                    if u2 && self.bh(o2)?.refcount.load(Ordering::Relaxed) > 0 {
                        break;
                    }
                    size += s2;
                    i += 1;
                }
                bh.size_state.store(size | TAG, Ordering::Relaxed);
                self.list_push(off, size)?;
            }
            bh.prev_size.store(prev, Ordering::Relaxed);
            prev = size;
        }
        self.bh(end)?.prev_size.store(prev, Ordering::Relaxed);
        h.used_bytes.store(used_bytes, Ordering::Relaxed);
        h.used_blocks.store(used_blocks, Ordering::Relaxed);
        h.frees.fetch_add(1, Ordering::Release);
        h.free_wait.notify_all();
        Ok(())
    }

    /// Checks every invariant of the pool under its lock: the chain tiles the heap, no two
    /// free blocks touch, `prev_size` and the free lists match the chain, each used block's
    /// refcount equals its holds, and the counters add up. Returns a description of the
    /// first violation.
    pub fn verify(&self) -> Result<(), String> {
        let _g = self.lock(None).map_err(|e| e.to_string())?;
        let h = self.header();
        let (start, end) = (
            h.heap_start.load(Ordering::Relaxed),
            h.heap_end.load(Ordering::Relaxed),
        );
        let mut holds = std::collections::HashMap::<u64, u64>::new();
        let t = h.active.load(Ordering::Relaxed);
        let mut live = 0;
        for i in 0..h.hold_slots.load(Ordering::Relaxed) {
            let e = self.hold_entry(t, i);
            let b = e.block.load(Ordering::Relaxed);
            if b != EMPTY && b != TOMB {
                *holds.entry(b).or_default() += u64::from(hv_count(e.val.load(Ordering::Acquire)));
                live += 1;
            }
        }
        if live != h.hold_live.load(Ordering::Relaxed) {
            return Err(format!(
                "hold_live {} but {live} live entries",
                h.hold_live.load(Ordering::Relaxed)
            ));
        }
        let (mut off, mut prev, mut prev_free) = (start, 0u64, false);
        let (mut used, mut nused, mut free_set) = (0u64, 0u64, std::collections::HashSet::new());
        while off < end {
            let b = self.bh(off).map_err(|e| e.to_string())?;
            let ss = b.size_state.load(Ordering::Relaxed);
            let size = ss & !FLAG_MASK;
            if ss & TAG != TAG || size < MIN_BLOCK || off + size > end {
                return Err(format!("bad header at {off}: {ss:#x}"));
            }
            if b.prev_size.load(Ordering::Relaxed) != prev {
                return Err(format!("prev_size at {off}"));
            }
            let is_free = ss & USED == 0;
            if is_free {
                if prev_free {
                    return Err(format!("adjacent free blocks at {off}"));
                }
                free_set.insert(off);
                if holds.contains_key(&off) {
                    return Err(format!("free block {off} has holds"));
                }
            } else {
                let want = holds.remove(&off).unwrap_or(0);
                if want == 0 || u64::from(b.refcount.load(Ordering::Relaxed)) != want {
                    return Err(format!(
                        "block {off}: refcount {} holds {want}",
                        b.refcount.load(Ordering::Relaxed)
                    ));
                }
                used += size;
                nused += 1;
            }
            prev = size;
            prev_free = is_free;
            off += size;
        }
        if off != end
            || self
                .bh(end)
                .map_err(|e| e.to_string())?
                .prev_size
                .load(Ordering::Relaxed)
                != prev
        {
            return Err("chain does not end at the sentinel".into());
        }
        if !holds.is_empty() {
            return Err(format!("holds on {} non-blocks", holds.len()));
        }
        if used != h.used_bytes.load(Ordering::Relaxed)
            || nused != h.used_blocks.load(Ordering::Relaxed)
        {
            return Err("used counters disagree with the chain".into());
        }
        let mut listed = 0;
        for (c, head) in h.free_heads.iter().enumerate() {
            let (mut o, mut p) = (head.load(Ordering::Relaxed), 0);
            while o != 0 {
                let b = self.bh(o).map_err(|e| e.to_string())?;
                if !free_set.contains(&o)
                    || class_of(b.size_state.load(Ordering::Relaxed) & !FLAG_MASK) != c
                    || b.prev_free.load(Ordering::Relaxed) != p
                {
                    return Err(format!("free list {c} broken at {o}"));
                }
                listed += 1;
                if listed > free_set.len() {
                    return Err("free list cycle".into());
                }
                p = o;
                o = b.next_free.load(Ordering::Relaxed);
            }
        }
        if listed != free_set.len() || listed as u64 != h.free_blocks.load(Ordering::Relaxed) {
            return Err(format!("{listed} listed, {} free blocks", free_set.len()));
        }
        Ok(())
    }

    /// How many times a dead lock holder's state was repaired (for tests and inspectors).
    pub fn recoveries(&self) -> u32 {
        self.header().recoveries.load(Ordering::Relaxed)
    }

    /// Current figures; see [`stats_of`].
    pub fn stats(&self) -> PoolStats {
        stats_of(&self.inner.seg).unwrap_or_default()
    }

    /// `(used, capacity)` bytes of the heap: two atomic loads, for hot paths (`stats` walks
    /// every block).
    pub fn usage(&self) -> (u64, u64) {
        let h = self.header();
        let cap = h.heap_end.load(Ordering::Relaxed) - h.heap_start.load(Ordering::Relaxed);
        (h.used_bytes.load(Ordering::Relaxed), cap)
    }

    /// Rehashes the hold table now (tests of the lock-free hand-over).
    #[doc(hidden)]
    pub fn force_rehash(&self) {
        if let Ok(_g) = self.lock(None) {
            self.rehash();
        }
    }

    /// How many times the hold table was rehashed (mod 2^31; tests).
    #[doc(hidden)]
    pub fn hold_generation(&self) -> u32 {
        self.header().hold_tgen.load(Ordering::Relaxed)
    }

    /// Leaks this process's hold on `b` as if the process had died (tests of sweeps).
    #[doc(hidden)]
    pub fn abandon(b: Block) {
        let b = std::mem::ManuallyDrop::new(b);
        // SAFETY: `b` is never used or dropped again; the pool handle is moved out once, so
        // only the hold leaks (as a dead process would leak it), not the mapping.
        drop(unsafe { std::ptr::read(&b.pool) });
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // The last handle of this process gives its process slot back if it holds nothing.
        if Arc::strong_count(&self.inner) != 1 || !self.inner.seg.writable() {
            return;
        }
        let me = self.inner.me.load(Ordering::Relaxed);
        if me == 0 || (me >> 32) as u32 != ProcessId::current().pid {
            return;
        }
        let slot = me as u32 - 1;
        let Ok(_g) = self.lock(None) else { return };
        let h = self.header();
        let t = h.active.load(Ordering::Relaxed);
        for i in 0..h.hold_slots.load(Ordering::Relaxed) {
            let e = self.hold_entry(t, i);
            let b = e.block.load(Ordering::Relaxed);
            if b != EMPTY && b != TOMB && hv_holder(e.val.load(Ordering::Acquire)) == slot {
                return;
            }
        }
        self.proc_slot(slot as usize).store(0, Ordering::Relaxed);
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

/// Data offset and length of the pool's first block when it is in use (from any mapping,
/// read-only is enough): where a DDict manager's index header lives.
pub fn first_block_of(seg: &Segment) -> Result<Option<(u64, u64)>, SegmentError> {
    validate(seg)?;
    // SAFETY: validated above; PoolHeader is all atomics.
    let h: &PoolHeader = unsafe { seg.at(HEADER_SIZE)? };
    let start = h.heap_start.load(Ordering::Relaxed);
    // SAFETY: heap_start was checked against the layout by validate; BlockHeader is atomics.
    let b: &BlockHeader = unsafe { seg.at(start as usize)? };
    if b.size_state.load(Ordering::Relaxed) & USED == 0 {
        return Ok(None);
    }
    Ok(Some((start + BLOCK_HDR, b.len.load(Ordering::Relaxed))))
}

/// Reads a pool's figures from any mapping of its segment (read-only is enough), without
/// taking the lock: counters are loaded, and the block chain is walked with every offset
/// checked, so a concurrent writer can only make the figures slightly stale.
pub fn stats_of(seg: &Segment) -> Result<PoolStats, SegmentError> {
    validate(seg)?;
    // SAFETY: validated above.
    let h: &PoolHeader = unsafe { seg.at(HEADER_SIZE)? };
    let (start, end) = (
        h.heap_start.load(Ordering::Relaxed),
        h.heap_end.load(Ordering::Relaxed),
    );
    let mut s = PoolStats {
        capacity: end - start,
        used: h.used_bytes.load(Ordering::Relaxed),
        blocks: h.used_blocks.load(Ordering::Relaxed),
        free_blocks: h.free_blocks.load(Ordering::Relaxed),
        holds: h.hold_live.load(Ordering::Relaxed),
        ..Default::default()
    };
    s.free = s.capacity.saturating_sub(s.used);
    let mut off = start;
    let mut steps = 0u64;
    while off < end && steps <= (end - start) / MIN_BLOCK {
        // SAFETY: `off` stays in [start, end) and 64-aligned (checked each step).
        let b: &BlockHeader = unsafe { seg.at(off as usize)? };
        let ss = b.size_state.load(Ordering::Relaxed);
        let size = ss & !FLAG_MASK;
        if size < MIN_BLOCK || !size.is_multiple_of(ALIGN) {
            break;
        }
        if ss & USED == 0 {
            s.largest_free = s.largest_free.max(size - BLOCK_HDR);
        }
        off += size;
        steps += 1;
    }
    let proc_off = h.proc_off.load(Ordering::Relaxed) as usize;
    for i in 0..PROC_SLOTS {
        // SAFETY: the process table was validated to lie in the segment.
        let w: &AtomicU64 = unsafe { seg.at(proc_off + i * 8)? };
        if w.load(Ordering::Relaxed) != 0 {
            s.processes += 1;
        }
    }
    Ok(s)
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
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as for as_slice; &mut self prevents aliasing within this process.
        unsafe { std::slice::from_raw_parts_mut(self.as_ptr(), self.len()) }
    }

    /// The pool it belongs to.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Another hold by this process on the same block.
    pub fn try_clone(&self) -> Result<Block, AllocError> {
        self.pool.block(self.r)
    }

    /// Hands the hold to "in flight" (a channel); the receiver claims it with
    /// [`Pool::claim_transit`]. On error the block is released.
    pub fn into_transit(self) -> Result<BlockRef, AllocError> {
        self.try_into_transit().map_err(|(e, _)| e)
    }

    /// Like [`into_transit`](Self::into_transit), but on error the block comes back.
    pub fn try_into_transit(self) -> Result<BlockRef, (AllocError, Block)> {
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
mod tests {
    use super::*;
    use crate::testing::{leftovers, test_runtime};

    fn pool(rt: u64, size: usize) -> Pool {
        Pool::create(&SegmentName::new(rt, 0, SegmentKind::Pool, 1), size).unwrap()
    }

    #[test]
    fn alloc_free_restores_everything() {
        let rt = test_runtime();
        let p = pool(rt, 1 << 20);
        let empty = p.stats();
        assert_eq!((empty.used, empty.blocks, empty.free_blocks), (0, 0, 1));
        let mut blocks = Vec::new();
        for len in [1usize, 7, 64, 65, 100, 4096, 10_000, 123_457] {
            let mut b = p.alloc(len).unwrap();
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % 64, 0);
            b.as_mut_slice().fill(len as u8);
            blocks.push(b);
        }
        p.verify().unwrap();
        for b in &blocks {
            assert!(b.as_slice().iter().all(|&x| x == b.len() as u8));
        }
        assert_eq!(p.stats().blocks, 8);
        let (s, (used, cap)) = (p.stats(), p.usage());
        assert!(used > 0 && (used, cap) == (s.used, s.capacity));
        // Free every other block, then the rest: merging must give one free block back.
        let odd: Vec<_> = blocks
            .iter()
            .skip(1)
            .step_by(2)
            .map(|b| b.block_ref())
            .collect();
        let mut keep = Vec::new();
        for (i, b) in blocks.into_iter().enumerate() {
            if i % 2 == 0 {
                drop(b);
            } else {
                keep.push(b);
            }
        }
        p.verify().unwrap();
        assert_eq!(keep.iter().map(|b| b.block_ref()).collect::<Vec<_>>(), odd);
        drop(keep);
        p.verify().unwrap();
        let s = p.stats();
        assert_eq!((s.used, s.blocks, s.free_blocks, s.holds), (0, 0, 1, 0));
        assert_eq!(s.largest_free, empty.largest_free);
        drop(p);
        assert!(leftovers(rt).is_empty());
    }

    #[test]
    fn full_pool_errors_and_keeps_earlier_blocks() {
        let rt = test_runtime();
        let p = pool(rt, 1 << 20);
        assert_eq!(p.alloc(0).unwrap_err(), AllocError::ZeroSize);
        assert_eq!(p.alloc(2 << 20).unwrap_err(), AllocError::TooLarge);
        let whole = p.stats().largest_free as usize;
        let big = p.alloc(whole).unwrap();
        assert_eq!(p.stats().largest_free, 0);
        assert_eq!(p.alloc(1).unwrap_err(), AllocError::Full);
        assert_eq!(
            p.alloc_timeout(1, Some(Duration::from_millis(10)))
                .unwrap_err(),
            AllocError::TimedOut
        );
        drop(big);
        let mut v = Vec::new();
        loop {
            match p.alloc(1000) {
                Ok(mut b) => {
                    b.as_mut_slice().fill(v.len() as u8);
                    v.push(b);
                }
                Err(e) => {
                    assert_eq!(e, AllocError::Full);
                    break;
                }
            }
        }
        assert!(v.len() > 100);
        for (i, b) in v.iter().enumerate() {
            assert!(b.as_slice().iter().all(|&x| x == i as u8));
        }
        v.truncate(v.len() / 2);
        assert!(p.alloc(1000).is_ok());
        p.verify().unwrap();
    }

    #[test]
    fn blocking_alloc_wakes_when_space_frees() {
        let rt = test_runtime();
        let p = pool(rt, 1 << 20);
        let big = p.alloc(p.stats().largest_free as usize).unwrap();
        let p2 = p.clone();
        let t = std::thread::spawn(move || p2.alloc_timeout(4096, None).map(|b| b.len()));
        // The waiter announces itself on the free wait queue before we free.
        while p.header().free_wait.waiters() == 0 {
            std::thread::yield_now();
        }
        drop(big);
        assert_eq!(t.join().unwrap(), Ok(4096));
    }

    #[test]
    fn holds_keep_blocks_alive_and_stale_refs_fail() {
        let rt = test_runtime();
        let p = pool(rt, 1 << 20);
        let mut a = p.alloc(100).unwrap();
        a.as_mut_slice()[0] = 42;
        let r = a.block_ref();
        let b = p.block(r).unwrap();
        let c = b.try_clone().unwrap();
        drop(a);
        assert_eq!(b.as_slice()[0], 42);
        assert_eq!(p.stats().blocks, 1);
        drop(b);
        drop(c);
        assert_eq!(p.stats().blocks, 0);
        assert_eq!(p.block(r).unwrap_err(), AllocError::BadRef);
        // Reuse of the same memory gets a new generation; the old handle stays refused.
        let d = p.alloc(100).unwrap();
        assert_eq!(d.block_ref().offset, r.offset);
        assert_ne!(d.block_ref().gen, r.gen);
        assert_eq!(p.block(r).unwrap_err(), AllocError::BadRef);
        for bad in [
            BlockRef { segment: 99, ..r },
            BlockRef { offset: 3, ..r },
            BlockRef {
                offset: u64::MAX - 10,
                ..r
            },
            BlockRef {
                len: 1 << 30,
                gen: d.block_ref().gen,
                ..r
            },
        ] {
            assert_eq!(p.block(bad).unwrap_err(), AllocError::BadRef);
        }
        p.verify().unwrap();
    }

    #[test]
    fn transit_moves_ownership() {
        let rt = test_runtime();
        let p = pool(rt, 1 << 20);
        let r = p.alloc(10).unwrap().into_transit().unwrap();
        assert_eq!(p.stats().blocks, 1);
        p.verify().unwrap();
        let b = p.claim_transit(r).unwrap();
        assert_eq!(p.claim_transit(r).unwrap_err(), AllocError::BadRef);
        drop(b);
        assert_eq!(p.stats().blocks, 0);
        let r = p.alloc(10).unwrap().into_transit().unwrap();
        p.release_transit(r).unwrap();
        assert_eq!(p.stats().blocks, 0);
        p.verify().unwrap();
    }

    #[test]
    fn open_from_another_handle_and_reject_garbage() {
        let rt = test_runtime();
        let p = pool(rt, 1 << 20);
        let q = Pool::open(p.name()).unwrap();
        let a = p.alloc(64).unwrap();
        let b = q.block(a.block_ref()).unwrap();
        assert_eq!(
            b.as_ptr() as usize - q.segment().base() as usize,
            a.block_ref().offset as usize
        );
        drop((a, b));
        assert_eq!(q.stats().blocks, 0);
        // Corrupt the pool header: opening must fail cleanly.
        p.header().hold_slots.store(3, Ordering::Relaxed);
        assert_eq!(Pool::open(p.name()).unwrap_err(), SegmentError::Corrupt);
        p.header().hold_slots.store(
            q.header().hold_off[1].load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
        p.header().magic.store(7, Ordering::Relaxed);
        assert_eq!(Pool::open(p.name()).unwrap_err(), SegmentError::BadMagic);
        assert_eq!(
            Pool::create(&SegmentName::new(rt, 0, SegmentKind::Pool, 2), 4096).unwrap_err(),
            SegmentError::BadSize
        );
    }

    #[test]
    fn dead_lock_holder_mid_alloc_is_repaired() {
        let rt = test_runtime();
        let p = pool(rt, 1 << 20);
        let keep = p.alloc(1000).unwrap();
        let lost = p.alloc(2000).unwrap();
        let lost_ref = lost.block_ref();
        // Simulate a process that died inside `free` after dropping the hold but before
        // freeing: remove the hold by hand, then leave the lock held by a dead pid.
        Pool::abandon(lost);
        {
            let _g = p.header().lock.lock();
            let holder = p.my_holder().unwrap();
            assert!(p.drop_hold(lost_ref.offset - BLOCK_HDR, holder));
        }
        assert!(p.verify().is_err());
        p.header().lock.abandon_as(ProcessId {
            pid: 0x3fff_fff0,
            start: 1,
        });
        let again = p.alloc(10).unwrap();
        assert_eq!(p.recoveries(), 1);
        p.verify().unwrap();
        assert_eq!(p.stats().blocks, 2);
        drop((keep, again));
        assert_eq!(p.stats().blocks, 0);
    }

    #[test]
    fn sweep_releases_dead_holders() {
        let rt = test_runtime();
        let p = pool(rt, 1 << 20);
        let a = p.alloc(1000).unwrap();
        let shared = p.block(a.block_ref()).unwrap();
        // Hand `a`'s hold to a fake dead process in slot 7.
        {
            let _g = p.header().lock.lock();
            let me = p.my_holder().unwrap();
            let off = a.block_ref().offset - BLOCK_HDR;
            p.drop_hold(off, me);
            p.proc_slot(7).store(
                ProcessId {
                    pid: 0x3fff_fff0,
                    start: 1,
                }
                .packed(),
                Ordering::Relaxed,
            );
            p.add_hold(off, 7, 1).unwrap();
        }
        Pool::abandon(a);
        p.verify().unwrap();
        assert_eq!(p.sweep(), 1);
        assert_eq!(p.stats().blocks, 1, "our own hold keeps it");
        drop(shared);
        assert_eq!(p.stats().blocks, 0);
        p.verify().unwrap();
    }

    #[test]
    fn many_threads_alloc_and_free() {
        let rt = test_runtime();
        let p = pool(rt, 4 << 20);
        let ts: Vec<_> = (0..4u64)
            .map(|t| {
                let p = p.clone();
                std::thread::spawn(move || {
                    let mut held = Vec::new();
                    let mut x = t + 1;
                    for i in 0..3000u64 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        if held.len() > 20 || (x % 3 == 0 && !held.is_empty()) {
                            let b: Block = held.swap_remove((x as usize / 3) % held.len());
                            assert!(b.as_slice().iter().all(|&v| v == (b.len() as u8 ^ t as u8)));
                        } else if let Ok(mut b) = p.alloc(1 + (x % 20_000) as usize) {
                            let v = b.len() as u8 ^ t as u8;
                            b.as_mut_slice().fill(v);
                            held.push(b);
                        }
                        let _ = i;
                    }
                })
            })
            .collect();
        for t in ts {
            t.join().unwrap();
        }
        p.verify().unwrap();
        assert_eq!(p.stats().blocks, 0);
    }

    #[test]
    fn hold_table_rehashes_and_reports_full() {
        let rt = test_runtime();
        let name = SegmentName::new(rt, 0, SegmentKind::Pool, 3);
        let p = Pool::create_with(&name, 1 << 20, PoolConfig { hold_slots: 64 }).unwrap();
        // Churn far more holds than slots through the table (tombstones force rehashes).
        for _ in 0..500 {
            let a = p.alloc(8).unwrap();
            let b = a.try_clone().unwrap();
            drop((a, b));
        }
        let mut v = Vec::new();
        let err = loop {
            match p.alloc(8) {
                Ok(b) => v.push(b),
                Err(e) => break e,
            }
        };
        assert_eq!(err, AllocError::HoldTableFull);
        assert_eq!(v.len(), 48, "3/4 of 64 slots");
        p.verify().unwrap();
    }

    #[test]
    fn lock_free_hand_overs_race_rehashes_without_losing_holds() {
        let rt = test_runtime();
        {
            let name = SegmentName::new(rt, 0, SegmentKind::Pool, 1);
            // A small hold table: the churn thread forces a rehash every few dozen holds.
            let p = Pool::create_with(&name, 4 << 20, PoolConfig { hold_slots: 64 }).unwrap();
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let churn = {
                let (p, stop) = (p.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let bs: Vec<Block> = (0..8).map(|_| p.alloc(64).unwrap()).collect();
                        let extra: Vec<Block> = bs.iter().map(|b| b.try_clone().unwrap()).collect();
                        p.force_rehash();
                        drop(bs);
                        p.force_rehash();
                        drop(extra);
                        n += 1;
                    }
                    n
                })
            };
            let movers: Vec<_> = (0..2)
                .map(|_| {
                    let p = p.clone();
                    std::thread::spawn(move || {
                        for i in 0..20_000u32 {
                            let mut b = p.alloc(128).unwrap();
                            b.as_mut_slice()[0] = i as u8;
                            let r = b.into_transit().unwrap();
                            let b = p.claim_transit(r).unwrap();
                            assert_eq!(b.as_slice()[0], i as u8);
                        }
                    })
                })
                .collect();
            for m in movers {
                m.join().unwrap();
            }
            stop.store(true, Ordering::Relaxed);
            let rounds = churn.join().unwrap();
            assert!(rounds > 0);
            println!("{} rehashes during the hand-overs", p.hold_generation());
            assert!(p.hold_generation() > 10, "the test must race rehashes");
            p.verify().unwrap();
            let s = p.stats();
            assert_eq!(
                (s.blocks, s.holds, s.used),
                (0, 0, 0),
                "every hold came back: {s:?}"
            );
        }
        assert!(leftovers(rt).is_empty());
    }
}
