//! Unit tests of the `ofi` back end's pure pieces (frame layout, addresses, operation tables);
//! the back end itself is exercised by `tests/conformance/`.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use super::peer::Region;
use super::state::Counted;
use super::{frame_header, kind, node_for, FRAME_HDR};

#[test]
fn frame_header_layout() {
    let h = frame_header(0x0102_0304_0506_0708, kind::PUT_REQ, 48, 7, 8, 9);
    assert_eq!(h.len(), FRAME_HDR);
    assert_eq!(&h[..8], &0x0102_0304_0506_0708u64.to_le_bytes());
    assert_eq!(&h[8..16], &[0; 8], "sequence number is set when posted");
    assert_eq!(h[16], kind::PUT_REQ);
    assert_eq!(&h[17..20], &[0; 3]);
    assert_eq!(&h[20..24], &48u32.to_le_bytes());
    assert_eq!(&h[24..32], &7u64.to_le_bytes());
    assert_eq!(&h[32..40], &8u64.to_le_bytes());
    assert_eq!(&h[40..48], &9u64.to_le_bytes());
}

#[test]
fn node_for_listen_addresses() {
    assert_eq!(
        node_for("tcp;ofi_rxm", "10.0.0.1:0"),
        Some("10.0.0.1".into())
    );
    assert_eq!(node_for("tcp;ofi_rxm", "[::1]:5000"), Some("::1".into()));
    assert_eq!(node_for("tcp;ofi_rxm", "0.0.0.0:0"), None);
    assert_eq!(node_for("tcp", ":0"), None);
    assert_eq!(node_for("shm", "127.0.0.1:0"), None, "shm takes no node");
}

#[test]
fn region_ranges() {
    let r = Region {
        base: 0x1000,
        len: 100,
        key: 1,
    };
    assert_eq!(r.addr(0, 100), Some(0x1000));
    assert_eq!(r.addr(10, 90), Some(0x100a));
    assert_eq!(r.addr(10, 91), None);
    assert_eq!(r.addr(u64::MAX, 2), None, "overflow is out of range");
}

#[test]
fn counted_tables_keep_the_total() {
    let total = Arc::new(AtomicI64::new(0));
    let mut a: Counted<u32> = Counted::new(&total);
    let mut b: Counted<u32> = Counted::new(&total);
    a.insert(1, 10);
    a.insert(1, 11);
    a.insert(2, 20);
    b.insert(1, 30);
    assert_eq!(
        total.load(Ordering::Acquire),
        3,
        "a replaced key counts once"
    );
    assert_eq!(a.remove(&1), Some(11));
    assert_eq!(a.remove(&1), None);
    assert_eq!(total.load(Ordering::Acquire), 2);
    assert_eq!(a.take_all(), vec![20]);
    assert_eq!(total.load(Ordering::Acquire), 1);
    drop(b);
    assert_eq!(
        total.load(Ordering::Acquire),
        0,
        "dropping a table uncounts its ops"
    );
}
