//! [`Semaphore`] and [`BoundedSemaphore`] (`multiprocessing.Semaphore` /
//! `BoundedSemaphore`).
//!
//! # Protocol
//! `value: u32` is the count; `max` is the bound (the initial value for a bounded
//! semaphore, [`SEM_VALUE_MAX`] otherwise).
//! * acquire: CAS `value -> value - 1` when `value > 0` (Acquire); else sleep on the wait
//!   queue until a CAS succeeds.
//! * release(n): CAS `value -> value + n` unless that exceeds `max` ([`SyncError::Overflow`])
//!   (Release), then wake one sleeper (`n == 1`) or all.
//!
//! SYNC POINT: the Release CAS in `release` pairs with the Acquire CAS in `acquire`; the
//! wait queue's Dekker pair makes sure a sleeper that missed the increment is woken. A woken
//! sleeper whose unit was taken by a non-sleeping acquirer sleeps again: units are never
//! lost, and a process blocked here uses no CPU.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::{opts_for, wait_on, Header, Obj, Shared, SyncError, WaitOpts};
use super::{BOUNDED_SEMAPHORE_MAGIC, SEMAPHORE_MAGIC};
use crate::heap::{Block, BlockRef, Pool};
use crate::waitqueue::WaitQueue;

/// Largest semaphore value (CPython's `SEM_VALUE_MAX` on Linux).
pub const SEM_VALUE_MAX: u32 = i32::MAX as u32;

#[repr(C)]
pub(crate) struct SemLayout<const BOUNDED: bool> {
    hdr: Header,
    value: AtomicU32,
    max: AtomicU32,
    wq: WaitQueue,
}

// SAFETY: repr(C), atomics and a WaitQueue only, align 8, header first.
unsafe impl<const BOUNDED: bool> Shared for SemLayout<BOUNDED> {
    const MAGIC: u32 = if BOUNDED {
        BOUNDED_SEMAPHORE_MAGIC
    } else {
        SEMAPHORE_MAGIC
    };
    const NOT_THIS: &'static str = if BOUNDED {
        "not a BoundedSemaphore"
    } else {
        "not a Semaphore"
    };
    fn header(&self) -> &Header {
        &self.hdr
    }
}

impl<const BOUNDED: bool> SemLayout<BOUNDED> {
    fn try_acquire(&self) -> bool {
        let mut v = self.value.load(Ordering::Relaxed);
        while v > 0 {
            // SYNC POINT: Acquire pairs with the Release CAS in `release`.
            match self
                .value
                .compare_exchange_weak(v, v - 1, Ordering::Acquire, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(cur) => v = cur,
            }
        }
        false
    }

    fn acquire_with(&self, opts: &WaitOpts) -> Result<(), SyncError> {
        wait_on(&self.wq, opts, || self.try_acquire().then_some(()))
    }

    fn release(&self, n: u32) -> Result<(), SyncError> {
        let max = self.max.load(Ordering::Relaxed).min(SEM_VALUE_MAX);
        let mut v = self.value.load(Ordering::Relaxed);
        loop {
            let nv = v
                .checked_add(n)
                .filter(|&nv| nv <= max)
                .ok_or(SyncError::Overflow)?;
            // SYNC POINT: Release pairs with the Acquire CAS in `try_acquire`.
            match self
                .value
                .compare_exchange_weak(v, nv, Ordering::Release, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(cur) => v = cur,
            }
        }
        if n == 1 {
            self.wq.notify_one();
        } else if n > 1 {
            self.wq.notify_all();
        }
        Ok(())
    }

    fn create(pool: &Pool, value: u32) -> Result<Obj<Self>, SyncError> {
        if value > SEM_VALUE_MAX {
            return Err(SyncError::Overflow);
        }
        let max = if BOUNDED { value } else { SEM_VALUE_MAX };
        Obj::create(pool, 0, |l: &Self| {
            l.value.store(value, Ordering::Relaxed);
            l.max.store(max, Ordering::Relaxed);
        })
    }
}

macro_rules! semaphore {
    ($(#[$doc:meta])* $name:ident, $bounded:literal, $create_doc:literal) => {
        $(#[$doc])*
        #[derive(Debug)]
        pub struct $name {
            obj: Obj<SemLayout<$bounded>>,
        }

        impl $name {
            #[doc = $create_doc]
            pub fn create(pool: &Pool, value: u32) -> Result<$name, SyncError> {
                Ok($name { obj: SemLayout::<$bounded>::create(pool, value)? })
            }

            /// Attaches to a block of this type (e.g. `pool.block(block_ref)` in another
            /// process).
            pub fn attach(block: Block) -> Result<$name, SyncError> {
                Ok($name { obj: Obj::attach(block)? })
            }

            /// Another handle (one more hold by this process).
            pub fn try_clone(&self) -> Result<$name, SyncError> {
                Ok($name { obj: self.obj.try_clone()? })
            }

            /// The handle other processes attach with.
            pub fn block_ref(&self) -> BlockRef {
                self.obj.block_ref()
            }

            /// The block holding the semaphore.
            pub fn block(&self) -> &Block {
                self.obj.block()
            }

            /// Takes one unit like `acquire(blocking, timeout)` in CPython: false when none
            /// came (non-blocking, or `timeout` passed).
            pub fn acquire(&self, blocking: bool, timeout: Option<Duration>) -> bool {
                self.acquire_with(&opts_for(blocking, timeout)).is_ok()
            }

            /// Takes one unit following `opts` (`TimedOut`, `Interrupted`).
            pub fn acquire_with(&self, opts: &WaitOpts) -> Result<(), SyncError> {
                self.obj.get().acquire_with(opts)
            }

            /// Gives one unit back and wakes a waiter.
            pub fn release(&self) -> Result<(), SyncError> {
                self.obj.get().release(1)
            }

            /// Gives `n` units back at once.
            pub fn release_n(&self, n: u32) -> Result<(), SyncError> {
                self.obj.get().release(n)
            }

            /// The current count.
            pub fn get_value(&self) -> u32 {
                self.obj.get().value.load(Ordering::Relaxed)
            }

            /// The largest count a release may reach.
            pub fn max_value(&self) -> u32 {
                self.obj.get().max.load(Ordering::Relaxed)
            }
        }
    };
}

semaphore!(
    /// A process-shared counting semaphore; releases may raise the count up to
    /// [`SEM_VALUE_MAX`] (beyond: [`SyncError::Overflow`]).
    Semaphore,
    false,
    "Creates a semaphore with count `value` (at most [`SEM_VALUE_MAX`]) in a new block."
);

semaphore!(
    /// A process-shared semaphore whose count may not exceed its initial value: a release
    /// beyond it is [`SyncError::Overflow`] (Python: `ValueError`).
    BoundedSemaphore,
    true,
    "Creates a bounded semaphore with count and bound `value` in a new block."
);

// The shared layouts of this file, fixed: a change here changes what other processes (and
// other versions) read, so it must come with a layout version bump. (Loom's atomics differ.)
#[cfg(not(loom))]
const _: () = assert!(std::mem::size_of::<SemLayout<true>>() == 24);
#[cfg(not(loom))]
const _: () = assert!(std::mem::size_of::<SemLayout<false>>() == 24);

#[cfg(test)]
mod tests {
    use super::super::test_util::{finish, pool, until};
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;

    #[test]
    fn layout_size() {
        assert_eq!(std::mem::size_of::<SemLayout<false>>(), 24);
    }

    #[test]
    fn counts_and_bounded_overflow() {
        let (rt, p) = pool();
        let s = Semaphore::create(&p, 2).unwrap();
        assert!(s.acquire(false, None));
        assert!(s.acquire(true, None));
        assert_eq!(s.get_value(), 0);
        assert!(!s.acquire(false, None));
        assert!(!s.acquire(true, Some(Duration::from_millis(5))));
        s.release_n(5).unwrap();
        assert_eq!(s.get_value(), 5);
        assert_eq!(
            Semaphore::create(&p, SEM_VALUE_MAX + 1).unwrap_err(),
            SyncError::Overflow
        );

        let b = BoundedSemaphore::create(&p, 2).unwrap();
        assert_eq!(b.release(), Err(SyncError::Overflow));
        assert!(b.acquire(true, None));
        assert_eq!(b.get_value(), 1);
        assert_eq!(b.release_n(2), Err(SyncError::Overflow));
        b.release().unwrap();
        assert_eq!(b.get_value(), 2);
        assert_eq!(b.release(), Err(SyncError::Overflow));
        assert_eq!(b.get_value(), 2);
        // SAFETY: the sync object never lends its block mutably.
        assert!(Semaphore::attach(unsafe { p.block(b.block_ref()) }.unwrap()).is_err());
        // SAFETY: the sync object never lends its block mutably.
        let b2 = BoundedSemaphore::attach(unsafe { p.block(b.block_ref()) }.unwrap()).unwrap();
        assert_eq!(b2.max_value(), 2);
        drop((s, b, b2));
        finish(rt, p);
    }

    #[test]
    fn never_more_holders_than_units() {
        let (rt, p) = pool();
        let s = Arc::new(Semaphore::create(&p, 3).unwrap());
        let inside = Arc::new(AtomicU64::new(0));
        let max_seen = Arc::new(AtomicU64::new(0));
        let ts: Vec<_> = (0..6)
            .map(|_| {
                let (s, inside, max_seen) = (s.clone(), inside.clone(), max_seen.clone());
                std::thread::spawn(move || {
                    for _ in 0..2000 {
                        assert!(s.acquire(true, None));
                        let n = inside.fetch_add(1, Ordering::SeqCst) + 1;
                        max_seen.fetch_max(n, Ordering::SeqCst);
                        std::hint::spin_loop();
                        inside.fetch_sub(1, Ordering::SeqCst);
                        s.release().unwrap();
                    }
                })
            })
            .collect();
        for t in ts {
            t.join().unwrap();
        }
        assert!(max_seen.load(Ordering::SeqCst) <= 3);
        assert_eq!(s.get_value(), 3);
        drop(s);
        finish(rt, p);
    }

    #[test]
    fn release_wakes_each_blocked_waiter() {
        let (rt, p) = pool();
        let s = Arc::new(Semaphore::create(&p, 0).unwrap());
        let done = Arc::new(AtomicU64::new(0));
        let ts: Vec<_> = (0..3)
            .map(|_| {
                let (s, done) = (s.clone(), done.clone());
                std::thread::spawn(move || {
                    let ok = s.acquire(true, Some(Duration::from_secs(30)));
                    done.fetch_add(1, Ordering::SeqCst);
                    ok
                })
            })
            .collect();
        until(|| s.obj.get().wq.waiters() == 3);
        for i in 1..=3 {
            s.release().unwrap();
            until(|| done.load(Ordering::SeqCst) == i);
        }
        for t in ts {
            assert!(t.join().unwrap());
        }
        assert_eq!(s.get_value(), 0);
        drop(s);
        finish(rt, p);
    }
}
