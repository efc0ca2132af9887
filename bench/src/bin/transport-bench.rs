//! `transport-bench`: the transport measured against raw loopback TCP, in one run.
//!
//! Two processes on 127.0.0.1. Baseline: a raw TCP socket pair (8 B ping-pong; a payload of
//! each size written, then a 1-byte ack back). Then each transport back end: `tcp`, and
//! `ofi` over the `tcp;ofi_rxm` and `shm` libfabric providers (skipped, with the reason, when
//! libfabric cannot be used): 8 B message ping-pong and block-to-block `put_block` of each
//! size from 64 KiB to 64 MiB, each put waited for (its completion comes after the target
//! has the bytes). Ratios: latency ours/raw (goal <= 2), bandwidth ours/raw (goal >= 0.8 at
//! 64 MiB), and for the `ofi` rows bandwidth ofi/our tcp (goals at 64 MiB: >= 1 over
//! `tcp;ofi_rxm`, >= 2 over `shm`). The raw baseline is measured before and after the back
//! ends and the better of the two figures is used.
//!
//! Usage: `transport-bench [--quick] [BACKEND...]` (default: `tcp ofi:tcp;ofi_rxm ofi:shm`;
//! clap, `--help`). The child is this binary re-executed with the hidden
//! `child raw ADDR PINGS VOLUME` or `child BACKEND NODE SECRET POOL`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use dragon_bench::Internal;
use dragon_shm::heap::Pool;
use dragon_shm::platform::random_u64;
use dragon_shm::{SegmentKind, SegmentName};
use dragon_transport::{Config, Event, NodeId, PeerAddr, Secret, Transport};

const T: Option<Duration> = Some(Duration::from_secs(30));
const MIB: usize = 1 << 20;
const SIZES: [usize; 6] = [64 << 10, 256 << 10, MIB, 4 * MIB, 16 * MIB, 64 * MIB];

/// The transport measured against raw loopback TCP, in one run: 8 B round trips and
/// block puts of 64 KiB..64 MiB per back end, as ratios to raw TCP (and ofi to our tcp).
#[derive(Debug, Parser)]
#[command(
    name = "transport-bench",
    version,
    disable_help_subcommand = true,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    /// Fewer pings and less volume: a quick, noisier run.
    #[arg(long)]
    quick: bool,
    /// Back ends to measure (default: tcp ofi:tcp;ofi_rxm ofi:shm).
    #[arg(value_name = "BACKEND")]
    backends: Vec<String>,
    #[command(subcommand)]
    internal: Option<Internal>,
}

fn main() {
    dragon_transport::logging::init_stderr();
    let cli = Cli::parse();
    if let Some(Internal::Child { args }) = cli.internal {
        child(&args);
        return;
    }
    let quick = cli.quick;
    let pings = if quick { 2_000 } else { 20_000 };
    let volume = if quick { 256 * MIB } else { 1024 * MIB };
    let named: Vec<&str> = cli.backends.iter().map(String::as_str).collect();
    let backends: Vec<&str> = if named.is_empty() {
        DEFAULT_BACKENDS.to_vec()
    } else {
        named
    };

    // The raw baseline runs before and after the back ends; the better figure of the two
    // is the baseline (so machine noise can only make our ratios look worse).
    let raw1 = raw_parent(pings, volume);
    let mut rows = vec![("raw tcp".to_string(), raw1.clone())];
    for b in backends {
        if let Some(p) = b.strip_prefix("ofi:") {
            if let Err(e) = dragon_transport::ofi::probe(p) {
                println!("SKIP {b}: libfabric not usable: {e}");
                continue;
            }
        }
        rows.push((b.to_string(), transport_parent(b, pings, volume)));
    }
    let raw2 = raw_parent(pings, volume);
    let raw = Figures {
        rtt_us: raw1.rtt_us.min(raw2.rtt_us),
        p50_us: raw1.p50_us.min(raw2.p50_us),
        p99_us: raw1.p99_us.min(raw2.p99_us),
        gbps: raw1
            .gbps
            .iter()
            .zip(&raw2.gbps)
            .map(|(a, b)| a.max(*b))
            .collect(),
    };

    println!(
        "\ntransport-bench: loopback, 2 processes ({pings} pings, ~{} MiB per size)",
        volume / MIB
    );
    machine();
    let tcp = rows
        .iter()
        .find(|(n, _)| n == "tcp")
        .map(|(_, f)| f.clone());
    println!(
        "{:<24} {:>12} {:>12} {:>8} {:>9}",
        "test", "raw tcp", "ours", "ours/raw", "ours/tcp"
    );
    for (name, r) in rows.iter().skip(1) {
        println!("-- back end {name}");
        let vs_tcp = |x: f64, t: f64| {
            if name == "tcp" {
                String::new()
            } else {
                format!("{:>8.2}x", x / t)
            }
        };
        println!(
            "{:<24} {:>9.1} us {:>9.1} us {:>7.2}x {:>9}",
            "8 B ping-pong RTT",
            raw.rtt_us,
            r.rtt_us,
            r.rtt_us / raw.rtt_us,
            tcp.as_ref()
                .map_or(String::new(), |t| vs_tcp(r.rtt_us, t.rtt_us))
        );
        println!(
            "{:<24} {:>9.1} us {:>9.1} us {:>7.2}x",
            "  RTT median",
            raw.p50_us,
            r.p50_us,
            r.p50_us / raw.p50_us
        );
        println!(
            "{:<24} {:>9.1} us {:>9.1} us {:>7.2}x",
            "  RTT 99th percentile",
            raw.p99_us,
            r.p99_us,
            r.p99_us / raw.p99_us
        );
        for (i, s) in SIZES.iter().enumerate() {
            println!(
                "{:<24} {:>7.2} GB/s {:>7.2} GB/s {:>7.2}x {:>9}",
                format!("{} put", human(*s)),
                raw.gbps[i],
                r.gbps[i],
                r.gbps[i] / raw.gbps[i],
                tcp.as_ref()
                    .map_or(String::new(), |t| vs_tcp(r.gbps[i], t.gbps[i]))
            );
        }
    }
    // The goals, checked against this run's figures.
    let last = SIZES.len() - 1;
    println!("-- goals");
    for (name, r) in rows.iter().skip(1) {
        let lat = r.rtt_us / raw.rtt_us;
        println!(
            "{name}: 8 B RTT {lat:.2}x raw (goal <= 2): {}",
            if lat <= 2.0 { "met" } else { "NOT met" }
        );
        if let (Some(t), Some(p)) = (&tcp, name.strip_prefix("ofi:")) {
            let want = if p == "shm" { 2.0 } else { 1.0 };
            let got = r.gbps[last] / t.gbps[last];
            println!(
                "{name}: 64 MiB put {got:.2}x our tcp (goal >= {want}): {}",
                if got >= want { "met" } else { "NOT met" }
            );
        }
        if name == "tcp" {
            let got = r.gbps[last] / raw.gbps[last];
            println!(
                "tcp: 64 MiB put {got:.2}x raw tcp (goal >= 0.8): {}",
                if got >= 0.8 { "met" } else { "NOT met" }
            );
        }
    }
    // A block-to-block move on one node is at best one memory copy: the ceiling for ofi:shm.
    let mc = memcpy_gbps(64 * MIB);
    println!(
        "memcpy 64 MiB (one core, same run): {mc:.2} GB/s{}",
        tcp.as_ref().map_or(String::new(), |t| format!(
            "; 2x our tcp at 64 MiB = {:.2} GB/s",
            2.0 * t.gbps[last]
        ))
    );
    // The copy libfabric's shm provider makes for a large RMA (cross-memory attach), alone.
    let cma: Vec<String> = [1, 2]
        .iter()
        .map(|&n| match cma_gbps(64 * MIB, n) {
            Ok(g) => format!(
                "{g:.2} GB/s with {n} thread{}",
                if n > 1 { "s" } else { "" }
            ),
            Err(e) => format!("unavailable ({e})"),
        })
        .collect();
    println!("process_vm_readv 64 MiB (same run): {}", cma.join(", "));
}

/// Bandwidth of `process_vm_readv(2)` (cross-memory attach) copying `size` bytes between two
/// buffers, split over `threads` threads, the best of five rounds of eight copies. The
/// source is this process's own memory: the kernel pins and copies its pages as it does
/// another process's.
fn cma_gbps(size: usize, threads: usize) -> nix::Result<f64> {
    use nix::sys::uio::{process_vm_readv, RemoteIoVec};
    let src = vec![1u8; size];
    let mut dst = vec![0u8; size];
    let base = src.as_ptr() as usize;
    let part = size / threads;
    let pid = nix::unistd::Pid::this();
    let copy = |dst: &mut [u8]| -> nix::Result<()> {
        std::thread::scope(|s| {
            let handles: Vec<_> = dst
                .chunks_mut(part)
                .enumerate()
                .map(|(i, d)| {
                    s.spawn(move || {
                        let remote = [RemoteIoVec {
                            base: base + i * part,
                            len: d.len(),
                        }];
                        let want = d.len();
                        let n = process_vm_readv(pid, &mut [std::io::IoSliceMut::new(d)], &remote)?;
                        if n == want {
                            Ok(())
                        } else {
                            Err(nix::errno::Errno::EIO)
                        }
                    })
                })
                .collect();
            handles
                .into_iter()
                .try_for_each(|h| h.join().unwrap_or(Err(nix::errno::Errno::EIO)))
        })
    };
    copy(&mut dst)?;
    let mut best = 0.0f64;
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..8 {
            copy(&mut dst)?;
        }
        best = best.max((8 * size) as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    std::hint::black_box((&src, &dst));
    Ok(best)
}

/// Single-threaded memcpy bandwidth between two buffers of `size` bytes (pages touched
/// first), the best of five rounds of eight copies.
fn memcpy_gbps(size: usize) -> f64 {
    let src = vec![1u8; size];
    let mut dst = vec![0u8; size];
    dst.copy_from_slice(&src);
    let mut best = 0.0f64;
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..8 {
            dst.copy_from_slice(std::hint::black_box(&src));
        }
        best = best.max((8 * size) as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    std::hint::black_box(&dst);
    best
}

const DEFAULT_BACKENDS: [&str; 3] = ["tcp", "ofi:tcp;ofi_rxm", "ofi:shm"];

/// One line about the machine, so that saved results say where they came from.
fn machine() {
    let cpu = dragon_bench::cpu_model();
    let n = std::thread::available_parallelism().map_or(0, |n| n.get());
    let lf = dragon_transport::ofi::available().unwrap_or_else(|e| format!("none ({e})"));
    println!("machine: {cpu}, {n} cpus; libfabric {lf}");
}

#[derive(Clone, Debug)]
struct Figures {
    rtt_us: f64,
    /// Median and 99th percentile of single round trips.
    p50_us: f64,
    p99_us: f64,
    gbps: Vec<f64>,
}

fn human(s: usize) -> String {
    if s >= MIB {
        format!("{} MiB", s / MIB)
    } else {
        format!("{} KiB", s >> 10)
    }
}

fn reps_for(size: usize, volume: usize) -> usize {
    (volume / size).clamp(4, 20_000)
}

fn spawn_child(args: &[String]) -> (Child, BufReader<std::process::ChildStdout>) {
    let exe = std::env::current_exe().expect("own path");
    let mut c = Command::new(exe)
        .arg("child")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn child");
    let out = BufReader::new(c.stdout.take().unwrap());
    (c, out)
}

fn line(r: &mut impl BufRead) -> String {
    let mut l = String::new();
    r.read_line(&mut l).unwrap();
    l.trim().to_string()
}

// ---- raw TCP -------------------------------------------------------------------------------

fn raw_parent(pings: usize, volume: usize) -> Figures {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let (mut child, _out) = spawn_child(&[
        "raw".into(),
        l.local_addr().unwrap().to_string(),
        pings.to_string(),
        volume.to_string(),
    ]);
    let (mut s, _) = l.accept().unwrap();
    s.set_nodelay(true).unwrap();
    let mut b8 = [0u8; 8];
    for _ in 0..100 {
        s.write_all(&b8).unwrap();
        s.read_exact(&mut b8).unwrap();
    }
    let mut each = Vec::with_capacity(pings);
    let t0 = Instant::now();
    for i in 0..pings {
        let t = Instant::now();
        b8[..].copy_from_slice(&(i as u64).to_le_bytes());
        s.write_all(&b8).unwrap();
        s.read_exact(&mut b8).unwrap();
        each.push(t.elapsed());
    }
    let rtt_us = t0.elapsed().as_secs_f64() * 1e6 / pings as f64;
    let (p50_us, p99_us) = percentiles(&mut each);
    let buf = vec![7u8; SIZES[SIZES.len() - 1]];
    let mut gbps = Vec::new();
    let mut ack = [0u8; 1];
    for &size in &SIZES {
        let reps = reps_for(size, volume);
        // Warm-up.
        s.write_all(&buf[..size]).unwrap();
        s.read_exact(&mut ack).unwrap();
        let t0 = Instant::now();
        for _ in 0..reps {
            s.write_all(&buf[..size]).unwrap();
            s.read_exact(&mut ack).unwrap();
        }
        gbps.push((size * reps) as f64 / t0.elapsed().as_secs_f64() / 1e9);
    }
    drop(s);
    child.wait().unwrap();
    Figures {
        rtt_us,
        p50_us,
        p99_us,
        gbps,
    }
}

fn percentiles(v: &mut [Duration]) -> (f64, f64) {
    v.sort();
    let at = |q: f64| v[((v.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6;
    (at(0.5), at(0.99))
}

fn raw_child(addr: &str, pings: usize, volume: usize) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    let mut b8 = [0u8; 8];
    for _ in 0..100 + pings {
        s.read_exact(&mut b8).unwrap();
        s.write_all(&b8).unwrap();
    }
    let mut buf = vec![0u8; SIZES[SIZES.len() - 1]];
    for &size in &SIZES {
        for _ in 0..1 + reps_for(size, volume) {
            s.read_exact(&mut buf[..size]).unwrap();
            s.write_all(&[1]).unwrap();
        }
    }
}

// ---- our transport -------------------------------------------------------------------------

fn transport_parent(backend: &str, pings: usize, volume: usize) -> Figures {
    let rt = random_u64();
    let secret = Secret::random();
    let pool_bytes = 2 * SIZES[SIZES.len() - 1] + 16 * MIB;
    let p0 = Pool::create(&SegmentName::new(rt, 0, SegmentKind::Pool, 1), pool_bytes).unwrap();
    let p1 = Pool::create(&SegmentName::new(rt, 1, SegmentKind::Pool, 1), pool_bytes).unwrap();
    let t = dragon_transport::open(backend, Config::new(NodeId(0), secret.clone(), p0.clone()))
        .unwrap();
    let (mut child, mut out) = spawn_child(&[
        backend.into(),
        "1".into(),
        secret.to_hex(),
        p1.name().os_name(),
    ]);
    let addr = line(&mut out);
    t.connect(
        &[PeerAddr {
            node: NodeId(1),
            addr,
        }],
        Duration::from_secs(10),
    )
    .unwrap();
    let peer = NodeId(1);
    let ping = |t: &dyn Transport, i: u64| {
        t.send(peer, &i.to_le_bytes(), T).unwrap();
        match t.recv(T).unwrap() {
            Event::Message { data, .. } => assert_eq!(data, i.to_le_bytes()),
            e => panic!("{e:?}"),
        }
    };
    for i in 0..100 {
        ping(&*t, i);
    }
    let mut each = Vec::with_capacity(pings);
    let t0 = Instant::now();
    for i in 0..pings as u64 {
        let t1 = Instant::now();
        ping(&*t, i);
        each.push(t1.elapsed());
    }
    let rtt_us = t0.elapsed().as_secs_f64() * 1e6 / pings as f64;
    let (p50_us, p99_us) = percentiles(&mut each);
    let mut src = p0.alloc(SIZES[SIZES.len() - 1]).unwrap();
    src.as_mut_slice().fill(7);
    let dst = p1.alloc(SIZES[SIZES.len() - 1]).unwrap();
    let mut gbps = Vec::new();
    for &size in &SIZES {
        let reps = reps_for(size, volume);
        t.put_block(peer, &src, size, dst.block_ref(), 0)
            .unwrap()
            .wait(T)
            .unwrap();
        let t0 = Instant::now();
        for _ in 0..reps {
            t.put_block(peer, &src, size, dst.block_ref(), 0)
                .unwrap()
                .wait(T)
                .unwrap();
        }
        gbps.push((size * reps) as f64 / t0.elapsed().as_secs_f64() / 1e9);
    }
    t.close();
    drop(child.stdin.take());
    child.wait().unwrap();
    Figures {
        rtt_us,
        p50_us,
        p99_us,
        gbps,
    }
}

fn transport_child(a: &[String]) {
    let pool = Pool::open(&SegmentName::parse(&a[3]).unwrap()).unwrap();
    let secret = Secret::from_hex(&a[2]).unwrap();
    let node = NodeId(a[1].parse().unwrap());
    let t = dragon_transport::open(&a[0], Config::new(node, secret, pool)).unwrap();
    println!("{}", t.address());
    std::io::stdout().flush().unwrap();
    // Echo messages, swallow block events, end when the parent goes away.
    loop {
        match t.recv(T) {
            Ok(Event::Message { peer, data }) => {
                if t.send(peer, &data, T).is_err() {
                    break;
                }
            }
            Ok(Event::BlockFilled { .. }) => {}
            Ok(Event::PeerLost { .. }) | Err(_) => break,
        }
    }
}

fn child(a: &[String]) {
    match a.first().map(String::as_str) {
        Some("raw") => raw_child(&a[1], a[2].parse().unwrap(), a[3].parse().unwrap()),
        Some(_) => transport_child(a),
        None => std::process::exit(2),
    }
}
