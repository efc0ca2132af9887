//! Mutual HMAC-SHA256 challenge-response on the runtime secret, run on every new connection
//! before any frame is decoded.
//!
//! ```text
//! client -> server  HELLO     "DRGNTP01" | client node u32 | 0u32 | client nonce [32]
//! server -> client  CHALLENGE "DRGNTP01" | server node u32 | 0u32 | server nonce [32]
//!                             | HMAC(secret, "dragon-transport server" | Nc | Ns | ids)
//! client -> server  RESPONSE  HMAC(secret, "dragon-transport client" | Ns | Nc | ids)
//! server -> client  OK        "DRGNOK01"
//! ```
//! `ids` = client node, server node (u32 LE each). The client checks the server's proof
//! before it answers; the server checks the client's proof (in constant time) before it
//! sends `OK` or reads anything else. Distinct role labels stop reflection; fresh nonces on
//! both sides stop replay. All messages have fixed sizes; a mismatch is `AuthFailed`.

use std::io::{Read, Write};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::{NodeId, Secret, TransportError};

type HmacSha256 = Hmac<Sha256>;

const MAGIC: &[u8; 8] = b"DRGNTP01";
const OK: &[u8; 8] = b"DRGNOK01";
const HELLO_LEN: usize = 48;
const CHALLENGE_LEN: usize = 80;

fn nonce() -> [u8; 32] {
    let mut n = [0u8; 32];
    for c in n.chunks_mut(8) {
        c.copy_from_slice(&dragon_shm::platform::random_u64().to_le_bytes());
    }
    n
}

fn mac(secret: &Secret, label: &[u8], a: &[u8; 32], b: &[u8; 32], ids: [u32; 2]) -> HmacSha256 {
    // HMAC accepts keys of any length: new_from_slice cannot fail.
    let mut m = match HmacSha256::new_from_slice(&secret.0) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC takes any key length"),
    };
    m.update(label);
    m.update(a);
    m.update(b);
    m.update(&ids[0].to_le_bytes());
    m.update(&ids[1].to_le_bytes());
    m
}

fn io_auth(e: std::io::Error) -> TransportError {
    match TransportError::from(e) {
        TransportError::PeerLost => TransportError::AuthFailed,
        other => other,
    }
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

/// Runs the client side on a fresh connection. Returns the server's node id. `expect`, when
/// given, must match it. The caller bounds the time (stream timeouts).
pub fn client_handshake<S: Read + Write>(
    s: &mut S,
    secret: &Secret,
    me: NodeId,
    expect: Option<NodeId>,
) -> Result<NodeId, TransportError> {
    let nc = nonce();
    let mut hello = [0u8; HELLO_LEN];
    hello[..8].copy_from_slice(MAGIC);
    hello[8..12].copy_from_slice(&me.0.to_le_bytes());
    hello[16..48].copy_from_slice(&nc);
    s.write_all(&hello).map_err(io_auth)?;
    let mut ch = [0u8; CHALLENGE_LEN];
    s.read_exact(&mut ch).map_err(io_auth)?;
    if &ch[..8] != MAGIC || ch[12..16] != [0; 4] {
        return Err(TransportError::AuthFailed);
    }
    let server = u32_at(&ch, 8);
    let mut ns = [0u8; 32];
    ns.copy_from_slice(&ch[16..48]);
    let ids = [me.0, server];
    mac(secret, b"dragon-transport server", &nc, &ns, ids)
        .verify_slice(&ch[48..80])
        .map_err(|_| TransportError::AuthFailed)?;
    if let Some(e) = expect {
        if e.0 != server {
            return Err(TransportError::Protocol("peer has another node id"));
        }
    }
    let resp = mac(secret, b"dragon-transport client", &ns, &nc, ids).finalize();
    s.write_all(&resp.into_bytes()).map_err(io_auth)?;
    let mut ok = [0u8; 8];
    s.read_exact(&mut ok).map_err(io_auth)?;
    if &ok != OK {
        return Err(TransportError::AuthFailed);
    }
    Ok(NodeId(server))
}

/// Runs the server side on an accepted connection. Returns the authenticated client's node
/// id. The caller bounds the time (stream timeouts).
pub fn server_handshake<S: Read + Write>(
    s: &mut S,
    secret: &Secret,
    me: NodeId,
) -> Result<NodeId, TransportError> {
    let mut hello = [0u8; HELLO_LEN];
    s.read_exact(&mut hello).map_err(io_auth)?;
    if &hello[..8] != MAGIC || hello[12..16] != [0; 4] {
        return Err(TransportError::AuthFailed);
    }
    let client = u32_at(&hello, 8);
    let mut nc = [0u8; 32];
    nc.copy_from_slice(&hello[16..48]);
    let ns = nonce();
    let ids = [client, me.0];
    let proof = mac(secret, b"dragon-transport server", &nc, &ns, ids).finalize();
    let mut ch = [0u8; CHALLENGE_LEN];
    ch[..8].copy_from_slice(MAGIC);
    ch[8..12].copy_from_slice(&me.0.to_le_bytes());
    ch[16..48].copy_from_slice(&ns);
    ch[48..80].copy_from_slice(&proof.into_bytes());
    s.write_all(&ch).map_err(io_auth)?;
    let mut resp = [0u8; 32];
    s.read_exact(&mut resp).map_err(io_auth)?;
    mac(secret, b"dragon-transport client", &ns, &nc, ids)
        .verify_slice(&resp)
        .map_err(|_| TransportError::AuthFailed)?;
    s.write_all(OK).map_err(io_auth)?;
    Ok(NodeId(client))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    fn pair(
        ss: Secret,
        cs: Secret,
    ) -> (
        Result<NodeId, TransportError>,
        Result<NodeId, TransportError>,
    ) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            server_handshake(&mut s, &ss, NodeId(1))
        });
        let mut c = TcpStream::connect(a).unwrap();
        let r = client_handshake(&mut c, &cs, NodeId(2), Some(NodeId(1)));
        drop(c);
        (t.join().unwrap(), r)
    }

    #[test]
    fn same_secret_passes() {
        let s = Secret::random();
        let (srv, cli) = pair(s.clone(), s);
        assert_eq!(srv, Ok(NodeId(2)));
        assert_eq!(cli, Ok(NodeId(1)));
    }

    #[test]
    fn wrong_secret_fails_both_sides() {
        let (srv, cli) = pair(Secret::random(), Secret::random());
        assert_eq!(cli, Err(TransportError::AuthFailed));
        assert_eq!(srv, Err(TransportError::AuthFailed));
    }

    #[test]
    fn hex_round_trip() {
        let s = Secret::random();
        assert_eq!(Secret::from_hex(&s.to_hex()), Some(s));
        assert_eq!(Secret::from_hex("zz"), None);
    }
}
