//! Multi-node bring-up: the node agents of one runtime meet over the transport.
//!
//! Every member agent (nodes 1..n) is started with its node index and the runtime's
//! [`Secret`] (in its environment, never on a command line), opens its transport endpoint
//! and reports the endpoint's address to the launcher on its standard output (what `srun`,
//! `ssh` and a local start all carry back). The primary (node 0, the launcher) then dials
//! every member (the transport's lower node id dials; its HMAC handshake proves both sides
//! hold the secret before anything is decoded); each member sends [`ClusterMsg::Hello`] with
//! its [`NodeInfo`]. When every member said hello, the primary sends the whole table
//! ([`ClusterMsg::Table`]) to each; members then connect to each other, so every pair of
//! nodes has a connection. A member that is not connected and has not said hello within the
//! bring-up bound is named in [`ClusterError::Missing`].
//!
//! Afterwards [`Cluster::next_event`] tells a member that the primary ended the runtime
//! ([`ClusterEvent::Shutdown`]) or that a node was lost ([`ClusterEvent::NodeLost`]).
//!
//! Messages are serde types encoded like the agent protocol ([`crate::proto::encode`]).

use std::time::{Duration, Instant};

use dragon_transport::{Event, NodeId, PeerAddr, Transport, TransportError};
use serde::{Deserialize, Serialize};

use crate::proto::{decode, encode};

/// What the runtime knows of a node.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// Node index (0 = primary).
    pub node: u32,
    /// Node name: the host name, `SLURMD_NODENAME` under Slurm, `<host>-n<k>` for a local node.
    pub name: String,
    /// The host name.
    pub hostname: String,
    /// The address other nodes reach this one at.
    pub ip: String,
    /// The transport endpoint's address.
    pub transport: String,
    /// The node agent's pid (on its host).
    pub agent_pid: u32,
    /// CPUs the node's processes may use.
    pub num_cpus: u32,
    /// Physical memory in bytes.
    pub physical_mem: u64,
    /// Visible GPU device indices.
    pub gpus: Vec<u32>,
    /// GPU vendor (`nvidia`, `amd`, `intel`) or empty.
    pub gpu_vendor: String,
    /// The node's object server, `ip:port:ticket` (processes of other nodes use the node's
    /// queues, locks, events and values through it; see `dragon._objserver`), or empty.
    #[serde(default)]
    pub objects: String,
}

/// Bring-up and control messages between agents.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum ClusterMsg {
    /// A member announces itself to the primary.
    Hello(NodeInfo),
    /// The primary's table of every node, in node order.
    Table(Vec<NodeInfo>),
    /// The primary ends the runtime: members end their processes and exit.
    Shutdown,
    /// A request for the receiving node's agent; answered with [`ClusterMsg::Answer`].
    Forward {
        /// The sender's number for the answer.
        id: u64,
        /// The request.
        body: crate::proto::Request,
    },
    /// The answer to a [`ClusterMsg::Forward`].
    Answer {
        /// The forward's `id`.
        id: u64,
        /// The reply.
        body: crate::proto::Reply,
    },
}

/// Why bring-up failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// These nodes did not come up within the bound (or could not be dialled: `why`).
    #[error("node(s) {} did not come up within {:.1} s{}", fmt_nodes(.nodes), .waited.as_secs_f64(), .why)]
    Missing {
        /// Their indices.
        nodes: Vec<u32>,
        /// How long the primary waited.
        waited: Duration,
        /// Why the dials failed (`"; node N at ADDR: ERROR"` each); empty after a time-out.
        why: String,
    },
    /// The transport failed (the primary unreachable, the secret refused, ...).
    #[error("transport: {0}")]
    Transport(#[from] TransportError),
    /// A peer sent something bring-up does not allow.
    #[error("bring-up protocol: {0}")]
    Protocol(String),
}

fn fmt_nodes(n: &[u32]) -> String {
    n.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
}

/// What a running member learns from [`Cluster::next_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterEvent {
    /// The primary ended the runtime.
    Shutdown,
    /// The connection to this node is gone.
    NodeLost(u32),
    /// A message for the runtime's services (not bring-up).
    Message {
        /// Sender.
        node: u32,
        /// The message.
        msg: ClusterMsg,
    },
}

/// One node's view of the runtime's nodes, over its transport endpoint.
#[derive(Debug)]
pub struct Cluster {
    transport: Box<dyn Transport>,
    table: Vec<NodeInfo>,
    me: u32,
}

const STEP: Duration = Duration::from_millis(50);

impl Cluster {
    /// The primary: dials the `members` (their reported endpoint addresses) and waits until
    /// each said hello, at most `timeout` in all, then sends each the table. `me` is the
    /// primary's own entry.
    pub fn primary(
        transport: Box<dyn Transport>,
        mut me: NodeInfo,
        members: &[PeerAddr],
        timeout: Duration,
    ) -> Result<Cluster, ClusterError> {
        me.node = 0;
        me.transport = transport.address();
        let start = Instant::now();
        let mut table: Vec<Option<NodeInfo>> = vec![None; members.len() + 1];
        table[0] = Some(me);
        if members
            .iter()
            .any(|m| m.node.0 == 0 || m.node.0 as usize > members.len())
        {
            return Err(ClusterError::Protocol(
                "member indices must be 1..=n".into(),
            ));
        }
        // Each member on its own thread, so that one refusing, failing the handshake or not
        // answering at all neither delays the others nor makes them look missing; the error
        // names exactly the failed ones.
        let t: &dyn Transport = transport.as_ref();
        let results: Vec<Result<(), String>> = std::thread::scope(|scope| {
            let dials: Vec<_> = members
                .iter()
                .map(|m| {
                    scope.spawn(move || {
                        let left = timeout.saturating_sub(start.elapsed());
                        t.connect(std::slice::from_ref(m), left)
                            .map_err(|e| e.to_string())
                    })
                })
                .collect();
            dials
                .into_iter()
                .map(|d| d.join().unwrap_or_else(|_| Err("dial panicked".into())))
                .collect()
        });
        // Logged here, on the caller's thread (and its log subscriber).
        let mut failed: Vec<(u32, String)> = vec![];
        for (m, r) in members.iter().zip(results) {
            if let Err(e) = r {
                tracing::warn!("node {} at {} not connected: {e}", m.node.0, m.addr);
                failed.push((m.node.0, format!("; node {} at {}: {e}", m.node.0, m.addr)));
            }
        }
        failed.sort_unstable();
        if !failed.is_empty() {
            return Err(ClusterError::Missing {
                nodes: failed.iter().map(|f| f.0).collect(),
                waited: start.elapsed(),
                why: failed.into_iter().map(|f| f.1).collect(),
            });
        }
        let n = members.len() as u32;
        while table.iter().any(Option::is_none) {
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(missing(&table, start.elapsed()));
            }
            match transport.recv(Some(left.min(STEP))) {
                Ok(Event::Message { peer, data }) => match decode::<ClusterMsg>(&data) {
                    Ok(ClusterMsg::Hello(info))
                        if info.node == peer.0 && (1..=n).contains(&peer.0) =>
                    {
                        tracing::debug!("node {} ({}) said hello", info.node, info.name);
                        table[peer.0 as usize] = Some(info);
                    }
                    Ok(m) => {
                        return Err(ClusterError::Protocol(format!(
                            "unexpected {m:?} from node {}",
                            peer.0
                        )))
                    }
                    Err(e) => return Err(ClusterError::Protocol(e)),
                },
                Ok(Event::PeerLost { peer }) => {
                    tracing::warn!("node {} was lost during bring-up", peer.0);
                }
                Ok(_) | Err(TransportError::TimedOut) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let table: Vec<NodeInfo> = table.into_iter().flatten().collect();
        let msg = encode(&ClusterMsg::Table(table.clone()));
        for m in members {
            transport.send(m.node, &msg, Some(timeout))?;
        }
        tracing::info!("{} node(s) up", table.len());
        Ok(Cluster {
            transport,
            table,
            me: 0,
        })
    }

    /// A member: waits for the primary to dial it, says hello with `me`, waits for the
    /// table and connects to every other member, all within `timeout`.
    pub fn member(
        transport: Box<dyn Transport>,
        mut me: NodeInfo,
        timeout: Duration,
    ) -> Result<Cluster, ClusterError> {
        let start = Instant::now();
        me.node = transport.node().0;
        me.transport = transport.address();
        let node = me.node;
        // The primary (the lower id) dials: the address is not used for dialing.
        let primary = PeerAddr {
            node: NodeId(0),
            addr: String::new(),
        };
        transport.connect(std::slice::from_ref(&primary), timeout)?;
        transport.send(NodeId(0), &encode(&ClusterMsg::Hello(me)), Some(timeout))?;
        let table = loop {
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(TransportError::TimedOut.into());
            }
            match transport.recv(Some(left)) {
                Ok(Event::Message { peer, data }) if peer.0 == 0 => {
                    match decode::<ClusterMsg>(&data).map_err(ClusterError::Protocol)? {
                        ClusterMsg::Table(t) => break t,
                        ClusterMsg::Shutdown => {
                            return Err(ClusterError::Protocol("shut down during bring-up".into()))
                        }
                        m => return Err(ClusterError::Protocol(format!("unexpected {m:?}"))),
                    }
                }
                Ok(Event::PeerLost { peer }) if peer.0 == 0 => {
                    return Err(TransportError::PeerLost.into())
                }
                Ok(_) => {}
                Err(e) => return Err(e.into()),
            }
        };
        // The transport dials the members after us and waits for those before us.
        let peers: Vec<PeerAddr> = table
            .iter()
            .filter(|n| n.node != node && n.node != 0)
            .map(|n| PeerAddr {
                node: NodeId(n.node),
                addr: n.transport.clone(),
            })
            .collect();
        transport.connect(&peers, timeout.saturating_sub(start.elapsed()))?;
        Ok(Cluster {
            transport,
            table,
            me: node,
        })
    }

    /// Every node, in node order.
    pub fn table(&self) -> &[NodeInfo] {
        &self.table
    }

    /// This node's index.
    pub fn node(&self) -> u32 {
        self.me
    }

    /// The endpoint (for services that send their own messages).
    pub fn transport(&self) -> &dyn Transport {
        self.transport.as_ref()
    }

    /// Primary: tells every member to end (best effort: lost members are skipped).
    pub fn shutdown(&self, timeout: Duration) {
        let msg = encode(&ClusterMsg::Shutdown);
        for n in self.table.iter().filter(|n| n.node != self.me) {
            if let Err(e) = self.transport.send(NodeId(n.node), &msg, Some(timeout)) {
                tracing::debug!("shutdown of node {} not sent: {e}", n.node);
            }
        }
    }

    /// The next event, waiting at most `timeout`; `None` when nothing happened.
    pub fn next_event(&self, timeout: Duration) -> Option<ClusterEvent> {
        match self.transport.recv(Some(timeout)) {
            Ok(Event::Message { peer, data }) => match decode::<ClusterMsg>(&data) {
                Ok(ClusterMsg::Shutdown) if peer.0 == 0 => Some(ClusterEvent::Shutdown),
                Ok(msg) => Some(ClusterEvent::Message { node: peer.0, msg }),
                Err(e) => {
                    tracing::warn!("dropped a message from node {}: {e}", peer.0);
                    None
                }
            },
            Ok(Event::PeerLost { peer }) => Some(ClusterEvent::NodeLost(peer.0)),
            Ok(Event::BlockFilled { .. }) | Err(TransportError::TimedOut) => None,
            Err(TransportError::Closed) => Some(ClusterEvent::Shutdown),
            Err(e) => {
                tracing::warn!("transport failed: {e}");
                None
            }
        }
    }

    /// Sends `msg` to `node` (waiting at most `timeout` for credit).
    pub fn send(
        &self,
        node: u32,
        msg: &ClusterMsg,
        timeout: Duration,
    ) -> Result<(), TransportError> {
        self.transport
            .send(NodeId(node), &encode(msg), Some(timeout))
    }

    /// Closes the endpoint.
    pub fn close(&self) {
        self.transport.close();
    }
}

fn missing(table: &[Option<NodeInfo>], waited: Duration) -> ClusterError {
    ClusterError::Missing {
        nodes: table
            .iter()
            .enumerate()
            .filter(|(_, n)| n.is_none())
            .map(|(i, _)| i as u32)
            .collect(),
        waited,
        why: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dragon_shm::heap::Pool;
    use dragon_shm::{SegmentKind, SegmentName};
    use dragon_transport::{Config, Secret};

    fn info(name: &str) -> NodeInfo {
        NodeInfo {
            node: 0,
            name: name.into(),
            hostname: "host".into(),
            ip: "127.0.0.1".into(),
            transport: String::new(),
            agent_pid: std::process::id(),
            num_cpus: 2,
            physical_mem: 1 << 30,
            gpus: vec![],
            gpu_vendor: String::new(),
            objects: String::new(),
        }
    }

    fn endpoint(rt: u64, node: u32, secret: &Secret) -> (Box<dyn Transport>, Pool) {
        let name = SegmentName::new(rt, node, SegmentKind::Pool, 1);
        let pool = Pool::create(&name, 1 << 20).expect("pool");
        let mut cfg = Config::new(NodeId(node), secret.clone(), pool.clone());
        cfg.peer_timeout = Duration::from_secs(2);
        (dragon_transport::open("tcp", cfg).expect("tcp"), pool)
    }

    /// Drops the pools (their creator's handles unlink them) and checks nothing is left.
    fn cleanup(pools: Vec<Pool>) {
        let rt = pools[0].name().runtime;
        drop(pools);
        assert!(dragon_shm::testing::leftovers(rt).is_empty());
    }

    fn addr(n: u32, t: &dyn Transport) -> PeerAddr {
        PeerAddr {
            node: NodeId(n),
            addr: t.address(),
        }
    }

    #[test]
    fn three_nodes_meet_and_share_one_table() {
        let rt = dragon_shm::testing::test_runtime();
        let secret = Secret::random();
        let (t0, p0) = endpoint(rt, 0, &secret);
        let mut pools = vec![p0];
        let mut addrs = vec![];
        let mut members = vec![];
        for n in 1..=2u32 {
            let (t, p) = endpoint(rt, n, &secret);
            pools.push(p);
            addrs.push(addr(n, t.as_ref()));
            members.push(std::thread::spawn(move || {
                Cluster::member(t, info(&format!("m{n}")), Duration::from_secs(10))
                    .expect("member up")
            }));
        }
        let primary = Cluster::primary(t0, info("p"), &addrs, Duration::from_secs(10)).expect("up");
        let members: Vec<Cluster> = members.into_iter().map(|h| h.join().unwrap()).collect();
        let names: Vec<&str> = primary.table().iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["p", "m1", "m2"]);
        assert_eq!(primary.table()[2].transport, addrs[1].addr);
        for m in &members {
            assert_eq!(m.table(), primary.table());
            // Every member is connected to every other node.
            let mut peers: Vec<u32> = m.transport().peers().iter().map(|p| p.0).collect();
            peers.sort();
            assert_eq!(peers.len(), 2, "node {} peers {peers:?}", m.node());
        }
        primary.shutdown(Duration::from_secs(2));
        for m in &members {
            let ev = (0..100).find_map(|_| m.next_event(Duration::from_millis(100)));
            assert_eq!(ev, Some(ClusterEvent::Shutdown));
        }
        for c in members.iter().chain(std::iter::once(&primary)) {
            c.close();
        }
        drop((members, primary)); // their endpoints hold the pools too
        cleanup(pools);
    }

    #[test]
    fn a_silent_member_does_not_make_the_next_one_look_missing() {
        let rt = dragon_shm::testing::test_runtime();
        let secret = Secret::random();
        let (t0, p0) = endpoint(rt, 0, &secret);
        let (t2, p2) = endpoint(rt, 2, &secret);
        // Node 1 accepts TCP connections (the kernel completes them) but never answers the
        // handshake: dialled one after the other, it would use up the whole bound and node 2,
        // dialled after it, would be reported missing too.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addrs = [
            PeerAddr {
                node: NodeId(1),
                addr: silent.local_addr().unwrap().to_string(),
            },
            addr(2, t2.as_ref()),
        ];
        let m = std::thread::spawn(move || {
            Cluster::member(t2, info("m2"), Duration::from_secs(10)).map(|c| c.close())
        });
        let e = Cluster::primary(t0, info("p"), &addrs, Duration::from_millis(1500)).unwrap_err();
        match &e {
            ClusterError::Missing { nodes, .. } => assert_eq!(nodes, &[1]),
            e => panic!("{e}"),
        }
        assert!(m.join().unwrap().is_err());
        drop(silent);
        cleanup(vec![p0, p2]);
    }

    #[test]
    fn a_node_that_never_comes_up_is_named() {
        let rt = dragon_shm::testing::test_runtime();
        let secret = Secret::random();
        let (t0, p0) = endpoint(rt, 0, &secret);
        let (t1, p1) = endpoint(rt, 1, &secret);
        // Node 2's address answers nothing: a listener nobody accepts on would still
        // complete TCP connects, so use a closed port (bound, then dropped).
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let addrs = [
            addr(1, t1.as_ref()),
            PeerAddr {
                node: NodeId(2),
                addr: closed.to_string(),
            },
        ];
        let m = std::thread::spawn(move || {
            Cluster::member(t1, info("m1"), Duration::from_secs(10)).map(|c| c.close())
        });
        let e = Cluster::primary(t0, info("p"), &addrs, Duration::from_millis(1500)).unwrap_err();
        match &e {
            ClusterError::Missing { nodes, .. } => assert_eq!(nodes, &[2]),
            e => panic!("{e}"),
        }
        assert!(
            e.to_string()
                .starts_with("node(s) 2 did not come up within "),
            "{e}"
        );
        // The dial's own error is named too.
        assert!(
            e.to_string().contains(&format!("; node 2 at {closed}: ")),
            "{e}"
        );
        // The member that came up sees its primary go.
        assert!(m.join().unwrap().is_err());
        cleanup(vec![p0, p1]);
    }

    #[test]
    fn a_member_with_another_secret_is_refused() {
        let rt = dragon_shm::testing::test_runtime();
        let (t0, p0) = endpoint(rt, 0, &Secret::random());
        let (t1, p1) = endpoint(rt, 1, &Secret::random());
        let addrs = [addr(1, t1.as_ref())];
        let m = std::thread::spawn(move || {
            Cluster::member(t1, info("m1"), Duration::from_secs(3)).map(|c| c.close())
        });
        let e = Cluster::primary(t0, info("p"), &addrs, Duration::from_millis(1500)).unwrap_err();
        assert!(
            matches!(&e, ClusterError::Missing { nodes, .. } if nodes == &[1]),
            "{e}"
        );
        assert!(m.join().unwrap().is_err());
        cleanup(vec![p0, p1]);
    }
}
