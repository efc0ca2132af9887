//! `Channel`: a bounded MPMC channel in a pool block, bytes in and out, across processes.

use dragon_shm::channel::{Channel, ChannelError, Message};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyTuple};

use crate::blocking::{blocking, timeout_of, Slice};
use crate::errors::Result;
use crate::pool::{block_of, parts_block, PyBlock, PyPool};
use crate::segment::{ref_tuple, RefTuple};

/// A bounded MPMC channel in a pool block: bytes in, bytes out, across processes.
#[pyclass(frozen, module = "dragon._native", name = "Channel")]
pub(crate) struct PyChannel {
    inner: Channel,
    pool_name: String,
}

impl PyChannel {
    /// Sends `block` as one message, waiting (signal-aware) up to `t` for room; a block the
    /// channel did not take comes back for the next try.
    fn send_block_waiting(
        &self,
        py: Python<'_>,
        block: dragon_shm::heap::Block,
        t: Option<std::time::Duration>,
    ) -> Result<()> {
        let slot = std::sync::Mutex::new(Some(block));
        let r = blocking(py, t, |o| send_block_slice(&self.inner, &slot, o))?;
        Ok(r.unwrap_or(Err(ChannelError::Full))?)
    }

    /// The next message: one try, then signal-aware waits up to `timeout` seconds.
    fn next_message(&self, py: Python<'_>, timeout: Option<f64>) -> Result<Message> {
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
        Ok(r?)
    }
}

/// One wait slice of sending the block in `slot` as a message of `ch`: a block the channel
/// did not take goes back into `slot` for the next slice (the Python binding's waits and the
/// fast object server's share it).
pub(crate) fn send_block_slice(
    ch: &Channel,
    slot: &std::sync::Mutex<Option<dragon_shm::heap::Block>>,
    o: &dragon_shm::sync::WaitOpts,
) -> Slice<std::result::Result<(), ChannelError>> {
    let Some(b) = slot.lock().expect("not poisoned").take() else {
        return Slice::Done(Err(ChannelError::Corrupt));
    };
    match ch.send_block_opts(b, o) {
        Ok(()) => Slice::Done(Ok(())),
        Err(e) => {
            let again = matches!(e.error, ChannelError::TimedOut | ChannelError::Interrupted);
            *slot.lock().expect("not poisoned") = Some(e.value);
            if again {
                Slice::Again
            } else {
                Slice::Done(Err(e.error))
            }
        }
    }
}

#[pymethods]
impl PyChannel {
    /// Creates a channel of `capacity` messages in `pool`; messages up to `slot_size`
    /// bytes travel inline, larger ones through a pool block (one copy in, none out).
    #[staticmethod]
    #[pyo3(signature = (pool, capacity, slot_size=1024))]
    fn create(pool: &PyPool, capacity: u64, slot_size: usize) -> Result<Self> {
        let inner = Channel::create_in(&pool.inner, capacity, slot_size)?;
        Ok(PyChannel {
            inner,
            pool_name: pool.inner.name().to_string(),
        })
    }

    /// Attaches to the channel `ref` of the pool named `pool_name`.
    #[staticmethod]
    fn attach(pool_name: &str, r: RefTuple) -> Result<Self> {
        let inner = Channel::attach(block_of(pool_name, r)?)?;
        Ok(PyChannel {
            inner,
            pool_name: pool_name.to_string(),
        })
    }

    /// The block handle of the channel.
    #[getter]
    fn r#ref(&self) -> RefTuple {
        ref_tuple(self.inner.block_ref().expect("block channel"))
    }

    /// Sends `data` (any bytes-like object), waiting up to `timeout` seconds for room
    /// (None: forever; raises QueueFull, a queue.Full, on time-out, ChannelClosedError, an
    /// EOFError, when closed).
    #[pyo3(signature = (data, timeout=None))]
    fn send(
        &self,
        py: Python<'_>,
        data: pyo3::buffer::PyBuffer<u8>,
        timeout: Option<f64>,
    ) -> Result<()> {
        if !data.is_c_contiguous() {
            return Err(crate::errors::Error::value(
                "Channel.send takes a C-contiguous buffer",
            ));
        }
        // An empty export may have a null pointer, which a slice must not. (The export,
        // shadowed below, lives until this call returns.)
        let data: &[u8] = match data.len_bytes() {
            0 => &[],
            // SAFETY: `data` is a C-contiguous export of `n` bytes; the export (held until
            // this call returns) keeps them alive and the exporter unresized.
            n => unsafe { std::slice::from_raw_parts(data.buf_ptr() as *const u8, n) },
        };
        let ch = &self.inner;
        match ch.try_send(data) {
            Err(ChannelError::Full) => {}
            r => return Ok(r?),
        }
        let r = blocking(py, timeout_of(timeout)?, |o| match ch.send_opts(data, o) {
            Err(ChannelError::TimedOut) | Err(ChannelError::Interrupted) => Slice::Again,
            r => Slice::Done(r),
        })?;
        Ok(r.unwrap_or(Err(ChannelError::Full))?)
    }

    /// Receives the next message as bytes, waiting up to `timeout` seconds (None: forever;
    /// raises QueueEmpty, a queue.Empty, on time-out, ChannelClosedError once closed and
    /// drained).
    #[pyo3(signature = (timeout=None))]
    fn recv<'py>(&self, py: Python<'py>, timeout: Option<f64>) -> Result<Bound<'py, PyBytes>> {
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
    ) -> Result<()> {
        let t = timeout_of(timeout)?;
        let pool = self.inner.pool()?.clone();
        let block = parts_block(py, &pool, &parts, t)?;
        self.send_block_waiting(py, block, t)
    }

    /// Receives the next message: bytes for an inline one, a Block for a block one (its
    /// memory viewed in place). Time-outs and closing as for `recv`.
    #[pyo3(signature = (timeout=None))]
    fn recv_msg(&self, py: Python<'_>, timeout: Option<f64>) -> Result<Py<PyAny>> {
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

    /// Closes the channel: sends fail with ChannelClosedError, receivers drain then get it.
    fn close(&self) {
        self.inner.close();
    }

    /// Wakes every blocked sender and receiver with PeerLostError (a peer died).
    fn wake_all(&self) {
        self.inner.wake_all();
    }

    /// Messages waiting.
    fn __len__(&self) -> usize {
        self.inner.len() as usize
    }

    /// Capacity, depth, waiters, counts; parties mid-operation and positions reserved but not
    /// committed (`None` when there is none).
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
        d.set_item("mid_operation", s.mid_operation)?;
        d.set_item("uncommitted_send", s.uncommitted_send)?;
        d.set_item("uncommitted_recv", s.uncommitted_recv)?;
        Ok(d)
    }

    /// Pickles to `dragon._remote.attach("Channel", pool name, ref)`: the channel itself on
    /// its own node, a proxy through the node's object server on another.
    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyTuple>> {
        let me = slf.get();
        crate::sync::remote_recipe(slf.py(), "Channel", &me.pool_name, me.r#ref())
    }

    /// Sends `block` (a Block of this channel's pool) as one message: the receiver gets the
    /// block itself. Waits and errors as for `send`. `block` stays usable by its holder.
    #[pyo3(signature = (block, timeout=None))]
    fn send_block(&self, py: Python<'_>, block: &PyBlock, timeout: Option<f64>) -> Result<()> {
        let t = timeout_of(timeout)?;
        // SAFETY: Rust never borrows a PyBlock's bytes mutably (the class is frozen: only
        // `&Block`); Python reaches them through the buffer protocol (raw pointer), outside Rust
        // borrows.
        self.send_block_waiting(py, unsafe { block.inner.try_clone() }?, t)
    }
}
