//! Conformance suite for every transport back end. Each check is a function of the back
//! end's name (`dragon_transport::open(name, ..)`); each `#[test]` runs it for every instance
//! in `INSTANCES` (`tcp`, and `ofi` over the `tcp;ofi_rxm` and `shm` providers), so a new back
//! end is tested by adding its name there (`every_backend_is_listed` checks `backends()`).
//! An `ofi` instance that cannot run here is skipped with `SKIP ...: REASON` on stderr.
//!
//! Every test uses its own random runtime id for pool names, checks that no segment of it is
//! left, and ends every process it starts.

#[path = "../support/mod.rs"]
mod support;

mod blocks;
mod hostile;
mod messages;
mod peers;

use std::process::Command;
use std::time::Duration;

use blocks::*;
use dragon_shm::heap::Pool;
use dragon_shm::testing::leftovers;
use dragon_shm::{SegmentKind, SegmentName};
use dragon_transport::{
    backends, Config, Event, NodeId, PeerAddr, Secret, Transport, TransportError,
};
use hostile::*;
use messages::*;
use peers::*;
use support::{peer_args, ChildPeer};

const T: Duration = Duration::from_secs(10);
const MIB: usize = 1 << 20;

// ---- helpers ------------------------------------------------------------------------------

struct Node {
    t: Box<dyn Transport>,
    pool: Pool,
}

impl Node {
    fn id(&self) -> NodeId {
        self.t.node()
    }
    fn addr(&self) -> PeerAddr {
        PeerAddr {
            node: self.t.node(),
            addr: self.t.address(),
        }
    }
}

fn pool_name(rt: u64, node: u32) -> SegmentName {
    SegmentName::new(rt, node, SegmentKind::Pool, 1)
}

fn make_node(
    backend: &str,
    rt: u64,
    id: u32,
    secret: &Secret,
    pool_bytes: usize,
    tweak: impl FnOnce(&mut Config),
) -> Node {
    let pool = Pool::create(&pool_name(rt, id), pool_bytes).expect("pool");
    let mut cfg = Config::new(NodeId(id), secret.clone(), pool.clone());
    tweak(&mut cfg);
    let t = dragon_transport::open(backend, cfg).expect("open");
    Node { t, pool }
}

fn connect_all(nodes: &[&Node]) {
    let addrs: Vec<PeerAddr> = nodes.iter().map(|n| n.addr()).collect();
    for n in nodes {
        n.t.connect(&addrs, T).expect("connect");
    }
}

fn fill(b: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    let mut words = b.chunks_exact_mut(8);
    for w in &mut words {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes());
    }
    for (i, t) in words.into_remainder().iter_mut().enumerate() {
        *t = (seed as u8).wrapping_add(i as u8);
    }
}

/// The next message, skipping nothing: anything else is a failure.
fn recv_msg(n: &Node) -> (NodeId, Vec<u8>) {
    match n.t.recv(Some(T)).expect("recv") {
        Event::Message { peer, data } => (peer, data),
        e => panic!("expected a message, got {e:?}"),
    }
}

fn finish(rt: u64, nodes: Vec<Node>) {
    for n in &nodes {
        n.t.close();
    }
    drop(nodes);
    assert!(
        leftovers(rt).is_empty(),
        "segments left: {:?}",
        leftovers(rt)
    );
}

/// After dropping a bad peer, `a` has only `b` left and still serves it both ways, and
/// nothing else arrived at `a`.
fn still_serves(a: &Node, b: &Node) {
    assert_eq!(a.t.peers(), vec![b.id()]);
    a.t.send(b.id(), b"2", Some(T)).unwrap();
    assert_eq!(recv_msg(b).1, b"2");
    put_and_check(b, a, 100_000, 4);
    assert_eq!(
        a.t.recv(Some(Duration::from_millis(50))).err(),
        Some(TransportError::TimedOut)
    );
}

/// A `transport-peer` child on this host.
fn spawn_child(
    backend: &str,
    node: u32,
    secret: &Secret,
    pool: &Pool,
    timeout_ms: u64,
) -> ChildPeer {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_transport-peer"));
    cmd.args(peer_args(backend, node, secret, pool, timeout_ms, None));
    ChildPeer::spawn(cmd, "transport-peer")
}

/// Connects a node of this process (lower id, it dials) and a child peer.
fn connect_child(n: &Node, c: &mut ChildPeer, child_id: u32) {
    c.cmd(&format!("connect {} {}", n.id().0, n.t.address()));
    n.t.connect(
        &[PeerAddr {
            node: NodeId(child_id),
            addr: c.addr.clone(),
        }],
        T,
    )
    .expect("connect child");
    assert_eq!(c.line(), "connected");
}

// ---- one test per check, over every back end -----------------------------------------------

/// Back-end instances under test: `tcp`, and `ofi` over each provider that works here.
const INSTANCES: [&str; 3] = ["tcp", "ofi:tcp;ofi_rxm", "ofi:shm"];

/// The instances to run: all of [`INSTANCES`] (or those named, comma-separated, in
/// `DRAGON_TEST_BACKENDS`), less the `ofi` ones that cannot run here, each skipped with its
/// reason on stderr. With `DRAGON_REQUIRE_OFI=1` an unusable `ofi` instance fails instead.
fn instances() -> Vec<&'static str> {
    let only = std::env::var("DRAGON_TEST_BACKENDS").ok();
    INSTANCES
        .into_iter()
        .filter(|b| {
            only.as_deref()
                .is_none_or(|o| o.split(',').any(|x| x.trim() == *b))
        })
        .filter(|b| match b.strip_prefix("ofi:") {
            None => true,
            Some(p) => match dragon_transport::ofi::probe(p) {
                Ok(()) => true,
                Err(e) => {
                    assert!(
                        std::env::var("DRAGON_REQUIRE_OFI").as_deref() != Ok("1"),
                        "{b}: {e}"
                    );
                    eprintln!("SKIP {b}: libfabric not usable: {e}");
                    false
                }
            },
        })
        .collect()
}

#[test]
fn every_backend_is_listed() {
    for b in backends() {
        assert!(
            INSTANCES
                .iter()
                .any(|i| i == b || i.starts_with(&format!("{b}:"))),
            "back end {b} has no conformance instance"
        );
    }
}

macro_rules! conformance {
    ($($name:ident => $f:ident),* $(,)?) => {$(
        #[test]
        fn $name() {
            for b in instances() {
                eprintln!("{}: back end {b}", stringify!($name));
                $f(b);
            }
        }
    )*};
}
conformance! {
    ordering => ordering_on,
    large_messages => large_messages_on,
    back_pressure => back_pressure_on,
    payloads_1b_to_256mib => payloads_on,
    many_peers => many_peers_on,
    killed_peer => killed_peer_on,
    stalled_peer => stalled_peer_on,
    wrong_secret => wrong_secret_on,
    garbage_frames => garbage_frames_on,
}
