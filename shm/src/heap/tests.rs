//! Unit tests of the pool, in one process: deaths are simulated by leaking holds
//! ([`Pool::abandon`]) and by leaving the lock to a dead pid (`abandon_as`). The
//! multi-process crash tests are in the `dragon-tests` crate (`tests/tests/heap_crash.rs`).

use std::time::Duration;

use super::*;
use crate::platform::ProcessId;
use crate::testing::{leftovers, test_runtime};

fn pool(rt: u64, size: usize) -> Pool {
    Pool::create(&SegmentName::new(rt, 0, SegmentKind::Pool, 1), size).unwrap()
}

#[test]
fn alloc_free_restores_everything() {
    let rt = test_runtime();
    let p = pool(rt, 1 << 20);
    let empty = p.stats();
    assert_eq!((empty.used, empty.blocks, empty.free_blocks), (0, 0, 1));
    let mut blocks = Vec::new();
    for len in [1usize, 7, 64, 65, 100, 4096, 10_000, 123_457] {
        let mut b = p.alloc(len).unwrap();
        assert_eq!(b.len(), len);
        assert_eq!(b.as_ptr() as usize % 64, 0);
        b.as_mut_slice().fill(len as u8);
        blocks.push(b);
    }
    p.verify().unwrap();
    for b in &blocks {
        assert!(b.as_slice().iter().all(|&x| x == b.len() as u8));
    }
    assert_eq!(p.stats().blocks, 8);
    let (s, (used, cap)) = (p.stats(), p.usage());
    assert!(used > 0 && (used, cap) == (s.used, s.capacity));
    // Free every other block, then the rest: merging must give one free block back.
    let odd: Vec<_> = blocks
        .iter()
        .skip(1)
        .step_by(2)
        .map(|b| b.block_ref())
        .collect();
    let mut keep = Vec::new();
    for (i, b) in blocks.into_iter().enumerate() {
        if i % 2 == 0 {
            drop(b);
        } else {
            keep.push(b);
        }
    }
    p.verify().unwrap();
    assert_eq!(keep.iter().map(|b| b.block_ref()).collect::<Vec<_>>(), odd);
    drop(keep);
    p.verify().unwrap();
    let s = p.stats();
    assert_eq!((s.used, s.blocks, s.free_blocks, s.holds), (0, 0, 1, 0));
    assert_eq!(s.largest_free, empty.largest_free);
    drop(p);
    assert!(leftovers(rt).is_empty());
}

#[test]
fn full_pool_errors_and_keeps_earlier_blocks() {
    let rt = test_runtime();
    let p = pool(rt, 1 << 20);
    assert_eq!(p.alloc(0).unwrap_err(), AllocError::ZeroSize);
    assert_eq!(p.alloc(2 << 20).unwrap_err(), AllocError::TooLarge);
    let whole = p.stats().largest_free as usize;
    let big = p.alloc(whole).unwrap();
    assert_eq!(p.stats().largest_free, 0);
    assert_eq!(p.alloc(1).unwrap_err(), AllocError::Full);
    assert_eq!(
        p.alloc_timeout(1, Some(Duration::from_millis(10)))
            .unwrap_err(),
        AllocError::TimedOut
    );
    drop(big);
    let mut v = Vec::new();
    loop {
        match p.alloc(1000) {
            Ok(mut b) => {
                b.as_mut_slice().fill(v.len() as u8);
                v.push(b);
            }
            Err(e) => {
                assert_eq!(e, AllocError::Full);
                break;
            }
        }
    }
    assert!(v.len() > 100);
    for (i, b) in v.iter().enumerate() {
        assert!(b.as_slice().iter().all(|&x| x == i as u8));
    }
    v.truncate(v.len() / 2);
    assert!(p.alloc(1000).is_ok());
    p.verify().unwrap();
}

#[test]
fn blocking_alloc_wakes_when_space_frees() {
    let rt = test_runtime();
    let p = pool(rt, 1 << 20);
    let big = p.alloc(p.stats().largest_free as usize).unwrap();
    let p2 = p.clone();
    let t = std::thread::spawn(move || p2.alloc_timeout(4096, None).map(|b| b.len()));
    // The waiter announces itself on the free wait queue before we free.
    while p.header().free_wait.waiters() == 0 {
        std::thread::yield_now();
    }
    drop(big);
    assert_eq!(t.join().unwrap(), Ok(4096));
}

#[test]
fn holds_keep_blocks_alive_and_stale_refs_fail() {
    let rt = test_runtime();
    let p = pool(rt, 1 << 20);
    let mut a = p.alloc(100).unwrap();
    a.as_mut_slice()[0] = 42;
    let r = a.block_ref();
    // SAFETY: the test borrows no handle's bytes mutably while another handle's are borrowed.
    let b = unsafe { p.block(r) }.unwrap();
    // SAFETY: the test borrows no handle's bytes mutably while another handle's are borrowed.
    let c = unsafe { b.try_clone() }.unwrap();
    drop(a);
    assert_eq!(b.as_slice()[0], 42);
    assert_eq!(p.stats().blocks, 1);
    drop(b);
    drop(c);
    assert_eq!(p.stats().blocks, 0);
    // SAFETY: the test borrows no handle's bytes mutably while another handle's are borrowed.
    assert_eq!(unsafe { p.block(r) }.unwrap_err(), AllocError::BadRef);
    // Reuse of the same memory gets a new generation; the old handle stays refused.
    let d = p.alloc(100).unwrap();
    assert_eq!(d.block_ref().offset, r.offset);
    assert_ne!(d.block_ref().gen, r.gen);
    // SAFETY: the test borrows no handle's bytes mutably while another handle's are borrowed.
    assert_eq!(unsafe { p.block(r) }.unwrap_err(), AllocError::BadRef);
    for bad in [
        BlockRef { segment: 99, ..r },
        BlockRef { offset: 3, ..r },
        BlockRef {
            offset: u64::MAX - 10,
            ..r
        },
        BlockRef {
            len: 1 << 30,
            gen: d.block_ref().gen,
            ..r
        },
    ] {
        // SAFETY: the test borrows no handle's bytes mutably while another handle's are borrowed.
        assert_eq!(unsafe { p.block(bad) }.unwrap_err(), AllocError::BadRef);
    }
    p.verify().unwrap();
}

#[test]
fn transit_moves_ownership() {
    let rt = test_runtime();
    let p = pool(rt, 1 << 20);
    let r = p.alloc(10).unwrap().into_transit().unwrap();
    assert_eq!(p.stats().blocks, 1);
    p.verify().unwrap();
    // SAFETY: the test borrows no handle's bytes mutably while another handle's are borrowed.
    let b = unsafe { p.claim_transit(r) }.unwrap();
    // SAFETY: the test borrows no handle's bytes mutably while another handle's are borrowed.
    let again = unsafe { p.claim_transit(r) };
    assert_eq!(again.unwrap_err(), AllocError::BadRef);
    drop(b);
    assert_eq!(p.stats().blocks, 0);
    let r = p.alloc(10).unwrap().into_transit().unwrap();
    p.release_transit(r).unwrap();
    assert_eq!(p.stats().blocks, 0);
    p.verify().unwrap();
}

#[test]
fn open_from_another_handle_and_reject_garbage() {
    let rt = test_runtime();
    let p = pool(rt, 1 << 20);
    let q = Pool::open(p.name()).unwrap();
    let a = p.alloc(64).unwrap();
    // SAFETY: the test borrows no handle's bytes mutably while another handle's are borrowed.
    let b = unsafe { q.block(a.block_ref()) }.unwrap();
    assert_eq!(
        b.as_ptr() as usize - q.segment().base() as usize,
        a.block_ref().offset as usize
    );
    drop((a, b));
    assert_eq!(q.stats().blocks, 0);
    // Corrupt the pool header: opening must fail cleanly.
    p.header().hold_slots.store(3, Ordering::Relaxed);
    assert_eq!(Pool::open(p.name()).unwrap_err(), SegmentError::Corrupt);
    p.header().hold_slots.store(
        q.header().hold_off[1].load(Ordering::Relaxed),
        Ordering::Relaxed,
    );
    p.header().magic.store(7, Ordering::Relaxed);
    assert_eq!(Pool::open(p.name()).unwrap_err(), SegmentError::BadMagic);
    assert_eq!(
        Pool::create(&SegmentName::new(rt, 0, SegmentKind::Pool, 2), 4096).unwrap_err(),
        SegmentError::BadSize
    );
}

#[test]
fn dead_lock_holder_mid_alloc_is_repaired() {
    let rt = test_runtime();
    let p = pool(rt, 1 << 20);
    let keep = p.alloc(1000).unwrap();
    let lost = p.alloc(2000).unwrap();
    let lost_ref = lost.block_ref();
    // Simulate a process that died inside `free` after dropping the hold but before
    // freeing: remove the hold by hand, then leave the lock held by a dead pid.
    Pool::abandon(lost);
    {
        let _g = p.header().lock.lock();
        let holder = p.my_holder().unwrap();
        assert!(p.drop_hold(lost_ref.offset - BLOCK_HDR, holder));
    }
    assert!(p.verify().is_err());
    p.header().lock.abandon_as(ProcessId {
        pid: 0x3fff_fff0,
        start: 1,
    });
    let again = p.alloc(10).unwrap();
    assert_eq!(p.recoveries(), 1);
    p.verify().unwrap();
    assert_eq!(p.stats().blocks, 2);
    drop((keep, again));
    assert_eq!(p.stats().blocks, 0);
}

#[test]
fn sweep_releases_dead_holders() {
    let rt = test_runtime();
    let p = pool(rt, 1 << 20);
    let a = p.alloc(1000).unwrap();
    // SAFETY: the test borrows no handle's bytes mutably while another handle's are borrowed.
    let shared = unsafe { p.block(a.block_ref()) }.unwrap();
    // Hand `a`'s hold to a fake dead process in slot 7.
    {
        let _g = p.header().lock.lock();
        let me = p.my_holder().unwrap();
        let off = a.block_ref().offset - BLOCK_HDR;
        p.drop_hold(off, me);
        p.proc_slot(7).store(
            ProcessId {
                pid: 0x3fff_fff0,
                start: 1,
            }
            .packed(),
            Ordering::Relaxed,
        );
        p.add_hold(off, 7, 1).unwrap();
    }
    Pool::abandon(a);
    p.verify().unwrap();
    assert_eq!(p.sweep(), 1);
    assert_eq!(p.stats().blocks, 1, "our own hold keeps it");
    drop(shared);
    assert_eq!(p.stats().blocks, 0);
    p.verify().unwrap();
}

#[test]
fn many_threads_alloc_and_free() {
    let rt = test_runtime();
    let p = pool(rt, 4 << 20);
    let ts: Vec<_> = (0..4u64)
        .map(|t| {
            let p = p.clone();
            std::thread::spawn(move || {
                let mut held = Vec::new();
                let mut x = t + 1;
                for i in 0..3000u64 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    if held.len() > 20 || (x % 3 == 0 && !held.is_empty()) {
                        let b: Block = held.swap_remove((x as usize / 3) % held.len());
                        assert!(b.as_slice().iter().all(|&v| v == (b.len() as u8 ^ t as u8)));
                    } else if let Ok(mut b) = p.alloc(1 + (x % 20_000) as usize) {
                        let v = b.len() as u8 ^ t as u8;
                        b.as_mut_slice().fill(v);
                        held.push(b);
                    }
                    let _ = i;
                }
            })
        })
        .collect();
    for t in ts {
        t.join().unwrap();
    }
    p.verify().unwrap();
    assert_eq!(p.stats().blocks, 0);
}

#[test]
fn hold_table_rehashes_and_reports_full() {
    let rt = test_runtime();
    let name = SegmentName::new(rt, 0, SegmentKind::Pool, 3);
    let p = Pool::create_with(&name, 1 << 20, PoolConfig { hold_slots: 64 }).unwrap();
    // Churn far more holds than slots through the table (tombstones force rehashes).
    for _ in 0..500 {
        let a = p.alloc(8).unwrap();
        // SAFETY: the test borrows no handle's bytes mutably while another handle's are borrowed.
        let b = unsafe { a.try_clone() }.unwrap();
        drop((a, b));
    }
    let mut v = Vec::new();
    let err = loop {
        match p.alloc(8) {
            Ok(b) => v.push(b),
            Err(e) => break e,
        }
    };
    assert_eq!(err, AllocError::HoldTableFull);
    assert_eq!(v.len(), 48, "3/4 of 64 slots");
    p.verify().unwrap();
}

#[test]
fn lock_free_hand_overs_race_rehashes_without_losing_holds() {
    let rt = test_runtime();
    {
        let name = SegmentName::new(rt, 0, SegmentKind::Pool, 1);
        // A small hold table: the churn thread forces a rehash every few dozen holds.
        let p = Pool::create_with(&name, 4 << 20, PoolConfig { hold_slots: 64 }).unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let churn = {
            let (p, stop) = (p.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let bs: Vec<Block> = (0..8).map(|_| p.alloc(64).unwrap()).collect();
                    // SAFETY: the test borrows no handle's bytes mutably while another handle's are
                    // borrowed.
                    let extra: Vec<Block> = bs
                        .iter()
                        .map(|b| unsafe { b.try_clone() }.unwrap())
                        .collect();
                    p.force_rehash();
                    drop(bs);
                    p.force_rehash();
                    drop(extra);
                    n += 1;
                }
                n
            })
        };
        let movers: Vec<_> = (0..2)
            .map(|_| {
                let p = p.clone();
                std::thread::spawn(move || {
                    for i in 0..20_000u32 {
                        let mut b = p.alloc(128).unwrap();
                        b.as_mut_slice()[0] = i as u8;
                        let r = b.into_transit().unwrap();
                        // SAFETY: the test borrows no handle's bytes mutably while another handle's
                        // are borrowed.
                        let b = unsafe { p.claim_transit(r) }.unwrap();
                        assert_eq!(b.as_slice()[0], i as u8);
                    }
                })
            })
            .collect();
        for m in movers {
            m.join().unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        let rounds = churn.join().unwrap();
        assert!(rounds > 0);
        println!("{} rehashes during the hand-overs", p.hold_generation());
        assert!(p.hold_generation() > 10, "the test must race rehashes");
        p.verify().unwrap();
        let s = p.stats();
        assert_eq!(
            (s.blocks, s.holds, s.used),
            (0, 0, 0),
            "every hold came back: {s:?}"
        );
    }
    assert!(leftovers(rt).is_empty());
}

#[test]
fn a_release_whose_lock_fails_is_retried_and_the_repair_stays_due() {
    let rt = test_runtime();
    let p = pool(rt, 1 << 20);
    let keep = p.alloc(1000).unwrap();
    let gone = p.alloc(1000).unwrap();
    // A child dies holding the pool lock in the middle of an allocation.
    crate::fault::crash_child_at("pool.alloc.unlisted", || {
        let _ = p.alloc(5000);
    });
    // The repair fails once: dropping `gone` cannot take the lock.
    crate::fault::arm_fail(Some("pool.recover"));
    drop(gone);
    crate::fault::arm_fail(None);
    // The next locker repairs and the dropped hold is released, not leaked.
    let again = p.alloc(10).unwrap();
    p.verify().unwrap();
    assert_eq!(p.stats().blocks, 2, "{:?}", p.stats());
    drop((keep, again));
    assert_eq!(p.stats().blocks, 0, "{:?}", p.stats());
    assert_eq!(p.stats().free_blocks, 1);
}
