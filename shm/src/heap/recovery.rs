//! Surviving dead processes (see "What is true and what is derived" in the docs of
//! [`crate::heap`]).
//!
//! * `lock` takes the pool's robust mutex; when the previous holder died holding it, `lock`
//!   runs `recover` before handing out the guard, so every locked section starts from a
//!   consistent pool; the header's `repair_due` stays set until a recovery succeeds, so a
//!   failed one is retried by the next locker, and releases that could not take the lock
//!   are deferred (per process) to the next successful `lock`;
//! * `recover` rebuilds the derived state (refcounts, free lists, `prev_size`, counters) from
//!   the truth (the block chain and the hold table);
//! * [`Pool::sweep`] releases every hold of processes that died (not holding the lock); a
//!   full pool and a full process table try it before failing;
//! * for tests: [`Pool::recoveries`] and [`Pool::abandon`].

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::{
    hv_count, hv_holder, AllocError, Block, BlockRef, Pool, EMPTY, FLAG_MASK, MIN_BLOCK,
    PROC_SLOTS, TAG, TOMB, USED,
};
use crate::error::SegmentError;
use crate::lock::{LockError, RobustGuard};
use crate::platform::ProcessId;

impl Pool {
    pub(super) fn lock(&self, deadline: Option<Instant>) -> Result<RobustGuard<'_>, AllocError> {
        let g = self
            .header()
            .lock
            .lock_until(deadline, false)
            .map_err(|e| match e {
                LockError::TimedOut => AllocError::TimedOut,
                LockError::Interrupted => AllocError::Interrupted,
            })?;
        let h = self.header();
        if g.recovered() {
            h.recoveries.fetch_add(1, Ordering::Relaxed);
            h.repair_due.store(1, Ordering::Release);
        }
        if h.repair_due.load(Ordering::Acquire) != 0 {
            if let Err(e) = self.recover() {
                tracing::error!(pool = %self.name(), error = %e, "dragon-shm pool: repair after a dead lock holder failed; the next locker retries");
                return Err(e);
            }
            h.repair_due.store(0, Ordering::Release);
        }
        if self.inner.has_deferred.load(Ordering::Acquire) {
            self.release_deferred();
        }
        Ok(g)
    }

    /// Releases the holds whose release could not take the lock earlier (lock held).
    fn release_deferred(&self) {
        let refs = match self.inner.deferred.lock() {
            Ok(mut d) => {
                self.inner.has_deferred.store(false, Ordering::Release);
                std::mem::take(&mut *d)
            }
            Err(_) => return,
        };
        for r in refs {
            self.release_locked(r);
        }
    }

    /// Keeps a hold whose release could not take the lock, for the next `lock`.
    pub(super) fn defer_release(&self, r: BlockRef) {
        if let Ok(mut d) = self.inner.deferred.lock() {
            d.push(r);
            self.inner.has_deferred.store(true, Ordering::Release);
        }
    }

    // ---- death ----------------------------------------------------------------------------

    /// Releases every hold of processes that died, freeing blocks nobody else holds.
    /// Returns the number of dead processes swept.
    pub fn sweep(&self) -> usize {
        match self.lock(None) {
            Ok(_g) => self.sweep_locked(),
            Err(e) => {
                tracing::error!(pool = %self.name(), error = %e, "dragon-shm pool: sweep could not take the lock");
                0
            }
        }
    }

    pub(super) fn sweep_locked(&self) -> usize {
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
        if crate::fault::fails("pool.recover") {
            return Err(AllocError::Segment(SegmentError::Corrupt));
        }
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

    /// How many times a dead lock holder's state was repaired (for tests and inspectors).
    pub fn recoveries(&self) -> u32 {
        self.header().recoveries.load(Ordering::Relaxed)
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
