//! The bounded MPMC ring protocol (Vyukov's sequence stamps), independent of where the slots
//! live: in a channel segment, or in plain memory for the loom models in `tests/loom.rs`.
//!
//! # Protocol
//!
//! The ring has `cap` slots and two 64-bit cursors, `tail` (next position to send into) and
//! `head` (next position to receive from). Positions only grow; slot `i` serves positions
//! `p` with `p % cap == i`. Positions never wrap in practice (stamps hold `2p`: 2^63 messages).
//!
//! Every slot carries a 64-bit **stamp** saying whose turn it is:
//! * `stamp == 2p`: the slot is empty and waits for the sender of position `p`;
//! * `stamp == 2p + 1`: the slot holds the message of position `p` and waits for its receiver;
//! * after the receiver of `p` is done it stores `2(p + cap)`: empty, for the next lap.
//!
//! The factor 2 keeps "full for `p`" and "empty for `p + cap`" distinct even when `cap == 1`
//! (Vyukov's original `p + 1` / `p + cap` stamps collide there; the loom model
//! `ring_wraps_laps_in_order` caught exactly that race). Initially slot `i` has stamp `2i`
//! and `head == tail == 0`.
//!
//! **Send** (`reserve_send` then `commit_send`):
//! 1. load `tail = p`, load the stamp `s` of slot `p % cap` (Acquire);
//! 2. `s == 2p`: the slot is free for us; CAS `tail: p -> p + 1`. Winning the CAS gives this
//!    sender exclusive right to write the slot's payload. Losing: retry with the new `tail`.
//! 3. `s < 2p`: the slot still holds position `p - cap`, not yet received: the ring is
//!    **full** (re-load `tail`; if it moved, retry, else report full).
//! 4. `s > 2p`: another sender took `p` already; retry with a fresh `tail`.
//! 5. after writing the payload, store stamp `2p + 1` with Release (**commit**).
//!
//! **Receive** mirrors it with `head`, expecting `s == 2p + 1`, reporting **empty** when
//! `s < 2p + 1` (no message committed there yet), and committing by storing `2(p + cap)`
//! (Release).
//!
//! SYNC POINT: the Release store of a stamp and the Acquire load that observes it order the
//! payload write of the sender before the payload read of the receiver, and the receiver's
//! read before the next lap's write. The CAS on a cursor only hands out exclusive positions;
//! it carries no payload ordering (Relaxed success suffices, as in crossbeam's `array.rs`,
//! but we use AcqRel/Acquire for clarity at no measurable cost on x86).
//!
//! **Parties that die mid-operation.** A sender that dies between winning the CAS and
//! committing leaves its slot with stamp `2p`: receivers see "empty" at that position, and
//! nothing behind it moves. A receiver that dies between its CAS and its commit leaves stamp
//! `2p + 1`: the sender of `p + cap` sees "full" there. To tell such a slot from one whose
//! live owner is merely slow, every party announces itself in an [`Intents`] table before it
//! reserves: its identity, and the cursor value it read (the position it then wins is at
//! least that). Recovery of a position `q` that a cursor has passed:
//! 1. load the cursor (Acquire) and see it past `q`; this synchronizes with the winner's
//!    CAS (and later CASes continue its release sequence), so the winner's announcement,
//!    written before its CAS, is visible;
//! 2. scan the table: if any live party announced a position `<= q` in that direction, it
//!    may be the winner: leave the slot alone;
//! 3. otherwise the winner is dead (its announcement stays until after its commit, and a
//!    commit shows in the stamp): under the channel's recovery lock, check the stamp is still
//!    the stuck one, then publish it (a sender's position as an empty message, a "hole";
//!    a receiver's slot as free for the next lap).
//!
//! A party withdraws its announcement only after its commit, and every store to an entry is a
//! Release (read with Acquire), so a scan that sees an announcement withdrawn (IDLE, the
//! entry free, or the entry's next holder's announcement) also sees the commit when it
//! re-reads the stamp. The loom models in
//! `tests/loom.rs` check a dead sender's position being filled while a live sender works.

use crate::primitive::{AtomicU64, Ordering};

/// The announcement of an entry that announces nothing (free, or between operations).
pub const IDLE: u64 = u64::MAX;
/// Marks an announcement as a receiver's (a sender's has this bit clear).
pub const RECV_INTENT: u64 = 1 << 63;

/// One entry of an intent table: who is between announcing a reservation and committing it.
#[repr(C)]
#[derive(Debug)]
pub struct Intent {
    /// The holder's identity (a packed `ProcessId`; 0: free).
    pub owner: AtomicU64,
    /// [`IDLE`], or the cursor value read before reserving (`| RECV_INTENT` for a receiver).
    pub pos: AtomicU64,
}

impl Intent {
    /// A free entry (for tests and models; shared memory starts zeroed, then `init`).
    pub fn new() -> Intent {
        Intent {
            owner: AtomicU64::new(0),
            pos: AtomicU64::new(IDLE),
        }
    }
}

impl Default for Intent {
    fn default() -> Self {
        Intent::new()
    }
}

/// A view over an intent table (see the module docs, "Parties that die mid-operation").
#[derive(Debug, Clone, Copy)]
pub struct Intents<'a> {
    entries: &'a [Intent],
}

impl<'a> Intents<'a> {
    /// A view over `entries`.
    #[inline]
    pub fn new(entries: &'a [Intent]) -> Self {
        Intents { entries }
    }

    /// Marks every entry free (only while no other party can see the table).
    pub fn init(&self) {
        for e in self.entries {
            e.owner.store(0, Ordering::Relaxed);
            e.pos.store(IDLE, Ordering::Relaxed);
        }
    }

    /// Takes a free entry for `me` (non-zero), looking from `hint` on; when none is free,
    /// takes one whose owner `alive` says is dead. `None`: every entry is held by a live
    /// party (try again later).
    #[inline]
    pub fn claim(&self, me: u64, hint: usize, alive: impl Fn(u64) -> bool) -> Option<usize> {
        let n = self.entries.len();
        let mut i = if hint < n { hint } else { 0 };
        for _ in 0..n {
            let e = &self.entries[i];
            if e.owner.load(Ordering::Relaxed) == 0
                && e.owner
                    .compare_exchange(0, me, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                return Some(i);
            }
            // (No `%`: a division costs more than the rest of a free entry's claim.)
            i += 1;
            if i == n {
                i = 0;
            }
        }
        for (i, e) in self.entries.iter().enumerate() {
            let o = e.owner.load(Ordering::Acquire);
            // A dead owner's announcement is no longer needed by anyone: a recovery only
            // asks whether a *live* party may hold a position.
            if o != 0
                && o != me
                && !alive(o)
                && e.owner
                    .compare_exchange(o, me, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                e.pos.store(IDLE, Ordering::Release);
                return Some(i);
            }
        }
        None
    }

    /// Announces, in entry `i`, a reservation from the current value of `cursor` on
    /// (`recv`: a receiver's). Call before the reservation's first look at the cursor.
    #[inline]
    pub fn announce(&self, i: usize, cursor: &AtomicU64, recv: bool) {
        let p = cursor.load(Ordering::Acquire);
        let tag = if recv { RECV_INTENT } else { 0 };
        // Ordered before the reservation's CAS (AcqRel) by program order: whoever sees that
        // CAS's cursor value sees this (module docs, step 1). Release: a scan that reads
        // this announcement also sees what the entry's previous holder committed.
        self.entries[i].pos.store(p | tag, Ordering::Release);
    }

    /// Ends entry `i`'s announcement and frees it (after the commit, or after a failed
    /// reservation).
    #[inline]
    pub fn release(&self, i: usize) {
        let e = &self.entries[i];
        // SYNC POINT: both stores Release, pairing with `may_hold`'s Acquire loads: a scan
        // that sees the announcement withdrawn (IDLE, the entry free, or a later holder's
        // announcement) also sees the commit made before it, when it reads the stamp again.
        e.pos.store(IDLE, Ordering::Release);
        e.owner.store(0, Ordering::Release);
    }

    /// Entries holding an announcement now (parties mid-operation, or dead there and not yet
    /// taken over).
    pub fn announced(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| {
                e.owner.load(Ordering::Acquire) != 0 && e.pos.load(Ordering::Acquire) != IDLE
            })
            .count()
    }

    /// Whether a party that `alive` says lives announced a position `<= q` in the direction
    /// `recv`: it may be the one that won `q`.
    pub fn may_hold(&self, q: u64, recv: bool, alive: impl Fn(u64) -> bool) -> bool {
        self.entries.iter().any(|e| {
            let o = e.owner.load(Ordering::Acquire);
            if o == 0 {
                return false;
            }
            let p = e.pos.load(Ordering::Acquire);
            if p == IDLE || (p & RECV_INTENT != 0) != recv {
                return false;
            }
            (p & !RECV_INTENT) <= q && alive(o)
        })
    }
}

/// What a successful reservation hands out: a position and its slot index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    /// The position (monotonic message number).
    pub pos: u64,
    /// `pos % cap`.
    pub slot: usize,
    /// The intent entry announcing this reservation (`usize::MAX`: none); set by the caller
    /// that announced it, released after the commit.
    pub intent: usize,
}

/// Why a reservation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RingError {
    /// No free slot (send) right now.
    #[error("ring is full")]
    Full,
    /// No committed message (receive) right now.
    #[error("ring is empty")]
    Empty,
}

/// A view over the control words of one ring: the cursors and a way to find slot stamps.
///
/// `S` maps a slot index to its stamp word (a closure over segment memory, or a `Vec`).
#[derive(Debug)]
pub struct Ring<'a, S> {
    head: &'a AtomicU64,
    tail: &'a AtomicU64,
    cap: u64,
    stamps: S,
}

/// The stamp of a slot that is empty and waits for the sender of position `p` (wrapping:
/// a corrupt cursor near `u64::MAX` must not panic, only fail to match).
#[inline]
fn empty_for(p: u64) -> u64 {
    p.wrapping_mul(2)
}

/// The stamp of a slot that holds the message of position `p`.
#[inline]
fn full_for(p: u64) -> u64 {
    p.wrapping_mul(2).wrapping_add(1)
}

impl<'a, S> Ring<'a, S>
where
    S: Fn(usize) -> &'a AtomicU64,
{
    /// Builds a view; `cap >= 1`.
    pub fn new(head: &'a AtomicU64, tail: &'a AtomicU64, cap: u64, stamps: S) -> Self {
        debug_assert!(cap >= 1);
        Ring {
            head,
            tail,
            cap,
            stamps,
        }
    }

    /// Initializes cursors and stamps (only while no other party can see the ring).
    pub fn init(&self) {
        self.head.store(0, Ordering::Relaxed);
        self.tail.store(0, Ordering::Relaxed);
        for i in 0..self.cap {
            (self.stamps)(i as usize).store(empty_for(i), Ordering::Relaxed);
        }
    }

    /// Capacity in messages.
    pub fn capacity(&self) -> u64 {
        self.cap
    }

    /// Messages sent and not yet received (racy snapshot, for stats and emptiness hints).
    pub fn len(&self) -> u64 {
        let tail = self.tail.load(Ordering::Acquire);
        let head = self.head.load(Ordering::Acquire);
        tail.saturating_sub(head)
    }

    /// True when [`len`](Self::len) is zero.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Total positions handed to senders / receivers so far.
    pub fn cursors(&self) -> (u64, u64) {
        (
            self.tail.load(Ordering::Acquire),
            self.head.load(Ordering::Acquire),
        )
    }

    fn split(&self, pos: u64) -> (usize, &'a AtomicU64) {
        let slot = (pos % self.cap) as usize;
        (slot, (self.stamps)(slot))
    }

    /// Reserves the next position for sending; the caller must write the slot's payload and
    /// then call [`commit_send`](Self::commit_send) with the ticket.
    pub fn reserve_send(&self) -> Result<Ticket, RingError> {
        let mut pos = self.tail.load(Ordering::Relaxed);
        loop {
            let (slot, stamp) = self.split(pos);
            let s = stamp.load(Ordering::Acquire);
            if s == empty_for(pos) {
                match self.tail.compare_exchange_weak(
                    pos,
                    pos + 1,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => {
                        return Ok(Ticket {
                            pos,
                            slot,
                            intent: usize::MAX,
                        })
                    }
                    Err(t) => pos = t,
                }
            } else if s < empty_for(pos) {
                // Holds position pos - cap: full, unless tail moved meanwhile.
                let t = self.tail.load(Ordering::Relaxed);
                if t == pos {
                    return Err(RingError::Full);
                }
                pos = t;
            } else {
                // Another sender took pos: it moved `tail` before it could move the stamp
                // on. A stamp ahead of an unmoved `tail` is a corrupt ring (another process
                // wrote the segment): no slot can be had, as for a stuck slot, instead of
                // spinning on it forever.
                let t = self.tail.load(Ordering::Relaxed);
                if t == pos {
                    return Err(RingError::Full);
                }
                pos = t;
            }
        }
    }

    /// Publishes the payload written for `t`.
    pub fn commit_send(&self, t: Ticket) {
        let (_, stamp) = self.split(t.pos);
        // SYNC POINT: Release pairs with the receiver's Acquire load of this stamp.
        stamp.store(full_for(t.pos), Ordering::Release);
    }

    /// Reserves the next committed message; the caller reads the slot's payload and then
    /// calls [`commit_recv`](Self::commit_recv).
    pub fn reserve_recv(&self) -> Result<Ticket, RingError> {
        let mut pos = self.head.load(Ordering::Relaxed);
        loop {
            let (slot, stamp) = self.split(pos);
            let s = stamp.load(Ordering::Acquire);
            if s == full_for(pos) {
                match self.head.compare_exchange_weak(
                    pos,
                    pos + 1,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => {
                        return Ok(Ticket {
                            pos,
                            slot,
                            intent: usize::MAX,
                        })
                    }
                    Err(h) => pos = h,
                }
            } else if s < full_for(pos) {
                let h = self.head.load(Ordering::Relaxed);
                if h == pos {
                    return Err(RingError::Empty);
                }
                pos = h;
            } else {
                // As in `reserve_send`: a stamp ahead of an unmoved `head` is corruption;
                // nothing can be received there (as behind a stuck slot).
                let h = self.head.load(Ordering::Relaxed);
                if h == pos {
                    return Err(RingError::Empty);
                }
                pos = h;
            }
        }
    }

    /// Frees the slot read for `t` for the next lap.
    pub fn commit_recv(&self, t: Ticket) {
        let (_, stamp) = self.split(t.pos);
        // SYNC POINT: Release pairs with the next lap's sender's Acquire load.
        stamp.store(empty_for(t.pos.wrapping_add(self.cap)), Ordering::Release);
    }

    /// A cheap look (no cursor is written, the tail's line is not read): whether the slot at
    /// `head` holds a committed message now, so that a reservation would likely succeed.
    #[inline]
    pub fn ready_to_recv(&self) -> bool {
        let h = self.head.load(Ordering::Relaxed);
        self.split(h).1.load(Ordering::Acquire) == full_for(h)
    }

    /// As [`ready_to_recv`](Self::ready_to_recv), for senders: whether the slot at `tail` is
    /// free for it now.
    #[inline]
    pub fn ready_to_send(&self) -> bool {
        let t = self.tail.load(Ordering::Relaxed);
        self.split(t).1.load(Ordering::Acquire) == empty_for(t)
    }

    /// The position at `head` when its sender reserved it and has not committed it while
    /// later positions were reserved (a dead or slow sender: see [`Intents`]); `None` when
    /// the ring is not in that state.
    pub fn stuck_recv(&self) -> Option<u64> {
        let h = self.head.load(Ordering::Acquire);
        let t = self.tail.load(Ordering::Acquire);
        (t > h && self.split(h).1.load(Ordering::Acquire) == empty_for(h)).then_some(h)
    }

    /// The position `q` whose message a receiver reserved and has not committed, keeping the
    /// sender of `q + cap` out (a dead or slow receiver); `None` when the ring is not in that
    /// state.
    pub fn stuck_send(&self) -> Option<u64> {
        let t = self.tail.load(Ordering::Acquire);
        let q = t.checked_sub(self.cap)?;
        let h = self.head.load(Ordering::Acquire);
        (h > q && self.split(q).1.load(Ordering::Acquire) == full_for(q)).then_some(q)
    }

    /// Publishes position `q`, which a dead sender reserved and never committed, as a message
    /// after `fill` wrote what its slot should hold (a hole). False when `q` is not in that
    /// state (it was committed meanwhile). Only under the owner's recovery lock, after
    /// [`Intents::may_hold`] said no live sender may hold `q`.
    pub fn publish_abandoned(&self, q: u64, fill: impl FnOnce(usize)) -> bool {
        let (slot, stamp) = self.split(q);
        if self.tail.load(Ordering::Acquire) <= q || stamp.load(Ordering::Acquire) != empty_for(q) {
            return false;
        }
        fill(slot);
        // SYNC POINT: Release pairs with the receiver's Acquire load, as a commit does.
        stamp
            .compare_exchange(
                empty_for(q),
                full_for(q),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    /// Frees position `q`'s slot for the next lap when a dead receiver reserved it and never
    /// committed (its message is lost with it, as if received). Conditions as for
    /// [`publish_abandoned`](Self::publish_abandoned), for receivers.
    pub fn free_abandoned(&self, q: u64) -> bool {
        let (_, stamp) = self.split(q);
        if self.head.load(Ordering::Acquire) <= q {
            return false;
        }
        stamp
            .compare_exchange(
                full_for(q),
                empty_for(q.wrapping_add(self.cap)),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    /// The cursor senders reserve from (for [`Intents::announce`]).
    pub fn tail_cursor(&self) -> &'a AtomicU64 {
        self.tail
    }

    /// The cursor receivers reserve from (for [`Intents::announce`]).
    pub fn head_cursor(&self) -> &'a AtomicU64 {
        self.head
    }

    /// The stamp a slot shows now (for stuck-slot diagnosis).
    pub fn stamp(&self, slot: usize) -> u64 {
        (self.stamps)(slot).load(Ordering::Acquire)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::Arc;

    struct Mem {
        head: AtomicU64,
        tail: AtomicU64,
        stamps: Vec<AtomicU64>,
        data: Vec<AtomicU64>,
    }

    fn mem(cap: usize) -> Arc<Mem> {
        let m = Arc::new(Mem {
            head: AtomicU64::new(0),
            tail: AtomicU64::new(0),
            stamps: (0..cap).map(|_| AtomicU64::new(0)).collect(),
            data: (0..cap).map(|_| AtomicU64::new(0)).collect(),
        });
        Ring::new(&m.head, &m.tail, cap as u64, |i| &m.stamps[i]).init();
        m
    }

    #[test]
    fn full_and_empty_and_fifo() {
        let m = mem(3);
        let r = Ring::new(&m.head, &m.tail, 3, |i| &m.stamps[i]);
        assert_eq!(r.reserve_recv(), Err(RingError::Empty));
        for v in 0..3 {
            let t = r.reserve_send().unwrap();
            m.data[t.slot].store(v, Ordering::Relaxed);
            r.commit_send(t);
        }
        assert_eq!(r.reserve_send(), Err(RingError::Full));
        assert_eq!(r.len(), 3);
        for v in 0..3 {
            let t = r.reserve_recv().unwrap();
            assert_eq!(m.data[t.slot].load(Ordering::Relaxed), v);
            r.commit_recv(t);
        }
        assert_eq!(r.reserve_recv(), Err(RingError::Empty));
        // An uncommitted send looks empty to receivers.
        let t = r.reserve_send().unwrap();
        assert_eq!(r.reserve_recv(), Err(RingError::Empty));
        r.commit_send(t);
        assert!(r.reserve_recv().is_ok());
    }

    /// Regression (found by the shm header fuzz target): a stamp ahead of its cursor, as a
    /// corrupt segment can hold, made both reservations spin forever (a channel's `drain`
    /// on drop hung). Now it reads as full / empty.
    #[test]
    fn a_stamp_ahead_of_its_cursor_is_refused_not_spun_on() {
        let m = mem(2);
        let r = Ring::new(&m.head, &m.tail, 2, |i| &m.stamps[i]);
        m.stamps[0].store(100, Ordering::Relaxed);
        assert_eq!(r.reserve_recv(), Err(RingError::Empty));
        assert_eq!(r.reserve_send(), Err(RingError::Full));
        m.head.store(1 << 63, Ordering::Relaxed);
        m.tail.store(u64::MAX, Ordering::Relaxed);
        let _ = r.reserve_recv();
        let _ = r.reserve_send();
    }

    #[test]
    fn capacity_one_alternates() {
        let m = mem(1);
        let r = Ring::new(&m.head, &m.tail, 1, |i| &m.stamps[i]);
        for v in 0..5 {
            let t = r.reserve_send().unwrap();
            assert_eq!(
                r.reserve_send(),
                Err(RingError::Full),
                "one slot, already taken"
            );
            m.data[t.slot].store(v, Ordering::Relaxed);
            r.commit_send(t);
            assert_eq!(r.reserve_send(), Err(RingError::Full));
            let t = r.reserve_recv().unwrap();
            assert_eq!(m.data[t.slot].load(Ordering::Relaxed), v);
            r.commit_recv(t);
            assert_eq!(r.reserve_recv(), Err(RingError::Empty));
        }
    }

    #[test]
    fn threads_no_loss_no_dup() {
        let m = mem(8);
        const PER: u64 = 20_000;
        let mut hs = Vec::new();
        for p in 0..3u64 {
            let m = m.clone();
            hs.push(std::thread::spawn(move || {
                let r = Ring::new(&m.head, &m.tail, 8, |i| &m.stamps[i]);
                for k in 0..PER {
                    loop {
                        if let Ok(t) = r.reserve_send() {
                            m.data[t.slot].store(p << 32 | k, Ordering::Relaxed);
                            r.commit_send(t);
                            break;
                        }
                        std::thread::yield_now();
                    }
                }
            }));
        }
        let mut cs = Vec::new();
        for _ in 0..2 {
            let m = m.clone();
            cs.push(std::thread::spawn(move || {
                let r = Ring::new(&m.head, &m.tail, 8, |i| &m.stamps[i]);
                let mut got = Vec::new();
                let mut last = [None::<u64>; 3];
                while got.len() < (3 * PER / 2) as usize {
                    match r.reserve_recv() {
                        Ok(t) => {
                            let v = m.data[t.slot].load(Ordering::Relaxed);
                            r.commit_recv(t);
                            let (p, k) = ((v >> 32) as usize, v & 0xffff_ffff);
                            if let Some(l) = last[p] {
                                assert!(k > l, "FIFO per producer violated");
                            }
                            last[p] = Some(k);
                            got.push(v);
                        }
                        Err(_) => std::thread::yield_now(),
                    }
                }
                got
            }));
        }
        for h in hs {
            h.join().unwrap();
        }
        let mut all = HashSet::new();
        for c in cs {
            for v in c.join().unwrap() {
                assert!(all.insert(v), "duplicate {v:#x}");
            }
        }
        assert_eq!(all.len() as u64, 3 * PER);
    }
}
