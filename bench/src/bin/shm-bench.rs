//! `shm-bench`: the shared-memory layer measured against its own floor, in one run.
//!
//! (a) raw floor: two processes ping-pong one shared cache line (pinned to different CPUs);
//! (b) a Linux pipe ping-pong; (c) our channel round trip for 8 B, 4 KiB, 1 MiB and 64 MiB
//! payloads (large ones as pool blocks passed back and forth, zero copy), and 1->1 and 2->2
//! throughput; (d) alloc/free ops/s from one and two processes; plus memcpy of 64 MiB
//! against allocate + fill + send of 64 MiB, and a 64 MiB round trip whose peer reads (sums)
//! every byte against summing 64 MiB in process. What each receiver does with the data is in
//! its row's name. Every figure is printed also as a ratio to (a).
//!
//! Usage: `shm-bench [--quick] [--same-core] [--rounds N]` (clap; `--help`). Children are
//! this binary re-executed with the hidden `child ROLE ...`; they print `ready`, wait for a go byte on stdin, work, print results.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use dragon_bench::Internal;
use dragon_shm::channel::{Channel, Message};
use dragon_shm::heap::Pool;
use dragon_shm::platform::{pin_to_cpu, random_u64, usable_cpus};
use dragon_shm::segment::HEADER_SIZE;
use dragon_shm::{Segment, SegmentKind, SegmentName};

const T: Option<Duration> = Some(Duration::from_secs(30));
/// Untimed round trips first (page faults on first touch of shared metadata, caches).
const WARMUP: u64 = 100;

/// The shared-memory layer measured against its own floor (a cache line ping-pong between
/// two pinned processes), in one run; every figure is also printed as a ratio to the floor.
#[derive(Debug, Parser)]
#[command(name = "shm-bench", version, disable_help_subcommand = true)]
struct Cli {
    /// Fewer iterations: a quick, noisier run.
    #[arg(long)]
    quick: bool,
    /// Runs the peer process on the parent's CPU (CPU 0) instead of CPU 1.
    #[arg(long)]
    same_core: bool,
    /// Runs the whole measurement N times and summarizes the goals over the rounds.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u64).range(1..=1000))]
    rounds: u64,
    #[command(subcommand)]
    internal: Option<Internal>,
}

struct Opts {
    quick: bool,
    same_core: bool,
    rounds: usize,
    /// CPUs this process may use, counted before it pins itself.
    cpus: usize,
}

fn main() {
    let cli = Cli::parse();
    if let Some(Internal::Child { args }) = cli.internal {
        child(&args);
        return;
    }
    let o = Opts {
        quick: cli.quick,
        same_core: cli.same_core,
        rounds: cli.rounds as usize,
        cpus: usable_cpus(),
    };
    machine();
    let mut g1s = Vec::new();
    let mut g2s = Vec::new();
    for r in 0..o.rounds {
        if o.rounds > 1 {
            println!("\n## round {} of {}", r + 1, o.rounds);
        }
        let (g1, g2) = run(&o);
        g1s.extend(g1);
        g2s.push(g2);
    }
    if o.rounds > 1 {
        println!(
            "\n## summary over {} rounds (median of per-round ratios)",
            o.rounds
        );
        if !g1s.is_empty() {
            let m = median(&mut g1s);
            println!(
                "goal: 8 B round trip within 4x the raw floor: {m:.2}x -> {}",
                verdict(m <= 4.0)
            );
        }
        let m = median(&mut g2s);
        println!(
            "goal: 64 MiB block round trip within 2x the 8 B one: {m:.2}x -> {}",
            verdict(m <= 2.0)
        );
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Prints what the figures were measured on.
fn machine() {
    let cpu = dragon_bench::cpu_model();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "# machine: {cpu}, {} online CPUs, Linux {}",
        dragon_shm::platform::online_cpus(),
        kernel.trim()
    );
}

/// One result line.
struct Row {
    name: String,
    ns: f64,
    extra: String,
}

fn peer_cpu(o: &Opts) -> usize {
    if o.same_core || o.cpus < 2 {
        0
    } else {
        1
    }
}

struct Kid {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
}

impl Kid {
    fn spawn(args: &[String]) -> Kid {
        let exe = std::env::current_exe().expect("current exe");
        let mut child = Command::new(exe)
            .arg("child")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn child");
        let out = BufReader::new(child.stdout.take().unwrap());
        let mut k = Kid { child, out };
        assert_eq!(k.line(), "ready");
        k
    }
    fn line(&mut self) -> String {
        let mut s = String::new();
        self.out.read_line(&mut s).expect("child output");
        s.trim_end().to_string()
    }
    fn go(&mut self) {
        self.child.stdin.as_mut().unwrap().write_all(b"g").unwrap();
        self.child.stdin.as_mut().unwrap().flush().unwrap();
    }
    fn finish(mut self) -> String {
        let l = self.line();
        let st = self.child.wait().unwrap();
        assert!(st.success(), "child failed: {st:?}");
        l
    }
}

fn wait_go() {
    let mut b = [0u8; 1];
    std::io::stdin().read_exact(&mut b).expect("go byte");
}

fn s(v: impl ToString) -> String {
    v.to_string()
}

/// One full measurement; returns the two goal ratios (the first needs two CPUs).
fn run(o: &Opts) -> (Option<f64>, f64) {
    let rt = random_u64();
    let n_small: u64 = if o.quick { 20_000 } else { 200_000 };
    // Count CPUs before pinning ourselves to one.
    let cpus = o.cpus;
    let cpu = peer_cpu(o);
    if pin_to_cpu(0).is_err() {
        eprintln!("shm-bench: could not pin to CPU 0; figures will be noisier");
    }
    println!(
        "# shm-bench: {cpus} usable CPUs, parent on CPU 0, peer on CPU {cpu}{}",
        if o.quick { ", quick" } else { "" }
    );
    let mut rows = Vec::new();

    // (a) raw floor.
    let name = SegmentName::new(rt, 0, SegmentKind::Raw, 1);
    let seg = Segment::create(&name, 4096, |_| Ok(())).unwrap();
    let w = seg.atomic_u64(HEADER_SIZE).unwrap();
    let floor = if cpu == 0 {
        None
    } else {
        let mut k = Kid::spawn(&[s("floor"), name.to_string(), s(n_small * 5), s(cpu)]);
        k.go();
        let t0 = Instant::now();
        for i in 0..n_small * 5 {
            w.store(2 * i + 1, Ordering::Release);
            while w.load(Ordering::Acquire) != 2 * i + 2 {
                std::hint::spin_loop();
            }
        }
        let ns = t0.elapsed().as_nanos() as f64 / (n_small * 5) as f64;
        k.finish();
        rows.push(Row {
            name: s("(a) raw floor: shared cache line round trip"),
            ns,
            extra: s(""),
        });
        Some(ns)
    };
    drop(seg);

    // (b) pipe ping-pong.
    {
        let n = n_small / 4;
        let mut k = Kid::spawn(&[s("pipe"), s(n), s(cpu)]);
        let mut stdin = k.child.stdin.take().unwrap();
        let mut b = [0u8; 1];
        let t0 = Instant::now();
        for _ in 0..n {
            stdin.write_all(b"x").unwrap();
            k.out.read_exact(&mut b).unwrap();
        }
        let ns = t0.elapsed().as_nanos() as f64 / n as f64;
        drop(stdin);
        let _ = k.child.wait();
        rows.push(Row {
            name: s("(b) pipe round trip, 1 byte"),
            ns,
            extra: s(""),
        });
    }

    // (c) channel round trips and throughput.
    let pool_name = SegmentName::new(rt, 0, SegmentKind::Pool, 2);
    let pool = Pool::create(&pool_name, 512 << 20).unwrap();
    let ping = SegmentName::new(rt, 0, SegmentKind::Channel, 3);
    let pong = SegmentName::new(rt, 0, SegmentKind::Channel, 4);
    let c_ping = Channel::create(&ping, 64, 256, Some(pool.clone())).unwrap();
    let c_pong = Channel::create(&pong, 64, 256, Some(pool.clone())).unwrap();
    let mut rt8 = 0.0;
    for (label, len, n) in [
        ("8 B", 8usize, n_small),
        ("4 KiB", 4096, n_small / 4),
        ("1 MiB", 1 << 20, if o.quick { 200 } else { 2000 }),
        ("64 MiB", 64 << 20, if o.quick { 50 } else { 500 }),
    ] {
        let mut k = Kid::spawn(&[
            s("echo"),
            pool_name.to_string(),
            ping.to_string(),
            pong.to_string(),
            s(n + WARMUP),
            s(cpu),
        ]);
        k.go();
        let ns = if len <= 200 {
            let msg = vec![7u8; len];
            let mut t0 = Instant::now();
            for i in 0..n + WARMUP {
                if i == WARMUP {
                    t0 = Instant::now();
                }
                c_ping.send(&msg, T).unwrap();
                c_pong.recv_with(T, |m| assert_eq!(m.len(), len)).unwrap();
            }
            t0.elapsed().as_nanos() as f64 / n as f64
        } else {
            // An already-filled block travels back and forth without copies.
            let mut b = pool.alloc(len).unwrap();
            b.as_mut_slice().fill(9);
            let mut t0 = Instant::now();
            for i in 0..n + WARMUP {
                if i == WARMUP {
                    t0 = Instant::now();
                }
                c_ping.send_block(b, T).map_err(|_| "send").unwrap();
                b = match c_pong.recv(T).unwrap() {
                    Message::Block(b) => b,
                    Message::Inline(_) => panic!("expected a block"),
                };
            }
            t0.elapsed().as_nanos() as f64 / n as f64
        };
        k.finish();
        if len == 8 {
            rt8 = ns;
        }
        let kind = if len <= 200 {
            "inline, copied in and out"
        } else {
            "block handle, zero copy: the peer touches no byte"
        };
        rows.push(Row {
            name: format!("(c) channel round trip, {label} ({kind})"),
            ns,
            extra: s(""),
        });
    }
    let rt64 = rows.last().map(|r| r.ns).unwrap_or(0.0);

    // The same 64 MiB round trip with a peer that reads every byte (sums it) before sending
    // the block back, beside summing 64 MiB in this process (same DRAM-sized regime): what
    // a receiver that uses the data pays.
    let sum_len = 64usize << 20;
    let sum_n = if o.quick { 10 } else { 50 };
    let local_sum = {
        let mut b = pool.alloc(sum_len).unwrap();
        b.as_mut_slice().fill(9);
        let _ = std::hint::black_box(sum_bytes(b.as_slice()));
        let t0 = Instant::now();
        for _ in 0..sum_n {
            std::hint::black_box(sum_bytes(std::hint::black_box(b.as_slice())));
        }
        t0.elapsed().as_nanos() as f64 / sum_n as f64
    };
    rows.push(Row {
        name: s("sum of 64 MiB in process (reads every byte)"),
        ns: local_sum,
        extra: format!("{:.1} GB/s", sum_len as f64 / local_sum),
    });
    let rt64_sum = {
        let mut k = Kid::spawn(&[
            s("echo-sum"),
            pool_name.to_string(),
            ping.to_string(),
            pong.to_string(),
            s(sum_n + 2),
            s(cpu),
        ]);
        k.go();
        let mut b = pool.alloc(sum_len).unwrap();
        b.as_mut_slice().fill(9);
        let mut t0 = Instant::now();
        for i in 0..sum_n + 2 {
            if i == 2 {
                t0 = Instant::now();
            }
            c_ping.send_block(b, T).map_err(|_| "send").unwrap();
            b = match c_pong.recv(T).unwrap() {
                Message::Block(b) => b,
                Message::Inline(_) => panic!("expected a block"),
            };
        }
        let ns = t0.elapsed().as_nanos() as f64 / sum_n as f64;
        let out = k.finish();
        assert!(
            out.contains(&format!("sum {}", 9 * sum_len as u64)),
            "{out}"
        );
        ns
    };
    rows.push(Row {
        name: s("(c) channel round trip, 64 MiB block, the peer sums every byte"),
        ns: rt64_sum,
        extra: format!("{:.2}x the in-process sum", rt64_sum / local_sum),
    });

    for (label, pairs) in [("1->1", 1usize), ("2->2", 2)] {
        let n = n_small * 5 / pairs as u64;
        let mut kids = Vec::new();
        for i in 0..pairs {
            let c = if i % 2 == 0 { cpu } else { 0 };
            kids.push(Kid::spawn(&[
                s("produce"),
                pool_name.to_string(),
                ping.to_string(),
                s(n),
                s(c),
            ]));
            kids.push(Kid::spawn(&[
                s("consume"),
                pool_name.to_string(),
                ping.to_string(),
                s(n),
                s(1 - c.min(1)),
            ]));
        }
        let t0 = Instant::now();
        for k in &mut kids {
            k.go();
        }
        for k in kids {
            k.finish();
        }
        let total = n * pairs as u64;
        let secs = t0.elapsed().as_secs_f64();
        rows.push(Row {
            name: format!("(c) channel throughput {label}, 8 B messages"),
            ns: secs * 1e9 / total as f64,
            extra: format!("{:.2} M msg/s", total as f64 / secs / 1e6),
        });
    }
    drop((c_ping, c_pong));

    // (d) alloc/free from one and two processes.
    for procs in [1usize, 2] {
        let n = n_small * 5;
        let mut kids: Vec<Kid> = (0..procs)
            .map(|i| {
                Kid::spawn(&[
                    s("alloc"),
                    pool_name.to_string(),
                    s(n),
                    s(if i == 0 { cpu } else { 0 }),
                ])
            })
            .collect();
        let t0 = Instant::now();
        for k in &mut kids {
            k.go();
        }
        for k in kids {
            k.finish();
        }
        let secs = t0.elapsed().as_secs_f64();
        let total = n * procs as u64;
        rows.push(Row {
            name: format!("(d) alloc+free of 64 B, {procs} process(es)"),
            ns: secs * 1e9 / total as f64,
            extra: format!("{:.2} M ops/s", total as f64 / secs / 1e6),
        });
    }

    // 64 MiB: memcpy against allocate + fill + send.
    let len = 64 << 20;
    let reps = if o.quick { 5 } else { 20 };
    let src = vec![1u8; len];
    let mut dst = vec![0u8; len];
    dst.copy_from_slice(&src); // fault the pages in
    let t0 = Instant::now();
    for i in 0..reps {
        dst[i] = i as u8;
        dst.copy_from_slice(&src);
    }
    let memcpy = t0.elapsed().as_nanos() as f64 / reps as f64;
    std::hint::black_box(&dst);
    rows.push(Row {
        name: s("memcpy 64 MiB (in process)"),
        ns: memcpy,
        extra: format!("{:.1} GB/s", len as f64 / memcpy),
    });
    let c = Channel::create(&ping, 4, 256, Some(pool.clone())).unwrap();
    let t0 = Instant::now();
    for _ in 0..reps {
        let mut b = pool.alloc(len).unwrap();
        b.as_mut_slice().copy_from_slice(&src);
        c.send_block(b, T).map_err(|_| "send").unwrap();
        drop(c.recv(T).unwrap());
    }
    let afs = t0.elapsed().as_nanos() as f64 / reps as f64;
    rows.push(Row {
        name: s("allocate + fill + send + receive 64 MiB"),
        ns: afs,
        extra: format!("{:.1} GB/s", len as f64 / afs),
    });
    drop(c);
    drop(pool);

    // The table.
    println!("{:<84} {:>14} {:>10}", "benchmark", "ns per op", "x floor");
    for r in &rows {
        let ratio = floor.map_or(s("n/a"), |f| format!("{:.1}", r.ns / f));
        println!("{:<84} {:>14.1} {:>10}  {}", r.name, r.ns, ratio, r.extra);
    }
    println!();
    let g1 = floor.map(|f| rt8 / f);
    if let Some(g1) = g1 {
        println!(
            "goal: 8 B round trip within 4x the raw floor: {g1:.2}x -> {}",
            verdict(g1 <= 4.0)
        );
    } else {
        println!("goal checks need two CPUs (peer ran on the same CPU)");
    }
    let g2 = rt64 / rt8;
    println!(
        "goal: 64 MiB block round trip within 2x the 8 B one: {g2:.2}x -> {} (a handle round \
         trip: the block is passed, no byte of it is read or copied)",
        verdict(g2 <= 2.0)
    );
    println!(
        "report: a 64 MiB round trip whose peer reads every byte takes {:.2}x summing 64 MiB \
         in process (the receiver's own reading is the cost; nothing is copied)",
        rt64_sum / local_sum
    );
    println!(
        "report: allocate+fill+send+receive 64 MiB takes {:.2}x a 64 MiB memcpy (both \
         DRAM-sized: the fill writes every byte once, as the memcpy does)",
        afs / memcpy
    );
    (g1, g2)
}

/// The sum of every byte (reads all of them, 8 at a time).
fn sum_bytes(b: &[u8]) -> u64 {
    let words = b.chunks_exact(8);
    let mut total: u64 = words.remainder().iter().map(|&x| u64::from(x)).sum();
    for w in words {
        let v = u64::from_le_bytes(w.try_into().unwrap());
        // Add the 8 bytes of v in two 16-bit-lane steps (no carry crosses a lane).
        let s = (v & 0x00ff_00ff_00ff_00ff) + ((v >> 8) & 0x00ff_00ff_00ff_00ff);
        total += (s & 0xffff) + ((s >> 16) & 0xffff) + ((s >> 32) & 0xffff) + (s >> 48);
    }
    total
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT met"
    }
}

fn child(args: &[String]) {
    let role = args[0].as_str();
    let a = |i: usize| args[i].clone();
    let num = |i: usize| args[i].parse::<u64>().expect("number");
    let pin = |i: usize| {
        let _ = pin_to_cpu(num(i) as usize);
    };
    match role {
        "floor" => {
            pin(3);
            let name: SegmentName = a(1).parse().unwrap();
            let seg = Segment::open(&name, Duration::from_secs(5), true).unwrap();
            let w: &AtomicU64 = seg.atomic_u64(HEADER_SIZE).unwrap();
            println!("ready");
            wait_go();
            for i in 0..num(2) {
                while w.load(Ordering::Acquire) != 2 * i + 1 {
                    std::hint::spin_loop();
                }
                w.store(2 * i + 2, Ordering::Release);
            }
            println!("done");
        }
        "pipe" => {
            pin(2);
            println!("ready");
            let mut out = std::io::stdout().lock();
            let mut inp = std::io::stdin().lock();
            let mut b = [0u8; 1];
            for _ in 0..num(1) {
                inp.read_exact(&mut b).unwrap();
                out.write_all(&b).unwrap();
                out.flush().unwrap();
            }
        }
        "echo" => {
            pin(5);
            let pool = Pool::open(&a(1).parse().unwrap()).unwrap();
            let ping = Channel::open(&a(2).parse().unwrap(), Some(pool.clone())).unwrap();
            let pong = Channel::open(&a(3).parse().unwrap(), Some(pool)).unwrap();
            println!("ready");
            wait_go();
            for _ in 0..num(4) {
                match ping.recv(T).unwrap() {
                    Message::Inline(v) => pong.send(&v, T).unwrap(),
                    Message::Block(b) => pong.send_block(b, T).map_err(|_| "send").unwrap(),
                }
            }
            println!("done");
        }
        "echo-sum" => {
            pin(5);
            let pool = Pool::open(&a(1).parse().unwrap()).unwrap();
            let ping = Channel::open(&a(2).parse().unwrap(), Some(pool.clone())).unwrap();
            let pong = Channel::open(&a(3).parse().unwrap(), Some(pool)).unwrap();
            println!("ready");
            wait_go();
            let mut last = 0;
            for _ in 0..num(4) {
                match ping.recv(T).unwrap() {
                    Message::Block(b) => {
                        last = sum_bytes(b.as_slice());
                        pong.send_block(b, T).map_err(|_| "send").unwrap();
                    }
                    Message::Inline(_) => panic!("expected a block"),
                }
            }
            println!("sum {last}");
            println!("done");
        }
        "produce" | "consume" => {
            pin(4);
            let pool = Pool::open(&a(1).parse().unwrap()).unwrap();
            let ch = Channel::open(&a(2).parse().unwrap(), Some(pool)).unwrap();
            println!("ready");
            wait_go();
            let msg = [3u8; 8];
            for _ in 0..num(3) {
                if role == "produce" {
                    ch.send(&msg, T).unwrap();
                } else {
                    ch.recv_with(T, |m| assert_eq!(m.len(), 8)).unwrap();
                }
            }
            println!("done");
        }
        "alloc" => {
            pin(3);
            let pool = Pool::open(&a(1).parse().unwrap()).unwrap();
            println!("ready");
            wait_go();
            for _ in 0..num(2) {
                drop(std::hint::black_box(pool.alloc(64).unwrap()));
            }
            println!("done");
        }
        _ => {
            eprintln!("shm-bench child: unknown role {role}");
            std::process::exit(2);
        }
    }
}
