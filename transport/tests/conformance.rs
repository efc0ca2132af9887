//! Conformance suite for every transport back end. Each check is a function of the back
//! end's name (`dragon_transport::open(name, ..)`); each `#[test]` runs it for every instance
//! in `INSTANCES` (`tcp`, and `ofi` over the `tcp;ofi_rxm` and `shm` providers), so a new back
//! end is tested by adding its name there (`every_backend_is_listed` checks `backends()`).
//! An `ofi` instance that cannot run here is skipped with `SKIP ...: REASON` on stderr.
//!
//! Every test uses its own random runtime id for pool names, checks that no segment of it is
//! left, and ends every process it starts.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use dragon_shm::heap::{Block, BlockRef, Pool};
use dragon_shm::testing::{leftovers, test_runtime};
use dragon_shm::{SegmentKind, SegmentName};
use dragon_transport::ofi::{frame_header, kind, side, OfiTransport};
use dragon_transport::testing::checksum;
use dragon_transport::wire::{decode_ref, encode_ref, Header, Kind};
use dragon_transport::{
    auth, backends, Config, Event, NodeId, PeerAddr, Secret, Transport, TransportError,
};
use support::{peer_args, ChildPeer};

const T: Duration = Duration::from_secs(10);
const MIB: usize = 1 << 20;

// ---- helpers ------------------------------------------------------------------------------

struct Node {
    t: Box<dyn Transport>,
    pool: Pool,
}

impl Node {
    fn id(&self) -> NodeId {
        self.t.node()
    }
    fn addr(&self) -> PeerAddr {
        PeerAddr {
            node: self.t.node(),
            addr: self.t.address(),
        }
    }
}

fn pool_name(rt: u64, node: u32) -> SegmentName {
    SegmentName::new(rt, node, SegmentKind::Pool, 1)
}

fn make_node(
    backend: &str,
    rt: u64,
    id: u32,
    secret: &Secret,
    pool_bytes: usize,
    tweak: impl FnOnce(&mut Config),
) -> Node {
    let pool = Pool::create(&pool_name(rt, id), pool_bytes).expect("pool");
    let mut cfg = Config::new(NodeId(id), secret.clone(), pool.clone());
    tweak(&mut cfg);
    let t = dragon_transport::open(backend, cfg).expect("open");
    Node { t, pool }
}

fn connect_all(nodes: &[&Node]) {
    let addrs: Vec<PeerAddr> = nodes.iter().map(|n| n.addr()).collect();
    for n in nodes {
        n.t.connect(&addrs, T).expect("connect");
    }
}

fn fill(b: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    let mut words = b.chunks_exact_mut(8);
    for w in &mut words {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes());
    }
    for (i, t) in words.into_remainder().iter_mut().enumerate() {
        *t = (seed as u8).wrapping_add(i as u8);
    }
}

/// The next message, skipping nothing: anything else is a failure.
fn recv_msg(n: &Node) -> (NodeId, Vec<u8>) {
    match n.t.recv(Some(T)).expect("recv") {
        Event::Message { peer, data } => (peer, data),
        e => panic!("expected a message, got {e:?}"),
    }
}

fn finish(rt: u64, nodes: Vec<Node>) {
    for n in &nodes {
        n.t.close();
    }
    drop(nodes);
    assert!(
        leftovers(rt).is_empty(),
        "segments left: {:?}",
        leftovers(rt)
    );
}

/// After dropping a bad peer, `a` has only `b` left and still serves it both ways, and
/// nothing else arrived at `a`.
fn still_serves(a: &Node, b: &Node) {
    assert_eq!(a.t.peers(), vec![b.id()]);
    a.t.send(b.id(), b"2", Some(T)).unwrap();
    assert_eq!(recv_msg(b).1, b"2");
    put_and_check(b, a, 100_000, 4);
    assert_eq!(
        a.t.recv(Some(Duration::from_millis(50))).err(),
        Some(TransportError::TimedOut)
    );
}

/// A `transport-peer` child on this host.
fn spawn_child(
    backend: &str,
    node: u32,
    secret: &Secret,
    pool: &Pool,
    timeout_ms: u64,
) -> ChildPeer {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_transport-peer"));
    cmd.args(peer_args(backend, node, secret, pool, timeout_ms, None));
    ChildPeer::spawn(cmd, "transport-peer")
}

/// Connects a node of this process (lower id, it dials) and a child peer.
fn connect_child(n: &Node, c: &mut ChildPeer, child_id: u32) {
    c.cmd(&format!("connect {} {}", n.id().0, n.t.address()));
    n.t.connect(
        &[PeerAddr {
            node: NodeId(child_id),
            addr: c.addr.clone(),
        }],
        T,
    )
    .expect("connect child");
    assert_eq!(c.line(), "connected");
}

// ---- checks (one per back end) --------------------------------------------------------------

fn ordering_on(backend: &str) {
    let rt = test_runtime();
    let s = Secret::random();
    let nodes: Vec<Node> = (0..3)
        .map(|i| make_node(backend, rt, i, &s, 4 * MIB, |_| {}))
        .collect();
    connect_all(&nodes.iter().collect::<Vec<_>>());
    const N: u32 = 5000;
    std::thread::scope(|sc| {
        for from in [0usize, 2] {
            let t = &nodes[from].t;
            sc.spawn(move || {
                for i in 0..N {
                    let len = 4 + (i as usize * 37) % 300;
                    let mut m = vec![from as u8; len];
                    m[..4].copy_from_slice(&i.to_le_bytes());
                    t.send(NodeId(1), &m, Some(T)).unwrap();
                }
            });
        }
        let mut next = [0u32; 3];
        for _ in 0..2 * N {
            let (p, d) = recv_msg(&nodes[1]);
            let i = u32::from_le_bytes(d[..4].try_into().unwrap());
            assert_eq!(i, next[p.0 as usize], "out of order from {p}");
            assert_eq!(d.len(), 4 + (i as usize * 37) % 300);
            assert!(d[4..].iter().all(|&b| b == p.0 as u8));
            next[p.0 as usize] += 1;
        }
    });
    finish(rt, nodes);
}

/// Messages from empty to the largest allowed, around the `ofi` fragment size, from two
/// senders at once: whole, intact and in order.
fn large_messages_on(backend: &str) {
    let rt = test_runtime();
    let s = Secret::random();
    let nodes: Vec<Node> = (0..3)
        .map(|i| make_node(backend, rt, i, &s, 4 * MIB, |c| c.queue_depth = 16))
        .collect();
    connect_all(&nodes.iter().collect::<Vec<_>>());
    let frag = dragon_transport::ofi::SLOT - dragon_transport::ofi::FRAME_HDR;
    let sizes = [
        0,
        1,
        frag - 1,
        frag,
        frag + 1,
        3 * frag + 7,
        100_000,
        MIB - 1,
        MIB,
    ];
    std::thread::scope(|sc| {
        for from in [0usize, 2] {
            let t = &nodes[from].t;
            sc.spawn(move || {
                for round in 0..3u64 {
                    for (k, &len) in sizes.iter().enumerate() {
                        let mut m = vec![0u8; len];
                        fill(&mut m, round * 100 + k as u64 + from as u64 * 1000);
                        t.send(NodeId(1), &m, Some(T)).unwrap();
                    }
                }
            });
        }
        let mut next = [0usize; 3];
        for _ in 0..2 * 3 * sizes.len() {
            let (p, d) = recv_msg(&nodes[1]);
            let i = next[p.0 as usize];
            let (round, k) = (i / sizes.len(), i % sizes.len());
            assert_eq!(d.len(), sizes[k], "message {i} from {p}");
            let mut want = vec![0u8; sizes[k]];
            fill(
                &mut want,
                round as u64 * 100 + k as u64 + u64::from(p.0) * 1000,
            );
            assert!(d == want, "message {i} from {p} corrupted");
            next[p.0 as usize] += 1;
        }
    });
    // One byte over the maximum is refused locally.
    assert_eq!(
        nodes[0].t.try_send(NodeId(1), &vec![0u8; MIB + 1]),
        Err(TransportError::TooLarge)
    );
    finish(rt, nodes);
}

fn back_pressure_on(backend: &str) {
    let rt = test_runtime();
    let s = Secret::random();
    let depth = 8;
    let a = make_node(backend, rt, 0, &s, 4 * MIB, |c| c.queue_depth = depth);
    let b = make_node(backend, rt, 1, &s, 4 * MIB, |c| c.queue_depth = depth);
    connect_all(&[&a, &b]);
    for i in 0..depth {
        a.t.try_send(b.id(), &[i as u8]).unwrap();
    }
    assert_eq!(a.t.try_send(b.id(), b"x"), Err(TransportError::Full));
    let t0 = Instant::now();
    assert_eq!(
        a.t.send(b.id(), b"x", Some(Duration::from_millis(100))),
        Err(TransportError::TimedOut)
    );
    assert!(t0.elapsed() >= Duration::from_millis(100));
    // A blocked sender is released once the receiver takes messages.
    std::thread::scope(|sc| {
        let h = sc.spawn(|| a.t.send(b.id(), &[200], Some(T)));
        for i in 0..depth {
            assert_eq!(recv_msg(&b).1, vec![i as u8]);
        }
        h.join().unwrap().unwrap();
        assert_eq!(recv_msg(&b).1, vec![200]);
    });
    // Too large for the configured maximum.
    let big = vec![0u8; (1 << 20) + 1];
    assert_eq!(a.t.try_send(b.id(), &big), Err(TransportError::TooLarge));
    assert_eq!(
        a.t.try_send(NodeId(77), b"x"),
        Err(TransportError::UnknownPeer)
    );
    finish(rt, vec![a, b]);
}

fn put_and_check(a: &Node, b: &Node, len: usize, seed: u64) {
    let mut src = a.pool.alloc(len).unwrap();
    fill(src.as_mut_slice(), seed);
    let want = checksum(src.as_slice());
    let dst = b.pool.alloc_zeroed(len).unwrap();
    let done =
        a.t.put_block(b.id(), &src, len, dst.block_ref(), seed)
            .unwrap();
    drop(src); // the transport keeps its own hold
    done.wait(Some(T)).unwrap();
    match b.t.recv(Some(T)).unwrap() {
        Event::BlockFilled {
            peer,
            block,
            len: l,
            tag,
        } => {
            assert_eq!(
                (peer, block, l as usize, tag),
                (a.id(), dst.block_ref(), len, seed)
            );
        }
        e => panic!("expected BlockFilled, got {e:?}"),
    }
    assert_eq!(checksum(dst.as_slice()), want, "put of {len} bytes");
    // And back with a get, into a fresh block of a.
    let back = a.pool.alloc_zeroed(len).unwrap();
    let g = a.t.get_block(b.id(), dst.block_ref(), &back, len).unwrap();
    g.wait(Some(T)).unwrap();
    assert_eq!(checksum(back.as_slice()), want, "get of {len} bytes");
}

fn payloads_on(backend: &str) {
    let rt = test_runtime();
    let s = Secret::random();
    let a = make_node(backend, rt, 0, &s, 300 * MIB, |_| {});
    let b = make_node(backend, rt, 1, &s, 300 * MIB, |_| {});
    connect_all(&[&a, &b]);
    for (i, len) in [
        1,
        7,
        64 << 10,
        (1 << 20) + 3,
        (2 << 20) + 1,
        16 << 20,
        256 << 20,
    ]
    .into_iter()
    .enumerate()
    {
        put_and_check(&a, &b, len, 1000 + i as u64);
    }
    // Several puts in flight at once complete, each with its event.
    let srcs: Vec<Block> = (0..8)
        .map(|i| {
            let mut x = a.pool.alloc(100_000 + i).unwrap();
            fill(x.as_mut_slice(), i as u64);
            x
        })
        .collect();
    let dsts: Vec<Block> = srcs
        .iter()
        .map(|x| b.pool.alloc(x.len()).unwrap())
        .collect();
    let dones: Vec<_> = srcs
        .iter()
        .zip(&dsts)
        .enumerate()
        .map(|(i, (x, d))| {
            a.t.put_block(b.id(), x, x.len(), d.block_ref(), i as u64)
                .unwrap()
        })
        .collect();
    for d in &dones {
        d.wait(Some(T)).unwrap();
    }
    for i in 0..8u64 {
        match b.t.recv(Some(T)).unwrap() {
            Event::BlockFilled { tag, .. } => assert_eq!(tag, i, "puts complete in order"),
            e => panic!("{e:?}"),
        }
    }
    for (x, d) in srcs.iter().zip(&dsts) {
        assert_eq!(checksum(x.as_slice()), checksum(d.as_slice()));
    }
    // Bad references: refused locally when the length is visibly wrong, by the target
    // when the handle is stale, and the connection keeps working.
    let x = a.pool.alloc(4096).unwrap();
    let small = b.pool.alloc(100).unwrap();
    assert_eq!(
        a.t.put_block(b.id(), &x, 4096, small.block_ref(), 0).err(),
        Some(TransportError::BadRef)
    );
    let mut stale: BlockRef = small.block_ref();
    stale.gen ^= 0x55;
    let done = a.t.put_block(b.id(), &x, 100, stale, 0).unwrap();
    assert_eq!(done.wait(Some(T)), Err(TransportError::BadRef));
    let g = a.t.get_block(b.id(), stale, &x, 100).unwrap();
    assert_eq!(g.wait(Some(T)), Err(TransportError::BadRef));
    a.t.send(b.id(), b"still fine", Some(T)).unwrap();
    assert_eq!(recv_msg(&b).1, b"still fine");
    drop((x, small, srcs, dsts));
    finish(rt, vec![a, b]);
}

fn many_peers_on(backend: &str) {
    let rt = test_runtime();
    let s = Secret::random();
    const K: u32 = 4;
    const N: u32 = 500;
    let nodes: Vec<Node> = (0..K)
        .map(|i| make_node(backend, rt, i, &s, 16 * MIB, |c| c.queue_depth = 64))
        .collect();
    let addrs: Vec<PeerAddr> = nodes.iter().map(|n| n.addr()).collect();
    std::thread::scope(|sc| {
        // Every node connects concurrently, as separate node agents would.
        let hs: Vec<_> = nodes
            .iter()
            .map(|n| sc.spawn(|| n.t.connect(&addrs, T)))
            .collect();
        for h in hs {
            h.join().unwrap().unwrap();
        }
        for n in &nodes {
            assert_eq!(n.t.peers().len(), K as usize - 1);
        }
        let mut hs = Vec::new();
        for n in &nodes {
            let me = n.id().0;
            let others: Vec<u32> = (0..K).filter(|&j| j != me).collect();
            // A block per peer in this node's pool to receive into.
            let inbox: Vec<Block> = (0..K).map(|_| n.pool.alloc(MIB).unwrap()).collect();
            let announce: Vec<Vec<u8>> = inbox
                .iter()
                .map(|b| {
                    let mut m = vec![0xff; 4];
                    m.extend_from_slice(&encode_ref(&b.block_ref()));
                    m
                })
                .collect();
            // Sender: announce the inbox block, then N numbered messages, to every peer.
            let o2 = others.clone();
            hs.push(sc.spawn(move || {
                for &j in &o2 {
                    n.t.send(NodeId(j), &announce[j as usize], Some(T)).unwrap();
                }
                for i in 0..N {
                    for &j in &o2 {
                        n.t.send(NodeId(j), &i.to_le_bytes(), Some(T)).unwrap();
                    }
                }
            }));
            // Receiver: check per-peer order; answer announcements with a put.
            hs.push(sc.spawn(move || {
                let mut src = n.pool.alloc(MIB).unwrap();
                fill(src.as_mut_slice(), u64::from(me));
                let mut next = [0u32; K as usize];
                let mut puts = Vec::new();
                let mut filled = 0;
                let mut msgs = 0;
                while msgs < (K - 1) * (N + 1) || filled < K - 1 {
                    match n.t.recv(Some(T)).unwrap() {
                        Event::Message { peer, data } if data[..4] == [0xff; 4] => {
                            msgs += 1;
                            let r = decode_ref(&data[4..]);
                            puts.push(n.t.put_block(peer, &src, MIB, r, u64::from(me)).unwrap());
                        }
                        Event::Message { peer, data } => {
                            msgs += 1;
                            let i = u32::from_le_bytes(data[..4].try_into().unwrap());
                            assert_eq!(i, next[peer.0 as usize], "order from {peer}");
                            next[peer.0 as usize] += 1;
                        }
                        Event::BlockFilled {
                            peer, block, tag, ..
                        } => {
                            assert_eq!(tag, u64::from(peer.0));
                            assert_eq!(block, inbox[peer.0 as usize].block_ref());
                            let mut want = vec![0u8; MIB];
                            fill(&mut want, tag);
                            assert_eq!(
                                checksum(inbox[peer.0 as usize].as_slice()),
                                checksum(&want)
                            );
                            filled += 1;
                        }
                        e => panic!("{e:?}"),
                    }
                }
                for p in puts {
                    p.wait(Some(T)).unwrap();
                }
                assert!(others.iter().all(|&j| next[j as usize] == N));
            }));
        }
        for h in hs {
            h.join().unwrap();
        }
    });
    finish(rt, nodes);
}

fn killed_peer_on(backend: &str) {
    let rt = test_runtime();
    let s = Secret::random();
    let depth = 16;
    let a = make_node(backend, rt, 0, &s, 160 * MIB, |c| c.queue_depth = depth);
    let c = make_node(backend, rt, 2, &s, 4 * MIB, |c| c.queue_depth = depth);
    connect_all(&[&a, &c]);
    // Node 1 lives in a child process, in a pool we create (so nothing is left behind).
    let child_pool = Pool::create(&pool_name(rt, 1), 80 * MIB).unwrap();
    let mut child = spawn_child(backend, 1, &s, &child_pool, 3000);
    connect_child(&a, &mut child, 1);
    child.cmd("idle");
    // Exhaust the window (the child never receives), stop the child so nothing drains.
    for _ in 0..depth {
        a.t.try_send(NodeId(1), b"m").unwrap();
    }
    assert_eq!(a.t.try_send(NodeId(1), b"m"), Err(TransportError::Full));
    child.freeze();
    // Pending: a 64 MiB put (more than the socket buffers hold), a get, a blocked send.
    let mut src = a.pool.alloc(64 * MIB).unwrap();
    fill(src.as_mut_slice(), 5);
    let dst = child_pool.alloc(64 * MIB).unwrap();
    let put =
        a.t.put_block(NodeId(1), &src, 64 * MIB, dst.block_ref(), 1)
            .unwrap();
    let gdst = a.pool.alloc(MIB).unwrap();
    let get =
        a.t.get_block(NodeId(1), dst.block_ref(), &gdst, MIB)
            .unwrap();
    std::thread::scope(|sc| {
        let blocked = sc.spawn(|| a.t.send(NodeId(1), b"late", Some(Duration::from_secs(30))));
        assert_eq!(
            put.wait(Some(Duration::from_millis(200))),
            Err(TransportError::TimedOut)
        );
        let t0 = Instant::now();
        child.signal(nix::sys::signal::Signal::SIGKILL);
        child.wait();
        assert_eq!(put.wait(Some(T)), Err(TransportError::PeerLost));
        assert_eq!(get.wait(Some(T)), Err(TransportError::PeerLost));
        assert_eq!(blocked.join().unwrap(), Err(TransportError::PeerLost));
        let took = t0.elapsed();
        assert!(took < Duration::from_secs(5), "took {took:?}");
    });
    match a.t.recv(Some(T)).unwrap() {
        Event::PeerLost { peer } => assert_eq!(peer, NodeId(1)),
        e => panic!("{e:?}"),
    }
    assert_eq!(a.t.try_send(NodeId(1), b"x"), Err(TransportError::PeerLost));
    assert_eq!(a.t.peers(), vec![NodeId(2)]);
    // The other peer is unaffected.
    put_and_check(&a, &c, 3 * MIB, 9);
    a.t.send(c.id(), b"ok", Some(T)).unwrap();
    assert_eq!(recv_msg(&c).1, b"ok");
    drop((src, dst, gdst, child_pool));
    drop(child);
    finish(rt, vec![a, c]);
}

fn stalled_peer_on(backend: &str) {
    let rt = test_runtime();
    let s = Secret::random();
    let a = make_node(backend, rt, 0, &s, 4 * MIB, |c| {
        c.peer_timeout = Duration::from_millis(800);
        c.heartbeat = Duration::from_millis(100);
    });
    let child_pool = Pool::create(&pool_name(rt, 1), 4 * MIB).unwrap();
    let mut child = spawn_child(backend, 1, &s, &child_pool, 800);
    connect_child(&a, &mut child, 1);
    child.cmd("echo");
    a.t.send(NodeId(1), b"ping", Some(T)).unwrap();
    assert_eq!(recv_msg(&a), (NodeId(1), b"ping".to_vec()));
    // A put into the child's pool: the child reports the checksum it sees.
    let mut src = a.pool.alloc(100_000).unwrap();
    fill(src.as_mut_slice(), 3);
    let dst = child_pool.alloc(100_000).unwrap();
    a.t.put_block(NodeId(1), &src, 100_000, dst.block_ref(), 42)
        .unwrap()
        .wait(Some(T))
        .unwrap();
    let (_, m) = recv_msg(&a);
    assert_eq!(
        String::from_utf8(m).unwrap(),
        format!("filled 42 100000 {}", checksum(src.as_slice()))
    );
    // Stopped (alive but silent): lost after the peer timeout, not before.
    let t0 = Instant::now();
    child.freeze();
    match a.t.recv(Some(T)).unwrap() {
        Event::PeerLost { peer } => assert_eq!(peer, NodeId(1)),
        e => panic!("{e:?}"),
    }
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(4),
        "{took:?}"
    );
    assert_eq!(
        a.t.send(NodeId(1), b"x", Some(T)),
        Err(TransportError::PeerLost)
    );
    drop((src, dst, child_pool));
    drop(child);
    finish(rt, vec![a]);
}

fn wrong_secret_on(backend: &str) {
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
fn expect_dropped(mut s: TcpStream) {
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

fn authed(addr: &str, s: &Secret, me: u32) -> TcpStream {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(T)).unwrap();
    auth::client_handshake(&mut c, s, NodeId(me), None).unwrap();
    c
}

fn garbage_frames_on(backend: &str) {
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
fn garbage_after_auth_ofi(provider: &str, rt: u64, s: &Secret, a: Node, b: Node) {
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

// ---- one test per check, over every back end -----------------------------------------------

/// Back-end instances under test: `tcp`, and `ofi` over each provider that works here.
const INSTANCES: [&str; 3] = ["tcp", "ofi:tcp;ofi_rxm", "ofi:shm"];

/// The instances to run: all of [`INSTANCES`] (or those named, comma-separated, in
/// `DRAGON_TEST_BACKENDS`), less the `ofi` ones that cannot run here, each skipped with its
/// reason on stderr. With `DRAGON_REQUIRE_OFI=1` an unusable `ofi` instance fails instead.
fn instances() -> Vec<&'static str> {
    let only = std::env::var("DRAGON_TEST_BACKENDS").ok();
    INSTANCES
        .into_iter()
        .filter(|b| {
            only.as_deref()
                .is_none_or(|o| o.split(',').any(|x| x.trim() == *b))
        })
        .filter(|b| match b.strip_prefix("ofi:") {
            None => true,
            Some(p) => match dragon_transport::ofi::probe(p) {
                Ok(()) => true,
                Err(e) => {
                    assert!(
                        std::env::var("DRAGON_REQUIRE_OFI").as_deref() != Ok("1"),
                        "{b}: {e}"
                    );
                    eprintln!("SKIP {b}: libfabric not usable: {e}");
                    false
                }
            },
        })
        .collect()
}

#[test]
fn every_backend_is_listed() {
    for b in backends() {
        assert!(
            INSTANCES
                .iter()
                .any(|i| i == b || i.starts_with(&format!("{b}:"))),
            "back end {b} has no conformance instance"
        );
    }
}

macro_rules! conformance {
    ($($name:ident => $f:ident),* $(,)?) => {$(
        #[test]
        fn $name() {
            for b in instances() {
                eprintln!("{}: back end {b}", stringify!($name));
                $f(b);
            }
        }
    )*};
}
conformance! {
    ordering => ordering_on,
    large_messages => large_messages_on,
    back_pressure => back_pressure_on,
    payloads_1b_to_256mib => payloads_on,
    many_peers => many_peers_on,
    killed_peer => killed_peer_on,
    stalled_peer => stalled_peer_on,
    wrong_secret => wrong_secret_on,
    garbage_frames => garbage_frames_on,
}
