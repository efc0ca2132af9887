//! The sending side: frames written at once by the sending thread or queued for the writer
//! thread, messages under the credit window, credit returned as the application takes
//! messages, and the writer thread (small frames first, then block payloads in chunks, heartbeats
//! when idle).

use std::io::{self, IoSlice, Write};
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::state::{Bulk, Cur, Inner, Peer};
use super::CHUNK;
use crate::common::{lock, wait_until};
use crate::wire::{self, encode_ref, Header, Kind};
use crate::{Event, NodeId, Result, TransportError};

/// Writes a header and a body with `writev`, to the end.
pub(super) fn write_frame(s: &mut TcpStream, hdr: &[u8], body: &[u8]) -> io::Result<()> {
    let mut bufs = [IoSlice::new(hdr), IoSlice::new(body)];
    let mut bufs: &mut [IoSlice<'_>] = &mut bufs;
    while !bufs.is_empty() {
        match s.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Inner {
    /// Sends a frame: written at once by this thread when the socket is free and nothing
    /// is queued before it (so order is kept), otherwise queued for the writer thread.
    pub(super) fn emit(&self, p: &Arc<Peer>, hdr: Header, body: &[u8]) -> Result<()> {
        if let Ok(mut s) = p.sock.try_lock() {
            // The writer pops frames only while holding `sock`, so an empty queue seen
            // under `sock` means every earlier frame is fully written.
            if lock(&p.q).small.is_empty() && !p.lost.load(Ordering::Acquire) {
                let r = write_frame(&mut s, &hdr.encode(), body);
                drop(s);
                return match r {
                    Ok(()) => {
                        p.last_tx.store(self.now_ms(), Ordering::Relaxed);
                        Ok(())
                    }
                    Err(_) => {
                        self.lose(p);
                        Err(self.lost_err())
                    }
                };
            }
        }
        p.queue(hdr, body).map_err(|_| self.lost_err())
    }

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
        self.emit(&p, Header::new(Kind::Msg, msg.len() as u32, 0, 0), msg)
    }

    /// Our application took a message of `p`: return credit in batches.
    pub(super) fn consumed(&self, p: &Arc<Peer>) {
        p.unconsumed.fetch_sub(1, Ordering::AcqRel);
        let batch = (self.cfg.queue_depth as u64 / 4).max(1);
        let c = p.consumed.fetch_add(1, Ordering::AcqRel) + 1;
        if c >= batch
            && p.consumed
                .compare_exchange(c, 0, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            let _ = self.emit(p, Header::new(Kind::Credit, 0, 0, c), &[]);
        }
    }

    pub(super) fn push_event(&self, ev: Event, p: Option<Arc<Peer>>) {
        let mut g = lock(&self.inbox);
        g.push_back((ev, p));
        self.queued.fetch_add(1, Ordering::AcqRel);
        drop(g);
        self.inbox_cv.notify_one();
    }

    pub(super) fn writer_loop(self: Arc<Self>, p: Arc<Peer>) {
        let hb = self.cfg.heartbeat.as_millis().max(1) as u64;
        let mut cur: Option<Cur> = None;
        loop {
            {
                let mut q = lock(&p.q);
                loop {
                    if q.closed {
                        return;
                    }
                    if cur.is_none() {
                        cur = q.bulk.pop_front().map(|bulk| Cur {
                            bulk,
                            sent: 0,
                            begun: false,
                        });
                    }
                    if !q.small.is_empty() || cur.is_some() {
                        break;
                    }
                    let idle = self
                        .now_ms()
                        .saturating_sub(p.last_tx.load(Ordering::Relaxed));
                    if idle >= hb {
                        break;
                    }
                    q = p
                        .q_cv
                        .wait_timeout(q, Duration::from_millis(hb - idle))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
            let r = (|| -> io::Result<()> {
                let mut s = lock(&p.sock);
                let mut wrote = false;
                loop {
                    let f = lock(&p.q).small.pop_front();
                    match f {
                        Some(f) => {
                            s.write_all(&f)?;
                            wrote = true;
                        }
                        None => break,
                    }
                }
                if let Some(c) = cur.as_mut() {
                    if write_step(&mut s, c)? {
                        cur = None;
                    }
                    wrote = true;
                }
                if !wrote {
                    s.write_all(&Header::new(Kind::Heartbeat, 0, 0, 0).encode())?;
                }
                p.last_tx.store(self.now_ms(), Ordering::Relaxed);
                Ok(())
            })();
            if r.is_err() {
                self.lose(&p);
                return;
            }
        }
    }
}

/// Writes the next frame of a transfer; true when it is finished.
pub(super) fn write_step(s: &mut TcpStream, c: &mut Cur) -> io::Result<bool> {
    let (op, src, len, data_kind) = match &c.bulk {
        Bulk::Put {
            op,
            src,
            len,
            dst,
            tag,
        } => {
            if !c.begun {
                c.begun = true;
                let mut b = [0u8; wire::PUT_BEGIN_BODY];
                b[..32].copy_from_slice(&encode_ref(dst));
                b[32..].copy_from_slice(&tag.to_le_bytes());
                let h = Header::new(Kind::PutBegin, b.len() as u32, *op, *len);
                write_frame(s, &h.encode(), &b)?;
                if *len == 0 {
                    return Ok(true);
                }
            }
            (*op, src, *len, Kind::PutData)
        }
        Bulk::GetReply { op, src, len } => (*op, src, *len, Kind::GetData),
    };
    if c.sent >= len {
        return Ok(true);
    }
    let n = ((len - c.sent) as usize).min(CHUNK);
    let at = c.sent as usize;
    let h = Header::new(data_kind, n as u32, op, c.sent);
    write_frame(s, &h.encode(), &src.as_slice()[at..at + n])?;
    c.sent += n as u64;
    Ok(c.sent == len)
}
