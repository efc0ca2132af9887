//! What the benchmark programs share.

/// The CPU model from `/proc/cpuinfo` ("unknown CPU" when it cannot be read), for the line
/// that says where saved results were measured.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// The hidden subcommand a benchmark re-executes itself with to start its child process:
/// `BENCH child ARGS...`, the arguments being the parent's business (each benchmark's
/// `child` function reads them).
#[derive(Debug, clap::Subcommand)]
pub enum Internal {
    /// Internal: runs as a benchmark's child process (started by the benchmark itself).
    #[command(hide = true)]
    Child {
        /// What the parent passes: a role and its arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 1..)]
        args: Vec<String>,
    },
}
