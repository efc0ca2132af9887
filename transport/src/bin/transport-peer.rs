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

use dragon_shm::heap::{BlockRef, Pool};
use dragon_shm::SegmentName;
use dragon_transport::testing::{checksum, hex, ref_of_hex, unhex};
use dragon_transport::{Config, Event, NodeId, PeerAddr, Secret};

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
    let a: Vec<String> = std::env::args().skip(1).collect();
    if a.len() < 4 {
        eprintln!("usage: transport-peer BACKEND NODE SECRET_HEX POOL_NAME [PEER_TIMEOUT_MS]");
        std::process::exit(2);
    }
    let node = NodeId(a[1].parse().expect("node id"));
    let secret = Secret::from_hex(&a[2]).expect("secret");
    let pool = Pool::open(&SegmentName::parse(&a[3]).expect("pool name")).expect("open pool");
    let mut cfg = Config::new(node, secret, pool.clone());
    if let Some(ms) = a.get(4) {
        cfg.peer_timeout = Duration::from_millis(ms.parse().expect("timeout"));
    }
    if let Some(l) = a.get(5) {
        cfg.listen = l.clone();
    }
    let t = dragon_transport::open(&a[0], cfg).expect("open transport");
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
                        let sum = pool
                            .block(block)
                            .map(|b| checksum(&b.as_slice()[..len as usize]))
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
                        let sum = pool
                            .block(block)
                            .map(|b| checksum(&b.as_slice()[..len as usize]))
                            .unwrap_or(0);
                        format!("filled {} {tag} {len} {sum}", peer.0)
                    }
                    Event::PeerLost { peer } => format!("lost {}", peer.0),
                });
                reply(&mut out, r);
            }
            ["put", n, src, dst, len, tag] => {
                let r = (|| {
                    let src = pool
                        .block(ref_of(src)?)
                        .map_err(|_| dragon_transport::TransportError::BadRef)?;
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
                    let dst = pool
                        .block(ref_of(dst)?)
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
