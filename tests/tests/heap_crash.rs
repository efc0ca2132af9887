//! Processes SIGKILLed at random points of alloc/free never wedge a pool, and a sweep
//! reclaims everything they held (the pool's accounting returns to exactly zero).
//!
//! `DRAGON_CRASH_ROUNDS` sets the number of kills (default 40; `make stress` uses more).

use std::time::Duration;

use dragon_shm::heap::Pool;
use dragon_shm::testing::{leftovers, test_runtime};
use dragon_shm::{SegmentKind, SegmentName};
use dragon_tests::{Rng, Worker};

const BIN: &str = env!("CARGO_BIN_EXE_shm-worker");

fn rounds() -> u64 {
    dragon_tests::env_count("DRAGON_CRASH_ROUNDS", 40)
}

#[test]
fn killed_allocators_never_wedge_the_pool_and_are_swept() {
    let rt = test_runtime();
    let name = SegmentName::new(rt, 0, SegmentKind::Pool, 1);
    let pool = Pool::create(&name, 8 << 20).unwrap();
    let seed = rt | 1;
    println!("seed {seed:#x}");
    let mut rng = Rng(seed);
    // Two steady workers run to completion while victims are killed around them.
    let mut steady: Vec<Worker> = (0..2)
        .map(|i| {
            let args = [name.to_string(), "0".into(), (seed + i).to_string()];
            Worker::spawn(BIN, "alloc-loop", &args)
        })
        .collect();
    for w in &mut steady {
        w.wait_ready();
    }
    for round in 0..rounds() {
        let args = [name.to_string(), "0".into(), (seed ^ round).to_string()];
        let mut victim = Worker::spawn(BIN, "alloc-loop", &args);
        victim.wait_ready();
        // Fault injection: let it run a random while (not synchronisation), then kill it.
        std::thread::sleep(Duration::from_micros(rng.below(3000)));
        victim.kill();
        // The pool keeps serving this process between kills.
        let b = pool
            .alloc(1 + rng.below(10_000) as usize)
            .expect("pool usable after a kill");
        drop(b);
    }
    for w in steady {
        w.kill();
    }
    let swept = pool.sweep();
    assert!(swept >= 2, "dead processes swept: {swept}");
    pool.verify().expect("pool consistent after kills");
    let s = pool.stats();
    assert_eq!(
        (s.used, s.blocks, s.holds),
        (0, 0, 0),
        "everything reclaimed: {s:?}"
    );
    assert_eq!(s.free_blocks, 1, "free space merged back into one block");
    println!("recoveries of a dead lock holder: {}", pool.recoveries());
    drop(pool);
    assert!(leftovers(rt).is_empty());
}

#[test]
fn workers_running_to_completion_leave_nothing() {
    let rt = test_runtime();
    let name = SegmentName::new(rt, 0, SegmentKind::Pool, 1);
    let pool = Pool::create(&name, 8 << 20).unwrap();
    let ws: Vec<Worker> = (0..3)
        .map(|i| {
            Worker::spawn(
                BIN,
                "alloc-loop",
                &[name.to_string(), "20000".into(), (rt + i).to_string()],
            )
        })
        .collect();
    for mut w in ws {
        w.wait_ready();
        let (code, lines) = w.finish();
        assert_eq!(code, 0, "worker output: {lines:?}");
        assert_eq!(lines, vec!["done 20000".to_string()]);
    }
    pool.verify().unwrap();
    let s = pool.stats();
    assert_eq!(
        (s.used, s.blocks, s.holds, s.processes),
        (0, 0, 0, 0),
        "{s:?}"
    );
    drop(pool);
    assert!(leftovers(rt).is_empty());
}
