//! Without a loadable libfabric, `open("ofi")` fails with `Unavailable` and
//! `open_or_fallback("ofi")` gives a working tcp endpoint (after a one-line notice on
//! stderr). Its own test binary: libfabric is looked for once per process, and this one
//! points `DRAGON_OFI_RUNTIME_LIB` at a library that does not exist before anything loads.

use std::time::Duration;

use dragon_shm::heap::Pool;
use dragon_shm::testing::{leftovers, test_runtime};
use dragon_shm::{SegmentKind, SegmentName};
use dragon_transport::{
    config, ofi, open, open_or_fallback, Config, Event, NodeId, PeerAddr, Secret, TransportError,
};

#[test]
fn missing_libfabric_falls_back_to_tcp() {
    std::env::set_var(config::ENV_OFI_RUNTIME_LIB, "/nonexistent/libfabric.so.1");
    let why = ofi::available().unwrap_err();
    assert!(
        why.contains("nonexistent") || why.contains("built without"),
        "{why}"
    );
    assert!(ofi::probe("tcp;ofi_rxm").is_err());
    let rt = test_runtime();
    let s = Secret::random();
    let pools: Vec<Pool> = (0..2)
        .map(|i| Pool::create(&SegmentName::new(rt, i, SegmentKind::Pool, 1), 1 << 20).unwrap())
        .collect();
    let cfg = |i: u32| Config::new(NodeId(i), s.clone(), pools[i as usize].clone());
    assert_eq!(open("ofi", cfg(0)).err(), Some(TransportError::Unavailable));
    assert_eq!(
        open("ofi:shm", cfg(0)).err(),
        Some(TransportError::Unavailable)
    );
    let a = open_or_fallback("ofi", cfg(0)).unwrap();
    let b = open_or_fallback("ofi:tcp;ofi_rxm", cfg(1)).unwrap();
    let addrs = [
        PeerAddr {
            node: a.node(),
            addr: a.address(),
        },
        PeerAddr {
            node: b.node(),
            addr: b.address(),
        },
    ];
    std::thread::scope(|sc| {
        let h = sc.spawn(|| b.connect(&addrs, Duration::from_secs(10)));
        a.connect(&addrs, Duration::from_secs(10)).unwrap();
        h.join().unwrap().unwrap();
    });
    a.send(NodeId(1), b"over tcp", Some(Duration::from_secs(10)))
        .unwrap();
    match b.recv(Some(Duration::from_secs(10))).unwrap() {
        Event::Message { peer, data } => {
            assert_eq!((peer, &data[..]), (NodeId(0), &b"over tcp"[..]))
        }
        e => panic!("{e:?}"),
    }
    // Unknown back ends are still an error, not a fallback.
    assert!(open_or_fallback("carrier-pigeon", cfg(0)).is_err());
    drop((a, b, pools));
    assert!(leftovers(rt).is_empty());
}
