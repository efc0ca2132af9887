//! `transport-peer`: one transport endpoint in its own process, driven over stdin/stdout.
//! Used by the conformance tests (killed and stalled peers) and works with any back end.
//!
//! Usage: `transport-peer BACKEND NODE SECRET_HEX POOL_NAME [PEER_TIMEOUT_MS [LISTEN]]`. The
//! pool must exist (the parent creates it, so nothing is left behind when this process is
//! killed). `LISTEN` is [`Config::listen`] (default `127.0.0.1:0`).
//! Prints `addr ADDRESS`, then reads commands, one a line:
//! * `connect NODE ADDR` -> `connected` or `error ...`
//! * `echo`: from now on, answer every message with the same bytes and every filled block
//!   with a message `filled TAG LEN CHECKSUM` (checksum: see `checksum`); never returns.
//! * `idle`: do nothing until stdin closes.
//! * `send NODE HEX` -> `sent` or `error ...`
//! * `recv` -> the next event: `msg NODE HEX`, `filled NODE TAG LEN CHECKSUM`, `lost NODE`, or
//!   `error ...` (10 s timeout)
//! * `put NODE SRC_REF DST_REF LEN TAG` (block references as 64 hex digits; the source is a
//!   block of our pool) -> `done` or `error ...` once the put completed
//! * `get NODE SRC_REF DST_REF LEN` (the destination is a block of our pool) -> `done` or
//!   `error ...`
//!
//! End of stdin ends the process.

use std::io::{BufRead, Write};
use std::time::Duration;

use clap::Parser;
use dragon_shm::heap::{BlockRef, Pool};
use dragon_shm::SegmentName;
use dragon_transport::testing::{checksum, hex, ref_of_hex, unhex};
use dragon_transport::{Config, Event, NodeId, PeerAddr, Secret};

/// One transport endpoint in its own process, driven by commands on stdin, one a line.
/// Prints `addr ADDRESS` first.
#[derive(Debug, Parser)]
#[command(name = "transport-peer", version, after_help = COMMANDS)]
struct Args {
    /// Back end: tcp, ofi or ofi:PROVIDER (e.g. "ofi:tcp;ofi_rxm").
    backend: String,
    /// This endpoint's node id.
    node: u32,
    /// The runtime's secret: 64 hex digits.
    #[arg(value_name = "SECRET_HEX", value_parser = parse_secret)]
    secret: Secret,
    /// Name of this node's pool (it must exist).
    #[arg(value_name = "POOL_NAME", value_parser = parse_pool_name)]
    pool: SegmentName,
    /// A peer silent this long is lost (default: the transport's).
    #[arg(value_name = "PEER_TIMEOUT_MS")]
    peer_timeout_ms: Option<u64>,
    /// Where to listen, host:port (default 127.0.0.1:0).
    #[arg(requires = "peer_timeout_ms")]
    listen: Option<String>,
}

const COMMANDS: &str = "\
Commands on stdin (block references are 64 hex digits):
  connect NODE ADDR                 -> connected | error ...
  echo                              answer every message with itself, every filled block
                                    with `filled TAG LEN CHECKSUM`
  idle                              do nothing until stdin closes
  send NODE HEX                     -> sent | error ...
  recv                              -> msg NODE HEX | filled NODE TAG LEN CHECKSUM |
                                       lost NODE | error ...
  put NODE SRC_REF DST_REF LEN TAG  -> done | error ...
  get NODE SRC_REF DST_REF LEN      -> done | error ...
End of stdin ends the process.";

fn parse_secret(s: &str) -> Result<Secret, String> {
    Secret::from_hex(s).ok_or_else(|| "expected 64 hex digits".to_string())
}

fn parse_pool_name(s: &str) -> Result<SegmentName, String> {
    SegmentName::parse(s).map_err(|e| e.to_string())
}

const T: Duration = Duration::from_secs(10);

fn node_of(s: &str) -> NodeId {
    NodeId(s.parse().expect("node"))
}

/// A block reference from 64 hex digits (its wire form).
fn ref_of(s: &str) -> Result<BlockRef, dragon_transport::TransportError> {
    ref_of_hex(s).ok_or(dragon_transport::TransportError::Protocol(
        "bad block reference",
    ))
}

fn reply(out: &mut impl Write, r: Result<String, dragon_transport::TransportError>) {
    match r {
        Ok(s) => writeln!(out, "{s}").unwrap(),
        Err(e) => writeln!(out, "error {e}").unwrap(),
    }
    out.flush().unwrap();
}

fn main() {
    dragon_transport::logging::init_stderr();
    let a = Args::parse();
    let pool = Pool::open(&a.pool).expect("open pool");
    let mut cfg = Config::new(NodeId(a.node), a.secret, pool.clone());
    if let Some(ms) = a.peer_timeout_ms {
        cfg.peer_timeout = Duration::from_millis(ms);
    }
    if let Some(l) = a.listen {
        cfg.listen = l;
    }
    let t = dragon_transport::open(&a.backend, cfg).expect("open transport");
    let mut out = std::io::stdout().lock();
    writeln!(out, "addr {}", t.address()).unwrap();
    out.flush().unwrap();
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["connect", n, addr] => {
                let p = PeerAddr {
                    node: NodeId(n.parse().expect("node")),
                    addr: addr.to_string(),
                };
                match t.connect(&[p], Duration::from_secs(10)) {
                    Ok(()) => writeln!(out, "connected").unwrap(),
                    Err(e) => writeln!(out, "error {e}").unwrap(),
                }
                out.flush().unwrap();
            }
            ["echo"] => loop {
                match t.recv(None) {
                    Ok(Event::Message { peer, data }) => {
                        let _ = t.send(peer, &data, Some(Duration::from_secs(10)));
                    }
                    Ok(Event::BlockFilled {
                        peer,
                        block,
                        len,
                        tag,
                    }) => {
                        // SAFETY: made read-only at once: only shared borrows.
                        let sum = unsafe { pool.block(block) }
                            .map(|b| checksum(&b.read_only().as_slice()[..len as usize]))
                            .unwrap_or(0);
                        let m = format!("filled {tag} {len} {sum}");
                        let _ = t.send(peer, m.as_bytes(), Some(Duration::from_secs(10)));
                    }
                    Ok(Event::PeerLost { .. }) => {}
                    Err(_) => std::process::exit(0),
                }
            },
            ["idle"] => {}
            ["send", n, hex] => {
                let r = match unhex(hex) {
                    Some(m) => t.send(node_of(n), &m, Some(T)),
                    None => Err(dragon_transport::TransportError::Protocol("bad hex")),
                };
                reply(&mut out, r.map(|()| "sent".to_string()));
            }
            ["recv"] => {
                let r = t.recv(Some(T)).map(|ev| match ev {
                    Event::Message { peer, data } => format!("msg {} {}", peer.0, hex(&data)),
                    Event::BlockFilled {
                        peer,
                        block,
                        len,
                        tag,
                    } => {
                        // SAFETY: made read-only at once: only shared borrows.
                        let sum = unsafe { pool.block(block) }
                            .map(|b| checksum(&b.read_only().as_slice()[..len as usize]))
                            .unwrap_or(0);
                        format!("filled {} {tag} {len} {sum}", peer.0)
                    }
                    Event::PeerLost { peer } => format!("lost {}", peer.0),
                });
                reply(&mut out, r);
            }
            ["put", n, src, dst, len, tag] => {
                let r = (|| {
                    // SAFETY: made read-only at once: the transfer only reads its source.
                    let src = unsafe { pool.block(ref_of(src)?) }
                        .map_err(|_| dragon_transport::TransportError::BadRef)?
                        .read_only();
                    let done = t.put_block(
                        node_of(n),
                        &src,
                        len.parse().expect("len"),
                        ref_of(dst)?,
                        tag.parse().expect("tag"),
                    )?;
                    done.wait(Some(T))
                })();
                reply(&mut out, r.map(|()| "done".to_string()));
            }
            ["get", n, src, dst, len] => {
                let r = (|| {
                    // SAFETY: this peer never borrows the destination's bytes; the transport
                    // writes them through its own handle until the get completes.
                    let dst = unsafe { pool.block(ref_of(dst)?) }
                        .map_err(|_| dragon_transport::TransportError::BadRef)?;
                    let done =
                        t.get_block(node_of(n), ref_of(src)?, &dst, len.parse().expect("len"))?;
                    done.wait(Some(T))
                })();
                reply(&mut out, r.map(|()| "done".to_string()));
            }
            _ => {
                writeln!(out, "error unknown command").unwrap();
                out.flush().unwrap();
            }
        }
    }
}
