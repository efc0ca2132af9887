//! Starting and watching processes: `spawn` (fork + exec with the runtime's launch rules),
//! pidfds, and the child subreaper flag.

use std::os::fd::{BorrowedFd, IntoRawFd};

use dragon_runtime::proto::StdioReq;
use dragon_runtime::spawn::{SpawnSpec, Stdio};
use dragon_shm::platform::Errno;
use pyo3::prelude::*;

use crate::errors::{Error, Result};

/// A standard stream argument as the node agent takes it: None (inherit), DEVNULL (-3),
/// STDOUT (-2, stderr only) or a descriptor of this process.
pub(crate) fn stdio_req(v: Option<i64>, is_stderr: bool) -> Result<StdioReq> {
    Ok(match v {
        None => StdioReq::Inherit,
        Some(-3) => StdioReq::Null,
        Some(-2) if is_stderr => StdioReq::Stdout,
        Some(fd) if fd >= 0 && fd <= i64::from(i32::MAX) => StdioReq::Fd(fd as i32),
        Some(x) => return Err(Error::value(format!("bad standard stream value {x}"))),
    })
}

/// The same argument for `spawn` here.
fn stdio_of(v: Option<i64>, is_stderr: bool) -> Result<Stdio> {
    Ok(match stdio_req(v, is_stderr)? {
        StdioReq::Inherit => Stdio::Inherit,
        StdioReq::Null => Stdio::Null,
        StdioReq::Stdout => Stdio::Stdout,
        StdioReq::Fd(fd) => Stdio::Fd(fd),
    })
}

/// Starts `argv` (program looked up in the child's PATH) with the given environment (None:
/// ours), working directory, standard streams (None: inherit; subprocess.DEVNULL,
/// subprocess.STDOUT for stderr, or a file descriptor), CPU affinity (None or []: inherit),
/// in a new process group unless `new_group` is False, keeping the descriptors in `pass_fds`.
/// Returns the pid once exec succeeded.
#[pyfunction]
#[pyo3(signature = (argv, env=None, cwd=None, stdin=None, stdout=None, stderr=None, cpus=None, new_group=true, die_with_parent=false, pass_fds=None))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn spawn(
    py: Python<'_>,
    argv: Vec<String>,
    env: Option<Vec<(String, String)>>,
    cwd: Option<std::path::PathBuf>,
    stdin: Option<i64>,
    stdout: Option<i64>,
    stderr: Option<i64>,
    cpus: Option<Vec<usize>>,
    new_group: bool,
    die_with_parent: bool,
    pass_fds: Option<Vec<i32>>,
) -> Result<i32> {
    let spec = SpawnSpec {
        argv,
        env: env.unwrap_or_else(|| std::env::vars().collect()),
        cwd,
        stdin: stdio_of(stdin, false)?,
        stdout: stdio_of(stdout, false)?,
        stderr: stdio_of(stderr, true)?,
        cpus: cpus.unwrap_or_default(),
        new_process_group: new_group,
        die_with_parent,
        pass_fds: pass_fds.unwrap_or_default(),
        fd_map: vec![],
    };
    let pid = py.detach(|| dragon_runtime::spawn::spawn(&spec))?;
    Ok(pid.as_raw())
}

/// A pidfd for `pid`: a descriptor that polls readable once the process has exited.
#[pyfunction]
pub(crate) fn pidfd_open(pid: i32) -> Result<i32> {
    dragon_runtime::spawn::pidfd_open(pid)
        .map(|fd| fd.into_raw_fd())
        .map_err(|e| Error::Os("pidfd_open", e))
}

/// A copy of descriptor `fd` of the process behind `pidfd` (close-on-exec; needs ptrace
/// access to that process: same user).
#[pyfunction]
pub(crate) fn pidfd_getfd(pidfd: i32, fd: i32) -> Result<i32> {
    if pidfd < 0 {
        return Err(Error::value("bad pidfd"));
    }
    // SAFETY: the caller passes a pidfd it owns and keeps open for this call; we only
    // borrow it (try_clone_to_owned makes our own copy, closed when it drops).
    let borrowed = unsafe { BorrowedFd::borrow_raw(pidfd) };
    let owned = borrowed
        .try_clone_to_owned()
        .map_err(|e| Error::Os("dup", Errno::from_raw(e.raw_os_error().unwrap_or(0))))?;
    dragon_runtime::spawn::pidfd_getfd(&owned, fd)
        .map(|f| f.into_raw_fd())
        .map_err(|e| Error::Os("pidfd_getfd", e))
}

/// Makes this process the reaper of its orphaned descendants (`PR_SET_CHILD_SUBREAPER`).
#[pyfunction]
pub(crate) fn set_child_subreaper() -> Result<()> {
    dragon_runtime::spawn::set_child_subreaper().map_err(|e| Error::Os("prctl", e))
}
