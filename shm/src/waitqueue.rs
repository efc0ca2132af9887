//! A futex-backed "event count": how every blocking operation in shared memory sleeps.
//!
//! # Protocol
//! Two 32-bit words in shared memory: `seq`, bumped by a notifier, and `waiters`, the number
//! of processes that announced they may sleep.
//!
//! Waiter: check the condition; spin briefly; read `seq` (S); `waiters += 1` (SeqCst);
//! SeqCst fence; check again; `futex_wait(seq, S)`; `waiters -= 1`; loop.
//!
//! Notifier: make the condition true (its own Release store); SeqCst fence; if
//! `waiters > 0` then `seq += 1` and `futex_wake(seq)`.
//!
//! SYNC POINT (Dekker pair): the waiter's `waiters += 1` + fence and the notifier's fence +
//! `waiters` load are both SeqCst, so at least one side sees the other: either the waiter's
//! second check sees the condition, or the notifier sees `waiters > 0`, bumps `seq`, and the
//! kernel's own check of `seq == S` makes the sleep return at once. Nobody waits means no
//! syscall for the notifier: one fence and one load.
//!
//! Spinning: only when more than one CPU is usable (the peer can make progress meanwhile),
//! and only for a short budget; then sleep. A process blocked here uses no CPU.

use std::time::{Duration, Instant};

use crate::primitive::{fence, futex_wait, futex_wake, AtomicU32, FutexWait, Ordering};

/// Two words in shared memory that blocking operations sleep on. `#[repr(C)]`, 8 bytes.
#[repr(C)]
#[derive(Debug)]
pub struct WaitQueue {
    seq: AtomicU32,
    waiters: AtomicU32,
}

/// Why a wait ended without its condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WaitError {
    /// The deadline passed.
    #[error("timed out")]
    TimedOut,
    /// A signal arrived and the wait was interruptible.
    #[error("interrupted by a signal")]
    Interrupted,
}

/// How to wait.
#[derive(Debug, Clone, Copy)]
pub struct WaitOpts {
    /// Give up at this instant (`None`: wait forever).
    pub deadline: Option<Instant>,
    /// Spin this long before sleeping (ignored on one usable CPU).
    pub spin: Duration,
    /// Return `Interrupted` when a signal arrives (Python checks its signal handlers then).
    pub interruptible: bool,
    /// Re-run the check at least this often even without a wake (liveness polling).
    pub poll_every: Option<Duration>,
}

impl Default for WaitOpts {
    fn default() -> Self {
        WaitOpts {
            deadline: None,
            spin: default_spin(),
            interruptible: false,
            poll_every: None,
        }
    }
}

impl WaitOpts {
    /// Wait at most `timeout` (`None`: forever).
    pub fn timeout(timeout: Option<Duration>) -> Self {
        WaitOpts {
            deadline: timeout.map(|t| Instant::now() + t),
            ..Default::default()
        }
    }
}

/// The default spin budget: `DRAGON_SPIN_US` microseconds if set, else 20 µs on a machine with
/// more than one online CPU and zero on one (a thread pinned to one CPU still waits this
/// long before sleeping, its peer may run on another, but yields its CPU between looks).
pub fn default_spin() -> Duration {
    use std::sync::OnceLock;
    static SPIN: OnceLock<Duration> = OnceLock::new();
    *SPIN.get_or_init(|| {
        if let Some(us) = std::env::var("DRAGON_SPIN_US")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            return Duration::from_micros(us);
        }
        #[cfg(not(loom))]
        let cpus = crate::platform::online_cpus();
        #[cfg(loom)]
        let cpus = 2;
        if cpus > 1 {
            Duration::from_micros(20)
        } else {
            Duration::ZERO
        }
    })
}

impl WaitQueue {
    /// A fresh queue (for memory that is not shared, e.g. tests and models).
    pub fn new() -> Self {
        WaitQueue {
            seq: AtomicU32::new(0),
            waiters: AtomicU32::new(0),
        }
    }

    /// Number of processes currently announced as (maybe) sleeping.
    pub fn waiters(&self) -> u32 {
        self.waiters.load(Ordering::Relaxed)
    }

    /// Waits until `check` returns `Some`, following the protocol in the module docs.
    pub fn wait_until<T>(
        &self,
        mut check: impl FnMut() -> Option<T>,
        opts: &WaitOpts,
    ) -> Result<T, WaitError> {
        self.wait_until_phased(|_| check(), || None, opts)
    }

    /// [`wait_until`](Self::wait_until) telling `check` whether the wait is about to sleep
    /// or has just woken (`true`) rather than making its first look or spinning (`false`):
    /// a check can keep a costly look (another party's cache lines) for those rare calls.
    /// Each sleep lasts at most what `nap` says then (`None`: as `opts` say), so that a
    /// check can be run again without anyone's wake; a nap that ends is no time-out.
    pub fn wait_until_phased<T>(
        &self,
        mut check: impl FnMut(bool) -> Option<T>,
        nap: impl Fn() -> Option<Duration>,
        opts: &WaitOpts,
    ) -> Result<T, WaitError> {
        if let Some(v) = check(false) {
            return Ok(v);
        }
        if !opts.spin.is_zero() {
            // Pinned to one CPU, spinning would only keep the peer (often on that CPU too)
            // from running: yield it between looks instead (see `Pause`).
            let mut pause = crate::platform::Pause::new(64);
            let spin_end = Instant::now() + opts.spin;
            let spin_end = opts.deadline.map_or(spin_end, |d| d.min(spin_end));
            let every = if pause.yields() { 1 } else { 16 };
            let mut i = 0u32;
            loop {
                pause.pause();
                if let Some(v) = check(false) {
                    return Ok(v);
                }
                i = i.wrapping_add(1);
                // A yield may last another thread's whole time slice: look at the clock after
                // each one.
                if i.is_multiple_of(every) && Instant::now() >= spin_end {
                    break;
                }
            }
        }
        loop {
            let timeout = match opts.deadline {
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return check(true).ok_or(WaitError::TimedOut);
                    }
                    Some(d - now)
                }
                None => None,
            };
            let timeout = match (timeout, opts.poll_every) {
                (Some(t), Some(p)) => Some(t.min(p)),
                (t, p) => t.or(p),
            };
            let s = self.seq.load(Ordering::SeqCst);
            // SYNC POINT: pairs with the fence in `notify`.
            self.waiters.fetch_add(1, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            if let Some(v) = check(true) {
                self.waiters.fetch_sub(1, Ordering::SeqCst);
                return Ok(v);
            }
            // (Asked after that last look, which may have found a reason to nap.)
            let timeout = match (timeout, nap()) {
                (Some(t), Some(n)) => Some(t.min(n)),
                (t, n) => t.or(n),
            };
            let r = futex_wait(&self.seq, s, timeout);
            self.waiters.fetch_sub(1, Ordering::SeqCst);
            if let Some(v) = check(true) {
                return Ok(v);
            }
            if r == FutexWait::Interrupted && opts.interruptible {
                return Err(WaitError::Interrupted);
            }
        }
    }

    /// Wakes every sleeper (they re-check their conditions). Call after making a condition
    /// true; costs no syscall when nobody waits.
    #[inline]
    pub fn notify_all(&self) {
        self.notify(u32::MAX);
    }

    /// Wakes at most one sleeper.
    #[inline]
    pub fn notify_one(&self) {
        self.notify(1);
    }

    #[inline]
    fn notify(&self, n: u32) {
        // SYNC POINT: pairs with `waiters.fetch_add` + fence in `wait_until`.
        fence(Ordering::SeqCst);
        if self.waiters.load(Ordering::SeqCst) > 0 {
            self.seq.fetch_add(1, Ordering::SeqCst);
            futex_wake(&self.seq, n);
        }
    }
}

impl Default for WaitQueue {
    fn default() -> Self {
        Self::new()
    }
}

// The shared layouts of this file, fixed: a change here changes what other processes (and
// other versions) read, so it must come with a layout version bump. (Loom's atomics differ.)
#[cfg(not(loom))]
const _: () = assert!(std::mem::size_of::<WaitQueue>() == 8);

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    #[test]
    fn times_out_without_notify() {
        let q = WaitQueue::new();
        let opts = WaitOpts::timeout(Some(Duration::from_millis(5)));
        assert_eq!(q.wait_until(|| None::<()>, &opts), Err(WaitError::TimedOut));
        assert_eq!(q.waiters(), 0);
    }

    #[test]
    fn wakes_a_sleeping_thread() {
        let q = Arc::new(WaitQueue::new());
        let flag = Arc::new(AtomicBool::new(false));
        let (q2, f2) = (q.clone(), flag.clone());
        let t = std::thread::spawn(move || {
            let opts = WaitOpts {
                spin: Duration::ZERO,
                ..Default::default()
            };
            q2.wait_until(|| f2.load(Ordering::Acquire).then_some(7), &opts)
        });
        // Wait until the thread has announced itself, then release it.
        while q.waiters() == 0 {
            std::thread::yield_now();
        }
        flag.store(true, Ordering::Release);
        q.notify_all();
        assert_eq!(t.join().unwrap(), Ok(7));
    }
}
