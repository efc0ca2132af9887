//! Parties that die mid-operation. Every send and receive claims an entry of the channel's
//! intent table, announces the cursor it is about to reserve from, and withdraws after its
//! commit (`claim`, `withdraw`). A send or receive that finds the ring stuck at a position a
//! cursor has passed (`Ring::stuck_recv`, `Ring::stuck_send`) for [`STUCK_GRACE`] asks the
//! table whether a live process may hold it (`unstick`); when none may, it publishes the
//! position under the channel's recovery lock: a dead sender's as a hole (receivers skip
//! it), a dead receiver's slot as free. The protocol and its argument are in
//! [`crate::ring`] ("Parties that die mid-operation").

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::{Channel, INTENTS, KIND_HOLE};
use crate::platform::{liveness, Liveness, ProcessId};
use crate::ring::{Intents, Ticket};

/// How long a position must stay stuck, as one handle sees it, before that handle asks the
/// intent table (which reads `/proc` for the processes it names). A live party's window
/// between reserving and committing is a copy of one slot: far shorter.
pub const STUCK_GRACE: Duration = Duration::from_millis(2);

/// Longest sleep of a waiter while the ring stays stuck at a position a live (stopped,
/// traced, preempted) process holds: the look after each costs a read of `/proc`.
const NAP_MAX: Duration = Duration::from_millis(100);

/// How long a receiver of a closed channel waits for a position that may still be
/// committed (a live sender reserved it before the close, or `/proc` cannot tell whether
/// its holder lives) before it gets `Closed` anyway.
const CLOSED_PATIENCE: Duration = Duration::from_secs(1);

/// Which end a stuck position blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum End {
    /// Receivers: a sender reserved the position and has not committed.
    Recv = 0,
    /// Senders: a receiver reserved the position and has not committed.
    Send = 1,
}

/// The stuck position a handle last saw at one end, and since when (atomics: handles are
/// shared by threads, and a `fork` may happen at any time; a race between two threads of
/// one handle only restarts the grace).
#[derive(Debug)]
pub(super) struct Seen {
    pos: AtomicU64,
    since_ns: AtomicU64,
}

impl Default for Seen {
    fn default() -> Self {
        Seen {
            pos: AtomicU64::new(u64::MAX),
            since_ns: AtomicU64::new(0),
        }
    }
}

/// Nanoseconds on a clock private to this process (for [`Seen`]).
fn now_ns() -> u64 {
    static ZERO: OnceLock<Instant> = OnceLock::new();
    ZERO.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// What a look at a stuck ring did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Unstuck {
    /// The position was published: try again now.
    Published,
    /// It stays (its holder may live, or the grace is not over); seen stuck this long.
    Waiting(Duration),
}

impl Unstuck {
    /// How long a waiter sleeps at most before it looks again: the grace at first, then
    /// longer while the position stays held (up to [`NAP_MAX`]).
    pub(super) fn nap(age: Duration) -> Duration {
        (age / 8).clamp(STUCK_GRACE, NAP_MAX)
    }

    /// Whether a closed channel's receiver has waited long enough for this position.
    pub(super) fn past_patience(age: Duration) -> bool {
        age >= CLOSED_PATIENCE
    }
}

/// Whether the process a packed `ProcessId` names still runs (a recorded start time of 0:
/// `/proc` could not tell it at the time, so only the pid is compared). `/proc` failing
/// now counts as alive: nothing is taken from a process on a guess.
fn holder_alive(packed: u64) -> bool {
    let id = ProcessId::from_packed(packed);
    match liveness(id.pid) {
        Liveness::Alive(s) => id.start == 0 || (s & 0xffff_ffff) == id.start,
        Liveness::Dead => false,
        Liveness::Unknown => true,
    }
}

/// This thread's first entry to try: the first entry of a 64-byte line (4 entries) picked
/// from the pid and the thread's number, so that parties of different processes and threads
/// start on different lines. (A forked child keeps its parent thread's hint: it only starts
/// on the same line, and moves on when the entry is taken.)
#[inline]
fn hint() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static HINT: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    HINT.with(|h| {
        if h.get() == usize::MAX {
            let n = NEXT.fetch_add(1, Ordering::Relaxed) + std::process::id() as usize * 7;
            h.set(n % (INTENTS / 4) * 4);
        }
        h.get()
    })
}

impl Channel {
    #[inline]
    pub(super) fn intents(&self) -> Intents<'_> {
        // SAFETY: as for `Channel::ring`.
        unsafe { super::region::intents_at(self.base) }
    }

    /// Claims an intent entry and announces a reservation at `end`'s cursor. `None` when
    /// every entry is held by a live process (64 parties mid-operation at once): the caller
    /// reserves nothing and tries again.
    #[inline]
    pub(super) fn claim(&self, end: End) -> Option<usize> {
        let me = ProcessId::current().packed();
        let i = self.intents().claim(me, hint(), holder_alive)?;
        let ring = self.ring();
        let (cursor, recv) = match end {
            End::Recv => (ring.head_cursor(), true),
            End::Send => (ring.tail_cursor(), false),
        };
        self.intents().announce(i, cursor, recv);
        Some(i)
    }

    /// Withdraws the announcement of a reservation that failed or was committed.
    #[inline]
    pub(super) fn withdraw(&self, t: &Ticket) {
        if t.intent != usize::MAX {
            self.intents().release(t.intent);
        }
    }

    /// Looks whether the ring is stuck at `own` end (and with `both`, at the other end too:
    /// a waiter there may sleep with no one to wake it) and publishes what a dead process
    /// left there. `None`: not stuck.
    pub(super) fn look_stuck(&self, own: End, both: bool) -> Option<Unstuck> {
        let ring = self.ring();
        let other = match own {
            End::Recv => End::Send,
            End::Send => End::Recv,
        };
        let mut waiting: Option<Duration> = None;
        // The other end only while someone sleeps there (a stale count left by a killed
        // sleeper only makes this look happen more often).
        let sleepers = match other {
            End::Recv => self.hdr().recv_wq.waiters(),
            End::Send => self.hdr().send_wq.waiters(),
        };
        let ends = if both && sleepers > 0 { 2 } else { 1 };
        for end in [own, other].into_iter().take(ends) {
            let q = match end {
                End::Recv => ring.stuck_recv(),
                End::Send => ring.stuck_send(),
            };
            match q.map(|q| self.unstick(end, q)) {
                Some(Unstuck::Published) => return Some(Unstuck::Published),
                Some(Unstuck::Waiting(age)) => waiting = Some(waiting.map_or(age, |w| w.max(age))),
                None => {}
            }
        }
        waiting.map(Unstuck::Waiting)
    }

    /// Called when the ring is stuck at `pos` for `end`: publishes the position when its
    /// holder is dead. The first sighting of a position only notes it; after
    /// [`STUCK_GRACE`] the intent table is asked.
    pub(super) fn unstick(&self, end: End, pos: u64) -> Unstuck {
        let seen = &self.stuck[end as usize];
        let now = now_ns();
        if seen.pos.load(Ordering::Relaxed) != pos {
            seen.since_ns.store(now, Ordering::Relaxed);
            seen.pos.store(pos, Ordering::Relaxed);
            return Unstuck::Waiting(Duration::ZERO);
        }
        let age = Duration::from_nanos(now.saturating_sub(seen.since_ns.load(Ordering::Relaxed)));
        if age < STUCK_GRACE {
            return Unstuck::Waiting(age);
        }
        let waiting = Unstuck::Waiting(age);
        let recv = end == End::Send; // a stuck send waits for a receiver's commit
        if self.intents().may_hold(pos, recv, holder_alive) {
            return waiting;
        }
        let Some(_lock) = self.recovery_lock() else {
            return waiting;
        };
        let ring = self.ring();
        let done = match end {
            End::Recv => ring.publish_abandoned(pos, |slot| {
                let (sh, _) = self.slot(Ticket {
                    pos,
                    slot,
                    intent: usize::MAX,
                });
                sh.kind.store(KIND_HOLE, Ordering::Relaxed);
                sh.len.store(0, Ordering::Relaxed);
            }),
            End::Send => ring.free_abandoned(pos),
        };
        if done {
            tracing::warn!(
                position = pos,
                "dragon-shm channel: a {} died between reserving a position and committing it; {}",
                if recv { "receiver" } else { "sender" },
                if recv {
                    "its slot is free again (its message went with it)"
                } else {
                    "receivers skip the position"
                },
            );
            match end {
                End::Recv => self.hdr().recv_wq.notify_all(),
                End::Send => self.hdr().send_wq.notify_all(),
            }
            return Unstuck::Published;
        }
        waiting
    }

    /// The channel's recovery lock, taken from a dead holder if need be; `None` while a live
    /// process holds it.
    fn recovery_lock(&self) -> Option<RecoveryLock<'_>> {
        let me = ProcessId::current().packed();
        let word = &self.hdr().recovering;
        let mut held = word.load(Ordering::Acquire);
        loop {
            if held != 0 && holder_alive(held) {
                return None;
            }
            match word.compare_exchange(held, me, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some(RecoveryLock { ch: self }),
                Err(h) => held = h,
            }
        }
    }
}

/// The held recovery lock; released on drop.
struct RecoveryLock<'a> {
    ch: &'a Channel,
}

impl Drop for RecoveryLock<'_> {
    fn drop(&mut self) {
        self.ch.hdr().recovering.store(0, Ordering::Release);
    }
}
