//! [`Condition`]: `multiprocessing.Condition` over one of our [`Lock`]s or [`RLock`]s.
//!
//! # Design
//! The lock is a separate object: the condition's block stores its kind and `BlockRef`,
//! and every handle holds both blocks (so the lock lives as long as the condition).
//! `attach` resolves the stored reference in the same pool. Default lock: a new [`RLock`],
//! as in `multiprocessing`.
//!
//! # Protocol (ticket counters; all changes under the user's lock)
//! * `tickets`: tickets handed out; `released`: every ticket below it is notified;
//!   `cancelled`: 1024-bit ring, bit `t % 1024` = ticket `t` gave up (timeout, signal).
//! * wait: holding the lock, take ticket `t = tickets` (clear its bit, then store
//!   `tickets = t + 1`), release the lock fully, sleep until `released > t`, re-acquire the
//!   lock (always, without timeout, restoring RLock levels). A wait that timed out checks
//!   once more under the lock: notified after all means success; else it sets its
//!   cancelled bit and compacts (`released` skips a cancelled prefix, `tickets` drops a
//!   cancelled tail).
//! * notify(n): holding the lock, walk `released` forward over up to `n` live tickets
//!   (skipping cancelled ones), store it once, wake the queue. So exactly `min(n, waiting)`
//!   waiters that were waiting at the call are woken, never a later one.
//!
//! SYNC POINT: the Release store of `released` in `notify` pairs with the waiter's Acquire
//! load; the wait queue's Dekker pair makes sure no waiter misses it. At most
//! [`MAX_COND_WAITERS`] tickets may be outstanding (else `Overflow`). A process killed
//! while waiting keeps its ticket, which may absorb one later notify; a re-acquire that
//! recovers a dead lock holder is not reported.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use super::CONDITION_MAGIC;
use super::{wait_on, Acquired, Header, Lock, Obj, RLock, Shared, SyncError, WaitOpts};
use crate::heap::{Block, BlockRef, Pool};
use crate::waitqueue::WaitQueue;

/// Most tickets a condition may have outstanding at once.
pub const MAX_COND_WAITERS: u64 = 1024;
const KIND_LOCK: u32 = 1;
const KIND_RLOCK: u32 = 2;

#[repr(C)]
pub(crate) struct CondLayout {
    hdr: Header,
    lock_kind: AtomicU32,
    _pad: AtomicU32,
    lock_ref: [AtomicU64; 4],
    tickets: AtomicU64,
    released: AtomicU64,
    wq: WaitQueue,
    cancelled: [AtomicU64; (MAX_COND_WAITERS / 64) as usize],
}

// SAFETY: repr(C), atomics and a WaitQueue only, align 8, header first.
unsafe impl Shared for CondLayout {
    const MAGIC: u32 = CONDITION_MAGIC;
    const NOT_THIS: &'static str = "not a Condition";
    fn header(&self) -> &Header {
        &self.hdr
    }
}

impl CondLayout {
    fn bit(&self, t: u64) -> (&AtomicU64, u64) {
        let i = t % MAX_COND_WAITERS;
        (&self.cancelled[(i / 64) as usize], 1 << (i % 64))
    }

    fn is_cancelled(&self, t: u64) -> bool {
        let (w, m) = self.bit(t);
        w.load(Ordering::Relaxed) & m != 0
    }

    fn set_cancelled(&self, t: u64, yes: bool) {
        let (w, m) = self.bit(t);
        if yes {
            w.fetch_or(m, Ordering::Relaxed);
        } else {
            w.fetch_and(!m, Ordering::Relaxed);
        }
    }
}

/// The lock a [`Condition`] works with.
#[derive(Debug)]
pub enum CondLock {
    /// A non-recursive [`Lock`].
    Lock(Lock),
    /// A recursive [`RLock`].
    RLock(RLock),
}

impl CondLock {
    /// Acquires like CPython's `acquire(blocking, timeout)`; `None` when not acquired.
    pub fn acquire(&self, blocking: bool, timeout: Option<Duration>) -> Option<Acquired> {
        match self {
            CondLock::Lock(l) => l.acquire(blocking, timeout),
            CondLock::RLock(l) => l.acquire(blocking, timeout),
        }
    }

    /// Acquires following `opts`.
    pub fn acquire_with(&self, opts: &WaitOpts) -> Result<Acquired, SyncError> {
        match self {
            CondLock::Lock(l) => l.acquire_with(opts),
            CondLock::RLock(l) => l.acquire_with(opts),
        }
    }

    /// Releases (one level of an RLock).
    pub fn release(&self) -> Result<(), SyncError> {
        match self {
            CondLock::Lock(l) => l.release(),
            CondLock::RLock(l) => l.release(),
        }
    }

    /// Whether the caller holds it: for a `Lock`, any thread of this process; for an
    /// `RLock`, this thread.
    pub fn held_by_caller(&self) -> bool {
        match self {
            CondLock::Lock(l) => l.held_by_me(),
            CondLock::RLock(l) => l.is_mine(),
        }
    }

    /// The lock's block handle.
    pub fn block_ref(&self) -> BlockRef {
        match self {
            CondLock::Lock(l) => l.block_ref(),
            CondLock::RLock(l) => l.block_ref(),
        }
    }

    fn block(&self) -> &Block {
        match self {
            CondLock::Lock(l) => l.block(),
            CondLock::RLock(l) => l.block(),
        }
    }

    fn kind(&self) -> u32 {
        match self {
            CondLock::Lock(_) => KIND_LOCK,
            CondLock::RLock(_) => KIND_RLOCK,
        }
    }

    fn try_clone(&self) -> Result<CondLock, SyncError> {
        Ok(match self {
            CondLock::Lock(l) => CondLock::Lock(l.try_clone()?),
            CondLock::RLock(l) => CondLock::RLock(l.try_clone()?),
        })
    }

    fn release_save(&self) -> Result<u32, SyncError> {
        match self {
            CondLock::Lock(l) => l.release().map(|()| 1),
            CondLock::RLock(l) => l.release_save(),
        }
    }

    fn acquire_restore(&self, levels: u32) -> Result<Acquired, SyncError> {
        let forever = WaitOpts::default();
        match self {
            CondLock::Lock(l) => l.acquire_with(&forever),
            CondLock::RLock(l) => l.acquire_restore(levels, &forever),
        }
    }
}

/// A process-shared condition variable.
#[derive(Debug)]
pub struct Condition {
    obj: Obj<CondLayout>,
    lock: CondLock,
}

impl Condition {
    /// Creates a condition over `lock` (`None`: a new [`RLock`]) in a new block of `pool`;
    /// the lock must live in the same pool.
    pub fn create(pool: &Pool, lock: Option<CondLock>) -> Result<Condition, SyncError> {
        let lock = match lock {
            Some(l) => l,
            None => CondLock::RLock(RLock::create(pool)?),
        };
        if lock.block().pool().id() != pool.id() {
            return Err(SyncError::BadLayout("condition lock lives in another pool"));
        }
        let r = lock.block_ref();
        let obj = Obj::create(pool, 0, |l: &CondLayout| {
            l.lock_kind.store(lock.kind(), Ordering::Relaxed);
            l.lock_ref[0].store(r.segment, Ordering::Relaxed);
            l.lock_ref[1].store(r.offset, Ordering::Relaxed);
            l.lock_ref[2].store(r.len, Ordering::Relaxed);
            l.lock_ref[3].store(u64::from(r.gen), Ordering::Relaxed);
        })?;
        Ok(Condition { obj, lock })
    }

    /// Attaches to a condition block and to its lock (e.g. `pool.block(block_ref)` in
    /// another process).
    pub fn attach(block: Block) -> Result<Condition, SyncError> {
        let obj: Obj<CondLayout> = Obj::attach(block)?;
        let l = obj.get();
        let gen = u32::try_from(l.lock_ref[3].load(Ordering::Relaxed))
            .map_err(|_| SyncError::BadLayout("condition lock reference corrupt"))?;
        let r = BlockRef {
            segment: l.lock_ref[0].load(Ordering::Relaxed),
            offset: l.lock_ref[1].load(Ordering::Relaxed),
            len: l.lock_ref[2].load(Ordering::Relaxed),
            gen,
            _pad: 0,
        };
        // SAFETY: the handle goes straight into a Lock or RLock, which never lends its
        // block mutably (only `&Block`): no mutable borrow of these bytes is ever made.
        let lock_block = unsafe { obj.block().pool().block(r) }?;
        let lock = match l.lock_kind.load(Ordering::Relaxed) {
            KIND_LOCK => CondLock::Lock(Lock::attach(lock_block)?),
            KIND_RLOCK => CondLock::RLock(RLock::attach(lock_block)?),
            _ => return Err(SyncError::BadLayout("condition lock kind unknown")),
        };
        Ok(Condition { obj, lock })
    }

    /// Another handle (one more hold by this process on both blocks).
    pub fn try_clone(&self) -> Result<Condition, SyncError> {
        Ok(Condition {
            obj: self.obj.try_clone()?,
            lock: self.lock.try_clone()?,
        })
    }

    /// The handle other processes attach with.
    pub fn block_ref(&self) -> BlockRef {
        self.obj.block_ref()
    }

    /// The block holding the condition (not the lock).
    pub fn block(&self) -> &Block {
        self.obj.block()
    }

    /// The lock.
    pub fn lock(&self) -> &CondLock {
        &self.lock
    }

    /// Acquires the lock (`None` when not acquired).
    pub fn acquire(&self, blocking: bool, timeout: Option<Duration>) -> Option<Acquired> {
        self.lock.acquire(blocking, timeout)
    }

    /// Releases the lock.
    pub fn release(&self) -> Result<(), SyncError> {
        self.lock.release()
    }

    /// Releases the lock, waits for a notify, re-acquires the lock. `Ok(false)` when
    /// `timeout` passed first; `NotOwner` when the caller does not hold the lock.
    pub fn wait(&self, timeout: Option<Duration>) -> Result<bool, SyncError> {
        match self.wait_with(&WaitOpts::timeout(timeout)) {
            Ok(()) => Ok(true),
            Err(SyncError::TimedOut) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// [`Condition::wait`] following `opts`: `TimedOut`, `Interrupted` (the lock is
    /// re-acquired in every case but `NotOwner` and `Overflow`).
    pub fn wait_with(&self, opts: &WaitOpts) -> Result<(), SyncError> {
        if !self.lock.held_by_caller() {
            return Err(SyncError::NotOwner);
        }
        let l = self.obj.get();
        let t = l.tickets.load(Ordering::Relaxed);
        if t - l.released.load(Ordering::Relaxed) >= MAX_COND_WAITERS {
            return Err(SyncError::Overflow);
        }
        l.set_cancelled(t, false);
        l.tickets.store(t + 1, Ordering::Relaxed);
        let levels = self.lock.release_save()?;
        // SYNC POINT: Acquire pairs with the Release store of `released` in `notify`.
        let r = wait_on(&l.wq, opts, || {
            (l.released.load(Ordering::Acquire) > t).then_some(())
        });
        let _recovered = self.lock.acquire_restore(levels)?;
        match r {
            Ok(()) => Ok(()),
            Err(_) if l.released.load(Ordering::Acquire) > t => Ok(()),
            Err(e) => {
                self.cancel(t);
                Err(e)
            }
        }
    }

    /// Under the lock: ticket `t` gives up; compact both ends.
    fn cancel(&self, t: u64) {
        let l = self.obj.get();
        l.set_cancelled(t, true);
        let tickets = l.tickets.load(Ordering::Relaxed);
        let released = l.released.load(Ordering::Relaxed);
        let mut r = released;
        while r < tickets && l.is_cancelled(r) {
            r += 1;
        }
        if r != released {
            l.released.store(r, Ordering::Release);
        }
        let mut tk = tickets;
        while tk > r && l.is_cancelled(tk - 1) {
            tk -= 1;
        }
        if tk != tickets {
            l.tickets.store(tk, Ordering::Relaxed);
        }
    }

    /// Wakes up to `n` of the processes waiting now; `NotOwner` unless the caller holds the
    /// lock.
    pub fn notify(&self, n: u64) -> Result<(), SyncError> {
        if !self.lock.held_by_caller() {
            return Err(SyncError::NotOwner);
        }
        let l = self.obj.get();
        let tickets = l.tickets.load(Ordering::Relaxed);
        let released = l.released.load(Ordering::Relaxed);
        let (mut r, mut woken) = (released, 0);
        while r < tickets && woken < n {
            if !l.is_cancelled(r) {
                woken += 1;
            }
            r += 1;
        }
        while r < tickets && l.is_cancelled(r) {
            r += 1;
        }
        if r != released {
            // SYNC POINT: Release pairs with the waiters' Acquire load in `wait_with`.
            l.released.store(r, Ordering::Release);
            l.wq.notify_all();
        }
        Ok(())
    }

    /// Wakes every process waiting now; `NotOwner` unless the caller holds the lock.
    pub fn notify_all(&self) -> Result<(), SyncError> {
        self.notify(u64::MAX)
    }

    /// Tickets outstanding: waiters, plus given-up tickets not yet compacted away.
    pub fn n_waiting(&self) -> u64 {
        let l = self.obj.get();
        l.tickets
            .load(Ordering::Relaxed)
            .saturating_sub(l.released.load(Ordering::Relaxed))
    }
}

// The shared layouts of this file, fixed: a change here changes what other processes (and
// other versions) read, so it must come with a layout version bump. (Loom's atomics differ.)
#[cfg(not(loom))]
const _: () = assert!(std::mem::size_of::<CondLayout>() == 200);

#[cfg(test)]
mod tests {
    use super::super::test_util::{finish, pool, until};
    use super::*;
    use std::sync::Arc;

    const LONG: Option<Duration> = Some(Duration::from_secs(30));

    #[test]
    fn layout_size() {
        assert_eq!(std::mem::size_of::<CondLayout>(), 200);
    }

    fn waiting_now(c: &Condition) -> u64 {
        assert!(c.acquire(true, None).is_some());
        let n = c.n_waiting();
        c.release().unwrap();
        n
    }

    fn notify_wakes_exactly(c: Arc<Condition>) {
        let woken = Arc::new(AtomicU64::new(0));
        let ts: Vec<_> = (0..3)
            .map(|_| {
                let (c, woken) = (c.clone(), woken.clone());
                std::thread::spawn(move || {
                    assert!(c.acquire(true, None).is_some());
                    let r = c.wait(LONG);
                    woken.fetch_add(1, Ordering::SeqCst);
                    assert!(c.lock().held_by_caller());
                    c.release().unwrap();
                    r
                })
            })
            .collect();
        until(|| waiting_now(&c) == 3);
        assert!(c.acquire(true, None).is_some());
        c.notify(1).unwrap();
        assert_eq!(c.n_waiting(), 2);
        c.release().unwrap();
        until(|| woken.load(Ordering::SeqCst) >= 1);
        // The other two went back to sleep (or never woke): still waiting, not woken.
        until(|| c.obj.get().wq.waiters() == 2);
        assert_eq!(woken.load(Ordering::SeqCst), 1);
        assert_eq!(waiting_now(&c), 2);
        assert!(c.acquire(true, None).is_some());
        c.notify_all().unwrap();
        c.release().unwrap();
        for t in ts {
            assert_eq!(t.join().unwrap(), Ok(true));
        }
        assert_eq!(woken.load(Ordering::SeqCst), 3);
        assert_eq!(waiting_now(&c), 0);
    }

    #[test]
    fn notify_one_wakes_exactly_one_of_three_rlock() {
        let (rt, p) = pool();
        let c = Arc::new(Condition::create(&p, None).unwrap());
        notify_wakes_exactly(c);
        finish(rt, p);
    }

    #[test]
    fn notify_one_wakes_exactly_one_of_three_lock() {
        let (rt, p) = pool();
        let lock = CondLock::Lock(Lock::create(&p).unwrap());
        let c = Arc::new(Condition::create(&p, Some(lock)).unwrap());
        // Through another handle attached by reference, as another process would.
        // SAFETY: the sync object never lends its block mutably.
        let c2 = Arc::new(Condition::attach(unsafe { p.block(c.block_ref()) }.unwrap()).unwrap());
        assert!(matches!(c2.lock(), CondLock::Lock(_)));
        notify_wakes_exactly(c2);
        drop(c);
        finish(rt, p);
    }

    #[test]
    fn timeout_ownership_and_rlock_levels() {
        let (rt, p) = pool();
        let c = Condition::create(&p, None).unwrap();
        assert_eq!(c.wait(Some(Duration::ZERO)), Err(SyncError::NotOwner));
        assert_eq!(c.notify(1), Err(SyncError::NotOwner));
        for _ in 0..2 {
            assert!(c.acquire(true, None).is_some());
        }
        assert_eq!(c.wait(Some(Duration::from_millis(10))), Ok(false));
        let CondLock::RLock(r) = c.lock() else {
            panic!("default lock is an RLock")
        };
        assert_eq!(r.count(), 2, "recursion levels restored");
        assert_eq!(
            c.wait_with(&WaitOpts::timeout(Some(Duration::ZERO))),
            Err(SyncError::TimedOut)
        );
        assert_eq!(c.n_waiting(), 0, "given-up tickets compacted");
        c.notify(5).unwrap();
        c.release().unwrap();
        c.release().unwrap();
        assert_eq!(c.release(), Err(SyncError::NotHeld));
        drop(c);
        finish(rt, p);
    }

    #[test]
    fn cancelled_ticket_in_the_middle_is_skipped() {
        let (rt, p) = pool();
        let c = Arc::new(Condition::create(&p, None).unwrap());
        let spawn = |timeout: Option<Duration>| {
            let c = c.clone();
            std::thread::spawn(move || {
                assert!(c.acquire(true, None).is_some());
                let r = c.wait(timeout);
                c.release().unwrap();
                r
            })
        };
        let a = spawn(LONG);
        until(|| waiting_now(&c) == 1);
        // Generous: `b` must still be waiting when `d` takes the next ticket.
        let b = spawn(Some(Duration::from_millis(1000)));
        until(|| waiting_now(&c) == 2);
        let d = spawn(LONG);
        until(|| waiting_now(&c) == 3);
        assert_eq!(b.join().unwrap(), Ok(false));
        assert!(c.acquire(true, None).is_some());
        c.notify(1).unwrap();
        c.release().unwrap();
        assert_eq!(a.join().unwrap(), Ok(true));
        assert!(c.acquire(true, None).is_some());
        // Ticket of `b` (cancelled) is skipped: this wakes `d`.
        c.notify(1).unwrap();
        assert_eq!(c.n_waiting(), 0);
        c.release().unwrap();
        assert_eq!(d.join().unwrap(), Ok(true));
        drop(c);
        finish(rt, p);
    }
}
