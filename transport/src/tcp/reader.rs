//! The receiving side: the reader thread of a peer decodes frames, puts message bytes in the
//! inbox and block payloads straight into their blocks, and answers puts and gets.

use std::io::{BufReader, Read};
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::state::{Bulk, InBulk, Inner, Peer, Pending};
use super::RBUF;
use crate::common::lock;
use crate::wire::{self, decode_ref, u64_at, Header, Kind, HEADER_LEN};
use crate::{Event, Result, TransportError};

impl Inner {
    pub(super) fn reader_loop(self: Arc<Self>, p: Arc<Peer>, s: TcpStream) {
        let mut r = BufReader::with_capacity(RBUF, s);
        let mut cur: Option<InBulk> = None;
        let _ = self.read_frames(&p, &mut r, &mut cur);
        if let Some(InBulk::Get { done, .. }) = cur {
            done.complete(Err(self.lost_err()));
        }
        self.lose(&p);
    }

    pub(super) fn read_frames(
        &self,
        p: &Arc<Peer>,
        r: &mut BufReader<TcpStream>,
        cur: &mut Option<InBulk>,
    ) -> Result<()> {
        let pool = &self.cfg.pool;
        loop {
            let mut hb = [0u8; HEADER_LEN];
            r.read_exact(&mut hb)?;
            let h = Header::decode(&hb).map_err(TransportError::Protocol)?;
            let len = h.len as usize;
            let no_body = |h: &Header| {
                if h.len == 0 {
                    Ok(())
                } else {
                    Err(TransportError::Protocol("unexpected frame body"))
                }
            };
            match h.kind {
                Kind::Msg => {
                    if len > self.cfg.max_message {
                        return Err(TransportError::Protocol("message too long"));
                    }
                    let n = p.unconsumed.fetch_add(1, Ordering::AcqRel) + 1;
                    if n > self.cfg.queue_depth as u64 {
                        return Err(TransportError::Protocol("credit window exceeded"));
                    }
                    let mut data = vec![0u8; len];
                    r.read_exact(&mut data)?;
                    self.push_event(Event::Message { peer: p.id, data }, Some(p.clone()));
                }
                Kind::Credit => {
                    no_body(&h)?;
                    let mut c = lock(&p.credits);
                    *c = c.saturating_add(h.arg);
                    if *c > self.cfg.queue_depth as u64 {
                        return Err(TransportError::Protocol("too many credits"));
                    }
                    drop(c);
                    p.credit_cv.notify_all();
                }
                Kind::Heartbeat => no_body(&h)?,
                Kind::PutBegin => {
                    if len != wire::PUT_BEGIN_BODY || cur.is_some() {
                        return Err(TransportError::Protocol("bad put start"));
                    }
                    let mut b = [0u8; wire::PUT_BEGIN_BODY];
                    r.read_exact(&mut b)?;
                    let br = decode_ref(&b[..32]);
                    let tag = u64_at(&b, 32);
                    let total = h.arg;
                    // SAFETY: the destination of a transfer is the transport's to write until the
                    // transfer completes (the memory contract of
                    // `Transport::put_block`/`get_block`): no other handle of this process borrows
                    // these bytes meanwhile.
                    let block = unsafe { pool.block(br) }
                        .ok()
                        .filter(|blk| total <= blk.len() as u64);
                    *cur = Some(InBulk::Put {
                        op: h.op,
                        block,
                        r: br,
                        total,
                        got: 0,
                        tag,
                    });
                    if total == 0 {
                        self.finish_put(p, cur.take())?;
                    }
                }
                Kind::PutData => {
                    let Some(InBulk::Put {
                        op,
                        block,
                        total,
                        got,
                        ..
                    }) = cur.as_mut()
                    else {
                        return Err(TransportError::Protocol("put data without start"));
                    };
                    if *op != h.op || h.arg != *got || *total - *got < len as u64 || len == 0 {
                        return Err(TransportError::Protocol("put data out of range"));
                    }
                    let at = *got as usize;
                    match block {
                        // In range: at + len <= total <= block length (checked at start).
                        Some(b) => r.read_exact(&mut b.as_mut_slice()[at..at + len])?,
                        None => drain(r, len)?,
                    }
                    *got += len as u64;
                    if *got == *total {
                        self.finish_put(p, cur.take())?;
                    }
                }
                Kind::PutAck | Kind::PutNack => {
                    no_body(&h)?;
                    match lock(&p.pending).remove(&h.op) {
                        Some(Pending::Put(c)) => c.complete(if h.kind == Kind::PutAck {
                            Ok(())
                        } else {
                            Err(TransportError::BadRef)
                        }),
                        _ => return Err(TransportError::Protocol("ack of unknown put")),
                    }
                }
                Kind::GetReq => {
                    if len != wire::GET_REQ_BODY {
                        return Err(TransportError::Protocol("bad get request"));
                    }
                    let mut b = [0u8; wire::GET_REQ_BODY];
                    r.read_exact(&mut b)?;
                    let br = decode_ref(&b);
                    let total = h.arg;
                    // SAFETY: the transport only reads the source of a transfer (shared borrows);
                    // the memory contract of `Transport::put_block`/`get_block` forbids writing it
                    // until it completes.
                    let src = unsafe { pool.block(br) }
                        .ok()
                        .filter(|blk| total > 0 && total <= blk.len() as u64);
                    match src {
                        Some(src) => {
                            let mut q = lock(&p.q);
                            if q.closed {
                                return Err(TransportError::PeerLost);
                            }
                            q.bulk.push_back(Bulk::GetReply {
                                op: h.op,
                                src,
                                len: total,
                            });
                            drop(q);
                            p.q_cv.notify_one();
                        }
                        None => {
                            p.queue(Header::new(Kind::GetNack, 0, h.op, wire::ERR_BAD_REF), &[])?
                        }
                    }
                }
                Kind::GetData => {
                    if cur.is_none() {
                        match lock(&p.pending).remove(&h.op) {
                            Some(Pending::Get { done, dst, len }) => {
                                *cur = Some(InBulk::Get {
                                    op: h.op,
                                    done,
                                    dst,
                                    len,
                                    got: 0,
                                })
                            }
                            _ => return Err(TransportError::Protocol("data of unknown get")),
                        }
                    }
                    let Some(InBulk::Get {
                        op,
                        dst,
                        len: total,
                        got,
                        ..
                    }) = cur.as_mut()
                    else {
                        return Err(TransportError::Protocol("get data inside a put"));
                    };
                    if *op != h.op || h.arg != *got || *total - *got < len as u64 || len == 0 {
                        return Err(TransportError::Protocol("get data out of range"));
                    }
                    let at = *got as usize;
                    // In range: at + len <= total <= dst length (checked by get_block).
                    r.read_exact(&mut dst.as_mut_slice()[at..at + len])?;
                    *got += len as u64;
                    if *got == *total {
                        if let Some(InBulk::Get { done, .. }) = cur.take() {
                            done.complete(Ok(()));
                        }
                    }
                }
                Kind::GetNack => {
                    no_body(&h)?;
                    match lock(&p.pending).remove(&h.op) {
                        Some(Pending::Get { done, .. }) => {
                            done.complete(Err(TransportError::BadRef))
                        }
                        _ => return Err(TransportError::Protocol("nack of unknown get")),
                    }
                }
            }
        }
    }

    pub(super) fn finish_put(&self, p: &Arc<Peer>, done: Option<InBulk>) -> Result<()> {
        let Some(InBulk::Put {
            op,
            block,
            r,
            total,
            tag,
            ..
        }) = done
        else {
            return Ok(());
        };
        match block {
            Some(b) => {
                drop(b);
                self.push_event(
                    Event::BlockFilled {
                        peer: p.id,
                        block: r,
                        len: total,
                        tag,
                    },
                    None,
                );
                p.queue(Header::new(Kind::PutAck, 0, op, 0), &[])
            }
            None => p.queue(Header::new(Kind::PutNack, 0, op, wire::ERR_BAD_REF), &[]),
        }
    }
}

pub(super) fn drain(r: &mut BufReader<TcpStream>, mut n: usize) -> Result<()> {
    let mut scratch = [0u8; 8192];
    while n > 0 {
        let k = n.min(scratch.len());
        r.read_exact(&mut scratch[..k])?;
        n -= k;
    }
    Ok(())
}
