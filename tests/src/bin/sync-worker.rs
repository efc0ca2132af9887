//! Worker processes for `tests/sync_mp.rs`. `sync-worker ROLE POOL REF... [ARGS]` (clap;
//! `--help`), where
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

use clap::{Args, Parser, Subcommand};
use dragon_shm::heap::{BlockRef, Pool};
use dragon_shm::sync::{Barrier, Event, Lock, RLock, RawArray, Semaphore};
use dragon_shm::SegmentName;

const LONG: Option<Duration> = Some(Duration::from_secs(60));

/// Worker process for tests/sync_mp.rs: attaches to a sync object in a pool, prints `ready`,
/// then works; results go to stdout, one per line.
#[derive(Debug, Parser)]
#[command(name = "sync-worker", version)]
struct Cli {
    #[command(subcommand)]
    role: Role,
}

/// The pool and the block of the object a role works on.
#[derive(Debug, Args)]
struct Target {
    /// Pool segment name.
    #[arg(value_name = "POOL", value_parser = parse_pool_name)]
    pool: SegmentName,
    /// Block of the object, `segment:offset:len:gen`.
    #[arg(value_name = "REF", value_parser = parse_ref)]
    obj: BlockRef,
}

#[derive(Debug, Subcommand)]
enum Role {
    /// Acquires the Lock and holds it until killed (at most 120 s).
    LockHold {
        #[command(flatten)]
        t: Target,
    },
    /// Acquires the RLock twice and holds it until killed.
    RlockHold {
        #[command(flatten)]
        t: Target,
    },
    /// K times: lock, add one to the u64 at offset 0 of the RawArray, unlock; prints
    /// `done RECOVERED` (acquires that reported a recovery).
    LockCount {
        #[command(flatten)]
        t: Target,
        /// Block of the RawArray, `segment:offset:len:gen`.
        #[arg(value_name = "ARRAY", value_parser = parse_ref)]
        array: BlockRef,
        /// Iterations.
        k: u64,
    },
    /// Waits at the Barrier ROUNDS times; prints each `index I`.
    Barrier {
        #[command(flatten)]
        t: Target,
        /// Rounds.
        rounds: u64,
    },
    /// Waits for the Event up to 60 s; prints `woken true|false`.
    EventWait {
        #[command(flatten)]
        t: Target,
    },
    /// Sets the Event.
    EventSet {
        #[command(flatten)]
        t: Target,
    },
    /// Acquires one unit of the Semaphore (waits up to 120 s); prints `acquired`.
    SemAcquire {
        #[command(flatten)]
        t: Target,
    },
}

impl Role {
    fn target(&self) -> &Target {
        match self {
            Role::LockHold { t }
            | Role::RlockHold { t }
            | Role::LockCount { t, .. }
            | Role::Barrier { t, .. }
            | Role::EventWait { t }
            | Role::EventSet { t }
            | Role::SemAcquire { t } => t,
        }
    }
}

fn main() {
    let role = Cli::parse().role;
    let t = role.target();
    let pool = Pool::open(&t.pool).unwrap_or_else(|e| fail(&format!("open pool: {e}")));
    let obj = t.obj;
    let block = |r: BlockRef| {
        // SAFETY: every handle goes straight into a sync object, which never lends its block
        // mutably.
        unsafe { pool.block(r) }.unwrap_or_else(|e| fail(&format!("resolve block: {e}")))
    };
    match role {
        Role::LockHold { .. } => {
            let lock = Lock::attach(block(obj)).unwrap_or_else(|e| fail(&e.to_string()));
            if lock.acquire(true, LONG).is_none() {
                fail("lock-hold: not acquired");
            }
            println!("ready");
            hang()
        }
        Role::RlockHold { .. } => {
            let lock = RLock::attach(block(obj)).unwrap_or_else(|e| fail(&e.to_string()));
            if lock.acquire(true, LONG).is_none() {
                fail("rlock-hold: not acquired");
            }
            if lock.acquire(true, LONG).is_none() {
                fail("rlock-hold: not re-acquired");
            }
            println!("ready");
            hang()
        }
        Role::LockCount { array, k, .. } => {
            let lock = Lock::attach(block(obj)).unwrap_or_else(|e| fail(&e.to_string()));
            let arr = RawArray::attach(block(array)).unwrap_or_else(|e| fail(&e.to_string()));
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
        Role::Barrier { rounds, .. } => {
            let b = Barrier::attach(block(obj)).unwrap_or_else(|e| fail(&e.to_string()));
            println!("ready");
            for _ in 0..rounds {
                match b.wait(LONG) {
                    Ok(i) => println!("index {i}"),
                    Err(e) => fail(&format!("barrier: {e}")),
                }
            }
        }
        Role::EventWait { .. } => {
            let e = Event::attach(block(obj)).unwrap_or_else(|e| fail(&e.to_string()));
            println!("ready");
            println!("woken {}", e.wait(LONG));
        }
        Role::EventSet { .. } => {
            let e = Event::attach(block(obj)).unwrap_or_else(|e| fail(&e.to_string()));
            println!("ready");
            e.set();
        }
        Role::SemAcquire { .. } => {
            let s = Semaphore::attach(block(obj)).unwrap_or_else(|e| fail(&e.to_string()));
            println!("ready");
            // Bounded only so a failed test cannot leave it behind forever.
            let got = s.acquire(true, Some(Duration::from_secs(120)));
            println!("{}", if got { "acquired" } else { "timeout" });
        }
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

fn parse_pool_name(s: &str) -> Result<SegmentName, String> {
    s.parse()
        .map_err(|_| format!("not a pool segment name: {s:?}"))
}

/// A block handle `segment:offset:len:gen`.
fn parse_ref(s: &str) -> Result<BlockRef, String> {
    let f: Vec<u64> = s.split(':').filter_map(|x| x.parse().ok()).collect();
    if f.len() != 4 {
        return Err(format!("bad block ref {s:?} (want segment:offset:len:gen)"));
    }
    let gen = u32::try_from(f[3]).map_err(|_| "bad block ref gen".to_string())?;
    Ok(BlockRef {
        segment: f[0],
        offset: f[1],
        len: f[2],
        gen,
        _pad: 0,
    })
}
