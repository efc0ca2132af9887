//! Worker processes for the multi-process tests. `shm-worker ROLE ARGS...` (clap; `--help`);
//! prints `ready` once it has opened its objects, then works; results go to stdout, one per
//! line.
//!
//! Roles:
//! * `alloc-loop POOL ITERS SEED`: allocates and frees random sizes, filling each block with
//!   a pattern and checking the pattern of everything it holds before freeing (so corruption
//!   by other processes is caught). ITERS = 0 loops until killed. Exits 3 on corruption.
//! * `chan-produce CHAN PRODUCER COUNT`: sends COUNT messages made by [`message`] (mixed
//!   inline and pool-block payloads), blocking when the channel is full.
//! * `chan-consume CHAN NPRODUCERS`: receives until the channel is closed and drained,
//!   checks every payload against [`message`] and FIFO order per producer, then prints
//!   `got P COUNT HASHSUM` per producer. Exits 3 on a bad payload or order.
//! * `fault-mix POOL LOCK ARRAY KV CHAN ID SEED`: the fault-injection suite's victim
//!   (`tests/tests/faults.rs`): loops over random operations until killed, printing an
//!   intent line before each one that changes shared state and an acknowledgement after
//!   it (see [`fault_mix`]). Exits 3 when it reads anything inconsistent.

use std::process::exit;
use std::time::Duration;

use clap::Parser;
use dragon_shm::channel::ChannelError;
use dragon_shm::heap::{AllocError, Block, Pool};
use dragon_shm::kv::Kv;
use dragon_shm::sync::{Lock, RawArray};
use dragon_shm::SegmentName;
use dragon_tests::{
    check_fault_value, fault_key, fault_value, message, message_hash, open_channel,
    parse_block_ref, Rng,
};

/// Worker process for the multi-process tests: prints `ready` once it has opened its
/// objects, then works; results go to stdout, one per line.
#[derive(Debug, Parser)]
#[command(name = "shm-worker", version)]
enum Role {
    /// Allocates and frees random sizes, checking the pattern of every block it frees
    /// (exits 3 on corruption); prints `done ITERS`.
    AllocLoop {
        /// Pool segment name.
        #[arg(value_parser = parse_pool_name)]
        pool: SegmentName,
        /// Iterations; 0 loops until killed.
        iters: u64,
        /// Seed of the random sizes.
        seed: u64,
    },
    /// Sends COUNT messages (mixed inline and pool-block payloads), blocking when the
    /// channel is full.
    ChanProduce {
        /// The channel: a channel segment name or POOL@REF (see `open_channel`).
        chan: String,
        /// This producer's number.
        producer: u32,
        /// Messages to send.
        count: u64,
    },
    /// Receives until the channel is closed and drained, checks payloads and FIFO order
    /// per producer, prints `got P COUNT HASHSUM` per producer (exits 3 on a bad one).
    ChanConsume {
        /// The channel: a channel segment name or POOL@REF (see `open_channel`).
        chan: String,
        /// Producers to expect.
        nproducers: usize,
    },
    /// The fault-injection victim: random alloc/free, lock sections, index puts, gets,
    /// removes and rekeys, channel sends and receives, until killed (exits 3 on anything
    /// inconsistent).
    FaultMix {
        /// Pool segment name.
        #[arg(value_parser = parse_pool_name)]
        pool: SegmentName,
        /// The Lock's block, `segment:offset:len:gen`.
        lock: String,
        /// The 16-byte RawArray the lock guards.
        array: String,
        /// The index header's block.
        kv: String,
        /// The victim's own channel (see `open_channel`).
        chan: String,
        /// This worker's number (its key namespace and channel producer number).
        id: u32,
        /// Seed of the random operations.
        seed: u64,
    },
}

fn main() {
    match Role::parse() {
        Role::AllocLoop { pool, iters, seed } => alloc_loop(pool, iters, seed),
        Role::ChanProduce {
            chan,
            producer,
            count,
        } => chan_produce(&chan, producer, count),
        Role::ChanConsume { chan, nproducers } => chan_consume(&chan, nproducers),
        Role::FaultMix {
            pool,
            lock,
            array,
            kv,
            chan,
            id,
            seed,
        } => fault_mix(&pool, [&lock, &array, &kv], &chan, id, seed),
    }
}

fn parse_pool_name(s: &str) -> Result<SegmentName, String> {
    s.parse()
        .map_err(|_| format!("not a pool segment name: {s:?}"))
}

fn pattern(b: &Block, seed: u64) -> u8 {
    (b.block_ref().offset ^ seed ^ b.len() as u64) as u8
}

fn alloc_loop(name: SegmentName, iters: u64, seed: u64) {
    let mut rng = Rng(seed | 1);
    let pool = Pool::open(&name).expect("open pool");
    println!("ready");
    let tag = rng.next_u64();
    let mut held: Vec<Block> = Vec::new();
    let mut i = 0u64;
    while iters == 0 || i < iters {
        i += 1;
        if held.len() >= 16 || (!held.is_empty() && rng.below(2) == 0) {
            let b = held.swap_remove(rng.below(held.len() as u64) as usize);
            let want = pattern(&b, tag);
            if b.as_slice().iter().any(|&x| x != want) {
                eprintln!("shm-worker: corrupted block {:?}", b.block_ref());
                exit(3);
            }
        } else {
            let cap = if rng.below(8) == 0 { 256 * 1024 } else { 2048 };
            let len = 1 + rng.below(cap) as usize;
            match pool.alloc(len) {
                Ok(mut b) => {
                    let v = pattern(&b, tag);
                    b.as_mut_slice().fill(v);
                    held.push(b);
                }
                Err(AllocError::Full) | Err(AllocError::HoldTableFull) => {}
                Err(e) => {
                    eprintln!("shm-worker: alloc failed: {e}");
                    exit(4);
                }
            }
        }
    }
    drop(held);
    println!("done {i}");
}

fn chan_produce(chan: &str, producer: u32, count: u64) {
    let ch = open_channel(chan).expect("open channel");
    println!("ready");
    let mut buf = Vec::new();
    for seq in 0..count {
        message(producer, seq, &mut buf);
        if let Err(e) = ch.send(&buf, None) {
            eprintln!("shm-worker: send failed: {e}");
            exit(4);
        }
    }
    println!("done {count}");
}

fn chan_consume(chan: &str, nprod: usize) {
    let ch = open_channel(chan).expect("open channel");
    println!("ready");
    let mut count = vec![0u64; nprod];
    let mut sum = vec![0u64; nprod];
    let mut last: Vec<Option<u64>> = vec![None; nprod];
    let mut want = Vec::new();
    loop {
        let got = ch.recv_with(None, |b| {
            if b.len() < 12 {
                return Err(format!("short message of {} bytes", b.len()));
            }
            let p = u32::from_le_bytes(b[0..4].try_into().unwrap());
            let seq = u64::from_le_bytes(b[4..12].try_into().unwrap());
            if p as usize >= nprod {
                return Err(format!("unknown producer {p}"));
            }
            message(p, seq, &mut want);
            if b != &want[..] {
                return Err(format!(
                    "payload of {p}/{seq} corrupted ({} bytes)",
                    b.len()
                ));
            }
            Ok((p as usize, seq))
        });
        match got {
            Ok(Ok((p, seq))) => {
                if last[p].is_some_and(|l| seq <= l) {
                    eprintln!("shm-worker: FIFO violated for producer {p}: {seq} after {last:?}");
                    exit(3);
                }
                last[p] = Some(seq);
                count[p] += 1;
                sum[p] = sum[p].wrapping_add(message_hash(p as u32, seq));
            }
            Ok(Err(e)) => {
                eprintln!("shm-worker: {e}");
                exit(3);
            }
            Err(ChannelError::Closed) => break,
            Err(e) => {
                eprintln!("shm-worker: recv failed: {e}");
                exit(4);
            }
        }
    }
    for p in 0..nprod {
        println!("got {p} {} {}", count[p], sum[p]);
    }
}

/// Keys of one fault worker's namespace.
const FAULT_KEYS: u32 = 24;

fn fail(what: String) -> ! {
    eprintln!("shm-worker: {what}");
    exit(3)
}

/// The fault-injection victim. Lines (each flushed before the next step):
/// `A` an alloc or free done; `L` a lock section done, `L-` its acquire timed out (a peer
/// stopped holding it), `Lr` a section that found the lock recovered;
/// `P? N VER` / `P N VER` a put of key N; `D? N` / `D N` a removal; `M? N M VER` / `M N M VER`
/// a rekey of N to M; `G` a get checked; `S? SEQ` / `S SEQ` a send on its own channel;
/// `R?` / `R SEQ` a receive (`R-` nothing came). A kill between an intent and its
/// acknowledgement leaves that one operation undecided; everything acknowledged must last.
fn fault_mix(name: &SegmentName, refs: [&str; 3], chan: &str, id: u32, seed: u64) {
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
    let pool = Pool::open(name).expect("open pool");
    let r = |s: &str| parse_block_ref(s).unwrap_or_else(|e| fail(e));
    // SAFETY: each handle goes straight into its object, which never lends its block mutably.
    let lock = Lock::attach(unsafe { pool.block(r(refs[0])) }.expect("lock block")).expect("lock");
    // SAFETY: as above.
    let arr =
        RawArray::attach(unsafe { pool.block(r(refs[1])) }.expect("array block")).expect("array");
    let kv = Kv::attach(&pool, r(refs[2])).expect("index");
    let ch = open_channel(chan).expect("open channel");
    println!("ready");
    let mut rng = Rng(seed | 1);
    let tag = rng.next_u64();
    let mut held: Vec<Block> = Vec::new();
    let mut keys: Vec<Option<u64>> = vec![None; FAULT_KEYS as usize];
    let mut ver = 0u64;
    let (mut sent, mut recvd) = (0u64, 0u64);
    let mut buf = Vec::new();
    let mut want = Vec::new();
    let wait = Some(Duration::from_millis(50));
    loop {
        match rng.below(10) {
            0 | 1 => {
                if held.len() >= 16 || (!held.is_empty() && rng.below(2) == 0) {
                    let b = held.swap_remove(rng.below(held.len() as u64) as usize);
                    let want = pattern(&b, tag);
                    if b.as_slice().iter().any(|&x| x != want) {
                        fail(format!("corrupted block {:?}", b.block_ref()));
                    }
                } else {
                    let cap = if rng.below(8) == 0 { 256 * 1024 } else { 2048 };
                    match pool.alloc(1 + rng.below(cap) as usize) {
                        Ok(mut b) => {
                            let v = pattern(&b, tag);
                            b.as_mut_slice().fill(v);
                            held.push(b);
                        }
                        Err(AllocError::Full) | Err(AllocError::HoldTableFull) => {}
                        Err(e) => fail(format!("alloc failed: {e}")),
                    }
                }
                println!("A");
            }
            2 => match lock.acquire(true, Some(Duration::from_secs(1))) {
                None => println!("L-"),
                Some(a) => {
                    let mut w = [0u8; 16];
                    arr.read_at(0, &mut w);
                    let w0 = u64::from_le_bytes(w[0..8].try_into().unwrap());
                    let w1 = u64::from_le_bytes(w[8..16].try_into().unwrap());
                    if w0 != w1 && !a.recovered {
                        fail(format!(
                            "lock section torn ({w0} != {w1}) without a recovery"
                        ));
                    }
                    let next = w0.max(w1) + 1;
                    arr.write_at(0, &next.to_le_bytes());
                    for _ in 0..rng.below(2000) {
                        std::hint::spin_loop();
                    }
                    arr.write_at(8, &next.to_le_bytes());
                    lock.release()
                        .unwrap_or_else(|e| fail(format!("release: {e}")));
                    println!("{}", if a.recovered { "Lr" } else { "L" });
                }
            },
            3 | 4 => {
                let n = rng.below(u64::from(FAULT_KEYS)) as u32;
                ver += 1;
                fault_value(id, n, ver, &mut buf);
                let mut b = match pool.alloc(buf.len()) {
                    Ok(b) => b,
                    Err(AllocError::Full) | Err(AllocError::HoldTableFull) => continue,
                    Err(e) => fail(format!("alloc failed: {e}")),
                };
                b.as_mut_slice().copy_from_slice(&buf);
                println!("P? {n} {ver}");
                match kv.put(&fault_key(id, n), b) {
                    Ok(()) => {
                        keys[n as usize] = Some(ver);
                        println!("P {n} {ver}");
                    }
                    Err(dragon_shm::kv::KvError::Full) => println!("P- {n} {ver}"),
                    Err(e) => fail(format!("put: {e}")),
                }
            }
            5 => {
                let n = rng.below(u64::from(FAULT_KEYS)) as u32;
                match kv.get(&fault_key(id, n)) {
                    Ok(got) => {
                        let seen = got.as_ref().map(|b| check_fault_value(b.as_slice()));
                        let ok = match (keys[n as usize], seen) {
                            (None, None) => true,
                            // A rekeyed value names its first key: the version (unique per worker) decides.
                            (Some(v), Some(Some(g))) => (g.0, g.2) == (id, v),
                            _ => false,
                        };
                        if !ok {
                            fail(format!(
                                "get of key {n}: want {:?}, read {seen:?}",
                                keys[n as usize]
                            ));
                        }
                        println!("G");
                    }
                    Err(e) => fail(format!("get: {e}")),
                }
            }
            6 => {
                let n = rng.below(u64::from(FAULT_KEYS)) as u32;
                let m = rng.below(u64::from(FAULT_KEYS)) as u32;
                match keys[n as usize] {
                    Some(v) if keys[m as usize].is_none() && rng.below(2) == 0 => {
                        // A checkpoint-like move: the value changes key, never copied.
                        println!("M? {n} {m} {v}");
                        match kv.rekey(&fault_key(id, n), &fault_key(id, m)) {
                            Ok(true) => {
                                keys[m as usize] = Some(v);
                                keys[n as usize] = None;
                                println!("M {n} {m} {v}");
                            }
                            Ok(false) => fail(format!("rekey of {n}: key missing")),
                            Err(e) => fail(format!("rekey: {e}")),
                        }
                    }
                    _ => {
                        println!("D? {n}");
                        match kv.remove(&fault_key(id, n)) {
                            Ok(was) if was == keys[n as usize].is_some() => {
                                keys[n as usize] = None;
                                println!("D {n}");
                            }
                            Ok(was) => fail(format!(
                                "remove of {n}: found {was}, want {:?}",
                                keys[n as usize]
                            )),
                            Err(e) => fail(format!("remove: {e}")),
                        }
                    }
                }
            }
            _ => {
                if sent - recvd < 12 && (sent == recvd || rng.below(2) == 0) {
                    message(id, sent, &mut buf);
                    println!("S? {sent}");
                    match ch.send(&buf, wait) {
                        Ok(()) => {
                            println!("S {sent}");
                            sent += 1;
                        }
                        Err(ChannelError::TimedOut)
                        | Err(ChannelError::Full)
                        | Err(ChannelError::Alloc(AllocError::Full))
                        | Err(ChannelError::Alloc(AllocError::HoldTableFull)) => {
                            println!("S- {sent}")
                        }
                        Err(e) => fail(format!("send: {e}")),
                    }
                } else {
                    println!("R?");
                    let got = ch.recv_with(wait, |b| {
                        message(id, recvd, &mut want);
                        b == &want[..]
                    });
                    match got {
                        Ok(true) => {
                            println!("R {recvd}");
                            recvd += 1;
                        }
                        Ok(false) => fail(format!("message {recvd} corrupted or out of order")),
                        Err(ChannelError::TimedOut) | Err(ChannelError::Empty) => println!("R-"),
                        Err(e) => fail(format!("recv: {e}")),
                    }
                }
            }
        }
    }
}
