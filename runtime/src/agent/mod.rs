//! The node agent (local services) and its client.
//!
//! The agent owns the node's pool (it creates it: the runtime lives exactly as long as the
//! agent's process) and a request channel in that pool. Its serving thread answers
//! [`Request`]s: it launches processes with [`spawn`](crate::spawn::spawn) (the requester's
//! descriptors are fetched with `pidfd_getfd`), keeps their exit codes (it is their parent,
//! so it reaps them), hands out ids and keeps the name registry. Every half second it reaps
//! ended children and sweeps the pool's holds of dead processes.
//!
//! A process finds the agent through `DRAGON_RUNTIME`
//! (`1:<runtime hex>:<node>:<request channel ref>`), opens the pool, attaches the request
//! channel and creates its own small reply channel in the pool ([`AgentClient`]). A client
//! waiting for a reply checks every [`LIVENESS_EVERY`] that the agent's process still runs,
//! so a dead agent is an error, never a hang.
//!
//! Files: this one (the [`Agent`] handle, constants, block-reference helpers), `state.rs`
//! (the process table, ids, registry), `serve.rs` (the serving thread: requests, launches,
//! maintenance), `remote.rs` (requests between the agents of a multi-node runtime),
//! `client.rs` ([`AgentClient`], [`ClientError`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use dragon_shm::channel::{Channel, ChannelError};
use dragon_shm::heap::{BlockRef, Pool};
use dragon_shm::name::{SegmentKind, SegmentName};
use dragon_shm::SegmentError;
use nix::errno::Errno;

use dragon_transport::{
    Config as TransportConfig, NodeId, PeerAddr, Secret, Transport, TransportError,
};

use crate::cluster::{Cluster, ClusterError, NodeInfo};
use crate::proto::{AgentError, Launch, Reply, WireRef};
use crate::spawn::SpawnError;

mod client;
mod remote;
mod serve;
mod state;
#[cfg(test)]
mod tests;

pub use client::{AgentClient, AgentWaits, ClientError};
pub use state::{node_of, NODE_SHIFT};
use state::{Origin, Replies, State};

/// Version of the `DRAGON_RUNTIME` value.
pub const ENV_VERSION: &str = "1";
/// First id of every id kind (DragonHPC's user ids also start above 2^32).
pub const ID_BASE: u64 = 1 << 32;
/// How often a waiting client checks that the agent still runs.
pub const LIVENESS_EVERY: Duration = Duration::from_millis(250);
const MAINTENANCE_EVERY: Duration = Duration::from_millis(500);
const REQUEST_CAPACITY: u64 = 64;
const REQUEST_SLOT: usize = 1024;
const REPLY_CAPACITY: u64 = 4;
const REPLY_SLOT: usize = 256;
/// Answers an [`AgentWaits`] reply channel holds (and so processes it waits for at once).
pub const WAITS_CAPACITY: u64 = 256;

fn wire(r: BlockRef) -> WireRef {
    WireRef {
        segment: r.segment,
        offset: r.offset,
        len: r.len,
        gen: r.gen,
    }
}

fn block_ref(w: WireRef) -> BlockRef {
    BlockRef {
        segment: w.segment,
        offset: w.offset,
        len: w.len,
        gen: w.gen,
        _pad: 0,
    }
}

/// Formats a channel reference for `DRAGON_RUNTIME`.
pub fn format_ref(r: BlockRef) -> String {
    format!("{:x}.{:x}.{:x}.{:x}", r.segment, r.offset, r.len, r.gen)
}

/// Parses [`format_ref`]'s output.
pub fn parse_ref(s: &str) -> Option<BlockRef> {
    let p: Vec<&str> = s.split('.').collect();
    if p.len() != 4 {
        return None;
    }
    let n = |i: usize| u64::from_str_radix(p[i], 16).ok();
    Some(BlockRef {
        segment: n(0)?,
        offset: n(1)?,
        len: n(2)?,
        gen: u32::try_from(n(3)?).ok()?,
        _pad: 0,
    })
}

#[derive(Debug)]
struct Shared {
    pool: Pool,
    requests: Channel,
    state: Mutex<State>,
    stop: AtomicBool,
    runtime: u64,
    node: u32,
    /// Reply channels attached so far, by reference, with the requester's pid.
    replies: Mutex<Replies>,
    /// A transport endpoint opened for bring-up, until the cluster takes it.
    endpoint: Mutex<Option<Box<dyn Transport>>>,
    /// The runtime's nodes, once bring-up finished (multi-node only).
    cluster: OnceLock<Cluster>,
    cluster_thread: Mutex<Option<JoinHandle<()>>>,
    /// Requests forwarded to other nodes, by number: (node, who asked).
    forwards: Mutex<HashMap<u64, (u32, Origin)>>,
    next_forward: AtomicU64,
    /// The primary asked this member to end the runtime.
    shutdown_requested: AtomicBool,
    /// Nodes whose connection was lost.
    lost: Mutex<Vec<u32>>,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        locked(&self.state)
    }

    fn replies(&self) -> MutexGuard<'_, Replies> {
        locked(&self.replies)
    }

    fn forwards(&self) -> MutexGuard<'_, HashMap<u64, (u32, Origin)>> {
        locked(&self.forwards)
    }

    fn lost(&self) -> MutexGuard<'_, Vec<u32>> {
        locked(&self.lost)
    }

    /// The `DRAGON_RUNTIME` value for processes of this agent.
    fn env_value(&self) -> String {
        format!(
            "{ENV_VERSION}:{:016x}:{}:{}",
            self.runtime,
            self.node,
            format_ref(self.requests.block_ref().expect("block channel"))
        )
    }

    /// Reaps ended children and answers those waiting for them; returns the launched ones
    /// as (p_uid, pid, exit code).
    fn reap(&self) -> Vec<(u64, i32, i32)> {
        let (ended, answers) = {
            let mut st = self.state();
            let ended = st.reap();
            let done: Vec<u64> = st
                .waiters
                .keys()
                .copied()
                .filter(|p| st.procs.get(p).is_none_or(|p| p.exit_code.is_some()))
                .collect();
            let mut answers = vec![];
            for puid in done {
                let reply = match st.procs.get(&puid) {
                    Some(p) => Reply::Status {
                        pid: p.pid,
                        exit_code: p.exit_code,
                    },
                    None => Reply::Error(AgentError::NoSuchProcess(puid)),
                };
                for origin in st.waiters.remove(&puid).unwrap_or_default() {
                    answers.push((origin, reply.clone()));
                }
            }
            (ended, answers)
        };
        for (origin, reply) in answers {
            serve::answer(self, origin, reply);
        }
        ended
    }
}

/// A running node agent: its pool, its request channel and its serving thread.
#[derive(Debug)]
pub struct Agent {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

fn agent_err(e: SpawnError) -> AgentError {
    match e {
        SpawnError::NotFound(s) => AgentError::NotFound(s),
        SpawnError::BadCwd(s) => AgentError::BadCwd(s),
        SpawnError::BadArgument(s) => AgentError::BadArgument(s),
        SpawnError::BadCpu(c) => AgentError::BadArgument(format!("CPU {c}")),
        SpawnError::Os(what, errno) => AgentError::Os {
            what: what.to_string(),
            errno: errno as i32,
        },
    }
}

fn os_err(what: &str, e: Errno) -> AgentError {
    AgentError::Os {
        what: what.to_string(),
        errno: e as i32,
    }
}

impl Agent {
    /// Creates the node pool `/dragon-<runtime>-<node>-pool-1` of `pool_size` bytes and the
    /// request channel, and starts serving. Call with the signals the caller handles
    /// blocked: the serving thread blocks every signal itself.
    pub fn start(runtime: u64, node: u32, pool_size: usize) -> Result<Agent, SegmentError> {
        let name = SegmentName::new(runtime, node, SegmentKind::Pool, 1);
        let pool = Pool::create(&name, pool_size)?;
        let requests =
            Channel::create_in(&pool, REQUEST_CAPACITY, REQUEST_SLOT).map_err(|e| match e {
                ChannelError::Segment(s) => s,
                _ => SegmentError::Corrupt,
            })?;
        let shared = Arc::new(Shared {
            pool,
            requests,
            state: Mutex::new(State::default()),
            stop: AtomicBool::new(false),
            runtime,
            node,
            replies: Mutex::new(Replies::new()),
            endpoint: Mutex::new(None),
            cluster: OnceLock::new(),
            cluster_thread: Mutex::new(None),
            forwards: Mutex::new(HashMap::new()),
            next_forward: AtomicU64::new(1),
            shutdown_requested: AtomicBool::new(false),
            lost: Mutex::new(vec![]),
        });
        let s2 = shared.clone();
        let thread = std::thread::Builder::new()
            .name("dragon-agent".into())
            .spawn(move || serve::serve(&s2))
            .map_err(|e| SegmentError::Os(Errno::from_raw(e.raw_os_error().unwrap_or(0))))?;
        tracing::info!("node agent of runtime {runtime:016x} node {node} serving: pool {name}, {pool_size} bytes");
        Ok(Agent {
            shared,
            thread: Some(thread),
        })
    }

    /// The `DRAGON_RUNTIME` value for processes of this agent.
    pub fn env_value(&self) -> String {
        self.shared.env_value()
    }

    /// The node pool.
    pub fn pool(&self) -> &Pool {
        &self.shared.pool
    }

    /// Launches a process for the agent's own process (descriptors are ours).
    pub fn launch(&self, req: Launch) -> Result<(u64, i32), AgentError> {
        serve::launch(&self.shared, req, Some(std::process::id()))
    }

    /// Exit code of a launched process (`None` while it runs).
    pub fn status(&self, puid: u64) -> Result<Option<i32>, AgentError> {
        self.shared.state().status(puid).map(|(_, c)| c)
    }

    /// Reaps ended children (and answers those waiting for them); returns the launched
    /// ones as (p_uid, pid, exit code).
    pub fn reap(&self) -> Vec<(u64, i32, i32)> {
        self.shared.reap()
    }

    /// Opens this node's transport endpoint (`backend` as [`dragon_transport::open_or_fallback`]
    /// takes it, listening on `listen`, e.g. `127.0.0.1:0`) for bring-up; returns its address.
    pub fn open_endpoint(
        &self,
        backend: &str,
        secret: Secret,
        listen: &str,
    ) -> Result<String, TransportError> {
        let mut cfg =
            TransportConfig::new(NodeId(self.shared.node), secret, self.shared.pool.clone());
        cfg.listen = listen.to_string();
        let t = dragon_transport::open_or_fallback(backend, cfg)?;
        let addr = t.address();
        *locked(&self.shared.endpoint) = Some(t);
        Ok(addr)
    }

    /// The back end of this node's transport endpoint (`tcp` or `ofi`: what
    /// [`open_endpoint`](Self::open_endpoint) opened, after any fallback); `None` before one
    /// is open.
    pub fn endpoint_backend(&self) -> Option<&'static str> {
        if let Some(t) = locked(&self.shared.endpoint).as_ref() {
            return Some(t.backend());
        }
        self.shared.cluster.get().map(|c| c.transport().backend())
    }

    fn take_endpoint(&self) -> Result<Box<dyn Transport>, ClusterError> {
        locked(&self.shared.endpoint)
            .take()
            .ok_or_else(|| ClusterError::Protocol("no transport endpoint open".into()))
    }

    fn run_cluster(&self, cluster: Cluster) -> Result<(), ClusterError> {
        self.shared
            .cluster
            .set(cluster)
            .map_err(|_| ClusterError::Protocol("this agent is already in a cluster".into()))?;
        let s2 = self.shared.clone();
        let t = std::thread::Builder::new()
            .name("dragon-cluster".into())
            .spawn(move || remote::cluster_loop(&s2))
            .map_err(|e| ClusterError::Protocol(format!("cluster thread: {e}")))?;
        *locked(&self.shared.cluster_thread) = Some(t);
        Ok(())
    }

    /// Primary: dials the `members` (their endpoint addresses, as their start reported), waits
    /// for each to say hello (at most `timeout`), then serves requests from other nodes.
    pub fn start_primary(
        &self,
        me: NodeInfo,
        members: &[PeerAddr],
        timeout: Duration,
    ) -> Result<(), ClusterError> {
        let c = Cluster::primary(self.take_endpoint()?, me, members, timeout)?;
        self.run_cluster(c)
    }

    /// Member: waits for the primary, says hello with `me`, joins the other members (at most
    /// `timeout`), then serves requests from other nodes.
    pub fn join_cluster(&self, me: NodeInfo, timeout: Duration) -> Result<(), ClusterError> {
        let c = Cluster::member(self.take_endpoint()?, me, timeout)?;
        self.run_cluster(c)
    }

    /// The runtime's nodes (empty before bring-up and on a single-node runtime).
    pub fn nodes(&self) -> Vec<NodeInfo> {
        self.shared
            .cluster
            .get()
            .map(|c| c.table().to_vec())
            .unwrap_or_default()
    }

    /// A handle that moves pool blocks to and from other nodes over this node's transport
    /// (once bring-up made the cluster; `None` before and on a single-node runtime).
    pub fn block_mover(&self) -> Option<BlockMover> {
        self.shared.cluster.get()?;
        Some(BlockMover {
            shared: self.shared.clone(),
        })
    }

    /// Primary: tells every member to end the runtime.
    pub fn cluster_shutdown(&self) {
        if let Some(c) = self.shared.cluster.get() {
            c.shutdown(Duration::from_secs(2));
        }
    }

    /// Whether the primary asked this member to end the runtime.
    pub fn shutdown_requested(&self) -> bool {
        self.shared.shutdown_requested.load(Ordering::SeqCst)
    }

    /// Nodes whose connection was lost, in the order it happened.
    pub fn lost_nodes(&self) -> Vec<u32> {
        self.shared.lost().clone()
    }

    /// Stops serving: the request channel is closed (waiting clients get an error) and the
    /// serving thread ends; a cluster endpoint is closed. The pool stays until the agent is
    /// dropped.
    pub fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.requests.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(c) = self.shared.cluster.get() {
            c.close();
        }
        if let Some(t) = locked(&self.shared.cluster_thread).take() {
            let _ = t.join();
        }
    }
}

/// Moves pool blocks between this node and another over the node's transport endpoint (the
/// cluster's), for the processes of this agent's process (its object server). Blocks on this
/// side must be in the node pool: the one the endpoint registered.
#[derive(Debug, Clone)]
pub struct BlockMover {
    shared: Arc<Shared>,
}

impl BlockMover {
    fn transport(&self) -> Result<&dyn Transport, TransportError> {
        self.shared
            .cluster
            .get()
            .map(|c| c.transport())
            .ok_or(TransportError::Closed)
    }

    /// The transport's back end (`tcp` or `ofi`).
    pub fn backend(&self) -> &'static str {
        self.transport().map_or("tcp", |t| t.backend())
    }

    /// The node pool (blocks of this side of a transfer must be in it).
    pub fn pool(&self) -> &Pool {
        &self.shared.pool
    }

    /// [`Transport::put_block`] with tag 0: `src`'s first `len` bytes into `dst` of `node`.
    pub fn put_block(
        &self,
        node: u32,
        src: &dragon_shm::heap::Block,
        len: usize,
        dst: BlockRef,
    ) -> Result<dragon_transport::Completion, TransportError> {
        self.transport()?.put_block(NodeId(node), src, len, dst, 0)
    }

    /// [`Transport::get_block`]: `len` bytes of `src` (a block of `node`) into `dst`.
    pub fn get_block(
        &self,
        node: u32,
        src: BlockRef,
        dst: &dragon_shm::heap::Block,
        len: usize,
    ) -> Result<dragon_transport::Completion, TransportError> {
        self.transport()?.get_block(NodeId(node), src, dst, len)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}
