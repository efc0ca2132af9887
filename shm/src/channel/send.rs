//! Sending. A payload that fits a slot is copied into it (`send_inline`); a larger one is
//! copied once into a block of the channel's pool, and a [`Block`] travels by handing its
//! hold to transit and writing its [`BlockRef`] in the slot (`send_block_inner`, `write_ref`).
//! Each send reserves a slot (`reserve_send`, waiting through `attempt` in `recv.rs`) and
//! commits it (`commit_send`), which wakes one receiver.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::recover::{End, Unstuck};
use super::recv::{Mode, Step};
use super::{Channel, ChannelError, SendError, KIND_BLOCK, KIND_HOLE, KIND_INLINE};
use crate::heap::{Block, BlockRef};
use crate::ring::Ticket;
use crate::waitqueue::WaitOpts;

impl Channel {
    fn reserve_send(&self, opts: Mode<'_>) -> Result<Ticket, ChannelError> {
        let h = self.hdr();
        let try_once = |look: bool| -> Step {
            if h.closed.load(Ordering::Acquire) != 0 {
                return Step::Got(Err(ChannelError::Closed));
            }
            if let Some(s) = self.announce_and_reserve(End::Send) {
                return s;
            }
            if !look {
                return Step::Nothing;
            }
            // A receiver that died holding a slot: free it and look again (and a dead
            // sender's position, for receivers that may sleep with no one to wake them).
            match self.look_stuck(End::Send, true) {
                Some(Unstuck::Published) => Step::Again,
                Some(Unstuck::Waiting(age)) => Step::Stuck(age),
                None => Step::Nothing,
            }
        };
        self.attempt(&h.send_wq, opts, ChannelError::Full, try_once)
    }

    fn commit_send(&self, t: Ticket, kind: u32, len: u32) {
        let (sh, _) = self.slot(t);
        sh.kind.store(kind, Ordering::Relaxed);
        sh.len.store(len, Ordering::Relaxed);
        self.ring().commit_send(t);
        self.withdraw(&t);
        self.hdr().recv_wq.notify_one();
    }

    fn send_inline(&self, data: &[u8], opts: Mode<'_>) -> Result<(), ChannelError> {
        let t = self.reserve_send(opts)?;
        crate::fault::point("channel.send.reserved");
        let (_, payload) = self.slot(t);
        // SAFETY: the ticket gives this process exclusive use of the slot's payload until
        // commit; data.len() <= slot_size, the payload area's size.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), payload, data.len()) };
        self.commit_send(t, KIND_INLINE, data.len() as u32);
        Ok(())
    }

    fn write_ref(&self, t: Ticket, r: BlockRef) {
        let (_, payload) = self.slot(t);
        let bytes = bytemuck::bytes_of(&r);
        // SAFETY: exclusive slot (ticket); a BlockRef (32 B) fits MIN_SLOT_SIZE.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), payload, bytes.len()) };
        self.commit_send(t, KIND_BLOCK, bytes.len() as u32);
    }

    /// Sends a copy of `data`, waiting at most `timeout` for room (`None`: forever). Payloads
    /// larger than a slot are copied once into a pool block that the receiver then owns.
    pub fn send(&self, data: &[u8], timeout: Option<Duration>) -> Result<(), ChannelError> {
        // Fast path without reading the clock: a free slot needs no deadline.
        if data.len() <= self.slot_size {
            match self.send_inline(data, Mode::Fast) {
                Err(ChannelError::Full) => {}
                r => return r,
            }
        }
        self.send_opts(data, &WaitOpts::timeout(timeout))
    }

    /// [`send`](Self::send) with full wait options (interruptible waits, spin budget).
    pub fn send_opts(&self, data: &[u8], opts: &WaitOpts) -> Result<(), ChannelError> {
        if data.len() <= self.slot_size {
            return self.send_inline(data, Mode::Wait(opts));
        }
        let pool = self.pool()?;
        let remaining = opts
            .deadline
            .map(|d| d.saturating_duration_since(std::time::Instant::now()));
        let mut b = pool.alloc_timeout(data.len(), remaining)?;
        b.as_mut_slice().copy_from_slice(data);
        self.send_block_opts(b, opts).map_err(|e| e.error)
    }

    /// Sends without waiting: `Full` when no slot is free.
    pub fn try_send(&self, data: &[u8]) -> Result<(), ChannelError> {
        if data.len() <= self.slot_size {
            return self.send_inline(data, Mode::Try);
        }
        if self.ring().len() >= self.cap {
            return Err(ChannelError::Full);
        }
        let pool = self.pool()?;
        let mut b = pool.alloc(data.len())?;
        b.as_mut_slice().copy_from_slice(data);
        self.send_block_inner(b, Mode::Try).map_err(|e| e.error)
    }

    /// Moves a block to the receiver without copying its bytes. On failure the block comes
    /// back in the error.
    pub fn send_block(&self, b: Block, timeout: Option<Duration>) -> Result<(), SendError<Block>> {
        // Fast path without reading the clock.
        match self.send_block_inner(b, Mode::Fast) {
            Err(SendError {
                error: ChannelError::Full,
                value,
            }) => self.send_block_opts(value, &WaitOpts::timeout(timeout)),
            r => r,
        }
    }

    /// [`send_block`](Self::send_block) with full wait options.
    pub fn send_block_opts(&self, b: Block, opts: &WaitOpts) -> Result<(), SendError<Block>> {
        self.send_block_inner(b, Mode::Wait(opts))
    }

    fn send_block_inner(&self, b: Block, opts: Mode<'_>) -> Result<(), SendError<Block>> {
        if b.pool().id() != self.pool_id {
            return Err(SendError {
                error: ChannelError::TooLarge,
                value: b,
            });
        }
        // Reserve first, then hand the hold over: a failed hand-over leaves a reserved slot,
        // which is committed as a hole that receivers skip, and the block comes back.
        let t = match self.reserve_send(opts) {
            Ok(t) => t,
            Err(error) => return Err(SendError { error, value: b }),
        };
        crate::fault::point("channel.send.reserved");
        match b.try_into_transit() {
            Ok(r) => {
                self.write_ref(t, r);
                Ok(())
            }
            Err((e, value)) => {
                self.commit_send(t, KIND_HOLE, 0);
                Err(SendError {
                    error: e.into(),
                    value,
                })
            }
        }
    }
}
