//! Unit and crash tests of the index (forked children die at named points).

use super::*;
use crate::name::{SegmentKind, SegmentName};
use crate::testing::test_runtime;

fn pool(size: usize) -> Pool {
    Pool::create(
        &SegmentName::new(test_runtime(), 0, SegmentKind::Pool, 1),
        size,
    )
    .unwrap()
}

fn val(p: &Pool, bytes: &[u8]) -> Block {
    let mut b = p.alloc(bytes.len()).unwrap();
    b.as_mut_slice().copy_from_slice(bytes);
    b
}

#[test]
fn a_waiter_for_a_change_wakes_on_a_put_and_times_out_without_one() {
    let p = pool(4 << 20);
    let kv = Kv::create(&p).unwrap();
    let seen = kv.changes();
    assert!(!kv.wait_change(seen, Some(Duration::from_millis(20))));
    let r = kv.header_ref();
    let p2 = Pool::open(p.name()).unwrap();
    let waiter = std::thread::spawn(move || {
        let other = Kv::attach(&p2, r).unwrap();
        // No timeout: only the put below ends this wait.
        let woke = other.wait_change(seen, None);
        (woke, other.contains(b"k").unwrap())
    });
    while kv.hdr().change_wq.waiters() == 0 {
        std::thread::yield_now(); // the waiter is asleep before the put
    }
    kv.put(b"k", val(&p, b"v")).unwrap();
    assert_eq!(waiter.join().unwrap(), (true, true));
    // A change made before the wait is not missed: the count already differs.
    let seen = kv.changes();
    kv.set_chkpt_range(0, 1);
    assert!(kv.wait_change(seen, Some(Duration::from_millis(1))));
    assert!(kv.remove(b"k").unwrap());
    assert!(kv.changes() >= seen + 2);
}

#[test]
fn put_get_replace_remove_grow_and_views_outlive_the_key() {
    let p = pool(16 << 20);
    let kv = Kv::create(&p).unwrap();
    for i in 0..1000u32 {
        kv.put(format!("k{i}").as_bytes(), val(&p, &i.to_le_bytes()))
            .unwrap();
    }
    assert_eq!(kv.len(), 1000);
    assert!(kv.stats().capacity >= 1024);
    for i in (0..1000u32).step_by(7) {
        let b = kv.get(format!("k{i}").as_bytes()).unwrap().unwrap();
        assert_eq!(b.as_slice(), i.to_le_bytes());
    }
    assert!(kv.get(b"nope").unwrap().is_none());
    // A reader's view survives replacement and deletion of its key.
    let view = kv.get(b"k5").unwrap().unwrap();
    kv.put(b"k5", val(&p, b"new")).unwrap();
    assert_eq!(kv.get(b"k5").unwrap().unwrap().as_slice(), b"new");
    assert_eq!(view.as_slice(), 5u32.to_le_bytes());
    assert!(kv.remove(b"k5").unwrap());
    assert!(!kv.contains(b"k5").unwrap());
    assert_eq!(view.as_slice(), 5u32.to_le_bytes());
    drop(view);
    // Another handle sees the same map.
    let other = Kv::attach(&p, kv.header_ref()).unwrap();
    assert_eq!(other.len(), 999);
    let mut keys = other.keys().unwrap();
    keys.sort();
    assert_eq!(keys.len(), 999);
    assert_eq!(
        other.take(b"k6").unwrap().unwrap().as_slice(),
        6u32.to_le_bytes()
    );
    other.clear().unwrap();
    assert!(kv.is_empty() && kv.stats().bytes == 0);
    drop(other);
    kv.destroy().unwrap();
    p.verify().unwrap();
    assert_eq!(p.stats().blocks, 0, "{:?}", p.stats());
}

#[test]
fn full_pool_and_frozen_index_keep_earlier_values() {
    let p = pool(4 << 20);
    let kv = Kv::create(&p).unwrap();
    let big = vec![7u8; 1 << 20];
    let mut stored = 0;
    loop {
        match p.alloc(big.len()) {
            Ok(mut b) => {
                b.as_mut_slice().copy_from_slice(&big);
                match kv.put(format!("v{stored}").as_bytes(), b) {
                    Ok(()) => stored += 1,
                    Err(KvError::Full) => break,
                    Err(e) => panic!("{e:?}"),
                }
            }
            Err(AllocError::Full) | Err(AllocError::TooLarge) => break,
            Err(e) => panic!("{e:?}"),
        }
    }
    assert!(stored >= 2);
    for i in 0..stored {
        let b = kv.get(format!("v{i}").as_bytes()).unwrap().unwrap();
        assert!(b.as_slice() == &big[..]);
    }
    // Deleting frees room again.
    assert!(kv.remove(b"v0").unwrap());
    let mut b = p.alloc(big.len()).unwrap();
    b.as_mut_slice().copy_from_slice(&big);
    kv.put(b"again", b).unwrap();
    kv.set_frozen(true).unwrap();
    let seen = stats_in(p.segment()).expect("the index is the pool's first block");
    assert!(seen.frozen && seen.count == kv.len());
    assert_eq!(kv.put(b"x", val(&p, b"y")), Err(KvError::Frozen));
    assert_eq!(kv.remove(b"again"), Err(KvError::Frozen));
    assert!(kv.get(b"again").unwrap().is_some());
    kv.set_frozen(false).unwrap();
    kv.destroy().unwrap();
    assert_eq!(p.stats().blocks, 0);
}

/// `n` keys sharing one home slot in a 16-slot table (one probe chain).
fn colliding_keys(n: usize) -> Vec<Vec<u8>> {
    let home = |k: &[u8]| stable_hash(k) & (MIN_CAPACITY - 1);
    let want = home(b"c0");
    (0..)
        .map(|i| format!("c{i}").into_bytes())
        .filter(|k| home(k) == want)
        .take(n)
        .collect()
}

#[test]
fn death_while_reusing_a_tombstone_keeps_the_probe_chain() {
    let p = pool(4 << 20);
    let kv = Kv::create(&p).unwrap();
    let k = colliding_keys(3);
    kv.put(&k[0], val(&p, b"a")).unwrap();
    kv.put(&k[1], val(&p, b"b")).unwrap();
    // k0's slot becomes a tombstone in the middle of k1's probe chain.
    assert!(kv.remove(&k[0]).unwrap());
    // A child reuses that tombstone for k2 and dies half way.
    crate::fault::crash_child_at("kv.insert.busy", || {
        let _ = kv.put(&k[2], val(&p, b"c"));
    });
    assert_eq!(
        kv.get(&k[1]).unwrap().map(|b| b.as_slice().to_vec()),
        Some(b"b".to_vec()),
        "a key behind the reused slot vanished"
    );
    assert!(!kv.contains(&k[2]).unwrap());
    assert_eq!(kv.len(), 1);
    // The slot is usable again.
    kv.put(&k[2], val(&p, b"c")).unwrap();
    assert_eq!(kv.get(&k[2]).unwrap().unwrap().as_slice(), b"c");
    assert_eq!(kv.len(), 2);
}

#[test]
fn death_while_publishing_a_larger_table_keeps_the_index_usable() {
    let p = pool(4 << 20);
    let kv = Kv::create(&p).unwrap();
    // 11 keys fill a 16-slot table to just under 70%: the 12th put grows it.
    for i in 0..11u32 {
        kv.put(format!("k{i}").as_bytes(), val(&p, &i.to_le_bytes()))
            .unwrap();
    }
    assert_eq!(kv.stats().capacity, MIN_CAPACITY);
    crate::fault::crash_child_at("kv.resize.publish", || {
        let _ = kv.put(b"k11", val(&p, b"x"));
    });
    for i in 0..11u32 {
        let b = kv.get(format!("k{i}").as_bytes()).unwrap().unwrap();
        assert_eq!(b.as_slice(), i.to_le_bytes());
    }
    assert_eq!(kv.len(), 11);
    for i in 11..40u32 {
        kv.put(format!("k{i}").as_bytes(), val(&p, &i.to_le_bytes()))
            .unwrap();
    }
    assert_eq!(kv.len(), 40);
    assert_eq!(kv.stats().capacity, 64);
}

#[test]
fn set_frozen_never_changes_the_flag_without_the_mutex() {
    let p = pool(4 << 20);
    let kv = Kv::create(&p).unwrap();
    kv.put(b"a", val(&p, b"1")).unwrap();
    // A child dies holding the index mutex; its repair fails once.
    crate::fault::crash_child_at("kv.insert.busy", || {
        let _ = kv.put(b"b", val(&p, b"2"));
    });
    crate::fault::arm_fail(Some("kv.repair"));
    let r = kv.set_frozen(true);
    crate::fault::arm_fail(None);
    assert_eq!(r, Err(KvError::Corrupt));
    assert!(!kv.is_frozen(), "the flag changed without the mutex");
    kv.set_frozen(true).unwrap();
    assert!(kv.is_frozen());
}

/// The value of `key` as bytes.
fn value_of(kv: &Kv, key: &[u8]) -> Option<Vec<u8>> {
    kv.get(key).unwrap().map(|b| b.as_slice().to_vec())
}

#[test]
fn deaths_mid_operation_leak_no_block_and_leave_a_consistent_index() {
    type Op = fn(&Kv, &Pool);
    // (crash point, what the child does, key -> value expected afterwards)
    let put_new: Op = |kv, p| {
        let _ = kv.put(b"new", val(p, b"3"));
    };
    let replace: Op = |kv, p| {
        let _ = kv.put(b"a", val(p, b"9"));
    };
    let remove: Op = |kv, _| {
        let _ = kv.remove(b"a");
    };
    let rekey: Op = |kv, _| {
        let _ = kv.rekey(b"a", b"z");
    };
    type Want = &'static [(&'static [u8], Option<&'static [u8]>)];
    let cases: [(&str, Op, Want); 10] = [
        ("kv.insert.adopted", put_new, &[(b"new", None)]),
        ("kv.insert.busy", put_new, &[(b"new", None)]),
        ("kv.resize.publish", put_new, &[(b"new", None)]),
        ("kv.resize.release", put_new, &[(b"new", None)]),
        ("kv.replace.adopted", replace, &[(b"a", Some(b"1"))]),
        ("kv.replace.release", replace, &[(b"a", Some(b"9"))]),
        ("kv.remove.release", remove, &[(b"a", None)]),
        // A rekey that dies half way leaves the entry under one of its keys (before,
        // a death at "moved" dropped it and its value: found by `make faults`).
        (
            "kv.rekey.adopted",
            rekey,
            &[(b"a", Some(b"1")), (b"z", None)],
        ),
        ("kv.rekey.moved", rekey, &[(b"a", None), (b"z", Some(b"1"))]),
        ("kv.insert.busy", rekey, &[(b"a", Some(b"1")), (b"z", None)]),
    ];
    for (point, op, want) in cases {
        let p = pool(4 << 20);
        let kv = Kv::create(&p).unwrap();
        kv.put(b"a", val(&p, b"1")).unwrap();
        kv.put(b"b", val(&p, b"2")).unwrap();
        // 11 keys: the next new key grows the table.
        for i in 0..9u32 {
            kv.put(format!("f{i}").as_bytes(), val(&p, b"f")).unwrap();
        }
        crate::fault::crash_child_at(point, || op(&kv, &p));
        for (k, v) in want {
            assert_eq!(value_of(&kv, k).as_deref(), *v, "{point}");
        }
        assert_eq!(value_of(&kv, b"b").as_deref(), Some(&b"2"[..]), "{point}");
        assert_eq!(kv.len(), kv.keys().unwrap().len() as u64, "{point}");
        kv.put(b"after", val(&p, b"4")).unwrap();
        kv.destroy().unwrap();
        p.sweep();
        p.verify().unwrap();
        assert_eq!(
            p.stats().blocks,
            0,
            "{point}: blocks leaked {:?}",
            p.stats()
        );
    }
}

#[test]
fn a_repair_that_fails_is_done_by_the_next_locker() {
    let p = pool(4 << 20);
    let kv = Kv::create(&p).unwrap();
    kv.put(b"a", val(&p, b"1")).unwrap();
    // A child dies with a key and a value in flight and the mutex held.
    crate::fault::crash_child_at("kv.insert.adopted", || {
        let _ = kv.put(b"new", val(&p, b"2"));
    });
    crate::fault::arm_fail(Some("kv.repair"));
    assert_eq!(kv.contains(b"a"), Err(KvError::Corrupt));
    crate::fault::arm_fail(None);
    assert!(stats_in(p.segment()).is_some());
    // The next locker is not told the holder died (the failed repairer unlocked
    // normally), but the header says a repair is due.
    assert!(kv.contains(b"a").unwrap());
    assert!(!kv.contains(b"new").unwrap());
    kv.destroy().unwrap();
    p.sweep();
    assert_eq!(p.stats().blocks, 0, "{:?}", p.stats());
}

#[test]
fn values_handed_to_readers_cannot_be_written_or_put_in_flight() {
    let p = pool(4 << 20);
    let kv = Kv::create(&p).unwrap();
    kv.put(b"a", val(&p, b"1")).unwrap();
    // Two readers of one value in one process: neither may borrow it mutably.
    let (mut r1, r2) = (
        kv.get(b"a").unwrap().unwrap(),
        kv.get(b"a").unwrap().unwrap(),
    );
    assert!(!r1.is_writable() && !r2.is_writable());
    let seen = r2.as_slice();
    let wrote = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        r1.as_mut_slice()[0] = b'X';
    }));
    assert!(
        wrote.is_err(),
        "a reader wrote a value another reader views"
    );
    assert_eq!(seen, b"1");
    // Nor handed on in flight, where a receiver would claim it writable.
    // SAFETY: read-only clone of a read-only handle.
    let c = unsafe { r1.try_clone() }.unwrap();
    assert!(!c.is_writable());
    assert_eq!(kv.put(b"b", c), Err(KvError::Alloc(AllocError::ReadOnly)));
    let taken = kv.take(b"a").unwrap().unwrap();
    assert!(!taken.is_writable());
    drop((r1, r2, taken));
    kv.destroy().unwrap();
    assert_eq!(p.stats().blocks, 0, "{:?}", p.stats());
}

#[test]
fn stable_hash_is_fnv1a() {
    assert_eq!(stable_hash(b""), 0xcbf2_9ce4_8422_2325);
    assert_eq!(stable_hash(b"a"), 0xaf63_dc4c_8601_ec8c);
}
