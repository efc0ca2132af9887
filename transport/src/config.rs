//! The user's Dragon configuration file and the `dragon-config` command.
//!
//! The file is JSON, as DragonHPC's `dragon-config.json`: one object of settings, key ->
//! value, e.g. `{"ofi_provider": "tcp;ofi_rxm", "ofi_runtime_lib": "/usr/lib64"}`. Keys this
//! crate does not know are kept as they are (any JSON value). Its path is `$DRAGON_CONFIG`
//! when set, else `$XDG_CONFIG_HOME/dragon/dragon-config.json`, else
//! `~/.config/dragon/dragon-config.json`.
//!
//! Keys read by the transport:
//!
//! | key | environment override | default | meaning |
//! |---|---|---|---|
//! | `ofi_runtime_lib` | `DRAGON_OFI_RUNTIME_LIB` | `libfabric.so.1` | libfabric to load: a library file or a directory holding `libfabric.so.1` |
//! | `ofi_provider` | `DRAGON_OFI_PROVIDER` | `tcp;ofi_rxm` | libfabric provider of the `ofi` back end (`verbs;ofi_rxm`, `cxi`, `shm`, ...) |
//!
//! A value may also be a list of strings (DragonHPC writes paths that way); its first
//! non-empty string is used.
//!
//! Old files: before the JSON format the file was `key=value` lines (`ofi-runtime-lib=...`)
//! at `.../dragon/config` (or at `$DRAGON_CONFIG`). Such a file is read once, the first time
//! the configuration is loaded, rewritten as JSON at the new path (the old file is removed
//! when it had another name) and a warning is logged.
//!
//! The command, as in DragonHPC: `dragon-config add --ofi-runtime-lib=PATH`,
//! `dragon-config add --ofi-provider=NAME` (both may follow one `add`; DragonHPC's older
//! `dragon-config -a ofi-runtime-lib=PATH` works too), `dragon-config show` (`-s`,
//! `--serialize`), `dragon-config clean` (`-c`, removes the file), `-h`/`--help`,
//! `-V`/`--version`. Parsed with `clap`: bad usage prints the error and the usage on stderr
//! and exits with status 2; a file that cannot be read or written exits with status 1.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{ArgGroup, Args, Parser, Subcommand};
use serde_json::Value;

/// Key of the libfabric library path.
pub const KEY_OFI_RUNTIME_LIB: &str = "ofi_runtime_lib";
/// Key of the libfabric provider name.
pub const KEY_OFI_PROVIDER: &str = "ofi_provider";
/// Environment variable overriding [`KEY_OFI_RUNTIME_LIB`].
pub const ENV_OFI_RUNTIME_LIB: &str = "DRAGON_OFI_RUNTIME_LIB";
/// Environment variable overriding [`KEY_OFI_PROVIDER`].
pub const ENV_OFI_PROVIDER: &str = "DRAGON_OFI_PROVIDER";
/// Environment variable naming the configuration file.
pub const ENV_CONFIG: &str = "DRAGON_CONFIG";
/// Provider used when nothing is configured.
pub const DEFAULT_OFI_PROVIDER: &str = "tcp;ofi_rxm";
/// Library loaded when nothing is configured.
pub const DEFAULT_OFI_RUNTIME_LIB: &str = "libfabric.so.1";
/// Name of the configuration file in its directory.
pub const FILE_NAME: &str = "dragon-config.json";
/// Name of the old (`key=value`) configuration file in the same directory.
pub const LEGACY_FILE_NAME: &str = "config";

/// The keys the transport reads, with their spelling in old `key=value` files.
const KNOWN: [(&str, &str); 2] = [
    (KEY_OFI_RUNTIME_LIB, "ofi-runtime-lib"),
    (KEY_OFI_PROVIDER, "ofi-provider"),
];

/// Why the configuration file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// Neither `$DRAGON_CONFIG`, `$XDG_CONFIG_HOME` nor `$HOME` is set.
    #[error("no configuration path (set DRAGON_CONFIG or HOME)")]
    NoPath,
    /// Reading, writing or removing the file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// The file is neither a JSON object nor an old `key=value` file.
    #[error("{}: not a JSON object of settings: {reason}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ConfigError + '_ {
    move |source| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn real_env(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.is_empty())
}

/// Where the file is, and where an old-format one may be left.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Paths {
    file: PathBuf,
    /// The old `key=value` file (only for the default locations; `$DRAGON_CONFIG` names
    /// one file, migrated in place).
    legacy: Option<PathBuf>,
}

fn paths_with(env: &dyn Fn(&str) -> Option<String>) -> Option<Paths> {
    if let Some(p) = env(ENV_CONFIG) {
        return Some(Paths {
            file: p.into(),
            legacy: None,
        });
    }
    let dir = match env("XDG_CONFIG_HOME") {
        Some(x) => Path::new(&x).join("dragon"),
        None => Path::new(&env("HOME")?).join(".config/dragon"),
    };
    Some(Paths {
        file: dir.join(FILE_NAME),
        legacy: Some(dir.join(LEGACY_FILE_NAME)),
    })
}

/// Path of the configuration file (it need not exist); `None` when neither
/// `$DRAGON_CONFIG`, `$XDG_CONFIG_HOME` nor `$HOME` is set.
pub fn config_path() -> Option<PathBuf> {
    paths_with(&real_env).map(|p| p.file)
}

/// The settings of a configuration file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DragonConfig {
    entries: BTreeMap<String, Value>,
}

impl DragonConfig {
    /// Parses the JSON text of a file (an object).
    pub fn from_json(text: &str) -> Result<DragonConfig, String> {
        match serde_json::from_str::<Value>(text).map_err(|e| e.to_string())? {
            Value::Object(m) => Ok(DragonConfig {
                entries: m.into_iter().collect(),
            }),
            other => Err(format!("a JSON {} is not an object", json_kind(&other))),
        }
    }

    /// Parses an old-format file: `key=value` lines, blank lines and `#` comments ignored;
    /// `ofi-runtime-lib` and `ofi-provider` become `ofi_runtime_lib` and `ofi_provider`,
    /// other keys are kept as they are. `None` when a line is neither.
    pub fn from_legacy(text: &str) -> Option<DragonConfig> {
        let mut c = DragonConfig::default();
        for line in text.lines() {
            let l = line.trim();
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            let (k, v) = l.split_once('=')?;
            let k = k.trim();
            let k = KNOWN
                .iter()
                .find(|(_, old)| *old == k)
                .map_or(k, |(new, _)| *new);
            c.set(k, v.trim());
        }
        Some(c)
    }

    /// Reads the file at `path`; a missing file is an empty configuration. An old-format
    /// file is rewritten as JSON in place (see the module documentation).
    pub fn load(path: &Path) -> Result<DragonConfig, ConfigError> {
        load_paths(&Paths {
            file: path.to_path_buf(),
            legacy: None,
        })
    }

    /// Writes the file (creating its directory), replacing it atomically.
    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        if let Some(d) = path.parent() {
            if !d.as_os_str().is_empty() {
                std::fs::create_dir_all(d).map_err(io_err(d))?;
            }
        }
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(self.to_json().as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            io_err(path)(e)
        })
    }

    /// The file text: the settings as a pretty-printed JSON object, keys sorted.
    pub fn to_json(&self) -> String {
        let m: serde_json::Map<String, Value> = self
            .entries
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut s = serde_json::to_string_pretty(&Value::Object(m)).unwrap_or_default();
        s.push('\n');
        s
    }

    /// The value of `key` as the transport uses it: a string, or the first non-empty
    /// string of a list.
    pub fn get(&self, key: &str) -> Option<&str> {
        match self.entries.get(key)? {
            Value::String(s) => Some(s),
            Value::Array(a) => a.iter().filter_map(Value::as_str).find(|s| !s.is_empty()),
            _ => None,
        }
    }

    /// Sets `key` to the string `value`.
    pub fn set(&mut self, key: &str, value: &str) {
        self.entries
            .insert(key.to_string(), Value::String(value.to_string()));
    }

    /// All entries, by key.
    pub fn entries(&self) -> &BTreeMap<String, Value> {
        &self.entries
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Reads `path`: `Ok(None)` when it does not exist.
fn read_opt(path: &Path) -> Result<Option<String>, ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Rewrites the old-format `c`, read from `old`, as JSON at `p.file`.
fn migrate(c: DragonConfig, old: &Path, p: &Paths) -> DragonConfig {
    match c.save(&p.file) {
        Ok(()) => {
            if old != p.file {
                let _ = std::fs::remove_file(old);
            }
            tracing::warn!(
                "dragon-config: rewrote the old-format {} as JSON in {}",
                old.display(),
                p.file.display()
            );
        }
        Err(e) => tracing::warn!(
            "dragon-config: read the old-format {}; could not rewrite it as JSON: {e}",
            old.display()
        ),
    }
    c
}

fn load_paths(p: &Paths) -> Result<DragonConfig, ConfigError> {
    if let Some(text) = read_opt(&p.file)? {
        return match DragonConfig::from_json(&text) {
            Ok(c) => Ok(c),
            Err(reason) => match DragonConfig::from_legacy(&text) {
                Some(c) if !text.trim_start().starts_with(['{', '[']) => Ok(migrate(c, &p.file, p)),
                _ => Err(ConfigError::Format {
                    path: p.file.clone(),
                    reason,
                }),
            },
        };
    }
    if let Some(old) = &p.legacy {
        if let Some(text) = read_opt(old)? {
            if let Some(c) = DragonConfig::from_legacy(&text) {
                return Ok(migrate(c, old, p));
            }
            tracing::warn!(
                "dragon-config: ignoring {}: not an old-format configuration file",
                old.display()
            );
        }
    }
    Ok(DragonConfig::default())
}

fn effective(env: &dyn Fn(&str) -> Option<String>, env_key: &str, key: &str, dflt: &str) -> String {
    if let Some(v) = env(env_key) {
        return v;
    }
    let from_file = paths_with(env).and_then(|p| match load_paths(&p) {
        Ok(c) => c.get(key).map(str::to_string),
        Err(e) => {
            tracing::warn!("dragon-config: {e}; using the defaults");
            None
        }
    });
    from_file
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| dflt.to_string())
}

/// The libfabric provider to use: `$DRAGON_OFI_PROVIDER`, else the file's `ofi_provider`,
/// else `tcp;ofi_rxm`.
pub fn ofi_provider() -> String {
    effective(
        &real_env,
        ENV_OFI_PROVIDER,
        KEY_OFI_PROVIDER,
        DEFAULT_OFI_PROVIDER,
    )
}

/// The libfabric library to load: `$DRAGON_OFI_RUNTIME_LIB`, else the file's
/// `ofi_runtime_lib`, else `libfabric.so.1`.
pub fn ofi_runtime_lib() -> String {
    effective(
        &real_env,
        ENV_OFI_RUNTIME_LIB,
        KEY_OFI_RUNTIME_LIB,
        DEFAULT_OFI_RUNTIME_LIB,
    )
}

// ---- the command ---------------------------------------------------------------------------

/// `dragon-config`: the Dragon configuration file.
#[derive(Debug, Parser)]
#[command(
    name = "dragon-config",
    version,
    about = "Edits the Dragon configuration file (libfabric library and provider).",
    long_about = "Edits the Dragon configuration file, a JSON object of settings: \
                  $DRAGON_CONFIG, else $XDG_CONFIG_HOME/dragon/dragon-config.json, else \
                  ~/.config/dragon/dragon-config.json. DRAGON_OFI_RUNTIME_LIB and \
                  DRAGON_OFI_PROVIDER override the file's values.",
    subcommand_required = true,
    arg_required_else_help = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Adds settings to the file (replacing earlier values of the same keys).
    #[command(short_flag = 'a', long_flag = "add")]
    Add(AddArgs),
    /// Prints the file and the values in effect.
    #[command(short_flag = 's', long_flag = "show", long_flag_alias = "serialize")]
    Show,
    /// Removes the file.
    #[command(short_flag = 'c', long_flag = "clean")]
    Clean,
}

#[derive(Debug, Args)]
#[command(group(
    ArgGroup::new("settings")
        .required(true)
        .multiple(true)
        .args(["ofi_runtime_lib", "ofi_provider", "pairs"])
))]
struct AddArgs {
    /// libfabric to load at run time: a libfabric.so file or the directory holding it
    /// (DRAGON_OFI_RUNTIME_LIB overrides it).
    #[arg(long, value_name = "PATH", value_parser = setting_value)]
    ofi_runtime_lib: Option<String>,
    /// libfabric provider, e.g. tcp;ofi_rxm, verbs;ofi_rxm, cxi, shm
    /// (DRAGON_OFI_PROVIDER overrides it).
    #[arg(long, value_name = "NAME", value_parser = setting_value)]
    ofi_provider: Option<String>,
    /// DragonHPC's older form: ofi_runtime_lib=PATH or ofi_provider=NAME (also with '-').
    #[arg(value_name = "KEY=VALUE", value_parser = setting_pair)]
    pairs: Vec<(&'static str, String)>,
}

fn setting_value(v: &str) -> Result<String, String> {
    if v.is_empty() {
        Err("the value is empty".into())
    } else if v.contains(['\n', '\r']) {
        Err("the value contains a line break".into())
    } else {
        Ok(v.to_string())
    }
}

fn setting_pair(s: &str) -> Result<(&'static str, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("expected KEY=VALUE, got '{s}'"))?;
    let key = KNOWN
        .iter()
        .find(|(new, old)| k == *new || k == *old)
        .map(|(new, _)| *new)
        .ok_or_else(|| format!("unknown key '{k}' (known: ofi_runtime_lib, ofi_provider)"))?;
    Ok((key, setting_value(v)?))
}

/// Runs `dragon-config` with `args` (the arguments after the program name). Returns the
/// exit status: 0, 1 when the file cannot be read or written, 2 for bad usage.
pub fn config_main(args: &[String]) -> i32 {
    run(
        args,
        &real_env,
        &mut std::io::stdout().lock(),
        &mut std::io::stderr().lock(),
    )
}

fn run(
    args: &[String],
    env: &dyn Fn(&str) -> Option<String>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> i32 {
    let argv = std::iter::once("dragon-config").chain(args.iter().map(String::as_str));
    let cli = match Cli::try_parse_from(argv) {
        Ok(c) => c,
        Err(e) => {
            let text = e.render().to_string();
            let _ = if e.use_stderr() {
                err.write_all(text.as_bytes())
            } else {
                out.write_all(text.as_bytes())
            };
            return e.exit_code();
        }
    };
    match execute(cli.cmd, env, out) {
        Ok(()) => 0,
        Err(e) => {
            let _ = writeln!(err, "dragon-config: {e}");
            1
        }
    }
}

fn execute(
    cmd: Command,
    env: &dyn Fn(&str) -> Option<String>,
    out: &mut dyn Write,
) -> Result<(), ConfigError> {
    let paths = paths_with(env).ok_or(ConfigError::NoPath)?;
    let path = &paths.file;
    match cmd {
        Command::Add(a) => {
            let mut sets = a.pairs;
            sets.extend(a.ofi_runtime_lib.map(|v| (KEY_OFI_RUNTIME_LIB, v)));
            sets.extend(a.ofi_provider.map(|v| (KEY_OFI_PROVIDER, v)));
            let mut c = load_paths(&paths)?;
            for (k, v) in &sets {
                c.set(k, v);
            }
            c.save(path)?;
            for (k, v) in &sets {
                let _ = writeln!(out, "{k}={v}");
            }
        }
        Command::Show => {
            let c = load_paths(&paths)?;
            let exists = path.exists();
            let _ = writeln!(
                out,
                "# {}{}",
                path.display(),
                if exists { "" } else { " (not present)" }
            );
            if exists {
                let _ = write!(out, "{}", c.to_json());
            }
            for (k, e, d) in [
                (KEY_OFI_PROVIDER, ENV_OFI_PROVIDER, DEFAULT_OFI_PROVIDER),
                (
                    KEY_OFI_RUNTIME_LIB,
                    ENV_OFI_RUNTIME_LIB,
                    DEFAULT_OFI_RUNTIME_LIB,
                ),
            ] {
                let from = if env(e).is_some() {
                    format!("from {e}")
                } else if c.get(k).is_some() {
                    "from the file".to_string()
                } else {
                    "default".to_string()
                };
                let _ = writeln!(out, "# in effect: {k}={} ({from})", effective(env, e, k, d));
            }
        }
        Command::Clean => {
            for p in std::iter::once(path).chain(paths.legacy.as_ref()) {
                match std::fs::remove_file(p) {
                    Ok(()) => {
                        let _ = writeln!(out, "removed {}", p.display());
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err(p)(e)),
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
