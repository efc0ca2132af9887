//! Completion handlers: CQ entries and errors, finished RMA reads, received frames (checked
//! against the sender's token and put in sequence order) and what each frame kind does.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::peer::{take_get, take_put, Peer, PutSlot};
use super::state::{Inner, XferKind};
use super::{kind, sys, ERR_BAD_REF, FRAME_HDR, MAX_EXPOSED, MAX_HELD, RX_SLOTS, SLOT, TX_SLOTS};
use crate::common::lock;
use crate::wire::{decode_ref, u64_at};
use crate::{Event, Result, TransportError};

impl Inner {
    pub(super) fn on_cqe(&self, e: &sys::Cqe) {
        let Some(i) = self.ctx_index(e.ctx) else {
            return;
        };
        if i < RX_SLOTS {
            self.on_recv(i, e.len as usize);
        } else if i < RX_SLOTS + TX_SLOTS {
            let mut st = lock(&self.st);
            let s = i - RX_SLOTS;
            if st.tx_peer[s].take().is_some() {
                st.free_tx.push(s);
                self.inflight.fetch_sub(1, Ordering::AcqRel);
            }
            if !st.backlog.is_empty() {
                self.backlogged.store(true, Ordering::SeqCst);
            }
        } else {
            self.on_rma(i - RX_SLOTS - TX_SLOTS, false);
        }
    }

    pub(super) fn on_cq_err(&self, e: &sys::CqErr) {
        let Some(i) = self.ctx_index(e.ctx) else {
            return;
        };
        if i < RX_SLOTS {
            // A receive failed (e.g. truncated: a frame larger than a slot). Its sender is
            // unknown: repost and go on.
            let mut st = lock(&self.st);
            self.post_recv(&mut st, i);
        } else if i < RX_SLOTS + TX_SLOTS {
            let p = {
                let mut st = lock(&self.st);
                let s = i - RX_SLOTS;
                let p = st.tx_peer[s].take();
                if p.is_some() {
                    st.free_tx.push(s);
                    self.inflight.fetch_sub(1, Ordering::AcqRel);
                }
                p
            };
            if let Some(p) = p {
                tracing::debug!(
                    node = self.cfg.node.0,
                    peer = p.id.0,
                    "ofi: send failed: {}",
                    sys::strerror(e.err.into())
                );
                if e.err != sys::FI_ECANCELED {
                    self.lose(&p);
                }
            }
        } else {
            self.on_rma(i - RX_SLOTS - TX_SLOTS, true);
        }
    }

    pub(super) fn on_rma(&self, slot: usize, failed: bool) {
        let mut st = lock(&self.st);
        let Some(x) = st.rma[slot].take() else {
            return;
        };
        st.free_rma.push(slot);
        if let Some(xf) = st.xfers.get_mut(&x) {
            xf.outstanding -= 1;
            xf.failed |= failed;
        }
        self.finish_if_done(&mut st, x);
        self.pump_rma(&mut st);
        self.release(st);
    }

    pub(super) fn on_recv(&self, slot: usize, len: usize) {
        let len = len.min(SLOT);
        // SAFETY: the receive's completion was read, so the provider no longer writes this
        // slot until we repost it below; `len` bytes of it were filled.
        let f: &[u8] = unsafe { std::slice::from_raw_parts(self.rx_slab.at(slot * SLOT), len) };
        let peer = if len >= FRAME_HDR {
            lock(&self.tokens).get(&u64_at(f, 0)).cloned()
        } else {
            None
        };
        let failed = match peer {
            None => {
                // Not from an authenticated peer (or a lost one): dropped unread.
                self.rejected.fetch_add(1, Ordering::Relaxed);
                None
            }
            Some(p) if p.lost.load(Ordering::Acquire) => None,
            Some(p) => match self.on_frames(&p, f) {
                Ok(()) => None,
                Err(e) => {
                    tracing::debug!(
                        node = self.cfg.node.0,
                        peer = p.id.0,
                        "ofi: peer broke the protocol: {e}"
                    );
                    Some(p)
                }
            },
        };
        {
            let mut st = lock(&self.st);
            self.post_recv(&mut st, slot);
        }
        if let Some(p) = failed {
            self.lose(&p);
        }
    }

    /// Handles frame `f` of the authenticated peer `p` and then the held frames that follow it,
    /// or holds `f` when it came early. Any error loses the peer.
    pub(super) fn on_frames(&self, p: &Arc<Peer>, f: &[u8]) -> Result<()> {
        let seq = u64_at(f, 8);
        {
            let mut rx = lock(&p.rx);
            if seq < rx.next || rx.held.contains_key(&seq) {
                return Err(TransportError::Protocol("repeated frame"));
            }
            if seq > rx.next {
                if rx.held.len() >= MAX_HELD {
                    return Err(TransportError::Protocol("too many frames out of order"));
                }
                rx.held.insert(seq, f.to_vec());
                return Ok(());
            }
            rx.next += 1;
        }
        self.on_frame(p, f)?;
        loop {
            let next = {
                let mut rx = lock(&p.rx);
                let n = rx.next;
                match rx.held.remove(&n) {
                    Some(x) => {
                        rx.next += 1;
                        x
                    }
                    None => return Ok(()),
                }
            };
            if p.lost.load(Ordering::Acquire) {
                return Ok(());
            }
            self.on_frame(p, &next)?;
        }
    }

    /// Decodes one frame of the authenticated peer `p`, in order. Any error loses the peer.
    pub(super) fn on_frame(&self, p: &Arc<Peer>, f: &[u8]) -> Result<()> {
        if f[17..20] != [0, 0, 0] {
            return Err(TransportError::Protocol("nonzero reserved bytes"));
        }
        let blen = u32::from_le_bytes([f[20], f[21], f[22], f[23]]) as usize;
        if blen != f.len() - FRAME_HDR {
            return Err(TransportError::Protocol("frame length"));
        }
        let (a, b, c) = (u64_at(f, 24), u64_at(f, 32), u64_at(f, 40));
        let body = &f[FRAME_HDR..];
        let no_body = || {
            if body.is_empty() {
                Ok(())
            } else {
                Err(TransportError::Protocol("unexpected frame body"))
            }
        };
        let pool = &self.cfg.pool;
        match f[16] {
            kind::MSG => {
                if c != 0 {
                    return Err(TransportError::Protocol("bad message header"));
                }
                self.on_msg(p, a, b, body)
            }
            kind::CREDIT => {
                no_body()?;
                let mut cr = lock(&p.credits);
                *cr = cr.saturating_add(a);
                if *cr > p.window {
                    return Err(TransportError::Protocol("too many credits"));
                }
                drop(cr);
                p.credit_cv.notify_all();
                Ok(())
            }
            kind::PUT_REQ => {
                if body.len() != 48 {
                    return Err(TransportError::Protocol("bad put request"));
                }
                let dst = decode_ref(&body[..32]);
                let tag = u64_at(body, 32);
                let src_off = u64_at(body, 40);
                let (op, len) = (a, b);
                // SAFETY: the destination of a transfer is the transport's to write until the
                // transfer completes (the memory contract of `Transport::put_block`/`get_block`):
                // no other handle of this process borrows these bytes meanwhile.
                let block = unsafe { pool.block(dst) }
                    .ok()
                    .filter(|bk| len <= bk.len() as u64);
                let raddr = p.region.addr(src_off, len);
                let mut q = lock(&p.puts);
                if q.len() >= MAX_EXPOSED {
                    return Err(TransportError::Protocol("too many puts in flight"));
                }
                let start = match (block, raddr) {
                    (Some(block), Some(raddr)) if len > 0 => {
                        q.push_back(PutSlot { op, outcome: None });
                        Some((block, raddr))
                    }
                    (Some(_), Some(_)) => {
                        q.push_back(PutSlot {
                            op,
                            outcome: Some(Ok((dst, 0, tag))),
                        });
                        None
                    }
                    _ => {
                        q.push_back(PutSlot {
                            op,
                            outcome: Some(Err(ERR_BAD_REF)),
                        });
                        None
                    }
                };
                drop(q);
                if let Some((block, raddr)) = start {
                    self.start_xfer(p, XferKind::PutTarget { op, tag, dst }, block, len, raddr);
                }
                self.flush_puts(p);
                Ok(())
            }
            kind::PUT_ACK | kind::PUT_NACK => {
                no_body()?;
                take_put(p, a)?.complete(match (f[16], b) {
                    (kind::PUT_ACK, _) => Ok(()),
                    (_, ERR_BAD_REF) => Err(TransportError::BadRef),
                    _ => Err(TransportError::Io(io::ErrorKind::Other)),
                });
                Ok(())
            }
            kind::GET_REQ => {
                if body.len() != 32 {
                    return Err(TransportError::Protocol("bad get request"));
                }
                let src = decode_ref(body);
                let (op, len) = (a, b);
                // SAFETY: the transport only reads the source of a transfer (shared borrows); the
                // memory contract of `Transport::put_block`/`get_block` forbids writing it until it
                // completes.
                match unsafe { pool.block(src) }
                    .ok()
                    .filter(|bk| len > 0 && len <= bk.len() as u64)
                {
                    Some(bk) => {
                        let mut ex = lock(&p.exposed);
                        if ex.len() >= MAX_EXPOSED || ex.contains_key(&op) {
                            return Err(TransportError::Protocol("too many gets in flight"));
                        }
                        ex.insert(op, bk);
                        drop(ex);
                        self.ctl(p, kind::GET_GRANT, op, src.offset, &[]);
                    }
                    None => self.ctl(p, kind::GET_NACK, op, ERR_BAD_REF, &[]),
                }
                Ok(())
            }
            kind::GET_GRANT => {
                no_body()?;
                let (done, dst, len) = take_get(p, a)?;
                match p.region.addr(b, len) {
                    Some(raddr) => {
                        self.start_xfer(p, XferKind::GetInit { op: a, done }, dst, len, raddr)
                    }
                    None => {
                        done.complete(Err(TransportError::BadRef));
                        self.ctl(p, kind::GET_DONE, a, 0, &[]);
                    }
                }
                Ok(())
            }
            kind::GET_NACK => {
                no_body()?;
                let (done, _, _) = take_get(p, a)?;
                done.complete(Err(if b == ERR_BAD_REF {
                    TransportError::BadRef
                } else {
                    TransportError::Io(io::ErrorKind::Other)
                }));
                Ok(())
            }
            kind::GET_DONE => {
                no_body()?;
                match lock(&p.exposed).remove(&a) {
                    Some(_) => Ok(()),
                    None => Err(TransportError::Protocol("end of an unknown get")),
                }
            }
            _ => Err(TransportError::Protocol("unknown frame kind")),
        }
    }

    pub(super) fn on_msg(&self, p: &Arc<Peer>, total: u64, off: u64, body: &[u8]) -> Result<()> {
        if total > p.max_message as u64 || total > self.cfg.max_message as u64 {
            return Err(TransportError::Protocol("message too long"));
        }
        let blen = body.len() as u64;
        let mut rx = lock(&p.rx);
        let data = if off == 0 {
            if rx.partial.is_some() {
                return Err(TransportError::Protocol("message fragment missing"));
            }
            if blen > total || (blen == 0 && total > 0) {
                return Err(TransportError::Protocol("bad message fragment"));
            }
            let n = p.unconsumed.fetch_add(1, Ordering::AcqRel) + 1;
            if n > p.window {
                return Err(TransportError::Protocol("credit window exceeded"));
            }
            if blen == total {
                body.to_vec()
            } else {
                let mut v = Vec::with_capacity(total as usize);
                v.extend_from_slice(body);
                rx.partial = Some((v, total));
                return Ok(());
            }
        } else {
            let Some((buf, t)) = rx.partial.as_mut() else {
                return Err(TransportError::Protocol("fragment without a start"));
            };
            if *t != total
                || buf.len() as u64 != off
                || blen == 0
                || off.checked_add(blen).is_none_or(|e| e > total)
            {
                return Err(TransportError::Protocol("bad message fragment"));
            }
            buf.extend_from_slice(body);
            if (buf.len() as u64) < total {
                return Ok(());
            }
            match rx.partial.take() {
                Some((v, _)) => v,
                None => return Ok(()),
            }
        };
        drop(rx);
        self.push_event(Event::Message { peer: p.id, data }, Some(p.clone()));
        Ok(())
    }
}
