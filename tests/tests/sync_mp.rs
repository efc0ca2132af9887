//! The `dragon_shm::sync` objects across real processes (`sync-worker`): locks held by a
//! SIGKILLed process are recovered and the acquirer is told; a lock makes a plain
//! read-modify-write exact across processes; barrier indices are distinct; events wake
//! other processes; a process blocked on a semaphore uses no CPU. Each test leaves nothing
//! in /dev/shm and reaps every child.

use std::time::{Duration, Instant};

use dragon_shm::heap::{BlockRef, Pool};
use dragon_shm::sync::{Acquired, Barrier, Event, Lock, RLock, RawArray, Semaphore};
use dragon_shm::testing::{leftovers, test_runtime};
use dragon_shm::{SegmentKind, SegmentName};
use dragon_tests::Worker;

const BIN: &str = env!("CARGO_BIN_EXE_sync-worker");
const LONG: Option<Duration> = Some(Duration::from_secs(30));

fn setup() -> (u64, SegmentName, Pool) {
    let rt = test_runtime();
    let name = SegmentName::new(rt, 0, SegmentKind::Pool, 1);
    let pool = Pool::create(&name, 1 << 20).unwrap();
    (rt, name, pool)
}

fn teardown(rt: u64, pool: Pool) {
    drop(pool);
    assert!(
        leftovers(rt).is_empty(),
        "left in /dev/shm: {:?}",
        leftovers(rt)
    );
}

fn r(b: BlockRef) -> String {
    format!("{}:{}:{}:{}", b.segment, b.offset, b.len, b.gen)
}

fn spawn(role: &str, name: &SegmentName, args: &[String]) -> Worker {
    let mut all = vec![name.to_string()];
    all.extend_from_slice(args);
    let mut w = Worker::spawn(BIN, role, &all);
    w.wait_ready();
    w
}

/// Polls until every thread of `pid` is asleep (state S): the worker is blocked.
fn wait_asleep(pid: u32) {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("task dir");
        let all_asleep = tasks.flatten().all(|t| {
            std::fs::read_to_string(t.path().join("stat"))
                .ok()
                .and_then(|s| {
                    s.rfind(')')
                        .map(|c| s[c + 1..].trim_start().starts_with('S'))
                })
                .unwrap_or(false)
        });
        if all_asleep {
            return;
        }
        assert!(Instant::now() < end, "worker {pid} never went to sleep");
        std::thread::yield_now();
    }
}

#[test]
fn lock_held_by_killed_process_is_recovered_and_reported() {
    let (rt, name, pool) = setup();
    let lock = Lock::create(&pool).unwrap();
    let w = spawn("lock-hold", &name, &[r(lock.block_ref())]);
    assert_eq!(lock.holder(), Some(w.child.id()));
    assert_eq!(lock.acquire(false, None), None, "held by a live process");
    w.kill();
    assert_eq!(lock.acquire(true, LONG), Some(Acquired { recovered: true }));
    lock.release().unwrap();
    assert_eq!(
        lock.acquire(true, LONG),
        Some(Acquired { recovered: false })
    );
    lock.release().unwrap();
    drop(lock);
    teardown(rt, pool);
}

#[test]
fn rlock_held_by_killed_process_is_recovered_and_reported() {
    let (rt, name, pool) = setup();
    let lock = RLock::create(&pool).unwrap();
    let w = spawn("rlock-hold", &name, &[r(lock.block_ref())]);
    assert_eq!(lock.holder(), Some(w.child.id()));
    assert_eq!(lock.release(), Err(dragon_shm::sync::SyncError::NotOwner));
    w.kill();
    assert_eq!(lock.acquire(true, LONG), Some(Acquired { recovered: true }));
    assert_eq!(lock.count(), 1, "the dead owner's levels are not inherited");
    lock.release().unwrap();
    assert_eq!(lock.holder(), None);
    assert_eq!(
        lock.acquire(true, LONG),
        Some(Acquired { recovered: false })
    );
    lock.release().unwrap();
    drop(lock);
    teardown(rt, pool);
}

#[test]
fn lock_makes_counter_exact_across_processes() {
    const N: usize = 3;
    const K: u64 = 3000;
    let (rt, name, pool) = setup();
    let lock = Lock::create(&pool).unwrap();
    let arr = RawArray::create(&pool, 8).unwrap();
    let args = [r(lock.block_ref()), r(arr.block_ref()), K.to_string()];
    let ws: Vec<Worker> = (0..N).map(|_| spawn("lock-count", &name, &args)).collect();
    for w in ws {
        let (code, lines) = w.finish();
        assert_eq!(code, 0, "worker output: {lines:?}");
        assert_eq!(lines, vec!["done 0".to_string()]);
    }
    let mut b = [0u8; 8];
    arr.read_at(0, &mut b);
    assert_eq!(u64::from_le_bytes(b), N as u64 * K);
    assert!(!lock.is_locked());
    drop((lock, arr));
    teardown(rt, pool);
}

#[test]
fn barrier_across_processes_gives_distinct_indices() {
    const ROUNDS: usize = 5;
    let (rt, name, pool) = setup();
    let b = Barrier::create(&pool, 4).unwrap();
    let args = [r(b.block_ref()), ROUNDS.to_string()];
    let ws: Vec<Worker> = (0..3).map(|_| spawn("barrier", &name, &args)).collect();
    let mine: Vec<u32> = (0..ROUNDS).map(|_| b.wait(LONG).unwrap()).collect();
    let mut theirs = Vec::new();
    for w in ws {
        let (code, lines) = w.finish();
        assert_eq!(code, 0, "worker output: {lines:?}");
        let idx: Vec<u32> = lines
            .iter()
            .map(|l| l.strip_prefix("index ").unwrap().parse().unwrap())
            .collect();
        assert_eq!(idx.len(), ROUNDS);
        theirs.push(idx);
    }
    for round in 0..ROUNDS {
        let mut idx: Vec<u32> = theirs.iter().map(|v| v[round]).collect();
        idx.push(mine[round]);
        idx.sort_unstable();
        assert_eq!(idx, vec![0, 1, 2, 3], "round {round}");
    }
    assert!(!b.broken());
    drop(b);
    teardown(rt, pool);
}

#[test]
fn event_set_in_one_process_wakes_another() {
    let (rt, name, pool) = setup();
    // A worker sleeps on the event; this process sets it.
    let e = Event::create(&pool).unwrap();
    let w = spawn("event-wait", &name, &[r(e.block_ref())]);
    wait_asleep(w.child.id());
    e.set();
    let (code, lines) = w.finish();
    assert_eq!((code, lines), (0, vec!["woken true".to_string()]));
    // This process waits; a worker sets it.
    let e2 = Event::create(&pool).unwrap();
    let w = spawn("event-set", &name, &[r(e2.block_ref())]);
    assert!(e2.wait(LONG));
    assert_eq!(w.finish().0, 0);
    drop((e, e2));
    teardown(rt, pool);
}

#[test]
fn process_blocked_on_semaphore_uses_no_cpu_and_is_released() {
    let (rt, name, pool) = setup();
    let s = Semaphore::create(&pool, 0).unwrap();
    let mut w = spawn("sem-acquire", &name, &[r(s.block_ref())]);
    let pid = w.child.id();
    wait_asleep(pid);
    let t0 = dragon_tests::cpu_time(pid);
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs(2)); // the measurement window, not a sync
    let used = (dragon_tests::cpu_time(pid) - t0).as_secs_f64();
    let frac = used / start.elapsed().as_secs_f64();
    println!(
        "blocked worker used {used:.3} s of CPU ({:.2}%)",
        frac * 100.0
    );
    assert!(frac < 0.05, "blocked worker used {:.1}% CPU", frac * 100.0);
    assert!(
        w.child.try_wait().unwrap().is_none(),
        "worker must still be blocked"
    );
    assert_eq!(s.get_value(), 0);
    s.release().unwrap();
    let (code, lines) = w.finish();
    assert_eq!((code, lines), (0, vec!["acquired".to_string()]));
    assert_eq!(s.get_value(), 0);
    drop(s);
    teardown(rt, pool);
}
