//! `dragon-transport`: moving bytes and pool blocks between nodes.
//!
//! One [`Transport`] endpoint per node. Each node has a [`NodeId`] and an endpoint address
//! string ([`Transport::address`]); the runtime carries `(NodeId, address)` pairs to every
//! node (the bootstrap) and each node calls [`Transport::connect`] with the others.
//!
//! * Small messages ([`Transport::send`], [`Transport::try_send`]) are ordered per peer and
//!   flow-controlled by a per-peer credit window ([`Config::queue_depth`]): a sender never has
//!   more than `queue_depth` messages that the receiving application has not yet taken with
//!   [`Transport::recv`]. `try_send` then fails with [`TransportError::Full`]; `send` waits up
//!   to its timeout.
//! * Large payloads move pool block to pool block ([`Transport::put_block`],
//!   [`Transport::get_block`]): the bytes land straight in the destination block, which the
//!   receiving node resolves in its own [`Pool`]. The initiator gets a [`Completion`]; the
//!   target of a put gets an [`Event::BlockFilled`].
//! * Every connection starts with a mutual HMAC-SHA256 challenge-response on a per-runtime
//!   [`Secret`] ([`auth`]); nothing else from a peer is decoded before it passes.
//! * A peer that dies, disconnects, stalls past [`Config::peer_timeout`] or breaks the
//!   protocol is *lost*: every pending operation towards it fails with
//!   [`TransportError::PeerLost`], an [`Event::PeerLost`] is queued, other peers go on.
//!
//! Back ends: [`tcp`] (always available) and [`ofi`] (libfabric RMA, loaded at run time; see
//! [`config`] for choosing the provider and the library). The trait is object-safe; [`open`]
//! picks a back end by name so that tests, benchmarks and the runtime are written once for all
//! back ends; [`open_or_fallback`] falls back from `ofi` to `tcp` with a one-line notice when
//! libfabric cannot be used.
//!
//! Diagnostics are [`tracing`](https://docs.rs/tracing) events (target `dragon_transport`);
//! binaries show them on stderr with [`logging::init_stderr`], filtered by `DRAGON_LOG`.
//!
//! Ordering: messages are ordered per peer; block transfers are ordered among themselves per
//! peer; there is no ordering between a message and a block transfer (wait for the
//! [`Completion`] or the [`Event::BlockFilled`]).

#![warn(missing_docs)]

pub mod auth;
mod common;
mod completion;
pub mod config;
pub mod logging;
pub mod ofi;
pub mod tcp;
pub mod testing;
pub mod wire;

use std::fmt;
use std::time::Duration;

use dragon_shm::heap::{Block, BlockRef, Pool};

pub use completion::Completion;

/// Identity of a node inside one runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub u32);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node {}", self.0)
    }
}

/// A peer as the bootstrap describes it: its id and its endpoint address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAddr {
    /// The peer's node id.
    pub node: NodeId,
    /// What the peer's [`Transport::address`] returned.
    pub addr: String,
}

/// Errors of transport operations.
///
/// `#[non_exhaustive]`: match it with a wildcard arm; new causes may be added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The peer died, disconnected, stopped answering or broke the protocol.
    #[error("peer lost")]
    PeerLost,
    /// The timeout passed first.
    #[error("timed out")]
    TimedOut,
    /// The peer's credit window is exhausted (`try_send`).
    #[error("peer queue full")]
    Full,
    /// This endpoint was closed.
    #[error("transport closed")]
    Closed,
    /// A block handle names no live block, or the range does not fit the block.
    #[error("bad block reference or range")]
    BadRef,
    /// The other side failed (or we failed) the authentication handshake.
    #[error("authentication failed")]
    AuthFailed,
    /// The peer sent something the protocol does not allow.
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// An operating-system error.
    #[error("I/O error: {0}")]
    Io(std::io::ErrorKind),
    /// No connection to this node was ever made.
    #[error("unknown peer")]
    UnknownPeer,
    /// A message is longer than [`Config::max_message`].
    #[error("message too large")]
    TooLarge,
    /// The back end cannot be used on this machine (e.g. libfabric is not installed).
    #[error("transport back end not available here")]
    Unavailable,
}

impl From<std::io::Error> for TransportError {
    fn from(e: std::io::Error) -> Self {
        use std::io::ErrorKind as K;
        match e.kind() {
            K::WouldBlock | K::TimedOut => TransportError::TimedOut,
            K::UnexpectedEof
            | K::ConnectionReset
            | K::ConnectionAborted
            | K::BrokenPipe
            | K::NotConnected => TransportError::PeerLost,
            k => TransportError::Io(k),
        }
    }
}

/// Result of transport operations.
pub type Result<T> = std::result::Result<T, TransportError>;

/// What [`Transport::recv`] returns.
#[derive(Debug)]
pub enum Event {
    /// A small message, in the order the peer sent it.
    Message {
        /// Sender.
        peer: NodeId,
        /// The bytes.
        data: Vec<u8>,
    },
    /// A peer's [`Transport::put_block`] filled `len` bytes at the start of `block` (a block
    /// of this node's pool).
    BlockFilled {
        /// Sender.
        peer: NodeId,
        /// The block that received the bytes.
        block: BlockRef,
        /// Bytes written (from offset 0).
        len: u64,
        /// The sender's tag.
        tag: u64,
    },
    /// The connection to this peer is gone; its pending operations failed with `PeerLost`.
    PeerLost {
        /// The lost peer.
        peer: NodeId,
    },
}

/// The per-runtime shared secret (32 bytes) peers authenticate with.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub [u8; 32]);

impl Secret {
    /// A fresh random secret.
    pub fn random() -> Secret {
        let mut s = [0u8; 32];
        for c in s.chunks_mut(8) {
            c.copy_from_slice(&dragon_shm::platform::random_u64().to_le_bytes());
        }
        Secret(s)
    }

    /// Lower-case hex, 64 digits (for handing to child processes).
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses [`to_hex`](Self::to_hex)'s output.
    pub fn from_hex(s: &str) -> Option<Secret> {
        if s.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Secret(out))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Settings of one endpoint; [`Config::new`] fills in defaults.
#[derive(Debug, Clone)]
pub struct Config {
    /// This node's id.
    pub node: NodeId,
    /// The runtime's secret.
    pub secret: Secret,
    /// This node's pool: targets of incoming puts and sources of incoming gets resolve here.
    pub pool: Pool,
    /// Where to listen (`host:port`, port 0 = any). Default `127.0.0.1:0`.
    pub listen: String,
    /// Credit window per peer: messages sent and not yet received by the peer's application.
    pub queue_depth: usize,
    /// Longest small message in bytes (both sides must agree). Default 1 MiB.
    pub max_message: usize,
    /// Idle connections send a heartbeat this often. Default 250 ms.
    pub heartbeat: Duration,
    /// A peer silent (or not draining its socket) this long is lost. Default 3 s.
    pub peer_timeout: Duration,
    /// Time an incoming connection has to complete authentication. Default 2 s.
    pub handshake_timeout: Duration,
}

impl Config {
    /// Defaults for `node` with `secret` and `pool`.
    pub fn new(node: NodeId, secret: Secret, pool: Pool) -> Config {
        Config {
            node,
            secret,
            pool,
            listen: "127.0.0.1:0".into(),
            queue_depth: 256,
            max_message: 1 << 20,
            heartbeat: Duration::from_millis(250),
            peer_timeout: Duration::from_secs(3),
            handshake_timeout: Duration::from_secs(2),
        }
    }
}

/// A node's endpoint. Object-safe: back ends are used as `Box<dyn Transport>`. All methods
/// take `&self` and may be called from any thread.
pub trait Transport: Send + Sync + fmt::Debug {
    /// This node's id.
    fn node(&self) -> NodeId;

    /// The back end's name: `tcp` or `ofi` (what [`open_or_fallback`] actually opened).
    fn backend(&self) -> &'static str;

    /// The endpoint address to publish through the bootstrap.
    fn address(&self) -> String;

    /// Connects to every listed peer (skipping this node and peers already connected) and
    /// waits until all are connected and authenticated, or `timeout` passes. Peers may also
    /// connect to us on their own; their connections are accepted in the background.
    fn connect(&self, peers: &[PeerAddr], timeout: Duration) -> Result<()>;

    /// Peers currently connected (not lost).
    fn peers(&self) -> Vec<NodeId>;

    /// Sends a small message, waiting up to `timeout` (`None`: forever) for credit.
    fn send(&self, peer: NodeId, msg: &[u8], timeout: Option<Duration>) -> Result<()>;

    /// Sends a small message or fails with [`TransportError::Full`] at once.
    fn try_send(&self, peer: NodeId, msg: &[u8]) -> Result<()>;

    /// The next event, waiting up to `timeout` (`None`: forever).
    fn recv(&self, timeout: Option<Duration>) -> Result<Event>;

    /// Copies bytes `[0, len)` of the local block `src` into bytes `[0, len)` of `dst`, a
    /// block of `peer`'s pool. The transport keeps its own hold on `src` until done. The
    /// peer gets [`Event::BlockFilled`] with `tag`; the returned [`Completion`] finishes when
    /// the peer has the bytes.
    ///
    /// Memory contract (not enforced by the types: see "Aliasing" on
    /// [`dragon_shm::heap::Block`]): until the completion finishes, `src` is read by the
    /// transport and must not be written, and nothing on the peer may borrow `dst`'s bytes,
    /// which the transport writes through its own handle.
    fn put_block(
        &self,
        peer: NodeId,
        src: &Block,
        len: usize,
        dst: BlockRef,
        tag: u64,
    ) -> Result<Completion>;

    /// Copies bytes `[0, len)` of `src`, a block of `peer`'s pool, into bytes `[0, len)` of
    /// the local block `dst`. The [`Completion`] finishes when the bytes are in `dst`.
    ///
    /// Memory contract (as for [`put_block`](Self::put_block)): until the completion
    /// finishes, nothing in this process may borrow `dst`'s bytes (the transport writes them
    /// through its own handle), and `src` must not be written on the peer.
    fn get_block(&self, peer: NodeId, src: BlockRef, dst: &Block, len: usize)
        -> Result<Completion>;

    /// Closes every connection and stops the endpoint's threads; pending operations fail
    /// with [`TransportError::Closed`]. Idempotent; also done on drop.
    fn close(&self);
}

/// Names of the back ends built into this crate. `ofi` may still be unavailable at run time
/// (see [`ofi::available`]).
pub fn backends() -> &'static [&'static str] {
    &["tcp", "ofi"]
}

/// Opens an endpoint of the named back end: `tcp`, `ofi` (provider from
/// [`config::ofi_provider`]) or `ofi:PROVIDER` (e.g. `ofi:shm`, `ofi:tcp;ofi_rxm`).
pub fn open(backend: &str, cfg: Config) -> Result<Box<dyn Transport>> {
    match backend {
        "tcp" => Ok(Box::new(tcp::TcpTransport::bind(cfg)?)),
        "ofi" => Ok(Box::new(ofi::OfiTransport::open(
            cfg,
            &config::ofi_provider(),
        )?)),
        b => match b.strip_prefix("ofi:") {
            Some(p) if !p.is_empty() => Ok(Box::new(ofi::OfiTransport::open(cfg, p)?)),
            _ => Err(TransportError::Protocol("unknown transport back end")),
        },
    }
}

/// Like [`open`], but when an `ofi` back end cannot be used here (libfabric missing, or the
/// provider unavailable) logs `libfabric not available (REASON); using tcp` once per process
/// (a `tracing` warning, see [`logging`]) and opens `tcp` instead.
pub fn open_or_fallback(backend: &str, cfg: Config) -> Result<Box<dyn Transport>> {
    if backend == "ofi" || backend.starts_with("ofi:") {
        let provider = match backend.strip_prefix("ofi:") {
            Some(p) => p.to_string(),
            None => config::ofi_provider(),
        };
        let reason = match ofi::available() {
            Err(e) => Some(e),
            Ok(_) => ofi::probe(&provider).err(),
        };
        if let Some(r) = reason {
            ofi::fallback_notice(&r);
            return open("tcp", cfg);
        }
        return match open(backend, cfg.clone()) {
            Err(TransportError::Unavailable) => {
                ofi::fallback_notice(&format!("provider {provider} failed to open"));
                open("tcp", cfg)
            }
            r => r,
        };
    }
    open(backend, cfg)
}
