//! `Pool` and `Block`: heap pool segments and holds on their blocks, and the `parts` layout
//! several buffers are copied into one block with.

use std::time::Duration;

use dragon_shm::heap::{AllocError, Block, Pool};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use crate::blocking::timeout_of;
use crate::errors::{Class, Error, Result};
use crate::segment::{parse_name, ref_of, ref_tuple, RefTuple};

/// A heap pool segment; blocks of it are shared by every process of the node.
#[pyclass(frozen, module = "dragon._native", name = "Pool")]
pub(crate) struct PyPool {
    pub(crate) inner: Pool,
}

#[pymethods]
impl PyPool {
    /// Creates a pool segment `name` of `size` bytes; it is removed when the last handle of
    /// the creating process goes.
    #[staticmethod]
    fn create(name: &str, size: usize) -> Result<Self> {
        let inner = Pool::create(&parse_name(name)?, size)?;
        Ok(PyPool { inner })
    }

    /// Opens an existing pool segment.
    #[staticmethod]
    fn open(name: &str) -> Result<Self> {
        let inner = open_pool(name)?;
        Ok(PyPool { inner })
    }

    /// The segment name.
    #[getter]
    fn name(&self) -> String {
        self.inner.name().to_string()
    }

    /// Allocates `size` bytes (PoolFullError, a MemoryError, when it does not fit now), or
    /// waits up to `timeout` seconds for room (DragonTimeoutError).
    #[pyo3(signature = (size, timeout=None))]
    fn alloc(&self, py: Python<'_>, size: usize, timeout: Option<f64>) -> Result<PyBlock> {
        let t = timeout_of(timeout)?;
        let p = &self.inner;
        let b = match t {
            None => p.alloc(size),
            Some(t) => py.detach(|| p.alloc_timeout(size, Some(t))),
        };
        Ok(PyBlock {
            inner: b?,
            readonly: false,
        })
    }

    /// Copies `parts` (C-contiguous buffers) into one new block in the layout
    /// `dragon._parts` reads (`n: u32, 0: u32, len: u64 x n`, then each part at the next
    /// 64-byte boundary), with the GIL released. PoolFullError when it does not fit now, or
    /// waits up to `timeout` seconds for room (DragonTimeoutError); DragonValueError when it
    /// never fits.
    #[pyo3(signature = (parts, timeout=None))]
    fn alloc_parts(
        &self,
        py: Python<'_>,
        parts: Vec<pyo3::buffer::PyBuffer<u8>>,
        timeout: Option<f64>,
    ) -> Result<PyBlock> {
        let t = timeout_of(timeout)?;
        let b = parts_block(py, &self.inner, &parts, t)?;
        Ok(PyBlock {
            inner: b,
            readonly: false,
        })
    }

    /// Drops a hold made with `Block.keep()`.
    fn release_kept(&self, r: RefTuple) -> Result<()> {
        Ok(self.inner.release_transit(ref_of(r))?)
    }

    /// Capacity, used, free, largest free block, block and hold counts.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.stats();
        let d = PyDict::new(py);
        d.set_item("capacity", s.capacity)?;
        d.set_item("used", s.used)?;
        d.set_item("free", s.free)?;
        d.set_item("largest_free", s.largest_free)?;
        d.set_item("blocks", s.blocks)?;
        d.set_item("free_blocks", s.free_blocks)?;
        d.set_item("holds", s.holds)?;
        d.set_item("processes", s.processes)?;
        Ok(d)
    }

    /// `(used, capacity)` in bytes, cheaply (`stats` walks every block).
    fn usage(&self) -> (u64, u64) {
        self.inner.usage()
    }

    /// Removes the pool's name now (from any process): nobody can open it any more, while
    /// every mapping (this handle, its blocks, other processes' handles) stays valid until
    /// it goes. This handle then never removes the name again, so a pool made later under
    /// the same name is left alone.
    fn unlink(&self) -> Result<()> {
        Ok(self.inner.segment().unlink()?)
    }

    /// Releases every hold of dead processes; returns how many processes were swept.
    fn sweep(&self) -> usize {
        self.inner.sweep()
    }

    /// Checks the pool's internal consistency (raises RuntimeError when broken).
    fn verify(&self) -> Result<()> {
        self.inner.verify().map_err(Error::runtime)
    }

    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyTuple>> {
        let open = slf.getattr("open")?;
        (open, (slf.get().inner.name().to_string(),)).into_pyobject(slf.py())
    }

    fn __repr__(&self) -> String {
        format!("<dragon._native.Pool {}>", self.inner.name())
    }
}

/// One hold on a block of a pool; the buffer protocol exposes its bytes (writable, except
/// for DDict values, which are read-only).
#[pyclass(frozen, module = "dragon._native", name = "Block")]
pub(crate) struct PyBlock {
    pub(crate) inner: Block,
    pub(crate) readonly: bool,
}

#[pymethods]
impl PyBlock {
    /// Takes a new hold on the block `ref` (segment, offset, len, gen) of `pool`.
    #[staticmethod]
    fn attach(pool: &PyPool, r: RefTuple) -> Result<Self> {
        // SAFETY: Rust never borrows a PyBlock's bytes mutably (the class is frozen: only
        // `&Block`); Python reaches them through the buffer protocol (raw pointer).
        let inner = unsafe { pool.inner.block(ref_of(r)) }?;
        Ok(PyBlock {
            inner,
            readonly: false,
        })
    }

    /// The handle other processes attach with.
    #[getter]
    fn r#ref(&self) -> RefTuple {
        ref_tuple(self.inner.block_ref())
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    /// Whether the buffer is exported read-only.
    #[getter]
    fn readonly(&self) -> bool {
        self.readonly
    }

    /// Adds a hold that belongs to no process (it survives every handle and process death)
    /// until `Pool.release_kept(ref)`; for objects that must live as long as their owner
    /// structure, such as a DDict manager's lock.
    fn keep(&self) -> Result<RefTuple> {
        // SAFETY: Rust never borrows a PyBlock's bytes mutably (the class is frozen: only
        // `&Block`); Python reaches them through the buffer protocol (raw pointer), outside Rust
        // borrows.
        let b = unsafe { self.inner.try_clone() }?;
        Ok(b.into_transit().map(ref_tuple)?)
    }

    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut pyo3::ffi::Py_buffer,
        flags: std::os::raw::c_int,
    ) -> PyResult<()> {
        let b = &slf.get().inner;
        // SAFETY: the block's memory stays mapped and held while the exporter (`slf`, whose
        // reference the view keeps) lives; `view` is the buffer struct CPython passed in.
        let r = unsafe {
            pyo3::ffi::PyBuffer_FillInfo(
                view,
                slf.as_ptr(),
                b.as_ptr().cast(),
                b.len() as isize,
                i32::from(slf.get().readonly),
                flags,
            )
        };
        if r == -1 {
            return Err(PyErr::fetch(slf.py()));
        }
        Ok(())
    }
}

/// The block `r` of the pool named `pool_name` (a new hold on it): what an object's
/// "attach" recipe names.
/// Opens the pool `name` for this process. A pool of another node of this process's
/// runtime is refused (`CrossNodeError`): on emulated nodes it would open (they share
/// `/dev/shm`), but nodes on separate hosts cannot reach each other's memory. The shared
/// objects in such a pool are reached through that node's object server instead
/// (`dragon._remote`); a raw pool or block is not.
pub(crate) fn open_pool(name: &str) -> Result<Pool> {
    let seg = parse_name(name)?;
    let here = std::env::var("DRAGON_RUNTIME").ok().and_then(|v| {
        let mut f = v.split(':').skip(1);
        let rt = u64::from_str_radix(f.next()?, 16).ok()?;
        let node = f.next()?.parse::<u32>().ok()?;
        Some((rt, node))
    });
    if let Some((rt, node)) = here {
        if seg.runtime == rt && seg.node != node {
            return Err(Error::Raise(
                Class::CrossNode,
                format!(
                    "{name} was made on node {} and this process runs on node {node}: a pool \
                     and its raw blocks are memory of their node (queues, locks, events, \
                     values, arrays and DDicts work across nodes; a Pool or Block does not)",
                    seg.node
                ),
            ));
        }
    }
    Ok(Pool::open(&seg)?)
}

pub(crate) fn block_of(pool_name: &str, r: RefTuple) -> Result<Block> {
    let pool = open_pool(pool_name)?;
    // SAFETY: every caller hands the handle straight to a channel or sync object (see the
    // callers of `block_of`), which never lends its block mutably, or (the fast object
    // server's `Obj::Block`) only ever copies bytes through `Block::as_ptr`.
    Ok(unsafe { pool.block(ref_of(r)) }?)
}

/// Copies `parts` into one new block of `pool`, laid out as `n: u32, 0: u32, len: u64 x n`,
/// then each part at the next 64-byte boundary (what `dragon._parts` reads back).
pub(crate) fn parts_block(
    py: Python<'_>,
    pool: &Pool,
    parts: &[pyo3::buffer::PyBuffer<u8>],
    timeout: Option<Duration>,
) -> std::result::Result<Block, AllocError> {
    let mut spans = Vec::with_capacity(parts.len());
    for b in parts {
        if !b.is_c_contiguous() {
            return Err(AllocError::BadRef);
        }
        spans.push((b.buf_ptr() as usize, b.len_bytes()));
    }
    let head = align64(8 + 8 * spans.len());
    let total = spans.iter().fold(head, |acc, (_, l)| acc + align64(*l));
    let mut block = match timeout {
        None => pool.alloc(total.max(1)),
        Some(t) => py.detach(|| pool.alloc_timeout(total.max(1), Some(t))),
    }?;
    py.detach(|| {
        let dst = block.as_mut_slice();
        dst[0..4].copy_from_slice(&(spans.len() as u32).to_le_bytes());
        dst[4..8].copy_from_slice(&0u32.to_le_bytes());
        let mut off = head;
        for (i, (ptr, len)) in spans.iter().enumerate() {
            dst[8 + 8 * i..16 + 8 * i].copy_from_slice(&(*len as u64).to_le_bytes());
            // SAFETY: `ptr`/`len` describe a C-contiguous buffer exported by `parts`, which
            // keeps the export alive until this call returns; the destination range lies
            // inside the block (total counts every part).
            let src = unsafe { std::slice::from_raw_parts(*ptr as *const u8, *len) };
            dst[off..off + len].copy_from_slice(src);
            off += align64(*len);
        }
    });
    Ok(block)
}

fn align64(n: usize) -> usize {
    n.div_ceil(64) * 64
}
