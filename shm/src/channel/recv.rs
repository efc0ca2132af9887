//! Receiving, and the wait loop both directions share (`attempt`). A receive reserves the
//! next committed slot (`reserve_recv`, which sees `Closed` only once the ring is empty),
//! skips holes left by failed block hand-overs (`next`), then reads the slot and claims a
//! block payload's hold (`take`) before giving the slot back (`finish_recv`), which wakes
//! one sender. [`Channel::drain`] empties a closing channel.

use std::cell::Cell;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::recover::{End, Unstuck};
use super::{Channel, ChannelError, Message, KIND_BLOCK, KIND_HOLE, KIND_INLINE};
use crate::heap::{Block, BlockRef};
use crate::ring::Ticket;
use crate::waitqueue::{WaitOpts, WaitQueue};

/// How a send or receive goes about it.
#[derive(Debug, Clone, Copy)]
pub(super) enum Mode<'a> {
    /// One try, the first of a blocking call (whose wait looks for a stuck ring if need be).
    Fast,
    /// One try for `try_send` / `try_recv`, which also looks whether the ring is stuck.
    Try,
    /// Until done, or as the options say.
    Wait(&'a WaitOpts),
}

/// What one try at reserving found.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Step {
    /// A reservation, or the error that ends the operation.
    Got(Result<Ticket, ChannelError>),
    /// Nothing now (full / empty): wait for a wake.
    Nothing,
    /// The ring is stuck at a position another party reserved (or every intent entry is
    /// held), seen so for this long: look again soon, woken or not.
    Stuck(Duration),
    /// A stuck position was just published: try again at once.
    Again,
}

impl Channel {
    fn reserve_recv(&self, opts: Mode<'_>) -> Result<Ticket, ChannelError> {
        let h = self.hdr();
        let try_once = |look: bool| -> Step {
            if let Some(s) = self.announce_and_reserve(End::Recv) {
                return s;
            }
            // SYNC POINT: `closed` is read after the ring came up empty, so a message
            // committed before `close` is always received first.
            let closed = h.closed.load(Ordering::Acquire) != 0;
            if closed {
                if let Some(s) = self.announce_and_reserve(End::Recv) {
                    return s;
                }
            }
            if !look && !closed {
                return Step::Nothing;
            }
            // A closed channel still delivers what a live sender is committing (for a while);
            // an open one also frees a dead receiver's slot for the senders.
            match self.look_stuck(End::Recv, !closed) {
                Some(Unstuck::Published) => Step::Again,
                Some(Unstuck::Waiting(age)) if !(closed && Unstuck::past_patience(age)) => {
                    Step::Stuck(age)
                }
                _ if closed => Step::Got(Err(ChannelError::Closed)),
                _ => Step::Nothing,
            }
        };
        self.attempt(&h.recv_wq, opts, ChannelError::Empty, try_once)
    }

    /// Announces a reservation at `end` and makes it, when the slot there looks ready now:
    /// `Got` with the ticket, `Stuck` when every intent entry is held (try later), `None`
    /// when there is nothing to reserve now (the announcement withdrawn).
    #[inline]
    pub(super) fn announce_and_reserve(&self, end: End) -> Option<Step> {
        let ring = self.ring();
        let ready = match end {
            End::Recv => ring.ready_to_recv(),
            End::Send => ring.ready_to_send(),
        };
        if !ready {
            return None;
        }
        let Some(i) = self.claim(end) else {
            return Some(Step::Stuck(Duration::ZERO));
        };
        let r = match end {
            End::Recv => ring.reserve_recv(),
            End::Send => ring.reserve_send(),
        };
        match r {
            Ok(t) => Some(Step::Got(Ok(Ticket { intent: i, ..t }))),
            Err(_) => {
                self.intents().release(i);
                None
            }
        }
    }

    /// One try (`Mode::Fast`, `Mode::Try`: `none` when it finds nothing), else waits on `wq`
    /// until `try_once` yields, the deadline passes, or `wake_all` ends the wait with
    /// `PeerLost`. While the ring is stuck (`Step::Stuck`) each sleep is a nap (2 ms at
    /// first, longer while it stays stuck), so that a position a dead process left is looked
    /// at again even when no one wakes this waiter.
    pub(super) fn attempt(
        &self,
        wq: &WaitQueue,
        opts: Mode<'_>,
        none: ChannelError,
        try_once: impl Fn(bool) -> Step,
    ) -> Result<Ticket, ChannelError> {
        // `look`: also look whether the ring is stuck (reads the other end's cursor line: not
        // while spinning, only before sleeping, after a wake, and in a non-blocking try).
        let once = |look: bool| loop {
            match try_once(look) {
                Step::Again => continue,
                s => return s,
            }
        };
        let o = match opts {
            Mode::Wait(o) => o,
            Mode::Fast | Mode::Try => {
                return match once(matches!(opts, Mode::Try)) {
                    Step::Got(r) => r,
                    _ => Err(none),
                }
            }
        };
        let epoch = self.hdr().wake_epoch.load(Ordering::Acquire);
        let stuck: Cell<Option<Duration>> = Cell::new(None);
        wq.wait_until_phased(
            |look| match once(look) {
                Step::Got(r) => Some(r),
                s => {
                    if look {
                        stuck.set(match s {
                            Step::Stuck(age) => Some(age),
                            _ => None,
                        });
                    }
                    (self.hdr().wake_epoch.load(Ordering::Acquire) != epoch)
                        .then_some(Err(ChannelError::PeerLost))
                }
            },
            || stuck.get().map(Unstuck::nap),
            o,
        )?
    }

    /// Reads the slot of `t`, hands its payload to `f`, frees the slot. Block payloads are
    /// claimed first, so `f` sees either inline bytes or the block.
    fn take<R>(
        &self,
        t: Ticket,
        f: impl FnOnce(Result<&[u8], Block>) -> R,
    ) -> Result<R, ChannelError> {
        crate::fault::point("channel.recv.reserved");
        let (sh, payload) = self.slot(t);
        let kind = sh.kind.load(Ordering::Relaxed);
        let len = sh.len.load(Ordering::Relaxed) as usize;
        match kind {
            KIND_INLINE if len <= self.slot_size => {
                // SAFETY: the ticket gives this process exclusive use of the committed slot
                // until commit_recv; len <= slot_size (checked).
                let bytes = unsafe { std::slice::from_raw_parts(payload, len) };
                // The slot is given back after `f`, even when `f` panics (a slot and an
                // announcement held by a live process would stop every later receive).
                let _done = Finish { ch: self, t };
                Ok(f(Ok(bytes)))
            }
            KIND_BLOCK if len == std::mem::size_of::<BlockRef>() => {
                let mut r: BlockRef = bytemuck::Zeroable::zeroed();
                // SAFETY: exclusive slot; 32 bytes inside the payload area.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        payload,
                        bytemuck::bytes_of_mut(&mut r).as_mut_ptr(),
                        len,
                    )
                };
                let claimed = self.pool().and_then(|p| {
                    // SAFETY: the slot handed this in-flight hold to us (its sender gave
                    // it up when it committed the slot). Any other handle of this process
                    // on the block came from an `unsafe` function whose contract covers
                    // this one, or is read-only and so was never put in flight.
                    unsafe { p.claim_transit(r) }.map_err(Into::into)
                });
                self.finish_recv(t);
                claimed.map(|b| f(Err(b)))
            }
            KIND_HOLE => {
                // A hole carries nothing (only `drain` gets here; `next` skips holes).
                self.finish_recv(t);
                Err(ChannelError::Empty)
            }
            _ => {
                self.finish_recv(t);
                Err(ChannelError::Corrupt)
            }
        }
    }

    fn finish_recv(&self, t: Ticket) {
        self.ring().commit_recv(t);
        self.withdraw(&t);
        self.hdr().send_wq.notify_one();
    }

    /// Reserves the next real message, skipping holes left by failed block hand-overs.
    fn next(&self, opts: Mode<'_>) -> Result<Ticket, ChannelError> {
        loop {
            let t = self.reserve_recv(opts)?;
            if self.slot(t).0.kind.load(Ordering::Relaxed) != KIND_HOLE {
                return Ok(t);
            }
            self.finish_recv(t);
        }
    }

    fn recv_inner(&self, opts: Mode<'_>) -> Result<Message, ChannelError> {
        let t = self.next(opts)?;
        self.take(t, |p| match p {
            Ok(bytes) => Message::Inline(bytes.to_vec()),
            Err(b) => Message::Block(b),
        })
    }

    /// Receives the next message, waiting at most `timeout` (`None`: forever).
    pub fn recv(&self, timeout: Option<Duration>) -> Result<Message, ChannelError> {
        match self.recv_inner(Mode::Fast) {
            Err(ChannelError::Empty) => self.recv_inner(Mode::Wait(&WaitOpts::timeout(timeout))),
            r => r,
        }
    }

    /// [`recv`](Self::recv) with full wait options.
    pub fn recv_opts(&self, opts: &WaitOpts) -> Result<Message, ChannelError> {
        self.recv_inner(Mode::Wait(opts))
    }

    /// Receives without waiting: `Empty` when nothing is there.
    pub fn try_recv(&self) -> Result<Message, ChannelError> {
        self.recv_inner(Mode::Try)
    }

    /// Receives the next message and passes its bytes to `f` in place (no copy for inline
    /// messages: `f` reads the slot; keep it short, the slot is held meanwhile).
    pub fn recv_with<R>(
        &self,
        timeout: Option<Duration>,
        f: impl FnOnce(&[u8]) -> R,
    ) -> Result<R, ChannelError> {
        let t = match self.next(Mode::Fast) {
            Err(ChannelError::Empty) => self.next(Mode::Wait(&WaitOpts::timeout(timeout)))?,
            r => r?,
        };
        self.take(t, |p| match p {
            Ok(bytes) => f(bytes),
            Err(b) => f(b.as_slice()),
        })
    }

    /// Closes the channel and releases every message still in it (block holds included).
    /// Returns how many messages were dropped.
    pub fn drain(&self) -> usize {
        self.close();
        let mut n = 0;
        loop {
            // Announced as any receive (another process may be recovering positions).
            match self.announce_and_reserve(End::Recv) {
                Some(Step::Got(Ok(t))) => {
                    let _ = self.take(t, |p| drop(p));
                    n += 1;
                }
                Some(Step::Stuck(_)) => std::thread::yield_now(), // no intent entry free
                _ => break,
            }
        }
        n
    }
}

/// Gives a received inline slot back when dropped (after the reader, or in its unwind).
struct Finish<'a> {
    ch: &'a Channel,
    t: Ticket,
}

impl Drop for Finish<'_> {
    fn drop(&mut self) {
        self.ch.finish_recv(self.t);
    }
}
