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

use std::process::exit;

use clap::Parser;
use dragon_shm::channel::ChannelError;
use dragon_shm::heap::{AllocError, Block, Pool};
use dragon_shm::SegmentName;
use dragon_tests::{message, message_hash, open_channel, Rng};

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
