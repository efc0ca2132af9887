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
//! A sender that dies between winning the CAS and committing leaves its slot with stamp `p`:
//! receivers see "empty" at that position forever. The channel layer reports this as a stuck
//! slot (see `channel.rs`); the ring itself never reads a half-written payload.

use crate::primitive::{AtomicU64, Ordering};

/// What a successful reservation hands out: a position and its slot index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    /// The position (monotonic message number).
    pub pos: u64,
    /// `pos % cap`.
    pub slot: usize,
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
            (self.stamps)(i as usize).store(2 * i, Ordering::Relaxed);
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
            if s == 2 * pos {
                match self.tail.compare_exchange_weak(
                    pos,
                    pos + 1,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => return Ok(Ticket { pos, slot }),
                    Err(t) => pos = t,
                }
            } else if s < 2 * pos {
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
        stamp.store(2 * t.pos + 1, Ordering::Release);
    }

    /// Reserves the next committed message; the caller reads the slot's payload and then
    /// calls [`commit_recv`](Self::commit_recv).
    pub fn reserve_recv(&self) -> Result<Ticket, RingError> {
        let mut pos = self.head.load(Ordering::Relaxed);
        loop {
            let (slot, stamp) = self.split(pos);
            let s = stamp.load(Ordering::Acquire);
            if s == 2 * pos + 1 {
                match self.head.compare_exchange_weak(
                    pos,
                    pos + 1,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => return Ok(Ticket { pos, slot }),
                    Err(h) => pos = h,
                }
            } else if s < 2 * pos + 1 {
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
        stamp.store(2 * (t.pos + self.cap), Ordering::Release);
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
