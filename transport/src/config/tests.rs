//! Tests of the configuration file and the `dragon-config` command, against a private
//! environment (no process environment variables are read or set).

use super::*;
use std::collections::HashMap;

struct Env {
    vars: HashMap<String, String>,
    dir: PathBuf,
}

impl Env {
    /// `DRAGON_CONFIG` set to a file in a fresh directory.
    fn new() -> Env {
        let mut e = Env::bare();
        let p = e.dir.join("sub/dragon.json");
        e.vars
            .insert(ENV_CONFIG.to_string(), p.to_string_lossy().into_owned());
        e
    }
    /// Only `HOME`, a fresh directory: the default locations.
    fn bare() -> Env {
        let dir = std::env::temp_dir().join(format!(
            "dragon-config-test-{:016x}",
            dragon_shm::platform::random_u64()
        ));
        let mut vars = HashMap::new();
        vars.insert("HOME".to_string(), dir.to_string_lossy().into_owned());
        Env { vars, dir }
    }
    fn path(&self) -> PathBuf {
        match self.vars.get(ENV_CONFIG) {
            Some(p) => p.into(),
            None => self.dir.join(".config/dragon").join(FILE_NAME),
        }
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
    fn json(&self) -> Value {
        serde_json::from_str(&std::fs::read_to_string(self.path()).unwrap()).unwrap()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn add_show_clean_round_trip() {
    let mut env = Env::new();
    assert_eq!(env.run(&["add", "--ofi-runtime-lib=/opt/lf/lib"]).0, 0);
    let (code, out, _) = env.run(&["add", "--ofi-provider", "shm"]);
    assert_eq!((code, out.as_str()), (0, "ofi_provider=shm\n"));
    assert_eq!(
        env.json(),
        serde_json::json!({"ofi_runtime_lib": "/opt/lf/lib", "ofi_provider": "shm"})
    );
    // Replacing keeps one entry per key; keys we do not know survive, whatever their type.
    let mut v = env.json();
    v["tcp_runtime"] = Value::Bool(true);
    v["ucx_runtime_lib"] = serde_json::json!(["/opt/ucx/lib"]);
    std::fs::write(env.path(), v.to_string()).unwrap();
    assert_eq!(env.run(&["add", "--ofi-provider=verbs;ofi_rxm"]).0, 0);
    assert_eq!(
        env.json(),
        serde_json::json!({
            "ofi_runtime_lib": "/opt/lf/lib",
            "ofi_provider": "verbs;ofi_rxm",
            "tcp_runtime": true,
            "ucx_runtime_lib": ["/opt/ucx/lib"],
        })
    );
    let (code, out, _) = env.run(&["show"]);
    assert_eq!(code, 0);
    assert!(out.contains("\"ofi_provider\": \"verbs;ofi_rxm\""), "{out}");
    assert!(
        out.contains("# in effect: ofi_provider=verbs;ofi_rxm (from the file)"),
        "{out}"
    );
    // The environment wins over the file.
    env.vars
        .insert(ENV_OFI_PROVIDER.to_string(), "shm".to_string());
    let (_, out, _) = env.run(&["-s"]);
    assert!(
        out.contains("# in effect: ofi_provider=shm (from DRAGON_OFI_PROVIDER)"),
        "{out}"
    );
    assert!(out.contains("# in effect: ofi_runtime_lib=/opt/lf/lib (from the file)"));
    assert_eq!(env.run(&["--serialize"]).1, out, "DragonHPC's spelling");
    let (code, out, _) = env.run(&["clean"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("removed "), "{out}");
    assert!(!env.path().exists());
    assert_eq!(env.run(&["-c"]).0, 0, "cleaning twice is fine");
    let (_, out, _) = env.run(&["show"]);
    assert!(out.contains("(not present)"));
    assert!(
        out.contains("ofi_runtime_lib=libfabric.so.1 (default)"),
        "{out}"
    );
}

#[test]
fn older_add_forms() {
    let env = Env::new();
    assert_eq!(env.run(&["-a", "ofi-runtime-lib=/a"]).0, 0);
    assert_eq!(
        env.run(&["--add", "ofi_provider=cxi", "--ofi-runtime-lib", "/b"])
            .0,
        0
    );
    assert_eq!(
        env.json(),
        serde_json::json!({"ofi_runtime_lib": "/b", "ofi_provider": "cxi"})
    );
}

#[test]
fn bad_usage_exits_2_with_a_message() {
    let env = Env::new();
    for (args, says) in [
        (&[][..], "Usage: dragon-config"),
        (&["frobnicate"], "unrecognized subcommand 'frobnicate'"),
        (&["add"], "required arguments were not provided"),
        (
            &["add", "--ofi-flavour=x"],
            "unexpected argument '--ofi-flavour'",
        ),
        (&["add", "--ofi-provider"], "a value is required"),
        (&["add", "--ofi-provider="], "the value is empty"),
        (&["add", "colour=blue"], "unknown key 'colour'"),
        (&["show", "extra"], "unexpected argument 'extra'"),
        (&["clean", "extra"], "unexpected argument 'extra'"),
    ] {
        let (code, out, err) = env.run(args);
        assert_eq!(code, 2, "{args:?}");
        assert!(out.is_empty(), "{args:?}: {out}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(
            err.starts_with("error: ") || args.is_empty(),
            "{args:?}: {err}"
        );
    }
    assert!(!env.path().exists(), "bad usage writes nothing");
    let (code, out, _) = env.run(&["-h"]);
    assert_eq!(code, 0);
    assert!(out.contains("Usage: dragon-config"), "{out}");
    for c in ["add", "show", "clean"] {
        assert!(out.contains(c), "{out}");
    }
    let (code, out, _) = env.run(&["add", "--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("--ofi-runtime-lib <PATH>"), "{out}");
    let (code, out, _) = env.run(&["--version"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("dragon-config "), "{out}");
}

#[test]
fn unreadable_file_exits_1() {
    let env = Env::new();
    std::fs::create_dir_all(env.path().parent().unwrap()).unwrap();
    std::fs::write(env.path(), "[1, 2]").unwrap();
    let (code, _, err) = env.run(&["show"]);
    assert_eq!(code, 1);
    assert!(err.contains("not a JSON object"), "{err}");
    assert_eq!(env.run(&["add", "--ofi-provider=shm"]).0, 1);
    assert_eq!(std::fs::read_to_string(env.path()).unwrap(), "[1, 2]");
}

#[test]
fn old_format_files_are_rewritten_as_json() {
    // At $DRAGON_CONFIG: rewritten in place.
    let env = Env::new();
    std::fs::create_dir_all(env.path().parent().unwrap()).unwrap();
    std::fs::write(
        env.path(),
        "# old\nofi-runtime-lib=/opt/lf\nofi-provider = shm\nother-key=1\n",
    )
    .unwrap();
    let (code, out, _) = env.run(&["show"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("ofi_runtime_lib=/opt/lf (from the file)"),
        "{out}"
    );
    assert_eq!(
        env.json(),
        serde_json::json!({"ofi_runtime_lib": "/opt/lf", "ofi_provider": "shm", "other-key": "1"})
    );
    // At the default location: `config` becomes `dragon-config.json`.
    let env = Env::bare();
    let old = env.dir.join(".config/dragon").join(LEGACY_FILE_NAME);
    std::fs::create_dir_all(old.parent().unwrap()).unwrap();
    std::fs::write(&old, "ofi-provider=cxi\n").unwrap();
    let e = |k: &str| env.vars.get(k).cloned();
    assert_eq!(
        effective(&e, ENV_OFI_PROVIDER, KEY_OFI_PROVIDER, "d"),
        "cxi"
    );
    assert!(!old.exists(), "the old file is gone");
    assert_eq!(env.json(), serde_json::json!({"ofi_provider": "cxi"}));
    assert_eq!(env.run(&["add", "--ofi-runtime-lib=/x"]).0, 0);
    assert_eq!(
        env.json(),
        serde_json::json!({"ofi_provider": "cxi", "ofi_runtime_lib": "/x"})
    );
}

#[test]
fn paths_and_values() {
    let e = |m: &[(&str, &str)]| {
        let m: HashMap<String, String> = m
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        paths_with(&move |k: &str| m.get(k).cloned())
    };
    let p = |f: &str, l: Option<&str>| {
        Some(Paths {
            file: f.into(),
            legacy: l.map(PathBuf::from),
        })
    };
    assert_eq!(
        e(&[("DRAGON_CONFIG", "/x/c"), ("HOME", "/h")]),
        p("/x/c", None)
    );
    assert_eq!(
        e(&[("XDG_CONFIG_HOME", "/cfg"), ("HOME", "/h")]),
        p("/cfg/dragon/dragon-config.json", Some("/cfg/dragon/config"))
    );
    assert_eq!(
        e(&[("HOME", "/h")]),
        p(
            "/h/.config/dragon/dragon-config.json",
            Some("/h/.config/dragon/config")
        )
    );
    assert_eq!(e(&[]), None);
    let c = DragonConfig::from_json(
        r#"{"ofi_runtime_lib": ["", "/a", "/b"], "ofi_provider": 3, "x": "y"}"#,
    )
    .unwrap();
    assert_eq!(
        c.get(KEY_OFI_RUNTIME_LIB),
        Some("/a"),
        "first non-empty of a list"
    );
    assert_eq!(c.get(KEY_OFI_PROVIDER), None, "not a string");
    assert_eq!(c.get("x"), Some("y"));
    assert!(DragonConfig::from_json("\"str\"").is_err());
    assert!(DragonConfig::from_legacy("a=1\nnoequals\n").is_none());
    let c = DragonConfig::from_legacy(" a = 1 \n#x=2\n\nb=x=y\na=3\n").unwrap();
    assert_eq!(
        (c.get("a"), c.get("b"), c.get("x")),
        (Some("3"), Some("x=y"), None)
    );
}
