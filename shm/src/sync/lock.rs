//! [`Lock`] and [`RLock`]: `multiprocessing.Lock` / `RLock` on the robust mutex.
//!
//! # Protocol
//! Both embed a [`RobustMutex`] (see `crate::lock`): acquiring takes it and leaks the
//! guard (the lock stays held past the call); releasing is `force_unlock`. A holder that
//! dies is noticed by the next acquirer (within one liveness poll, 50 ms), which takes the
//! lock and is told: [`Acquired::recovered`]. SYNC POINTs are the mutex's Acquire CAS and
//! Release swap.
//!
//! * `Lock`: not recursive; any process may release it (like the semaphore-based
//!   `multiprocessing.Lock`); releasing an unlocked lock is [`SyncError::NotHeld`].
//! * `RLock`: `owner` = pid << 32 | per-thread id (random per process, so a recycled pid
//!   does not inherit ownership; re-drawn in a forked child) and `count`, both written only
//!   by the holder while it holds the mutex. Re-acquiring by the owner bumps `count`; the
//!   last release clears `owner` and `count`, then unlocks. A release by another thread is
//!   [`SyncError::NotOwner`]. A recovering acquirer overwrites the dead owner's fields.

use std::cell::Cell;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use super::{lock_mutex, opts_for, Header, Obj, Shared, SyncError, WaitOpts};
use super::{LOCK_MAGIC, RLOCK_MAGIC};
use crate::heap::{Block, BlockRef, Pool};
use crate::lock::RobustMutex;
use crate::platform::ProcessId;

/// A successful acquire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct Acquired {
    /// The previous holder died holding the lock: the data it guards may be half updated.
    pub recovered: bool,
}

#[repr(C)]
pub(crate) struct LockLayout {
    hdr: Header,
    mutex: RobustMutex,
}

// SAFETY: repr(C), atomics and a RobustMutex only, align 8, header first.
unsafe impl Shared for LockLayout {
    const MAGIC: u32 = LOCK_MAGIC;
    const NOT_THIS: &'static str = "not a Lock";
    fn header(&self) -> &Header {
        &self.hdr
    }
}

/// A process-shared, non-recursive lock that survives the death of its holder.
#[derive(Debug)]
pub struct Lock {
    obj: Obj<LockLayout>,
}

impl Lock {
    /// Creates an unlocked lock in a new block of `pool`.
    pub fn create(pool: &Pool) -> Result<Lock, SyncError> {
        Ok(Lock {
            obj: Obj::create(pool, 0, |l: &LockLayout| l.mutex.init())?,
        })
    }

    /// Attaches to a lock block (e.g. `pool.block(block_ref)` in another process).
    pub fn attach(block: Block) -> Result<Lock, SyncError> {
        Ok(Lock {
            obj: Obj::attach(block)?,
        })
    }

    /// Another handle (one more hold by this process).
    pub fn try_clone(&self) -> Result<Lock, SyncError> {
        Ok(Lock {
            obj: self.obj.try_clone()?,
        })
    }

    /// The handle other processes attach with.
    pub fn block_ref(&self) -> BlockRef {
        self.obj.block_ref()
    }

    /// The block holding the lock.
    pub fn block(&self) -> &Block {
        self.obj.block()
    }

    /// Acquires like `multiprocessing.Lock.acquire(blocking, timeout)`: `None` when not
    /// acquired (non-blocking and held, or `timeout` passed).
    pub fn acquire(&self, blocking: bool, timeout: Option<Duration>) -> Option<Acquired> {
        self.acquire_with(&opts_for(blocking, timeout)).ok()
    }

    /// Acquires following `opts` (`TimedOut`, `Interrupted`). A deadline already passed
    /// makes one attempt (which still recovers a dead holder, waiting one liveness poll).
    pub fn acquire_with(&self, opts: &WaitOpts) -> Result<Acquired, SyncError> {
        let recovered = lock_mutex(&self.obj.get().mutex, opts)?;
        Ok(Acquired { recovered })
    }

    /// Releases the lock, whoever acquired it; `NotHeld` when it is not locked.
    pub fn release(&self) -> Result<(), SyncError> {
        if self.obj.get().mutex.force_unlock() {
            Ok(())
        } else {
            Err(SyncError::NotHeld)
        }
    }

    /// Whether some process holds the lock.
    pub fn is_locked(&self) -> bool {
        self.holder().is_some()
    }

    /// Pid of the holding process, if any.
    pub fn holder(&self) -> Option<u32> {
        self.obj.get().mutex.holder()
    }

    /// Whether this process holds the lock (any of its threads).
    pub fn held_by_me(&self) -> bool {
        self.holder() == Some(ProcessId::current().pid)
    }

    #[cfg(test)]
    pub(crate) fn mutex(&self) -> &RobustMutex {
        &self.obj.get().mutex
    }
}

#[repr(C)]
pub(crate) struct RLockLayout {
    hdr: Header,
    mutex: RobustMutex,
    owner: AtomicU64,
    count: AtomicU32,
    _pad: AtomicU32,
}

// SAFETY: repr(C), atomics and a RobustMutex only, align 8, header first.
unsafe impl Shared for RLockLayout {
    const MAGIC: u32 = RLOCK_MAGIC;
    const NOT_THIS: &'static str = "not an RLock";
    fn header(&self) -> &Header {
        &self.hdr
    }
}

/// A process-shared recursive lock: owned by one thread of one process.
#[derive(Debug)]
pub struct RLock {
    obj: Obj<RLockLayout>,
}

/// This thread's owner tag: pid << 32 | a thread id unique within this process and drawn
/// from a random base per process (re-drawn when the pid changes, i.e. after fork).
pub(crate) fn thread_tag() -> u64 {
    thread_local!(static TAG: Cell<u64> = const { Cell::new(0) });
    static BASE: AtomicU64 = AtomicU64::new(0); // pid << 32 | random base
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let pid = ProcessId::current().pid;
    TAG.with(|t| {
        let v = t.get();
        if v != 0 && (v >> 32) as u32 == pid {
            return v;
        }
        let mut base = BASE.load(Ordering::Acquire);
        if (base >> 32) as u32 != pid {
            let fresh = (u64::from(pid) << 32) | (crate::platform::random_u64() & 0xffff_ffff);
            base = match BASE.compare_exchange(base, fresh, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => fresh,
                Err(cur) => cur,
            };
        }
        let tid = (base as u32).wrapping_add(SEQ.fetch_add(1, Ordering::Relaxed));
        let v = (u64::from(pid) << 32) | u64::from(tid);
        t.set(v);
        v
    })
}

impl RLock {
    /// Creates an unlocked recursive lock in a new block of `pool`.
    pub fn create(pool: &Pool) -> Result<RLock, SyncError> {
        Ok(RLock {
            obj: Obj::create(pool, 0, |l: &RLockLayout| l.mutex.init())?,
        })
    }

    /// Attaches to an RLock block (e.g. `pool.block(block_ref)` in another process).
    pub fn attach(block: Block) -> Result<RLock, SyncError> {
        Ok(RLock {
            obj: Obj::attach(block)?,
        })
    }

    /// Another handle (one more hold by this process).
    pub fn try_clone(&self) -> Result<RLock, SyncError> {
        Ok(RLock {
            obj: self.obj.try_clone()?,
        })
    }

    /// The handle other processes attach with.
    pub fn block_ref(&self) -> BlockRef {
        self.obj.block_ref()
    }

    /// The block holding the lock.
    pub fn block(&self) -> &Block {
        self.obj.block()
    }

    /// Acquires like `multiprocessing.RLock.acquire(blocking, timeout)`: `None` when not
    /// acquired. The owning thread acquires again at once (one more level).
    pub fn acquire(&self, blocking: bool, timeout: Option<Duration>) -> Option<Acquired> {
        self.acquire_with(&opts_for(blocking, timeout)).ok()
    }

    /// Acquires following `opts` (`TimedOut`, `Interrupted`; `Overflow` past `u32::MAX`
    /// levels).
    pub fn acquire_with(&self, opts: &WaitOpts) -> Result<Acquired, SyncError> {
        self.acquire_levels(1, opts)
    }

    fn acquire_levels(&self, levels: u32, opts: &WaitOpts) -> Result<Acquired, SyncError> {
        let l = self.obj.get();
        let me = thread_tag();
        if self.is_mine() {
            let c = l.count.load(Ordering::Relaxed);
            let n = c.checked_add(levels).ok_or(SyncError::Overflow)?;
            l.count.store(n, Ordering::Relaxed);
            return Ok(Acquired { recovered: false });
        }
        let recovered = lock_mutex(&l.mutex, opts)?;
        l.owner.store(me, Ordering::Relaxed);
        l.count.store(levels, Ordering::Relaxed);
        Ok(Acquired { recovered })
    }

    /// Releases one level; `NotOwner` when another thread or process holds it, `NotHeld`
    /// when nobody does.
    pub fn release(&self) -> Result<(), SyncError> {
        self.release_levels(false).map(|_| ())
    }

    fn release_levels(&self, all: bool) -> Result<u32, SyncError> {
        let l = self.obj.get();
        if !self.is_mine() {
            return Err(match l.mutex.holder() {
                None => SyncError::NotHeld,
                Some(_) => SyncError::NotOwner,
            });
        }
        let c = l.count.load(Ordering::Relaxed).max(1);
        if c > 1 && !all {
            l.count.store(c - 1, Ordering::Relaxed);
            return Ok(c);
        }
        l.owner.store(0, Ordering::Relaxed);
        l.count.store(0, Ordering::Relaxed);
        // SYNC POINT: the mutex's Release swap publishes everything done under the lock.
        l.mutex.force_unlock();
        Ok(c)
    }

    /// Releases every level at once and returns how many there were (for `Condition.wait`;
    /// CPython's `_release_save`).
    pub fn release_save(&self) -> Result<u32, SyncError> {
        self.release_levels(true)
    }

    /// Re-acquires `levels` levels at once (CPython's `_acquire_restore`).
    pub fn acquire_restore(&self, levels: u32, opts: &WaitOpts) -> Result<Acquired, SyncError> {
        self.acquire_levels(levels.max(1), opts)
    }

    /// Whether the calling thread owns the lock.
    pub fn is_mine(&self) -> bool {
        let l = self.obj.get();
        l.owner.load(Ordering::Relaxed) == thread_tag()
            && l.mutex.holder() == Some(ProcessId::current().pid)
    }

    /// Recursion level of the calling thread (0 when it does not own the lock).
    pub fn count(&self) -> u32 {
        if self.is_mine() {
            self.obj.get().count.load(Ordering::Relaxed)
        } else {
            0
        }
    }

    /// Pid of the holding process, if any.
    pub fn holder(&self) -> Option<u32> {
        self.obj.get().mutex.holder()
    }
}

// The shared layouts of this file, fixed: a change here changes what other processes (and
// other versions) read, so it must come with a layout version bump. (Loom's atomics differ.)
#[cfg(not(loom))]
const _: () = assert!(std::mem::size_of::<LockLayout>() == 24);
#[cfg(not(loom))]
const _: () = assert!(std::mem::size_of::<RLockLayout>() == 40);

#[cfg(test)]
mod tests {
    use super::super::test_util::{finish, pool};
    use super::*;
    use std::sync::Arc;

    const DEAD: ProcessId = ProcessId {
        pid: 0x3fff_fff0,
        start: 1,
    };

    #[test]
    fn layout_sizes() {
        assert_eq!(std::mem::size_of::<LockLayout>(), 24);
        assert_eq!(std::mem::size_of::<RLockLayout>(), 40);
    }

    #[test]
    fn lock_excludes_and_any_thread_may_release() {
        let (rt, p) = pool();
        let lock = Arc::new(Lock::create(&p).unwrap());
        assert_eq!(lock.release(), Err(SyncError::NotHeld));
        assert_eq!(
            lock.acquire(true, None),
            Some(Acquired { recovered: false })
        );
        assert!(lock.held_by_me());
        assert_eq!(lock.acquire(false, None), None);
        assert_eq!(lock.acquire(true, Some(Duration::from_millis(5))), None);
        let l2 = lock.clone();
        std::thread::spawn(move || l2.release().unwrap())
            .join()
            .unwrap();
        assert!(!lock.is_locked());
        // Mutual exclusion: a non-atomic read-modify-write under the lock.
        let counter = Arc::new(AtomicU64::new(0));
        let ts: Vec<_> = (0..4)
            .map(|_| {
                let (lock, counter) = (lock.clone(), counter.clone());
                std::thread::spawn(move || {
                    for _ in 0..5000 {
                        assert_eq!(
                            lock.acquire(true, None),
                            Some(Acquired { recovered: false })
                        );
                        let v = counter.load(Ordering::Relaxed);
                        counter.store(v + 1, Ordering::Relaxed);
                        lock.release().unwrap();
                    }
                })
            })
            .collect();
        for t in ts {
            t.join().unwrap();
        }
        assert_eq!(counter.load(Ordering::Relaxed), 20_000);
        drop(lock);
        finish(rt, p);
    }

    #[test]
    fn lock_recovers_dead_holder_even_without_blocking() {
        let (rt, p) = pool();
        let lock = Lock::create(&p).unwrap();
        lock.mutex().abandon_as(DEAD);
        assert_eq!(
            lock.acquire(false, None),
            Some(Acquired { recovered: true })
        );
        lock.release().unwrap();
        lock.mutex().abandon_as(DEAD);
        assert_eq!(
            lock.acquire(true, Some(Duration::from_secs(5))),
            Some(Acquired { recovered: true })
        );
        lock.release().unwrap();
        assert_eq!(
            lock.acquire(true, None),
            Some(Acquired { recovered: false })
        );
        lock.release().unwrap();
        // SAFETY: the sync object never lends its block mutably.
        let other = Lock::attach(unsafe { p.block(lock.block_ref()) }.unwrap()).unwrap();
        assert!(!other.is_locked());
        // SAFETY: the sync object never lends its block mutably.
        assert!(RLock::attach(unsafe { p.block(lock.block_ref()) }.unwrap()).is_err());
        drop((lock, other));
        finish(rt, p);
    }

    #[test]
    fn rlock_recursion_and_ownership() {
        let (rt, p) = pool();
        let r = Arc::new(RLock::create(&p).unwrap());
        assert_eq!(r.release(), Err(SyncError::NotHeld));
        for i in 1..=3 {
            assert_eq!(r.acquire(true, None), Some(Acquired { recovered: false }));
            assert_eq!(r.count(), i);
        }
        let r2 = r.clone();
        let other = std::thread::spawn(move || {
            (
                r2.release(),
                r2.acquire(false, None),
                r2.acquire(true, Some(Duration::from_millis(5))),
            )
        })
        .join()
        .unwrap();
        assert_eq!(other, (Err(SyncError::NotOwner), None, None));
        assert_eq!(r.release_save(), Ok(3));
        assert_eq!(r.holder(), None);
        assert_eq!(
            r.acquire_restore(3, &WaitOpts::default())
                .map(|a| a.recovered),
            Ok(false)
        );
        assert_eq!(r.count(), 3);
        for _ in 0..3 {
            r.release().unwrap();
        }
        assert_eq!(r.release(), Err(SyncError::NotHeld));
        let r2 = r.clone();
        let got = std::thread::spawn(move || {
            let a = r2.acquire(true, Some(Duration::from_secs(5)));
            r2.release().unwrap();
            a
        })
        .join()
        .unwrap();
        assert_eq!(got, Some(Acquired { recovered: false }));
        drop(r);
        finish(rt, p);
    }

    #[test]
    fn rlock_recovers_dead_owner() {
        let (rt, p) = pool();
        let r = RLock::create(&p).unwrap();
        let l = r.obj.get();
        l.mutex.abandon_as(DEAD);
        l.owner
            .store(u64::from(DEAD.pid) << 32 | 7, Ordering::Relaxed);
        l.count.store(5, Ordering::Relaxed);
        assert_eq!(r.release(), Err(SyncError::NotOwner));
        assert_eq!(
            r.acquire(true, Some(Duration::from_secs(5))),
            Some(Acquired { recovered: true })
        );
        assert_eq!(r.count(), 1);
        r.release().unwrap();
        assert_eq!(r.acquire(true, None), Some(Acquired { recovered: false }));
        r.release().unwrap();
        drop(r);
        finish(rt, p);
    }
}
