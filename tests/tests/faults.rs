//! Fault injection over the shared-memory layer: worker processes (`shm-worker fault-mix`)
//! run random operations on one pool (alloc/free, a robust Lock guarding a two-word record,
//! DDict-index puts/gets/removes/rekeys that grow and rehash its table, sends and receives
//! of small and large messages on a channel of their own) while this process SIGKILLs one
//! at a random time each round, sometimes while it is SIGSTOPped, and SIGSTOP/SIGCONTs its
//! peers. After each kill the recovery paths run (pool sweep, the next locker's repair of
//! the index and of the Lock) and the invariants are checked:
//!
//! * `Pool::verify` passes; the pool's process count never exceeds the live attachers;
//! * every index write the dead worker acknowledged is readable with its content (a write
//!   it had started but not acknowledged may have happened or not, nothing else);
//! * the index walk (`keys` then `get`) finds only keys of live workers, each value intact;
//! * its channel holds exactly the messages it acknowledged sending and not receiving (one
//!   more or one fewer only for the operation the kill interrupted), in order, intact;
//! * the Lock is acquirable within a bound, reports the recovery, and a torn record is only
//!   ever seen after a recovery;
//! * every wait is bounded: a live worker that prints nothing for 10 s, or a check that
//!   takes over 60 s, is a hang (a watchdog ends the run and reports it).
//!
//! At the end every hold is back to what this process holds, the index is empty, and no
//! segment of the test's runtime is left. The run prints one `faults:` line of counts.
//!
//! `DRAGON_FAULT_KILLS` sets the number of kills (default 60; `make stress` runs 1000).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dragon_shm::channel::{Channel, ChannelError};
use dragon_shm::heap::Pool;
use dragon_shm::kv::Kv;
use dragon_shm::sync::{Lock, RawArray};
use dragon_shm::testing::{leftovers, test_runtime};
use dragon_shm::{SegmentKind, SegmentName};
use dragon_tests::{channel_spec, check_fault_value, fault_key, fmt_block_ref, message, Rng};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const BIN: &str = env!("CARGO_BIN_EXE_shm-worker");
/// Keys per worker (as in `shm-worker`).
const KEYS: u32 = 24;
/// Workers running at once.
const WORKERS: usize = 3;
/// A live worker silent this long is hung.
const SILENT: Duration = Duration::from_secs(10);
/// A check phase of this process longer than this is hung.
const PHASE: Duration = Duration::from_secs(60);

fn kills() -> u64 {
    std::env::var("DRAGON_FAULT_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60)
}

/// Milliseconds since the run started (shared with the reader threads).
fn now_ms(t0: Instant) -> u64 {
    t0.elapsed().as_millis() as u64
}

struct Victim {
    id: u32,
    child: Child,
    chan: Channel,
    reader: JoinHandle<Vec<String>>,
    ready: Arc<AtomicBool>,
    last: Arc<AtomicU64>,
    /// Intent lines printed so far (an operation on shared state has begun).
    intents: Arc<AtomicU64>,
}

impl Victim {
    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }
}

#[derive(Default, Debug)]
struct Counts {
    kills: u64,
    killed_stopped: u64,
    aimed: u64,
    stops: u64,
    ops: u64,
    lock_timeouts: u64,
    checks: u64,
    lock_recoveries: u64,
    worker_lock_recoveries: u64,
    undecided: u64,
    hangs: u64,
    lost: u64,
    in_flight_blocks: u64,
    interrupted_puts: u64,
}

struct Run {
    t0: Instant,
    pool: Pool,
    pool_name: SegmentName,
    lock: Lock,
    arr: RawArray,
    kv: Kv,
    rng: Rng,
    next_id: u32,
    c: Counts,
    /// Deadline (ms since t0) of the current check phase, 0 when none.
    phase_end: Arc<AtomicU64>,
    failures: Vec<String>,
}

impl Run {
    fn spawn(&mut self) -> Victim {
        let id = self.next_id;
        self.next_id += 1;
        let chan = Channel::create_in(&self.pool, 16, 64).expect("victim channel");
        let args = [
            self.pool_name.to_string(),
            fmt_block_ref(self.lock.block_ref()),
            fmt_block_ref(self.arr.block_ref()),
            fmt_block_ref(self.kv.header_ref()),
            channel_spec(&chan, &self.pool),
            id.to_string(),
            self.rng.next_u64().to_string(),
        ];
        let mut child = Command::new(BIN)
            .arg("fault-mix")
            .args(args)
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn shm-worker");
        let out = BufReader::new(child.stdout.take().expect("piped stdout"));
        let ready = Arc::new(AtomicBool::new(false));
        let last = Arc::new(AtomicU64::new(now_ms(self.t0)));
        let intents = Arc::new(AtomicU64::new(0));
        let (r2, l2, i2, t0) = (ready.clone(), last.clone(), intents.clone(), self.t0);
        let reader = std::thread::spawn(move || {
            let mut lines = Vec::new();
            for l in out.lines() {
                let Ok(l) = l else { break };
                l2.store(now_ms(t0), Ordering::Relaxed);
                if l.split(' ').next().is_some_and(|w| w.ends_with('?')) {
                    i2.fetch_add(1, Ordering::Release);
                }
                if l == "ready" {
                    r2.store(true, Ordering::Release);
                } else {
                    lines.push(l);
                }
            }
            lines
        });
        Victim {
            id,
            child,
            chan,
            reader,
            ready,
            last,
            intents,
        }
    }

    fn wait_ready(&mut self, v: &mut Victim) {
        let end = Instant::now() + Duration::from_secs(20);
        while !v.ready.load(Ordering::Acquire) {
            if let Ok(Some(st)) = v.child.try_wait() {
                panic!("worker {} exited before ready: {st}", v.id);
            }
            if Instant::now() > end {
                self.c.hangs += 1;
                panic!("worker {} never became ready", v.id);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn phase(&self, on: bool) {
        let end = if on {
            now_ms(self.t0) + PHASE.as_millis() as u64
        } else {
            0
        };
        self.phase_end.store(end, Ordering::Release);
    }

    fn fail(&mut self, what: String) {
        eprintln!("faults: FAILURE {what}");
        self.failures.push(what);
    }

    /// Reaps a SIGKILLed (or exited) victim and checks everything it left.
    fn settle(&mut self, mut v: Victim, killed: bool) {
        let st = v.child.wait().expect("reap worker");
        if !killed || st.code().is_some() {
            self.fail(format!(
                "worker {} ended by itself: {st} (see its stderr)",
                v.id
            ));
        }
        let lines = v.reader.join().expect("reader thread");
        self.phase(true);
        self.check_dead(v.id, &lines, &v.chan);
        v.chan.drain();
        v.chan.destroy();
        self.check_shared();
        self.phase(false);
    }

    fn check_dead(&mut self, id: u32, lines: &[String], chan: &Channel) {
        // Acceptable states of each key: None (absent) or Some(version).
        let mut acc: Vec<Vec<Option<u64>>> = vec![vec![None]; KEYS as usize];
        let (mut sent, mut recvd) = (0u64, 0u64);
        let mut pending: Option<&str> = None;
        for l in lines {
            let f: Vec<&str> = l.split(' ').collect();
            let num = |i: usize| -> u64 { f[i].parse().expect("worker line") };
            pending = None;
            match f[0] {
                "A" | "L" | "G" | "R-" => self.c.ops += 1,
                "Lr" => {
                    self.c.ops += 1;
                    self.c.worker_lock_recoveries += 1;
                }
                "L-" => self.c.lock_timeouts += 1,
                "P?" => {
                    acc[num(1) as usize].push(Some(num(2)));
                    pending = Some(l);
                }
                "P" => {
                    acc[num(1) as usize] = vec![Some(num(2))];
                    self.c.ops += 1;
                }
                "P-" => {
                    let v = Some(num(2));
                    acc[num(1) as usize].retain(|x| *x != v);
                }
                "D?" => {
                    acc[num(1) as usize].push(None);
                    pending = Some(l);
                }
                "D" => {
                    acc[num(1) as usize] = vec![None];
                    self.c.ops += 1;
                }
                "M?" => {
                    acc[num(1) as usize].push(None);
                    acc[num(2) as usize].push(Some(num(3)));
                    pending = Some(l);
                }
                "M" => {
                    acc[num(1) as usize] = vec![None];
                    acc[num(2) as usize] = vec![Some(num(3))];
                    self.c.ops += 1;
                }
                "S?" | "R?" => pending = Some(l),
                "S" => {
                    sent = num(1) + 1;
                    self.c.ops += 1;
                }
                "S-" => {}
                "R" => {
                    recvd = num(1) + 1;
                    self.c.ops += 1;
                }
                _ => self.fail(format!("worker {id}: unknown line {l:?}")),
            }
        }
        if pending.is_some() {
            self.c.undecided += 1;
        }
        if pending.is_some_and(|p| p.starts_with("P? ")) {
            self.c.interrupted_puts += 1;
        }
        // Every acknowledged index write is there with its content; the undecided one is
        // either way; then the namespace goes.
        let mut states = vec![None; KEYS as usize];
        for n in 0..KEYS {
            let key = fault_key(id, n);
            let got = match self.kv.get(&key) {
                Ok(g) => g,
                Err(e) => {
                    self.fail(format!("get of dead worker {id}'s key {n}: {e}"));
                    continue;
                }
            };
            let state = match got.as_ref().map(|b| check_fault_value(b.as_slice())) {
                None => None,
                // A rekeyed value names the key it was written under: the version identifies it.
                Some(Some((i, _, ver))) if i == id => Some(ver),
                Some(other) => {
                    self.fail(format!("worker {id} key {n}: corrupt value {other:?}"));
                    continue;
                }
            };
            drop(got);
            states[n as usize] = state;
            if !acc[n as usize].contains(&state) {
                self.c.lost += 1;
                self.fail(format!(
                    "worker {id} key {n}: read {state:?}, acknowledged {:?}",
                    acc[n as usize]
                ));
            }
            if let Err(e) = self.kv.remove(&key) {
                self.fail(format!("remove of dead worker {id}'s key {n}: {e}"));
            }
        }
        // An interrupted rekey leaves the value under exactly one of its two keys.
        if let Some(p) = pending.filter(|p| p.starts_with("M? ")) {
            let f: Vec<u64> = p[3..].split(' ').map(|x| x.parse().unwrap()).collect();
            let (n, m, v) = (f[0] as usize, f[1] as usize, Some(f[2]));
            if (states[n] == v) == (states[m] == v) {
                self.c.lost += 1;
                self.fail(format!(
                    "worker {id}: interrupted rekey {p:?} left {:?} and {:?}",
                    states[n], states[m]
                ));
            }
        }
        // Its channel holds what it sent and did not receive, in order; the interrupted
        // operation may add the message it was sending or take the one it was receiving.
        let mut got = Vec::new();
        let mut want = Vec::new();
        loop {
            let r = chan.try_recv().map(|m| {
                let b = m.bytes();
                if b.len() < 12 {
                    return None;
                }
                let seq = u64::from_le_bytes(b[4..12].try_into().unwrap());
                message(id, seq, &mut want);
                (b == &want[..]).then_some(seq)
            });
            match r {
                Ok(Some(seq)) => got.push(seq),
                Ok(None) => {
                    self.fail(format!("worker {id}: corrupt message on its channel"));
                    break;
                }
                Err(ChannelError::Empty) => break,
                Err(e) => {
                    self.fail(format!("worker {id}: drain of its channel: {e}"));
                    break;
                }
            }
        }
        let mut start = recvd;
        let mut end = sent;
        match pending.map(|p| &p[..2]) {
            Some("R?")
                if got.first() == Some(&(recvd + 1)) || (got.is_empty() && sent == recvd + 1) =>
            {
                start += 1;
                self.c.in_flight_blocks += 1;
            }
            Some("S?") if got.last() == Some(&sent) => end += 1,
            Some("S?") => self.c.in_flight_blocks += 1,
            _ => {}
        }
        if got != (start..end).collect::<Vec<_>>() {
            self.c.lost += 1;
            self.fail(format!(
                "worker {id}: channel held {got:?}, acknowledged sent {sent} received {recvd}, pending {pending:?}"
            ));
        }
    }

    /// The shared invariants: the Lock (bounded acquire, recovery reported, record repaired),
    /// the pool (sweep, verify, attachers), the index walk.
    fn check_shared(&mut self) {
        self.c.checks += 1;
        match self.lock.acquire(true, Some(Duration::from_secs(10))) {
            None => {
                self.c.hangs += 1;
                self.fail("the Lock could not be acquired within 10 s".into());
            }
            Some(a) => {
                let mut w = [0u8; 16];
                self.arr.read_at(0, &mut w);
                let (w0, w1) = (&w[0..8], &w[8..16]);
                if w0 != w1 {
                    if a.recovered {
                        self.arr.write_at(8, &w[0..8]);
                    } else {
                        self.fail("Lock record torn without a recovery".into());
                    }
                }
                if a.recovered {
                    self.c.lock_recoveries += 1;
                }
                self.lock.release().expect("release");
            }
        }
        self.pool.sweep();
        if let Err(e) = self.pool.verify() {
            self.fail(format!("Pool::verify: {e}"));
        }
        let s = self.pool.stats();
        if s.processes > WORKERS as u64 + 1 {
            self.fail(format!(
                "{} processes hold blocks after a sweep: {s:?}",
                s.processes
            ));
        }
        match self.kv.keys() {
            Err(e) => self.fail(format!("index walk: {e}")),
            Ok(keys) => {
                for k in keys {
                    let ks = String::from_utf8_lossy(&k).into_owned();
                    let Some((id, _n)) = ks
                        .strip_prefix('w')
                        .and_then(|r| r.split_once("/k"))
                        .and_then(|(i, n)| Some((i.parse::<u32>().ok()?, n.parse::<u32>().ok()?)))
                    else {
                        self.fail(format!("index walk: stray key {ks:?}"));
                        continue;
                    };
                    match self.kv.get(&k) {
                        // Removed meanwhile by its (live) owner.
                        Ok(None) => {}
                        Ok(Some(b)) => match check_fault_value(b.as_slice()) {
                            Some((i, _, _)) if i == id => {}
                            other => self.fail(format!("index walk: {ks} holds {other:?}")),
                        },
                        Err(e) => self.fail(format!("index walk: get {ks}: {e}")),
                    }
                }
            }
        }
    }
}

#[test]
fn random_kills_and_stops_lose_nothing_and_leave_nothing() {
    let rt = test_runtime();
    let pool_name = SegmentName::new(rt, 0, SegmentKind::Pool, 1);
    let pool = Pool::create(&pool_name, 96 << 20).unwrap();
    let lock = Lock::create(&pool).unwrap();
    let arr = RawArray::create(&pool, 16).unwrap();
    let kv = Kv::create(&pool).unwrap();
    let base = pool.stats();
    let seed = rt | 1;
    println!("seed {seed:#x}");
    let t0 = Instant::now();
    let phase_end = Arc::new(AtomicU64::new(0));
    let pids: Arc<std::sync::Mutex<Vec<i32>>> = Arc::default();
    {
        // The watchdog: a check phase that outlives its bound is a hang; the run ends there
        // (workers die with this process through PDEATHSIG, and are killed here too).
        let (pe, pids) = (phase_end.clone(), pids.clone());
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(200));
            let end = pe.load(Ordering::Acquire);
            if end != 0 && now_ms(t0) > end {
                eprintln!("faults: HANG: a check phase took over {PHASE:?}; hangs 1");
                for &p in pids.lock().unwrap().iter() {
                    let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
                }
                std::process::exit(2);
            }
        });
    }
    let mut run = Run {
        t0,
        pool,
        pool_name,
        lock,
        arr,
        kv,
        rng: Rng(seed),
        next_id: 0,
        c: Counts::default(),
        phase_end,
        failures: Vec::new(),
    };
    let mut live: Vec<Victim> = Vec::new();
    for _ in 0..kills() {
        while live.len() < WORKERS {
            let mut v = run.spawn();
            run.wait_ready(&mut v);
            live.push(v);
        }
        *pids.lock().unwrap() = live.iter().map(|v| v.child.id() as i32).collect();
        // Fault injection: random run times (not synchronisation).
        std::thread::sleep(Duration::from_micros(run.rng.below(15_000)));
        let i = run.rng.below(live.len() as u64) as usize;
        if run.rng.below(3) == 0 {
            // Freeze a peer for a while (it may hold the Lock or the index mutex).
            let j = run.rng.below(live.len() as u64) as usize;
            if j != i {
                let p = live[j].pid();
                kill(p, Signal::SIGSTOP).expect("stop");
                std::thread::sleep(Duration::from_micros(run.rng.below(30_000)));
                kill(p, Signal::SIGCONT).expect("cont");
                run.c.stops += 1;
            }
        }
        let v = live.swap_remove(i);
        if run.rng.below(2) == 0 {
            // Aim at an operation: kill right after the victim announced one (it runs it
            // while this process reads the line). Bounded: a victim that announces nothing
            // within a second is killed anyway.
            let seen = v.intents.load(Ordering::Acquire);
            let end = Instant::now() + Duration::from_secs(1);
            while v.intents.load(Ordering::Acquire) == seen && Instant::now() < end {
                std::thread::yield_now();
            }
            run.c.aimed += 1;
        }
        if run.rng.below(8) == 0 {
            // Killed while frozen (after a SIGSTOP at a random point).
            kill(v.pid(), Signal::SIGSTOP).expect("stop");
            run.c.killed_stopped += 1;
        }
        kill(v.pid(), Signal::SIGKILL).expect("kill");
        run.c.kills += 1;
        run.settle(v, true);
        // Every survivor keeps working: a silent one is hung.
        let now = now_ms(t0);
        for v in &live {
            let quiet = now.saturating_sub(v.last.load(Ordering::Relaxed));
            if quiet > SILENT.as_millis() as u64 {
                run.c.hangs += 1;
                let id = v.id;
                run.fail(format!("worker {id} silent for {quiet} ms"));
            }
        }
        if run.failures.len() > 20 {
            break;
        }
    }
    for v in live.drain(..) {
        kill(v.pid(), Signal::SIGKILL).expect("kill");
        run.c.kills += 1;
        run.settle(v, true);
    }
    // Everything is back to what this process holds: no hold leaked past the sweeps.
    run.pool.sweep();
    run.pool.verify().expect("pool consistent at the end");
    let s = run.pool.stats();
    if !run.kv.is_empty() {
        let n = run.kv.len();
        run.fail(format!("{n} keys left in the index"));
    }
    // Documented leaks (kept until the pool goes, each with the in-flight hold it carries):
    // a channel block handed over in the instructions between a hold and a slot commit, and
    // a put's value block in the one store between its hold going in flight and its journal
    // entry (kv crash windows). At most one per interrupted channel operation or put; the
    // leaked bytes (the index table's growth aside) show which.
    let extra = s.blocks.saturating_sub(base.blocks);
    let table_growth = (run.kv.stats().capacity.saturating_sub(16)) * 80;
    let leaked_bytes = s.used.saturating_sub(base.used + table_growth);
    if s.holds != base.holds + extra || s.processes != base.processes {
        run.fail(format!("holds leaked: {s:?} vs at the start {base:?}"));
    }
    if extra > run.c.in_flight_blocks + run.c.interrupted_puts {
        run.fail(format!(
            "{extra} blocks left ({leaked_bytes} bytes), {} channel operations and {} puts were interrupted",
            run.c.in_flight_blocks, run.c.interrupted_puts
        ));
    }
    let c = &run.c;
    println!(
        "faults: kills {} (of them while stopped {}, aimed at an announced operation {}), stops {}, operations completed {}, invariant checks {}, lock recoveries {} (+{} by workers), lock timeouts {}, undecided {}, hangs {}, lost {}, blocks left in flight {extra} ({leaked_bytes} bytes), {:.1} s",
        c.kills,
        c.killed_stopped,
        c.aimed,
        c.stops,
        c.ops,
        c.checks,
        c.lock_recoveries,
        c.worker_lock_recoveries,
        c.lock_timeouts,
        c.undecided,
        c.hangs,
        c.lost,
        t0.elapsed().as_secs_f64()
    );
    let failures = std::mem::take(&mut run.failures);
    drop(run);
    assert!(failures.is_empty(), "failures: {failures:#?}");
    assert!(
        leftovers(rt).is_empty(),
        "segments left: {:?}",
        leftovers(rt)
    );
}
