//! Where the transport's diagnostics go.
//!
//! The library only emits [`tracing`] events (target `dragon_transport::...`): why the `ofi`
//! back end cannot be used (`warn`), libfabric calls that failed unexpectedly (`error`), why
//! a peer was lost (`debug`). A program decides where they go. Programs of this workspace
//! (`transport-peer`, `dragon-config`, the benchmarks) call [`init_stderr`] first thing; a
//! program that installs no subscriber gets the events as `log` records (the `tracing` `log`
//! feature), for a `log` logger such as `pyo3-log` (Python's `logging`) to show; with
//! neither, they are dropped.
//!
//! `DRAGON_LOG` is an [`EnvFilter`] directive list, default `warn`: e.g.
//! `DRAGON_LOG=dragon_transport=debug` (why peers are lost), `DRAGON_LOG=debug`.
//! `DRAGON_TRANSPORT_DEBUG=1`, the older switch, still adds `dragon_transport=debug`.

use std::io::IsTerminal;

use tracing::level_filters::LevelFilter;
use tracing_subscriber::EnvFilter;

/// Environment variable holding the filter directives.
pub const ENV_LOG: &str = "DRAGON_LOG";

/// The filter [`init_stderr`] installs: `DRAGON_LOG` (invalid directives are skipped),
/// default `warn`.
pub fn filter() -> EnvFilter {
    let f = EnvFilter::builder()
        .with_default_directive(LevelFilter::WARN.into())
        .with_env_var(ENV_LOG)
        .from_env_lossy();
    if std::env::var_os("DRAGON_TRANSPORT_DEBUG").is_some() {
        if let Ok(d) = "dragon_transport=debug".parse() {
            return f.add_directive(d);
        }
    }
    f
}

/// Installs a `tracing_subscriber` fmt subscriber writing to stderr, filtered by
/// [`filter`], as the process's global default. Does nothing when one is already installed
/// (so calling it twice, or after a test harness did, is harmless).
pub fn init_stderr() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}
