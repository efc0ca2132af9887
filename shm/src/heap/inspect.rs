//! Reading a pool without changing it: [`Pool::verify`] checks every invariant under the
//! lock (tests, tools), [`Pool::stats`] and [`Pool::usage`] read figures, and [`stats_of`]
//! and [`first_block_of`] work lock-free on any mapping of a pool segment, read-only
//! included (the `dragon-shm` inspector, DDict stats).

use std::sync::atomic::{AtomicU64, Ordering};

use super::{
    class_of, hv_count, validate, BlockHeader, Pool, PoolHeader, PoolStats, ALIGN, BLOCK_HDR,
    EMPTY, FLAG_MASK, MIN_BLOCK, PROC_SLOTS, TAG, TOMB, USED,
};
use crate::error::SegmentError;
use crate::segment::{Segment, HEADER_SIZE};

impl Pool {
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
