//! Hostile peers: a wrong secret, garbage before and after authentication (tcp frames, ofi
//! hello, side channel and fabric frames).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::*;
use dragon_shm::heap::Pool;
use dragon_shm::testing::test_runtime;
use dragon_transport::ofi::{frame_header, kind, side, OfiTransport};
use dragon_transport::wire::{encode_ref, Header, Kind};
use dragon_transport::{auth, Config, Event, NodeId, PeerAddr, Secret, Transport, TransportError};

pub(crate) fn wrong_secret_on(backend: &str) {
    let rt = test_runtime();
    let s = Secret::random();
    let a = make_node(backend, rt, 1, &s, 4 * MIB, |_| {});
    let b = make_node(backend, rt, 2, &s, 4 * MIB, |_| {});
    connect_all(&[&a, &b]);
    // An impostor dials a (lower id dials): refused.
    let bad = make_node(backend, rt, 0, &Secret::random(), 4 * MIB, |_| {});
    assert_eq!(
        bad.t.connect(&[a.addr()], T),
        Err(TransportError::AuthFailed)
    );
    // a dials an impostor with a higher id: refused too.
    let bad2 = make_node(backend, rt, 3, &Secret::random(), 4 * MIB, |_| {});
    assert_eq!(
        a.t.connect(&[bad2.addr()], T),
        Err(TransportError::AuthFailed)
    );
    assert_eq!(
        bad.t.try_send(a.id(), b"x"),
        Err(TransportError::UnknownPeer)
    );
    assert_eq!(a.t.peers(), vec![b.id()]);
    assert!(bad2.t.peers().is_empty());
    // Nothing was delivered to a; a and b still talk.
    b.t.send(a.id(), b"hello", Some(T)).unwrap();
    assert_eq!(recv_msg(&a), (b.id(), b"hello".to_vec()));
    assert_eq!(
        a.t.recv(Some(Duration::from_millis(50))).err(),
        Some(TransportError::TimedOut)
    );
    finish(rt, vec![a, b, bad, bad2]);
}

/// Reads until EOF or error: the endpoint closed the connection.
pub(crate) fn expect_dropped(mut s: TcpStream) {
    s.set_read_timeout(Some(T)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("connection not dropped: {e}"),
        }
    }
}

pub(crate) fn authed(addr: &str, s: &Secret, me: u32) -> TcpStream {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(T)).unwrap();
    auth::client_handshake(&mut c, s, NodeId(me), None).unwrap();
    c
}

pub(crate) fn garbage_frames_on(backend: &str) {
    let rt = test_runtime();
    let s = Secret::random();
    let a = make_node(backend, rt, 0, &s, 4 * MIB, |c| {
        c.handshake_timeout = Duration::from_millis(500);
    });
    let b = make_node(backend, rt, 1, &s, 4 * MIB, |_| {});
    connect_all(&[&a, &b]);
    let addr = a.t.address();
    // A silent client: does not stop a and b, dropped after the handshake timeout.
    let silent = TcpStream::connect(&addr).unwrap();
    // Junk before authentication.
    let mut junk = TcpStream::connect(&addr).unwrap();
    junk.write_all(&[0x5a; 200]).unwrap();
    expect_dropped(junk);
    // A truncated hello.
    let mut trunc = TcpStream::connect(&addr).unwrap();
    trunc.write_all(b"DRGNTP01\x09\0").unwrap();
    trunc.shutdown(std::net::Shutdown::Write).unwrap();
    expect_dropped(trunc);
    b.t.send(a.id(), b"1", Some(T)).unwrap();
    assert_eq!(recv_msg(&a).1, b"1");
    expect_dropped(silent);
    if let Some(provider) = backend.strip_prefix("ofi:") {
        garbage_after_auth_ofi(provider, rt, &s, a, b);
        return;
    }

    // Authenticated peers that then misbehave are dropped; nothing of theirs is delivered.
    let lost = |id: u32| match a.t.recv(Some(T)).unwrap() {
        Event::PeerLost { peer } => assert_eq!(peer, NodeId(id)),
        e => panic!("expected loss of {id}, got {e:?}"),
    };
    // Garbage header.
    let mut g = authed(&addr, &s, 9);
    g.write_all(&[0xee; 24]).unwrap();
    expect_dropped(g);
    lost(9);
    // Truncated message frame.
    let mut g = authed(&addr, &s, 10);
    g.write_all(&Header::new(Kind::Msg, 100, 0, 0).encode())
        .unwrap();
    g.write_all(&[1; 10]).unwrap();
    g.shutdown(std::net::Shutdown::Write).unwrap();
    expect_dropped(g);
    lost(10);
    // A message longer than the maximum.
    let mut g = authed(&addr, &s, 11);
    g.write_all(&Header::new(Kind::Msg, u32::MAX, 0, 0).encode())
        .unwrap();
    expect_dropped(g);
    lost(11);
    // A put naming a forged block (length beyond the real block): refused with a NACK, and
    // the payload drained without touching the pool; then data out of range: dropped.
    let victim = a.pool.alloc_zeroed(4096).unwrap();
    let mut forged = victim.block_ref();
    forged.len = 1 << 20;
    let mut g = authed(&addr, &s, 12);
    let mut body = Vec::new();
    body.extend_from_slice(&encode_ref(&forged));
    body.extend_from_slice(&0u64.to_le_bytes());
    g.write_all(&Header::new(Kind::PutBegin, 40, 5, 8192).encode())
        .unwrap();
    g.write_all(&body).unwrap();
    g.write_all(&Header::new(Kind::PutData, 8192, 5, 0).encode())
        .unwrap();
    g.write_all(&[0xab; 8192]).unwrap();
    let mut hb = [0u8; 24];
    loop {
        g.read_exact(&mut hb).unwrap();
        let h = Header::decode(&hb).unwrap();
        if h.kind == Kind::Heartbeat {
            continue;
        }
        assert_eq!((h.kind, h.op), (Kind::PutNack, 5));
        break;
    }
    assert!(victim.as_slice().iter().all(|&x| x == 0));
    // Real block, but data past its end.
    let mut body = Vec::new();
    body.extend_from_slice(&encode_ref(&victim.block_ref()));
    body.extend_from_slice(&0u64.to_le_bytes());
    g.write_all(&Header::new(Kind::PutBegin, 40, 6, 4096).encode())
        .unwrap();
    g.write_all(&body).unwrap();
    g.write_all(&Header::new(Kind::PutData, 16, 6, 4090).encode())
        .unwrap();
    g.write_all(&[0xcd; 16]).unwrap();
    expect_dropped(g);
    lost(12);
    assert!(victim.as_slice().iter().all(|&x| x == 0));
    still_serves(&a, &b);
    drop(victim);
    finish(rt, vec![a, b]);
}

/// The `ofi` half of `garbage_frames`: the side channel after authentication (the address
/// exchange), then fabric frames from authenticated endpoints. Every violation drops the
/// sender; nothing of it is delivered; frames with a wrong token are dropped unread.
pub(crate) fn garbage_after_auth_ofi(provider: &str, rt: u64, s: &Secret, a: Node, b: Node) {
    let addr = a.t.address();
    let lost = |id: u32| match a.t.recv(Some(T)).unwrap() {
        Event::PeerLost { peer } => assert_eq!(peer, NodeId(id)),
        e => panic!("expected loss of {id}, got {e:?}"),
    };
    // An endpoint whose fabric address the fake peers below present as theirs.
    let spare_pool = Pool::create(&pool_name(rt, 30), 4 * MIB).unwrap();
    let spare = OfiTransport::open(
        Config::new(NodeId(30), s.clone(), spare_pool.clone()),
        provider,
    )
    .unwrap();
    let hello = |prov: &str, token: u64| side::Hello {
        provider: prov.to_string(),
        addr: spare.fabric_address().to_vec(),
        base: 0,
        len: 4 * MIB as u64,
        key: 1,
        token,
        max_message: 1 << 20,
        queue_depth: 8,
    };
    let frame = |kind: u8, body: &[u8]| {
        let mut f = side::header(kind, body.len() as u32).to_vec();
        f.extend_from_slice(body);
        f
    };
    // Authenticated, then junk instead of the hello.
    let mut g = authed(&addr, s, 9);
    g.write_all(&[0xee; 24]).unwrap();
    expect_dropped(g);
    // A truncated hello, and one longer than allowed.
    let mut g = authed(&addr, s, 9);
    g.write_all(&side::header(side::HELLO, 100)).unwrap();
    g.write_all(&[1; 10]).unwrap();
    g.shutdown(std::net::Shutdown::Write).unwrap();
    expect_dropped(g);
    let mut g = authed(&addr, s, 9);
    g.write_all(&side::header(side::HELLO, u32::MAX)).unwrap();
    expect_dropped(g);
    // A well-formed hello of another provider.
    let mut g = authed(&addr, s, 9);
    g.write_all(&frame(side::HELLO, &hello("verbs;ofi_rxm", 5).encode()))
        .unwrap();
    expect_dropped(g);
    // A hello, then silence instead of READY: dropped after the handshake timeout.
    let mut g = authed(&addr, s, 9);
    g.write_all(&frame(side::HELLO, &hello(spare.provider(), 5).encode()))
        .unwrap();
    side::read_hello(&mut g).unwrap();
    expect_dropped(g);
    assert_eq!(a.t.peers(), vec![b.id()]);
    // A complete exchange makes a peer; garbage on its side channel then loses it.
    let mut g = authed(&addr, s, 9);
    g.write_all(&frame(side::HELLO, &hello(spare.provider(), 5).encode()))
        .unwrap();
    let theirs = side::read_hello(&mut g).unwrap();
    assert_eq!(theirs.provider, spare.provider());
    g.write_all(&frame(side::READY, &[])).unwrap();
    let t0 = Instant::now();
    while !a.t.peers().contains(&NodeId(9)) {
        assert!(t0.elapsed() < T, "fake peer never installed");
        std::thread::sleep(Duration::from_millis(5));
    }
    g.write_all(&[0xee; 8]).unwrap();
    expect_dropped(g);
    lost(9);

    // Fabric frames from real, authenticated endpoints (one per violation).
    let mut pools = Vec::new();
    let mut next_id = 40;
    let mut peer = |pools: &mut Vec<Pool>| {
        next_id += 1;
        let pool = Pool::create(&pool_name(rt, next_id), 4 * MIB).unwrap();
        let x = OfiTransport::open(
            Config::new(NodeId(next_id), s.clone(), pool.clone()),
            provider,
        )
        .unwrap();
        let xa = PeerAddr {
            node: x.node(),
            addr: x.address(),
        };
        a.t.connect(&[xa], T).unwrap();
        x.connect(&[a.addr()], T).unwrap();
        pools.push(pool);
        x
    };
    let hdr = |kind: u8, len: usize, a: u64, b: u64, c: u64| {
        // The header without its token and sequence number (send_raw adds them).
        frame_header(0, kind, len, a, b, c)[16..].to_vec()
    };
    let with_body = |mut h: Vec<u8>, body: &[u8]| {
        h.extend_from_slice(body);
        h
    };
    // A wrong token: dropped unread, the sender stays connected.
    let x = peer(&mut pools);
    x.send_raw(
        a.id(),
        Some(0x1234),
        &with_body(hdr(kind::MSG, 4, 4, 0, 0), b"evil"),
    )
    .unwrap();
    x.send(a.id(), b"fine", Some(T)).unwrap();
    assert_eq!(recv_msg(&a), (x.node(), b"fine".to_vec()));
    drop(x);
    lost(41);
    let victim = a.pool.alloc_zeroed(4096).unwrap();
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("unknown kind", hdr(0xee, 0, 0, 0, 0)),
        (
            "body length mismatch",
            with_body(hdr(kind::MSG, 100, 100, 0, 0), &[1; 10]),
        ),
        (
            "message too long",
            with_body(hdr(kind::MSG, 4, 1 << 40, 0, 0), b"long"),
        ),
        (
            "fragment without a start",
            with_body(hdr(kind::MSG, 4, 8, 4, 0), b"late"),
        ),
        ("credit flood", hdr(kind::CREDIT, 0, 1 << 40, 0, 0)),
        ("end of an unknown get", hdr(kind::GET_DONE, 0, 99, 0, 0)),
    ];
    let mut reserved = hdr(kind::CREDIT, 0, 1, 0, 0);
    reserved[2] = 1;
    cases.push(("nonzero reserved bytes", reserved));
    // A put whose source lies outside the sender's region: refused (NACK) before any read;
    // the NACK of an op the sender never started makes it drop us in turn.
    let mut body = Vec::new();
    body.extend_from_slice(&encode_ref(&victim.block_ref()));
    body.extend_from_slice(&0u64.to_le_bytes());
    body.extend_from_slice(&(1u64 << 50).to_le_bytes());
    cases.push((
        "source out of range",
        with_body(hdr(kind::PUT_REQ, 48, 7, 4096, 0), &body),
    ));
    for (what, f) in cases {
        let x = peer(&mut pools);
        x.send_raw(a.id(), None, &f).unwrap();
        match a.t.recv(Some(T)).unwrap() {
            Event::PeerLost { peer } => assert_eq!(peer, x.node(), "{what}"),
            e => panic!("{what}: expected a loss, got {e:?}"),
        }
    }
    // A forged block reference (length beyond the real block) in a real put: refused by the
    // target, and the pool is untouched.
    let x = peer(&mut pools);
    let mut src = pools.last().unwrap().alloc(4096).unwrap();
    src.as_mut_slice().fill(0xab);
    let mut forged = victim.block_ref();
    forged.len = 1 << 20;
    let done = x.put_block(a.id(), &src, 4096, forged, 0).unwrap();
    assert_eq!(done.wait(Some(T)), Err(TransportError::BadRef));
    assert!(victim.as_slice().iter().all(|&v| v == 0));
    drop((src, x));
    lost(next_id);
    still_serves(&a, &b);
    drop((victim, spare, spare_pool, pools));
    finish(rt, vec![a, b]);
}
