//! [`Barrier`]: `threading.Barrier` semantics across processes (`multiprocessing.Barrier`).
//!
//! # Protocol
//! One 64-bit `state` word, changed only by CAS, so there is no lock a dead process could
//! keep:
//!
//! | bits | field |
//! |---|---|
//! | 0..20 | `count`: arrivals in the current generation |
//! | 20 | `BROKEN`: the current generation is broken |
//! | 21..44 | `history`: bit `i` = generation `gen - 1 - i` ended by `reset` (its waiters get `Broken`) |
//! | 44..64 | `gen`: generation number (wraps at 2^20) |
//!
//! * arrive: CAS `count += 1`; the arrival index is the old count. Arrivals while the last
//!   arriver runs its action (`count == parties`) wait for the generation to end first.
//! * the last arriver (index `parties - 1`) runs the action, then CASes to
//!   `(gen + 1, count 0, history << 1 | 0)` and wakes everyone.
//! * a waiter of generation `g` sleeps until `gen != g` (released, unless the history bit
//!   for `g` says reset) or `BROKEN` is set with `gen == g`.
//! * timeout (and `cancel` of an interrupted arrival): set `BROKEN` if `gen` is still `g`;
//!   every waiter of `g` and every later arrival gets [`SyncError::Broken`] (CPython).
//! * `abort`: set `BROKEN`. `reset`: if anything is pending, CAS to
//!   `(gen + 1, count 0, history << 1 | 1)`: current waiters get `Broken`, new arrivals start
//!   afresh.
//!
//! SYNC POINT: each CAS is AcqRel and each waiter check an Acquire load of `state`, so what
//! the parties did before arriving happens-before what they do after release; the wait
//! queue's Dekker pair makes sure no waiter misses the generation change. The history makes
//! the outcome exact unless a waiter sleeps through 23 further generations (then it is
//! treated as released). A process that dies while waiting simply never arrives again: the
//! others time out and break the barrier.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use super::{wait_on, Header, Obj, Shared, SyncError, WaitOpts, BARRIER_MAGIC};
use crate::heap::{Block, BlockRef, Pool};
use crate::waitqueue::WaitQueue;

/// Largest number of parties.
pub const MAX_PARTIES: u32 = (1 << COUNT_BITS) - 1;
const COUNT_BITS: u32 = 20;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;
const BROKEN: u64 = 1 << 20;
const HIST_SHIFT: u32 = 21;
const HIST_BITS: u32 = 23;
const HIST_MASK: u64 = (1 << HIST_BITS) - 1;
const GEN_SHIFT: u32 = 44;
const GEN_MASK: u32 = (1 << 20) - 1;

fn gen_of(s: u64) -> u32 {
    (s >> GEN_SHIFT) as u32 & GEN_MASK
}

fn count_of(s: u64) -> u32 {
    (s & COUNT_MASK) as u32
}

/// The state after generation `gen_of(s)` ends (`by_reset`: its waiters are broken).
fn advance(s: u64, by_reset: bool) -> u64 {
    let hist = ((((s >> HIST_SHIFT) & HIST_MASK) << 1) | u64::from(by_reset)) & HIST_MASK;
    let gen = u64::from((gen_of(s) + 1) & GEN_MASK);
    (gen << GEN_SHIFT) | (hist << HIST_SHIFT)
}

/// How generation `g` ended, seen from state `s`: `None` while it is still filling.
fn outcome(s: u64, g: u32) -> Option<Result<(), SyncError>> {
    let cur = gen_of(s);
    if cur == g {
        return (s & BROKEN != 0).then_some(Err(SyncError::Broken));
    }
    let d = cur.wrapping_sub(g) & GEN_MASK;
    if d <= HIST_BITS && (s >> (HIST_SHIFT + d - 1)) & 1 == 1 {
        Some(Err(SyncError::Broken))
    } else {
        Some(Ok(()))
    }
}

#[repr(C)]
pub(crate) struct BarrierLayout {
    hdr: Header,
    parties: AtomicU32,
    _pad: AtomicU32,
    state: AtomicU64,
    wq: WaitQueue,
}

// SAFETY: repr(C), atomics and a WaitQueue only, align 8, header first.
unsafe impl Shared for BarrierLayout {
    const MAGIC: u32 = BARRIER_MAGIC;
    const NOT_THIS: &'static str = "not a Barrier";
    fn header(&self) -> &Header {
        &self.hdr
    }
}

/// A process-shared barrier for a fixed number of parties, reusable across generations.
#[derive(Debug)]
pub struct Barrier {
    obj: Obj<BarrierLayout>,
    parties: u32,
}

/// One arrival at the barrier whose wait has not finished yet (see [`Barrier::arrive`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arrival {
    gen: u32,
    index: u32,
}

impl Arrival {
    /// The arrival index, `0..parties`, distinct within a generation.
    pub fn index(&self) -> u32 {
        self.index
    }
}

impl Barrier {
    /// Creates a barrier for `parties` (1..=[`MAX_PARTIES`], else `Overflow`) in a new block.
    pub fn create(pool: &Pool, parties: u32) -> Result<Barrier, SyncError> {
        if parties == 0 || parties > MAX_PARTIES {
            return Err(SyncError::Overflow);
        }
        let obj = Obj::create(pool, 0, |l: &BarrierLayout| {
            l.parties.store(parties, Ordering::Relaxed);
        })?;
        Ok(Barrier { obj, parties })
    }

    /// Attaches to a barrier block (e.g. `pool.block(block_ref)` in another process).
    pub fn attach(block: Block) -> Result<Barrier, SyncError> {
        let obj: Obj<BarrierLayout> = Obj::attach(block)?;
        let parties = obj.get().parties.load(Ordering::Relaxed);
        if parties == 0 || parties > MAX_PARTIES {
            return Err(SyncError::BadLayout("barrier parties out of range"));
        }
        Ok(Barrier { obj, parties })
    }

    /// Another handle (one more hold by this process).
    pub fn try_clone(&self) -> Result<Barrier, SyncError> {
        Ok(Barrier {
            obj: self.obj.try_clone()?,
            parties: self.parties,
        })
    }

    /// The handle other processes attach with.
    pub fn block_ref(&self) -> BlockRef {
        self.obj.block_ref()
    }

    /// The block holding the barrier.
    pub fn block(&self) -> &Block {
        self.obj.block()
    }

    /// Number of parties.
    pub fn parties(&self) -> u32 {
        self.parties
    }

    /// Arrivals waiting in the current generation (0 when broken).
    pub fn n_waiting(&self) -> u32 {
        let s = self.obj.get().state.load(Ordering::Acquire);
        if s & BROKEN != 0 {
            0
        } else {
            count_of(s).min(self.parties)
        }
    }

    /// Whether the barrier is broken.
    pub fn broken(&self) -> bool {
        self.obj.get().state.load(Ordering::Acquire) & BROKEN != 0
    }

    /// Waits for all parties; returns this arrival's index (`0..parties`, distinct per
    /// generation). A timeout breaks the barrier; then (and whenever it is broken, aborted
    /// or reset while waiting) the result is [`SyncError::Broken`].
    pub fn wait(&self, timeout: Option<Duration>) -> Result<u32, SyncError> {
        self.wait_with(&WaitOpts::timeout(timeout), None)
    }

    /// [`Barrier::wait`] with options and an optional action the last arriver runs before
    /// the others are released (returning false breaks the barrier: the Python action
    /// raised). An interrupted wait breaks the barrier too, as an exception in CPython's
    /// `wait` does; use [`Barrier::arrive`] to resume after signals instead.
    pub fn wait_with(
        &self,
        opts: &WaitOpts,
        action: Option<&mut dyn FnMut() -> bool>,
    ) -> Result<u32, SyncError> {
        let a = self.arrive(opts, action)?;
        match self.wait_arrival(&a, opts) {
            // Released just before the cancel: the wait succeeded after all.
            Err(SyncError::Interrupted) => self.cancel(&a).or(Err(SyncError::Interrupted)),
            r => r,
        }
    }

    /// Arrives at the barrier; the last arriver runs `action` and releases the others. Then
    /// [`Barrier::wait_arrival`] waits for the release. Fails with `Broken` when the
    /// barrier is broken (or `action` returned false).
    pub fn arrive(
        &self,
        opts: &WaitOpts,
        action: Option<&mut dyn FnMut() -> bool>,
    ) -> Result<Arrival, SyncError> {
        let l = self.obj.get();
        loop {
            let s = l.state.load(Ordering::Acquire);
            if s & BROKEN != 0 {
                return Err(SyncError::Broken);
            }
            let (g, c) = (gen_of(s), count_of(s));
            if c >= self.parties {
                // The last arriver runs its action: wait until this generation ends.
                let r = wait_on(&l.wq, opts, || {
                    let s2 = l.state.load(Ordering::Acquire);
                    (gen_of(s2) != g || s2 & BROKEN != 0).then_some(())
                });
                match r {
                    Ok(()) => continue,
                    Err(SyncError::TimedOut) => {
                        self.break_gen(g);
                        return Err(SyncError::Broken);
                    }
                    Err(e) => return Err(e),
                }
            }
            // SYNC POINT: AcqRel pairs with every other CAS of `state` and the waiters'
            // Acquire loads.
            if l.state
                .compare_exchange(s, s + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                continue;
            }
            let a = Arrival { gen: g, index: c };
            if c + 1 == self.parties {
                if let Some(f) = action {
                    if !f() {
                        self.break_gen(g);
                        return Err(SyncError::Broken);
                    }
                }
                self.release(g)?;
            }
            return Ok(a);
        }
    }

    fn release(&self, g: u32) -> Result<(), SyncError> {
        let l = self.obj.get();
        let mut s = l.state.load(Ordering::Acquire);
        loop {
            if gen_of(s) != g || s & BROKEN != 0 {
                // Aborted or reset while the action ran.
                return Err(SyncError::Broken);
            }
            // SYNC POINT: Release publishes the generation change to the waiters' Acquire
            // loads in `wait_arrival`.
            match l.state.compare_exchange(
                s,
                advance(s, false),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(cur) => s = cur,
            }
        }
        l.wq.notify_all();
        Ok(())
    }

    /// Waits until the generation of `a` ends: `Ok(index)` when released; `Broken` when
    /// broken, aborted, reset or timed out (a timeout breaks the barrier); `Interrupted`
    /// leaves the arrival pending (call again, or [`Barrier::cancel`]).
    pub fn wait_arrival(&self, a: &Arrival, opts: &WaitOpts) -> Result<u32, SyncError> {
        let l = self.obj.get();
        // SYNC POINT: Acquire pairs with the AcqRel CAS in `release`, `reset`, `break_gen`.
        match wait_on(&l.wq, opts, || {
            outcome(l.state.load(Ordering::Acquire), a.gen)
        }) {
            Ok(r) => r.map(|()| a.index),
            Err(SyncError::TimedOut) => match self.break_gen(a.gen) {
                Some(r) => r.map(|()| a.index),
                None => Err(SyncError::Broken),
            },
            Err(e) => Err(e),
        }
    }

    /// Like [`Barrier::wait_arrival`], but a time-out leaves the arrival pending and returns
    /// `TimedOut` (callers that wait in slices, e.g. to look at signals, decide themselves
    /// when to give up with [`Barrier::cancel`]).
    pub fn poll_arrival(&self, a: &Arrival, opts: &WaitOpts) -> Result<u32, SyncError> {
        let l = self.obj.get();
        // SYNC POINT: as in `wait_arrival`.
        match wait_on(&l.wq, opts, || {
            outcome(l.state.load(Ordering::Acquire), a.gen)
        }) {
            Ok(r) => r.map(|()| a.index),
            Err(e) => Err(e),
        }
    }

    /// Gives up a pending arrival: breaks its generation unless it ended already (then
    /// returns how it ended).
    pub fn cancel(&self, a: &Arrival) -> Result<u32, SyncError> {
        match self.break_gen(a.gen) {
            Some(r) => r.map(|()| a.index),
            None => Err(SyncError::Broken),
        }
    }

    /// Breaks generation `g` if it is current; returns its outcome if it already ended.
    fn break_gen(&self, g: u32) -> Option<Result<(), SyncError>> {
        let l = self.obj.get();
        let mut s = l.state.load(Ordering::Acquire);
        loop {
            if gen_of(s) != g {
                return outcome(s, g);
            }
            if s & BROKEN != 0 {
                return None;
            }
            match l
                .state
                .compare_exchange(s, s | BROKEN, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => break,
                Err(cur) => s = cur,
            }
        }
        l.wq.notify_all();
        None
    }

    #[cfg(test)]
    pub(crate) fn obj_waiters(&self) -> u32 {
        self.obj.get().wq.waiters()
    }

    /// Breaks the barrier: current and future waiters get `Broken` until [`Barrier::reset`].
    pub fn abort(&self) {
        let l = self.obj.get();
        l.state.fetch_or(BROKEN, Ordering::AcqRel);
        l.wq.notify_all();
    }

    /// Returns the barrier to its empty state; current waiters get `Broken`.
    pub fn reset(&self) {
        let l = self.obj.get();
        let mut s = l.state.load(Ordering::Acquire);
        loop {
            if count_of(s) == 0 && s & BROKEN == 0 {
                return;
            }
            match l
                .state
                .compare_exchange(s, advance(s, true), Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => break,
                Err(cur) => s = cur,
            }
        }
        l.wq.notify_all();
    }
}

// The shared layouts of this file, fixed: a change here changes what other processes (and
// other versions) read, so it must come with a layout version bump. (Loom's atomics differ.)
#[cfg(not(loom))]
const _: () = assert!(std::mem::size_of::<BarrierLayout>() == 32);

#[cfg(test)]
mod tests {
    use super::super::test_util::{finish, pool, until};
    use super::*;
    use std::sync::Arc;

    const LONG: Option<Duration> = Some(Duration::from_secs(30));

    #[test]
    fn layout_and_state_encoding() {
        assert_eq!(std::mem::size_of::<BarrierLayout>(), 32);
        let s0 = 0u64;
        let s1 = advance(s0 + 3, true);
        assert_eq!((gen_of(s1), count_of(s1)), (1, 0));
        assert_eq!(outcome(s1, 0), Some(Err(SyncError::Broken)));
        let s2 = advance(s1, false);
        assert_eq!(outcome(s2, 0), Some(Err(SyncError::Broken)));
        assert_eq!(outcome(s2, 1), Some(Ok(())));
        assert_eq!(outcome(s2, 2), None);
        assert_eq!(outcome(s2 | BROKEN, 2), Some(Err(SyncError::Broken)));
        let mut s = (u64::from(GEN_MASK) << GEN_SHIFT) | 5;
        s = advance(s, false);
        assert_eq!(gen_of(s), 0);
        assert_eq!(outcome(s, GEN_MASK), Some(Ok(())));
    }

    #[test]
    fn indices_distinct_over_generations() {
        let (rt, p) = pool();
        let b = Arc::new(Barrier::create(&p, 4).unwrap());
        let ts: Vec<_> = (0..4)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || {
                    (0..50).map(|_| b.wait(LONG).unwrap()).collect::<Vec<_>>()
                })
            })
            .collect();
        let all: Vec<Vec<u32>> = ts.into_iter().map(|t| t.join().unwrap()).collect();
        for round in 0..50 {
            let mut idx: Vec<u32> = all.iter().map(|v| v[round]).collect();
            idx.sort_unstable();
            assert_eq!(idx, vec![0, 1, 2, 3], "round {round}");
        }
        assert_eq!(b.n_waiting(), 0);
        assert!(!b.broken());
        drop(b);
        finish(rt, p);
    }

    #[test]
    fn abort_wakes_waiters_with_broken_and_reset_restores() {
        let (rt, p) = pool();
        let b = Arc::new(Barrier::create(&p, 3).unwrap());
        let spawn = |b: &Arc<Barrier>| {
            let b = b.clone();
            std::thread::spawn(move || b.wait(LONG))
        };
        let ts = vec![spawn(&b), spawn(&b)];
        until(|| b.n_waiting() == 2 && b.obj.get().wq.waiters() == 2);
        b.abort();
        for t in ts {
            assert_eq!(t.join().unwrap(), Err(SyncError::Broken));
        }
        assert!(b.broken());
        assert_eq!(b.wait(LONG), Err(SyncError::Broken));
        b.reset();
        assert!(!b.broken());
        // Reset with waiters: they get Broken, the barrier then works again.
        let ts = vec![spawn(&b), spawn(&b)];
        until(|| b.n_waiting() == 2 && b.obj.get().wq.waiters() == 2);
        b.reset();
        for t in ts {
            assert_eq!(t.join().unwrap(), Err(SyncError::Broken));
        }
        assert!(!b.broken());
        let ts = vec![spawn(&b), spawn(&b)];
        let mine = b.wait(LONG).unwrap();
        let mut idx: Vec<u32> = ts.into_iter().map(|t| t.join().unwrap().unwrap()).collect();
        idx.push(mine);
        idx.sort_unstable();
        assert_eq!(idx, vec![0, 1, 2]);
        drop(b);
        finish(rt, p);
    }

    #[test]
    fn timeout_breaks_the_barrier_for_everyone() {
        let (rt, p) = pool();
        let b = Arc::new(Barrier::create(&p, 3).unwrap());
        let b2 = b.clone();
        let other = std::thread::spawn(move || b2.wait(LONG));
        until(|| b.n_waiting() == 1);
        assert_eq!(
            b.wait(Some(Duration::from_millis(20))),
            Err(SyncError::Broken)
        );
        assert!(b.broken());
        assert_eq!(other.join().unwrap(), Err(SyncError::Broken));
        assert_eq!(b.wait(Some(Duration::ZERO)), Err(SyncError::Broken));
        drop(b);
        finish(rt, p);
    }

    #[test]
    fn action_runs_once_before_release_and_failure_breaks() {
        let (rt, p) = pool();
        let b = Arc::new(Barrier::create(&p, 2).unwrap());
        let ran = Arc::new(AtomicU32::new(0));
        let spawn = |b: &Arc<Barrier>, ran: &Arc<AtomicU32>, ok: bool| {
            let (b, ran) = (b.clone(), ran.clone());
            std::thread::spawn(move || {
                let mut act = || {
                    ran.fetch_add(1, Ordering::SeqCst);
                    ok
                };
                let r = b.wait_with(&WaitOpts::timeout(LONG), Some(&mut act));
                (r, ran.load(Ordering::SeqCst))
            })
        };
        let (t1, t2) = (spawn(&b, &ran, true), spawn(&b, &ran, true));
        for t in [t1, t2] {
            let (r, seen) = t.join().unwrap();
            assert!(r.is_ok());
            assert_eq!(seen, 1, "released only after the action ran");
        }
        let (t1, t2) = (spawn(&b, &ran, false), spawn(&b, &ran, false));
        assert_eq!(t1.join().unwrap().0, Err(SyncError::Broken));
        assert_eq!(t2.join().unwrap().0, Err(SyncError::Broken));
        assert_eq!(ran.load(Ordering::SeqCst), 2);
        assert_eq!(Barrier::create(&p, 0).unwrap_err(), SyncError::Overflow);
        drop(b);
        finish(rt, p);
    }
}
