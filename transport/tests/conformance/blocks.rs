//! Block transfers: puts and gets of 1 B to 256 MiB, checksums, bad references.

use crate::*;
use dragon_shm::heap::{Block, BlockRef};
use dragon_shm::testing::test_runtime;
use dragon_transport::testing::checksum;
use dragon_transport::{Event, Secret, TransportError};

pub(crate) fn put_and_check(a: &Node, b: &Node, len: usize, seed: u64) {
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

pub(crate) fn payloads_on(backend: &str) {
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
