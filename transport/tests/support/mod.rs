//! What the transport's integration tests share: a `transport-peer` driver process.

// Each test crate uses its own subset.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use dragon_shm::heap::Pool;
use dragon_transport::Secret;

/// A transport endpoint in a child process (`transport-peer`, line protocol on its stdin and
/// stdout); killed on drop.
pub struct ChildPeer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    /// The address the child listens on (its first line).
    pub addr: String,
}

/// The arguments of `transport-peer`: back end, node id, secret, pool, time-out (ms), and
/// optionally a listen address.
pub fn peer_args(
    backend: &str,
    node: u32,
    secret: &Secret,
    pool: &Pool,
    timeout_ms: u64,
    listen: Option<&str>,
) -> Vec<String> {
    let mut a = vec![
        backend.to_string(),
        node.to_string(),
        secret.to_hex(),
        pool.name().os_name(),
        timeout_ms.to_string(),
    ];
    a.extend(listen.map(str::to_string));
    a
}

impl ChildPeer {
    /// Starts `cmd` (which runs `transport-peer`) and reads its address line.
    pub fn spawn(mut cmd: Command, what: &str) -> Self {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut l = String::new();
        stdout.read_line(&mut l).unwrap();
        let addr = l
            .trim()
            .strip_prefix("addr ")
            .unwrap_or_else(|| panic!("{what}: no address line: {l:?}"))
            .to_string();
        ChildPeer {
            child,
            stdin,
            stdout,
            addr,
        }
    }

    /// Sends one command line.
    pub fn cmd(&mut self, c: &str) {
        writeln!(self.stdin, "{c}").unwrap();
        self.stdin.flush().unwrap();
    }

    /// The next reply line, trimmed.
    pub fn line(&mut self) -> String {
        let mut l = String::new();
        self.stdout.read_line(&mut l).unwrap();
        l.trim().to_string()
    }

    /// `cmd`, then its reply.
    pub fn ask(&mut self, c: &str) -> String {
        self.cmd(c);
        self.line()
    }

    /// The child's pid.
    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.id() as i32)
    }

    /// Sends `sig` to the child.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(self.pid(), sig).unwrap();
    }

    /// Stops the child (SIGSTOP) at a moment when every thread of it is blocked in a system
    /// call, never while one runs user code: there libfabric's shm provider may hold the
    /// spinlock of its shared-memory region, and every sender to the child would spin on it
    /// for as long as the child stays stopped (the provider has no way out of that; see the
    /// transport README). Returns once the child is stopped.
    pub fn freeze(&self) {
        use nix::sys::signal::Signal;
        use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
        for _ in 0..10_000 {
            self.signal(Signal::SIGSTOP);
            let st = waitpid(self.pid(), Some(WaitPidFlag::WUNTRACED)).unwrap();
            assert!(matches!(st, WaitStatus::Stopped(..)), "{st:?}");
            if self.all_threads_in_syscalls() {
                return;
            }
            self.signal(Signal::SIGCONT);
            std::thread::yield_now();
        }
        panic!("transport-peer never stopped with all its threads in system calls");
    }

    /// Whether every thread of the (stopped) child is inside a system call: its
    /// `/proc/PID/task/TID/syscall` starts with a syscall number, not `-1` (user code) or
    /// `running`.
    fn all_threads_in_syscalls(&self) -> bool {
        let dir = format!("/proc/{}/task", self.pid());
        std::fs::read_dir(&dir).unwrap().all(|t| {
            let f = t.unwrap().path().join("syscall");
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            let first = text.split_whitespace().next().unwrap_or("");
            first.parse::<i64>().is_ok_and(|n| n >= 0)
        })
    }

    /// Waits for the child to end (after a signal that ends it).
    pub fn wait(&mut self) {
        let _ = self.child.wait();
    }

    /// Kills the child and waits for its end.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        self.wait();
    }
}

impl Drop for ChildPeer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // libfabric's shm provider names its region files "PID:..." in /dev/shm and a killed
        // process cannot remove them: do it for the child.
        let prefix = format!("{}:", self.child.id());
        if let Ok(d) = std::fs::read_dir("/dev/shm") {
            for e in d.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}
