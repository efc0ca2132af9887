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
