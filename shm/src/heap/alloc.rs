//! Allocating and freeing blocks, all under the pool lock.
//!
//! * the free lists (derived state, one per power-of-two size class): `list_push`,
//!   `list_remove`, and `find_free` (scans the request's own class, then takes the head of
//!   any larger class);
//! * allocation: [`Pool::alloc`], [`Pool::alloc_zeroed`], [`Pool::alloc_timeout`] (sleeps on
//!   the pool's free wait queue) and `alloc_inner`, which splits a free block in one store;
//! * another hold on a live block: `check_ref`, [`Pool::block`], and [`Pool::data_ptr`]
//!   (no hold);
//! * releasing: `release` (a [`Block`] dropped), `unref`, and `free_block`, which merges the
//!   block with its free neighbours and wakes waiting allocators.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{
    class_of, round_up, AllocError, Block, BlockRef, Pool, ALIGN, BLOCK_HDR, FLAG_MASK, MIN_BLOCK,
    TAG, USED,
};
use crate::waitqueue::{WaitError, WaitOpts};

impl Pool {
    // ---- free lists (derived) -----------------------------------------------------------

    pub(super) fn list_push(&self, off: u64, size: u64) -> Result<(), AllocError> {
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
        crate::fault::point("pool.alloc.unlisted");
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
            writable: true,
        })
    }

    /// Checks that `r` names a live block of this pool (lock held); returns its header offset.
    pub(super) fn check_ref(&self, r: BlockRef) -> Result<u64, AllocError> {
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

    /// Takes another hold (for this process) on the live block `r`, as a writable handle.
    ///
    /// # Safety
    /// Other handles of this process may name the same block. While the returned handle
    /// lives, the caller must not borrow the block's bytes mutably through it
    /// ([`Block::as_mut_slice`]) while any other borrow of them (through any handle) is
    /// alive, nor borrow them through it while a mutable borrow through another handle is.
    /// Making the handle [`Block::read_only`] at once, or only ever using
    /// [`Block::as_ptr`] with atomics (the sync objects, channels), meets this.
    pub unsafe fn block(&self, r: BlockRef) -> Result<Block, AllocError> {
        let _g = self.lock(None)?;
        let off = self.check_ref(r)?;
        let holder = self.my_holder()?;
        self.add_hold(off, holder, 1)?;
        self.bh(off)?.refcount.fetch_add(1, Ordering::Relaxed);
        Ok(Block {
            pool: self.clone(),
            r,
            writable: true,
        })
    }

    // ---- release ----------------------------------------------------------------------

    /// Drops this process's hold on `r` (a [`Block`] dropped). When the lock cannot be
    /// taken (a dead holder's state could not be repaired) the error is logged and the
    /// release deferred to the next successful lock, never silently dropped.
    pub(super) fn release(&self, r: BlockRef) {
        match self.lock(None) {
            Ok(_g) => self.release_locked(r),
            Err(e) => {
                tracing::error!(pool = %self.name(), error = %e, "dragon-shm pool: releasing a block could not take the lock; deferred");
                self.defer_release(r);
            }
        }
    }

    /// [`release`](Self::release) with the lock held; failures are logged.
    pub(super) fn release_locked(&self, r: BlockRef) {
        let res = self.check_ref(r).and_then(|off| {
            let holder = self.my_holder()?;
            if self.drop_hold(off, holder) {
                self.unref(off)
            } else {
                Err(AllocError::BadRef)
            }
        });
        if let Err(e) = res {
            tracing::error!(pool = %self.name(), error = %e, ?r, "dragon-shm pool: releasing a hold failed");
        }
    }

    /// One hold on the block at `off` is gone: decrement, free at zero (lock held).
    pub(super) fn unref(&self, off: u64) -> Result<(), AllocError> {
        let b = self.bh(off)?;
        let rc = b.refcount.load(Ordering::Relaxed).saturating_sub(1);
        b.refcount.store(rc, Ordering::Relaxed);
        if rc == 0 {
            self.free_block(off)?;
        }
        Ok(())
    }

    /// Marks a used block free and merges it with free neighbours (lock held).
    pub(super) fn free_block(&self, off: u64) -> Result<(), AllocError> {
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
}
