//! `Kv`: the index of one DDict manager, a hash map in shared memory whose keys and values
//! are blocks of the manager's pool (`dragon.data.ddict` builds the DDict on it).

use std::sync::Mutex;

use dragon_shm::kv::{Kv, KvError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::errors::{Error, Result};
use crate::pool::{parts_block, PyBlock, PyPool};
use crate::segment::{ref_of, ref_tuple, RefTuple};

/// 64-bit FNV-1a of `data`: the stable hash DDict places keys by.
#[pyfunction]
pub(crate) fn stable_hash(data: &[u8]) -> u64 {
    dragon_shm::kv::stable_hash(data)
}

/// The index of one DDict manager: a hash map in shared memory whose keys and values are
/// blocks of the manager's pool. Values come back as read-only blocks that stay valid after
/// their key is replaced or deleted.
#[pyclass(frozen, module = "dragon._native", name = "Kv")]
pub(crate) struct PyKv {
    inner: Mutex<Option<Kv>>,
}

/// The error of a handle whose index is gone.
fn detached() -> Error {
    Error::value("the DDict was destroyed or detached")
}

impl PyKv {
    /// Runs `f` on the handle's slot under its mutex, taken with the GIL released (see
    /// [`PyKv::with`]).
    fn take_lock<T: Send>(&self, py: Python<'_>, f: impl FnOnce(&mut Option<Kv>) -> T + Send) -> T {
        py.detach(|| f(&mut self.inner.lock().unwrap_or_else(|e| e.into_inner())))
    }

    fn with<T>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&Kv) -> std::result::Result<T, KvError> + Send,
    ) -> Result<T>
    where
        T: Send,
    {
        // The handle's mutex is taken with the GIL released: a thread holding the GIL while
        // it waits for the mutex would keep the thread inside `f` (which needs the GIL back to
        // return) from ever releasing it.
        let r = py.detach(|| {
            let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            g.as_ref().map(f)
        });
        match r {
            Some(r) => Ok(r?),
            None => Err(detached()),
        }
    }
}

#[pymethods]
impl PyKv {
    /// Creates an empty index in `pool`.
    #[staticmethod]
    fn create(py: Python<'_>, pool: &PyPool) -> Result<Self> {
        let kv = py.detach(|| Kv::create(&pool.inner))?;
        Ok(PyKv {
            inner: Mutex::new(Some(kv)),
        })
    }

    /// Attaches to the index whose header block is `ref` in `pool`.
    #[staticmethod]
    fn attach(pool: &PyPool, r: RefTuple) -> Result<Self> {
        let kv = Kv::attach(&pool.inner, ref_of(r))?;
        Ok(PyKv {
            inner: Mutex::new(Some(kv)),
        })
    }

    /// The header's block handle.
    #[getter]
    fn r#ref(&self, py: Python<'_>) -> Result<RefTuple> {
        self.with(py, |kv| Ok(ref_tuple(kv.header_ref())))
    }

    /// Stores `parts` (buffers, copied once into one block of the manager's pool, laid out
    /// as Channel.send_parts does) under `key`.
    fn put_parts(
        &self,
        py: Python<'_>,
        key: &[u8],
        parts: Vec<pyo3::buffer::PyBuffer<u8>>,
    ) -> Result<()> {
        let pool = self.take_lock(py, |g| g.as_ref().map(|kv| kv.pool().clone()));
        let pool = pool.ok_or_else(detached)?;
        let block = parts_block(py, &pool, &parts, None).map_err(KvError::from)?;
        self.with(py, move |kv| kv.put(key, block))
    }

    /// Stores `block` (a Block of this index's pool, already in the parts layout) as the
    /// value of `key`, without copying it: the index takes a hold of its own.
    fn put_block(&self, py: Python<'_>, key: &[u8], block: &PyBlock) -> Result<()> {
        // SAFETY: Rust never borrows a PyBlock's bytes mutably (the class is frozen: only
        // `&Block`); Python reaches them through the buffer protocol (raw pointer), outside Rust
        // borrows.
        let b = unsafe { block.inner.try_clone() }?;
        self.with(py, move |kv| kv.put(key, b))
    }

    /// The value of `key` as a read-only Block (None when absent).
    fn get(&self, py: Python<'_>, key: &[u8]) -> Result<Option<PyBlock>> {
        Ok(self.with(py, |kv| kv.get(key))?.map(|b| PyBlock {
            inner: b,
            readonly: true,
        }))
    }

    /// Removes `key` and returns its value as a read-only Block (None when absent).
    fn take(&self, py: Python<'_>, key: &[u8]) -> Result<Option<PyBlock>> {
        Ok(self.with(py, |kv| kv.take(key))?.map(|b| PyBlock {
            inner: b,
            readonly: true,
        }))
    }

    /// Whether `key` is present.
    fn contains(&self, py: Python<'_>, key: &[u8]) -> Result<bool> {
        self.with(py, |kv| kv.contains(key))
    }

    /// Moves the value of `old` to `new` without copying (drops `old`'s entry when `new`
    /// exists); whether `old` existed.
    fn rekey(&self, py: Python<'_>, old: &[u8], new: &[u8]) -> Result<bool> {
        self.with(py, |kv| kv.rekey(old, new))
    }

    /// The checkpoint working set `(oldest, newest)`.
    fn chkpt_range(&self, py: Python<'_>) -> Result<(u64, u64)> {
        self.with(py, |kv| Ok(kv.chkpt_range()))
    }

    /// How many changes the index has had (puts, removals, working-set moves): read it,
    /// look, then `wait_change` with it.
    fn changes(&self, py: Python<'_>) -> Result<u64> {
        self.with(py, |kv| Ok(kv.changes()))
    }

    /// Sleeps (GIL released) until the index changed since `changes()` returned `seen`
    /// (True) or `timeout` seconds passed (False).
    #[pyo3(signature = (seen, timeout=None))]
    fn wait_change(&self, py: Python<'_>, seen: u64, timeout: Option<f64>) -> Result<bool> {
        let t = crate::blocking::timeout_of(timeout)?;
        // A handle of its own: the wait must not hold this handle's mutex (other threads
        // of this process use the index meanwhile).
        let own = self.with(py, |kv| Kv::attach(kv.pool(), kv.header_ref()))?;
        let woke = crate::blocking::blocking(py, t, |opts| {
            if own.wait_change_with(seen, opts) {
                crate::blocking::Slice::Done(())
            } else {
                crate::blocking::Slice::Again
            }
        })?;
        Ok(woke.is_some())
    }

    /// Records the checkpoint working set.
    fn set_chkpt_range(&self, py: Python<'_>, oldest: u64, newest: u64) -> Result<()> {
        self.with(py, |kv| {
            kv.set_chkpt_range(oldest, newest);
            Ok(())
        })
    }

    /// Removes `key`; whether it was there.
    fn remove(&self, py: Python<'_>, key: &[u8]) -> Result<bool> {
        self.with(py, |kv| kv.remove(key))
    }

    /// Every key.
    fn keys<'py>(&self, py: Python<'py>) -> Result<Vec<Bound<'py, PyBytes>>> {
        let ks = self.with(py, |kv| kv.keys())?;
        Ok(ks.iter().map(|k| PyBytes::new(py, k)).collect())
    }

    /// Removes every key.
    fn clear(&self, py: Python<'_>) -> Result<()> {
        self.with(py, |kv| kv.clear())
    }

    fn __len__(&self, py: Python<'_>) -> Result<usize> {
        self.with(py, |kv| Ok(kv.len() as usize))
    }

    /// Refuses (True) or allows (False) writes.
    fn set_frozen(&self, py: Python<'_>, yes: bool) -> Result<()> {
        self.with(py, |kv| kv.set_frozen(yes))
    }

    /// Whether writes are refused.
    #[getter]
    fn frozen(&self, py: Python<'_>) -> Result<bool> {
        self.with(py, |kv| Ok(kv.is_frozen()))
    }

    /// count, bytes, capacity, puts, gets, misses, frozen, pool_used, pool_capacity.
    fn stats<'py>(&self, py: Python<'py>) -> Result<Bound<'py, PyDict>> {
        let (s, ps) = self.with(py, |kv| Ok((kv.stats(), kv.pool().stats())))?;
        let d = PyDict::new(py);
        d.set_item("count", s.count)?;
        d.set_item("bytes", s.bytes)?;
        d.set_item("capacity", s.capacity)?;
        d.set_item("puts", s.puts)?;
        d.set_item("gets", s.gets)?;
        d.set_item("misses", s.misses)?;
        d.set_item("frozen", s.frozen)?;
        d.set_item("change_waiters", s.change_waiters)?;
        d.set_item("pool_used", ps.used)?;
        d.set_item("pool_capacity", ps.capacity)?;
        d.set_item("pool_holds", ps.holds)?;
        Ok(d)
    }

    /// Frees every key and value and the index itself (readers' views stay valid).
    fn destroy(&self, py: Python<'_>) -> Result<()> {
        let kv = self.take_lock(py, Option::take);
        match kv {
            Some(kv) => Ok(py.detach(|| kv.destroy())?),
            None => Ok(()),
        }
    }

    /// Drops this handle (the index stays).
    fn detach(&self, py: Python<'_>) {
        self.take_lock(py, Option::take);
    }
}
