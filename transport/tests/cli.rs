//! The command-line programs of the crate, run as processes: `dragon-config` keeps its
//! settings in a JSON file (add, show, clean round trip), and bad usage of `dragon-config`
//! and `transport-peer` exits with status 2 and says what is wrong.

use std::path::PathBuf;
use std::process::{Command, Output};

use dragon_transport::config::{ENV_CONFIG, ENV_OFI_PROVIDER, ENV_OFI_RUNTIME_LIB};

const CONFIG: &str = env!("CARGO_BIN_EXE_dragon-config");
const PEER: &str = env!("CARGO_BIN_EXE_transport-peer");

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let d = std::env::temp_dir().join(format!(
            "dragon-cli-test-{:016x}",
            dragon_shm::platform::random_u64()
        ));
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn config(file: &PathBuf, args: &[&str]) -> Output {
    Command::new(CONFIG)
        .args(args)
        .env(ENV_CONFIG, file)
        .env_remove(ENV_OFI_PROVIDER)
        .env_remove(ENV_OFI_RUNTIME_LIB)
        .output()
        .unwrap()
}

#[test]
fn dragon_config_json_round_trip() {
    let dir = TempDir::new();
    let file = dir.0.join("dragon-config.json");
    let o = config(
        &file,
        &[
            "add",
            "--ofi-runtime-lib=/opt/fabric/lib",
            "--ofi-provider",
            "shm",
        ],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"ofi_runtime_lib": "/opt/fabric/lib", "ofi_provider": "shm"})
    );
    let o = config(&file, &["show"]);
    assert!(o.status.success());
    let out = text(&o.stdout);
    assert!(
        out.contains("# in effect: ofi_runtime_lib=/opt/fabric/lib (from the file)"),
        "{out}"
    );
    assert!(
        out.contains("# in effect: ofi_provider=shm (from the file)"),
        "{out}"
    );
    let o = config(&file, &["clean"]);
    assert!(o.status.success());
    assert!(!file.exists());
}

#[test]
fn dragon_config_bad_flag_exits_2() {
    let dir = TempDir::new();
    let file = dir.0.join("dragon-config.json");
    let o = config(&file, &["add", "--bogus=1"]);
    assert_eq!(o.status.code(), Some(2));
    let err = text(&o.stderr);
    assert!(err.contains("unexpected argument '--bogus'"), "{err}");
    assert!(err.contains("Usage: dragon-config {add|--add|-a}"), "{err}");
    assert!(o.stdout.is_empty());
    assert!(!file.exists(), "bad usage writes nothing");
    let o = config(&file, &["--help"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(text(&o.stdout).contains("Usage: dragon-config"));
}

#[test]
fn transport_peer_bad_arguments_exit_2() {
    let secret = "ab".repeat(32);
    for (args, says) in [
        (&["tcp"][..], "required arguments were not provided"),
        (&["tcp", "x", "00", "p"], "invalid value 'x' for '<NODE>'"),
        (&["tcp", "1", "00", "p"], "expected 64 hex digits"),
        (
            &["tcp", "1", &secret, "p", "--frob"],
            "unexpected argument '--frob'",
        ),
    ] {
        let o = Command::new(PEER).args(args).output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let err = text(&o.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }
    let o = Command::new(PEER).arg("--help").output().unwrap();
    assert_eq!(o.status.code(), Some(0));
    let out = text(&o.stdout);
    assert!(out.contains("[PEER_TIMEOUT_MS] [LISTEN]"), "{out}");
    assert!(out.contains("put NODE SRC_REF DST_REF LEN TAG"), "{out}");
}
