//! Small messages: sending (fragments, credits), crediting back what the application took,
//! posting block requests, and queueing events for `recv`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::peer::Peer;
use super::state::Inner;
use super::{frame_header, kind, FRAME_HDR, SLOT};
use crate::common::{lock, wait_until};
use crate::{Event, NodeId, Result, TransportError};

impl Inner {
    pub(super) fn send_msg(
        &self,
        peer: NodeId,
        msg: &[u8],
        wait: Option<Option<Instant>>,
    ) -> Result<()> {
        if msg.len() > self.cfg.max_message {
            return Err(TransportError::TooLarge);
        }
        let p = self.peer(peer)?;
        if msg.len() > p.max_message {
            return Err(TransportError::TooLarge);
        }
        {
            let mut c = lock(&p.credits);
            loop {
                if p.lost.load(Ordering::Acquire) {
                    return Err(self.lost_err());
                }
                if *c > 0 {
                    *c -= 1;
                    break;
                }
                match wait {
                    None => return Err(TransportError::Full),
                    Some(deadline) => {
                        c = wait_until(&p.credit_cv, c, deadline)
                            .map_err(|_| TransportError::TimedOut)?;
                    }
                }
            }
        }
        let r = {
            let mut st = lock(&self.st);
            if p.lost.load(Ordering::Acquire) {
                return Err(self.lost_err());
            }
            let total = msg.len();
            let frag = SLOT - FRAME_HDR;
            let mut off = 0;
            loop {
                let n = (total - off).min(frag);
                let h = frame_header(p.tx_token, kind::MSG, n, total as u64, off as u64, 0);
                if let Err(e) = self.post(&mut st, &p, h, &msg[off..off + n]) {
                    break Err(e);
                }
                off += n;
                if off >= total {
                    break Ok(());
                }
            }
        };
        match r {
            Err(TransportError::PeerLost) => {
                self.lose(&p);
                Err(self.lost_err())
            }
            r => r,
        }
    }

    /// Our application took a message of `p`: return credit in batches.
    pub(super) fn consumed(&self, p: &Arc<Peer>) {
        p.unconsumed.fetch_sub(1, Ordering::AcqRel);
        let batch = (p.window / 4).max(1);
        let c = p.consumed.fetch_add(1, Ordering::AcqRel) + 1;
        if c >= batch
            && p.consumed
                .compare_exchange(c, 0, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            && !p.lost.load(Ordering::Acquire)
        {
            self.ctl(p, kind::CREDIT, c, 0, &[]);
        }
    }

    /// Posts the request frame of the pending operation `op`; on failure forgets `op` (and
    /// loses the peer when the failure says it is gone).
    pub(super) fn post_request(
        &self,
        p: &Arc<Peer>,
        op: u64,
        h: [u8; FRAME_HDR],
        body: &[u8],
    ) -> Result<()> {
        let r = {
            let mut st = lock(&self.st);
            self.post(&mut st, p, h, body)
        };
        if let Err(e) = r {
            lock(&p.pending).remove(&op);
            if e == TransportError::PeerLost {
                self.lose(p);
                return Err(self.lost_err());
            }
            return Err(e);
        }
        Ok(())
    }

    pub(super) fn push_event(&self, ev: Event, p: Option<Arc<Peer>>) {
        let mut g = lock(&self.inbox);
        g.push_back((ev, p));
        self.queued.fetch_add(1, Ordering::AcqRel);
        drop(g);
        self.inbox_cv.notify_one();
    }
}
