//! Two peers in two network namespaces joined by a veth pair (addresses 10.231.N.1/24 and
//! 10.231.N.2/24, N random), for `tcp` and `ofi` over `tcp;ofi_rxm`: connection and
//! authentication, ordered messages both ways, puts and gets with checksums (1 B to 16 MiB),
//! and a killed peer noticed across the link. Each peer is a `transport-peer` process started
//! with `ip netns exec`; the pools are created here (namespaces do not separate `/dev/shm`).
//!
//! Needs root and the `ip` tool; otherwise (or when namespaces cannot be made) it prints
//! `SKIP netns: REASON` and passes. The namespaces are removed at the end, also on failure.

mod support;

use std::process::Command;

use dragon_shm::heap::Pool;
use dragon_shm::platform::random_u64;
use dragon_shm::testing::{leftovers, test_runtime};
use dragon_shm::{SegmentKind, SegmentName};
use dragon_transport::testing::{checksum, hex, ref_hex};
use dragon_transport::Secret;
use support::{peer_args, ChildPeer};

const MIB: usize = 1 << 20;

fn ip(args: &[&str]) -> Result<(), String> {
    let o = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        ))
    }
}

/// Two namespaces and a veth pair; removed on drop.
struct Netns {
    ns: [String; 2],
    addr: [String; 2],
}

impl Netns {
    fn create() -> Result<Netns, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not root".into());
        }
        let tag = format!("{:08x}", random_u64() as u32);
        let net = (random_u64() % 250) as u8 + 1;
        let n = Netns {
            ns: [format!("dtns-{tag}-a"), format!("dtns-{tag}-b")],
            addr: [format!("10.231.{net}.1"), format!("10.231.{net}.2")],
        };
        let veth = [format!("dtv{}a", &tag[..6]), format!("dtv{}b", &tag[..6])];
        ip(&["netns", "add", &n.ns[0]])?;
        ip(&["netns", "add", &n.ns[1]])?;
        ip(&[
            "link", "add", &veth[0], "type", "veth", "peer", "name", &veth[1],
        ])?;
        for ((v, ns), addr) in veth.iter().zip(&n.ns).zip(&n.addr) {
            ip(&["link", "set", v, "netns", ns])?;
            let cidr = format!("{addr}/24");
            ip(&["-n", ns, "addr", "add", &cidr, "dev", v])?;
            ip(&["-n", ns, "link", "set", v, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(n)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth end inside it (and so the pair).
        for ns in &self.ns {
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("netns cleanup: {e}");
            }
        }
    }
}

/// `transport-peer` in network namespace `ns`, listening on `listen`.
fn spawn_in(
    ns: &str,
    backend: &str,
    node: u32,
    s: &Secret,
    pool: &Pool,
    listen: &str,
) -> ChildPeer {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_transport-peer")]);
    cmd.args(peer_args(
        backend,
        node,
        s,
        pool,
        3000,
        Some(&format!("{listen}:0")),
    ));
    ChildPeer::spawn(cmd, &format!("transport-peer ({backend}) in {ns}"))
}

fn fill(b: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for v in b.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *v = x as u8;
    }
}

fn run(backend: &str, n: &Netns) {
    let rt = test_runtime();
    let s = Secret::random();
    // Nodes 1 (first namespace) and 2 (second); node 0 is an impostor.
    let pools: Vec<Pool> = (1..3)
        .map(|i| Pool::create(&SegmentName::new(rt, i, SegmentKind::Pool, 1), 48 * MIB).unwrap())
        .collect();
    let mut p0 = spawn_in(&n.ns[0], backend, 1, &s, &pools[0], &n.addr[0]);
    let mut p1 = spawn_in(&n.ns[1], backend, 2, &s, &pools[1], &n.addr[1]);
    assert!(p0.addr.starts_with(&n.addr[0]), "{}", p0.addr);
    // The lower id dials; the other waits for it.
    p1.cmd(&format!("connect 1 {}", p0.addr));
    p0.cmd(&format!("connect 2 {}", p1.addr));
    assert_eq!(
        p0.line(),
        "connected",
        "{backend}: connect across namespaces"
    );
    assert_eq!(p1.line(), "connected");
    // A peer with the wrong secret, dialing across the link, is refused.
    let bad_pool = Pool::create(&SegmentName::new(rt, 0, SegmentKind::Pool, 1), 4 * MIB).unwrap();
    let mut bad = spawn_in(
        &n.ns[0],
        backend,
        0,
        &Secret::random(),
        &bad_pool,
        &n.addr[0],
    );
    let r = bad.ask(&format!("connect 2 {}", p1.addr));
    assert!(
        r.starts_with("error"),
        "{backend}: wrong secret accepted: {r}"
    );
    drop(bad);
    // Ordered messages both ways.
    for i in 0..200u32 {
        let m = hex(&i.to_le_bytes());
        assert_eq!(p0.ask(&format!("send 2 {m}")), "sent");
        assert_eq!(p1.ask(&format!("send 1 {m}")), "sent");
    }
    for i in 0..200u32 {
        let m = hex(&i.to_le_bytes());
        assert_eq!(p1.ask("recv"), format!("msg 1 {m}"));
        assert_eq!(p0.ask("recv"), format!("msg 2 {m}"));
    }
    // Puts 0 -> 1 and gets back, with checksums.
    for (k, len) in [1usize, 4096 + 3, MIB + 3, 16 * MIB]
        .into_iter()
        .enumerate()
    {
        let mut src = pools[0].alloc(len).unwrap();
        fill(src.as_mut_slice(), k as u64 + 7);
        let want = checksum(src.as_slice());
        let dst = pools[1].alloc_zeroed(len).unwrap();
        let r = p0.ask(&format!(
            "put 2 {} {} {len} {k}",
            ref_hex(&src.block_ref()),
            ref_hex(&dst.block_ref())
        ));
        assert_eq!(r, "done", "{backend}: put of {len} bytes");
        assert_eq!(p1.ask("recv"), format!("filled 1 {k} {len} {want}"));
        assert_eq!(checksum(dst.as_slice()), want);
        let back = pools[0].alloc_zeroed(len).unwrap();
        let r = p0.ask(&format!(
            "get 2 {} {} {len}",
            ref_hex(&dst.block_ref()),
            ref_hex(&back.block_ref())
        ));
        assert_eq!(r, "done", "{backend}: get of {len} bytes");
        assert_eq!(checksum(back.as_slice()), want);
    }
    // A killed peer is noticed across the link.
    p1.kill();
    assert_eq!(p0.ask("recv"), "lost 2", "{backend}: killed peer");
    drop((p0, p1));
    drop((pools, bad_pool));
    assert!(
        leftovers(rt).is_empty(),
        "segments left: {:?}",
        leftovers(rt)
    );
}

#[test]
fn peers_in_two_network_namespaces() {
    let n = match Netns::create() {
        Ok(n) => n,
        Err(e) => {
            eprintln!("SKIP netns: {e}");
            return;
        }
    };
    run("tcp", &n);
    match dragon_transport::ofi::probe("tcp;ofi_rxm") {
        Ok(()) => run("ofi:tcp;ofi_rxm", &n),
        Err(e) => eprintln!("SKIP netns ofi:tcp;ofi_rxm: libfabric not usable: {e}"),
    }
}
