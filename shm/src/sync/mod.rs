//! Process-shared synchronization objects living in pool blocks: the `multiprocessing`
//! family ([`Event`], [`Lock`], [`RLock`], [`Semaphore`], [`BoundedSemaphore`], [`Barrier`],
//! [`Condition`]) and raw zeroed storage for `Value`/`Array` ([`RawArray`]).
//!
//! # Objects and handles
//! Each object is one block of a [`Pool`], allocated zeroed and cast to a `#[repr(C)]`
//! layout made only of atomics, [`WaitQueue`]s and [`RobustMutex`]es (valid for any bit
//! pattern another process may have written). A handle (`Event`, `Lock`, ...) owns one
//! [`Block`] hold of this process; the object lives while any process holds its block.
//! Another process attaches with `X::attach(pool.block(block_ref)?)`.
//!
//! Every layout starts with the same 8 bytes:
//!
//! | off | field | |
//! |---|---|---|
//! | 0 | `magic: u32` | distinct per type (`*_MAGIC` below); stored last by the creator (Release) |
//! | 4 | `version: u32` | [`SYNC_VERSION`] |
//!
//! `attach` rejects a block that is too small, misaligned, has another magic (wrong type or
//! not initialized) or another version, with [`SyncError::BadLayout`]; fields that bound
//! anything (barrier parties, condition lock kind) are checked too. Layouts after the header:
//!
//! | type | layout (offsets) | size |
//! |---|---|---|
//! | [`Event`] | 8 `flag: u32`, 12 pad, 16 `WaitQueue` | 24 |
//! | [`Lock`] | 8 `RobustMutex` | 24 |
//! | [`RLock`] | 8 `RobustMutex`, 24 `owner: u64` (pid << 32 \| thread id), 32 `count: u32`, 36 pad | 40 |
//! | [`Semaphore`], [`BoundedSemaphore`] | 8 `value: u32`, 12 `max: u32`, 16 `WaitQueue` | 24 |
//! | [`Barrier`] | 8 `parties: u32`, 12 pad, 16 `state: u64`, 24 `WaitQueue` | 32 |
//! | [`Condition`] | 8 `lock_kind: u32`, 12 pad, 16 lock `BlockRef` (4 x u64), 48 `tickets: u64`, 56 `released: u64`, 64 `WaitQueue`, 72 `cancelled: [u64; 16]` | 200 |
//! | [`RawArray`] | 8 `len: u64`, 16..64 pad, 64 data | 64 + len |
//!
//! The protocols (and their SYNC POINTs) are documented in each type's module.
//!
//! # Waiting
//! Every blocking call has a simple form taking `timeout: Option<Duration>` (`None`: forever)
//! that returns like CPython (`bool`, `Option`), and a `*_with(&WaitOpts)` form returning
//! [`SyncError::TimedOut`] or, with `interruptible: true`, [`SyncError::Interrupted`] when a
//! signal arrives (the Python layer then runs its signal handlers and retries). A deadline
//! already passed means "try once, do not spin or sleep". Sleeping is the futex
//! [`WaitQueue`] protocol: no syscall on fast paths when nobody waits, a short spin, then
//! zero CPU until woken.

use std::fmt;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use crate::heap::{AllocError, Block, BlockRef, Pool};
use crate::lock::{LockError, RobustMutex};
use crate::waitqueue::{WaitError, WaitQueue};

mod barrier;
mod condition;
mod event;
mod lock;
mod raw;
mod semaphore;

pub use barrier::{Arrival, Barrier, MAX_PARTIES};
pub use condition::{CondLock, Condition, MAX_COND_WAITERS};
pub use event::Event;
pub use lock::{Acquired, Lock, RLock};
pub use raw::RawArray;
pub use semaphore::{BoundedSemaphore, Semaphore, SEM_VALUE_MAX};

pub use crate::waitqueue::WaitOpts;

/// Version of every layout in this module (see the module docs).
pub const SYNC_VERSION: u32 = 2;
/// Magic of an [`Event`] block: "DEVT".
pub const EVENT_MAGIC: u32 = 0x4445_5654;
/// Magic of a [`Lock`] block: "DLCK".
pub const LOCK_MAGIC: u32 = 0x444c_434b;
/// Magic of an [`RLock`] block: "DRLK".
pub const RLOCK_MAGIC: u32 = 0x4452_4c4b;
/// Magic of a [`Semaphore`] block: "DSEM".
pub const SEMAPHORE_MAGIC: u32 = 0x4453_454d;
/// Magic of a [`BoundedSemaphore`] block: "DBSM".
pub const BOUNDED_SEMAPHORE_MAGIC: u32 = 0x4442_534d;
/// Magic of a [`Barrier`] block: "DBAR".
pub const BARRIER_MAGIC: u32 = 0x4442_4152;
/// Magic of a [`Condition`] block: "DCND".
pub const CONDITION_MAGIC: u32 = 0x4443_4e44;
/// Magic of a [`RawArray`] block: "DRAW".
pub const RAW_ARRAY_MAGIC: u32 = 0x4452_4157;

/// Errors of the sync objects. Small and `Copy`; maps onto Python exceptions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SyncError {
    /// The deadline passed (Python: the call returns `False`).
    #[error("timed out")]
    TimedOut,
    /// A signal arrived during an interruptible wait.
    #[error("interrupted by a signal")]
    Interrupted,
    /// The barrier is broken (Python: `BrokenBarrierError`).
    #[error("barrier is broken")]
    Broken,
    /// A count would exceed its limit: a bounded semaphore released too many times,
    /// a semaphore value above [`SEM_VALUE_MAX`], too many recursion levels or waiters
    /// (Python: `ValueError`).
    #[error("count exceeds its limit")]
    Overflow,
    /// The caller does not own the lock it tries to release or wait on
    /// (Python: `AssertionError`/`RuntimeError`).
    #[error("lock is not owned by the caller")]
    NotOwner,
    /// Release of a lock nobody holds (Python: `ValueError`).
    #[error("release of an unlocked lock")]
    NotHeld,
    /// The block is not a valid object of the expected type (what is wrong).
    #[error("bad sync object block: {0}")]
    BadLayout(&'static str),
    /// Allocating or resolving the block failed.
    #[error("{0}")]
    Alloc(#[from] AllocError),
}

impl From<WaitError> for SyncError {
    fn from(e: WaitError) -> Self {
        match e {
            WaitError::TimedOut => SyncError::TimedOut,
            WaitError::Interrupted => SyncError::Interrupted,
        }
    }
}

impl From<LockError> for SyncError {
    fn from(e: LockError) -> Self {
        match e {
            LockError::TimedOut => SyncError::TimedOut,
            LockError::Interrupted => SyncError::Interrupted,
        }
    }
}

/// The 8 bytes every layout starts with.
#[repr(C)]
#[derive(Debug)]
pub(crate) struct Header {
    magic: AtomicU32,
    version: AtomicU32,
}

/// A shared layout of this module.
///
/// # Safety
/// Implementors are `#[repr(C)]`, made only of atomics / [`WaitQueue`] / [`RobustMutex`]
/// (so every bit pattern is a valid value and shared mutation goes through atomics), have
/// an alignment of at most 64 (block data is 64-byte aligned), and return their first
/// field from `header`.
pub(crate) unsafe trait Shared: Sized {
    /// Distinct per type.
    const MAGIC: u32;
    /// What `attach` reports on a wrong magic.
    const NOT_THIS: &'static str;
    /// The common header.
    fn header(&self) -> &Header;
}

/// A block viewed as layout `L`: the typed core of every handle.
pub(crate) struct Obj<L> {
    block: Block,
    _l: PhantomData<fn() -> L>,
}

impl<L> fmt::Debug for Obj<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Obj")
            .field("block", &self.block.block_ref())
            .finish()
    }
}

impl<L: Shared> Obj<L> {
    /// Allocates a zeroed block of `size_of::<L>() + extra` bytes, lets `init` fill the
    /// fields, then publishes version and magic.
    pub(crate) fn create(
        pool: &Pool,
        extra: usize,
        init: impl FnOnce(&L),
    ) -> Result<Self, SyncError> {
        let len = std::mem::size_of::<L>()
            .checked_add(extra)
            .ok_or(SyncError::Overflow)?;
        let obj = Self::view(pool.alloc_zeroed(len)?)?;
        let l = obj.get();
        init(l);
        l.header().version.store(SYNC_VERSION, Ordering::Relaxed);
        // SYNC POINT: Release publishes the initialized fields; pairs with the Acquire load
        // of `magic` in `attach`.
        l.header().magic.store(L::MAGIC, Ordering::Release);
        Ok(obj)
    }

    /// Checks size, alignment, magic and version of `block`.
    pub(crate) fn attach(block: Block) -> Result<Self, SyncError> {
        let obj = Self::view(block)?;
        let h = obj.get().header();
        // SYNC POINT: pairs with the Release store of `magic` in `create`.
        if h.magic.load(Ordering::Acquire) != L::MAGIC {
            return Err(SyncError::BadLayout(L::NOT_THIS));
        }
        if h.version.load(Ordering::Relaxed) != SYNC_VERSION {
            return Err(SyncError::BadLayout("unsupported layout version"));
        }
        Ok(obj)
    }

    fn view(block: Block) -> Result<Self, SyncError> {
        if block.len() < std::mem::size_of::<L>() {
            return Err(SyncError::BadLayout("block too small"));
        }
        if !block.as_ptr().cast::<L>().is_aligned() {
            return Err(SyncError::BadLayout("block misaligned"));
        }
        Ok(Obj {
            block,
            _l: PhantomData,
        })
    }

    /// The shared layout.
    pub(crate) fn get(&self) -> &L {
        // SAFETY: `view` checked that the block holds at least size_of::<L>() bytes at an
        // address aligned for L; `Shared` guarantees L is made of atomics valid for any bit
        // pattern, so shared mutation by other processes is through atomics only; the block
        // (and its mapping) stays alive as long as `self.block`, which the reference borrows.
        unsafe { &*(self.block.as_ptr() as *const L) }
    }

    /// The block.
    pub(crate) fn block(&self) -> &Block {
        &self.block
    }

    /// The block's handle.
    pub(crate) fn block_ref(&self) -> BlockRef {
        self.block.block_ref()
    }

    /// Another hold by this process on the same object.
    pub(crate) fn try_clone(&self) -> Result<Self, SyncError> {
        Ok(Obj {
            // SAFETY: an Obj never lends its block mutably (only `&Block`), so neither
            // handle is ever borrowed mutably: only shared borrows and atomics, which may
            // overlap freely.
            block: unsafe { self.block.try_clone() }?,
            _l: PhantomData,
        })
    }
}

/// True when `opts` has a deadline that already passed ("try once").
pub(crate) fn expired(opts: &WaitOpts) -> bool {
    opts.deadline.is_some_and(|d| Instant::now() >= d)
}

/// Waits on `q` until `check` succeeds; an expired deadline checks once without spinning.
pub(crate) fn wait_on<T>(
    q: &WaitQueue,
    opts: &WaitOpts,
    mut check: impl FnMut() -> Option<T>,
) -> Result<T, SyncError> {
    if let Some(v) = check() {
        return Ok(v);
    }
    if expired(opts) {
        return Err(SyncError::TimedOut);
    }
    Ok(q.wait_until(check, opts)?)
}

/// Options for the CPython-style `(blocking, timeout)` pair.
pub(crate) fn opts_for(blocking: bool, timeout: Option<std::time::Duration>) -> WaitOpts {
    if blocking {
        WaitOpts::timeout(timeout)
    } else {
        WaitOpts {
            deadline: Some(Instant::now()),
            ..Default::default()
        }
    }
}

/// Locks `m` following `opts`; returns whether a dead holder was recovered. The lock stays
/// held (the guard is leaked). A dead holder is recovered even by a non-blocking call or a
/// timeout shorter than [`crate::lock::LIVENESS_POLL`]: then the call waits one poll period.
pub(crate) fn lock_mutex(m: &RobustMutex, opts: &WaitOpts) -> Result<bool, SyncError> {
    let first = if expired(opts) {
        match m.try_lock() {
            Some(g) => return Ok(RobustMutex::leak(g)),
            None => Err(LockError::TimedOut),
        }
    } else {
        m.lock_until(opts.deadline, opts.interruptible)
    };
    match first {
        Ok(g) => Ok(RobustMutex::leak(g)),
        Err(LockError::TimedOut) if holder_dead(m) => {
            let d = Instant::now() + crate::lock::LIVENESS_POLL * 2;
            Ok(RobustMutex::leak(
                m.lock_until(Some(d), opts.interruptible)?,
            ))
        }
        Err(e) => Err(e.into()),
    }
}

fn holder_dead(m: &RobustMutex) -> bool {
    use crate::platform::{liveness, Liveness};
    m.holder()
        .is_some_and(|pid| liveness(pid) == Liveness::Dead)
}

#[cfg(test)]
pub(crate) mod test_util {
    use crate::heap::Pool;
    use crate::testing::{leftovers, test_runtime};
    use crate::{SegmentKind, SegmentName};

    /// A fresh 1 MiB pool under a random runtime id.
    pub(crate) fn pool() -> (u64, Pool) {
        let rt = test_runtime();
        let p = Pool::create(&SegmentName::new(rt, 0, SegmentKind::Pool, 1), 1 << 20).unwrap();
        (rt, p)
    }

    /// Drops the pool and asserts nothing is left in /dev/shm.
    pub(crate) fn finish(rt: u64, p: Pool) {
        let s = p.stats();
        assert_eq!(s.blocks, 0, "blocks leaked: {s:?}");
        drop(p);
        assert!(leftovers(rt).is_empty());
    }

    /// Spins (yielding) until `f` holds; panics after 20 s.
    pub(crate) fn until(mut f: impl FnMut() -> bool) {
        let end = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !f() {
            assert!(
                std::time::Instant::now() < end,
                "condition never became true"
            );
            std::thread::yield_now();
        }
    }
}

// The shared layouts of this file, fixed: a change here changes what other processes (and
// other versions) read, so it must come with a layout version bump. (Loom's atomics differ.)
#[cfg(not(loom))]
const _: () = assert!(std::mem::size_of::<Header>() == 8);

#[cfg(test)]
mod tests {
    use super::test_util::{finish, pool, until};
    use super::*;
    use std::os::unix::thread::JoinHandleExt;
    use std::sync::Arc;
    use std::thread::JoinHandle;

    extern "C" fn noop(_: libc::c_int) {}

    /// Installs a no-op SIGUSR1 handler without SA_RESTART, so a signal ends a futex wait.
    fn install_handler() {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; the handler
            // is an extern "C" fn that does nothing (async-signal-safe).
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = noop as extern "C" fn(libc::c_int) as usize;
                libc::sigemptyset(&mut sa.sa_mask);
                assert_eq!(libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()), 0);
            }
        });
    }

    /// Signals the thread until it returns (a signal during its spin phase is not enough).
    fn interrupt<T>(t: JoinHandle<T>) -> T {
        while !t.is_finished() {
            // SAFETY: the thread is not joined yet, so its pthread_t is valid; SIGUSR1 has
            // a no-op handler installed.
            unsafe {
                libc::pthread_kill(t.as_pthread_t(), libc::SIGUSR1);
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        t.join().unwrap()
    }

    fn interruptible() -> WaitOpts {
        WaitOpts {
            interruptible: true,
            ..WaitOpts::timeout(Some(std::time::Duration::from_secs(30)))
        }
    }

    #[test]
    fn interruptible_waits_return_interrupted() {
        install_handler();
        let (rt, p) = pool();
        let e = Arc::new(Event::create(&p).unwrap());
        let e2 = e.clone();
        let r = interrupt(std::thread::spawn(move || e2.wait_with(&interruptible())));
        assert_eq!(r, Err(SyncError::Interrupted));

        let s = Arc::new(Semaphore::create(&p, 0).unwrap());
        let s2 = s.clone();
        let r = interrupt(std::thread::spawn(move || {
            s2.acquire_with(&interruptible())
        }));
        assert_eq!(r, Err(SyncError::Interrupted));

        let lock = Arc::new(Lock::create(&p).unwrap());
        assert!(lock.acquire(true, None).is_some());
        let l2 = lock.clone();
        let r = interrupt(std::thread::spawn(move || {
            l2.acquire_with(&interruptible())
        }));
        assert_eq!(r, Err(SyncError::Interrupted));
        lock.release().unwrap();

        let c = Arc::new(Condition::create(&p, None).unwrap());
        let c2 = c.clone();
        let r = interrupt(std::thread::spawn(move || {
            assert!(c2.acquire(true, None).is_some());
            let r = c2.wait_with(&interruptible());
            let held = c2.lock().held_by_caller();
            c2.release().unwrap();
            (r, held)
        }));
        assert_eq!(r, (Err(SyncError::Interrupted), true));
        assert_eq!(c.n_waiting(), 0);

        // An interrupted arrival stays pending and can be resumed.
        let b = Arc::new(Barrier::create(&p, 2).unwrap());
        let b2 = b.clone();
        let (a, r) = interrupt(std::thread::spawn(move || {
            let a = b2.arrive(&interruptible(), None).unwrap();
            (a, b2.wait_arrival(&a, &interruptible()))
        }));
        assert_eq!(r, Err(SyncError::Interrupted));
        assert_eq!(b.n_waiting(), 1);
        let b2 = b.clone();
        let t = std::thread::spawn(move || b2.wait_arrival(&a, &interruptible()));
        until(|| b.obj_waiters() == 1);
        let mine = b.wait(Some(std::time::Duration::from_secs(30))).unwrap();
        let theirs = t.join().unwrap().unwrap();
        assert_eq!((mine.min(theirs), mine.max(theirs)), (0, 1));
        // wait_with breaks the barrier when interrupted, like an exception in CPython.
        let b2 = b.clone();
        let r = interrupt(std::thread::spawn(move || {
            b2.wait_with(&interruptible(), None)
        }));
        assert_eq!(r, Err(SyncError::Interrupted));
        assert!(b.broken());
        drop((e, s, lock, c, b));
        finish(rt, p);
    }
}
