//! Logging of the Rust crates inside a Python process: `dragon._log` tells the runtime's
//! sink (`dragon_runtime::logging`) which file and levels Python's settings chose, so Rust
//! records land in the same per-node file as the package's own, in the same format.

use dragon_runtime::logging::{configure, LogConfig};
use log::LevelFilter;
use pyo3::prelude::*;

/// A Python `logging` level number as the `log` crate's filter (Rust has no CRITICAL: it
/// lets errors through; anything above CRITICAL is off).
fn filter_of(level: i32) -> LevelFilter {
    match level {
        l if l > 50 => LevelFilter::Off,
        l if l >= 40 => LevelFilter::Error,
        l if l >= 30 => LevelFilter::Warn,
        l if l >= 20 => LevelFilter::Info,
        l if l >= 10 => LevelFilter::Debug,
        _ => LevelFilter::Trace,
    }
}

/// Sends the Rust crates' records at `file_level` (a `logging` level number) or more
/// severe to `file` (created with its directory on the first record), and those at
/// `stderr_level` or more severe to stderr; `node` is written on every line.
#[pyfunction]
#[pyo3(signature = (file, file_level, stderr_level, node))]
fn log_configure(file: Option<String>, file_level: i32, stderr_level: i32, node: u32) -> bool {
    configure(LogConfig {
        file: file.map(Into::into),
        file_level: filter_of(file_level),
        stderr_level: filter_of(stderr_level),
        node,
    })
}

/// Adds this module's functions to `dragon._native` and installs the sink with its
/// defaults (warnings and errors on stderr) until `dragon._log` points it at a node's file:
/// a tool run through Python (`dragon-config`) shows its warnings as the Rust binary does.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    configure(LogConfig::default());
    m.add_function(wrap_pyfunction!(log_configure, m)?)
}
