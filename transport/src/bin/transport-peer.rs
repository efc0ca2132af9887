//! `transport-peer`: one transport endpoint in its own process, driven over stdin/stdout.
//! Used by the conformance tests (killed and stalled peers) and works with any back end.
//!
//! Usage: `transport-peer BACKEND NODE SECRET_HEX POOL_NAME [PEER_TIMEOUT_MS]`. The pool must
//! exist (the parent creates it, so nothing is left behind when this process is killed).
//! Prints `addr ADDRESS`, then reads commands, one a line:
//! * `connect NODE ADDR` -> `connected` or `error ...`
//! * `echo`: from now on, answer every message with the same bytes and every filled block
//!   with a message `filled TAG LEN CHECKSUM` (checksum: see `checksum`); never returns.
//! * `idle`: do nothing until stdin closes.
//!
//! End of stdin ends the process.

use std::io::{BufRead, Write};
use std::time::Duration;

use dragon_shm::heap::Pool;
use dragon_shm::SegmentName;
use dragon_transport::{Config, Event, NodeId, PeerAddr, Secret};

/// The FNV-1a-style 64-bit checksum the tests use (words, then tail bytes).
fn checksum(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut words = b.chunks_exact(8);
    for w in &mut words {
        let mut a = [0u8; 8];
        a.copy_from_slice(w);
        h = (h ^ u64::from_le_bytes(a)).wrapping_mul(0x0100_0000_01b3);
    }
    for &x in words.remainder() {
        h = (h ^ u64::from(x)).wrapping_mul(0x0100_0000_01b3);
    }
    h
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
            _ => {
                writeln!(out, "error unknown command").unwrap();
                out.flush().unwrap();
            }
        }
    }
}
