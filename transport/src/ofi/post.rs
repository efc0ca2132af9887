//! Posting to the endpoint, under the state lock: receive slots, frames (inject, send or the
//! backlog when the provider says `FI_EAGAIN`), control frames, and retrying the backlog.

use std::ffi::c_void;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::peer::Peer;
use super::state::{Inner, Post, State};
use super::{frame_header, sys, FRAME_HDR, INJECT_MAX, RX_SLOTS, SLOT};
use crate::common::lock;
use crate::{Result, TransportError};

impl Inner {
    /// Posts receive slot `slot` to the endpoint; the provider's return code.
    ///
    /// # Safety
    /// The slot must be ours (its previous completion read, or never posted). Its bytes and
    /// its context then stay valid until its completion or the endpoint's closing (teardown
    /// closes the endpoint before the slabs are freed).
    pub(super) unsafe fn raw_post_recv(&self, slot: usize) -> isize {
        // SAFETY: the caller owns the slot (above); the slab, descriptor and context are the
        // endpoint's own, alive as long as it is.
        unsafe {
            self.ep.recv(
                self.rx_slab.at(slot * SLOT),
                SLOT,
                self.rx_desc as *mut c_void,
                self.ctx(slot),
            )
        }
    }

    pub(super) fn post_recv(&self, st: &mut State, slot: usize) {
        if st.dead {
            return;
        }
        // SAFETY: receive slot `slot` is ours (its previous completion was read, or it was
        // never posted).
        let r = unsafe { self.raw_post_recv(slot) };
        if r == -sys::FI_EAGAIN {
            st.backlog.push_back(Post::Recv { slot });
            self.backlogged.store(true, Ordering::SeqCst);
            self.wake_progress();
        } else if r != 0 {
            tracing::error!("ofi: fi_recv: {}", sys::strerror(r as i64));
        }
    }

    /// Tries to hand the frame `hdr + body` to the provider now. `Ok(false)`: not now.
    pub(super) fn try_post(
        &self,
        st: &mut State,
        p: &Arc<Peer>,
        hdr: &[u8],
        body: &[u8],
    ) -> Result<bool> {
        let n = hdr.len() + body.len();
        debug_assert!(n <= SLOT);
        if n <= self.ep.attrs.inject_size && n <= INJECT_MAX {
            let mut f = [0u8; INJECT_MAX];
            f[..hdr.len()].copy_from_slice(hdr);
            f[hdr.len()..n].copy_from_slice(body);
            return match self.ep.inject(&f[..n], p.fi_addr) {
                0 => Ok(true),
                r if r == -sys::FI_EAGAIN => Ok(false),
                _ => Err(TransportError::PeerLost),
            };
        }
        let Some(slot) = st.free_tx.pop() else {
            return Ok(false);
        };
        let dst = self.tx_slab.at(slot * SLOT);
        // SAFETY: send slot `slot` was free (not posted), so nothing else reads or writes
        // it; n <= SLOT.
        unsafe {
            std::ptr::copy_nonoverlapping(hdr.as_ptr(), dst, hdr.len());
            std::ptr::copy_nonoverlapping(body.as_ptr(), dst.add(hdr.len()), body.len());
        }
        // SAFETY: the slot keeps these bytes unchanged until the send completes (it returns
        // to `free_tx` only in the completion handler, or here when the post fails, or at
        // teardown after the endpoint closed); its context slot is reserved for it.
        let r = unsafe {
            self.ep.send(
                dst,
                n,
                self.tx_desc as *mut c_void,
                p.fi_addr,
                self.ctx(RX_SLOTS + slot),
            )
        };
        if r == 0 {
            st.tx_peer[slot] = Some(p.clone());
            self.inflight.fetch_add(1, Ordering::AcqRel);
            return Ok(true);
        }
        st.free_tx.push(slot);
        if r == -sys::FI_EAGAIN {
            Ok(false)
        } else {
            Err(TransportError::PeerLost)
        }
    }

    /// Sends the frame `hdr + body` (at most [`SLOT`] bytes, token included) after everything
    /// posted before it.
    pub(super) fn post(
        &self,
        st: &mut State,
        p: &Arc<Peer>,
        hdr: [u8; FRAME_HDR],
        body: &[u8],
    ) -> Result<()> {
        self.post_as(st, p, hdr, body, true)
    }

    /// [`post`](Self::post), numbering the frame only when `numbered` (test frames that
    /// pose as another sender's must not use up a number of this one's).
    pub(super) fn post_as(
        &self,
        st: &mut State,
        p: &Arc<Peer>,
        mut hdr: [u8; FRAME_HDR],
        body: &[u8],
        numbered: bool,
    ) -> Result<()> {
        if st.dead {
            return Err(TransportError::Closed);
        }
        if numbered {
            // Numbered here, under the state lock, so numbers follow the order of posting.
            let seq = p.tx_seq.fetch_add(1, Ordering::Relaxed);
            hdr[8..16].copy_from_slice(&seq.to_le_bytes());
        }
        let hdr = &hdr[..];
        self.last_post
            .store(self.epoch.elapsed().as_micros() as u64, Ordering::Relaxed);
        if st.backlog.is_empty() && self.try_post(st, p, hdr, body)? {
            return Ok(());
        }
        let mut frame = Vec::with_capacity(hdr.len() + body.len());
        frame.extend_from_slice(hdr);
        frame.extend_from_slice(body);
        st.backlog.push_back(Post::Send {
            peer: p.clone(),
            frame,
        });
        self.backlogged.store(true, Ordering::SeqCst);
        self.wake_progress();
        Ok(())
    }

    /// Posts a control frame, losing the peer when that fails.
    pub(super) fn ctl(&self, p: &Arc<Peer>, k: u8, a: u64, b: u64, body: &[u8]) {
        let h = frame_header(p.tx_token, k, body.len(), a, b, 0);
        let r = {
            let mut st = lock(&self.st);
            self.post(&mut st, p, h, body)
        };
        if r == Err(TransportError::PeerLost) {
            self.lose(p);
        }
    }

    pub(super) fn drain_backlog(&self) {
        let mut lost = Vec::new();
        let mut st = lock(&self.st);
        while let Some(front) = st.backlog.pop_front() {
            if st.dead {
                st.backlog.clear();
                break;
            }
            match front {
                Post::Recv { slot } => {
                    // SAFETY: as in post_recv: the slot is ours until this post.
                    let r = unsafe { self.raw_post_recv(slot) };
                    if r == -sys::FI_EAGAIN {
                        st.backlog.push_front(Post::Recv { slot });
                        break;
                    }
                }
                Post::Send { peer, frame } => {
                    if peer.lost.load(Ordering::Acquire) {
                        continue;
                    }
                    match self.try_post(&mut st, &peer, &frame, &[]) {
                        Ok(true) => {}
                        Ok(false) => {
                            st.backlog.push_front(Post::Send { peer, frame });
                            break;
                        }
                        Err(_) => lost.push(peer),
                    }
                }
            }
        }
        let busy = !st.backlog.is_empty();
        self.backlogged.store(busy, Ordering::SeqCst);
        self.pump_rma(&mut st);
        self.release(st);
        for p in lost {
            self.lose(&p);
        }
    }
}
