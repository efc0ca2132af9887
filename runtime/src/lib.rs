//! `dragon-runtime`: the layer that knows processes and nodes.
//!
//! * [`spawn`]: the process-launch module (fork/exec with a Policy's CPU affinity, cwd,
//!   environment, standard streams and process group applied between fork and exec).
//! * [`agent`]: the node agent (launches processes on request, reaps them and keeps their
//!   exit codes, ids, the name registry, sweeps of dead processes' holds) and its client.
//! * [`cluster`]: multi-node bring-up: the node agents meet over the transport.
//! * [`logging`]: the sink that writes the Rust crates' log records to the node's log file.
//! * [`proto`]: the versioned control messages between them.
//! * [`topology`]: the node's CPUs, cores, NUMA nodes, memory and GPUs (hwloc with the
//!   `hwloc` feature, else sysfs and `sched_getaffinity`).

#![warn(missing_docs)]

pub mod agent;
pub mod cluster;
pub mod logging;
pub mod proto;
pub mod spawn;
pub mod topology;
