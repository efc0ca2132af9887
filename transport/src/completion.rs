//! A one-shot completion that any number of threads can wait on.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::{Result, TransportError};

#[derive(Debug, Default)]
struct State {
    result: Mutex<Option<Result<()>>>,
    cv: Condvar,
}

/// Outcome of an asynchronous block transfer. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Completion {
    inner: Arc<State>,
}

impl Completion {
    pub(crate) fn new() -> Completion {
        Completion::default()
    }

    /// Records the outcome; only the first call counts.
    pub(crate) fn complete(&self, r: Result<()>) {
        let mut g = self.inner.result.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            *g = Some(r);
            self.inner.cv.notify_all();
        }
    }

    /// The outcome if the transfer has finished.
    pub fn poll(&self) -> Option<Result<()>> {
        *self.inner.result.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits up to `timeout` (`None`: forever) for the outcome. `Err(TimedOut)` leaves the
    /// transfer running; wait again later.
    pub fn wait(&self, timeout: Option<Duration>) -> Result<()> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut g = self.inner.result.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(r) = *g {
                return r;
            }
            match deadline {
                None => g = self.inner.cv.wait(g).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Err(TransportError::TimedOut);
                    }
                    g = self
                        .inner
                        .cv
                        .wait_timeout(g, d - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
    }
}
