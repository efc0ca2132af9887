//! Worker processes for `tests/sync_mp.rs`. `sync-worker ROLE POOL REF... [ARGS]`, where
//! POOL is a pool segment name and each REF a block handle `segment:offset:len:gen`.
//! Prints `ready` once attached, then works; results go to stdout, one per line.
//!
//! Roles:
//! * `lock-hold POOL LOCK`: acquires the Lock and holds it until killed (at most 120 s).
//! * `rlock-hold POOL RLOCK`: acquires the RLock twice and holds it until killed.
//! * `lock-count POOL LOCK ARRAY K`: K times: lock, read-modify-write the u64 at offset 0
//!   of the RawArray (plain bytes, so only the lock makes it exact), unlock. Prints
//!   `done RECOVERED` (how many acquires reported a recovery).
//! * `barrier POOL BARRIER ROUNDS`: waits ROUNDS times; prints each `index I`.
//! * `event-wait POOL EVENT`: waits up to 60 s; prints `woken true|false`.
//! * `event-set POOL EVENT`: sets the event.
//! * `sem-acquire POOL SEM`: acquires one unit (waits up to 120 s); prints `acquired`.

use std::process::exit;
use std::time::Duration;

use dragon_shm::heap::{BlockRef, Pool};
use dragon_shm::sync::{Barrier, Event, Lock, RLock, RawArray, Semaphore};
use dragon_shm::SegmentName;

const LONG: Option<Duration> = Some(Duration::from_secs(60));

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let role = args.first().map(String::as_str).unwrap_or("");
    if args.len() < 3 {
        fail("usage: sync-worker ROLE POOL REF [ARGS]");
    }
    let name: SegmentName = args[1].parse().unwrap_or_else(|_| fail("bad pool name"));
    let pool = Pool::open(&name).unwrap_or_else(|e| fail(&format!("open pool: {e}")));
    let block = |i: usize| {
        let r = parse_ref(args.get(i).map(String::as_str).unwrap_or(""));
        pool.block(r)
            .unwrap_or_else(|e| fail(&format!("resolve block: {e}")))
    };
    let num = |i: usize| -> u64 {
        args.get(i)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| fail("bad number"))
    };
    match role {
        "lock-hold" => {
            let lock = Lock::attach(block(2)).unwrap_or_else(|e| fail(&e.to_string()));
            if lock.acquire(true, LONG).is_none() {
                fail("lock-hold: not acquired");
            }
            println!("ready");
            hang()
        }
        "rlock-hold" => {
            let lock = RLock::attach(block(2)).unwrap_or_else(|e| fail(&e.to_string()));
            if lock.acquire(true, LONG).is_none() {
                fail("rlock-hold: not acquired");
            }
            if lock.acquire(true, LONG).is_none() {
                fail("rlock-hold: not re-acquired");
            }
            println!("ready");
            hang()
        }
        "lock-count" => {
            let lock = Lock::attach(block(2)).unwrap_or_else(|e| fail(&e.to_string()));
            let arr = RawArray::attach(block(3)).unwrap_or_else(|e| fail(&e.to_string()));
            let k = num(4);
            println!("ready");
            let mut recovered = 0;
            for _ in 0..k {
                let a = lock
                    .acquire(true, LONG)
                    .unwrap_or_else(|| fail("lock-count: timeout"));
                recovered += u32::from(a.recovered);
                let mut b = [0u8; 8];
                arr.read_at(0, &mut b);
                arr.write_at(0, &(u64::from_le_bytes(b) + 1).to_le_bytes());
                lock.release().unwrap_or_else(|e| fail(&e.to_string()));
            }
            println!("done {recovered}");
        }
        "barrier" => {
            let b = Barrier::attach(block(2)).unwrap_or_else(|e| fail(&e.to_string()));
            let rounds = num(3);
            println!("ready");
            for _ in 0..rounds {
                match b.wait(LONG) {
                    Ok(i) => println!("index {i}"),
                    Err(e) => fail(&format!("barrier: {e}")),
                }
            }
        }
        "event-wait" => {
            let e = Event::attach(block(2)).unwrap_or_else(|e| fail(&e.to_string()));
            println!("ready");
            println!("woken {}", e.wait(LONG));
        }
        "event-set" => {
            let e = Event::attach(block(2)).unwrap_or_else(|e| fail(&e.to_string()));
            println!("ready");
            e.set();
        }
        "sem-acquire" => {
            let s = Semaphore::attach(block(2)).unwrap_or_else(|e| fail(&e.to_string()));
            println!("ready");
            // Bounded only so a failed test cannot leave it behind forever.
            let got = s.acquire(true, Some(Duration::from_secs(120)));
            println!("{}", if got { "acquired" } else { "timeout" });
        }
        _ => fail(&format!("unknown role {role:?}")),
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("sync-worker: {msg}");
    exit(2)
}

/// Holds on until killed (exits after two minutes, so a failed test leaves nothing behind).
fn hang() -> ! {
    std::thread::sleep(Duration::from_secs(120));
    exit(1)
}

fn parse_ref(s: &str) -> BlockRef {
    let f: Vec<u64> = s.split(':').filter_map(|x| x.parse().ok()).collect();
    if f.len() != 4 {
        fail(&format!("bad block ref {s:?}"));
    }
    let gen = u32::try_from(f[3]).unwrap_or_else(|_| fail("bad block ref gen"));
    BlockRef {
        segment: f[0],
        offset: f[1],
        len: f[2],
        gen,
        _pad: 0,
    }
}
