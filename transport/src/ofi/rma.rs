//! Block transfers by RMA: issuing the `fi_read`s of a transfer in chunks while RMA slots are
//! free, finishing transfers, and answering puts in the order they were requested.

use std::ffi::c_void;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use dragon_shm::heap::Block;

use super::peer::{Peer, PutSlot};
use super::state::{Action, Inner, State, Xfer, XferKind};
use super::{kind, rma_chunk, sys, ERR_IO, RX_SLOTS, TX_SLOTS};
use crate::common::lock;
use crate::{Event, TransportError};

impl Inner {
    /// Issues the reads of waiting transfers while RMA slots are free.
    pub(super) fn pump_rma(&self, st: &mut State) {
        while let Some(&x) = st.rma_wait.front() {
            if st.dead {
                return;
            }
            let Some(xf) = st.xfers.get(&x) else {
                st.rma_wait.pop_front();
                continue;
            };
            if xf.issued >= xf.len || xf.failed || xf.peer.lost.load(Ordering::Acquire) {
                st.rma_wait.pop_front();
                self.finish_if_done(st, x);
                continue;
            }
            let Some(slot) = st.free_rma.pop() else {
                return;
            };
            let n = ((xf.len - xf.issued) as usize)
                .min(rma_chunk())
                .min(self.ep.attrs.max_msg_size.max(4096));
            let local = self.pool_ptr + xf.block.block_ref().offset as usize + xf.issued as usize;
            // SAFETY: `local .. local + n` lies inside the block `xf.block` (issued + n <= len
            // <= the block's length, checked when the transfer was made) in our registered
            // mapping of the pool; the Xfer holds the block until every read into it has
            // completed (or the endpoint is closed); the context slot is this RMA slot's.
            let r = unsafe {
                self.ep.read(
                    local as *mut u8,
                    n,
                    self.pool_desc as *mut c_void,
                    xf.peer.fi_addr,
                    xf.raddr.wrapping_add(xf.issued),
                    xf.key,
                    self.ctx(RX_SLOTS + TX_SLOTS + slot),
                )
            };
            if r == -sys::FI_EAGAIN {
                st.free_rma.push(slot);
                self.backlogged.store(true, Ordering::SeqCst);
                return;
            }
            let Some(xf) = st.xfers.get_mut(&x) else {
                st.free_rma.push(slot);
                return;
            };
            if r != 0 {
                st.free_rma.push(slot);
                xf.failed = true;
                continue;
            }
            xf.issued += n as u64;
            xf.outstanding += 1;
            st.rma[slot] = Some(x);
        }
    }

    /// Ends transfer `x` if nothing of it is in flight and nothing more will be issued,
    /// queueing what follows as an action.
    pub(super) fn finish_if_done(&self, st: &mut State, x: u64) {
        let Some(xf) = st.xfers.get(&x) else {
            return;
        };
        let lost = xf.peer.lost.load(Ordering::Acquire);
        if xf.outstanding > 0 || !(xf.issued >= xf.len || xf.failed || lost) {
            return;
        }
        let Some(xf) = st.xfers.remove(&x) else {
            return;
        };
        let ok = !xf.failed && !lost && xf.issued >= xf.len;
        let Xfer {
            peer,
            kind,
            block,
            len,
            ..
        } = xf;
        drop(block);
        st.actions.push(match kind {
            XferKind::PutTarget { op, tag, dst } => Action::PutFinished {
                peer,
                op,
                outcome: if ok { Ok((dst, len, tag)) } else { Err(ERR_IO) },
            },
            XferKind::GetInit { op, done } => Action::GetFinished { peer, op, done, ok },
        });
    }

    pub(super) fn start_xfer(
        &self,
        p: &Arc<Peer>,
        kind: XferKind,
        block: Block,
        len: u64,
        raddr: u64,
    ) {
        let mut st = lock(&self.st);
        if st.dead {
            if let XferKind::GetInit { done, .. } = kind {
                done.complete(Err(TransportError::Closed));
            }
            return;
        }
        let x = st.next_xfer;
        st.next_xfer += 1;
        st.xfers.insert(
            x,
            Xfer {
                peer: p.clone(),
                kind,
                block,
                len,
                raddr,
                key: p.region.key,
                issued: 0,
                outstanding: 0,
                failed: false,
            },
        );
        st.rma_wait.push_back(x);
        self.pump_rma(&mut st);
        self.release(st);
    }

    pub(super) fn run(&self, a: Action) {
        match a {
            Action::PutFinished { peer, op, outcome } => {
                if peer.lost.load(Ordering::Acquire) {
                    return;
                }
                if let Some(s) = lock(&peer.puts).iter_mut().find(|s| s.op == op) {
                    s.outcome = Some(outcome);
                }
                self.flush_puts(&peer);
            }
            Action::GetFinished { peer, op, done, ok } => {
                let lost = peer.lost.load(Ordering::Acquire);
                done.complete(if ok {
                    Ok(())
                } else if lost {
                    Err(self.lost_err())
                } else {
                    Err(TransportError::Io(io::ErrorKind::Other))
                });
                if !lost {
                    self.ctl(&peer, kind::GET_DONE, op, 0, &[]);
                }
            }
        }
    }

    /// Reports the puts of `p` that are finished, in the order they were requested.
    pub(super) fn flush_puts(&self, p: &Arc<Peer>) {
        loop {
            let front = {
                let mut q = lock(&p.puts);
                match q.front() {
                    Some(s) if s.outcome.is_some() => q.pop_front(),
                    _ => None,
                }
            };
            let Some(PutSlot {
                op,
                outcome: Some(outcome),
            }) = front
            else {
                return;
            };
            match outcome {
                Ok((block, len, tag)) => {
                    self.push_event(
                        Event::BlockFilled {
                            peer: p.id,
                            block,
                            len,
                            tag,
                        },
                        None,
                    );
                    self.ctl(p, kind::PUT_ACK, op, 0, &[]);
                }
                Err(code) => self.ctl(p, kind::PUT_NACK, op, code, &[]),
            }
        }
    }
}
