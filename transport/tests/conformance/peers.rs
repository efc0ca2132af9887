//! Several peers and failing ones: all-to-all among four nodes, a killed and a stalled child
//! peer.

use std::time::{Duration, Instant};

use crate::*;
use dragon_shm::heap::{Block, Pool};
use dragon_shm::testing::test_runtime;
use dragon_transport::testing::checksum;
use dragon_transport::wire::{decode_ref, encode_ref};
use dragon_transport::{Event, NodeId, PeerAddr, Secret, TransportError};

pub(crate) fn many_peers_on(backend: &str) {
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

pub(crate) fn killed_peer_on(backend: &str) {
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

pub(crate) fn stalled_peer_on(backend: &str) {
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
