//! Launching processes: fork, apply the launch settings in the child, exec.
//!
//! Between `fork` and `exec` the child only makes async-signal-safe system calls
//! (`setpgid`, `prctl`, `sched_setaffinity`, `chdir`, `open`, `dup2`, `execve`, `write`,
//! `_exit`): everything else (paths, argument and environment strings, the CPU set, the
//! executable's location) is prepared in the parent first. A close-on-exec pipe reports
//! why an exec failed (its errno), so a missing program is a clear error in the parent, not
//! a child that exits with 127.

use std::ffi::{CString, OsStr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sched::CpuSet;
use nix::unistd::{ForkResult, Pid};

/// What a standard stream of the child is connected to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stdio {
    /// The parent's stream.
    Inherit,
    /// `/dev/null`.
    Null,
    /// This file descriptor of the parent (duplicated onto the stream).
    Fd(RawFd),
    /// The child's stdout (for stderr only: `stderr=STDOUT`).
    Stdout,
}

/// Everything needed to start one process.
#[derive(Debug, Clone)]
pub struct SpawnSpec {
    /// Program and arguments; a program without `/` is looked up in the child's `PATH`.
    pub argv: Vec<String>,
    /// The child's whole environment as `(key, value)` pairs.
    pub env: Vec<(String, String)>,
    /// Working directory (`None`: the parent's).
    pub cwd: Option<PathBuf>,
    /// Standard input.
    pub stdin: Stdio,
    /// Standard output.
    pub stdout: Stdio,
    /// Standard error.
    pub stderr: Stdio,
    /// CPUs the child may run on (empty: inherit the parent's mask).
    pub cpus: Vec<usize>,
    /// Put the child in a new process group (so a whole tree can be signalled at once).
    pub new_process_group: bool,
    /// Deliver SIGKILL to the child when the parent thread exits.
    pub die_with_parent: bool,
    /// Descriptors of the parent that the child keeps, under the same numbers.
    pub pass_fds: Vec<RawFd>,
    /// `(parent fd, child fd)`: descriptors the child gets under another number (how the
    /// node agent hands a requester's descriptors to the process it starts).
    pub fd_map: Vec<(RawFd, RawFd)>,
}

/// Why a launch failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpawnError {
    /// The argument vector is empty or a string holds a NUL byte.
    #[error("bad argument: {0}")]
    BadArgument(String),
    /// The program was not found (in `PATH` or at the given path), or is not executable.
    #[error("no such executable: {0}")]
    NotFound(String),
    /// The working directory does not exist or is not accessible.
    #[error("bad working directory: {0}")]
    BadCwd(String),
    /// A CPU number is beyond what the kernel supports.
    #[error("CPU {0} cannot be named in an affinity mask")]
    BadCpu(usize),
    /// A system call failed in the parent (fork, pipe) or the child (named, with errno).
    #[error("{what}: {desc}", what = .0, desc = .1.desc())]
    Os(&'static str, Errno),
}

fn cstr(s: impl AsRef<[u8]>, what: &str) -> Result<CString, SpawnError> {
    CString::new(s.as_ref()).map_err(|_| SpawnError::BadArgument(format!("NUL byte in {what}")))
}

fn is_executable(p: &Path) -> bool {
    nix::unistd::access(p, nix::unistd::AccessFlags::X_OK).is_ok() && p.is_file()
}

/// Finds `prog` the way `execvp` would, with the child's `PATH` (relative paths with a `/`
/// are taken relative to the child's working directory).
pub fn resolve(
    prog: &str,
    path_var: Option<&str>,
    cwd: Option<&Path>,
) -> Result<PathBuf, SpawnError> {
    if prog.is_empty() {
        return Err(SpawnError::BadArgument("empty program name".into()));
    }
    if prog.contains('/') {
        let p = match cwd {
            Some(c) if !prog.starts_with('/') => c.join(prog),
            _ => PathBuf::from(prog),
        };
        return if is_executable(&p) {
            Ok(p)
        } else {
            Err(SpawnError::NotFound(prog.to_string()))
        };
    }
    let path = path_var.unwrap_or("/usr/local/bin:/usr/bin:/bin");
    for dir in path.split(':') {
        let d = if dir.is_empty() { "." } else { dir };
        let mut p = PathBuf::from(d);
        if p.is_relative() {
            if let Some(c) = cwd {
                p = c.join(p);
            }
        }
        let p = p.join(prog);
        if is_executable(&p) {
            return Ok(p);
        }
    }
    Err(SpawnError::NotFound(prog.to_string()))
}

/// Starts a process as described; returns its pid once `exec` succeeded.
pub fn spawn(spec: &SpawnSpec) -> Result<Pid, SpawnError> {
    if spec.argv.is_empty() {
        return Err(SpawnError::BadArgument("empty argument vector".into()));
    }
    // ---- everything the child needs, prepared before fork ----
    let path_var = spec
        .env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str());
    if let Some(c) = &spec.cwd {
        if !c.is_dir() {
            return Err(SpawnError::BadCwd(c.display().to_string()));
        }
    }
    let exe = resolve(&spec.argv[0], path_var, spec.cwd.as_deref())?;
    let exe_c = cstr(exe.as_os_str().as_bytes(), "program path")?;
    let argv: Vec<CString> = spec
        .argv
        .iter()
        .map(|a| cstr(a, "an argument"))
        .collect::<Result<_, _>>()?;
    let envp: Vec<CString> = spec
        .env
        .iter()
        .map(|(k, v)| {
            if k.is_empty() || k.contains('=') {
                return Err(SpawnError::BadArgument(format!(
                    "bad environment name {k:?}"
                )));
            }
            cstr(format!("{k}={v}"), "the environment")
        })
        .collect::<Result<_, _>>()?;
    let mut argv_p: Vec<*const libc::c_char> = argv.iter().map(|c| c.as_ptr()).collect();
    argv_p.push(std::ptr::null());
    let mut envp_p: Vec<*const libc::c_char> = envp.iter().map(|c| c.as_ptr()).collect();
    envp_p.push(std::ptr::null());
    let cwd_c = match &spec.cwd {
        Some(c) => Some(cstr(c.as_os_str().as_bytes(), "cwd")?),
        None => None,
    };
    let devnull = cstr(OsStr::new("/dev/null").as_bytes(), "devnull")?;
    let mut cpus = CpuSet::new();
    for &c in &spec.cpus {
        cpus.set(c).map_err(|_| SpawnError::BadCpu(c))?;
    }
    let set_cpus = !spec.cpus.is_empty();
    // fd_map moves every source above every number involved first, so that no dup2 onto a
    // target can clobber a source still to be moved.
    let fd_floor = spec
        .fd_map
        .iter()
        .flat_map(|&(a, b)| [a, b])
        .chain([2])
        .max()
        .unwrap_or(2)
        + 1;
    if spec.fd_map.iter().any(|&(a, b)| a < 0 || b < 0) {
        return Err(SpawnError::BadArgument(
            "negative descriptor in fd_map".into(),
        ));
    }
    let mut moved: Vec<(RawFd, RawFd)> = spec.fd_map.clone();
    let (rd, wr) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| SpawnError::Os("pipe2", e))?;
    let wr_fd = wr.as_raw_fd();

    // SAFETY: after fork the child runs only async-signal-safe system calls on data prepared
    // above (no allocation, no locks) and ends in execve or _exit; the parent continues
    // normally. A multithreaded parent is fine under these rules.
    match unsafe { nix::unistd::fork() }.map_err(|e| SpawnError::Os("fork", e))? {
        ForkResult::Child => {
            // SAFETY: we are the child of a fork: see `child_exec`'s contract.
            unsafe {
                child_exec(ChildPlan {
                    exe: exe_c.as_ptr(),
                    argv: argv_p.as_ptr(),
                    envp: envp_p.as_ptr(),
                    cwd: cwd_c.as_ref().map(|c| c.as_ptr()),
                    devnull: devnull.as_ptr(),
                    stdin: spec.stdin,
                    stdout: spec.stdout,
                    stderr: spec.stderr,
                    cpus: set_cpus.then_some(&cpus),
                    new_group: spec.new_process_group,
                    die_with_parent: spec.die_with_parent,
                    pass_fds: &spec.pass_fds,
                    fd_map: &mut moved,
                    fd_floor,
                    report: wr_fd,
                })
            }
        }
        ForkResult::Parent { child } => {
            drop(wr);
            let mut buf = [0u8; 8];
            let mut got = 0;
            loop {
                match nix::unistd::read(&rd, &mut buf[got..]) {
                    Ok(0) => break,
                    Ok(n) => {
                        got += n;
                        if got == buf.len() {
                            break;
                        }
                    }
                    Err(Errno::EINTR) => continue,
                    Err(e) => return Err(SpawnError::Os("read exec status", e)),
                }
            }
            if got == 0 {
                return Ok(child); // exec succeeded: the pipe closed on exec
            }
            // The child failed before exec: reap it and report why.
            let _ = nix::sys::wait::waitpid(child, None);
            let step = u32::from_ne_bytes(buf[0..4].try_into().expect("4 bytes"));
            let errno = Errno::from_raw(i32::from_ne_bytes(buf[4..8].try_into().expect("4 bytes")));
            let what = STEPS.get(step as usize).copied().unwrap_or("child setup");
            Err(match (what, errno) {
                ("execve", Errno::ENOENT) | ("execve", Errno::EACCES) => {
                    SpawnError::NotFound(spec.argv[0].clone())
                }
                ("chdir", _) => SpawnError::BadCwd(
                    spec.cwd
                        .as_ref()
                        .map(|c| c.display().to_string())
                        .unwrap_or_default(),
                ),
                _ => SpawnError::Os(what, errno),
            })
        }
    }
}

const STEPS: [&str; 7] = [
    "setpgid",
    "prctl",
    "sched_setaffinity",
    "chdir",
    "open /dev/null",
    "dup2",
    "execve",
];

struct ChildPlan<'a> {
    exe: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    cwd: Option<*const libc::c_char>,
    devnull: *const libc::c_char,
    stdin: Stdio,
    stdout: Stdio,
    stderr: Stdio,
    cpus: Option<&'a CpuSet>,
    new_group: bool,
    die_with_parent: bool,
    pass_fds: &'a [RawFd],
    fd_map: &'a mut [(RawFd, RawFd)],
    fd_floor: RawFd,
    report: RawFd,
}

/// The child side of [`spawn`]. Never returns.
///
/// # Safety
/// Must be called only in the child right after `fork`; every pointer in `plan` must point
/// to memory prepared by the parent before the fork (it stays valid in the child's copy).
unsafe fn child_exec(plan: ChildPlan<'_>) -> ! {
    // SAFETY: only async-signal-safe calls on data the parent built before fork (see the
    // contract above); every path ends in execve or _exit.
    unsafe {
        let fail = |step: u32| -> ! {
            let errno = *libc::__errno_location();
            let mut msg = [0u8; 8];
            msg[0..4].copy_from_slice(&step.to_ne_bytes());
            msg[4..8].copy_from_slice(&errno.to_ne_bytes());
            libc::write(plan.report, msg.as_ptr().cast(), 8);
            libc::_exit(127);
        };
        // Signals the parent ignores or handles must not leak into the program.
        for sig in [
            libc::SIGINT,
            libc::SIGTERM,
            libc::SIGPIPE,
            libc::SIGCHLD,
            libc::SIGQUIT,
        ] {
            libc::signal(sig, libc::SIG_DFL);
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        if plan.new_group && libc::setpgid(0, 0) != 0 {
            fail(0);
        }
        if plan.die_with_parent && libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
            fail(1);
        }
        if let Some(set) = plan.cpus {
            if libc::sched_setaffinity(
                0,
                std::mem::size_of::<CpuSet>(),
                (set as *const CpuSet).cast(),
            ) != 0
            {
                fail(2);
            }
        }
        if let Some(cwd) = plan.cwd {
            if libc::chdir(cwd) != 0 {
                fail(3);
            }
        }
        // Move fd_map sources out of the way before stdio and the final dup2s.
        for m in plan.fd_map.iter_mut() {
            let hi = libc::fcntl(m.0, libc::F_DUPFD_CLOEXEC, plan.fd_floor);
            if hi < 0 {
                fail(5);
            }
            m.0 = hi;
        }
        let mut null_fd = -1;
        for (target, how) in [(0, plan.stdin), (1, plan.stdout), (2, plan.stderr)] {
            let src = match how {
                Stdio::Inherit => continue,
                Stdio::Fd(fd) => fd,
                Stdio::Stdout => 1,
                Stdio::Null => {
                    if null_fd < 0 {
                        null_fd = libc::open(plan.devnull, libc::O_RDWR | libc::O_CLOEXEC);
                        if null_fd < 0 {
                            fail(4);
                        }
                    }
                    null_fd
                }
            };
            if src == target {
                // Same descriptor: just make sure it survives exec.
                let fl = libc::fcntl(src, libc::F_GETFD);
                libc::fcntl(src, libc::F_SETFD, fl & !libc::FD_CLOEXEC);
            } else if libc::dup2(src, target) < 0 {
                fail(5);
            }
        }
        for &(src, target) in plan.fd_map.iter() {
            if libc::dup2(src, target) < 0 {
                fail(5);
            }
        }
        for &fd in plan.pass_fds {
            let fl = libc::fcntl(fd, libc::F_GETFD);
            if fl < 0 || libc::fcntl(fd, libc::F_SETFD, fl & !libc::FD_CLOEXEC) < 0 {
                fail(5);
            }
        }
        libc::execve(plan.exe, plan.argv, plan.envp);
        fail(6)
    }
}

/// Makes the calling process the reaper of its orphaned descendants, so a launcher can find
/// and end every process of its runtime.
pub fn set_child_subreaper() -> Result<(), Errno> {
    nix::sys::prctl::set_child_subreaper(true)
}

/// A pidfd for `pid` (readable once the process has exited; works for non-children).
pub fn pidfd_open(pid: i32) -> Result<OwnedFd, Errno> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if r < 0 {
        return Err(Errno::last());
    }
    // SAFETY: the kernel just returned this new descriptor; we own it.
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

/// A copy of descriptor `fd` of the process behind `pidfd` (`pidfd_getfd`, Linux 5.6+; the
/// caller needs ptrace access to that process: same user, and under Yama an ancestor). The
/// copy is close-on-exec.
pub fn pidfd_getfd(pidfd: &OwnedFd, fd: RawFd) -> Result<OwnedFd, Errno> {
    // SAFETY: pidfd_getfd takes a pidfd we own, a descriptor number and flags (0); it
    // returns a new descriptor or -1.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if r < 0 {
        return Err(Errno::last());
    }
    // SAFETY: the kernel just returned this new descriptor; we own it.
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::wait::{waitpid, WaitStatus};

    fn base(argv: &[&str]) -> SpawnSpec {
        SpawnSpec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: std::env::vars().collect(),
            cwd: None,
            stdin: Stdio::Null,
            stdout: Stdio::Null,
            stderr: Stdio::Null,
            cpus: vec![],
            new_process_group: false,
            die_with_parent: false,
            pass_fds: vec![],
            fd_map: vec![],
        }
    }

    #[test]
    fn fd_map_swaps_descriptors_without_clobbering() {
        let (ar, aw) = nix::unistd::pipe().unwrap();
        let (br, bw) = nix::unistd::pipe().unwrap();
        let (a, b) = (aw.as_raw_fd(), bw.as_raw_fd());
        // The child gets pipe A's writer under B's number and B's writer under A's number.
        let script = format!("echo to-b-number >&{b}; echo to-a-number >&{a}");
        // bash, not sh: dash redirects single-digit descriptors only, and tests running at
        // the same time can push these above 9.
        let mut spec = base(&["bash", "-c", &script]);
        spec.fd_map = vec![(a, b), (b, a)];
        let pid = spawn(&spec).unwrap();
        drop((aw, bw));
        assert_eq!(exit_code(pid), 0);
        let read_all = |fd: OwnedFd| {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::fs::File::from(fd), &mut s).unwrap();
            s
        };
        assert_eq!(read_all(ar), "to-b-number\n");
        assert_eq!(read_all(br), "to-a-number\n");
    }

    fn exit_code(pid: Pid) -> i32 {
        match waitpid(pid, None).unwrap() {
            WaitStatus::Exited(_, c) => c,
            s => panic!("unexpected {s:?}"),
        }
    }

    #[test]
    fn runs_program_with_env_cwd_and_exit_code() {
        let mut s = base(&[
            "sh",
            "-c",
            "test \"$(pwd)\" = /tmp && test \"$DRAGON_T\" = yes && exit 7",
        ]);
        s.cwd = Some("/tmp".into());
        s.env.push(("DRAGON_T".into(), "yes".into()));
        assert_eq!(exit_code(spawn(&s).unwrap()), 7);
    }

    #[test]
    fn missing_program_and_bad_cwd_are_clear_errors() {
        assert_eq!(
            spawn(&base(&["no-such-program-dragon"])).unwrap_err(),
            SpawnError::NotFound("no-such-program-dragon".into())
        );
        let mut s = base(&["true"]);
        s.cwd = Some("/no/such/dir".into());
        assert!(matches!(spawn(&s).unwrap_err(), SpawnError::BadCwd(_)));
        assert!(matches!(
            spawn(&base(&[])).unwrap_err(),
            SpawnError::BadArgument(_)
        ));
    }

    #[test]
    fn affinity_and_process_group_are_applied() {
        let cpu = *nix::sched::sched_getaffinity(Pid::from_raw(0))
            .map(|set| {
                (0..CpuSet::count())
                    .filter(|&c| set.is_set(c).unwrap_or(false))
                    .collect::<Vec<_>>()
            })
            .unwrap()
            .last()
            .unwrap();
        let (rd, wr) = nix::unistd::pipe().unwrap();
        let mut s = base(&[
            "sh",
            "-c",
            "grep Cpus_allowed_list /proc/self/status; cut -d' ' -f5 /proc/$$/stat; echo $$",
        ]);
        s.cpus = vec![cpu];
        s.new_process_group = true;
        s.stdout = Stdio::Fd(wr.as_raw_fd());
        let pid = spawn(&s).unwrap();
        drop(wr);
        assert_eq!(exit_code(pid), 0);
        let mut out = String::new();
        std::io::Read::read_to_string(&mut std::fs::File::from(rd), &mut out).unwrap();
        let lines: Vec<&str> = out.lines().map(str::trim).collect();
        assert_eq!(
            lines[0].split_whitespace().last(),
            Some(cpu.to_string().as_str())
        );
        assert_eq!(lines[1], lines[2], "child leads its own process group");
    }

    #[test]
    fn pidfd_becomes_readable_at_exit() {
        let pid = spawn(&base(&["sh", "-c", "exit 3"])).unwrap();
        let fd = pidfd_open(pid.as_raw()).unwrap();
        let mut fds = [nix::poll::PollFd::new(
            std::os::fd::AsFd::as_fd(&fd),
            nix::poll::PollFlags::POLLIN,
        )];
        let n = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(10_000u16)).unwrap();
        assert_eq!(n, 1);
        assert_eq!(exit_code(pid), 3);
    }
}
