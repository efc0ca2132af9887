//! Loom models of the ring's stamp protocol and of the futex wait/wake protocol.
//!
//! Run with `make loom` (`RUSTFLAGS="--cfg loom" cargo test -p dragon-shm --test loom`).
//! Payloads live in loom `UnsafeCell`s, so a receiver reading a slot its sender has not
//! finished (or a sender overwriting an unread slot) is reported as a data race; a lost
//! wake-up shows up as a deadlock of the modelled futex.
#![cfg(loom)]

use std::time::Duration;

use dragon_shm::ring::{Intent, Intents, Ring, RingError};
use dragon_shm::waitqueue::{WaitOpts, WaitQueue};
use loom::cell::UnsafeCell;
use loom::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use loom::sync::Arc;
use loom::thread;

struct Mem {
    head: AtomicU64,
    tail: AtomicU64,
    stamps: Vec<AtomicU64>,
    data: Vec<UnsafeCell<u64>>,
    not_empty: WaitQueue,
    not_full: WaitQueue,
    closed: AtomicU32,
}

// SAFETY (test model): slot data is only touched under the ring's tickets, which is exactly
// what loom checks.
unsafe impl Sync for Mem {}

impl Mem {
    fn new(cap: usize) -> Arc<Mem> {
        let m = Arc::new(Mem {
            head: AtomicU64::new(0),
            tail: AtomicU64::new(0),
            stamps: (0..cap).map(|i| AtomicU64::new(2 * i as u64)).collect(),
            data: (0..cap).map(|_| UnsafeCell::new(0)).collect(),
            not_empty: WaitQueue::new(),
            not_full: WaitQueue::new(),
            closed: AtomicU32::new(0),
        });
        m
    }

    fn ring<'a>(&'a self) -> Ring<'a, impl Fn(usize) -> &'a AtomicU64 + 'a> {
        Ring::new(&self.head, &self.tail, self.stamps.len() as u64, move |i| {
            &self.stamps[i]
        })
    }

    fn try_send(&self, v: u64) -> Result<(), RingError> {
        let r = self.ring();
        let t = r.reserve_send()?;
        self.data[t.slot].with_mut(|p| {
            // SAFETY: the ticket grants exclusive access (checked by loom).
            unsafe { *p = v }
        });
        r.commit_send(t);
        Ok(())
    }

    fn try_recv(&self) -> Result<u64, RingError> {
        let r = self.ring();
        let t = r.reserve_recv()?;
        let v = self.data[t.slot].with(|p| {
            // SAFETY: as above.
            unsafe { *p }
        });
        r.commit_recv(t);
        Ok(v)
    }

    /// Blocking send: waits on `not_full`, wakes `not_empty`.
    fn send(&self, v: u64) {
        self.not_full
            .wait_until(|| self.try_send(v).ok(), &opts())
            .unwrap();
        self.not_empty.notify_one();
    }

    /// Blocking receive; `None` once closed and empty.
    fn recv(&self) -> Option<u64> {
        let r = self.not_empty.wait_until(
            || match self.try_recv() {
                Ok(v) => Some(Some(v)),
                Err(_) if self.closed.load(Ordering::Acquire) != 0 => Some(self.try_recv().ok()),
                Err(_) => None,
            },
            &opts(),
        );
        let v = r.unwrap();
        if v.is_some() {
            self.not_full.notify_one();
        }
        v
    }
}

fn opts() -> WaitOpts {
    WaitOpts {
        spin: Duration::ZERO,
        deadline: None,
        interruptible: false,
        poll_every: None,
    }
}

fn spin_until<T>(mut f: impl FnMut() -> Option<T>) -> T {
    loop {
        if let Some(v) = f() {
            return v;
        }
        thread::yield_now();
    }
}

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    if b.preemption_bound.is_none() {
        b.preemption_bound = Some(3);
    }
    b.check(f);
}

/// Two producers, one consumer, capacity 2: both values arrive once, the slot payloads are
/// never raced.
#[test]
fn ring_two_producers_one_consumer() {
    model(|| {
        let m = Mem::new(2);
        let hs: Vec<_> = (1..=2u64)
            .map(|v| {
                let m = m.clone();
                thread::spawn(move || spin_until(|| m.try_send(v).ok()))
            })
            .collect();
        let a = spin_until(|| m.try_recv().ok());
        let b = spin_until(|| m.try_recv().ok());
        for h in hs {
            h.join().unwrap();
        }
        let mut got = [a, b];
        got.sort();
        assert_eq!(got, [1, 2]);
        assert_eq!(m.try_recv(), Err(RingError::Empty));
    });
}

/// Capacity 1 forces the second send onto the next lap: FIFO and no overwrite of an unread
/// slot.
#[test]
fn ring_wraps_laps_in_order() {
    model(|| {
        let m = Mem::new(1);
        let p = {
            let m = m.clone();
            thread::spawn(move || {
                for v in [10, 20] {
                    spin_until(|| m.try_send(v).ok());
                }
            })
        };
        let a = spin_until(|| m.try_recv().ok());
        let b = spin_until(|| m.try_recv().ok());
        p.join().unwrap();
        assert_eq!((a, b), (10, 20));
    });
}

/// The futex wait/wake protocol never loses a wake-up: a waiter that checks, announces
/// itself and sleeps is always woken by a notifier that sets the flag afterwards.
#[test]
fn waitqueue_no_lost_wakeup() {
    model(|| {
        let q = Arc::new(WaitQueue::new());
        let flag = Arc::new(AtomicU32::new(0));
        let w = {
            let (q, flag) = (q.clone(), flag.clone());
            thread::spawn(move || {
                q.wait_until(
                    || (flag.load(Ordering::Acquire) == 1).then_some(()),
                    &opts(),
                )
                .unwrap()
            })
        };
        flag.store(1, Ordering::Release);
        q.notify_one();
        w.join().unwrap();
    });
}

/// Blocking send and receive on a full / empty ring of capacity 1 (sleeping on both wait
/// queues) deliver both messages in order and never deadlock.
#[test]
fn blocking_full_and_empty() {
    model(|| {
        let m = Mem::new(1);
        let p = {
            let m = m.clone();
            thread::spawn(move || {
                m.send(1);
                m.send(2);
            })
        };
        assert_eq!(m.recv(), Some(1));
        assert_eq!(m.recv(), Some(2));
        p.join().unwrap();
    });
}

/// Closing wakes a receiver sleeping on an empty ring, and it sees what was sent before.
#[test]
fn close_wakes_receiver() {
    model(|| {
        let m = Mem::new(2);
        let r = {
            let m = m.clone();
            thread::spawn(move || {
                let mut got = Vec::new();
                while let Some(v) = m.recv() {
                    got.push(v);
                }
                got
            })
        };
        m.send(5);
        m.closed.store(1, Ordering::Release);
        m.not_empty.notify_all();
        assert_eq!(r.join().unwrap(), vec![5]);
    });
}

/// Ring, intent table and per-slot "hole" marks for the dead-party models.
struct Crash {
    head: AtomicU64,
    tail: AtomicU64,
    stamps: Vec<AtomicU64>,
    data: Vec<UnsafeCell<u64>>,
    hole: Vec<UnsafeCell<bool>>,
    intents: Vec<Intent>,
    /// Set by the party that "dies", after its last action (what `/proc` shows later).
    dead: AtomicBool,
}

// SAFETY (test model): slot cells are only touched under the ring's tickets or by a recovery
// that the protocol says is alone on the slot, which is what loom checks.
unsafe impl Sync for Crash {}

/// The owner ids of the models: 1 dies, 2 lives.
const DYING: u64 = 1;
const LIVING: u64 = 2;

impl Crash {
    fn new(cap: usize) -> Arc<Crash> {
        Arc::new(Crash {
            head: AtomicU64::new(0),
            tail: AtomicU64::new(0),
            stamps: (0..cap).map(|i| AtomicU64::new(2 * i as u64)).collect(),
            data: (0..cap).map(|_| UnsafeCell::new(0)).collect(),
            hole: (0..cap).map(|_| UnsafeCell::new(false)).collect(),
            intents: (0..2).map(|_| Intent::new()).collect(),
            dead: AtomicBool::new(false),
        })
    }

    fn ring<'a>(&'a self) -> Ring<'a, impl Fn(usize) -> &'a AtomicU64 + 'a> {
        Ring::new(&self.head, &self.tail, self.stamps.len() as u64, move |i| {
            &self.stamps[i]
        })
    }

    fn intents(&self) -> Intents<'_> {
        Intents::new(&self.intents)
    }

    fn alive(&self, owner: u64) -> bool {
        owner == LIVING || !self.dead.load(Ordering::Acquire)
    }

    /// A send announced as `me`: claim, announce, reserve (spinning while full), write,
    /// commit, withdraw. With `die`, the party stops right after its reservation.
    fn send_as(&self, me: u64, v: u64, die: bool) {
        let i = self
            .intents()
            .claim(me, me as usize, |o| self.alive(o))
            .unwrap();
        let r = self.ring();
        self.intents().announce(i, r.tail_cursor(), false);
        let t = spin_until(|| r.reserve_send().ok());
        if die {
            self.dead.store(true, Ordering::Release);
            return;
        }
        // SAFETY: the ticket grants exclusive access (checked by loom).
        self.data[t.slot].with_mut(|p| unsafe { *p = v });
        self.hole[t.slot].with_mut(|p| unsafe { *p = false });
        r.commit_send(t);
        self.intents().release(i);
    }
}

/// A sender dies between reserving its position and committing it while another sender
/// works: the receiver publishes only the dead sender's position (as a hole) and gets the
/// live sender's value, and never touches a slot the live sender is writing (loom reports
/// a race on the slot's cells otherwise).
#[test]
fn a_dead_senders_position_becomes_a_hole_never_a_live_senders() {
    model(|| {
        let m = Crash::new(2);
        let hs: Vec<_> = [(DYING, true), (LIVING, false)]
            .into_iter()
            .map(|(me, die)| {
                let m = m.clone();
                thread::spawn(move || m.send_as(me, 42, die))
            })
            .collect();
        let r = m.ring();
        let got = spin_until(|| match r.reserve_recv() {
            Ok(t) => {
                // SAFETY: as above.
                let hole = m.hole[t.slot].with(|p| unsafe { *p });
                let v = m.data[t.slot].with(|p| unsafe { *p });
                r.commit_recv(t);
                (!hole).then_some(v)
            }
            Err(_) => {
                if let Some(q) = r.stuck_recv() {
                    if !m.intents().may_hold(q, false, |o| m.alive(o)) {
                        r.publish_abandoned(q, |slot| {
                            // SAFETY: no live sender may hold q (checked by loom).
                            m.hole[slot].with_mut(|p| unsafe { *p = true })
                        });
                    }
                }
                None
            }
        });
        assert_eq!(got, 42);
        for h in hs {
            h.join().unwrap();
        }
    });
}

/// A receiver dies between reserving a message (after reading it) and committing its slot:
/// the sender of the next lap frees the slot only once the receiver is dead, and its new
/// value is then received; the dead receiver's read never races the new write.
#[test]
fn a_dead_receivers_slot_is_freed_for_the_next_lap() {
    model(|| {
        let m = Crash::new(1);
        m.send_as(LIVING, 1, false);
        let d = {
            let m = m.clone();
            thread::spawn(move || {
                let i = m.intents().claim(DYING, 0, |o| m.alive(o)).unwrap();
                let r = m.ring();
                m.intents().announce(i, r.head_cursor(), true);
                let t = r.reserve_recv().unwrap();
                // SAFETY: as above.
                assert_eq!(m.data[t.slot].with(|p| unsafe { *p }), 1);
                m.dead.store(true, Ordering::Release);
            })
        };
        let r = m.ring();
        spin_until(|| match r.reserve_send() {
            Ok(t) => {
                // SAFETY: as above.
                m.data[t.slot].with_mut(|p| unsafe { *p = 2 });
                r.commit_send(t);
                Some(())
            }
            Err(_) => {
                if let Some(q) = r.stuck_send() {
                    if !m.intents().may_hold(q, true, |o| m.alive(o)) {
                        r.free_abandoned(q);
                    }
                }
                None
            }
        });
        let t = r.reserve_recv().unwrap();
        // SAFETY: as above.
        assert_eq!(m.data[t.slot].with(|p| unsafe { *p }), 2);
        r.commit_recv(t);
        d.join().unwrap();
    });
}
