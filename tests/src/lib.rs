//! Shared helpers for the multi-process tests: spawning the `shm-worker` binary, waiting
//! for its "ready" line, killing it, and checking that nothing is left behind.

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};

/// A worker process started from the `shm-worker` binary.
#[derive(Debug)]
pub struct Worker {
    /// The child process.
    pub child: Child,
    out: BufReader<ChildStdout>,
}

impl Worker {
    /// Starts `shm-worker ROLE ARGS...` with stdout piped.
    pub fn spawn(bin: &str, role: &str, args: &[String]) -> Worker {
        let mut child = Command::new(bin)
            .arg(role)
            .args(args)
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn shm-worker");
        let out = BufReader::new(child.stdout.take().expect("piped stdout"));
        Worker { child, out }
    }

    /// Reads the next line the worker prints (blocks until it does or exits).
    pub fn line(&mut self) -> String {
        let mut s = String::new();
        self.out.read_line(&mut s).expect("read worker stdout");
        s.trim_end().to_string()
    }

    /// Waits for the worker's `ready` line.
    pub fn wait_ready(&mut self) {
        let l = self.line();
        assert_eq!(l, "ready", "worker did not report ready");
    }

    /// SIGKILLs the worker and reaps it.
    pub fn kill(mut self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("kill worker");
        self.child.wait().expect("reap worker");
    }

    /// Waits for a normal exit and returns everything else the worker printed.
    pub fn finish(mut self) -> (i32, Vec<String>) {
        let mut lines = Vec::new();
        loop {
            let l = self.line();
            if l.is_empty() {
                break;
            }
            lines.push(l);
        }
        let st = self.child.wait().expect("reap worker");
        (st.code().unwrap_or(-1), lines)
    }
}

/// A small xorshift generator, so tests are reproducible from a printed seed.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    /// Next pseudo-random number.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// A hash of one message's identity; consumers add them up per producer so a test can
/// detect loss and duplication from sums alone.
pub fn message_hash(producer: u32, seq: u64) -> u64 {
    let mut r = Rng((u64::from(producer) << 40) ^ seq ^ 0x9E37_79B9_7F4A_7C15);
    r.next_u64();
    r.next_u64()
}

/// The count a test reads from the environment variable `var` (`make stress` raises them),
/// or `default`.
pub fn env_count(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Writes message `seq` of `producer` into `buf`: 4 bytes producer, 8 bytes seq, then a
/// payload derived from both. One message in 16 is large (1 to 64 KiB, sent as a pool
/// block), the others fit a 64-byte slot.
pub fn message(producer: u32, seq: u64, buf: &mut Vec<u8>) {
    let h = message_hash(producer, seq);
    let len = if h.is_multiple_of(16) {
        1024 + (h >> 8) % (63 * 1024)
    } else {
        12 + (h >> 8) % 52
    };
    buf.clear();
    buf.extend_from_slice(&producer.to_le_bytes());
    buf.extend_from_slice(&seq.to_le_bytes());
    let mut r = Rng(h | 1);
    while buf.len() < len as usize {
        buf.extend_from_slice(&r.next_u64().to_le_bytes());
    }
    buf.truncate(len as usize);
}

/// CPU time (user + system) a process used so far, from `/proc/<pid>/stat`.
pub fn cpu_time(pid: u32) -> std::time::Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    // Fields after the parenthesized command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as u64;
    std::time::Duration::from_millis(ticks * 1000 / hz.max(1))
}

/// Names a channel for a worker's command line: a `chan` segment name, or
/// `POOL@offset,len,gen,segment` for a channel in a pool block.
pub fn channel_spec(ch: &dragon_shm::channel::Channel, pool: &dragon_shm::heap::Pool) -> String {
    match (ch.name(), ch.block_ref()) {
        (Some(n), _) => n.to_string(),
        (None, Some(r)) => format!(
            "{}@{},{},{},{}",
            pool.name(),
            r.offset,
            r.len,
            r.gen,
            r.segment
        ),
        (None, None) => unreachable!("a channel lives in a segment or a block"),
    }
}

/// Opens the channel a [`channel_spec`] names (attaching through the pool for block ones).
pub fn open_channel(spec: &str) -> Result<dragon_shm::channel::Channel, String> {
    use dragon_shm::channel::Channel;
    use dragon_shm::heap::{BlockRef, Pool};
    match spec.split_once('@') {
        None => {
            let name = spec.parse().map_err(|e| format!("{spec}: {e}"))?;
            Channel::open(&name, None).map_err(|e| format!("{spec}: {e}"))
        }
        Some((pool, r)) => {
            let pool = Pool::open(&pool.parse().map_err(|e| format!("{pool}: {e}"))?)
                .map_err(|e| format!("{pool}: {e}"))?;
            let f: Vec<u64> = r
                .split(',')
                .map(|x| x.parse().unwrap_or(u64::MAX))
                .collect();
            if f.len() != 4 {
                return Err(format!("bad block channel spec {spec}"));
            }
            let r = BlockRef {
                segment: f[3],
                offset: f[0],
                len: f[1],
                gen: f[2] as u32,
                _pad: 0,
            };
            // SAFETY: the handle goes straight into a Channel, which never lends its block mutably.
            let b = unsafe { pool.block(r) }.map_err(|e| format!("{spec}: {e}"))?;
            Channel::attach(b).map_err(|e| format!("{spec}: {e}"))
        }
    }
}

/// A block handle as `segment:offset:len:gen` (what the workers take on their command line).
pub fn fmt_block_ref(r: dragon_shm::heap::BlockRef) -> String {
    format!("{}:{}:{}:{}", r.segment, r.offset, r.len, r.gen)
}

/// Parses a [`fmt_block_ref`] string.
pub fn parse_block_ref(s: &str) -> Result<dragon_shm::heap::BlockRef, String> {
    let f: Vec<u64> = s.split(':').filter_map(|x| x.parse().ok()).collect();
    if f.len() != 4 {
        return Err(format!("bad block ref {s:?} (want segment:offset:len:gen)"));
    }
    let gen = u32::try_from(f[3]).map_err(|_| "bad block ref gen".to_string())?;
    Ok(dragon_shm::heap::BlockRef {
        segment: f[0],
        offset: f[1],
        len: f[2],
        gen,
        _pad: 0,
    })
}

/// The key `n` of fault worker `id` in the shared index.
pub fn fault_key(id: u32, n: u32) -> Vec<u8> {
    format!("w{id}/k{n}").into_bytes()
}

/// Writes version `ver` of the value of key `n` of fault worker `id` into `buf`: 24 bytes
/// naming (id, n, ver), then bytes derived from them, so any value read back can be checked
/// on its own. One value in 16 is large (16 to 48 KiB).
pub fn fault_value(id: u32, n: u32, ver: u64, buf: &mut Vec<u8>) {
    let h = message_hash(id ^ (n << 20), ver);
    let len = if h.is_multiple_of(16) {
        16384 + (h >> 8) % 32768
    } else {
        24 + (h >> 8) % 1000
    };
    buf.clear();
    buf.extend_from_slice(&u64::from(id).to_le_bytes());
    buf.extend_from_slice(&u64::from(n).to_le_bytes());
    buf.extend_from_slice(&ver.to_le_bytes());
    let mut r = Rng(h | 1);
    while buf.len() < len as usize {
        buf.extend_from_slice(&r.next_u64().to_le_bytes());
    }
    buf.truncate(len as usize);
}

/// Checks a value read back against [`fault_value`]: `Some((id, n, ver))` when it is one.
pub fn check_fault_value(b: &[u8]) -> Option<(u32, u32, u64)> {
    if b.len() < 24 {
        return None;
    }
    let w = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap());
    let (id, n, ver) = (u32::try_from(w(0)).ok()?, u32::try_from(w(1)).ok()?, w(2));
    let mut want = Vec::new();
    fault_value(id, n, ver, &mut want);
    (want == b).then_some((id, n, ver))
}
