//! Where the runtime's Rust log records go: the node's log file (and stderr when asked).
//!
//! Every Rust crate of the workspace logs with `tracing`. Inside a Python process (the
//! launcher, an agent, any managed process) no `tracing` subscriber is installed, so
//! `tracing`'s `log` feature turns each event into a `log` record, and this module's sink
//! writes it: one line per record, appended with a single `write(2)` to the node's log
//! file (`O_APPEND`, so the lines of every process of a node interleave whole), in the
//! same format as the Python package's handler (`dragon._log`), which writes to the same
//! file. Python's settings (`dragon -l`, `DRAGON_LOG_LEVEL`) configure both through
//! [`configure`].
//!
//! Why not `pyo3-log` (records handed to Python's `logging`): that takes the GIL inside
//! Rust code that may run with the GIL released while it holds a shared-memory lock (heap
//! recovery logs under the pool lock); a Python thread holding the GIL and waiting for that
//! lock would deadlock the process. Writing the line here needs no GIL and no lock shared
//! with Python.
//!
//! Stand-alone Rust binaries (`dragon-shm`, `dragon-config`, benchmarks) install a
//! `tracing_subscriber` on stderr instead (`dragon_transport::logging::init_stderr`).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use log::{Level, LevelFilter, Log, Metadata, Record};

/// Where records go and from which level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// The node's log file (created on the first record, with its directory), if any.
    pub file: Option<PathBuf>,
    /// Records at this level or more severe go to the file.
    pub file_level: LevelFilter,
    /// Records at this level or more severe go to stderr (`Off` by default).
    pub stderr_level: LevelFilter,
    /// The node index written on every line.
    pub node: u32,
}

impl Default for LogConfig {
    /// Warnings and errors to stderr: what a stand-alone tool run by hand should show.
    fn default() -> Self {
        LogConfig {
            file: None,
            file_level: LevelFilter::Off,
            stderr_level: LevelFilter::Warn,
            node: 0,
        }
    }
}

struct Sink {
    config: LogConfig,
    /// The open file, once a record was written (`None` until then, or when it failed).
    file: Option<File>,
    /// Opening the file failed once: do not retry for every record.
    file_failed: bool,
}

struct Logger(Mutex<Sink>);

static LOGGER: OnceLock<Logger> = OnceLock::new();

/// Installs the sink (once per process) and sets where records go from now on. Returns
/// false if another `log` logger was installed first (then nothing changes).
pub fn configure(config: LogConfig) -> bool {
    let max = config.file_level.max(config.stderr_level);
    let mut fresh = false;
    let logger = LOGGER.get_or_init(|| {
        fresh = true;
        Logger(Mutex::new(Sink {
            config: config.clone(),
            file: None,
            file_failed: false,
        }))
    });
    if fresh {
        if log::set_logger(logger).is_err() {
            return false;
        }
    } else {
        let mut s = logger.0.lock().unwrap_or_else(|p| p.into_inner());
        if s.config.file != config.file {
            s.file = None;
            s.file_failed = false;
        }
        s.config = config;
    }
    log::set_max_level(max);
    true
}

fn level_name(l: Level) -> &'static str {
    match l {
        Level::Error => "ERROR",
        Level::Warn => "WARNING",
        Level::Info => "INFO",
        Level::Debug => "DEBUG",
        Level::Trace => "TRACE",
    }
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC), the timestamp `dragon._log` writes too.
pub fn utc_timestamp(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// One log line, as `dragon._log` formats Python records (logger name = the Rust target
/// with `::` as `.`, under `dragon.rs.`).
pub fn format_line(node: u32, level: Level, target: &str, msg: &std::fmt::Arguments<'_>) -> String {
    format!(
        "{} {} node={} pid={} dragon.rs.{}: {}\n",
        utc_timestamp(SystemTime::now()),
        level_name(level),
        node,
        std::process::id(),
        target.replace("::", "."),
        msg
    )
}

/// Opens the log file for appending: its directory is made 0700 if missing, the file 0600,
/// and a symbolic link in its place is refused (`O_NOFOLLOW`).
fn open_append(path: &Path) -> std::io::Result<File> {
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

impl Log for Logger {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        let s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.level() <= s.config.file_level || m.level() <= s.config.stderr_level
    }

    fn log(&self, r: &Record<'_>) {
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let to_file = s.config.file.is_some() && r.level() <= s.config.file_level;
        let to_stderr = r.level() <= s.config.stderr_level;
        if !to_file && !to_stderr {
            return;
        }
        let line = format_line(s.config.node, r.level(), r.target(), r.args());
        if to_stderr {
            let _ = std::io::stderr().write_all(line.as_bytes());
        }
        if to_file {
            if s.file.is_none() && !s.file_failed {
                let path = s.config.file.clone().unwrap_or_default();
                match open_append(&path) {
                    Ok(f) => s.file = Some(f),
                    Err(_) => s.file_failed = true,
                }
            }
            if let Some(f) = s.file.as_mut() {
                let _ = f.write_all(line.as_bytes());
            }
        }
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_are_utc_civil_dates() {
        let t = UNIX_EPOCH + Duration::from_millis(1_780_000_000_123);
        assert_eq!(utc_timestamp(t), "2026-05-28T20:26:40.123Z");
        assert_eq!(utc_timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(utc_timestamp(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn records_reach_the_file_at_the_configured_level_only() {
        let dir = std::env::temp_dir().join(format!("dragon-rs-logtest-{}", std::process::id()));
        let path = dir.join("node-3.log");
        assert!(configure(LogConfig {
            file: Some(path.clone()),
            file_level: LevelFilter::Info,
            stderr_level: LevelFilter::Off,
            node: 3,
        }));
        tracing::debug!("not written");
        tracing::info!(answer = 42, "written");
        log::warn!("also written");
        let text = std::fs::read_to_string(&path).expect("log file");
        std::fs::remove_dir_all(&dir).expect("remove test dir");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].contains(" INFO node=3 pid="), "{}", lines[0]);
        assert!(lines[0].contains("dragon.rs.dragon_runtime.logging.tests: written"));
        assert!(lines[1].contains(" WARNING node=3 "), "{}", lines[1]);
        assert!(!text.contains("not written"));
    }
}
