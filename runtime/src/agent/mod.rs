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
//! maintenance), `client.rs` ([`AgentClient`], [`ClientError`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use dragon_shm::channel::{Channel, ChannelError};
use dragon_shm::heap::{BlockRef, Pool};
use dragon_shm::name::{SegmentKind, SegmentName};
use dragon_shm::SegmentError;
use nix::errno::Errno;

use crate::proto::{AgentError, Launch, WireRef};
use crate::spawn::SpawnError;

mod client;
mod serve;
mod state;
#[cfg(test)]
mod tests;

pub use client::{AgentClient, ClientError};
use state::State;

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
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
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
        format!(
            "{ENV_VERSION}:{:016x}:{}:{}",
            self.shared.runtime,
            self.shared.node,
            format_ref(self.shared.requests.block_ref().expect("block channel"))
        )
    }

    /// The node pool.
    pub fn pool(&self) -> &Pool {
        &self.shared.pool
    }

    /// Launches a process for the agent's own process (descriptors are ours).
    pub fn launch(&self, req: Launch) -> Result<(u64, i32), AgentError> {
        serve::launch(&self.shared, req, std::process::id())
    }

    /// Exit code of a launched process (`None` while it runs).
    pub fn status(&self, puid: u64) -> Result<Option<i32>, AgentError> {
        self.shared.state().status(puid).map(|(_, c)| c)
    }

    /// Reaps ended children; returns the launched ones as (p_uid, pid, exit code).
    pub fn reap(&self) -> Vec<(u64, i32, i32)> {
        self.shared.state().reap()
    }

    /// Stops serving: the request channel is closed (waiting clients get an error) and the
    /// serving thread ends. The pool stays until the agent is dropped.
    pub fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.requests.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}
