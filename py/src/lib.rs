//! `dragon._native`: Python bindings of the Dragon-RS shared-memory layer.
//!
//! Every blocking call releases the GIL and waits in slices, checking for signals between
//! them (and waking at once when a signal interrupts the futex), so Ctrl-C raises
//! `KeyboardInterrupt` promptly. Objects pickle to "attach" recipes (pool name + block
//! handle), so a process started any way (spawn, fork, the launcher) can use them.

mod cluster;
mod logging;
mod packet;

use std::time::{Duration, Instant};

use dragon_shm::channel::{Channel, ChannelError, Message};
use dragon_shm::heap::{AllocError, Block, BlockRef, Pool};
use dragon_shm::sync::{self, SyncError, WaitOpts};
use dragon_shm::waitqueue::default_spin;
use dragon_shm::{SegmentError, SegmentKind, SegmentName};
use pyo3::exceptions::{
    PyAssertionError, PyEOFError, PyMemoryError, PyOSError, PyRuntimeError, PyTimeoutError,
    PyValueError,
};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyTuple};

/// Longest stretch a blocking call waits without looking at Python's signal handlers.
const SIGNAL_SLICE: Duration = Duration::from_millis(100);

// ----- errors -------------------------------------------------------------------------

fn py_exc(py: Python<'_>, module: &str, name: &str, msg: String) -> PyErr {
    match py.import(module).and_then(|m| m.getattr(name)) {
        Ok(t) => PyErr::from_type(t.cast_into().expect("exception type"), msg),
        Err(e) => e,
    }
}

fn seg_err(e: SegmentError) -> PyErr {
    match e {
        SegmentError::Os(errno) => {
            PyOSError::new_err((errno as i32, format!("shared memory: {}", errno.desc())))
        }
        e => PyValueError::new_err(e.to_string()),
    }
}

fn alloc_err(e: AllocError) -> PyErr {
    match e {
        AllocError::Full | AllocError::HoldTableFull | AllocError::ProcessTableFull => {
            PyMemoryError::new_err(format!("dragon pool: {e}"))
        }
        AllocError::TooLarge | AllocError::ZeroSize | AllocError::BadRef => {
            PyValueError::new_err(format!("dragon pool: {e}"))
        }
        AllocError::TimedOut => PyTimeoutError::new_err("timed out waiting for pool space"),
        AllocError::Interrupted => PyRuntimeError::new_err("interrupted"),
        AllocError::Segment(e) => seg_err(e),
    }
}

fn chan_err(py: Python<'_>, e: ChannelError) -> PyErr {
    match e {
        ChannelError::Full => py_exc(py, "queue", "Full", "channel is full".into()),
        ChannelError::Empty => py_exc(py, "queue", "Empty", "channel is empty".into()),
        ChannelError::Closed => PyEOFError::new_err("channel is closed"),
        ChannelError::TimedOut => PyTimeoutError::new_err("timed out"),
        ChannelError::PeerLost => PyEOFError::new_err("a peer of the channel died"),
        ChannelError::TooLarge => PyValueError::new_err("message too large for this channel"),
        ChannelError::Alloc(e) => alloc_err(e),
        ChannelError::Segment(e) => seg_err(e),
        e => PyRuntimeError::new_err(e.to_string()),
    }
}

fn sync_err(py: Python<'_>, e: SyncError) -> PyErr {
    match e {
        SyncError::TimedOut => PyTimeoutError::new_err("timed out"),
        SyncError::Broken => py_exc(py, "threading", "BrokenBarrierError", String::new()),
        SyncError::Overflow => PyValueError::new_err("released too many times"),
        SyncError::NotOwner => PyAssertionError::new_err("attempt to release a lock not owned"),
        SyncError::NotHeld => PyValueError::new_err("release of an unlocked lock"),
        SyncError::BadLayout(what) => PyValueError::new_err(format!("not a dragon object: {what}")),
        SyncError::Alloc(e) => alloc_err(e),
        SyncError::Interrupted => PyRuntimeError::new_err("interrupted"),
    }
}

// ----- blocking -----------------------------------------------------------------------

fn timeout_of(t: Option<f64>) -> PyResult<Option<Duration>> {
    match t {
        None => Ok(None),
        Some(s) if s.is_nan() => Err(PyValueError::new_err("timeout must be a number")),
        Some(s) => Ok(Some(Duration::from_secs_f64(s.max(0.0)))),
    }
}

/// The outcome of one wait slice, as the blocking loop sees it.
enum Slice<T> {
    Done(T),
    /// The slice ended without result (time-out or signal): check signals, go on.
    Again,
}

/// Runs `op` with the GIL released in slices of at most [`SIGNAL_SLICE`], checking Python's
/// signal handlers between slices, until it finishes or `timeout` passes. `op` gets the
/// wait options of one slice and says whether it finished.
fn blocking<T, F>(py: Python<'_>, timeout: Option<Duration>, op: F) -> PyResult<Option<T>>
where
    F: Fn(&WaitOpts) -> Slice<T> + Sync,
    T: Send,
{
    let end = timeout.map(|t| Instant::now() + t);
    let mut first = true;
    loop {
        let now = Instant::now();
        let slice_end = now + SIGNAL_SLICE;
        let deadline = match end {
            Some(e) if e <= slice_end => e,
            _ => slice_end,
        };
        let opts = WaitOpts {
            deadline: Some(deadline),
            spin: if first {
                default_spin()
            } else {
                Duration::ZERO
            },
            interruptible: true,
            poll_every: None,
        };
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

fn align64(n: usize) -> usize {
    n.div_ceil(64) * 64
}

/// Waits for a sync operation in signal-aware slices: time-outs and signals retry, any other
/// error is raised. `None` when `timeout` passed.
fn sync_wait<T: Send>(
    py: Python<'_>,
    timeout: Option<Duration>,
    op: impl Fn(&WaitOpts) -> Result<T, SyncError> + Sync,
) -> PyResult<Option<T>> {
    let r = blocking(py, timeout, |o| match op(o) {
        Err(SyncError::TimedOut) | Err(SyncError::Interrupted) => Slice::Again,
        r => Slice::Done(r),
    })?;
    r.transpose().map_err(|e| sync_err(py, e))
}

/// `acquire(block, timeout)` of the locks and semaphores: `got_it` is the result of one try
/// without waiting; then, when `block`, waits with `op`.
fn acquire_or_wait<T: Send>(
    py: Python<'_>,
    got_it: bool,
    block: bool,
    timeout: Option<f64>,
    op: impl Fn(&WaitOpts) -> Result<T, SyncError> + Sync,
) -> PyResult<bool> {
    if got_it {
        return Ok(true);
    }
    if !block {
        return Ok(false);
    }
    Ok(sync_wait(py, timeout_of(timeout)?, op)?.is_some())
}

// ----- names --------------------------------------------------------------------------

/// A fresh random runtime id (64 bits).
#[pyfunction]
fn random_runtime() -> u64 {
    dragon_shm::platform::random_u64()
}

/// The segment name `/dragon-<rt>-<node>-<kind>-<id>` (kind: "pool", "chan" or "raw").
#[pyfunction]
fn segment_name(runtime: u64, node: u32, kind: &str, id: u64) -> PyResult<String> {
    let kind = SegmentKind::from_word(kind)
        .ok_or_else(|| PyValueError::new_err(format!("unknown segment kind {kind:?}")))?;
    Ok(SegmentName::new(runtime, node, kind, id).to_string())
}

/// Names of this runtime's segments still present in /dev/shm.
#[pyfunction]
fn leftovers(runtime: u64) -> Vec<String> {
    dragon_shm::testing::leftovers(runtime)
        .iter()
        .map(|n| n.to_string())
        .collect()
}

fn parse_name(name: &str) -> PyResult<SegmentName> {
    SegmentName::parse(name)
        .map_err(|_| PyValueError::new_err(format!("not a Dragon-RS segment name: {name}")))
}

fn ref_tuple(r: BlockRef) -> (u64, u64, u64, u32) {
    (r.segment, r.offset, r.len, r.gen)
}

fn ref_of(t: (u64, u64, u64, u32)) -> BlockRef {
    BlockRef {
        segment: t.0,
        offset: t.1,
        len: t.2,
        gen: t.3,
        _pad: 0,
    }
}

// ----- Pool and Block -----------------------------------------------------------------

/// A heap pool segment; blocks of it are shared by every process of the node.
#[pyclass(frozen, module = "dragon._native", name = "Pool")]
struct PyPool {
    inner: Pool,
}

#[pymethods]
impl PyPool {
    /// Creates a pool segment `name` of `size` bytes; it is removed when the last handle of
    /// the creating process goes.
    #[staticmethod]
    fn create(name: &str, size: usize) -> PyResult<Self> {
        let inner = Pool::create(&parse_name(name)?, size).map_err(seg_err)?;
        Ok(PyPool { inner })
    }

    /// Opens an existing pool segment.
    #[staticmethod]
    fn open(name: &str) -> PyResult<Self> {
        let inner = Pool::open(&parse_name(name)?).map_err(seg_err)?;
        Ok(PyPool { inner })
    }

    /// The segment name.
    #[getter]
    fn name(&self) -> String {
        self.inner.name().to_string()
    }

    /// Allocates `size` bytes (MemoryError when it does not fit now), or waits up to
    /// `timeout` seconds for room (TimeoutError).
    #[pyo3(signature = (size, timeout=None))]
    fn alloc(&self, py: Python<'_>, size: usize, timeout: Option<f64>) -> PyResult<PyBlock> {
        let t = timeout_of(timeout)?;
        let p = &self.inner;
        let b = match t {
            None => p.alloc(size),
            Some(t) => py.detach(|| p.alloc_timeout(size, Some(t))),
        };
        Ok(PyBlock {
            inner: b.map_err(alloc_err)?,
            readonly: false,
        })
    }

    /// Copies `parts` (C-contiguous buffers) into one new block in the layout
    /// `dragon._parts` reads (`n: u32, 0: u32, len: u64 x n`, then each part at the next
    /// 64-byte boundary), with the GIL released. MemoryError when it does not fit now, or
    /// waits up to `timeout` seconds for room (TimeoutError); ValueError when it never fits.
    #[pyo3(signature = (parts, timeout=None))]
    fn alloc_parts(
        &self,
        py: Python<'_>,
        parts: Vec<pyo3::buffer::PyBuffer<u8>>,
        timeout: Option<f64>,
    ) -> PyResult<PyBlock> {
        let t = timeout_of(timeout)?;
        let b = parts_block(py, &self.inner, &parts, t).map_err(alloc_err)?;
        Ok(PyBlock {
            inner: b,
            readonly: false,
        })
    }

    /// Drops a hold made with `Block.keep()`.
    fn release_kept(&self, r: (u64, u64, u64, u32)) -> PyResult<()> {
        self.inner.release_transit(ref_of(r)).map_err(alloc_err)
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

    /// Releases every hold of dead processes; returns how many processes were swept.
    fn sweep(&self) -> usize {
        self.inner.sweep()
    }

    /// Checks the pool's internal consistency (raises RuntimeError when broken).
    fn verify(&self) -> PyResult<()> {
        self.inner.verify().map_err(PyRuntimeError::new_err)
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
struct PyBlock {
    inner: Block,
    readonly: bool,
}

#[pymethods]
impl PyBlock {
    /// Takes a new hold on the block `ref` (segment, offset, len, gen) of `pool`.
    #[staticmethod]
    fn attach(pool: &PyPool, r: (u64, u64, u64, u32)) -> PyResult<Self> {
        Ok(PyBlock {
            inner: pool.inner.block(ref_of(r)).map_err(alloc_err)?,
            readonly: false,
        })
    }

    /// The handle other processes attach with.
    #[getter]
    fn r#ref(&self) -> (u64, u64, u64, u32) {
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
    fn keep(&self) -> PyResult<(u64, u64, u64, u32)> {
        let b = self.inner.try_clone().map_err(alloc_err)?;
        b.into_transit().map(ref_tuple).map_err(alloc_err)
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

/// Copies `parts` into one new block of `pool`, laid out as `n: u32, 0: u32, len: u64 x n`,
/// then each part at the next 64-byte boundary (what `dragon._parts` reads back).
fn parts_block(
    py: Python<'_>,
    pool: &Pool,
    parts: &[pyo3::buffer::PyBuffer<u8>],
    timeout: Option<Duration>,
) -> Result<Block, AllocError> {
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

// ----- Channel ------------------------------------------------------------------------

/// A bounded MPMC channel in a pool block: bytes in, bytes out, across processes.
#[pyclass(frozen, module = "dragon._native", name = "Channel")]
struct PyChannel {
    inner: Channel,
    pool_name: String,
}

impl PyChannel {
    /// The next message: one try, then signal-aware waits up to `timeout` seconds.
    fn next_message(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Message> {
        let ch = &self.inner;
        let r = match ch.try_recv() {
            Err(ChannelError::Empty) => {
                blocking(py, timeout_of(timeout)?, |o| match ch.recv_opts(o) {
                    Err(ChannelError::TimedOut) | Err(ChannelError::Interrupted) => Slice::Again,
                    r => Slice::Done(r),
                })?
                .unwrap_or(Err(ChannelError::Empty))
            }
            r => r,
        };
        r.map_err(|e| chan_err(py, e))
    }
}

#[pymethods]
impl PyChannel {
    /// Creates a channel of `capacity` messages in `pool`; messages up to `slot_size`
    /// bytes travel inline, larger ones through a pool block (one copy in, none out).
    #[staticmethod]
    #[pyo3(signature = (pool, capacity, slot_size=1024))]
    fn create(pool: &PyPool, capacity: u64, slot_size: usize) -> PyResult<Self> {
        Python::attach(|py| {
            let inner = Channel::create_in(&pool.inner, capacity, slot_size)
                .map_err(|e| chan_err(py, e))?;
            Ok(PyChannel {
                inner,
                pool_name: pool.inner.name().to_string(),
            })
        })
    }

    /// Attaches to the channel `ref` of the pool named `pool_name`.
    #[staticmethod]
    fn attach(py: Python<'_>, pool_name: &str, r: (u64, u64, u64, u32)) -> PyResult<Self> {
        let pool = Pool::open(&parse_name(pool_name)?).map_err(seg_err)?;
        let b = pool.block(ref_of(r)).map_err(alloc_err)?;
        let inner = Channel::attach(b).map_err(|e| chan_err(py, e))?;
        Ok(PyChannel {
            inner,
            pool_name: pool_name.to_string(),
        })
    }

    /// The block handle of the channel.
    #[getter]
    fn r#ref(&self) -> (u64, u64, u64, u32) {
        ref_tuple(self.inner.block_ref().expect("block channel"))
    }

    /// Sends `data` (any bytes-like object), waiting up to `timeout` seconds for room
    /// (None: forever; raises queue.Full on time-out, EOFError when closed).
    #[pyo3(signature = (data, timeout=None))]
    fn send(&self, py: Python<'_>, data: &[u8], timeout: Option<f64>) -> PyResult<()> {
        let ch = &self.inner;
        match ch.try_send(data) {
            Err(ChannelError::Full) => {}
            r => return r.map_err(|e| chan_err(py, e)),
        }
        let r = blocking(py, timeout_of(timeout)?, |o| match ch.send_opts(data, o) {
            Err(ChannelError::TimedOut) | Err(ChannelError::Interrupted) => Slice::Again,
            r => Slice::Done(r),
        })?;
        match r {
            Some(r) => r.map_err(|e| chan_err(py, e)),
            None => Err(chan_err(py, ChannelError::Full)),
        }
    }

    /// Receives the next message as bytes, waiting up to `timeout` seconds (None: forever;
    /// raises queue.Empty on time-out, EOFError once closed and drained).
    #[pyo3(signature = (timeout=None))]
    fn recv<'py>(&self, py: Python<'py>, timeout: Option<f64>) -> PyResult<Bound<'py, PyBytes>> {
        let m = self.next_message(py, timeout)?;
        Ok(match m {
            Message::Inline(v) => PyBytes::new(py, &v),
            Message::Block(b) => PyBytes::new(py, b.as_slice()),
        })
    }

    /// Sends several byte buffers as one message in one pool block (the `parts` layout:
    /// `u32 count, u32 0, count x u64 length`, then each part at a 64-byte aligned offset).
    /// Each part is copied once, with the GIL released; the receiver gets the block itself
    /// (`recv_msg`) and can view the parts in place. Parts must be C-contiguous.
    #[pyo3(signature = (parts, timeout=None))]
    fn send_parts(
        &self,
        py: Python<'_>,
        parts: Vec<pyo3::buffer::PyBuffer<u8>>,
        timeout: Option<f64>,
    ) -> PyResult<()> {
        let t = timeout_of(timeout)?;
        let pool = self.inner.pool().map_err(|e| chan_err(py, e))?.clone();
        let block = parts_block(py, &pool, &parts, t).map_err(alloc_err)?;
        let ch = &self.inner;
        let slot = std::sync::Mutex::new(Some(block));
        let r = blocking(py, t, |o| {
            let Some(b) = slot.lock().expect("not poisoned").take() else {
                return Slice::Done(Err(ChannelError::Corrupt));
            };
            match ch.send_block_opts(b, o) {
                Ok(()) => Slice::Done(Ok(())),
                Err(e) => {
                    let again =
                        matches!(e.error, ChannelError::TimedOut | ChannelError::Interrupted);
                    *slot.lock().expect("not poisoned") = Some(e.value);
                    if again {
                        Slice::Again
                    } else {
                        Slice::Done(Err(e.error))
                    }
                }
            }
        })?;
        match r {
            Some(r) => r.map_err(|e| chan_err(py, e)),
            None => Err(chan_err(py, ChannelError::Full)),
        }
    }

    /// Receives the next message: bytes for an inline one, a Block for a block one (its
    /// memory viewed in place). Time-outs and closing as for `recv`.
    #[pyo3(signature = (timeout=None))]
    fn recv_msg(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Py<PyAny>> {
        let m = self.next_message(py, timeout)?;
        Ok(match m {
            Message::Inline(v) => PyBytes::new(py, &v).into_any().unbind(),
            Message::Block(b) => Py::new(
                py,
                PyBlock {
                    inner: b,
                    readonly: false,
                },
            )?
            .into_any(),
        })
    }

    /// Closes the channel: sends fail with EOFError, receivers drain then get EOFError.
    fn close(&self) {
        self.inner.close();
    }

    /// Wakes every blocked sender and receiver with EOFError (a peer died).
    fn wake_all(&self) {
        self.inner.wake_all();
    }

    /// Messages waiting.
    fn __len__(&self) -> usize {
        self.inner.len() as usize
    }

    /// Capacity, depth, waiters, counts.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.stats();
        let d = PyDict::new(py);
        d.set_item("capacity", s.capacity)?;
        d.set_item("depth", s.depth)?;
        d.set_item("slot_size", s.slot_size)?;
        d.set_item("closed", s.closed)?;
        d.set_item("send_waiters", s.send_waiters)?;
        d.set_item("recv_waiters", s.recv_waiters)?;
        d.set_item("sent", s.sent)?;
        d.set_item("received", s.received)?;
        Ok(d)
    }

    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyTuple>> {
        let attach = slf.getattr("attach")?;
        let me = slf.get();
        (attach, (me.pool_name.clone(), me.r#ref())).into_pyobject(slf.py())
    }
}

// ----- sync objects -------------------------------------------------------------------

macro_rules! sync_common {
    ($py_ty:ident, $inner:ty, $pyname:literal) => {
        #[pymethods]
        impl $py_ty {
            /// Attaches to the object `ref` of the pool named `pool_name`.
            #[staticmethod]
            fn attach(py: Python<'_>, pool_name: &str, r: (u64, u64, u64, u32)) -> PyResult<Self> {
                let pool = Pool::open(&parse_name(pool_name)?).map_err(seg_err)?;
                let b = pool.block(ref_of(r)).map_err(alloc_err)?;
                Ok($py_ty {
                    inner: <$inner>::attach(b).map_err(|e| sync_err(py, e))?,
                    pool_name: pool_name.to_string(),
                })
            }

            /// The block handle of the object.
            #[getter]
            fn r#ref(&self) -> (u64, u64, u64, u32) {
                ref_tuple(self.inner.block_ref())
            }

            fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyTuple>> {
                let attach = slf.getattr("attach")?;
                let me = slf.get();
                (attach, (me.pool_name.clone(), me.r#ref())).into_pyobject(slf.py())
            }

            fn __repr__(&self) -> String {
                format!("<dragon._native.{} in {}>", $pyname, self.pool_name)
            }
        }
    };
}

/// A process-shared event flag.
#[pyclass(frozen, module = "dragon._native", name = "Event")]
struct PyEvent {
    inner: sync::Event,
    pool_name: String,
}
sync_common!(PyEvent, sync::Event, "Event");

#[pymethods]
impl PyEvent {
    /// A new event (clear) in `pool`.
    #[new]
    fn new(py: Python<'_>, pool: &PyPool) -> PyResult<Self> {
        let inner = sync::Event::create(&pool.inner).map_err(|e| sync_err(py, e))?;
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
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        if self.inner.is_set() {
            return Ok(true);
        }
        let ev = &self.inner;
        Ok(sync_wait(py, timeout_of(timeout)?, |o| ev.wait_with(o))?.is_some())
    }
}

/// A process-shared lock; a lock whose holder died is recovered by the next acquirer.
#[pyclass(frozen, module = "dragon._native", name = "Lock")]
struct PyLock {
    inner: sync::Lock,
    pool_name: String,
}
sync_common!(PyLock, sync::Lock, "Lock");

#[pymethods]
impl PyLock {
    /// A new, unlocked lock in `pool`.
    #[new]
    fn new(py: Python<'_>, pool: &PyPool) -> PyResult<Self> {
        let inner = sync::Lock::create(&pool.inner).map_err(|e| sync_err(py, e))?;
        Ok(PyLock {
            inner,
            pool_name: pool.inner.name().to_string(),
        })
    }
    /// Acquires; returns False on time-out (or when not blocking and held). `recovered()`
    /// afterwards says whether the previous holder died holding it.
    #[pyo3(signature = (block=true, timeout=None))]
    fn acquire(&self, py: Python<'_>, block: bool, timeout: Option<f64>) -> PyResult<bool> {
        let l = &self.inner;
        let now = l.acquire(false, None).is_some();
        acquire_or_wait(py, now, block, timeout, |o| l.acquire_with(o))
    }
    /// Acquires and returns whether the previous holder died holding the lock (None on
    /// time-out).
    #[pyo3(signature = (timeout=None))]
    fn acquire_recovering(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<bool>> {
        let l = &self.inner;
        sync_wait(py, timeout_of(timeout)?, |o| {
            l.acquire_with(o).map(|a| a.recovered)
        })
    }
    /// Releases (any process may; ValueError when not held).
    fn release(&self, py: Python<'_>) -> PyResult<()> {
        self.inner.release().map_err(|e| sync_err(py, e))
    }
    /// Whether somebody holds it.
    fn is_locked(&self) -> bool {
        self.inner.is_locked()
    }
    fn __enter__(&self, py: Python<'_>) -> PyResult<bool> {
        self.acquire(py, true, None)
    }
    fn __exit__(
        &self,
        py: Python<'_>,
        _t: Option<Bound<'_, PyAny>>,
        _v: Option<Bound<'_, PyAny>>,
        _tb: Option<Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        self.release(py)
    }
}

/// A process-shared counting semaphore (`bounded=True`: releasing above the initial value
/// raises ValueError).
#[pyclass(frozen, module = "dragon._native", name = "Semaphore")]
struct PySemaphore {
    inner: sync::Semaphore,
    pool_name: String,
}
sync_common!(PySemaphore, sync::Semaphore, "Semaphore");

#[pymethods]
impl PySemaphore {
    /// A new semaphore with `value` units in `pool`.
    #[new]
    #[pyo3(signature = (pool, value=1))]
    fn new(py: Python<'_>, pool: &PyPool, value: u32) -> PyResult<Self> {
        let inner = sync::Semaphore::create(&pool.inner, value).map_err(|e| sync_err(py, e))?;
        Ok(PySemaphore {
            inner,
            pool_name: pool.inner.name().to_string(),
        })
    }
    /// Takes one unit; False on time-out or when not blocking and none is free.
    #[pyo3(signature = (block=true, timeout=None))]
    fn acquire(&self, py: Python<'_>, block: bool, timeout: Option<f64>) -> PyResult<bool> {
        let s = &self.inner;
        acquire_or_wait(py, s.acquire(false, None), block, timeout, |o| {
            s.acquire_with(o)
        })
    }
    /// Returns `n` units.
    #[pyo3(signature = (n=1))]
    fn release(&self, py: Python<'_>, n: u32) -> PyResult<()> {
        self.inner.release_n(n).map_err(|e| sync_err(py, e))
    }
    /// Units free now.
    fn get_value(&self) -> u32 {
        self.inner.get_value()
    }
}

/// A process-shared recursive lock (owner = process + thread); a dead owner is recovered.
#[pyclass(frozen, module = "dragon._native", name = "RLock")]
struct PyRLock {
    inner: sync::RLock,
    pool_name: String,
}
sync_common!(PyRLock, sync::RLock, "RLock");

#[pymethods]
impl PyRLock {
    /// A new, unlocked recursive lock in `pool`.
    #[new]
    fn new(py: Python<'_>, pool: &PyPool) -> PyResult<Self> {
        let inner = sync::RLock::create(&pool.inner).map_err(|e| sync_err(py, e))?;
        Ok(PyRLock {
            inner,
            pool_name: pool.inner.name().to_string(),
        })
    }
    /// Acquires (again, when this thread owns it); False on time-out.
    #[pyo3(signature = (block=true, timeout=None))]
    fn acquire(&self, py: Python<'_>, block: bool, timeout: Option<f64>) -> PyResult<bool> {
        let l = &self.inner;
        let now = l.acquire(false, None).is_some();
        acquire_or_wait(py, now, block, timeout, |o| l.acquire_with(o))
    }
    /// Releases one level (AssertionError when this thread does not own it, as
    /// multiprocessing.RLock does).
    fn release(&self, py: Python<'_>) -> PyResult<()> {
        self.inner.release().map_err(|e| match e {
            SyncError::NotHeld => sync_err(py, SyncError::NotOwner),
            e => sync_err(py, e),
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
    fn __enter__(&self, py: Python<'_>) -> PyResult<bool> {
        self.acquire(py, true, None)
    }
    fn __exit__(
        &self,
        py: Python<'_>,
        _t: Option<Bound<'_, PyAny>>,
        _v: Option<Bound<'_, PyAny>>,
        _tb: Option<Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        self.release(py)
    }
}

/// A process-shared bounded semaphore: releasing above the initial value raises ValueError.
#[pyclass(frozen, module = "dragon._native", name = "BoundedSemaphore")]
struct PyBoundedSemaphore {
    inner: sync::BoundedSemaphore,
    pool_name: String,
}
sync_common!(
    PyBoundedSemaphore,
    sync::BoundedSemaphore,
    "BoundedSemaphore"
);

#[pymethods]
impl PyBoundedSemaphore {
    /// A new bounded semaphore with `value` units in `pool`.
    #[new]
    #[pyo3(signature = (pool, value=1))]
    fn new(py: Python<'_>, pool: &PyPool, value: u32) -> PyResult<Self> {
        let inner =
            sync::BoundedSemaphore::create(&pool.inner, value).map_err(|e| sync_err(py, e))?;
        Ok(PyBoundedSemaphore {
            inner,
            pool_name: pool.inner.name().to_string(),
        })
    }
    /// Takes one unit; False on time-out or when not blocking and none is free.
    #[pyo3(signature = (block=true, timeout=None))]
    fn acquire(&self, py: Python<'_>, block: bool, timeout: Option<f64>) -> PyResult<bool> {
        let s = &self.inner;
        acquire_or_wait(py, s.acquire(false, None), block, timeout, |o| {
            s.acquire_with(o)
        })
    }
    /// Returns `n` units (ValueError above the initial value).
    #[pyo3(signature = (n=1))]
    fn release(&self, py: Python<'_>, n: u32) -> PyResult<()> {
        self.inner.release_n(n).map_err(|e| sync_err(py, e))
    }
    /// Units free now.
    fn get_value(&self) -> u32 {
        self.inner.get_value()
    }
}

/// A process-shared barrier for `parties` processes.
#[pyclass(frozen, module = "dragon._native", name = "Barrier")]
struct PyBarrier {
    inner: sync::Barrier,
    pool_name: String,
}
sync_common!(PyBarrier, sync::Barrier, "Barrier");

#[pymethods]
impl PyBarrier {
    /// A new barrier in `pool`.
    #[new]
    fn new(py: Python<'_>, pool: &PyPool, parties: u32) -> PyResult<Self> {
        let inner = sync::Barrier::create(&pool.inner, parties).map_err(|e| sync_err(py, e))?;
        Ok(PyBarrier {
            inner,
            pool_name: pool.inner.name().to_string(),
        })
    }
    /// Waits for all parties; returns this party's index (0..parties). A time-out breaks
    /// the barrier (threading.BrokenBarrierError for everyone).
    #[pyo3(signature = (timeout=None, action=None))]
    fn wait(
        &self,
        py: Python<'_>,
        timeout: Option<f64>,
        action: Option<Bound<'_, PyAny>>,
    ) -> PyResult<u32> {
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
            return Err(e);
        }
        let a = arrived.map_err(|e| sync_err(py, e))?;
        let r = blocking(py, t, |o| match b.poll_arrival(&a, o) {
            Err(SyncError::TimedOut) | Err(SyncError::Interrupted) => Slice::Again,
            r => Slice::Done(r),
        });
        match r {
            Ok(Some(r)) => r.map_err(|e| sync_err(py, e)),
            // Out of time: breaking the barrier unless it was released meanwhile.
            Ok(None) => b.cancel(&a).map_err(|e| sync_err(py, e)),
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

// ----- process launch -----------------------------------------------------------------

fn stdio_of(v: Option<i64>, is_stderr: bool) -> PyResult<dragon_runtime::spawn::Stdio> {
    use dragon_runtime::spawn::Stdio;
    Ok(match v {
        None => Stdio::Inherit,
        Some(-3) => Stdio::Null,
        Some(-2) if is_stderr => Stdio::Stdout,
        Some(fd) if fd >= 0 && fd <= i64::from(i32::MAX) => Stdio::Fd(fd as i32),
        Some(x) => {
            return Err(PyValueError::new_err(format!(
                "bad standard stream value {x}"
            )))
        }
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
fn spawn(
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
) -> PyResult<i32> {
    use dragon_runtime::spawn::{SpawnError, SpawnSpec};
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
    match py.detach(|| dragon_runtime::spawn::spawn(&spec)) {
        Ok(pid) => Ok(pid.as_raw()),
        Err(e @ SpawnError::NotFound(_)) | Err(e @ SpawnError::BadCwd(_)) => Err(
            pyo3::exceptions::PyFileNotFoundError::new_err(e.to_string()),
        ),
        Err(e @ SpawnError::BadArgument(_)) | Err(e @ SpawnError::BadCpu(_)) => {
            Err(PyValueError::new_err(e.to_string()))
        }
        Err(SpawnError::Os(what, errno)) => Err(PyOSError::new_err((
            errno as i32,
            format!("{what}: {}", errno.desc()),
        ))),
        Err(e) => Err(PyRuntimeError::new_err(e.to_string())),
    }
}

/// A pidfd for `pid`: a descriptor that polls readable once the process has exited.
#[pyfunction]
fn pidfd_open(pid: i32) -> PyResult<i32> {
    use std::os::fd::IntoRawFd;
    dragon_runtime::spawn::pidfd_open(pid)
        .map(|fd| fd.into_raw_fd())
        .map_err(|e| PyOSError::new_err((e as i32, format!("pidfd_open: {}", e.desc()))))
}

/// A copy of descriptor `fd` of the process behind `pidfd` (close-on-exec; needs ptrace
/// access to that process: same user).
#[pyfunction]
fn pidfd_getfd(pidfd: i32, fd: i32) -> PyResult<i32> {
    use std::os::fd::{BorrowedFd, IntoRawFd};
    if pidfd < 0 {
        return Err(PyValueError::new_err("bad pidfd"));
    }
    // SAFETY: the caller passes a pidfd it owns and keeps open for this call; we only
    // borrow it (try_clone_to_owned makes our own copy, closed when it drops).
    let borrowed = unsafe { BorrowedFd::borrow_raw(pidfd) };
    let owned = borrowed
        .try_clone_to_owned()
        .map_err(|e| PyOSError::new_err((e.raw_os_error().unwrap_or(0), e.to_string())))?;
    dragon_runtime::spawn::pidfd_getfd(&owned, fd)
        .map(|f| f.into_raw_fd())
        .map_err(|e| PyOSError::new_err((e as i32, format!("pidfd_getfd: {}", e.desc()))))
}

/// `(creator_pid, creator_alive)` of our segment `name` (with or without the leading `/`).
#[pyfunction]
fn segment_creator(name: &str) -> PyResult<(u32, bool)> {
    let n = parse_name(name)?;
    let i = dragon_shm::segment::inspect(&n).map_err(seg_err)?;
    Ok((i.creator.pid, i.creator_alive))
}

/// Makes this process the reaper of its orphaned descendants (`PR_SET_CHILD_SUBREAPER`).
#[pyfunction]
fn set_child_subreaper() -> PyResult<()> {
    dragon_runtime::spawn::set_child_subreaper()
        .map_err(|e| PyOSError::new_err((e as i32, format!("prctl: {}", e.desc()))))
}

/// Runs the `dragon-shm` command with `argv` (program name first); returns its exit code.
#[pyfunction]
fn shm_main(py: Python<'_>, argv: Vec<String>) -> i32 {
    py.detach(|| dragon_tools::run(argv))
}

/// Runs the `dragon-config` command with `args` (after the program name); returns its exit
/// code.
#[pyfunction]
fn config_main(py: Python<'_>, args: Vec<String>) -> i32 {
    py.detach(|| dragon_transport::config::config_main(&args))
}

// ----- node agent -----------------------------------------------------------------------

use dragon_runtime::agent::{Agent, AgentClient, ClientError};
use dragon_runtime::proto::{AgentError, IdKind, Launch, Reply, Request, StdioReq};

fn stdio_req(v: Option<i64>, is_stderr: bool) -> PyResult<StdioReq> {
    Ok(match v {
        None => StdioReq::Inherit,
        Some(-3) => StdioReq::Null,
        Some(-2) if is_stderr => StdioReq::Stdout,
        Some(fd) if fd >= 0 && fd <= i64::from(i32::MAX) => StdioReq::Fd(fd as i32),
        Some(x) => {
            return Err(PyValueError::new_err(format!(
                "bad standard stream value {x}"
            )))
        }
    })
}

fn agent_error(py: Python<'_>, e: AgentError) -> PyErr {
    use pyo3::exceptions::PyFileNotFoundError;
    match e {
        AgentError::NotFound(_) | AgentError::BadCwd(_) => {
            PyFileNotFoundError::new_err(e.to_string())
        }
        AgentError::BadArgument(_) => PyValueError::new_err(e.to_string()),
        AgentError::Os { errno, .. } => PyOSError::new_err((errno, e.to_string())),
        AgentError::NoSuchProcess(_) => py_exc(py, "builtins", "LookupError", e.to_string()),
        AgentError::Exists(_) => py_exc(py, "builtins", "KeyError", e.to_string()),
        AgentError::NoMemory(_) => PyMemoryError::new_err(e.to_string()),
        e => PyRuntimeError::new_err(e.to_string()),
    }
}

fn client_error(py: Python<'_>, e: ClientError) -> PyErr {
    match e {
        ClientError::Agent(a) => agent_error(py, a),
        ClientError::AgentGone => py_exc(
            py,
            "dragon._runtime",
            "RuntimeGone",
            "the Dragon runtime's node agent is gone (its launcher or script ended)".into(),
        ),
        ClientError::TimedOut => PyTimeoutError::new_err(e.to_string()),
        ClientError::Channel(c) => chan_err(py, c),
        ClientError::Protocol(s) => PyRuntimeError::new_err(s),
        e => PyRuntimeError::new_err(e.to_string()),
    }
}

#[allow(clippy::too_many_arguments)]
fn launch_of(
    argv: Vec<String>,
    env: Vec<(String, String)>,
    cwd: Option<String>,
    stdin: Option<i64>,
    stdout: Option<i64>,
    stderr: Option<i64>,
    cpus: Option<Vec<usize>>,
    new_group: bool,
    fd_map: Option<Vec<(i32, i32)>>,
    name: Option<String>,
) -> PyResult<Launch> {
    Ok(Launch {
        argv,
        env,
        cwd,
        stdin: stdio_req(stdin, false)?,
        stdout: stdio_req(stdout, false)?,
        stderr: stdio_req(stderr, true)?,
        cpus: cpus.unwrap_or_default(),
        new_group,
        fd_map: fd_map.unwrap_or_default(),
        name,
    })
}

/// The node agent, run by the launcher (or by the embedded runtime's agent process): it
/// creates the node pool and serves launch, status, id and registry requests on a thread.
#[pyclass(module = "dragon._native", name = "Agent")]
struct PyAgent {
    inner: Option<Agent>,
}

impl PyAgent {
    fn agent(&self) -> PyResult<&Agent> {
        self.inner
            .as_ref()
            .ok_or_else(|| PyValueError::new_err("the agent was shut down"))
    }
}

#[pymethods]
impl PyAgent {
    /// Creates the pool of `pool_size` bytes for runtime `runtime`, node `node`, and starts
    /// serving. Block the signals you handle before calling this.
    #[new]
    fn new(py: Python<'_>, runtime: u64, node: u32, pool_size: usize) -> PyResult<Self> {
        let a = py
            .detach(|| Agent::start(runtime, node, pool_size))
            .map_err(seg_err)?;
        Ok(PyAgent { inner: Some(a) })
    }

    /// The `DRAGON_RUNTIME` value for managed processes.
    fn env_value(&self) -> PyResult<String> {
        Ok(self.agent()?.env_value())
    }

    /// The node pool's name.
    #[getter]
    fn pool_name(&self) -> PyResult<String> {
        Ok(self.agent()?.pool().name().to_string())
    }

    /// Starts a process with this process's descriptors; returns `(puid, pid)`.
    #[pyo3(signature = (argv, env, cwd=None, stdin=None, stdout=None, stderr=None, cpus=None, new_group=true, name=None))]
    #[allow(clippy::too_many_arguments)]
    fn launch(
        &self,
        py: Python<'_>,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        cwd: Option<String>,
        stdin: Option<i64>,
        stdout: Option<i64>,
        stderr: Option<i64>,
        cpus: Option<Vec<usize>>,
        new_group: bool,
        name: Option<String>,
    ) -> PyResult<(u64, i32)> {
        let l = launch_of(
            argv, env, cwd, stdin, stdout, stderr, cpus, new_group, None, name,
        )?;
        let a = self.agent()?;
        py.detach(|| a.launch(l)).map_err(|e| agent_error(py, e))
    }

    /// Exit code of a launched process (None while it runs; negative: killed by a signal).
    fn status(&self, py: Python<'_>, puid: u64) -> PyResult<Option<i32>> {
        self.agent()?.status(puid).map_err(|e| agent_error(py, e))
    }

    /// Reaps ended children; returns `[(puid, pid, exit_code)]` of launched ones.
    fn reap(&self) -> PyResult<Vec<(u64, i32, i32)>> {
        Ok(self.agent()?.reap())
    }

    /// Releases shared-memory holds of processes that died; returns how many.
    fn sweep(&self) -> PyResult<usize> {
        Ok(self.agent()?.pool().sweep())
    }

    /// Stops serving (waiting clients get an error) and removes the pool.
    fn shutdown(&mut self, py: Python<'_>) {
        if let Some(mut a) = self.inner.take() {
            py.detach(move || {
                a.stop();
                drop(a);
            });
        }
    }
}

/// A process's connection to its node agent (one per process; thread-safe).
#[pyclass(frozen, module = "dragon._native", name = "AgentClient")]
struct PyAgentClient {
    inner: AgentClient,
}

impl PyAgentClient {
    fn call(&self, py: Python<'_>, req: Request, timeout: Option<f64>) -> PyResult<Reply> {
        let t = timeout_of(timeout)?;
        let c = &self.inner;
        py.detach(|| c.call(req, t))
            .map_err(|e| client_error(py, e))
    }
}

fn unexpected(r: Reply) -> PyErr {
    PyRuntimeError::new_err(format!("unexpected agent reply {r:?}"))
}

#[pymethods]
impl PyAgentClient {
    /// Connects to the agent whose request channel is `chan` (the last field of
    /// `DRAGON_RUNTIME`) through the node pool `pool`.
    #[new]
    fn new(py: Python<'_>, pool: &PyPool, chan: &str) -> PyResult<Self> {
        let r = dragon_runtime::agent::parse_ref(chan).ok_or_else(|| {
            PyValueError::new_err(format!("bad agent channel reference {chan:?}"))
        })?;
        let p = pool.inner.clone();
        let inner = py
            .detach(|| AgentClient::connect(p, r))
            .map_err(|e| client_error(py, e))?;
        Ok(PyAgentClient { inner })
    }

    /// Starts a process: standard streams None (this process's), DEVNULL (-3), STDOUT (-2,
    /// stderr only) or a descriptor of this process; `fd_map` hands descriptors of this
    /// process to the child under other numbers. Returns `(puid, pid)`.
    #[pyo3(signature = (argv, env, cwd=None, stdin=None, stdout=None, stderr=None, cpus=None, new_group=true, fd_map=None, name=None))]
    #[allow(clippy::too_many_arguments)]
    fn launch(
        &self,
        py: Python<'_>,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        cwd: Option<String>,
        stdin: Option<i64>,
        stdout: Option<i64>,
        stderr: Option<i64>,
        cpus: Option<Vec<usize>>,
        new_group: bool,
        fd_map: Option<Vec<(i32, i32)>>,
        name: Option<String>,
    ) -> PyResult<(u64, i32)> {
        let l = launch_of(
            argv, env, cwd, stdin, stdout, stderr, cpus, new_group, fd_map, name,
        )?;
        match self.call(py, Request::Launch(l), None)? {
            Reply::Launched { puid, pid } => Ok((puid, pid)),
            r => Err(unexpected(r)),
        }
    }

    /// `(pid, exit_code)` of a launched process; exit_code is None while it runs.
    fn status(&self, py: Python<'_>, puid: u64) -> PyResult<(i32, Option<i32>)> {
        match self.call(py, Request::Status { puid }, None)? {
            Reply::Status { pid, exit_code } => Ok((pid, exit_code)),
            r => Err(unexpected(r)),
        }
    }

    /// Binds `name` in namespace `kind` to `value` (KeyError if taken, unless `replace`).
    #[pyo3(signature = (kind, name, value, replace=false))]
    fn register(
        &self,
        py: Python<'_>,
        kind: String,
        name: String,
        value: Vec<u8>,
        replace: bool,
    ) -> PyResult<()> {
        let req = Request::Register {
            kind,
            name,
            value,
            replace,
        };
        match self.call(py, req, None)? {
            Reply::Done => Ok(()),
            r => Err(unexpected(r)),
        }
    }

    /// The value bound to `name` in `kind`, or None.
    fn lookup<'py>(
        &self,
        py: Python<'py>,
        kind: String,
        name: String,
    ) -> PyResult<Option<Bound<'py, PyBytes>>> {
        match self.call(py, Request::Lookup { kind, name }, None)? {
            Reply::Value(v) => Ok(v.map(|v| PyBytes::new(py, &v))),
            r => Err(unexpected(r)),
        }
    }

    /// Removes a binding; returns its value or None.
    fn unregister<'py>(
        &self,
        py: Python<'py>,
        kind: String,
        name: String,
    ) -> PyResult<Option<Bound<'py, PyBytes>>> {
        match self.call(py, Request::Unregister { kind, name }, None)? {
            Reply::Value(v) => Ok(v.map(|v| PyBytes::new(py, &v))),
            r => Err(unexpected(r)),
        }
    }

    /// A fresh runtime-wide id: kind "p_uid", "c_uid", "m_uid" or "h_uid".
    fn new_id(&self, py: Python<'_>, kind: &str) -> PyResult<u64> {
        let kind = match kind {
            "p_uid" => IdKind::Process,
            "c_uid" => IdKind::Channel,
            "m_uid" => IdKind::Memory,
            "h_uid" => IdKind::Host,
            k => return Err(PyValueError::new_err(format!("unknown id kind {k:?}"))),
        };
        match self.call(py, Request::NewId { kind }, None)? {
            Reply::Id(i) => Ok(i),
            r => Err(unexpected(r)),
        }
    }

    /// Every process the agent launched: `[(puid, pid, exit_code, name)]`.
    #[allow(clippy::type_complexity)]
    fn processes(&self, py: Python<'_>) -> PyResult<Vec<(u64, i32, Option<i32>, Option<String>)>> {
        match self.call(py, Request::Processes, None)? {
            Reply::Processes(v) => Ok(v
                .into_iter()
                .map(|p| (p.puid, p.pid, p.exit_code, p.name))
                .collect()),
            r => Err(unexpected(r)),
        }
    }

    /// A new pool of `size` bytes owned by the agent (it lives until `destroy_pool` or the
    /// end of the runtime): `(m_uid, segment name)`.
    fn create_pool(&self, py: Python<'_>, size: u64) -> PyResult<(u64, String)> {
        match self.call(py, Request::CreatePool { size }, None)? {
            Reply::Pool { m_uid, name } => Ok((m_uid, name)),
            r => Err(unexpected(r)),
        }
    }

    /// Removes a pool made with `create_pool`.
    fn destroy_pool(&self, py: Python<'_>, m_uid: u64) -> PyResult<()> {
        match self.call(py, Request::DestroyPool { m_uid }, None)? {
            Reply::Done => Ok(()),
            r => Err(unexpected(r)),
        }
    }

    /// The agent's pid (a round trip: raises RuntimeGone when the agent is gone).
    #[pyo3(signature = (timeout=None))]
    fn ping(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<u32> {
        match self.call(py, Request::Ping, timeout)? {
            Reply::Pong(p) => Ok(p),
            r => Err(unexpected(r)),
        }
    }
}

// ----- DDict manager index --------------------------------------------------------------

use dragon_shm::kv::{Kv, KvError};

fn kv_err(py: Python<'_>, e: KvError) -> PyErr {
    match e {
        KvError::Full => py_exc(
            py,
            "dragon.data.ddict",
            "DDictFullError",
            "the DDict manager's memory is full (delete keys or make the DDict larger)".into(),
        ),
        KvError::Frozen => py_exc(
            py,
            "dragon.data.ddict",
            "DDictFrozenError",
            "the DDict is frozen (read-only): unfreeze() it to write".into(),
        ),
        KvError::Corrupt => PyRuntimeError::new_err("the DDict index is damaged or destroyed"),
        KvError::Alloc(a) => alloc_err(a),
    }
}

/// 64-bit FNV-1a of `data`: the stable hash DDict places keys by.
#[pyfunction]
fn stable_hash(data: &[u8]) -> u64 {
    dragon_shm::kv::stable_hash(data)
}

/// The index of one DDict manager: a hash map in shared memory whose keys and values are
/// blocks of the manager's pool. Values come back as read-only blocks that stay valid after
/// their key is replaced or deleted.
#[pyclass(frozen, module = "dragon._native", name = "Kv")]
struct PyKv {
    inner: std::sync::Mutex<Option<Kv>>,
}

impl PyKv {
    fn with<T>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&Kv) -> Result<T, KvError> + Send,
    ) -> PyResult<T>
    where
        T: Send,
    {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let kv = g
            .as_ref()
            .ok_or_else(|| PyValueError::new_err("the DDict was destroyed or detached"))?;
        py.detach(|| f(kv)).map_err(|e| kv_err(py, e))
    }
}

#[pymethods]
impl PyKv {
    /// Creates an empty index in `pool`.
    #[staticmethod]
    fn create(py: Python<'_>, pool: &PyPool) -> PyResult<Self> {
        let kv = py
            .detach(|| Kv::create(&pool.inner))
            .map_err(|e| kv_err(py, e))?;
        Ok(PyKv {
            inner: std::sync::Mutex::new(Some(kv)),
        })
    }

    /// Attaches to the index whose header block is `ref` in `pool`.
    #[staticmethod]
    fn attach(py: Python<'_>, pool: &PyPool, r: (u64, u64, u64, u32)) -> PyResult<Self> {
        let kv = Kv::attach(&pool.inner, ref_of(r)).map_err(|e| kv_err(py, e))?;
        Ok(PyKv {
            inner: std::sync::Mutex::new(Some(kv)),
        })
    }

    /// The header's block handle.
    #[getter]
    fn r#ref(&self, py: Python<'_>) -> PyResult<(u64, u64, u64, u32)> {
        self.with(py, |kv| Ok(ref_tuple(kv.header_ref())))
    }

    /// Stores `parts` (buffers, copied once into one block of the manager's pool, laid out
    /// as Channel.send_parts does) under `key`.
    fn put_parts(
        &self,
        py: Python<'_>,
        key: &[u8],
        parts: Vec<pyo3::buffer::PyBuffer<u8>>,
    ) -> PyResult<()> {
        let pool = {
            let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            g.as_ref()
                .ok_or_else(|| PyValueError::new_err("the DDict was destroyed or detached"))?
                .pool()
                .clone()
        };
        let block = parts_block(py, &pool, &parts, None).map_err(|e| kv_err(py, e.into()))?;
        self.with(py, move |kv| kv.put(key, block))
    }

    /// The value of `key` as a read-only Block (None when absent).
    fn get(&self, py: Python<'_>, key: &[u8]) -> PyResult<Option<PyBlock>> {
        Ok(self.with(py, |kv| kv.get(key))?.map(|b| PyBlock {
            inner: b,
            readonly: true,
        }))
    }

    /// Removes `key` and returns its value as a read-only Block (None when absent).
    fn take(&self, py: Python<'_>, key: &[u8]) -> PyResult<Option<PyBlock>> {
        Ok(self.with(py, |kv| kv.take(key))?.map(|b| PyBlock {
            inner: b,
            readonly: true,
        }))
    }

    /// Whether `key` is present.
    fn contains(&self, py: Python<'_>, key: &[u8]) -> PyResult<bool> {
        self.with(py, |kv| kv.contains(key))
    }

    /// Moves the value of `old` to `new` without copying (drops `old`'s entry when `new`
    /// exists); whether `old` existed.
    fn rekey(&self, py: Python<'_>, old: &[u8], new: &[u8]) -> PyResult<bool> {
        self.with(py, |kv| kv.rekey(old, new))
    }

    /// The checkpoint working set `(oldest, newest)`.
    fn chkpt_range(&self, py: Python<'_>) -> PyResult<(u64, u64)> {
        self.with(py, |kv| Ok(kv.chkpt_range()))
    }

    /// Records the checkpoint working set.
    fn set_chkpt_range(&self, py: Python<'_>, oldest: u64, newest: u64) -> PyResult<()> {
        self.with(py, |kv| {
            kv.set_chkpt_range(oldest, newest);
            Ok(())
        })
    }

    /// Removes `key`; whether it was there.
    fn remove(&self, py: Python<'_>, key: &[u8]) -> PyResult<bool> {
        self.with(py, |kv| kv.remove(key))
    }

    /// Every key.
    fn keys<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyBytes>>> {
        let ks = self.with(py, |kv| kv.keys())?;
        Ok(ks.iter().map(|k| PyBytes::new(py, k)).collect())
    }

    /// Removes every key.
    fn clear(&self, py: Python<'_>) -> PyResult<()> {
        self.with(py, |kv| kv.clear())
    }

    fn __len__(&self, py: Python<'_>) -> PyResult<usize> {
        self.with(py, |kv| Ok(kv.len() as usize))
    }

    /// Refuses (True) or allows (False) writes.
    fn set_frozen(&self, py: Python<'_>, yes: bool) -> PyResult<()> {
        self.with(py, |kv| {
            kv.set_frozen(yes);
            Ok(())
        })
    }

    /// Whether writes are refused.
    #[getter]
    fn frozen(&self, py: Python<'_>) -> PyResult<bool> {
        self.with(py, |kv| Ok(kv.is_frozen()))
    }

    /// count, bytes, capacity, puts, gets, misses, frozen, pool_used, pool_capacity.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let (s, ps) = self.with(py, |kv| Ok((kv.stats(), kv.pool().stats())))?;
        let d = PyDict::new(py);
        d.set_item("count", s.count)?;
        d.set_item("bytes", s.bytes)?;
        d.set_item("capacity", s.capacity)?;
        d.set_item("puts", s.puts)?;
        d.set_item("gets", s.gets)?;
        d.set_item("misses", s.misses)?;
        d.set_item("frozen", s.frozen)?;
        d.set_item("pool_used", ps.used)?;
        d.set_item("pool_capacity", ps.capacity)?;
        d.set_item("pool_holds", ps.holds)?;
        Ok(d)
    }

    /// Frees every key and value and the index itself (readers' views stay valid).
    fn destroy(&self, py: Python<'_>) -> PyResult<()> {
        let kv = self.inner.lock().unwrap_or_else(|e| e.into_inner()).take();
        match kv {
            Some(kv) => py.detach(|| kv.destroy()).map_err(|e| kv_err(py, e)),
            None => Ok(()),
        }
    }

    /// Drops this handle (the index stays).
    fn detach(&self) {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

/// This node's topology as a dict: `source` ("hwloc" or "sysfs"), `cpus` (usable logical
/// CPUs), `cores` (lists of CPUs), `numa_nodes` ([(os_index, cpus, memory bytes)]),
/// `physical_mem`, `packages`, `gpus` ([(vendor, pci_bus_id, index)]).
#[pyfunction]
fn topology(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    use dragon_runtime::topology::{detect, Source};
    let t = py.detach(detect);
    let d = PyDict::new(py);
    d.set_item(
        "source",
        match t.source {
            Source::Hwloc => "hwloc",
            Source::Sysfs => "sysfs",
        },
    )?;
    d.set_item("cpus", t.cpus.clone())?;
    d.set_item("cores", t.cores.clone())?;
    let numa: Vec<(usize, Vec<usize>, u64)> = t
        .numa_nodes
        .iter()
        .map(|n| (n.os_index, n.cpus.clone(), n.memory))
        .collect();
    d.set_item("numa_nodes", numa)?;
    d.set_item("physical_mem", t.physical_mem)?;
    d.set_item("packages", t.packages)?;
    let gpus: Vec<(String, String, usize)> = t
        .gpus
        .iter()
        .map(|g| (g.vendor.clone(), g.pci_bus_id.clone(), g.os_index))
        .collect();
    d.set_item("gpus", gpus)?;
    Ok(d)
}

/// The native module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    logging::register(m)?;
    cluster::register(m)?;
    m.add_function(wrap_pyfunction!(random_runtime, m)?)?;
    m.add_function(wrap_pyfunction!(segment_name, m)?)?;
    m.add_function(wrap_pyfunction!(leftovers, m)?)?;
    m.add_function(wrap_pyfunction!(spawn, m)?)?;
    m.add_function(wrap_pyfunction!(pidfd_open, m)?)?;
    m.add_function(wrap_pyfunction!(pidfd_getfd, m)?)?;
    m.add_function(wrap_pyfunction!(set_child_subreaper, m)?)?;
    m.add_function(wrap_pyfunction!(segment_creator, m)?)?;
    m.add_function(wrap_pyfunction!(shm_main, m)?)?;
    m.add_function(wrap_pyfunction!(config_main, m)?)?;
    m.add_class::<PyPool>()?;
    m.add_class::<PyBlock>()?;
    m.add_class::<PyChannel>()?;
    m.add_class::<PyEvent>()?;
    m.add_class::<PyLock>()?;
    m.add_class::<PySemaphore>()?;
    m.add_class::<PyBarrier>()?;
    m.add_class::<PyRLock>()?;
    m.add_class::<PyBoundedSemaphore>()?;
    m.add_class::<PyAgent>()?;
    m.add_class::<PyAgentClient>()?;
    m.add_class::<PyKv>()?;
    m.add_function(wrap_pyfunction!(stable_hash, m)?)?;
    m.add_function(wrap_pyfunction!(topology, m)?)?;
    m.add_function(wrap_pyfunction!(packet::packet_send, m)?)?;
    m.add_function(wrap_pyfunction!(packet::packet_recv, m)?)?;
    m.add_function(wrap_pyfunction!(packet::packet_poll, m)?)?;
    Ok(())
}
