//! A hash map in shared memory: the index of one DDict manager.
//!
//! # Layout (version 5)
//! A header block ([`KvHeader`], `#[repr(C)]`, magic + version) in the manager's pool holds a
//! robust mutex, the table reference (whose length gives the capacity) and counters. The table is an array of `Slot`s (open
//! addressing, linear probing, power-of-two capacity, grown at 70% load). A slot holds the
//! key's stable hash ([`stable_hash`]) and two block references: the key bytes and the value
//! bytes, each a block of the same pool.
//!
//! # Ownership
//! Blocks the index owns (header, table, keys, values) carry an *in-flight* hold
//! ([`TRANSIT`](crate::heap::TRANSIT)): no process owns them, so the death of the process
//! that stored a value does not free it, and a pool sweep leaves them alone. A reader's `get`
//! takes a hold of its own on the value block: the bytes it views stay valid after the key is
//! replaced or deleted (which only drops the index's hold), and go when the last hold does.
//! That hold is a read-only handle ([`Block::read_only`]): other readers in the same process
//! may view the same bytes.
//!
//! # Crash safety
//! Every change happens under the header's robust mutex. A slot becomes visible by writing
//! its atomic state word last (Release); a tombstone being reused is marked `BUSY` (skipped by
//! probes, made a tombstone again by recovery), never `EMPTY`; a value being replaced is
//! marked `REPLACING`. The table reference is double-buffered (the spare copy is written,
//! then a selector word flips) and carries the capacity, so that one store publishes a
//! resize.
//!
//! In-flight holds joining or leaving the index are named in the header's *journal* for
//! the length of the operation: blocks the index allocates itself (keys, tables) before
//! their hold goes in flight, a caller's value block right after (a value block may carry
//! other in-flight holds, a channel's, that a repair must never take; a death in the one
//! store between leaks that value's hold instead). The repair releases the in-flight hold of
//! every journaled block the index does not reference, so nothing a dead writer was moving
//! is lost or kept for ever.
//!
//! A locker that finds the mutex's holder dead marks `FLAG_REPAIR_DUE` and repairs: sweeps
//! dead processes' holds, resolves BUSY and REPLACING slots, settles the journal, recounts
//! the counters; the flag is cleared only when the repair succeeds, so a repair that fails
//! (or dies) is done by the next locker. A rekey that dies half way drops its entry.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::heap::{AllocError, Block, BlockRef, Pool};
use crate::lock::{RobustGuard, RobustMutex};
use crate::waitqueue::{WaitOpts, WaitQueue};

mod repair;

/// "DRGNKV01" as a little-endian u64.
pub const KV_MAGIC: u64 = u64::from_le_bytes(*b"DRGNKV01");
/// Layout version of the header and slots (2: slot state `BUSY`; 3: the table's capacity is
/// its reference's length, so one selector store publishes a resize; 4: the robust mutex keeps
/// the owner's identity in the lock word, [`crate::lock::MUTEX_LAYOUT`] 2; 5: the journal, the
/// `REPLACING` slot state and the `REPAIR_DUE` flag; 6: the change count and its wait queue;
/// 7: a rekey writes its new entry before dropping the old one, and the repair drops the old
/// entry of a rekey that died with both written).
pub const KV_VERSION: u32 = 7;
/// The index refuses writes while this flag is set.
pub const FLAG_FROZEN: u32 = 1;
/// A process died holding the index mutex and its repair has not completed yet: set before
/// the repair starts, cleared when it succeeds, so a repair that fails (or dies) is done by
/// the next locker.
pub const FLAG_REPAIR_DUE: u32 = 2;
/// Entries of the journal (see "Crash safety").
const JOURNAL: usize = 3;

const EMPTY: u32 = 0;
const FULL: u32 = 1;
const DELETED: u32 = 2;
/// A slot being written: probes skip over it like a tombstone, recovery makes it one. A
/// tombstone being reused goes DELETED -> BUSY -> FULL, never through EMPTY (which would end
/// every probe chain running through it, and the keys behind it would vanish).
const BUSY: u32 = 3;
/// A FULL slot whose value reference is being replaced (its key fields stay valid: probes
/// treat it as FULL). Recovery keeps the new value if it was completely written (it equals
/// journal entry 0), else puts back the old one (journal entry 1).
const REPLACING: u32 = 4;
const MIN_CAPACITY: u64 = 16;

/// 64-bit FNV-1a: the documented stable hash of a key's canonical bytes, the same in every
/// process, node and run.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The header block.
#[repr(C)]
#[derive(Debug)]
pub struct KvHeader {
    magic: AtomicU64,
    version: AtomicU32,
    flags: AtomicU32,
    lock: RobustMutex,
    /// Which of `tables` is current (0 or 1): the one store that publishes a resize.
    /// SYNC POINT: stored with Release after the spare reference; loaded with Acquire before
    /// reading it (`table_ref`).
    table_sel: AtomicU64,
    /// Two table references (segment, offset, len, gen); a table of `cap` slots is exactly
    /// `cap * 80` bytes long, so the reference alone gives the capacity.
    tables: [[AtomicU64; 4]; 2],
    /// Copy of the current table's capacity for readers of the counters (derived; written
    /// after the selector flips, rewritten by recovery; never used to index the table).
    capacity: AtomicU64,
    count: AtomicU64,
    tombstones: AtomicU64,
    bytes: AtomicU64,
    puts: AtomicU64,
    gets: AtomicU64,
    misses: AtomicU64,
    /// Oldest checkpoint in the DDict manager's working set (kept by the layer above).
    chkpt_oldest: AtomicU64,
    /// Newest checkpoint in the working set.
    chkpt_newest: AtomicU64,
    /// Changes of the index so far (puts, removals, working-set moves): what processes
    /// waiting for a key or a checkpoint watch (`wait_change`). SYNC POINT: bumped with
    /// Release after each change, read with Acquire.
    changes: AtomicU64,
    /// Where those processes sleep (woken on each change; no syscall when none sleeps).
    change_wq: WaitQueue,
    reserved: [AtomicU64; 2],
    /// Blocks whose in-flight hold is joining or leaving the index during the current
    /// operation: `(segment, offset, len, gen)`, `segment == 0` = unused. SYNC POINT: the
    /// segment word is stored last with Release (`journal_set`) and read first with Acquire
    /// (`repair`).
    journal: [[AtomicU64; 4]; JOURNAL],
}

/// One table entry (80 bytes; all-zero = EMPTY). Only `state` is atomic: the other fields
/// are read and written under the index mutex, and mean something only once `state` says
/// FULL.
#[repr(C)]
#[derive(Debug)]
struct Slot {
    /// EMPTY, FULL, DELETED or BUSY. SYNC POINT: FULL is stored with Release after the
    /// other fields (`fill_slot`), and read with Acquire before them (`state_of`): a process
    /// that dies at any point leaves either the old state or a complete entry.
    state: AtomicU32,
    /// Key length (the key block may be longer: empty keys get a 1-byte block).
    klen: u32,
    hash: u64,
    key: BlockRef,
    value: BlockRef,
}

const _: () = assert!(std::mem::size_of::<Slot>() == 80);

impl Slot {
    fn state_of(&self) -> u32 {
        self.state.load(Ordering::Acquire)
    }
}

/// Writes a new entry into slot `i` (EMPTY, DELETED or BUSY; index mutex held).
fn fill_slot(slots: &mut [Slot], i: usize, klen: u32, hash: u64, key: BlockRef, value: BlockRef) {
    let s = &mut slots[i];
    if s.state_of() != EMPTY {
        // A tombstone mid-chain: mark it BUSY first, never EMPTY (see `BUSY`).
        s.state.store(BUSY, Ordering::Relaxed);
    }
    crate::fault::point("kv.insert.busy");
    s.klen = klen;
    s.hash = hash;
    s.key = key;
    s.value = value;
    // SYNC POINT: Release publishes the fields above; pairs with the Acquire in `state_of`.
    s.state.store(FULL, Ordering::Release);
}

/// The table block at `p` as `cap` slots.
///
/// # Safety
/// `[p, p + cap * 80)` must be a live, 8-aligned block mapped for the returned lifetime,
/// which nobody else reads or writes meanwhile (the index mutex is held, or the block is not
/// published yet).
#[allow(clippy::mut_from_ref)]
unsafe fn slots_at<'a>(p: *mut u8, cap: usize) -> &'a mut [Slot] {
    // SAFETY: the caller guarantees bounds, alignment and exclusive access; any bit pattern
    // is a valid Slot (an AtomicU32 and plain integers).
    unsafe { std::slice::from_raw_parts_mut(p as *mut Slot, cap) }
}

/// Counters of one index, readable at any time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KvStats {
    /// Keys stored.
    pub count: u64,
    /// Key plus value bytes stored.
    pub bytes: u64,
    /// Table slots.
    pub capacity: u64,
    /// Successful puts.
    pub puts: u64,
    /// Gets that found their key.
    pub gets: u64,
    /// Gets that did not.
    pub misses: u64,
    /// Whether writes are refused.
    pub frozen: bool,
    /// Processes asleep in [`Kv::wait_change`] (waiting for a key or a checkpoint).
    pub change_waiters: u32,
}

/// Errors of index operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KvError {
    /// The manager's pool has no room for the key, the value or a larger table.
    #[error("no room in the pool for the key, the value or a larger index table")]
    Full,
    /// The index is frozen (read-only).
    #[error("the index is frozen (read-only)")]
    Frozen,
    /// The header or table is not a valid index of this version.
    #[error("the index header or table failed a consistency check")]
    Corrupt,
    /// Another pool error.
    #[error(transparent)]
    Alloc(AllocError),
}

impl From<AllocError> for KvError {
    fn from(e: AllocError) -> Self {
        match e {
            AllocError::Full | AllocError::TooLarge => KvError::Full,
            e => KvError::Alloc(e),
        }
    }
}

/// Figures of the DDict index a pool segment holds (its first block), read from any mapping
/// (read-only is enough); `None` when the pool is not a DDict manager's.
pub fn stats_in(seg: &crate::segment::Segment) -> Option<KvStats> {
    let (off, len) = crate::heap::first_block_of(seg).ok()??;
    if (len as usize) < std::mem::size_of::<KvHeader>() {
        return None;
    }
    // SAFETY: KvHeader is #[repr(C)] atomics (any bit pattern is valid); `at` checks bounds
    // and alignment; we only read.
    let h: &KvHeader = unsafe { seg.at(off as usize).ok()? };
    if h.magic.load(Ordering::Acquire) != KV_MAGIC
        || h.version.load(Ordering::Relaxed) != KV_VERSION
    {
        return None;
    }
    Some(KvStats {
        count: h.count.load(Ordering::Relaxed),
        bytes: h.bytes.load(Ordering::Relaxed),
        capacity: h.capacity.load(Ordering::Relaxed),
        puts: h.puts.load(Ordering::Relaxed),
        gets: h.gets.load(Ordering::Relaxed),
        misses: h.misses.load(Ordering::Relaxed),
        frozen: h.flags.load(Ordering::Relaxed) & FLAG_FROZEN != 0,
        change_waiters: h.change_wq.waiters(),
    })
}

/// A process's handle on an index (holds the header block).
#[derive(Debug)]
pub struct Kv {
    pool: Pool,
    header: Block,
}

fn ref_words(r: BlockRef) -> [u64; 4] {
    [r.segment, r.offset, r.len, u64::from(r.gen)]
}

impl Kv {
    /// Creates an empty index in `pool`.
    pub fn create(pool: &Pool) -> Result<Kv, KvError> {
        // Zeroed: all-zero is an unlocked mutex, an empty journal, no flags.
        let header = pool.alloc_zeroed(std::mem::size_of::<KvHeader>())?;
        let table = pool.alloc_zeroed(MIN_CAPACITY as usize * std::mem::size_of::<Slot>())?;
        let table_ref = table.into_transit()?;
        // The index's own hold on its header, next to this handle's.
        // SAFETY: neither handle is ever borrowed as bytes: the clone goes in flight at once
        // and the header is made read-only, only reached through `as_ptr` as atomics.
        let own = unsafe { header.try_clone() }?;
        own.into_transit()?;
        let kv = Kv {
            pool: pool.clone(),
            header: header.read_only(),
        };
        let h = kv.hdr();
        h.lock.init();
        for (w, v) in h.tables[0].iter().zip(ref_words(table_ref)) {
            w.store(v, Ordering::Relaxed);
        }
        h.capacity.store(MIN_CAPACITY, Ordering::Relaxed);
        h.version.store(KV_VERSION, Ordering::Relaxed);
        h.magic.store(KV_MAGIC, Ordering::Release);
        Ok(kv)
    }

    /// Attaches to the index whose header is `r` in `pool`.
    pub fn attach(pool: &Pool, r: BlockRef) -> Result<Kv, KvError> {
        // SAFETY: made read-only at once (never borrowed mutably); the header is only
        // reached through `as_ptr` as a KvHeader of atomics.
        let header = unsafe { pool.block(r) }?.read_only();
        if header.len() < std::mem::size_of::<KvHeader>() {
            return Err(KvError::Corrupt);
        }
        let kv = Kv {
            pool: pool.clone(),
            header,
        };
        let h = kv.hdr();
        if h.magic.load(Ordering::Acquire) != KV_MAGIC
            || h.version.load(Ordering::Relaxed) != KV_VERSION
        {
            return Err(KvError::Corrupt);
        }
        Ok(kv)
    }

    /// The header's block reference (what other processes attach with).
    pub fn header_ref(&self) -> BlockRef {
        self.header.block_ref()
    }

    /// The pool the index and its values live in.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    fn hdr(&self) -> &KvHeader {
        // SAFETY: the header block is at least size_of::<KvHeader>() bytes (checked on attach,
        // allocated so on create), 64-aligned, kept mapped by our hold; all fields are
        // atomics or a RobustMutex (atomics), so shared access is sound.
        unsafe { &*(self.header.as_ptr() as *const KvHeader) }
    }

    fn table_ref(&self) -> BlockRef {
        let h = self.hdr();
        let sel = (h.tables.len() - 1).min(h.table_sel.load(Ordering::Acquire) as usize);
        let w: Vec<u64> = h.tables[sel]
            .iter()
            .map(|a| a.load(Ordering::Acquire))
            .collect();
        BlockRef {
            segment: w[0],
            offset: w[1],
            len: w[2],
            gen: w[3] as u32,
            _pad: 0,
        }
    }

    /// Takes the index mutex; repairs first when the previous holder died, or when an
    /// earlier repair did not complete (`FLAG_REPAIR_DUE`). A repair that fails leaves the
    /// flag set and returns its error (the guard is dropped: the next locker tries again).
    fn lock(&self) -> Result<RobustGuard<'_>, KvError> {
        let h = self.hdr();
        let g = h.lock.lock();
        if g.recovered() {
            h.flags.fetch_or(FLAG_REPAIR_DUE, Ordering::AcqRel);
        }
        if h.flags.load(Ordering::Acquire) & FLAG_REPAIR_DUE != 0 {
            self.repair()?;
            h.flags.fetch_and(!FLAG_REPAIR_DUE, Ordering::AcqRel);
        }
        Ok(g)
    }

    /// The table as a slice (lock held). Its capacity comes from the table reference
    /// itself, never from a second word a resize would have to publish separately.
    #[allow(clippy::mut_from_ref)]
    fn slots(&self) -> Result<&mut [Slot], KvError> {
        let r = self.table_ref();
        let slot = std::mem::size_of::<Slot>() as u64;
        let cap = r.len / slot;
        if cap == 0 || !cap.is_power_of_two() || r.len != cap * slot {
            return Err(KvError::Corrupt);
        }
        let p = self.pool.data_ptr(r)?;
        // SAFETY: data_ptr bounds-checked [p, p + r.len) inside the pool, which our Pool
        // handle keeps mapped; the index's hold keeps the table block alive; the caller holds
        // the index mutex, so no other process touches the slots meanwhile; 64-aligned
        // blocks satisfy Slot's 8-byte alignment.
        Ok(unsafe { slots_at(p, cap as usize) })
    }

    /// The key bytes of a full slot (`klen` checked against its block: a corrupt slot is
    /// an error, not a slice out of range).
    fn key_of(&self, s: &Slot) -> Result<&[u8], KvError> {
        self.bytes_of(s.key)?
            .get(..s.klen as usize)
            .ok_or(KvError::Corrupt)
    }

    fn bytes_of(&self, r: BlockRef) -> Result<&[u8], KvError> {
        let p = self.pool.data_ptr(r)?;
        // SAFETY: bounds-checked by data_ptr; the block is alive while the index holds it
        // and we hold the index mutex (no concurrent removal).
        Ok(unsafe { std::slice::from_raw_parts(p, r.len as usize) })
    }

    /// (found?, index): the key's slot, or where to insert it.
    fn find(&self, slots: &[Slot], hash: u64, key: &[u8]) -> Result<(bool, usize), KvError> {
        let mask = slots.len() - 1;
        let mut i = (hash as usize) & mask;
        let mut free = None;
        for _ in 0..slots.len() {
            let s = &slots[i];
            match s.state_of() {
                EMPTY => return Ok((false, free.unwrap_or(i))),
                DELETED | BUSY => {
                    free.get_or_insert(i);
                }
                // FULL or REPLACING: the key fields are valid.
                _ => {
                    if s.hash == hash && s.klen as usize == key.len() && self.key_of(s)? == key {
                        return Ok((true, i));
                    }
                }
            }
            i = (i + 1) & mask;
        }
        free.map(|f| (false, f)).ok_or(KvError::Full)
    }

    /// Grows (or rehashes away tombstones) when an insert would pass 70% load.
    fn make_room(&self) -> Result<(), KvError> {
        let h = self.hdr();
        let cap = self.slots()?.len() as u64;
        let used = h.count.load(Ordering::Relaxed) + h.tombstones.load(Ordering::Relaxed) + 1;
        if used * 10 < cap * 7 {
            return Ok(());
        }
        let live = h.count.load(Ordering::Relaxed) + 1;
        let new_cap = if live * 10 < cap * 5 { cap } else { cap * 2 };
        let mut nt = match self
            .pool
            .alloc_zeroed(new_cap as usize * std::mem::size_of::<Slot>())
        {
            Ok(b) => b,
            // No room for a bigger table: go on while a free slot remains.
            Err(AllocError::Full) if used < cap => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        {
            // SAFETY: `nt` is a fresh zeroed block of new_cap slots, 64-aligned, that only
            // this handle knows of until it is published below.
            let dst = unsafe { slots_at(nt.as_mut_slice().as_mut_ptr(), new_cap as usize) };
            let mask = new_cap as usize - 1;
            for s in self.slots()?.iter().filter(|s| s.state_of() == FULL) {
                let mut i = (s.hash as usize) & mask;
                while dst[i].state_of() != EMPTY {
                    i = (i + 1) & mask;
                }
                fill_slot(dst, i, s.klen, s.hash, s.key, s.value);
            }
        }
        let old = self.table_ref();
        // The new table is the index's own block: journaled before its hold goes in flight,
        // so a death at any later point releases it unless it was published.
        self.journal_set(0, nt.block_ref());
        self.journal_set(1, old);
        let new_ref = match nt.into_transit() {
            Ok(r) => r,
            Err(e) => {
                self.journal_clear();
                return Err(e.into());
            }
        };
        let sel = h.table_sel.load(Ordering::Relaxed) as usize & 1;
        for (w, v) in h.tables[sel ^ 1].iter().zip(ref_words(new_ref)) {
            w.store(v, Ordering::Release);
        }
        crate::fault::point("kv.resize.publish");
        // SYNC POINT: the one store that publishes the new table and its capacity; pairs
        // with the Acquire load in `table_ref`.
        h.table_sel.store((sel ^ 1) as u64, Ordering::Release);
        h.capacity.store(new_cap, Ordering::Relaxed);
        h.tombstones.store(0, Ordering::Relaxed);
        crate::fault::point("kv.resize.release");
        self.finish(&[old]);
        Ok(())
    }

    /// Stores `value` (a block of this pool the caller filled) under `key`, replacing any
    /// earlier value (whose block goes once no reader holds it). On error nothing changed
    /// and the value block is released.
    pub fn put(&self, key: &[u8], value: Block) -> Result<(), KvError> {
        if value.pool().id() != self.pool.id() {
            return Err(KvError::Alloc(AllocError::BadRef));
        }
        let klen = u32::try_from(key.len()).map_err(|_| KvError::Alloc(AllocError::TooLarge))?;
        let hash = stable_hash(key);
        let h = self.hdr();
        let _g = self.lock()?;
        if self.is_frozen() {
            return Err(KvError::Frozen);
        }
        let (found, i) = self.find(self.slots()?, hash, key)?;
        if found {
            let slots = self.slots()?;
            let old = slots[i].value;
            let vlen = value.len() as u64;
            let vref = value.into_transit()?;
            // Journaled once in flight: a value block may carry other in-flight holds (a
            // channel's), which a repair must never release for us.
            self.journal_set(0, vref);
            self.journal_set(1, old);
            crate::fault::point("kv.replace.adopted");
            slots[i].state.store(REPLACING, Ordering::Release);
            slots[i].value = vref;
            // SYNC POINT: Release publishes the new value; pairs with `state_of`.
            slots[i].state.store(FULL, Ordering::Release);
            crate::fault::point("kv.replace.release");
            self.finish(&[old]);
            h.bytes.fetch_add(vlen, Ordering::Relaxed);
            h.bytes.fetch_sub(old.len, Ordering::Relaxed);
        } else {
            self.make_room()?;
            let (_, i) = self.find(self.slots()?, hash, key)?;
            let mut kb = self.pool.alloc(key.len().max(1))?;
            kb.as_mut_slice()[..key.len()].copy_from_slice(key);
            // The key block is the index's own: journaled before its hold goes in flight.
            self.journal_set(0, kb.block_ref());
            let kref = match kb.into_transit() {
                Ok(r) => r,
                Err(e) => {
                    self.journal_clear();
                    return Err(e.into());
                }
            };
            let vlen = value.len() as u64;
            let vref = match value.into_transit() {
                Ok(v) => v,
                Err(e) => {
                    self.settle_journal()?;
                    return Err(e.into());
                }
            };
            // The caller's value block, journaled once in flight (see the replace above).
            self.journal_set(1, vref);
            crate::fault::point("kv.insert.adopted");
            let slots = self.slots()?;
            let was_deleted = slots[i].state_of() != EMPTY;
            fill_slot(slots, i, klen, hash, kref, vref);
            self.journal_clear();
            if was_deleted {
                h.tombstones.fetch_sub(1, Ordering::Relaxed);
            }
            h.count.fetch_add(1, Ordering::Relaxed);
            h.bytes
                .fetch_add(key.len() as u64 + vlen, Ordering::Relaxed);
        }
        h.puts.fetch_add(1, Ordering::Relaxed);
        self.changed();
        Ok(())
    }

    /// Moves the value of `old` to the new key `new` (no copy). If `new` already exists,
    /// the entry of `old` is dropped instead. Returns whether `old` existed.
    ///
    /// Crash-atomic: the new entry is written before the old one goes, so a death half way
    /// leaves the entry under `old` or under `new`, never neither (a DDict checkpoint's
    /// working-set move is a rekey of keys written long ago: dropping one lost data). While
    /// both are there they share the value; the repair keeps the new one (see `repair`).
    pub fn rekey(&self, old: &[u8], new: &[u8]) -> Result<bool, KvError> {
        let klen = u32::try_from(new.len()).map_err(|_| KvError::Alloc(AllocError::TooLarge))?;
        let (ho, hn) = (stable_hash(old), stable_hash(new));
        let h = self.hdr();
        let _g = self.lock()?;
        if !self.find(self.slots()?, ho, old)?.0 {
            return Ok(false);
        }
        if self.find(self.slots()?, hn, new)?.0 {
            let (_, i) = self.find(self.slots()?, ho, old)?;
            let slots = self.slots()?;
            self.remove_at(slots, i);
            return Ok(true);
        }
        // Both entries exist for a moment: room for one more (may move the table).
        self.make_room()?;
        let mut kb = self.pool.alloc(new.len().max(1))?;
        kb.as_mut_slice()[..new.len()].copy_from_slice(new);
        let (_, i) = self.find(self.slots()?, ho, old)?;
        let (_, j) = self.find(self.slots()?, hn, new)?;
        let slots = self.slots()?;
        let (sk, sklen, svalue) = (slots[i].key, slots[i].klen, slots[i].value);
        // New key (joining), old key (leaving), value (moving): entry 2 marks a rekey for
        // the repair.
        self.journal_set(0, kb.block_ref());
        self.journal_set(1, sk);
        self.journal_set(2, svalue);
        let kref = match kb.into_transit() {
            Ok(r) => r,
            Err(e) => {
                self.journal_clear();
                return Err(e.into());
            }
        };
        crate::fault::point("kv.rekey.adopted");
        let slots = self.slots()?;
        let was_deleted = slots[j].state_of() != EMPTY;
        fill_slot(slots, j, klen, hn, kref, svalue);
        if was_deleted {
            h.tombstones.fetch_sub(1, Ordering::Relaxed);
        }
        crate::fault::point("kv.rekey.moved");
        slots[i].state.store(DELETED, Ordering::Release);
        h.tombstones.fetch_add(1, Ordering::Relaxed);
        h.bytes.fetch_add(u64::from(klen), Ordering::Relaxed);
        h.bytes.fetch_sub(u64::from(sklen), Ordering::Relaxed);
        self.finish(&[sk]);
        self.changed();
        Ok(true)
    }

    /// The checkpoint working set `(oldest, newest)` recorded in the header.
    pub fn chkpt_range(&self) -> (u64, u64) {
        let h = self.hdr();
        (
            h.chkpt_oldest.load(Ordering::Acquire),
            h.chkpt_newest.load(Ordering::Acquire),
        )
    }

    /// Records the working set (the caller serialises changes).
    pub fn set_chkpt_range(&self, oldest: u64, newest: u64) {
        let h = self.hdr();
        h.chkpt_newest.store(newest, Ordering::Release);
        h.chkpt_oldest.store(oldest, Ordering::Release);
        self.changed();
    }

    /// Counts a change and wakes every process in [`Kv::wait_change`] (no syscall when
    /// none waits).
    fn changed(&self) {
        let h = self.hdr();
        // SYNC POINT: Release publishes the change; pairs with the Acquire in `changes`.
        h.changes.fetch_add(1, Ordering::Release);
        h.change_wq.notify_all();
    }

    /// How many changes the index has had (puts, removals, working-set moves): read it,
    /// look at the index, then [`Kv::wait_change`] with it to sleep until the next change.
    pub fn changes(&self) -> u64 {
        self.hdr().changes.load(Ordering::Acquire)
    }

    /// Sleeps until the change count differs from `seen` (true), or `timeout` passes
    /// (false). A change made after `seen` was read is never missed.
    pub fn wait_change(&self, seen: u64, timeout: Option<Duration>) -> bool {
        self.wait_change_with(seen, &WaitOpts::timeout(timeout))
    }

    /// [`Kv::wait_change`] with explicit wait options (deadline, spin, interruptible).
    pub fn wait_change_with(&self, seen: u64, opts: &WaitOpts) -> bool {
        let h = self.hdr();
        let check = || (h.changes.load(Ordering::Acquire) != seen).then_some(());
        h.change_wq.wait_until(check, opts).is_ok()
    }

    /// A read-only hold of this process on the value of `key` (None when absent): other
    /// readers may view the same bytes, so [`Block::as_mut_slice`] panics on it, and it
    /// cannot be put in flight (a channel send or another `put` refuses it).
    pub fn get(&self, key: &[u8]) -> Result<Option<Block>, KvError> {
        let hash = stable_hash(key);
        let h = self.hdr();
        let _g = self.lock()?;
        let slots = self.slots()?;
        match self.find(slots, hash, key)? {
            (true, i) => {
                h.gets.fetch_add(1, Ordering::Relaxed);
                // SAFETY: made read-only at once: other readers may hold the same value.
                Ok(Some(
                    unsafe { self.pool.block(slots[i].value) }?.read_only(),
                ))
            }
            _ => {
                h.misses.fetch_add(1, Ordering::Relaxed);
                Ok(None)
            }
        }
    }

    /// Whether `key` is present.
    pub fn contains(&self, key: &[u8]) -> Result<bool, KvError> {
        let hash = stable_hash(key);
        let _g = self.lock()?;
        Ok(self.find(self.slots()?, hash, key)?.0)
    }

    fn remove_at(&self, slots: &mut [Slot], i: usize) {
        let h = self.hdr();
        let s = &slots[i];
        let (skey, sklen, svalue) = (s.key, s.klen, s.value);
        self.journal_set(0, skey);
        self.journal_set(1, svalue);
        s.state.store(DELETED, Ordering::Release);
        h.count.fetch_sub(1, Ordering::Relaxed);
        h.tombstones.fetch_add(1, Ordering::Relaxed);
        h.bytes
            .fetch_sub(u64::from(sklen) + svalue.len, Ordering::Relaxed);
        crate::fault::point("kv.remove.release");
        self.finish(&[skey, svalue]);
    }

    /// Removes `key`; returns its value (a read-only hold of this process, as from
    /// [`get`](Self::get): earlier readers may still view it) if it was there.
    pub fn take(&self, key: &[u8]) -> Result<Option<Block>, KvError> {
        Ok(self.remove_key(key, true)?.flatten())
    }

    /// Removes `key`; whether it was there.
    pub fn remove(&self, key: &[u8]) -> Result<bool, KvError> {
        Ok(self.remove_key(key, false)?.is_some())
    }

    /// Removes `key`: `None` when absent, else `Some` of a hold on its value when `hold`.
    fn remove_key(&self, key: &[u8], hold: bool) -> Result<Option<Option<Block>>, KvError> {
        let hash = stable_hash(key);
        let _g = self.lock()?;
        if self.is_frozen() {
            return Err(KvError::Frozen);
        }
        let slots = self.slots()?;
        match self.find(slots, hash, key)? {
            (true, i) => {
                let v = if hold {
                    // SAFETY: made read-only at once: earlier readers may still view it.
                    Some(unsafe { self.pool.block(slots[i].value) }?.read_only())
                } else {
                    None
                };
                self.remove_at(slots, i);
                self.changed();
                Ok(Some(v))
            }
            _ => Ok(None),
        }
    }

    /// Every key (copies), in table order.
    pub fn keys(&self) -> Result<Vec<Vec<u8>>, KvError> {
        let _g = self.lock()?;
        let slots = self.slots()?;
        // The count is a word of shared memory: never trusted beyond the table's size.
        let count = self.hdr().count.load(Ordering::Relaxed);
        let mut out = Vec::with_capacity(count.min(slots.len() as u64) as usize);
        for s in slots.iter().filter(|s| s.state_of() == FULL) {
            out.push(self.key_of(s)?.to_vec());
        }
        Ok(out)
    }

    /// Removes every key.
    pub fn clear(&self) -> Result<(), KvError> {
        let _g = self.lock()?;
        if self.is_frozen() {
            return Err(KvError::Frozen);
        }
        let slots = self.slots()?;
        for i in 0..slots.len() {
            if slots[i].state_of() == FULL {
                self.remove_at(slots, i);
            }
        }
        self.changed();
        Ok(())
    }

    /// Number of keys.
    pub fn len(&self) -> u64 {
        self.hdr().count.load(Ordering::Relaxed)
    }

    /// Whether there are no keys.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Refuses (or again allows) writes. Changes the flag only under the index mutex: when
    /// the mutex cannot be taken (a dead holder's state could not be repaired) the error is
    /// returned and nothing changes.
    pub fn set_frozen(&self, yes: bool) -> Result<(), KvError> {
        let h = self.hdr();
        let _g = self.lock()?;
        if yes {
            h.flags.fetch_or(FLAG_FROZEN, Ordering::Release);
        } else {
            h.flags.fetch_and(!FLAG_FROZEN, Ordering::Release);
        }
        Ok(())
    }

    /// Whether writes are refused.
    pub fn is_frozen(&self) -> bool {
        self.hdr().flags.load(Ordering::Acquire) & FLAG_FROZEN != 0
    }

    /// The counters.
    pub fn stats(&self) -> KvStats {
        let h = self.hdr();
        KvStats {
            count: h.count.load(Ordering::Relaxed),
            bytes: h.bytes.load(Ordering::Relaxed),
            capacity: h.capacity.load(Ordering::Relaxed),
            puts: h.puts.load(Ordering::Relaxed),
            gets: h.gets.load(Ordering::Relaxed),
            misses: h.misses.load(Ordering::Relaxed),
            frozen: h.flags.load(Ordering::Relaxed) & FLAG_FROZEN != 0,
            change_waiters: h.change_wq.waiters(),
        }
    }

    /// Frees every key, value and the table and header (the index's holds); readers'
    /// holds keep their values until they drop them. Other handles must not be used after.
    pub fn destroy(self) -> Result<(), KvError> {
        {
            let h = self.hdr();
            let _g = self.lock()?;
            h.flags.fetch_and(!FLAG_FROZEN, Ordering::Relaxed);
            let slots = self.slots()?;
            for i in 0..slots.len() {
                if slots[i].state_of() == FULL {
                    self.remove_at(slots, i);
                }
            }
            let t = self.table_ref();
            h.magic.store(0, Ordering::Release);
            self.pool.release_transit(t)?;
        }
        let r = self.header.block_ref();
        let pool = self.pool.clone();
        drop(self);
        pool.release_transit(r)?;
        Ok(())
    }
}

// The shared layouts of this file, fixed: a change here changes what other processes (and
// other versions) read, so it must come with a layout version bump. (Loom's atomics differ.)
#[cfg(not(loom))]
const _: () = assert!(std::mem::size_of::<KvHeader>() == 304);
#[cfg(not(loom))]
const _: () = assert!(std::mem::offset_of!(KvHeader, magic) == 0);
#[cfg(not(loom))]
const _: () = assert!(std::mem::offset_of!(KvHeader, version) == 8);
#[cfg(not(loom))]
const _: () = assert!(std::mem::offset_of!(KvHeader, lock) == 16);

#[cfg(test)]
mod tests;
