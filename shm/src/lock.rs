//! A process-shared mutex that survives the death of its holder.
//!
//! # Protocol
//! One 32-bit futex word: `0` when free, else `owner_pid | CONTENDED?`. A second word,
//! `owner_tag` (pid << 32 | low bits of the owner's start time), is written right after
//! acquiring so a waiter can tell a dead owner from a recycled pid.
//!
//! * lock: CAS `0 -> me`. On failure, set `CONTENDED` and `futex_wait`, waking at least
//!   every [`LIVENESS_POLL`] to look at the owner. If the owner is dead (no such process,
//!   a zombie, or another start time), CAS its word to ours: we now hold the lock and the
//!   guard says `recovered`, so the caller repairs whatever the dead owner left half done.
//! * unlock: swap to `0`; if `CONTENDED` was set, wake one waiter.
//!
//! The kernel's robust-futex list is not used: glibc owns it per thread, and a lock that any
//! process may release (as `multiprocessing.Lock` allows) cannot live on it anyway.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::platform::{futex_wait, futex_wake, FutexWait, ProcessId};

/// How often a waiter checks whether the holder still lives.
pub const LIVENESS_POLL: Duration = Duration::from_millis(50);
const CONTENDED: u32 = 1 << 31;
/// Polls of the lock word before a contended locker sleeps (a few microseconds: critical
/// sections are shorter than a futex sleep and wake-up, and sleeping marks the word
/// CONTENDED, which costs every later unlock a wake-up call).
const SPIN_POLLS: u32 = 100;
const PID_MASK: u32 = !CONTENDED;

/// Shared-memory layout of the robust mutex: 16 bytes, `#[repr(C)]`, all-zero = unlocked.
#[repr(C)]
#[derive(Debug)]
pub struct RobustMutex {
    word: AtomicU32,
    _pad: u32,
    owner_tag: AtomicU64,
}

/// Why `lock` gave up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LockError {
    /// The deadline passed while another live process held the lock.
    #[error("timed out waiting for a lock another live process holds")]
    TimedOut,
    /// A signal arrived during an interruptible wait.
    #[error("interrupted by a signal")]
    Interrupted,
}

/// Proof of holding the lock; unlocks on drop.
#[derive(Debug)]
#[must_use]
pub struct RobustGuard<'a> {
    m: &'a RobustMutex,
    recovered: bool,
}

impl RobustGuard<'_> {
    /// True when the previous holder died holding the lock: its critical section may be
    /// half done, repair before use.
    pub fn recovered(&self) -> bool {
        self.recovered
    }
}

impl Drop for RobustGuard<'_> {
    fn drop(&mut self) {
        self.m.unlock_raw();
    }
}

impl RobustMutex {
    /// An unlocked mutex (for memory that is not shared).
    pub const fn new() -> Self {
        RobustMutex {
            word: AtomicU32::new(0),
            _pad: 0,
            owner_tag: AtomicU64::new(0),
        }
    }

    /// Resets to unlocked (only while nobody else can see it, e.g. during segment init).
    pub fn init(&self) {
        self.owner_tag.store(0, Ordering::Relaxed);
        self.word.store(0, Ordering::Release);
    }

    /// Takes the lock, waiting as long as needed (dead holders are recovered).
    pub fn lock(&self) -> RobustGuard<'_> {
        match self.lock_until(None, false) {
            Ok(g) => g,
            Err(_) => unreachable!("untimed, uninterruptible lock cannot fail"),
        }
    }

    /// Takes the lock if nobody holds it (no waiting, no recovery).
    pub fn try_lock(&self) -> Option<RobustGuard<'_>> {
        let me = ProcessId::current();
        // SYNC POINT: Acquire on success pairs with the Release swap in `unlock_raw`.
        if self
            .word
            .compare_exchange(0, me.pid, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            self.owner_tag.store(me.packed(), Ordering::Relaxed);
            return Some(RobustGuard {
                m: self,
                recovered: false,
            });
        }
        None
    }

    /// Takes the lock, giving up at `deadline`; `interruptible` makes a signal end the wait.
    pub fn lock_until(
        &self,
        deadline: Option<Instant>,
        interruptible: bool,
    ) -> Result<RobustGuard<'_>, LockError> {
        if let Some(g) = self.try_lock() {
            return Ok(g);
        }
        for _ in 0..SPIN_POLLS {
            for _ in 0..8 {
                std::hint::spin_loop();
            }
            if self.word.load(Ordering::Relaxed) == 0 {
                if let Some(g) = self.try_lock() {
                    return Ok(g);
                }
            }
        }
        let me = ProcessId::current();
        let mut last_check = Instant::now();
        loop {
            let cur = self.word.load(Ordering::Relaxed);
            if cur == 0 {
                // Somebody may be waiting besides us: keep CONTENDED so unlock wakes them.
                if self
                    .word
                    .compare_exchange(0, me.pid | CONTENDED, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
                {
                    self.owner_tag.store(me.packed(), Ordering::Relaxed);
                    return Ok(RobustGuard {
                        m: self,
                        recovered: false,
                    });
                }
                continue;
            }
            if cur & CONTENDED == 0
                && self
                    .word
                    .compare_exchange(cur, cur | CONTENDED, Ordering::Relaxed, Ordering::Relaxed)
                    .is_err()
            {
                continue;
            }
            let now = Instant::now();
            if now.duration_since(last_check) >= LIVENESS_POLL || cur & PID_MASK == me.pid {
                last_check = now;
                if !self.holder_alive(cur & PID_MASK) {
                    // Steal from the dead: only succeeds if the word is unchanged.
                    if self
                        .word
                        .compare_exchange(
                            cur | CONTENDED,
                            me.pid | CONTENDED,
                            Ordering::Acquire,
                            Ordering::Relaxed,
                        )
                        .is_ok()
                    {
                        self.owner_tag.store(me.packed(), Ordering::Relaxed);
                        return Ok(RobustGuard {
                            m: self,
                            recovered: true,
                        });
                    }
                    continue;
                }
            }
            let mut slice = LIVENESS_POLL;
            if let Some(d) = deadline {
                if now >= d {
                    return Err(LockError::TimedOut);
                }
                slice = slice.min(d - now);
            }
            let r = futex_wait(&self.word, cur | CONTENDED, Some(slice));
            if r == FutexWait::Interrupted && interruptible {
                return Err(LockError::Interrupted);
            }
        }
    }

    fn holder_alive(&self, pid: u32) -> bool {
        let me = ProcessId::current();
        let tag = ProcessId::from_packed(self.owner_tag.load(Ordering::Relaxed));
        if pid == me.pid {
            // Our own process holds it (another thread): alive by definition, unless the
            // tag says a previous process with our recycled pid held it.
            return tag.pid != pid || tag.start == (me.start & 0xffff_ffff);
        }
        if tag.pid == pid {
            tag.is_alive()
        } else {
            // Owner has not written its tag yet: judge by pid alone.
            crate::platform::liveness(pid) != crate::platform::Liveness::Dead
        }
    }

    fn unlock_raw(&self) {
        // SYNC POINT: Release pairs with the Acquire CAS in `lock_until`/`try_lock`.
        let old = self.word.swap(0, Ordering::Release);
        if old & CONTENDED != 0 {
            futex_wake(&self.word, 1);
        }
    }

    /// Releases a lock held by this process without a guard (for `multiprocessing.Lock`,
    /// which may be released by a thread other than the acquirer). Returns false if the lock
    /// was not held.
    pub fn force_unlock(&self) -> bool {
        if self.word.load(Ordering::Relaxed) == 0 {
            return false;
        }
        self.unlock_raw();
        true
    }

    /// Forgets a guard without unlocking (the lock stays held, e.g. by a Python object).
    pub fn leak(guard: RobustGuard<'_>) -> bool {
        let r = guard.recovered;
        std::mem::forget(guard);
        r
    }

    /// The pid holding the lock, if any.
    pub fn holder(&self) -> Option<u32> {
        match self.word.load(Ordering::Relaxed) & PID_MASK {
            0 => None,
            p => Some(p),
        }
    }

    /// Marks the lock as held by `pid` without any checks: only for tests that need a dead
    /// holder ("abandon" a lock).
    #[doc(hidden)]
    pub fn abandon_as(&self, owner: ProcessId) {
        self.word.store(owner.pid, Ordering::Release);
        self.owner_tag.store(owner.packed(), Ordering::Relaxed);
    }
}

impl Default for RobustMutex {
    fn default() -> Self {
        Self::new()
    }
}

// The shared layouts of this file, fixed: a change here changes what other processes (and
// other versions) read, so it must come with a layout version bump. (Loom's atomics differ.)
#[cfg(not(loom))]
const _: () = assert!(std::mem::size_of::<RobustMutex>() == 16);

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn excludes_threads() {
        let m = Arc::new((RobustMutex::new(), AtomicU64::new(0)));
        let ts: Vec<_> = (0..4)
            .map(|_| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        let g = m.0.lock();
                        assert!(!g.recovered());
                        // Non-atomic read-modify-write made safe only by the lock.
                        let v = m.1.load(Ordering::Relaxed);
                        m.1.store(v + 1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for t in ts {
            t.join().unwrap();
        }
        assert_eq!(m.1.load(Ordering::Relaxed), 40_000);
        assert_eq!(m.0.holder(), None);
    }

    #[test]
    fn recovers_from_dead_holder_and_says_so() {
        let m = RobustMutex::new();
        // A pid that cannot be alive: above the kernel's pid_max limit.
        m.abandon_as(ProcessId {
            pid: 0x3fff_fff0,
            start: 1,
        });
        let g = m.lock();
        assert!(g.recovered());
        drop(g);
        assert!(!m.lock().recovered());
    }

    #[test]
    fn times_out_on_live_holder() {
        let m = Arc::new(RobustMutex::new());
        let g = m.lock();
        let m2 = m.clone();
        let r = std::thread::spawn(move || {
            m2.lock_until(Some(Instant::now() + Duration::from_millis(20)), false)
                .map(|_| ())
        })
        .join()
        .unwrap();
        assert_eq!(r, Err(LockError::TimedOut));
        drop(g);
        assert!(m.try_lock().is_some());
    }
}
