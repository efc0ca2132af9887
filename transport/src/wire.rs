//! The framed wire protocol (after authentication).
//!
//! Every frame starts with a 24-byte little-endian header:
//!
//! | off | size | field |
//! |---|---|---|
//! | 0 | 1 | `kind` ([`Kind`]) |
//! | 1 | 3 | zero |
//! | 4 | 4 | `len`: bytes of body that follow |
//! | 8 | 8 | `op`: operation id (block transfers) |
//! | 16 | 8 | `arg`: kind-specific (offset, total length, credits, error code) |
//!
//! Bodies: `Msg` = the message; `PutBegin` = target [`BlockRef`] (32 B) + user tag (8 B),
//! `arg` = total length; `PutData`/`GetData` = payload bytes, `arg` = their offset in the
//! block; `GetReq` = source [`BlockRef`] (32 B), `arg` = length; all others have no body.
//! Nonzero reserved bytes, unknown kinds and bodies of the wrong size are protocol errors.
//!
//! [`BlockRef`]: dragon_shm::heap::BlockRef

use dragon_shm::heap::BlockRef;

/// Header size in bytes.
pub const HEADER_LEN: usize = 24;

/// Frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// A small message.
    Msg = 1,
    /// `arg` more messages may be sent.
    Credit = 2,
    /// Keep-alive.
    Heartbeat = 3,
    /// Start of a put into the receiver's block.
    PutBegin = 4,
    /// Bytes of a put.
    PutData = 5,
    /// The put `op` landed.
    PutAck = 6,
    /// The put `op` failed at the target; `arg` = error code.
    PutNack = 7,
    /// Request to send back bytes of the receiver's block.
    GetReq = 8,
    /// Bytes answering a get.
    GetData = 9,
    /// The get `op` failed at the source; `arg` = error code.
    GetNack = 10,
}

impl Kind {
    /// Decodes a kind byte.
    pub fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Msg,
            2 => Kind::Credit,
            3 => Kind::Heartbeat,
            4 => Kind::PutBegin,
            5 => Kind::PutData,
            6 => Kind::PutAck,
            7 => Kind::PutNack,
            8 => Kind::GetReq,
            9 => Kind::GetData,
            10 => Kind::GetNack,
            _ => return None,
        })
    }
}

/// A decoded header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Frame kind.
    pub kind: Kind,
    /// Body length.
    pub len: u32,
    /// Operation id.
    pub op: u64,
    /// Kind-specific argument.
    pub arg: u64,
}

/// Error code in `PutNack`/`GetNack`: the block handle or range is bad.
pub const ERR_BAD_REF: u64 = 1;

/// Body length of `PutBegin`.
pub const PUT_BEGIN_BODY: usize = 40;
/// Body length of `GetReq`.
pub const GET_REQ_BODY: usize = 32;

impl Header {
    /// A header.
    pub fn new(kind: Kind, len: u32, op: u64, arg: u64) -> Header {
        Header { kind, len, op, arg }
    }

    /// Encodes to the wire form.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = self.kind as u8;
        b[4..8].copy_from_slice(&self.len.to_le_bytes());
        b[8..16].copy_from_slice(&self.op.to_le_bytes());
        b[16..24].copy_from_slice(&self.arg.to_le_bytes());
        b
    }

    /// Decodes the wire form, refusing unknown kinds and nonzero reserved bytes.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Header, &'static str> {
        let kind = Kind::from_u8(b[0]).ok_or("unknown frame kind")?;
        if b[1..4] != [0, 0, 0] {
            return Err("nonzero reserved header bytes");
        }
        let len = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        Ok(Header {
            kind,
            len,
            op: u64_at(b, 8),
            arg: u64_at(b, 16),
        })
    }
}

/// The little-endian u64 at offset `o` of `b`.
pub fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(w)
}

/// The 32-byte wire form of a block reference (both back ends' frames carry it).
pub fn encode_ref(r: &BlockRef) -> [u8; 32] {
    let mut b = [0u8; 32];
    b[..8].copy_from_slice(&r.segment.to_le_bytes());
    b[8..16].copy_from_slice(&r.offset.to_le_bytes());
    b[16..24].copy_from_slice(&r.len.to_le_bytes());
    b[24..28].copy_from_slice(&r.gen.to_le_bytes());
    b
}

/// The block reference of a 32-byte wire form (validated by the pool it is used with).
pub fn decode_ref(b: &[u8]) -> BlockRef {
    BlockRef {
        segment: u64_at(b, 0),
        offset: u64_at(b, 8),
        len: u64_at(b, 16),
        gen: u32::from_le_bytes([b[24], b[25], b[26], b[27]]),
        _pad: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let h = Header::new(Kind::PutData, 77, 5, 1 << 40);
        assert_eq!(Header::decode(&h.encode()), Ok(h));
        let mut b = h.encode();
        b[2] = 1;
        assert!(Header::decode(&b).is_err());
        b = h.encode();
        b[0] = 200;
        assert!(Header::decode(&b).is_err());
    }
}
