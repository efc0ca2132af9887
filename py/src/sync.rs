//! Process-shared sync objects in pool blocks: `Event`, `Lock`, `RLock`, `Semaphore`,
//! `BoundedSemaphore` and `Barrier`. Each pickles to an "attach" recipe (pool name + block
//! handle); every wait is signal-aware (`crate::blocking`).

use dragon_shm::sync::{self, SyncError, WaitOpts};
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::blocking::{acquire_or_wait, blocking, sync_wait, timeout_of, Slice};
use crate::errors::{Error, Result};
use crate::pool::{block_of, PyPool};
use crate::segment::{ref_tuple, RefTuple};

/// The pickle recipe of a shared object: `dragon._remote.attach(kind, pool_name, ref)`.
pub(crate) fn remote_recipe<'py>(
    py: Python<'py>,
    kind: &str,
    pool_name: &str,
    r: RefTuple,
) -> PyResult<Bound<'py, PyTuple>> {
    let attach = py.import("dragon._remote")?.getattr("attach")?;
    (attach, (kind, pool_name, r)).into_pyobject(py)
}

macro_rules! sync_common {
    ($py_ty:ident, $inner:ty, $pyname:literal) => {
        #[pymethods]
        impl $py_ty {
            /// Attaches to the object `ref` of the pool named `pool_name`.
            #[staticmethod]
            fn attach(pool_name: &str, r: RefTuple) -> Result<Self> {
                Ok($py_ty {
                    inner: <$inner>::attach(block_of(pool_name, r)?)?,
                    pool_name: pool_name.to_string(),
                })
            }

            /// The block handle of the object.
            #[getter]
            fn r#ref(&self) -> RefTuple {
                ref_tuple(self.inner.block_ref())
            }

            /// Pickles to `dragon._remote.attach(kind, pool name, ref)`: the object itself on
            /// its own node, a proxy through the node's object server on another.
            fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyTuple>> {
                let me = slf.get();
                remote_recipe(slf.py(), $pyname, &me.pool_name, me.r#ref())
            }

            fn __repr__(&self) -> String {
                format!("<dragon._native.{} in {}>", $pyname, self.pool_name)
            }
        }
    };
}

/// A process-shared event flag.
#[pyclass(frozen, module = "dragon._native", name = "Event")]
pub(crate) struct PyEvent {
    inner: sync::Event,
    pool_name: String,
}
sync_common!(PyEvent, sync::Event, "Event");

#[pymethods]
impl PyEvent {
    /// A new event (clear) in `pool`.
    #[new]
    fn new(pool: &PyPool) -> Result<Self> {
        let inner = sync::Event::create(&pool.inner)?;
        Ok(PyEvent {
            inner,
            pool_name: pool.inner.name().to_string(),
        })
    }
    /// Sets the flag and wakes every waiter.
    fn set(&self) {
        self.inner.set();
    }
    /// Clears the flag.
    fn clear(&self) {
        self.inner.clear();
    }
    /// Whether the flag is set.
    fn is_set(&self) -> bool {
        self.inner.is_set()
    }
    /// Waits until set or `timeout` seconds pass; returns the flag.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> Result<bool> {
        if self.inner.is_set() {
            return Ok(true);
        }
        let ev = &self.inner;
        Ok(sync_wait(py, timeout_of(timeout)?, |o| ev.wait_with(o))?.is_some())
    }
}

/// A process-shared lock; a lock whose holder died is recovered by the next acquirer.
#[pyclass(frozen, module = "dragon._native", name = "Lock")]
pub(crate) struct PyLock {
    inner: sync::Lock,
    pool_name: String,
}
sync_common!(PyLock, sync::Lock, "Lock");

#[pymethods]
impl PyLock {
    /// A new, unlocked lock in `pool`.
    #[new]
    fn new(pool: &PyPool) -> Result<Self> {
        let inner = sync::Lock::create(&pool.inner)?;
        Ok(PyLock {
            inner,
            pool_name: pool.inner.name().to_string(),
        })
    }
    /// Acquires; returns False on time-out (or when not blocking and held). `recovered()`
    /// afterwards says whether the previous holder died holding it.
    #[pyo3(signature = (block=true, timeout=None))]
    fn acquire(&self, py: Python<'_>, block: bool, timeout: Option<f64>) -> Result<bool> {
        let l = &self.inner;
        let now = l.acquire(false, None).is_some();
        acquire_or_wait(py, now, block, timeout, |o| l.acquire_with(o))
    }
    /// Acquires and returns whether the previous holder died holding the lock (None on
    /// time-out).
    #[pyo3(signature = (timeout=None))]
    fn acquire_recovering(&self, py: Python<'_>, timeout: Option<f64>) -> Result<Option<bool>> {
        let l = &self.inner;
        sync_wait(py, timeout_of(timeout)?, |o| {
            l.acquire_with(o).map(|a| a.recovered)
        })
    }
    /// Releases (any process may; ValueError when not held).
    fn release(&self) -> Result<()> {
        Ok(self.inner.release()?)
    }
    /// Whether somebody holds it.
    fn is_locked(&self) -> bool {
        self.inner.is_locked()
    }
    fn __enter__(&self, py: Python<'_>) -> Result<bool> {
        self.acquire(py, true, None)
    }
    fn __exit__(
        &self,
        _t: Option<Bound<'_, PyAny>>,
        _v: Option<Bound<'_, PyAny>>,
        _tb: Option<Bound<'_, PyAny>>,
    ) -> Result<()> {
        self.release()
    }
}

/// The Python methods of a semaphore class (`Semaphore`, `BoundedSemaphore`): the two
/// differ only in what `release` checks, which their Rust types do.
macro_rules! semaphore_methods {
    ($py:ident, $rs:ty, $what:literal, $release_doc:literal) => {
        #[pymethods]
        impl $py {
            #[doc = concat!("A new ", $what, " with `value` units in `pool`.")]
            #[new]
            #[pyo3(signature = (pool, value=1))]
            fn new(pool: &PyPool, value: u32) -> Result<Self> {
                let inner = <$rs>::create(&pool.inner, value)?;
                Ok($py {
                    inner,
                    pool_name: pool.inner.name().to_string(),
                })
            }
            /// Takes one unit; False on time-out or when not blocking and none is free.
            #[pyo3(signature = (block=true, timeout=None))]
            fn acquire(&self, py: Python<'_>, block: bool, timeout: Option<f64>) -> Result<bool> {
                let s = &self.inner;
                acquire_or_wait(py, s.acquire(false, None), block, timeout, |o| {
                    s.acquire_with(o)
                })
            }
            #[doc = $release_doc]
            #[pyo3(signature = (n=1))]
            fn release(&self, n: u32) -> Result<()> {
                Ok(self.inner.release_n(n)?)
            }
            /// Units free now.
            fn get_value(&self) -> u32 {
                self.inner.get_value()
            }
        }
    };
}

/// A process-shared counting semaphore (`bounded=True`: releasing above the initial value
/// raises ValueError).
#[pyclass(frozen, module = "dragon._native", name = "Semaphore")]
pub(crate) struct PySemaphore {
    inner: sync::Semaphore,
    pool_name: String,
}
sync_common!(PySemaphore, sync::Semaphore, "Semaphore");

semaphore_methods!(
    PySemaphore,
    sync::Semaphore,
    "semaphore",
    "Returns `n` units."
);

/// A process-shared recursive lock (owner = process + thread); a dead owner is recovered.
#[pyclass(frozen, module = "dragon._native", name = "RLock")]
pub(crate) struct PyRLock {
    inner: sync::RLock,
    pool_name: String,
}
sync_common!(PyRLock, sync::RLock, "RLock");

#[pymethods]
impl PyRLock {
    /// A new, unlocked recursive lock in `pool`.
    #[new]
    fn new(pool: &PyPool) -> Result<Self> {
        let inner = sync::RLock::create(&pool.inner)?;
        Ok(PyRLock {
            inner,
            pool_name: pool.inner.name().to_string(),
        })
    }
    /// Acquires (again, when this thread owns it); False on time-out.
    #[pyo3(signature = (block=true, timeout=None))]
    fn acquire(&self, py: Python<'_>, block: bool, timeout: Option<f64>) -> Result<bool> {
        let l = &self.inner;
        let now = l.acquire(false, None).is_some();
        acquire_or_wait(py, now, block, timeout, |o| l.acquire_with(o))
    }
    /// Releases one level (LockNotOwnedError, an AssertionError, when this thread does not
    /// own it, as multiprocessing.RLock raises).
    fn release(&self) -> Result<()> {
        self.inner.release().map_err(|e| match e {
            SyncError::NotHeld => Error::Sync(SyncError::NotOwner),
            e => Error::Sync(e),
        })
    }
    /// Whether the calling thread owns it.
    fn is_mine(&self) -> bool {
        self.inner.is_mine()
    }
    /// Recursion depth.
    fn count(&self) -> u32 {
        self.inner.count()
    }
    fn __enter__(&self, py: Python<'_>) -> Result<bool> {
        self.acquire(py, true, None)
    }
    fn __exit__(
        &self,
        _t: Option<Bound<'_, PyAny>>,
        _v: Option<Bound<'_, PyAny>>,
        _tb: Option<Bound<'_, PyAny>>,
    ) -> Result<()> {
        self.release()
    }
}

/// A process-shared bounded semaphore: releasing above the initial value raises ValueError.
#[pyclass(frozen, module = "dragon._native", name = "BoundedSemaphore")]
pub(crate) struct PyBoundedSemaphore {
    inner: sync::BoundedSemaphore,
    pool_name: String,
}
sync_common!(
    PyBoundedSemaphore,
    sync::BoundedSemaphore,
    "BoundedSemaphore"
);

semaphore_methods!(
    PyBoundedSemaphore,
    sync::BoundedSemaphore,
    "bounded semaphore",
    "Returns `n` units (ValueError above the initial value)."
);

/// A process-shared barrier for `parties` processes.
#[pyclass(frozen, module = "dragon._native", name = "Barrier")]
pub(crate) struct PyBarrier {
    inner: sync::Barrier,
    pool_name: String,
}
sync_common!(PyBarrier, sync::Barrier, "Barrier");

#[pymethods]
impl PyBarrier {
    /// A new barrier in `pool`.
    #[new]
    fn new(pool: &PyPool, parties: u32) -> Result<Self> {
        let inner = sync::Barrier::create(&pool.inner, parties)?;
        Ok(PyBarrier {
            inner,
            pool_name: pool.inner.name().to_string(),
        })
    }
    /// Waits for all parties; returns this party's index (0..parties). A time-out breaks
    /// the barrier (BrokenBarrierError, a threading.BrokenBarrierError, for everyone).
    #[pyo3(signature = (timeout=None, action=None))]
    fn wait(
        &self,
        py: Python<'_>,
        timeout: Option<f64>,
        action: Option<Bound<'_, PyAny>>,
    ) -> Result<u32> {
        let t = timeout_of(timeout)?;
        let b = &self.inner;
        // The last party to arrive runs `action` before the others are released; an
        // exception in it breaks the barrier and is raised here.
        let mut action_err: Option<PyErr> = None;
        let mut run = || match &action {
            Some(f) => match f.call0() {
                Ok(_) => true,
                Err(e) => {
                    action_err = Some(e);
                    false
                }
            },
            None => true,
        };
        let act: Option<&mut dyn FnMut() -> bool> = if action.is_some() {
            Some(&mut run)
        } else {
            None
        };
        // One arrival, then interruptible waits on it (a signal does not break the barrier).
        let arrived = b.arrive(&WaitOpts::timeout(t), act);
        if let Some(e) = action_err {
            return Err(e.into());
        }
        let a = arrived?;
        let r = blocking(py, t, |o| match b.poll_arrival(&a, o) {
            Err(SyncError::TimedOut) | Err(SyncError::Interrupted) => Slice::Again,
            r => Slice::Done(r),
        });
        match r {
            Ok(Some(r)) => Ok(r?),
            // Out of time: breaking the barrier unless it was released meanwhile.
            Ok(None) => Ok(b.cancel(&a)?),
            Err(e) => {
                let _ = b.cancel(&a);
                Err(e)
            }
        }
    }
    /// Breaks the barrier: current and future waiters get BrokenBarrierError.
    fn abort(&self) {
        self.inner.abort();
    }
    /// Returns the barrier to its initial state.
    fn reset(&self) {
        self.inner.reset();
    }
    /// Number of parties.
    #[getter]
    fn parties(&self) -> u32 {
        self.inner.parties()
    }
    /// Parties waiting now.
    #[getter]
    fn n_waiting(&self) -> u32 {
        self.inner.n_waiting()
    }
    /// Whether the barrier is broken.
    #[getter]
    fn broken(&self) -> bool {
        self.inner.broken()
    }
}
