//! Thin, checked wrappers over the Linux calls the rest of the crate needs: POSIX shared
//! memory objects, `mmap`, futexes, process identity and liveness, random ids.
//!
//! Everything `unsafe` about the OS lives here or in the layout modules that cast mapped
//! memory; callers above see safe functions.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Once;
use std::time::Duration;

pub use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::mman::{shm_open, shm_unlink};
use nix::sys::stat::Mode;

/// Directory where Linux exposes POSIX shared-memory objects.
pub const SHM_DIR: &str = "/dev/shm";

/// Creates a new shared-memory object of `size` bytes, mode 0600, failing if it exists.
pub fn shm_create(name: &str, size: u64) -> Result<File, Errno> {
    let fd = shm_open(
        name,
        OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_RDWR | OFlag::O_CLOEXEC,
        Mode::S_IRUSR | Mode::S_IWUSR,
    )?;
    let file = File::from(fd);
    if let Err(e) = nix::unistd::ftruncate(file.as_fd(), size as libc::off_t) {
        let _ = shm_unlink(name);
        return Err(e);
    }
    Ok(file)
}

/// Opens an existing shared-memory object, read-write or read-only.
pub fn shm_open_existing(name: &str, writable: bool) -> Result<File, Errno> {
    let flags = if writable {
        OFlag::O_RDWR
    } else {
        OFlag::O_RDONLY
    };
    let fd: OwnedFd = shm_open(name, flags | OFlag::O_CLOEXEC, Mode::empty())?;
    Ok(File::from(fd))
}

/// Removes a shared-memory object's name; mappings stay valid until unmapped.
pub fn shm_remove(name: &str) -> Result<(), Errno> {
    shm_unlink(name)
}

/// Result of a futex wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FutexWait {
    /// Woken by a `wake` (or spuriously): re-check the condition.
    Woken,
    /// The word did not hold the expected value when the kernel looked.
    Changed,
    /// The timeout elapsed.
    TimedOut,
    /// A signal arrived; the caller decides whether to retry.
    Interrupted,
}

/// Sleeps while `word == expected`, for at most `timeout`. Shared (not private) futex, so it
/// works across processes mapping the same page.
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) -> FutexWait {
    // SAFETY: `word` is a live, aligned 4-byte atomic for the duration of the call.
    unsafe { futex_wait_at(word.as_ptr(), expected, timeout) }
}

/// [`futex_wait`] on a raw 4-byte word, e.g. one half of a 64-bit atomic that Rust code only
/// ever accesses as a whole (the kernel reads the 4 bytes atomically; Rust never makes a
/// 32-bit atomic of them).
///
/// # Safety
/// `word` must be 4-aligned and point to memory that stays mapped during the call.
pub unsafe fn futex_wait_at(word: *mut u32, expected: u32, timeout: Option<Duration>) -> FutexWait {
    let ts = timeout.map(|d| libc::timespec {
        tv_sec: d.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: d.subsec_nanos() as libc::c_long,
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: the caller guarantees `word` is aligned and mapped for the call; the kernel
    // only reads it. `ts_ptr` is null or points to a timespec living on this frame.
    let r = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word,
            libc::FUTEX_WAIT,
            expected,
            ts_ptr,
            std::ptr::null::<u32>(),
            0u32,
        )
    };
    if r == 0 {
        return FutexWait::Woken;
    }
    match Errno::last() {
        Errno::EAGAIN => FutexWait::Changed,
        Errno::ETIMEDOUT => FutexWait::TimedOut,
        Errno::EINTR => FutexWait::Interrupted,
        _ => FutexWait::Woken,
    }
}

/// Wakes up to `n` waiters sleeping on `word`; returns how many were woken.
pub fn futex_wake(word: &AtomicU32, n: u32) -> u32 {
    // SAFETY: `word` is a live, aligned 4-byte atomic for the duration of the call.
    unsafe { futex_wake_at(word.as_ptr(), n) }
}

/// [`futex_wake`] on a raw 4-byte word (see [`futex_wait_at`]).
///
/// # Safety
/// `word` must be 4-aligned and point to memory that stays mapped during the call.
pub unsafe fn futex_wake_at(word: *mut u32, n: u32) -> u32 {
    let n = n.min(i32::MAX as u32) as i32;
    // SAFETY: the caller guarantees `word` is aligned and mapped; FUTEX_WAKE only uses the
    // address as a key and dereferences no other argument.
    let r = unsafe { libc::syscall(libc::SYS_futex, word, libc::FUTEX_WAKE, n) };
    if r < 0 {
        0
    } else {
        r as u32
    }
}

/// A process identity that survives pid reuse: the pid plus its start time (clock ticks since
/// boot, field 22 of `/proc/<pid>/stat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProcessId {
    /// OS process id.
    pub pid: u32,
    /// Start time in clock ticks since boot.
    pub start: u64,
}

/// What `/proc` says about a pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// Running (or sleeping, stopped...), with this start time.
    Alive(u64),
    /// No such process, or a zombie / dead task.
    Dead,
    /// `/proc` could not say (out of descriptors, `hidepid`, another pid namespace, an
    /// unreadable entry): callers must treat the process as possibly alive (never take over
    /// what it holds) and wait or fail clearly.
    Unknown,
}

/// Reads the state and start time of `pid` from `/proc/<pid>/stat`. Only "no such
/// process" is [`Liveness::Dead`]; any other failure is [`Liveness::Unknown`].
pub fn liveness(pid: u32) -> Liveness {
    if pid == 0 {
        return Liveness::Dead;
    }
    let mut buf = [0u8; 1024];
    let n = match File::open(format!("/proc/{pid}/stat")).and_then(|mut f| f.read(&mut buf)) {
        Ok(n) => n,
        Err(e) => return liveness_of_error(&e),
    };
    parse_stat(&buf[..n]).unwrap_or(Liveness::Unknown)
}

/// What an error opening or reading `/proc/<pid>/stat` says about the process: gone for
/// ENOENT/ESRCH (the entry vanished), unknown for anything else.
fn liveness_of_error(e: &std::io::Error) -> Liveness {
    match e.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ESRCH) => Liveness::Dead,
        _ => Liveness::Unknown,
    }
}

fn parse_stat(stat: &[u8]) -> Option<Liveness> {
    // The command name (field 2) may hold spaces and ')' so split after the last ')'.
    let close = stat.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(&stat[close + 1..]).ok()?;
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?; // field 3
    if state == "Z" || state == "X" || state == "x" {
        return Some(Liveness::Dead);
    }
    // field 22 is the 19th after field 3.
    let start = fields.nth(18)?.parse().ok()?;
    Some(Liveness::Alive(start))
}

static SELF_ID: AtomicU64 = AtomicU64::new(0); // pid << 32 | low 32 bits of start
static SELF_START: AtomicU64 = AtomicU64::new(0);
static ATFORK: Once = Once::new();

extern "C" fn reset_self_id_in_child() {
    SELF_ID.store(0, Ordering::Relaxed);
    SELF_START.store(0, Ordering::Relaxed);
}

impl ProcessId {
    /// This process's identity, cached (and reset in a forked child).
    pub fn current() -> ProcessId {
        let packed = SELF_ID.load(Ordering::Relaxed);
        if packed != 0 {
            return ProcessId {
                pid: (packed >> 32) as u32,
                start: SELF_START.load(Ordering::Relaxed),
            };
        }
        ATFORK.call_once(|| {
            // SAFETY: registering a plain extern "C" fn with no captured state; it only
            // stores to static atomics, which is async-signal-safe.
            unsafe {
                libc::pthread_atfork(None, None, Some(reset_self_id_in_child));
            }
        });
        let pid = std::process::id();
        let start = match liveness(pid) {
            Liveness::Alive(s) => s,
            // /proc could not say (out of descriptors...): not cached, asked again next time.
            Liveness::Dead | Liveness::Unknown => return ProcessId { pid, start: 0 },
        };
        SELF_START.store(start, Ordering::Relaxed);
        SELF_ID.store(
            (u64::from(pid) << 32) | (start & 0xffff_ffff),
            Ordering::Relaxed,
        );
        ProcessId { pid, start }
    }

    /// Packs pid and the low 32 bits of the start time into one word (for shm fields).
    pub fn packed(self) -> u64 {
        (u64::from(self.pid) << 32) | (self.start & 0xffff_ffff)
    }

    /// Inverse of [`ProcessId::packed`] (start time truncated to 32 bits).
    pub fn from_packed(v: u64) -> ProcessId {
        ProcessId {
            pid: (v >> 32) as u32,
            start: v & 0xffff_ffff,
        }
    }

    /// True while the process exists, is not a zombie, and has the same start time (low 32
    /// bits compared, as stored in shm); also true when `/proc` cannot tell
    /// ([`Liveness::Unknown`]), so nothing a live process holds is ever taken over.
    pub fn is_alive(self) -> bool {
        match liveness(self.pid) {
            Liveness::Alive(s) => (s & 0xffff_ffff) == (self.start & 0xffff_ffff),
            Liveness::Dead => false,
            Liveness::Unknown => true, // never judged dead on a guess
        }
    }
}

/// 64 random bits from the kernel (runtime ids, test prefixes, secrets).
pub fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: `b` is a valid writable buffer of the given length.
    let r = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if r != 8 {
        // Fall back to time and pid mixing; never zero.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        return t ^ (u64::from(std::process::id()) << 40) | 1;
    }
    u64::from_ne_bytes(b)
}

/// Number of CPUs this process may run on.
pub fn usable_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// CPUs online on this machine, whatever this process's affinity (a peer pinned elsewhere
/// can make progress while we spin).
pub fn online_cpus() -> usize {
    std::fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .and_then(|s| parse_cpu_list(s.trim()))
        .unwrap_or_else(usable_cpus)
}

fn parse_cpu_list(s: &str) -> Option<usize> {
    let mut n = 0;
    for part in s.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                n += b
                    .parse::<usize>()
                    .ok()?
                    .checked_sub(a.parse::<usize>().ok()?)?
                    + 1
            }
            None => {
                part.parse::<usize>().ok()?;
                n += 1;
            }
        }
    }
    Some(n)
}

/// Pins the calling process (all future threads) to one CPU.
pub fn pin_to_cpu(cpu: usize) -> Result<(), Errno> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
}

/// How long a thread's answer of [`pinned_to_one_cpu`] is reused (a system call per wait
/// costs a one-CPU round trip ~5%; an affinity change is seen this much later).
const PINNED_RECHECK: Duration = Duration::from_millis(50);

thread_local! {
    static PINNED: std::cell::Cell<Option<(std::time::Instant, bool)>> =
        const { std::cell::Cell::new(None) };
}

/// Whether this thread may run on one CPU only. A waiter that is should yield that CPU
/// between looks rather than spin: the peer it waits for may be queued behind it there.
pub fn pinned_to_one_cpu() -> bool {
    let now = std::time::Instant::now();
    if let Some((at, pinned)) = PINNED.get() {
        if now.duration_since(at) < PINNED_RECHECK {
            return pinned;
        }
    }
    // SAFETY: `set` is a plain bitmask the kernel fills; its size is passed.
    let pinned = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0
            && libc::CPU_COUNT(&set) <= 1
    };
    PINNED.set(Some((now, pinned)));
    pinned
}

/// The pause of a waiting loop that may share its CPU with the thread it waits for. When
/// the waiter is pinned to one CPU ([`pinned_to_one_cpu`]) it yields that CPU; a yield that
/// comes straight back says nothing else wanted the CPU (the peer runs elsewhere), and the
/// next `stretch` pauses then spin, for a quick look-again, before the next yield.
#[derive(Debug)]
pub struct Pause {
    yield_cpu: bool,
    stretch: u32,
    left: u32,
    others_ran: bool,
}

/// A yield shorter than this did not run another thread worth waiting for. An idle yield
/// takes ~1 µs on this VM (over 2 µs once in a thousand); a peer's turn in between (two
/// switches and its work) takes longer. 2 µs here made waits on different CPUs count
/// stray wake-ups of other threads as a shared CPU (their round trip 3.8 -> 4.9 µs).
const QUICK_YIELD: Duration = Duration::from_micros(5);

impl Pause {
    /// A pause for one wait; `stretch`: spins between yields once a yield came back at once.
    pub fn new(stretch: u32) -> Pause {
        Pause {
            // Loom's models need every pause to be loom's own yield (`spin_hint`).
            yield_cpu: !cfg!(loom) && pinned_to_one_cpu(),
            stretch,
            left: 0,
            others_ran: false,
        }
    }

    /// Whether a yield of this wait ran another thread (a peer sharing the CPU, likely).
    pub fn others_ran(&self) -> bool {
        self.others_ran
    }

    /// Whether this wait yields its CPU between looks.
    pub fn yields(&self) -> bool {
        self.yield_cpu
    }

    /// One pause.
    pub fn pause(&mut self) {
        if !self.yield_cpu {
            crate::primitive::spin_hint();
        } else if self.left > 0 {
            self.left -= 1;
            crate::primitive::spin_hint();
        } else {
            let t = std::time::Instant::now();
            std::thread::yield_now();
            if t.elapsed() < QUICK_YIELD {
                self.left = self.stretch;
            } else {
                self.others_ran = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse() {
        assert_eq!(parse_cpu_list("0"), Some(1));
        assert_eq!(parse_cpu_list("0-3"), Some(4));
        assert_eq!(parse_cpu_list("0-1,4,6-7"), Some(5));
        assert_eq!(parse_cpu_list("x"), None);
        assert!(online_cpus() >= 1);
    }

    #[test]
    fn parses_stat_with_parens_in_name() {
        let line = b"123 (a) b) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 4242 19 20";
        assert_eq!(parse_stat(line), Some(Liveness::Alive(4242)));
        let z = b"123 (x) Z 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 4242 19 20";
        assert_eq!(parse_stat(z), Some(Liveness::Dead));
    }

    #[test]
    fn only_no_such_process_is_dead() {
        use std::io::Error;
        for (errno, want) in [
            (libc::ENOENT, Liveness::Dead),
            (libc::ESRCH, Liveness::Dead),
            (libc::EMFILE, Liveness::Unknown),
            (libc::EACCES, Liveness::Unknown),
            (libc::ENFILE, Liveness::Unknown),
        ] {
            assert_eq!(
                liveness_of_error(&Error::from_raw_os_error(errno)),
                want,
                "{errno}"
            );
        }
    }

    #[test]
    fn a_process_out_of_descriptors_does_not_see_a_live_one_as_dead() {
        // A child that has used up its descriptors cannot open /proc/<parent>/stat: before,
        // that read as "dead", so it could take over a live holder's robust lock.
        let parent = std::process::id();
        // SAFETY: the child only calls async-signal-safe-enough libc functions and `_exit`s.
        match unsafe { libc::fork() } {
            0 => {
                let mut lim = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                // SAFETY: `lim` is a valid rlimit to fill, then to set: only the soft limit
                // drops (to 0), the hard limit stays what it was.
                unsafe {
                    libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
                    lim.rlim_cur = 0;
                    libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
                }
                let code = match liveness(parent) {
                    Liveness::Unknown => 0,
                    Liveness::Dead => 2,
                    Liveness::Alive(_) => 3,
                };
                let alive = ProcessId {
                    pid: parent,
                    start: 1,
                }
                .is_alive();
                // SAFETY: ends the forked child without running the parent's destructors.
                unsafe { libc::_exit(if code == 0 && !alive { 4 } else { code }) }
            }
            child => {
                assert!(child > 0);
                let mut status = 0;
                // SAFETY: waits for our own child; `status` is a valid out pointer.
                unsafe { libc::waitpid(child, &mut status, 0) };
                assert!(
                    libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                    "{status}"
                );
            }
        }
    }

    #[test]
    fn self_is_alive_and_bogus_is_dead() {
        let me = ProcessId::current();
        assert!(me.is_alive());
        assert!(me.start > 0);
        assert!(!ProcessId {
            pid: me.pid,
            start: me.start + 1
        }
        .is_alive());
        assert!(!ProcessId { pid: 0, start: 0 }.is_alive());
        assert_eq!(ProcessId::from_packed(me.packed()).pid, me.pid);
    }

    #[test]
    fn futex_wait_times_out_and_sees_changes() {
        let w = AtomicU32::new(5);
        assert_eq!(
            futex_wait(&w, 6, Some(Duration::from_millis(1))),
            FutexWait::Changed
        );
        assert_eq!(
            futex_wait(&w, 5, Some(Duration::from_millis(1))),
            FutexWait::TimedOut
        );
        assert_eq!(futex_wake(&w, 1), 0);
    }
    #[test]
    fn a_thread_pinned_to_one_cpu_yields_between_looks() {
        use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
        use nix::unistd::Pid;
        std::thread::spawn(|| {
            let all = sched_getaffinity(Pid::from_raw(0)).unwrap();
            let n = (0..CpuSet::count())
                .filter(|&i| all.is_set(i).unwrap_or(false))
                .count();
            assert_eq!(Pause::new(4).yields(), n == 1);
            let first = (0..CpuSet::count())
                .find(|&i| all.is_set(i).unwrap_or(false))
                .unwrap();
            let mut one = CpuSet::new();
            one.set(first).unwrap();
            sched_setaffinity(Pid::from_raw(0), &one).unwrap();
            // A new thread (no cached answer yet) inherits the one-CPU mask.
            std::thread::spawn(|| {
                let mut p = Pause::new(4);
                assert!(p.yields());
                for _ in 0..10 {
                    p.pause(); // yields, or spins its stretch after a quick yield; returns
                }
            })
            .join()
            .unwrap();
        })
        .join()
        .unwrap();
    }
}
