//! Blocking calls: time-outs from Python, and the loop that waits with the GIL released in
//! slices, checking Python's signal handlers between them (and waking at once when a signal
//! interrupts the futex), so that Ctrl-C raises `KeyboardInterrupt` promptly.

use std::time::{Duration, Instant};

use dragon_shm::sync::{SyncError, WaitOpts};
use dragon_shm::waitqueue::default_spin;
use pyo3::prelude::*;

use crate::errors::{Error, Result};

/// Longest stretch a blocking call waits without looking at Python's signal handlers.
pub(crate) const SIGNAL_SLICE: Duration = Duration::from_millis(100);

/// A Python time-out in seconds (None: forever; negative: zero).
pub(crate) fn timeout_of(t: Option<f64>) -> Result<Option<Duration>> {
    match t {
        None => Ok(None),
        Some(s) if s.is_nan() => Err(Error::value("timeout must be a number")),
        Some(s) => Ok(Some(Duration::from_secs_f64(s.max(0.0)))),
    }
}

/// The outcome of one wait slice, as the blocking loop sees it.
pub(crate) enum Slice<T> {
    Done(T),
    /// The slice ended without result (time-out or signal): check signals, go on.
    Again,
}

/// The wait options of one slice of a sliced wait ending at `end` (None: never): at most
/// `slice` long, spinning first only in the first slice.
pub(crate) fn slice_opts(
    end: Option<Instant>,
    slice: Duration,
    first: bool,
    interruptible: bool,
) -> WaitOpts {
    let slice_end = Instant::now() + slice;
    WaitOpts {
        deadline: Some(end.map_or(slice_end, |e| e.min(slice_end))),
        spin: if first {
            default_spin()
        } else {
            Duration::ZERO
        },
        interruptible,
        poll_every: None,
    }
}

/// Runs `op` with the GIL released in slices of at most [`SIGNAL_SLICE`], checking Python's
/// signal handlers between slices, until it finishes or `timeout` passes. `op` gets the
/// wait options of one slice and says whether it finished.
pub(crate) fn blocking<T, F>(py: Python<'_>, timeout: Option<Duration>, op: F) -> Result<Option<T>>
where
    F: Fn(&WaitOpts) -> Slice<T> + Sync,
    T: Send,
{
    let end = timeout.map(|t| Instant::now() + t);
    let mut first = true;
    loop {
        let opts = slice_opts(end, SIGNAL_SLICE, first, true);
        first = false;
        match py.detach(|| op(&opts)) {
            Slice::Done(v) => return Ok(Some(v)),
            Slice::Again => {
                py.check_signals()?;
                if end.is_some_and(|e| Instant::now() >= e) {
                    return Ok(None);
                }
            }
        }
    }
}

/// Waits for a sync operation in signal-aware slices: time-outs and signals retry, any other
/// error is raised. `None` when `timeout` passed.
pub(crate) fn sync_wait<T: Send>(
    py: Python<'_>,
    timeout: Option<Duration>,
    op: impl Fn(&WaitOpts) -> std::result::Result<T, SyncError> + Sync,
) -> Result<Option<T>> {
    let r = blocking(py, timeout, |o| match op(o) {
        Err(SyncError::TimedOut) | Err(SyncError::Interrupted) => Slice::Again,
        r => Slice::Done(r),
    })?;
    Ok(r.transpose()?)
}

/// `acquire(block, timeout)` of the locks and semaphores: `got_it` is the result of one try
/// without waiting; then, when `block`, waits with `op`.
pub(crate) fn acquire_or_wait<T: Send>(
    py: Python<'_>,
    got_it: bool,
    block: bool,
    timeout: Option<f64>,
    op: impl Fn(&WaitOpts) -> std::result::Result<T, SyncError> + Sync,
) -> Result<bool> {
    if got_it {
        return Ok(true);
    }
    if !block {
        return Ok(false);
    }
    Ok(sync_wait(py, timeout_of(timeout)?, op)?.is_some())
}
