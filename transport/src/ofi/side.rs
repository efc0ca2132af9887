//! The side channel of the `ofi` back end: one TCP connection per peer pair that carries the
//! authentication handshake ([`crate::auth`]), then the exchange of fabric addresses and
//! memory keys, then heartbeats. Its closing is how a dead peer is noticed.
//!
//! Frames: an 8-byte header `kind u8 | 0 0 0 | len u32 LE` and `len` body bytes.
//!
//! | kind | body |
//! |---|---|
//! | `HELLO` (1) | [`Hello`], at most [`HELLO_MAX`] bytes |
//! | `READY` (2) | none: the dialer installed the peer; the acceptor may send now |
//! | `HEARTBEAT` (3) | none |
//!
//! Handshake, after `auth` succeeded: the dialer sends `HELLO`; the acceptor checks it,
//! registers the dialer (so that fabric messages carrying its token are accepted) and answers
//! with its own `HELLO`; the dialer checks that, installs the acceptor and sends `READY`; the
//! acceptor installs the dialer on `READY`. Anything else, or a malformed body, ends the
//! connection. Every length is bounded before anything is read into memory.

use std::io::{Read, Write};

use crate::TransportError;

/// Frame header bytes.
pub const HDR: usize = 8;
/// `HELLO` frame kind.
pub const HELLO: u8 = 1;
/// `READY` frame kind.
pub const READY: u8 = 2;
/// `HEARTBEAT` frame kind.
pub const HEARTBEAT: u8 = 3;
/// Largest `HELLO` body.
pub const HELLO_MAX: usize = 4096;
/// Largest fabric address.
pub const ADDR_MAX: usize = 512;
/// Largest provider name.
pub const PROV_MAX: usize = 64;
const MAGIC: &[u8; 8] = b"DRGNOFI1";

/// What each side tells the other after authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Provider name; both sides must use the same.
    pub provider: String,
    /// Fabric endpoint address (provider format).
    pub addr: Vec<u8>,
    /// Remote address of byte 0 of the sender's pool segment (its virtual address when the
    /// provider uses `FI_MR_VIRT_ADDR`, else 0).
    pub base: u64,
    /// Bytes of the sender's pool segment (registered region).
    pub len: u64,
    /// Memory key of the region.
    pub key: u64,
    /// Token the receiver must put into every fabric message to the sender.
    pub token: u64,
    /// The sender's longest accepted message.
    pub max_message: u64,
    /// The sender's credit window (messages the receiver may have outstanding to it).
    pub queue_depth: u64,
}

impl Hello {
    /// The body bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(80 + self.provider.len() + self.addr.len());
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&(self.provider.len() as u16).to_le_bytes());
        b.extend_from_slice(self.provider.as_bytes());
        b.extend_from_slice(&(self.addr.len() as u16).to_le_bytes());
        b.extend_from_slice(&self.addr);
        for v in [
            self.base,
            self.len,
            self.key,
            self.token,
            self.max_message,
            self.queue_depth,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b
    }

    /// Parses a body, refusing anything malformed, oversized or with trailing bytes.
    pub fn decode(b: &[u8]) -> Result<Hello, &'static str> {
        let mut c = Cursor { b, at: 0 };
        if c.take(8)? != MAGIC {
            return Err("bad hello magic");
        }
        let pl = c.u16()? as usize;
        if pl == 0 || pl > PROV_MAX {
            return Err("bad provider name length");
        }
        let provider = std::str::from_utf8(c.take(pl)?)
            .map_err(|_| "provider name not UTF-8")?
            .to_string();
        let al = c.u16()? as usize;
        if al == 0 || al > ADDR_MAX {
            return Err("bad address length");
        }
        let addr = c.take(al)?.to_vec();
        let h = Hello {
            provider,
            addr,
            base: c.u64()?,
            len: c.u64()?,
            key: c.u64()?,
            token: c.u64()?,
            max_message: c.u64()?,
            queue_depth: c.u64()?,
        };
        if c.at != b.len() {
            return Err("trailing bytes in hello");
        }
        if h.queue_depth == 0 || h.token == 0 {
            return Err("bad hello values");
        }
        Ok(h)
    }
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        let end = self.at.checked_add(n).ok_or("truncated hello")?;
        let s = self.b.get(self.at..end).ok_or("truncated hello")?;
        self.at = end;
        Ok(s)
    }
    fn u16(&mut self) -> Result<u16, &'static str> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u64(&mut self) -> Result<u64, &'static str> {
        let mut w = [0u8; 8];
        w.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(w))
    }
}

/// A frame header.
pub fn header(kind: u8, len: u32) -> [u8; HDR] {
    let mut h = [0u8; HDR];
    h[0] = kind;
    h[4..8].copy_from_slice(&len.to_le_bytes());
    h
}

/// Writes one frame.
pub fn write_frame<W: Write>(w: &mut W, kind: u8, body: &[u8]) -> Result<(), TransportError> {
    let mut f = Vec::with_capacity(HDR + body.len());
    f.extend_from_slice(&header(kind, body.len() as u32));
    f.extend_from_slice(body);
    w.write_all(&f)?;
    Ok(())
}

/// Reads one frame header: `(kind, len)`, refusing nonzero reserved bytes and bodies longer
/// than `max`.
pub fn read_header<R: Read>(r: &mut R, max: usize) -> Result<(u8, usize), TransportError> {
    let mut h = [0u8; HDR];
    r.read_exact(&mut h)?;
    if h[1..4] != [0, 0, 0] {
        return Err(TransportError::Protocol("bad side-channel header"));
    }
    let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
    if len > max {
        return Err(TransportError::Protocol("side-channel frame too long"));
    }
    Ok((h[0], len))
}

/// Reads a frame that must be a `HELLO` and decodes it.
pub fn read_hello<R: Read>(r: &mut R) -> Result<Hello, TransportError> {
    let (kind, len) = read_header(r, HELLO_MAX)?;
    if kind != HELLO {
        return Err(TransportError::Protocol("expected hello"));
    }
    let mut b = vec![0u8; len];
    r.read_exact(&mut b)?;
    Hello::decode(&b).map_err(TransportError::Protocol)
}

/// Reads a frame that must be an empty `READY`.
pub fn read_ready<R: Read>(r: &mut R) -> Result<(), TransportError> {
    match read_header(r, 0)? {
        (READY, 0) => Ok(()),
        _ => Err(TransportError::Protocol("expected ready")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Hello {
        Hello {
            provider: "tcp;ofi_rxm".into(),
            addr: vec![2, 0, 1, 2, 127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0],
            base: 0x7f00_0000_0000,
            len: 1 << 30,
            key: 0xdead_beef,
            token: 77,
            max_message: 1 << 20,
            queue_depth: 256,
        }
    }

    #[test]
    fn hello_round_trip_and_refusals() {
        let h = hello();
        let b = h.encode();
        assert_eq!(Hello::decode(&b), Ok(h.clone()));
        // Every truncation fails, and so do trailing bytes.
        for n in 0..b.len() {
            assert!(Hello::decode(&b[..n]).is_err(), "truncated to {n}");
        }
        let mut t = b.clone();
        t.push(0);
        assert!(Hello::decode(&t).is_err());
        // Oversized address length.
        let mut big = h.clone();
        big.addr = vec![1; ADDR_MAX + 1];
        assert!(Hello::decode(&big.encode()).is_err());
        let mut zero = h;
        zero.token = 0;
        assert!(Hello::decode(&zero.encode()).is_err());
    }

    #[test]
    fn frames() {
        let mut v = Vec::new();
        write_frame(&mut v, HELLO, &hello().encode()).unwrap();
        assert_eq!(read_hello(&mut &v[..]), Ok(hello()));
        let mut v = Vec::new();
        write_frame(&mut v, READY, &[]).unwrap();
        assert_eq!(read_ready(&mut &v[..]), Ok(()));
        let mut bad = header(HELLO, (HELLO_MAX + 1) as u32).to_vec();
        bad.resize(HDR + HELLO_MAX + 1, 0);
        assert!(read_hello(&mut &bad[..]).is_err());
        let mut r = header(READY, 0);
        r[2] = 1;
        assert!(read_ready(&mut &r[..]).is_err());
    }
}
