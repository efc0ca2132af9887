//! A one-shot completion that any number of threads can wait on.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::{Result, TransportError};

/// Drives the back end's progress from a waiting thread; returns how much it did (0: nothing
/// to do, or another thread is at it).
pub(crate) type Poller = Arc<dyn Fn() -> usize + Send + Sync>;

/// How long `wait` drives progress itself (with a poller) before it parks.
const POLL_SPIN: Duration = Duration::from_micros(100);

#[derive(Default)]
struct State {
    result: Mutex<Option<Result<()>>>,
    cv: Condvar,
    poller: Option<Poller>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Completion")
            .field("result", &self.result)
            .finish_non_exhaustive()
    }
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

    /// A completion whose `wait` first drives progress with `poller` for a short while
    /// (back ends whose progress needs polling: a reply is often handled on the waiting
    /// thread itself, without waking another).
    pub(crate) fn with_poller(poller: Poller) -> Completion {
        Completion {
            inner: Arc::new(State {
                result: Mutex::new(None),
                cv: Condvar::new(),
                poller: Some(poller),
            }),
        }
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
        if let (Some(p), false) = (&self.inner.poller, timeout == Some(Duration::ZERO)) {
            let t0 = Instant::now();
            let spin = deadline.map_or(POLL_SPIN, |d| POLL_SPIN.min(d - t0));
            while t0.elapsed() < spin {
                if let Some(r) = self.poll() {
                    return r;
                }
                if p() == 0 {
                    crate::ofi::relax(t0);
                }
            }
        }
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
