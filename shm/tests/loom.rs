//! Loom models of the ring's stamp protocol and of the futex wait/wake protocol.
//!
//! Run with `make loom` (`RUSTFLAGS="--cfg loom" cargo test -p dragon-shm --test loom`).
//! Payloads live in loom `UnsafeCell`s, so a receiver reading a slot its sender has not
//! finished (or a sender overwriting an unread slot) is reported as a data race; a lost
//! wake-up shows up as a deadlock of the modelled futex.
#![cfg(loom)]

use std::time::Duration;

use dragon_shm::ring::{Ring, RingError};
use dragon_shm::waitqueue::{WaitOpts, WaitQueue};
use loom::cell::UnsafeCell;
use loom::sync::atomic::{AtomicU32, AtomicU64, Ordering};
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
