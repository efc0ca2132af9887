//! The atomics and futex calls the lock-free protocols use, behind one facade so that
//! `--cfg loom` can swap in loom's model checker (see `tests/loom.rs`).
//!
//! Under loom the futex is modelled with a mutex and condition variable, the way the
//! kernel checks the word under its hash-bucket lock: a `wait` whose value still matches
//! sleeps until a later `wake`, so a lost wake-up shows up as a loom deadlock.

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

pub use crate::platform::FutexWait;

/// Sleeps while `word == expected` (shared futex), at most `timeout`.
#[cfg(not(loom))]
#[inline]
pub(crate) fn futex_wait(
    word: &AtomicU32,
    expected: u32,
    timeout: Option<std::time::Duration>,
) -> FutexWait {
    crate::platform::futex_wait(word, expected, timeout)
}

/// Wakes up to `n` sleepers on `word`.
#[cfg(not(loom))]
#[inline]
pub(crate) fn futex_wake(word: &AtomicU32, n: u32) -> u32 {
    crate::platform::futex_wake(word, n)
}

/// Hint to the CPU that we spin.
#[cfg(not(loom))]
#[inline]
pub(crate) fn spin_hint() {
    std::hint::spin_loop();
}

#[cfg(loom)]
mod model {
    use loom::sync::{Condvar, Mutex};
    loom::lazy_static! {
        pub(super) static ref FUTEX: (Mutex<()>, Condvar) = (Mutex::new(()), Condvar::new());
    }
}

#[cfg(loom)]
pub(crate) fn futex_wait(
    word: &AtomicU32,
    expected: u32,
    timeout: Option<std::time::Duration>,
) -> FutexWait {
    let (m, cv) = &*model::FUTEX;
    let g = m.lock().unwrap();
    if word.load(Ordering::SeqCst) != expected {
        return FutexWait::Changed;
    }
    if timeout.is_some() {
        // Timed waits are modelled as an immediate time-out, which keeps models finite.
        return FutexWait::TimedOut;
    }
    drop(cv.wait(g).unwrap());
    FutexWait::Woken
}

#[cfg(loom)]
pub(crate) fn futex_wake(_word: &AtomicU32, _n: u32) -> u32 {
    let (m, cv) = &*model::FUTEX;
    let _g = m.lock().unwrap();
    cv.notify_all();
    1
}

#[cfg(loom)]
#[inline]
pub(crate) fn spin_hint() {
    loom::thread::yield_now();
}
