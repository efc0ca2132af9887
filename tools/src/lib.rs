//! `dragon-shm`: list, inspect and clean Dragon-RS shared-memory segments. The command is
//! [`run`], shared by the `dragon-shm` binary and the Python console script of the same name
//! (through `dragon._native.shm_main`).
//!
//! Only names that parse as ours (`/dragon-<rt>-<node>-<kind>-<id>`) are ever opened or
//! removed; any other file in `/dev/shm` is left alone. Exit codes: 0 success, 1 an
//! operation failed, 2 bad usage or a name that is not ours / does not exist.

use std::time::Duration;

use clap::{Parser, Subcommand};
use dragon_shm::segment::{self, SegmentInfo};
use dragon_shm::{channel, heap, Segment, SegmentError, SegmentKind, SegmentName};
use serde_json::{json, Value};

/// Inspect and clean Dragon-RS shared-memory segments in /dev/shm.
#[derive(Parser, Debug)]
#[command(name = "dragon-shm", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// List our segments: runtime, node, kind, id, size, creator pid, alive or dead.
    Ls {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Only segments of this runtime (16 hex digits).
        #[arg(long, value_parser = parse_runtime)]
        runtime: Option<u64>,
    },
    /// Show one segment: pool statistics, channel depth/capacity/waiters, or its header.
    Show {
        /// Segment name, with or without the leading '/'.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove our segments whose creator process is dead (never anything else).
    Clean {
        /// Print what would be removed without removing it.
        #[arg(long)]
        dry_run: bool,
        /// Only segments of this runtime (16 hex digits).
        #[arg(long, value_parser = parse_runtime)]
        runtime: Option<u64>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Test hook: create a pool segment and exit without removing it (its creator is then
    /// dead).
    #[command(name = "__make-test-segment", hide = true)]
    MakeTestSegment {
        /// Pool segment name.
        name: String,
        /// Size in bytes.
        size: usize,
    },
}

fn parse_runtime(s: &str) -> Result<u64, String> {
    if s.len() != 16 {
        return Err("a runtime id is 16 hex digits".into());
    }
    u64::from_str_radix(s, 16).map_err(|_| "a runtime id is 16 hex digits".into())
}

/// A user-facing failure: message and exit code.
struct Fail(String, u8);

/// Runs `dragon-shm` with `args` (the program name first); returns the exit code.
pub fn run<I, T>(args: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    let r = match cli.cmd {
        Cmd::Ls { json, runtime } => ls(json, runtime),
        Cmd::Show { name, json } => show(&name, json),
        Cmd::Clean {
            dry_run,
            runtime,
            json,
        } => clean(dry_run, runtime, json),
        Cmd::MakeTestSegment { name, size } => make_test_segment(&name, size),
    };
    match r {
        Ok(()) => 0,
        Err(Fail(msg, code)) => {
            eprintln!("dragon-shm: {msg}");
            i32::from(code)
        }
    }
}

fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn list(runtime: Option<u64>) -> Result<(Vec<SegmentName>, Vec<String>), Fail> {
    let (ours, odd) = segment::list().map_err(|e| Fail(format!("cannot read /dev/shm: {e}"), 1))?;
    Ok((
        ours.into_iter()
            .filter(|n| runtime.is_none_or(|r| n.runtime == r))
            .collect(),
        odd,
    ))
}

fn info_json(n: &SegmentName, i: Result<SegmentInfo, SegmentError>) -> Value {
    let mut v = json!({
        "name": n.to_string(),
        "runtime": format!("{:016x}", n.runtime),
        "node": n.node,
        "kind": n.kind.word(),
        "id": n.id,
    });
    match i {
        Ok(i) => {
            v["size"] = json!(i.size);
            v["creator_pid"] = json!(i.creator.pid);
            v["alive"] = json!(i.creator_alive);
            v["version"] = json!(i.version);
        }
        Err(e) => v["error"] = json!(e.to_string()),
    }
    v
}

fn ls(as_json: bool, runtime: Option<u64>) -> Result<(), Fail> {
    let (ours, odd) = list(runtime)?;
    if as_json {
        let segs: Vec<Value> = ours
            .iter()
            .map(|n| info_json(n, segment::inspect(n)))
            .collect();
        let out = json!({ "segments": segs, "not_ours": odd });
        println!("{}", serde_json::to_string_pretty(&out).expect("json"));
        return Ok(());
    }
    if ours.is_empty() {
        println!("no Dragon-RS segments in /dev/shm");
    } else {
        println!(
            "{:<16} {:>4} {:<5} {:>6} {:>10} {:>8} {:<5} {:>3}",
            "RUNTIME", "NODE", "KIND", "ID", "SIZE", "CREATOR", "STATE", "VER"
        );
        for n in &ours {
            match segment::inspect(n) {
                Ok(i) => println!(
                    "{:016x} {:>4} {:<5} {:>6} {:>10} {:>8} {:<5} {:>3}",
                    n.runtime,
                    n.node,
                    n.kind.word(),
                    n.id,
                    human(i.size),
                    i.creator.pid,
                    if i.creator_alive { "alive" } else { "dead" },
                    i.version
                ),
                Err(e) => println!(
                    "{:016x} {:>4} {:<5} {:>6} unreadable: {e}",
                    n.runtime,
                    n.node,
                    n.kind.word(),
                    n.id
                ),
            }
        }
    }
    for o in &odd {
        println!("not ours (ignored): /dev/shm/{o}");
    }
    Ok(())
}

fn open_ro(name: &str) -> Result<(SegmentName, Segment), Fail> {
    let n = SegmentName::parse(name)
        .map_err(|_| Fail(format!("not a Dragon-RS segment name: {name}"), 2))?;
    match Segment::open(&n, Duration::from_millis(200), false) {
        Ok(s) => Ok((n, s)),
        Err(SegmentError::Os(e)) if e == nix_enoent() => {
            Err(Fail(format!("no such segment: {name}"), 2))
        }
        Err(e) => Err(Fail(format!("{name}: {e}"), 1)),
    }
}

fn nix_enoent() -> dragon_shm::platform::Errno {
    dragon_shm::platform::Errno::ENOENT
}

fn show(name: &str, as_json: bool) -> Result<(), Fail> {
    let (n, seg) = open_ro(name)?;
    let info = segment::inspect(&n).map_err(|e| Fail(format!("{name}: {e}"), 1))?;
    let mut v = info_json(&n, Ok(info));
    let mut lines: Vec<(String, String)> = vec![
        ("name".into(), n.to_string()),
        ("kind".into(), n.kind.word().into()),
        (
            "size".into(),
            format!("{} ({} bytes)", human(info.size), info.size),
        ),
        (
            "creator".into(),
            format!(
                "pid {} ({})",
                info.creator.pid,
                if info.creator_alive { "alive" } else { "dead" }
            ),
        ),
        ("layout version".into(), info.version.to_string()),
    ];
    match n.kind {
        SegmentKind::Pool => {
            let s = heap::stats_of(&seg).map_err(|e| Fail(format!("{name}: {e}"), 1))?;
            v["pool"] = json!({
                "capacity": s.capacity, "used": s.used, "free": s.free,
                "largest_free": s.largest_free, "blocks": s.blocks,
                "free_blocks": s.free_blocks, "holds": s.holds, "processes": s.processes,
            });
            lines.extend([
                ("capacity".into(), human(s.capacity)),
                ("used".into(), human(s.used)),
                ("free".into(), human(s.free)),
                ("largest free block".into(), human(s.largest_free)),
                ("used blocks".into(), s.blocks.to_string()),
                ("free blocks".into(), s.free_blocks.to_string()),
                ("holds".into(), s.holds.to_string()),
                ("processes".into(), s.processes.to_string()),
            ]);
            if let Some(k) = dragon_shm::kv::stats_in(&seg) {
                // The index holds its header, its table and each key and value once; every
                // other hold is a process's: a DDict handle or a reader's view of a value.
                let readers = s.holds.saturating_sub(2 + 2 * k.count);
                v["ddict_manager"] = json!({
                    "keys": k.count, "bytes": k.bytes, "table_slots": k.capacity,
                    "puts": k.puts, "gets": k.gets, "misses": k.misses, "frozen": k.frozen,
                    "process_holds": readers,
                });
                lines.extend([
                    ("ddict manager".into(), "yes".into()),
                    ("ddict keys".into(), k.count.to_string()),
                    ("ddict bytes".into(), human(k.bytes)),
                    (
                        "ddict puts / gets".into(),
                        format!("{} / {}", k.puts, k.gets),
                    ),
                    ("ddict frozen".into(), k.frozen.to_string()),
                    (
                        "held by processes".into(),
                        format!("{readers} (handles and readers' views)"),
                    ),
                ]);
            }
        }
        SegmentKind::Channel => {
            let s = channel::stats_of(&seg).map_err(|e| Fail(format!("{name}: {e}"), 1))?;
            v["channel"] = json!({
                "capacity": s.capacity, "depth": s.depth, "slot_size": s.slot_size,
                "pool_id": s.pool_id, "closed": s.closed, "send_waiters": s.send_waiters,
                "recv_waiters": s.recv_waiters, "sent": s.sent, "received": s.received,
                "mid_operation": s.mid_operation, "uncommitted_send": s.uncommitted_send,
                "uncommitted_recv": s.uncommitted_recv,
            });
            lines.extend([
                ("depth".into(), format!("{} of {}", s.depth, s.capacity)),
                ("slot size".into(), human(s.slot_size)),
                (
                    "pool id".into(),
                    if s.pool_id == 0 {
                        "none".into()
                    } else {
                        s.pool_id.to_string()
                    },
                ),
                ("closed".into(), s.closed.to_string()),
                ("blocked senders".into(), s.send_waiters.to_string()),
                ("blocked receivers".into(), s.recv_waiters.to_string()),
                (
                    "sent / received".into(),
                    format!("{} / {}", s.sent, s.received),
                ),
                ("mid-operation".into(), s.mid_operation.to_string()),
            ]);
            // A position reserved and not committed: a party mid-copy (gone at the next
            // look), or a dead one whose position the next sender or receiver publishes.
            if let Some(p) = s.uncommitted_send {
                lines.push((
                    "uncommitted send".into(),
                    format!("position {p} (receivers wait there; a dead sender's becomes a hole)"),
                ));
            }
            if let Some(p) = s.uncommitted_recv {
                lines.push((
                    "uncommitted receive".into(),
                    format!("position {p} (its slot is not free; a dead receiver's is freed)"),
                ));
            }
        }
        SegmentKind::Raw => {}
    }
    if as_json {
        println!("{}", serde_json::to_string_pretty(&v).expect("json"));
    } else {
        for (k, val) in lines {
            println!("{k:<20} {val}");
        }
    }
    Ok(())
}

fn clean(dry_run: bool, runtime: Option<u64>, as_json: bool) -> Result<(), Fail> {
    let (ours, _) = list(runtime)?;
    let (mut removed, mut kept, mut failed) = (Vec::new(), 0u64, Vec::new());
    for n in ours {
        let dead = match segment::inspect(&n) {
            Ok(i) => !i.creator_alive,
            // A segment whose header cannot be read (creator died while sizing it, or
            // corrupt) but whose name is ours is debris.
            Err(SegmentError::BadSize) | Err(SegmentError::BadMagic) => true,
            Err(_) => false,
        };
        if !dead {
            kept += 1;
            continue;
        }
        if dry_run {
            removed.push(n.to_string());
            continue;
        }
        match dragon_shm::platform::shm_remove(&n.os_name()) {
            Ok(()) => removed.push(n.to_string()),
            Err(e) => failed.push(format!("{n}: {}", e.desc())),
        }
    }
    if as_json {
        let out =
            json!({ "dry_run": dry_run, "removed": removed, "kept_alive": kept, "failed": failed });
        println!("{}", serde_json::to_string_pretty(&out).expect("json"));
    } else {
        let verb = if dry_run { "would remove" } else { "removed" };
        for r in &removed {
            println!("{verb} {r}");
        }
        for f in &failed {
            println!("failed {f}");
        }
        println!(
            "{verb} {} segment(s); kept {kept} with a live creator",
            removed.len()
        );
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Fail(
            format!("{} segment(s) could not be removed", failed.len()),
            1,
        ))
    }
}

fn make_test_segment(name: &str, size: usize) -> Result<(), Fail> {
    let n = SegmentName::parse(name)
        .map_err(|_| Fail(format!("not a Dragon-RS segment name: {name}"), 2))?;
    let mut p = heap::Pool::create(&n, size).map_err(|e| Fail(format!("{name}: {e}"), 1))?;
    p.set_unlink_on_drop(false);
    Ok(())
}
