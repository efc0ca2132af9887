//! A small fuzzing harness that runs on stable Rust inside `cargo test`.
//!
//! Every target starts from real encodings (a corpus built by the target from the encoders)
//! and mutates them with a seeded PRNG: bit flips, "interesting" integers written over
//! 1/2/4/8-byte fields (0, 1, -1, powers of two, lengths), inserted, deleted, duplicated and
//! truncated ranges, and splices of two corpus entries. Pure random bytes rarely get past a
//! magic number; mutated valid encodings reach the checks behind it.
//!
//! Runs are deterministic: the seed is fixed (`DRAGON_FUZZ_SEED` overrides it) and the
//! iteration count is the target's default (CI) or `DRAGON_FUZZ_ITERS`; `DRAGON_FUZZ_SECS`
//! keeps each target going for that many seconds at least (`make stress`). Each run prints
//! its name, iterations, seed and time. A panic prints the input that caused it (hex) before
//! it propagates, and a watchdog aborts the process with the input when one iteration takes
//! longer than [`HANG_LIMIT`]: both become named regression tests.

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One iteration taking longer than this is a hang: the watchdog aborts the process.
pub const HANG_LIMIT: Duration = Duration::from_secs(20);

/// The default seed (a run is reproducible from its seed and iteration count).
pub const DEFAULT_SEED: u64 = 0x0d12_a90e_f022_2026;

/// A splitmix64 generator.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.u64() % n as u64) as usize
        }
    }

    /// True with probability 1/`n`.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    /// `n` random bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.u64() as u8).collect()
    }

    /// One of `xs` (which must not be empty).
    pub fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }

    /// An integer that often sits on a boundary: small, a power of two (+-1), an extreme.
    pub fn interesting(&mut self) -> u64 {
        match self.below(6) {
            0 => self.below(17) as u64,
            1 => 1u64 << self.below(64),
            2 => (1u64 << self.below(64)).wrapping_sub(1),
            3 => u64::MAX - self.below(4) as u64,
            4 => (1u64 << self.below(64)).wrapping_add(1),
            _ => self.u64(),
        }
    }
}

/// A mutation of `input`: one to four edits; `corpus` supplies splices.
pub fn mutate(rng: &mut Rng, input: &[u8], corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut b = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = b.len();
        match rng.below(10) {
            0 | 1 if len > 0 => {
                let i = rng.below(len);
                b[i] ^= 1 << rng.below(8);
            }
            2 if len > 0 => {
                let i = rng.below(len);
                b[i] = *rng.pick(&[0u8, 1, 0x7f, 0x80, 0xfe, 0xff]);
            }
            3 | 4 if len > 0 => {
                // An interesting integer over a 1/2/4/8-byte field, little-endian (both
                // the fixed headers and bincode's varints are little-endian).
                let w = *rng.pick(&[1usize, 2, 4, 8]);
                let i = rng.below(len);
                let v = rng.interesting().to_le_bytes();
                let n = w.min(len - i);
                b[i..i + n].copy_from_slice(&v[..n]);
            }
            5 => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let ins = rng.bytes(n);
                b.splice(i..i, ins);
            }
            6 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(32));
                b.drain(i..i + n);
            }
            7 if len > 0 => {
                let n = rng.below(len);
                b.truncate(n);
            }
            8 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(64));
                let chunk = b[i..i + n].to_vec();
                let at = rng.below(len + 1);
                b.splice(at..at, chunk);
            }
            _ if !corpus.is_empty() => {
                let other = rng.pick(corpus);
                let cut = rng.below(b.len() + 1);
                let from = rng.below(other.len() + 1);
                b.truncate(cut);
                b.extend_from_slice(&other[from..]);
            }
            _ => b.push(rng.u64() as u8),
        }
    }
    b
}

/// Lower-case hex of `b`.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The bytes of a hex string (regression inputs are written as hex).
pub fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex digits"))
        .collect()
}

fn env_num(key: &str) -> Option<u64> {
    let v = std::env::var(key).ok()?;
    let v = v.trim();
    match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => v.parse().ok(),
    }
}

/// The run's seed: `DRAGON_FUZZ_SEED` or [`DEFAULT_SEED`], mixed with the target's name.
pub fn seed_for(name: &str) -> u64 {
    let base = env_num("DRAGON_FUZZ_SEED").unwrap_or(DEFAULT_SEED);
    name.bytes().fold(base, |h, c| {
        (h ^ u64::from(c)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// How many iterations and how long a run goes.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// At least this many iterations.
    pub iters: u64,
    /// And at least this long (zero in CI).
    pub secs: u64,
}

impl Budget {
    /// `default_iters` (CI) unless `DRAGON_FUZZ_ITERS` / `DRAGON_FUZZ_SECS` say otherwise.
    pub fn from_env(default_iters: u64) -> Budget {
        Budget {
            iters: env_num("DRAGON_FUZZ_ITERS").unwrap_or(default_iters),
            secs: env_num("DRAGON_FUZZ_SECS").unwrap_or(0),
        }
    }
}

/// Runs target `name`: `default_iters` iterations (see [`Budget`]), each calling `one` with
/// an input drawn from `corpus` (mutated, or now and then verbatim or pure random bytes).
/// Returns the number of iterations run.
pub fn run(
    name: &str,
    default_iters: u64,
    corpus: &[Vec<u8>],
    mut one: impl FnMut(&mut Rng, &[u8]),
) -> u64 {
    assert!(!corpus.is_empty(), "{name}: empty corpus");
    let budget = Budget::from_env(default_iters);
    let seed = seed_for(name);
    let mut rng = Rng::new(seed);
    let current: Arc<Mutex<(Instant, Vec<u8>)>> =
        Arc::new(Mutex::new((Instant::now(), Vec::new())));
    let done = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let (current, done, name) = (current.clone(), done.clone(), name.to_string());
        std::thread::spawn(move || {
            while !done.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(200));
                let c = current.lock().unwrap_or_else(|e| e.into_inner());
                if c.0.elapsed() > HANG_LIMIT && !done.load(Ordering::Acquire) {
                    eprintln!(
                        "fuzz {name}: HANG (> {HANG_LIMIT:?}) on input {}",
                        hex(&c.1)
                    );
                    std::process::abort();
                }
            }
        })
    };
    let start = Instant::now();
    let mut n = 0u64;
    while n < budget.iters || start.elapsed().as_secs() < budget.secs {
        let base = rng.pick(corpus).clone();
        let input = match rng.below(16) {
            0 => base,
            1 => {
                let len = rng.below(2 * base.len() + 8);
                rng.bytes(len)
            }
            _ => mutate(&mut rng, &base, corpus),
        };
        *current.lock().unwrap_or_else(|e| e.into_inner()) = (Instant::now(), input.clone());
        let mut case_rng = Rng::new(rng.u64());
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| one(&mut case_rng, &input))) {
            done.store(true, Ordering::Release);
            eprintln!(
                "fuzz {name}: PANIC at iteration {n} (seed {seed:#x}) on input {}",
                hex(&input)
            );
            resume_unwind(p);
        }
        n += 1;
    }
    let ms = start.elapsed().as_millis();
    done.store(true, Ordering::Release);
    let _ = watchdog.join();
    println!("fuzz {name}: {n} iterations, seed {seed:#x}, {ms} ms");
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_mutations() {
        let corpus = vec![b"DRAGONRS-header-bytes".to_vec(), vec![1, 2, 3]];
        let (mut a, mut b) = (Rng::new(5), Rng::new(5));
        for _ in 0..100 {
            assert_eq!(
                mutate(&mut a, &corpus[0], &corpus),
                mutate(&mut b, &corpus[0], &corpus)
            );
        }
        assert_eq!(unhex(&hex(&[0, 0xab, 0xff])), vec![0, 0xab, 0xff]);
    }

    #[test]
    fn run_counts_iterations() {
        let mut seen = 0;
        let n = run("self-test", 50, &[vec![0u8; 8]], |_, _| seen += 1);
        assert!(n >= 50);
        assert_eq!(seen, n);
    }
}
