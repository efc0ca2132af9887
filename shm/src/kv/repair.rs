//! The index's crash consistency: the journal of blocks whose in-flight hold joins or
//! leaves the index during an operation, the repair a locker runs after a holder died
//! (slots half written, journaled holds, dead processes' holds) and the recount.

use std::sync::atomic::Ordering;

use super::*;

impl Kv {
    /// Names `r` in journal entry `k` (lock held).
    pub(super) fn journal_set(&self, k: usize, r: BlockRef) {
        let e = &self.hdr().journal[k];
        e[1].store(r.offset, Ordering::Relaxed);
        e[2].store(r.len, Ordering::Relaxed);
        e[3].store(u64::from(r.gen), Ordering::Relaxed);
        // SYNC POINT: published last (pool ids are never 0); pairs with `journal_get`.
        e[0].store(r.segment, Ordering::Release);
    }

    pub(super) fn journal_get(&self, k: usize) -> Option<BlockRef> {
        let e = &self.hdr().journal[k];
        let segment = e[0].load(Ordering::Acquire);
        (segment != 0).then(|| BlockRef {
            segment,
            offset: e[1].load(Ordering::Relaxed),
            len: e[2].load(Ordering::Relaxed),
            gen: e[3].load(Ordering::Relaxed) as u32,
            _pad: 0,
        })
    }

    /// The operation completed: its journal is void.
    pub(super) fn journal_clear(&self) {
        for e in &self.hdr().journal {
            e[0].store(0, Ordering::Release);
        }
    }

    /// Ends an operation (lock held): releases the index's in-flight holds on `gone`, the
    /// blocks it no longer references, and voids the journal. A release that fails (the
    /// pool's lock could not be taken) is not lost: the journal stays, the repair is marked
    /// due and the next locker releases them. `BadRef` (no such hold) has nothing to retry.
    pub(super) fn finish(&self, gone: &[BlockRef]) {
        let mut failed = None;
        for &r in gone {
            match self.pool.release_transit(r) {
                Ok(()) | Err(AllocError::BadRef) => {}
                Err(e) => failed = Some(e),
            }
        }
        match failed {
            None => self.journal_clear(),
            Some(e) => {
                self.hdr().flags.fetch_or(FLAG_REPAIR_DUE, Ordering::AcqRel);
                tracing::warn!(error = %e, "dragon-shm index: releasing a block failed; the next locker retries");
            }
        }
    }

    /// Whether the index references `r` (its table, or a key or value of a live slot).
    pub(super) fn references(&self, slots: &[Slot], r: BlockRef) -> bool {
        self.table_ref() == r
            || slots
                .iter()
                .any(|s| matches!(s.state_of(), FULL | REPLACING) && (s.key == r || s.value == r))
    }

    /// Drops the index's in-flight hold on every journaled block it does not reference
    /// (an operation that failed or died half way), then voids the journal (lock held).
    /// A hold already gone (`BadRef`: never adopted, or already released) is fine.
    pub(super) fn settle_journal(&self) -> Result<(), KvError> {
        let slots = self.slots()?;
        for k in 0..JOURNAL {
            let Some(r) = self.journal_get(k) else {
                continue;
            };
            if !self.references(slots, r) {
                match self.pool.release_transit(r) {
                    Ok(()) | Err(AllocError::BadRef) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        self.journal_clear();
        Ok(())
    }

    /// Repairs what a process that died holding the mutex left (lock held): holds of dead
    /// processes are swept, a half-replaced slot gets its new or old value back, a
    /// half-written (BUSY) slot becomes a tombstone, in-flight holds the journal names but
    /// the index does not reference are released, the counters are recounted.
    pub(super) fn repair(&self) -> Result<(), KvError> {
        if crate::fault::fails("kv.repair") {
            return Err(KvError::Corrupt);
        }
        self.pool.sweep();
        let slots = self.slots()?;
        for s in slots.iter_mut() {
            match s.state_of() {
                BUSY => s.state.store(DELETED, Ordering::Release),
                REPLACING => {
                    let (new, old) = (self.journal_get(0), self.journal_get(1));
                    match (new, old) {
                        (Some(n), _) if s.value == n => {}
                        (_, Some(o)) => s.value = o,
                        // Cannot happen (both are journaled before REPLACING): drop the
                        // entry rather than trust a torn reference.
                        _ => {
                            s.state.store(DELETED, Ordering::Release);
                            continue;
                        }
                    }
                    s.state.store(FULL, Ordering::Release);
                }
                _ => {}
            }
        }
        // A rekey that died with both entries written: they share the value; the new one
        // (journal entry 0 is its key) stays, the old one goes (its key block is released
        // by `settle_journal`, the value stays referenced).
        if let (Some(nk), Some(ok), Some(v)) = (
            self.journal_get(0),
            self.journal_get(1),
            self.journal_get(2),
        ) {
            let full = |s: &Slot, k: BlockRef| s.state_of() == FULL && s.value == v && s.key == k;
            if slots.iter().any(|s| full(s, nk)) {
                for s in slots.iter().filter(|s| full(s, ok)) {
                    s.state.store(DELETED, Ordering::Release);
                }
            }
        }
        self.settle_journal()?;
        self.recount()
    }

    /// Recounts the counters from the table (lock held, slots resolved by `repair`).
    pub(super) fn recount(&self) -> Result<(), KvError> {
        let slots = self.slots()?;
        let (mut n, mut t, mut b) = (0u64, 0u64, 0u64);
        for s in slots.iter() {
            match s.state_of() {
                FULL => {
                    n += 1;
                    b += u64::from(s.klen) + s.value.len;
                }
                DELETED => t += 1,
                _ => {}
            }
        }
        let h = self.hdr();
        h.capacity.store(slots.len() as u64, Ordering::Relaxed);
        h.count.store(n, Ordering::Relaxed);
        h.tombstones.store(t, Ordering::Relaxed);
        h.bytes.store(b, Ordering::Relaxed);
        Ok(())
    }
}
