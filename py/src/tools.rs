//! The command-line tools of the workspace, run inside the Python process (the `dragon`
//! package's console scripts `dragon-shm` and `dragon-config`, in `dragon.cli`, call these).

use pyo3::prelude::*;

/// Runs the `dragon-shm` command with `argv` (program name first); returns its exit code.
#[pyfunction]
pub(crate) fn shm_main(py: Python<'_>, argv: Vec<String>) -> i32 {
    py.detach(|| dragon_tools::run(argv))
}

/// Runs the `dragon-config` command with `args` (after the program name); returns its exit
/// code.
#[pyfunction]
pub(crate) fn config_main(py: Python<'_>, args: Vec<String>) -> i32 {
    py.detach(|| dragon_transport::config::config_main(&args))
}
