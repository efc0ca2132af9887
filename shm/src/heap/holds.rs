//! Holds: who keeps which block alive (see "Holds" and "Lock-free hand-over" in the docs of
//! [`crate::heap`]).
//!
//! * holder registration: a process takes a slot of the process table the first time it
//!   holds a block (`my_holder`) and gives it back when its last [`Pool`] handle drops while
//!   it holds nothing (`Drop for Pool`, at the end of this file);
//! * the hold table: `find_hold`, `add_hold`, `retag_hold`, `drop_hold`, and `rehash`, which
//!   copies the live entries into the other table and flips `active` in one store;
//! * the lock-free hand-over `retag_fast`, tried first by channel transit: `hand_to_transit`
//!   (a send), [`Pool::claim_transit`] (a receive); [`Pool::release_transit`].
//!
//! Everything here but `retag_fast` and `cached_holder` runs under the pool lock.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{
    hold_hash, hv_count, hv_holder, hv_make, hv_with_count, hv_with_holder, hv_with_tgen,
    AllocError, Block, BlockRef, HoldEntry, Pool, EMPTY, HV_COUNT_MASK, HV_FROZEN, HV_TGEN_MASK,
    PROC_SLOTS, TOMB, TRANSIT,
};
use crate::platform::ProcessId;

impl Pool {
    // ---- holder registration ------------------------------------------------------------

    /// This process's holder id, registering it (under the lock) if needed.
    pub(super) fn my_holder(&self) -> Result<u32, AllocError> {
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
    pub(super) fn add_hold(&self, block: u64, holder: u32, count: u32) -> Result<(), AllocError> {
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
    pub(super) fn drop_hold(&self, block: u64, holder: u32) -> bool {
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
    pub(super) fn rehash(&self) {
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

    // ---- transit ----------------------------------------------------------------------

    /// Turns one in-flight hold on `r` into a hold of this process (a writable handle).
    ///
    /// # Safety
    /// As for [`Pool::block`]: the in-flight hold must have been handed to the caller (a
    /// channel message it received, a hold it kept), and while the returned handle lives no
    /// mutable borrow of the bytes through it may overlap any other borrow of them through
    /// another handle of this process (such as a read-only [`crate::kv::Kv::get`] value).
    pub unsafe fn claim_transit(&self, r: BlockRef) -> Result<Block, AllocError> {
        if let Some(me) = self.cached_holder() {
            if self.retag_fast(r, TRANSIT, me) {
                return Ok(Block {
                    pool: self.clone(),
                    r,
                    writable: true,
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
            writable: true,
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

    pub(super) fn hand_to_transit(&self, r: BlockRef) -> Result<(), AllocError> {
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

    /// Rehashes the hold table now (tests of the lock-free hand-over).
    #[doc(hidden)]
    pub fn force_rehash(&self) {
        match self.lock(None) {
            Ok(_g) => self.rehash(),
            Err(e) => {
                tracing::error!(error = %e, "dragon-shm pool: rehash could not take the lock")
            }
        }
    }

    /// How many times the hold table was rehashed (mod 2^31; tests).
    #[doc(hidden)]
    pub fn hold_generation(&self) -> u32 {
        self.header().hold_tgen.load(Ordering::Relaxed)
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
        let _g = match self.lock(None) {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(pool = %self.name(), error = %e, "dragon-shm pool: the last handle could not take the lock to give its process slot back");
                return;
            }
        };
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
