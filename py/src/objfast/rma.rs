//! Large block messages by RMA: when this node's transport is `ofi`, a block message of at
//! least [`RMA_MIN`] bytes does not stream through the object server's socket. It moves
//! pool block to pool block over the node agents' transport endpoint (libfabric RMA), which
//! lives in the same process as this server.
//!
//! * A remote get (`recv`, `locked_recv` with [`F_RMA`]): the server answers an offer (`7` +
//!   the length), the client answers with a block of its node pool ([`Dest`]), the server
//!   has the transport put the message into it and answers `8`. A client with no room
//!   answers "no block", and any transfer that fails falls back to the bytes on the socket
//!   (`5`), so a message taken from its channel is never lost.
//! * A remote put (`send` of a block message with [`F_RMA`]): the client copies the message
//!   into a block of its node pool and sends only its [`Dest`] and length; the server has
//!   the transport get it into a block of its node pool, sends that into the channel, and
//!   answers as for any send. The client's block is freed when the answer arrives.

use std::sync::atomic::AtomicU64;
use std::sync::OnceLock;

use super::calls::channel_send_block;
use super::server::*;
use super::*;

use dragon_runtime::agent::BlockMover;
use dragon_shm::heap::{Block, BlockRef};

/// Block messages of at least this many bytes move by RMA when both ends can. Below it, the
/// RMA's extra round trip and the transport's own request and completion messages cost more
/// than they save (measured over `tcp;ofi_rxm` on 3 local nodes: a 1 MiB message by RMA took
/// about a third of the socket's rate; 64 MiB ones were as fast or faster).
pub(super) const RMA_MIN: usize = 8 << 20;
/// Bytes of a [`Dest`] on the wire: node `u32`, then a block reference (`u64` segment,
/// offset and length, `u32` generation).
pub(super) const DEST_LEN: usize = 32;
/// The node of a [`Dest`] that names no block ("send me the bytes").
const NO_BLOCK: u32 = u32::MAX;

/// This process's node transport, set once bring-up made the cluster and only when it is
/// `ofi` (over `tcp`, streaming through the server's own socket is as fast and one hop
/// shorter).
static MOVER: OnceLock<BlockMover> = OnceLock::new();

/// Block messages this process received / sent by RMA (`objfast_rma_counts`).
static GETS: AtomicU64 = AtomicU64::new(0);
static PUTS: AtomicU64 = AtomicU64::new(0);

/// Installs this process's block mover when its transport is `ofi` (and
/// `DRAGON_OBJECTS_RMA` is not `0`).
pub(crate) fn set_mover(m: Option<BlockMover>) {
    let off = std::env::var("DRAGON_OBJECTS_RMA").is_ok_and(|v| v == "0");
    if let Some(m) = m.filter(|m| m.backend() == "ofi" && !off) {
        let _ = MOVER.set(m);
    }
}

/// The mover, if this server moves large block messages by RMA.
pub(super) fn mover() -> Option<&'static BlockMover> {
    MOVER.get()
}

/// A block of some node's pool, as the wire names it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Dest {
    pub(super) node: u32,
    pub(super) r: BlockRef,
}

impl Dest {
    pub(super) fn of(node: u32, b: &Block) -> Dest {
        Dest {
            node,
            r: b.block_ref(),
        }
    }

    pub(super) fn encode(d: Option<Dest>) -> [u8; DEST_LEN] {
        let mut out = [0u8; DEST_LEN];
        let Some(d) = d else {
            out[..4].copy_from_slice(&NO_BLOCK.to_le_bytes());
            return out;
        };
        out[..4].copy_from_slice(&d.node.to_le_bytes());
        out[4..12].copy_from_slice(&d.r.segment.to_le_bytes());
        out[12..20].copy_from_slice(&d.r.offset.to_le_bytes());
        out[20..28].copy_from_slice(&d.r.len.to_le_bytes());
        out[28..32].copy_from_slice(&d.r.gen.to_le_bytes());
        out
    }

    /// `None`: "no block".
    pub(super) fn decode(b: &[u8; DEST_LEN]) -> Option<Dest> {
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let node = u32::from_le_bytes(b[..4].try_into().expect("4 bytes"));
        (node != NO_BLOCK).then(|| Dest {
            node,
            r: BlockRef {
                segment: u64_at(4),
                offset: u64_at(12),
                len: u64_at(20),
                gen: u32::from_le_bytes(b[28..32].try_into().expect("4 bytes")),
                _pad: 0,
            },
        })
    }
}

/// `b`, or a copy of its first `n` bytes in the mover's pool when `b` is in another pool
/// (the transport reads and writes only blocks of the pool it registered).
fn in_node_pool<'a>(
    m: &BlockMover,
    b: &'a Block,
    n: usize,
    copy: &'a mut Option<Block>,
) -> Result<&'a Block> {
    if b.pool().name() == m.pool().name() {
        return Ok(b);
    }
    let mut c = m.pool().alloc(n.max(1))?;
    c.as_mut_slice()[..n].copy_from_slice(&b.as_slice()[..n]);
    Ok(copy.insert(c))
}

/// Offers the block message `b` to the client by RMA (a remote get). `Ok(true)`: the bytes
/// are in the client's block and the client was told; `Ok(false)`: the client has no block
/// or the transfer failed, so the caller sends the bytes on the socket. An error is a lost
/// connection.
pub(super) fn offer(s: &mut TcpStream, m: &BlockMover, b: &Block) -> io::Result<bool> {
    let n = b.as_slice().len();
    let mut out = vec![0u8; 8];
    out.extend_from_slice(&[0, 7]);
    out.extend_from_slice(&(n as u64).to_le_bytes());
    frame(&mut out);
    s.write_all(&out)?;
    let mut d = [0u8; DEST_LEN];
    s.read_exact(&mut d)?;
    let Some(d) = Dest::decode(&d) else {
        return Ok(false);
    };
    let mut copy = None;
    let moved = in_node_pool(m, b, n, &mut copy).and_then(|src| {
        m.put_block(d.node, src, n, d.r)
            .and_then(|c| c.wait(None))
            .map_err(|e| Error::runtime(format!("RMA to node {}: {e}", d.node)))
    });
    if let Err(e) = moved {
        log::warn!(target: "dragon.objserver", "a block message goes by the socket instead: {e}");
        return Ok(false);
    }
    let mut out = vec![0u8; 8];
    out.extend_from_slice(&[0, 8]);
    frame(&mut out);
    s.write_all(&out)?;
    Ok(true)
}

/// A remote put by RMA: the request's payload is the client's [`Dest`] and the length; the
/// bytes come over the transport into a block of this node, which is sent into the channel.
pub(super) fn serve_send(
    s: &TcpStream,
    o: Result<Arc<Obj>>,
    q: &Request<'_>,
) -> std::result::Result<Result<Reply>, Left> {
    let o = match o {
        Ok(o) => o,
        Err(e) => return Ok(Err(e)),
    };
    let Obj::Channel(ch) = &*o else {
        return Ok(Err(Error::value("no such operation on this object")));
    };
    match fetch(ch, q.payload) {
        Ok(b) => channel_send_block(s, ch, b, q.timeout),
        Err(e) => Ok(Err(e)),
    }
}

/// The message a client left in a block of its node (`p`: its [`Dest`] and length), in a
/// block of `ch`'s pool.
fn fetch(ch: &Channel, p: &[u8]) -> Result<Block> {
    let m = mover().ok_or_else(|| Error::runtime("this object server has no RMA"))?;
    let (Some(d), Some(n)) = (
        p.get(..DEST_LEN)
            .and_then(|d| Dest::decode(d.try_into().expect("DEST_LEN bytes"))),
        p.get(DEST_LEN..DEST_LEN + 8)
            .map(|n| u64::from_le_bytes(n.try_into().expect("8 bytes")) as usize),
    ) else {
        return Err(Error::value("a bad RMA send"));
    };
    let here = m.pool().alloc(n.max(1))?;
    m.get_block(d.node, d.r, &here, n)
        .and_then(|c| c.wait(None))
        .map_err(|e| Error::runtime(format!("RMA from node {}: {e}", d.node)))?;
    let pool = ch.pool()?;
    if pool.name() == here.pool().name() {
        return Ok(here);
    }
    let mut b = pool.alloc(n.max(1))?;
    b.as_mut_slice()[..n].copy_from_slice(&here.as_slice()[..n]);
    Ok(b)
}

/// `(received, sent)`: block messages this process took and gave by RMA.
pub(super) fn counts() -> (u64, u64) {
    (GETS.load(Ordering::Relaxed), PUTS.load(Ordering::Relaxed))
}

pub(super) fn count_get() {
    GETS.fetch_add(1, Ordering::Relaxed);
}

pub(super) fn count_put() {
    PUTS.fetch_add(1, Ordering::Relaxed);
}
