//! Messages: per-peer order, sizes around the fragment size, credit back-pressure.

use std::time::{Duration, Instant};

use crate::*;
use dragon_shm::testing::test_runtime;
use dragon_transport::{NodeId, Secret, TransportError};

pub(crate) fn ordering_on(backend: &str) {
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
pub(crate) fn large_messages_on(backend: &str) {
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

pub(crate) fn back_pressure_on(backend: &str) {
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
