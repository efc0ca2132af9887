//! The worker binaries refuse bad usage with status 2 and a message (clap), before touching
//! any shared memory.

use std::process::Command;

fn run(bin: &str, args: &[&str]) -> (Option<i32>, String) {
    let o = Command::new(bin).args(args).output().unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn bad_usage_exits_2() {
    let shm = env!("CARGO_BIN_EXE_shm-worker");
    let sync = env!("CARGO_BIN_EXE_sync-worker");
    for (bin, args, says) in [
        (shm, &["bogus"][..], "unrecognized subcommand 'bogus'"),
        (shm, &["chan-produce", "c", "x", "1"], "invalid value 'x'"),
        (
            shm,
            &["alloc-loop", "not-a-pool", "1", "1"],
            "not a pool segment name",
        ),
        (sync, &["lock-hold"], "required arguments were not provided"),
        (
            sync,
            &["barrier", "p", "1:2:3", "1"],
            "not a pool segment name",
        ),
    ] {
        let (code, err) = run(bin, args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    let o = Command::new(sync).arg("--help").output().unwrap();
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("lock-count"));
}
