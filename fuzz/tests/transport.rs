//! Transport decoders run on bytes from the network: the TCP back end's frame header and
//! block references, the authentication handshake (both sides), and the ofi back end's
//! side-channel frames and HELLO. Mutated real encodings must give a value or an error,
//! never a panic; encoders round-trip.

use std::io::{Read, Write};

use dragon_fuzz::{run, Rng};
use dragon_shm::heap::BlockRef;
use dragon_transport::auth::{client_handshake, server_handshake};
use dragon_transport::ofi::side::{self, Hello};
use dragon_transport::wire::{decode_ref, encode_ref, Header, Kind, HEADER_LEN};
use dragon_transport::{NodeId, Secret, TransportError};

const KINDS: [Kind; 10] = [
    Kind::Msg,
    Kind::Credit,
    Kind::Heartbeat,
    Kind::PutBegin,
    Kind::PutData,
    Kind::PutAck,
    Kind::PutNack,
    Kind::GetReq,
    Kind::GetData,
    Kind::GetNack,
];

fn random_header(rng: &mut Rng) -> Header {
    Header::new(
        *rng.pick(&KINDS),
        rng.interesting() as u32,
        rng.interesting(),
        rng.interesting(),
    )
}

#[test]
fn fuzz_frame_headers_and_block_refs() {
    let mut seed = Rng::new(1);
    let corpus: Vec<Vec<u8>> = (0..20)
        .map(|_| {
            let mut b = random_header(&mut seed).encode().to_vec();
            b.extend_from_slice(&encode_ref(&BlockRef {
                segment: seed.interesting(),
                offset: seed.interesting(),
                len: seed.interesting(),
                gen: seed.u64() as u32,
                _pad: 0,
            }));
            b
        })
        .collect();
    let mut ok = 0u64;
    run("transport-frame-header", 50_000, &corpus, |rng, b| {
        // Exactly one header's bytes, as the reader reads them.
        let mut hb = [0u8; HEADER_LEN];
        let n = b.len().min(HEADER_LEN);
        hb[..n].copy_from_slice(&b[..n]);
        if let Ok(h) = Header::decode(&hb) {
            ok += 1;
            assert_eq!(h.encode(), hb, "a decoded header re-encodes to its bytes");
        }
        // Arbitrary headers and refs round-trip.
        let h = random_header(rng);
        assert_eq!(Header::decode(&h.encode()), Ok(h));
        let mut rb = [0u8; 32];
        let m = b.len().saturating_sub(HEADER_LEN).min(32);
        rb[..m].copy_from_slice(&b[HEADER_LEN.min(b.len())..HEADER_LEN.min(b.len()) + m]);
        rb[28..].fill(0);
        assert_eq!(encode_ref(&decode_ref(&rb)), rb);
    });
    assert!(ok > 0);
}

/// A stream that yields `input` to reads (then end of file) and swallows writes.
struct Scripted<'a> {
    input: &'a [u8],
    written: usize,
}

impl Read for Scripted<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.input.len());
        buf[..n].copy_from_slice(&self.input[..n]);
        self.input = &self.input[n..];
        Ok(n)
    }
}

impl Write for Scripted<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.written += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn fuzz_handshake_both_sides() {
    let secret = Secret([7; 32]);
    // What each side reads from an honest peer: a HELLO + RESPONSE (server side), a
    // CHALLENGE + OK (client side). The proofs cannot match fresh nonces, so no mutation may
    // authenticate; every outcome must be an error, never a panic or a wrong success.
    let mut hello = b"DRGNTP01".to_vec();
    hello.extend_from_slice(&2u32.to_le_bytes());
    hello.extend_from_slice(&[0; 4]);
    hello.extend_from_slice(&[0x11; 32]);
    let mut server_in = hello.clone();
    server_in.extend_from_slice(&[0x22; 32]);
    let mut client_in = b"DRGNTP01".to_vec();
    client_in.extend_from_slice(&1u32.to_le_bytes());
    client_in.extend_from_slice(&[0; 4]);
    client_in.extend_from_slice(&[0x33; 32]);
    client_in.extend_from_slice(&[0x44; 32]);
    client_in.extend_from_slice(b"DRGNOK01");
    let corpus = vec![server_in, client_in];
    run("transport-handshake", 20_000, &corpus, |_, b| {
        let mut s = Scripted {
            input: b,
            written: 0,
        };
        let r = server_handshake(&mut s, &secret, NodeId(1));
        assert!(
            matches!(
                r,
                Err(TransportError::AuthFailed) | Err(TransportError::PeerLost)
            ),
            "{r:?}"
        );
        let mut s = Scripted {
            input: b,
            written: 0,
        };
        let r = client_handshake(&mut s, &secret, NodeId(2), Some(NodeId(1)));
        assert!(r.is_err(), "{r:?}");
        assert!(s.written <= 48 + 32);
    });
}

fn hello(rng: &mut Rng) -> Hello {
    let pl = 1 + rng.below(side::PROV_MAX);
    let al = 1 + rng.below(side::ADDR_MAX);
    Hello {
        provider: (0..pl)
            .map(|_| char::from(b'a' + rng.below(26) as u8))
            .collect(),
        addr: rng.bytes(al),
        base: rng.interesting(),
        len: rng.interesting(),
        key: rng.interesting(),
        token: rng.interesting().max(1),
        max_message: rng.interesting(),
        queue_depth: rng.interesting().max(1),
    }
}

#[test]
fn fuzz_ofi_side_channel_hello() {
    let mut seed = Rng::new(2);
    let corpus: Vec<Vec<u8>> = (0..10)
        .map(|i| {
            let h = hello(&mut seed);
            let mut f = Vec::new();
            side::write_frame(&mut f, side::HELLO, &h.encode()).unwrap();
            if i % 2 == 0 {
                side::write_frame(&mut f, side::READY, &[]).unwrap();
            }
            f
        })
        .collect();
    let mut ok = 0u64;
    run("transport-ofi-hello", 20_000, &corpus, |rng, b| {
        // The body alone, and the framed stream as the side channel reads it.
        if let Some(body) = b.get(side::HDR..) {
            if let Ok(h) = Hello::decode(body) {
                ok += 1;
                assert_eq!(h.encode(), body, "a decoded hello re-encodes to its bytes");
            }
        }
        let mut r = b;
        if side::read_hello(&mut r).is_ok() {
            let _ = side::read_ready(&mut r);
        }
        let h = hello(rng);
        assert_eq!(Hello::decode(&h.encode()), Ok(h));
    });
    assert!(ok > 0);
}
