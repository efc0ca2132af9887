//! `dragon-shm` run as a real binary: listing, showing, cleaning, errors.

use std::process::{Command, Output};

use dragon_shm::channel::Channel;
use dragon_shm::heap::Pool;
use dragon_shm::testing::{leftovers, test_runtime};
use dragon_shm::{SegmentKind, SegmentName};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_dragon-shm");

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("run dragon-shm")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json(o: &Output) -> Value {
    assert!(o.status.success(), "failed: {}", stderr(o));
    serde_json::from_slice(&o.stdout).expect("valid JSON")
}

fn rt_hex(rt: u64) -> String {
    format!("{rt:016x}")
}

#[test]
fn ls_lists_our_pool_alive_and_json_has_fields() {
    let rt = test_runtime();
    {
        let name = SegmentName::new(rt, 3, SegmentKind::Pool, 7);
        let _pool = Pool::create(&name, 1 << 20).unwrap();
        let o = run(&["ls", "--runtime", &rt_hex(rt)]);
        assert!(o.status.success());
        let out = stdout(&o);
        let row = out
            .lines()
            .find(|l| l.starts_with(&rt_hex(rt)))
            .expect("our row");
        let f: Vec<&str> = row.split_whitespace().collect();
        assert_eq!((f[1], f[2], f[3]), ("3", "pool", "7"));
        assert!(
            row.contains(&std::process::id().to_string()),
            "creator pid in {row}"
        );
        assert!(row.contains("alive"));
        let v = json(&run(&["ls", "--json", "--runtime", &rt_hex(rt)]));
        let segs = v["segments"].as_array().unwrap();
        assert_eq!(segs.len(), 1);
        let s = &segs[0];
        assert_eq!(s["name"], name.to_string());
        assert_eq!(s["kind"], "pool");
        assert_eq!(s["node"], 3);
        assert_eq!(s["size"], 1 << 20);
        assert_eq!(s["creator_pid"], std::process::id());
        assert_eq!(s["alive"], true);
    }
    assert!(leftovers(rt).is_empty());
    let o = run(&["ls", "--runtime", &rt_hex(rt)]);
    assert!(stdout(&o).contains("no Dragon-RS segments"));
}

#[test]
fn show_pool_matches_stats() {
    let rt = test_runtime();
    {
        let name = SegmentName::new(rt, 0, SegmentKind::Pool, 1);
        let pool = Pool::create(&name, 4 << 20).unwrap();
        let _blocks: Vec<_> = [100usize, 5000, 70_000]
            .iter()
            .map(|&n| pool.alloc(n).unwrap())
            .collect();
        let s = pool.stats();
        let v = json(&run(&["show", &name.to_string(), "--json"]));
        let p = &v["pool"];
        assert_eq!(p["capacity"], s.capacity);
        assert_eq!(p["used"], s.used);
        assert_eq!(p["blocks"], 3);
        assert_eq!(p["holds"], s.holds);
        assert_eq!(p["largest_free"], s.largest_free);
        // Without the leading slash, as listed in /dev/shm, in table form.
        let o = run(&["show", &name.file_name()]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(
            stdout(&o).contains("used blocks          3"),
            "{}",
            stdout(&o)
        );
    }
    assert!(leftovers(rt).is_empty());
}

#[test]
fn show_channel_depth_capacity_waiters() {
    let rt = test_runtime();
    {
        let pool = Pool::create(&SegmentName::new(rt, 0, SegmentKind::Pool, 1), 1 << 20).unwrap();
        let name = SegmentName::new(rt, 0, SegmentKind::Channel, 2);
        let ch = Channel::create(&name, 8, 64, Some(pool)).unwrap();
        for _ in 0..3 {
            ch.send(b"abc", None).unwrap();
        }
        let v = json(&run(&["show", &name.to_string(), "--json"]));
        let c = &v["channel"];
        assert_eq!(c["capacity"], 8);
        assert_eq!(c["depth"], 3);
        assert_eq!(c["slot_size"], 64);
        assert_eq!(c["pool_id"], 1);
        assert_eq!(c["recv_waiters"], 0);
        assert_eq!(c["closed"], false);
        assert_eq!(c["mid_operation"], 0);
        assert!(c["uncommitted_send"].is_null() && c["uncommitted_recv"].is_null());
        let o = run(&["show", &name.to_string()]);
        assert!(stdout(&o).contains("3 of 8"), "{}", stdout(&o));
    }
    assert!(leftovers(rt).is_empty());
}

#[test]
fn unknown_and_foreign_names_are_clear_errors() {
    let rt = test_runtime();
    let missing = SegmentName::new(rt, 0, SegmentKind::Pool, 9).to_string();
    let o = run(&["show", &missing]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("no such segment"), "{}", stderr(&o));
    let o = run(&["show", "/some-other-thing"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("not a Dragon-RS segment name"),
        "{}",
        stderr(&o)
    );
    let o = run(&["ls", "--bogus-flag"]);
    assert_eq!(o.status.code(), Some(2));
    let o = run(&["ls", "--runtime", "xyz"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn clean_removes_dead_creators_only_and_never_foreign_files() {
    let rt = test_runtime();
    let dead = SegmentName::new(rt, 0, SegmentKind::Pool, 1);
    let o = run(&["__make-test-segment", &dead.to_string(), "1048576"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let live = SegmentName::new(rt, 0, SegmentKind::Pool, 2);
    let pool = Pool::create(&live, 1 << 20).unwrap();
    let tag = format!("{:x}", test_runtime());
    let foreign1 = format!("/dev/shm/dragon-notours-{tag}");
    let foreign2 = format!("/dev/shm/other-{tag}");
    std::fs::write(&foreign1, b"not ours").unwrap();
    std::fs::write(&foreign2, b"not ours").unwrap();

    let o = run(&["ls", "--runtime", &rt_hex(rt)]);
    assert!(stdout(&o).contains("dead"));
    assert!(
        stdout(&o).contains(&format!("not ours (ignored): {foreign1}")),
        "{}",
        stdout(&o)
    );

    let v = json(&run(&[
        "clean",
        "--dry-run",
        "--json",
        "--runtime",
        &rt_hex(rt),
    ]));
    assert_eq!(v["removed"].as_array().unwrap().len(), 1);
    assert_eq!(leftovers(rt).len(), 2, "dry run removes nothing");

    let o = run(&["clean", "--runtime", &rt_hex(rt)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains(&format!("removed {dead}")),
        "{}",
        stdout(&o)
    );
    assert_eq!(
        leftovers(rt),
        vec![live],
        "the live creator's segment stays"
    );
    assert!(
        std::path::Path::new(&foreign1).exists(),
        "foreign file touched"
    );
    assert!(
        std::path::Path::new(&foreign2).exists(),
        "foreign file touched"
    );
    std::fs::remove_file(&foreign1).unwrap();
    std::fs::remove_file(&foreign2).unwrap();
    drop(pool);
    assert!(leftovers(rt).is_empty());
}
