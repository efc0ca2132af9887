//! The user's Dragon configuration file and the `dragon-config` command.
//!
//! The file holds `key=value` lines (blank lines and `#` comments are ignored, unknown keys
//! are kept as they are). Its path is `$DRAGON_CONFIG` when set, else
//! `$XDG_CONFIG_HOME/dragon/config`, else `~/.config/dragon/config`.
//!
//! Keys read by the transport:
//!
//! | key | environment override | default | meaning |
//! |---|---|---|---|
//! | `ofi-runtime-lib` | `DRAGON_OFI_RUNTIME_LIB` | `libfabric.so.1` | libfabric to load: a library file or a directory holding `libfabric.so.1` |
//! | `ofi-provider` | `DRAGON_OFI_PROVIDER` | `tcp;ofi_rxm` | libfabric provider of the `ofi` back end (`verbs;ofi_rxm`, `cxi`, `shm`, ...) |
//!
//! The command, as in DragonHPC: `dragon-config add --ofi-runtime-lib=PATH`,
//! `dragon-config add --ofi-provider=NAME` (several flags may follow one `add`),
//! `dragon-config show` (`-s`), `dragon-config clean` (`-c`, removes the file),
//! `dragon-config -h`. Bad usage prints a message on stderr and exits with status 2.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Key of the libfabric library path.
pub const KEY_OFI_RUNTIME_LIB: &str = "ofi-runtime-lib";
/// Key of the libfabric provider name.
pub const KEY_OFI_PROVIDER: &str = "ofi-provider";
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

const KNOWN: [&str; 2] = [KEY_OFI_RUNTIME_LIB, KEY_OFI_PROVIDER];

fn real_env(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.is_empty())
}

fn path_with(env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    if let Some(p) = env(ENV_CONFIG) {
        return Some(p.into());
    }
    if let Some(x) = env("XDG_CONFIG_HOME") {
        return Some(Path::new(&x).join("dragon/config"));
    }
    env("HOME").map(|h| Path::new(&h).join(".config/dragon/config"))
}

/// Path of the configuration file (it need not exist); `None` when neither
/// `$DRAGON_CONFIG`, `$XDG_CONFIG_HOME` nor `$HOME` is set.
pub fn config_path() -> Option<PathBuf> {
    path_with(&real_env)
}

/// The contents of a configuration file, in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DragonConfig {
    entries: Vec<(String, String)>,
}

impl DragonConfig {
    /// Parses `key=value` lines.
    pub fn parse(text: &str) -> DragonConfig {
        let mut c = DragonConfig::default();
        for line in text.lines() {
            let l = line.trim();
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            if let Some((k, v)) = l.split_once('=') {
                c.set(k.trim(), v.trim());
            }
        }
        c
    }

    /// Reads the file at `path`; a missing file is an empty configuration.
    pub fn load(path: &Path) -> std::io::Result<DragonConfig> {
        match std::fs::read_to_string(path) {
            Ok(t) => Ok(DragonConfig::parse(&t)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(DragonConfig::default()),
            Err(e) => Err(e),
        }
    }

    /// Writes the file (creating its directory), replacing it atomically.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        if let Some(d) = path.parent() {
            if !d.as_os_str().is_empty() {
                std::fs::create_dir_all(d)?;
            }
        }
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(self.render().as_bytes())?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)
    }

    /// The file text.
    pub fn render(&self) -> String {
        self.entries
            .iter()
            .map(|(k, v)| format!("{k}={v}\n"))
            .collect()
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Sets `key` (in place when present, else appended).
    pub fn set(&mut self, key: &str, value: &str) {
        match self.entries.iter_mut().find(|(k, _)| k == key) {
            Some(e) => e.1 = value.to_string(),
            None => self.entries.push((key.to_string(), value.to_string())),
        }
    }

    /// All entries in file order.
    pub fn entries(&self) -> &[(String, String)] {
        &self.entries
    }
}

fn effective(env: &dyn Fn(&str) -> Option<String>, env_key: &str, key: &str, dflt: &str) -> String {
    if let Some(v) = env(env_key) {
        return v;
    }
    path_with(env)
        .and_then(|p| DragonConfig::load(&p).ok())
        .and_then(|c| c.get(key).map(str::to_string))
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| dflt.to_string())
}

/// The libfabric provider to use: `$DRAGON_OFI_PROVIDER`, else the file's `ofi-provider`,
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
/// `ofi-runtime-lib`, else `libfabric.so.1`.
pub fn ofi_runtime_lib() -> String {
    effective(
        &real_env,
        ENV_OFI_RUNTIME_LIB,
        KEY_OFI_RUNTIME_LIB,
        DEFAULT_OFI_RUNTIME_LIB,
    )
}

const USAGE: &str = "\
usage: dragon-config add --ofi-runtime-lib=PATH | --ofi-provider=NAME ...
       dragon-config show | -s
       dragon-config clean | -c
       dragon-config -h

Edits the Dragon configuration file ($DRAGON_CONFIG, else $XDG_CONFIG_HOME/dragon/config,
else ~/.config/dragon/config).
  add --ofi-runtime-lib=PATH   libfabric to load at run time (a libfabric.so file or the
                               directory holding it); DRAGON_OFI_RUNTIME_LIB overrides it
  add --ofi-provider=NAME      libfabric provider, e.g. tcp;ofi_rxm, verbs;ofi_rxm, cxi, shm;
                               DRAGON_OFI_PROVIDER overrides it
  show, -s                     print the file and the values in effect
  clean, -c                    remove the file
";

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
    let usage_err = |err: &mut dyn Write, msg: &str| {
        let _ = writeln!(err, "dragon-config: {msg}");
        let _ = write!(err, "{USAGE}");
        2
    };
    let Some(cmd) = args.first() else {
        return usage_err(err, "a command is required");
    };
    if matches!(cmd.as_str(), "-h" | "--help" | "help") {
        let _ = write!(out, "{USAGE}");
        return 0;
    }
    let Some(path) = path_with(env) else {
        let _ = writeln!(
            err,
            "dragon-config: no configuration path (set DRAGON_CONFIG or HOME)"
        );
        return 1;
    };
    match cmd.as_str() {
        "add" | "-a" | "--add" => {
            let mut sets: Vec<(&str, String)> = Vec::new();
            let mut it = args[1..].iter();
            while let Some(a) = it.next() {
                let (flag, inline) = match a.split_once('=') {
                    Some((f, v)) => (f, Some(v.to_string())),
                    None => (a.as_str(), None),
                };
                let key = match flag {
                    "--ofi-runtime-lib" => KEY_OFI_RUNTIME_LIB,
                    "--ofi-provider" => KEY_OFI_PROVIDER,
                    "-h" | "--help" => {
                        let _ = write!(out, "{USAGE}");
                        return 0;
                    }
                    // DragonHPC's older form: `dragon-config -a ofi-runtime-lib=PATH`.
                    f if KNOWN.contains(&f) && inline.is_some() => {
                        KNOWN[KNOWN.iter().position(|k| *k == f).unwrap_or(0)]
                    }
                    _ => return usage_err(err, &format!("unknown option '{a}'")),
                };
                let value = match inline {
                    Some(v) => v,
                    None => match it.next() {
                        Some(v) => v.clone(),
                        None => return usage_err(err, &format!("{flag} needs a value")),
                    },
                };
                if value.is_empty() || value.contains(['\n', '\r']) {
                    return usage_err(err, &format!("bad value for {flag}"));
                }
                sets.push((key, value));
            }
            if sets.is_empty() {
                return usage_err(err, "add: nothing to add");
            }
            let mut c = match DragonConfig::load(&path) {
                Ok(c) => c,
                Err(e) => {
                    let _ = writeln!(err, "dragon-config: {}: {e}", path.display());
                    return 1;
                }
            };
            for (k, v) in &sets {
                c.set(k, v);
            }
            if let Err(e) = c.save(&path) {
                let _ = writeln!(err, "dragon-config: {}: {e}", path.display());
                return 1;
            }
            for (k, v) in &sets {
                let _ = writeln!(out, "{k}={v}");
            }
            0
        }
        "show" | "-s" | "--show" | "--serialize" => {
            if args.len() > 1 {
                return usage_err(err, &format!("unexpected argument '{}'", args[1]));
            }
            let c = match DragonConfig::load(&path) {
                Ok(c) => c,
                Err(e) => {
                    let _ = writeln!(err, "dragon-config: {}: {e}", path.display());
                    return 1;
                }
            };
            let exists = path.exists();
            let _ = writeln!(
                out,
                "# {}{}",
                path.display(),
                if exists { "" } else { " (not present)" }
            );
            let _ = write!(out, "{}", c.render());
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
            0
        }
        "clean" | "-c" | "--clean" => {
            if args.len() > 1 {
                return usage_err(err, &format!("unexpected argument '{}'", args[1]));
            }
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    let _ = writeln!(out, "removed {}", path.display());
                    0
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
                Err(e) => {
                    let _ = writeln!(err, "dragon-config: {}: {e}", path.display());
                    1
                }
            }
        }
        other => usage_err(err, &format!("unknown command '{other}'")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Env {
        vars: HashMap<String, String>,
        dir: PathBuf,
    }

    impl Env {
        fn new() -> Env {
            let dir = std::env::temp_dir().join(format!(
                "dragon-config-test-{:016x}",
                dragon_shm::platform::random_u64()
            ));
            let mut vars = HashMap::new();
            vars.insert(
                ENV_CONFIG.to_string(),
                dir.join("sub/config").to_string_lossy().into_owned(),
            );
            Env { vars, dir }
        }
        fn path(&self) -> PathBuf {
            self.dir.join("sub/config")
        }
        fn run(&self, args: &[&str]) -> (i32, String, String) {
            let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
            let (mut o, mut e) = (Vec::new(), Vec::new());
            let env = |k: &str| self.vars.get(k).cloned();
            let code = run(&args, &env, &mut o, &mut e);
            (
                code,
                String::from_utf8(o).unwrap(),
                String::from_utf8(e).unwrap(),
            )
        }
    }

    impl Drop for Env {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn add_show_clean() {
        let mut env = Env::new();
        assert_eq!(
            env.run(&["add", "--ofi-runtime-lib=/opt/lf/lib"]).0,
            0,
            "add"
        );
        assert_eq!(env.run(&["add", "--ofi-provider", "shm"]).0, 0);
        // Replacing keeps one line per key; unknown keys survive.
        std::fs::write(
            env.path(),
            format!(
                "{}# comment\nother-key=1\n",
                std::fs::read_to_string(env.path()).unwrap()
            ),
        )
        .unwrap();
        assert_eq!(env.run(&["add", "--ofi-provider=verbs;ofi_rxm"]).0, 0);
        let text = std::fs::read_to_string(env.path()).unwrap();
        assert_eq!(
            text,
            "ofi-runtime-lib=/opt/lf/lib\nofi-provider=verbs;ofi_rxm\nother-key=1\n"
        );
        let (code, out, _) = env.run(&["show"]);
        assert_eq!(code, 0);
        assert!(out.contains("ofi-provider=verbs;ofi_rxm\n"), "{out}");
        assert!(
            out.contains("# in effect: ofi-provider=verbs;ofi_rxm (from the file)"),
            "{out}"
        );
        // The environment wins over the file.
        env.vars
            .insert(ENV_OFI_PROVIDER.to_string(), "shm".to_string());
        let (_, out, _) = env.run(&["-s"]);
        assert!(
            out.contains("# in effect: ofi-provider=shm (from DRAGON_OFI_PROVIDER)"),
            "{out}"
        );
        assert!(out.contains("# in effect: ofi-runtime-lib=/opt/lf/lib (from the file)"));
        assert_eq!(env.run(&["clean"]).0, 0);
        assert!(!env.path().exists());
        assert_eq!(env.run(&["clean"]).0, 0, "cleaning twice is fine");
        let (_, out, _) = env.run(&["show"]);
        assert!(out.contains("(not present)"));
        assert!(
            out.contains("ofi-runtime-lib=libfabric.so.1 (default)"),
            "{out}"
        );
    }

    #[test]
    fn bad_usage_exits_2() {
        let env = Env::new();
        for args in [
            &[][..],
            &["frobnicate"],
            &["add"],
            &["add", "--ofi-flavour=x"],
            &["add", "--ofi-provider"],
            &["add", "--ofi-provider="],
            &["show", "extra"],
            &["clean", "extra"],
        ] {
            let (code, out, err) = env.run(args);
            assert_eq!(code, 2, "{args:?}");
            assert!(out.is_empty());
            assert!(err.starts_with("dragon-config: "), "{err}");
        }
        assert!(!env.path().exists(), "bad usage writes nothing");
        let (code, out, _) = env.run(&["-h"]);
        assert_eq!(code, 0);
        assert!(out.starts_with("usage: dragon-config add"));
    }

    #[test]
    fn paths_and_parsing() {
        let e = |m: &[(&str, &str)]| {
            let m: HashMap<String, String> = m
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect();
            path_with(&move |k: &str| m.get(k).cloned())
        };
        assert_eq!(
            e(&[("DRAGON_CONFIG", "/x/c"), ("HOME", "/h")]),
            Some("/x/c".into())
        );
        assert_eq!(
            e(&[("XDG_CONFIG_HOME", "/cfg"), ("HOME", "/h")]),
            Some("/cfg/dragon/config".into())
        );
        assert_eq!(
            e(&[("HOME", "/h")]),
            Some("/h/.config/dragon/config".into())
        );
        assert_eq!(e(&[]), None);
        let c = DragonConfig::parse(" a = 1 \n#x=2\nnoequals\n\nb=x=y\na=3\n");
        assert_eq!(c.get("a"), Some("3"));
        assert_eq!(c.get("b"), Some("x=y"));
        assert_eq!(c.get("x"), None);
        assert_eq!(c.entries().len(), 2);
    }
}
