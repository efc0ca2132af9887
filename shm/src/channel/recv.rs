//! Receiving, and the wait loop both directions share (`attempt`). A receive reserves the
//! next committed slot (`reserve_recv`, which sees `Closed` only once the ring is empty),
//! skips holes left by failed block hand-overs (`next`), then reads the slot and claims a
//! block payload's hold (`take`) before giving the slot back (`finish_recv`), which wakes
//! one sender. [`Channel::drain`] empties a closing channel.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{Channel, ChannelError, Message, KIND_BLOCK, KIND_HOLE, KIND_INLINE};
use crate::heap::{Block, BlockRef};
use crate::ring::{RingError, Ticket};
use crate::waitqueue::{WaitOpts, WaitQueue};

impl Channel {
    fn reserve_recv(&self, opts: Option<&WaitOpts>) -> Result<Ticket, ChannelError> {
        let ring = self.ring();
        let h = self.hdr();
        let try_once = || -> Option<Result<Ticket, ChannelError>> {
            match ring.reserve_recv() {
                Ok(t) => Some(Ok(t)),
                Err(RingError::Empty) | Err(RingError::Full) => {
                    // SYNC POINT: `closed` is read after the ring came up empty, so a
                    // message committed before `close` is always received first.
                    if h.closed.load(Ordering::Acquire) != 0 {
                        match ring.reserve_recv() {
                            Ok(t) => Some(Ok(t)),
                            Err(_) => Some(Err(ChannelError::Closed)),
                        }
                    } else {
                        None
                    }
                }
            }
        };
        self.attempt(&h.recv_wq, opts, ChannelError::Empty, try_once)
    }

    /// One try without `opts` (`none` when it finds nothing), else waits on `wq` until
    /// `try_once` yields, the deadline passes, or `wake_all` ends the wait with `PeerLost`.
    pub(super) fn attempt(
        &self,
        wq: &WaitQueue,
        opts: Option<&WaitOpts>,
        none: ChannelError,
        try_once: impl Fn() -> Option<Result<Ticket, ChannelError>>,
    ) -> Result<Ticket, ChannelError> {
        let Some(o) = opts else {
            return try_once().unwrap_or(Err(none));
        };
        let epoch = self.hdr().wake_epoch.load(Ordering::Acquire);
        wq.wait_until(
            || {
                try_once().or_else(|| {
                    (self.hdr().wake_epoch.load(Ordering::Acquire) != epoch)
                        .then_some(Err(ChannelError::PeerLost))
                })
            },
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
        let (sh, payload) = self.slot(t);
        let kind = sh.kind.load(Ordering::Relaxed);
        let len = sh.len.load(Ordering::Relaxed) as usize;
        match kind {
            KIND_INLINE if len <= self.slot_size => {
                // SAFETY: the ticket gives this process exclusive use of the committed slot
                // until commit_recv; len <= slot_size (checked).
                let bytes = unsafe { std::slice::from_raw_parts(payload, len) };
                let r = f(Ok(bytes));
                self.finish_recv(t);
                Ok(r)
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
        self.hdr().send_wq.notify_one();
    }

    /// Reserves the next real message, skipping holes left by failed block hand-overs.
    fn next(&self, opts: Option<&WaitOpts>) -> Result<Ticket, ChannelError> {
        loop {
            let t = self.reserve_recv(opts)?;
            if self.slot(t).0.kind.load(Ordering::Relaxed) != KIND_HOLE {
                return Ok(t);
            }
            self.finish_recv(t);
        }
    }

    fn recv_inner(&self, opts: Option<&WaitOpts>) -> Result<Message, ChannelError> {
        let t = self.next(opts)?;
        self.take(t, |p| match p {
            Ok(bytes) => Message::Inline(bytes.to_vec()),
            Err(b) => Message::Block(b),
        })
    }

    /// Receives the next message, waiting at most `timeout` (`None`: forever).
    pub fn recv(&self, timeout: Option<Duration>) -> Result<Message, ChannelError> {
        match self.recv_inner(None) {
            Err(ChannelError::Empty) => self.recv_inner(Some(&WaitOpts::timeout(timeout))),
            r => r,
        }
    }

    /// [`recv`](Self::recv) with full wait options.
    pub fn recv_opts(&self, opts: &WaitOpts) -> Result<Message, ChannelError> {
        self.recv_inner(Some(opts))
    }

    /// Receives without waiting: `Empty` when nothing is there.
    pub fn try_recv(&self) -> Result<Message, ChannelError> {
        self.recv_inner(None)
    }

    /// Receives the next message and passes its bytes to `f` in place (no copy for inline
    /// messages: `f` reads the slot; keep it short, the slot is held meanwhile).
    pub fn recv_with<R>(
        &self,
        timeout: Option<Duration>,
        f: impl FnOnce(&[u8]) -> R,
    ) -> Result<R, ChannelError> {
        let t = match self.next(None) {
            Err(ChannelError::Empty) => self.next(Some(&WaitOpts::timeout(timeout)))?,
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
        while let Ok(t) = self.ring().reserve_recv() {
            let _ = self.take(t, |p| drop(p));
            n += 1;
        }
        n
    }
}
