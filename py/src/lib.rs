//! `dragon._native`: Python bindings of the Dragon-RS shared-memory layer and runtime.
//!
//! One module per family of Python objects; this file only registers them:
//!
//! * `segment`: segment names and block handles;
//! * `pool`: `Pool` and `Block` (and the `parts` layout of several buffers in one block);
//! * `channel`: `Channel`;
//! * `sync`: `Event`, `Lock`, `RLock`, `Semaphore`, `BoundedSemaphore`, `Barrier`;
//! * `kv`: `Kv`, a DDict manager's index, and `stable_hash`;
//! * `process`: `spawn`, pidfds, the child subreaper flag;
//! * `agent`: the node agent (`Agent`) and a process's connection to it (`AgentClient`);
//! * `packet`: packet I/O on the "dragon" start method's connection descriptors;
//! * `objfast`: the Rust object server and client for hot operations across nodes;
//! * `node`, `tools`: this node's topology; the command-line tools;
//! * `blocking`: time-outs and the GIL-releasing, signal-aware blocking loop;
//! * `errors`: every native error as an exception of `dragon.exceptions`, in one place.
//!
//! Every blocking call releases the GIL and waits in slices, checking for signals between
//! them, so Ctrl-C raises `KeyboardInterrupt` promptly. Objects pickle to "attach" recipes
//! (pool name + block handle), so a process started any way (spawn, fork, the launcher) can
//! use them.

mod agent;
mod blocking;
mod channel;
mod cluster;
mod errors;
mod kv;
mod logging;
mod node;
mod objfast;
mod packet;
mod pool;
mod process;
mod segment;
mod sync;
mod tools;

use pyo3::prelude::*;

/// The native module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    logging::register(m)?;
    cluster::register(m)?;
    m.add_function(wrap_pyfunction!(segment::random_runtime, m)?)?;
    m.add_function(wrap_pyfunction!(segment::segment_name, m)?)?;
    m.add_function(wrap_pyfunction!(segment::leftovers, m)?)?;
    m.add_function(wrap_pyfunction!(segment::segment_creator, m)?)?;
    m.add_class::<pool::PyPool>()?;
    m.add_class::<pool::PyBlock>()?;
    m.add_class::<channel::PyChannel>()?;
    m.add_class::<sync::PyEvent>()?;
    m.add_class::<sync::PyLock>()?;
    m.add_class::<sync::PySemaphore>()?;
    m.add_class::<sync::PyBarrier>()?;
    m.add_class::<sync::PyRLock>()?;
    m.add_class::<sync::PyBoundedSemaphore>()?;
    m.add_class::<kv::PyKv>()?;
    m.add_function(wrap_pyfunction!(kv::stable_hash, m)?)?;
    m.add_function(wrap_pyfunction!(process::spawn, m)?)?;
    m.add_function(wrap_pyfunction!(process::pidfd_open, m)?)?;
    m.add_function(wrap_pyfunction!(process::pidfd_getfd, m)?)?;
    m.add_function(wrap_pyfunction!(process::set_child_subreaper, m)?)?;
    m.add_class::<agent::PyAgent>()?;
    m.add_class::<agent::PyAgentClient>()?;
    m.add_class::<agent::PyAgentWaits>()?;
    m.add_function(wrap_pyfunction!(packet::packet_send, m)?)?;
    m.add_function(wrap_pyfunction!(packet::packet_recv, m)?)?;
    m.add_function(wrap_pyfunction!(packet::packet_poll, m)?)?;
    m.add_function(wrap_pyfunction!(node::topology, m)?)?;
    m.add_function(wrap_pyfunction!(objfast::objserver_start, m)?)?;
    m.add_function(wrap_pyfunction!(objfast::objserver_stop, m)?)?;
    m.add_function(wrap_pyfunction!(objfast::objcall, m)?)?;
    m.add_function(wrap_pyfunction!(objfast::objfast_rma_counts, m)?)?;
    m.add_function(wrap_pyfunction!(tools::shm_main, m)?)?;
    m.add_function(wrap_pyfunction!(tools::config_main, m)?)?;
    Ok(())
}
