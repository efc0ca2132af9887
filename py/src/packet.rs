//! Packet I/O on the descriptors of the "dragon" start method's connections.
//!
//! A connection of the "dragon" context (its `Pipe`, and the pipes inside its `Queue` and
//! `SimpleQueue`) is a real descriptor, as CPython's is, so that `connection.wait`, `select`,
//! EOF on the last writer's close and fd passing keep their meaning. It is message-oriented:
//! a pipe is a packet-mode pipe (`O_DIRECT`, non-blocking; a duplex `Pipe` one each way,
//! with a socket pair beside them for descriptors only), and a `Connection` built on a
//! socket uses it as `SOCK_SEQPACKET`, so every message is one packet that one
//! `write`/`send` puts and one `read`/`recv` takes, atomically, whatever the number of
//! readers and writers.
//! Messages larger than a packet travel in pool blocks (`dragon._conn`).
//!
//! What is measured to matter here: a process-to-process wake-up through the kernel costs
//! several microseconds on a VM, so on a machine with more than one CPU a receiver first
//! polls the descriptor for a short spin budget (`DRAGON_SPIN_US`, default 20 µs) with the
//! GIL released (yielding the CPU between polls when it may run on one CPU only, where the
//! peer may be waiting for that CPU), then sleeps in `poll(2)` in signal-aware slices.

use std::cell::RefCell;
use std::time::{Duration, Instant};

use dragon_shm::platform::Pause;
use dragon_shm::waitqueue::default_spin;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::blocking::{timeout_of, SIGNAL_SLICE};
use crate::errors::{Error, Result, EOF};

/// The largest packet `packet_recv` takes (a `SOCK_SEQPACKET` message, on a `Connection`
/// built on a socket; pipe packets are at most `PIPE_BUF` = 4096 bytes).
pub const PACKET_MAX: usize = 64 * 1024;

thread_local! {
    static RECV_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0u8; PACKET_MAX + 1]);
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

thread_local! {
    /// Whether this thread's last wait that spun was answered after its yield ran another
    /// thread (see `wait_for`).
    static PEER_SHARES_CPU: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// One non-blocking send of `data` as one packet: `Ok(true)` sent, `Ok(false)` no room now.
fn try_send(fd: i32, sock: bool, data: &[u8]) -> Result<bool, i32> {
    loop {
        // SAFETY: `data` is a live slice of `data.len()` bytes; the kernel only reads it.
        let n = unsafe {
            if sock {
                libc::send(
                    fd,
                    data.as_ptr().cast(),
                    data.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            } else {
                libc::write(fd, data.as_ptr().cast(), data.len())
            }
        };
        if n >= 0 {
            // Packets are atomic: a socket message goes whole, and so does a pipe write of at
            // most PIPE_BUF bytes (the caller's limit).
            return if n as usize == data.len() {
                Ok(true)
            } else {
                Err(libc::EMSGSIZE)
            };
        }
        match errno() {
            libc::EINTR => continue,
            libc::EAGAIN => return Ok(false),
            e => return Err(e),
        }
    }
}

/// One non-blocking receive into `buf`: `Ok(Some(n))` a packet of `n` bytes, `Ok(None)`
/// nothing now, `Err(EOF)` end of file (every writer closed).
fn try_recv(fd: i32, sock: bool, buf: &mut [u8]) -> Result<Option<usize>, i32> {
    loop {
        // SAFETY: `buf` is a live, writable slice of `buf.len()` bytes.
        let n = unsafe {
            if sock {
                libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT)
            } else {
                libc::read(fd, buf.as_mut_ptr().cast(), buf.len())
            }
        };
        if n > 0 {
            return Ok(Some(n as usize));
        }
        if n == 0 {
            return Err(EOF);
        }
        match errno() {
            libc::EINTR => continue,
            libc::EAGAIN => return Ok(None),
            e => return Err(e),
        }
    }
}

/// `poll(2)` on one descriptor for `events`, at most `wait` (zero: just look). True when
/// ready (or hung up / in error, which the next operation reports).
fn poll_one(fd: i32, events: i16, wait: Duration) -> Result<bool, i32> {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    let ms = wait.as_millis().min(i32::MAX as u128) as i32;
    let ms = if ms == 0 && !wait.is_zero() { 1 } else { ms };
    // SAFETY: one valid pollfd entry.
    let r = unsafe { libc::poll(&mut p, 1, ms) };
    if r < 0 {
        let e = errno();
        return if e == libc::EINTR { Ok(false) } else { Err(e) };
    }
    if r > 0 && p.revents & libc::POLLNVAL != 0 {
        return Err(libc::EBADF);
    }
    Ok(r > 0)
}

/// What one attempt of a waiting loop says.
enum Step<T> {
    Done(T),
    NotYet,
}

/// Runs `attempt` until it is done or `timeout` passes: first with the GIL held (one try),
/// then, with the GIL released, spinning for the spin budget when `spin` (and other CPUs may
/// run the peer), then sleeping in `poll(2)` for `events` in slices, checking Python's
/// signal handlers between slices. `None` on time-out.
fn wait_for<T: Send>(
    py: Python<'_>,
    fd: i32,
    events: i16,
    timeout: Option<Duration>,
    spin: bool,
    attempt: &(dyn Fn() -> Result<Step<T>, i32> + Sync),
) -> Result<Option<T>> {
    let just_look = timeout.is_some_and(|t| t.is_zero());
    // When this thread's last wait handed its CPU to another thread (its peer runs on the
    // same CPU, as in a one-CPU ping-pong), the peer cannot have answered yet: go straight
    // to yielding. Otherwise (data often waits already: a stream), or when the time-out is
    // too short to be sure of a look in the spin below, look first.
    let long_wait = timeout.is_none_or(|t| t > default_spin());
    if just_look || !spin || !long_wait || !PEER_SHARES_CPU.get() {
        if let Step::Done(v) = attempt().map_err(Error::Packet)? {
            return Ok(Some(v));
        }
        if just_look {
            return Ok(None);
        }
    }
    let start = Instant::now();
    let end = timeout.map(|t| start + t);
    let spun = py.detach(|| -> Result<Option<T>, i32> {
        if !spin || default_spin().is_zero() {
            return Ok(None);
        }
        // Pinned to one CPU, the waiter yields it before each attempt (an attempt before the
        // peer ran there would be a system call that always fails); see `Pause`.
        let mut pause = Pause::new(4);
        let spin_end = start + default_spin();
        let spin_end = end.map_or(spin_end, |e| e.min(spin_end));
        while Instant::now() < spin_end {
            pause.pause();
            if let Step::Done(v) = attempt()? {
                PEER_SHARES_CPU.set(pause.others_ran());
                return Ok(Some(v));
            }
        }
        PEER_SHARES_CPU.set(false);
        Ok(None)
    });
    if let Some(v) = spun.map_err(Error::Packet)? {
        return Ok(Some(v));
    }
    loop {
        let now = Instant::now();
        let slice = match end {
            Some(e) if e <= now => return Ok(None),
            Some(e) => (e - now).min(SIGNAL_SLICE),
            None => SIGNAL_SLICE,
        };
        let r = py.detach(|| -> Result<Option<T>, i32> {
            if poll_one(fd, events, slice)? {
                if let Step::Done(v) = attempt()? {
                    return Ok(Some(v));
                }
            }
            Ok(None)
        });
        if let Some(v) = r.map_err(Error::Packet)? {
            return Ok(Some(v));
        }
        py.check_signals()?;
    }
}

/// Sends `data` as one packet on `fd` (a `SOCK_SEQPACKET` socket when `sock`, as a
/// `Connection` built on a socket has, else a
/// non-blocking packet-mode pipe, where `data` must be at most 4096 bytes). Waits for room
/// up to `timeout` seconds (None: as long as it takes) unless `block` is false; returns
/// whether it was sent. Raises OSError (BrokenPipeError when every reader closed).
#[pyfunction]
#[pyo3(signature = (fd, sock, data, block=true, timeout=None))]
pub fn packet_send(
    py: Python<'_>,
    fd: i32,
    sock: bool,
    data: &[u8],
    block: bool,
    timeout: Option<f64>,
) -> Result<bool> {
    if data.is_empty() || data.len() > if sock { PACKET_MAX } else { 4096 } {
        return Err(Error::value(format!(
            "a packet holds 1 to {} bytes, not {}",
            if sock { PACKET_MAX } else { 4096 },
            data.len()
        )));
    }
    let t = if block {
        timeout_of(timeout)?
    } else {
        Some(Duration::ZERO)
    };
    let attempt =
        || try_send(fd, sock, data).map(|ok| if ok { Step::Done(()) } else { Step::NotYet });
    // No spinning for room: a full pipe drains at the reader's pace.
    Ok(wait_for(py, fd, libc::POLLOUT, t, false, &attempt)?.is_some())
}

/// Receives one packet from `fd` (see `packet_send`), waiting up to `timeout` seconds
/// (None: as long as it takes; 0: just look). Returns its bytes, or None on time-out; raises
/// EOFError once every writer has closed and nothing is left.
#[pyfunction]
#[pyo3(signature = (fd, sock, timeout=None))]
pub fn packet_recv<'py>(
    py: Python<'py>,
    fd: i32,
    sock: bool,
    timeout: Option<f64>,
) -> Result<Option<Bound<'py, PyBytes>>> {
    let t = timeout_of(timeout)?;
    RECV_BUF.with(|cell| {
        let mut buf = cell.borrow_mut();
        let base = buf.as_mut_ptr() as usize;
        let len = buf.len();
        let attempt = move || {
            // SAFETY: the thread-local buffer outlives this call and only this thread's
            // attempts (one at a time, in this call) write it; the pointer crosses the GIL
            // release as an address because raw pointers are not Send.
            let b = unsafe { std::slice::from_raw_parts_mut(base as *mut u8, len) };
            match try_recv(fd, sock, b) {
                Ok(Some(n)) => Ok(Step::Done(n)),
                Ok(None) => Ok(Step::NotYet),
                Err(e) => Err(e),
            }
        };
        match wait_for(py, fd, libc::POLLIN, t, true, &attempt)? {
            None => Ok(None),
            Some(n) if n > PACKET_MAX => Err(Error::value(
                "packet larger than a dragon connection carries",
            )),
            Some(n) => Ok(Some(PyBytes::new(py, &buf[..n]))),
        }
    })
}

/// Whether a packet (or end of file) waits on `fd`, waiting up to `timeout` seconds (None:
/// as long as it takes).
#[pyfunction]
#[pyo3(signature = (fd, timeout=Some(0.0)))]
pub fn packet_poll(py: Python<'_>, fd: i32, timeout: Option<f64>) -> Result<bool> {
    let t = timeout_of(timeout)?;
    let attempt = || {
        poll_one(fd, libc::POLLIN, Duration::ZERO).map(|r| {
            if r {
                Step::Done(())
            } else {
                Step::NotYet
            }
        })
    };
    Ok(wait_for(py, fd, libc::POLLIN, t, true, &attempt)?.is_some())
}
