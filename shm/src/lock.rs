//! A process-shared mutex that survives the death of its holder.
//!
//! # Protocol
//! One 64-bit word, `state`: `0` when free, else the owner's identity
//! `start_tag << 32 | owner_pid | CONTENDED?` (`start_tag` = low 32 bits of the owner's start
//! time, `CONTENDED` = bit 31). The whole identity is set by the acquiring CAS itself, so a
//! waiter always judges the process that holds the lock: never a stale tag of an earlier
//! owner with the same (recycled) pid, never a bare pid a new process may have taken over.
//! (Until layout 2 the identity was a second word stored after the CAS: a waiter could steal
//! from a live owner that had not written it yet, because the old tag named a dead earlier
//! process with the same pid.)
//!
//! * lock: CAS `0 -> me`. On failure, set `CONTENDED` and `futex_wait` on the word's low
//!   half (pid and `CONTENDED`; the kernel reads those 4 bytes, Rust only ever accesses the
//!   64-bit word), waking at least every [`LIVENESS_POLL`] to look at the owner. If the owner
//!   is dead (no such process, a zombie, or another start time), CAS its word to ours: we
//!   now hold the lock and the guard says `recovered`, so the caller repairs whatever the
//!   dead owner left half done.
//! * unlock: swap to `0`; if `CONTENDED` was set, wake one waiter.
//!
//! The kernel's robust-futex list is not used: glibc owns it per thread, and a lock that any
//! process may release (as `multiprocessing.Lock` allows) cannot live on it anyway.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::platform::{futex_wait_at, futex_wake_at, FutexWait, ProcessId};

/// How often a waiter checks whether the holder still lives.
pub const LIVENESS_POLL: Duration = Duration::from_millis(50);
const CONTENDED: u64 = 1 << 31;
/// Polls of the lock word before a contended locker sleeps (a few microseconds: critical
/// sections are shorter than a futex sleep and wake-up, and sleeping marks the word
/// CONTENDED, which costs every later unlock a wake-up call).
const SPIN_POLLS: u32 = 100;
const PID_MASK: u64 = CONTENDED - 1;
/// Layout version of [`RobustMutex`] (2: the owner's identity is in the lock word). Every
/// layout that embeds one bumped its own version with it.
pub const MUTEX_LAYOUT: u32 = 2;

/// Shared-memory layout of the robust mutex: 16 bytes, `#[repr(C)]`, all-zero = unlocked.
#[repr(C)]
#[derive(Debug)]
pub struct RobustMutex {
    /// See the module docs. SYNC POINT: acquired by CAS with Acquire, released by a swap
    /// with Release.
    state: AtomicU64,
    _reserved: AtomicU64,
}

/// The lock word of `who` (without `CONTENDED`).
fn identity(who: ProcessId) -> u64 {
    ((who.start & 0xffff_ffff) << 32) | (u64::from(who.pid) & PID_MASK)
}

fn owner_of(state: u64) -> ProcessId {
    ProcessId {
        pid: (state & PID_MASK) as u32,
        start: state >> 32,
    }
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
            state: AtomicU64::new(0),
            _reserved: AtomicU64::new(0),
        }
    }

    /// Resets to unlocked (only while nobody else can see it, e.g. during segment init).
    pub fn init(&self) {
        self._reserved.store(0, Ordering::Relaxed);
        self.state.store(0, Ordering::Release);
    }

    /// The futex word: the low half of `state` (pid and `CONTENDED`).
    fn futex_word(&self) -> *mut u32 {
        let half = if cfg!(target_endian = "little") { 0 } else { 1 };
        // SAFETY: `state` is an 8-aligned u64, so both 4-byte halves are in bounds and
        // 4-aligned; the pointer is only handed to the kernel (futex), never dereferenced.
        unsafe { self.state.as_ptr().cast::<u32>().add(half) }
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
        let me = identity(ProcessId::current());
        // SYNC POINT: Acquire on success pairs with the Release swap in `unlock_raw`.
        if self
            .state
            .compare_exchange(0, me, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            crate::fault::point("lock.acquired");
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
            if self.state.load(Ordering::Relaxed) == 0 {
                if let Some(g) = self.try_lock() {
                    return Ok(g);
                }
            }
        }
        let me = ProcessId::current();
        let mine = identity(me) | CONTENDED;
        let mut last_check = Instant::now();
        loop {
            let cur = self.state.load(Ordering::Relaxed);
            if cur == 0 {
                // Somebody may be waiting besides us: keep CONTENDED so unlock wakes them.
                if self
                    .state
                    .compare_exchange(0, mine, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
                {
                    crate::fault::point("lock.acquired");
                    return Ok(RobustGuard {
                        m: self,
                        recovered: false,
                    });
                }
                continue;
            }
            if cur & CONTENDED == 0
                && self
                    .state
                    .compare_exchange(cur, cur | CONTENDED, Ordering::Relaxed, Ordering::Relaxed)
                    .is_err()
            {
                continue;
            }
            let cur = cur | CONTENDED;
            let owner = owner_of(cur);
            let now = Instant::now();
            if now.duration_since(last_check) >= LIVENESS_POLL || owner.pid == me.pid {
                last_check = now;
                if !Self::holder_alive(owner, me) {
                    // Steal from the dead: only succeeds if the word (the very owner we
                    // judged) is unchanged.
                    if self
                        .state
                        .compare_exchange(cur, mine, Ordering::Acquire, Ordering::Relaxed)
                        .is_ok()
                    {
                        crate::fault::point("lock.acquired");
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
            // SAFETY: the futex word is half of our own `state`, mapped while `self` lives.
            let r = unsafe { futex_wait_at(self.futex_word(), cur as u32, Some(slice)) };
            if r == FutexWait::Interrupted && interruptible {
                return Err(LockError::Interrupted);
            }
        }
    }

    /// Whether the owner named by a lock word lives. Its identity was written by the very
    /// CAS that acquired, so pid and start time belong to the same process.
    fn holder_alive(owner: ProcessId, me: ProcessId) -> bool {
        if owner.pid == me.pid {
            // Our own process holds it (another thread): alive by definition, unless an
            // earlier process with our recycled pid held it.
            return owner.start == (me.start & 0xffff_ffff);
        }
        owner.is_alive()
    }

    fn unlock_raw(&self) {
        // SYNC POINT: Release pairs with the Acquire CAS in `lock_until`/`try_lock`.
        let old = self.state.swap(0, Ordering::Release);
        if old & CONTENDED != 0 {
            // SAFETY: the futex word is half of our own `state`, mapped while `self` lives.
            unsafe { futex_wake_at(self.futex_word(), 1) };
        }
    }

    /// Releases a lock held by this process without a guard (for `multiprocessing.Lock`,
    /// which may be released by a thread other than the acquirer). Returns false if the lock
    /// was not held.
    pub fn force_unlock(&self) -> bool {
        if self.state.load(Ordering::Relaxed) == 0 {
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
        match owner_of(self.state.load(Ordering::Relaxed)).pid {
            0 => None,
            p => Some(p),
        }
    }

    /// Marks the lock as held by `owner` without any checks: only for tests that need a dead
    /// holder ("abandon" a lock).
    #[doc(hidden)]
    pub fn abandon_as(&self, owner: ProcessId) {
        self.state.store(identity(owner), Ordering::Release);
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

    /// A mutex in a shared mapping (a fork child and its parent see the same one).
    fn shared_mutex() -> (crate::segment::Segment, &'static RobustMutex) {
        use crate::name::{SegmentKind, SegmentName};
        let name = SegmentName::new(crate::testing::test_runtime(), 0, SegmentKind::Raw, 1);
        let seg = crate::segment::Segment::create(&name, 4096, |_| Ok(())).unwrap();
        // SAFETY: RobustMutex is atomics (all-zero = unlocked); offset 128 is inside the
        // 4096-byte mapping and 64-aligned; the mapping outlives every use in the test (the
        // segment is returned alongside and dropped last).
        let m: &'static RobustMutex = unsafe { &*(seg.base().add(128) as *const RobustMutex) };
        (seg, m)
    }

    #[test]
    fn a_live_owner_is_never_judged_by_a_previous_owner_with_its_pid() {
        let (_seg, m) = shared_mutex();
        // The child plays both a dead earlier process with its own pid that held the lock
        // (another start time) and the live new owner, frozen right after its acquire.
        let child = crate::fault::stop_child_at("lock.acquired", || {
            let me = ProcessId::current();
            m.abandon_as(ProcessId {
                pid: me.pid,
                start: me.start ^ 1,
            });
            assert!(m.force_unlock());
            let _g = m.lock();
        });
        let r = m
            .lock_until(Some(Instant::now() + Duration::from_millis(300)), false)
            .map(|g| g.recovered());
        assert_eq!(r, Err(LockError::TimedOut), "took a live owner's lock");
        crate::fault::kill_and_reap(child);
        // Dead now: taken over, and the new holder is told.
        assert!(m.lock().recovered());
        // A death right at the acquire is recovered too.
        crate::fault::crash_child_at("lock.acquired", || {
            let _g = m.lock();
        });
        assert!(m.lock().recovered());
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
