//! A process's connection to its node agent.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use dragon_shm::channel::{Channel, ChannelError};
use dragon_shm::heap::{BlockRef, Pool};

use super::{wire, LIVENESS_EVERY, REPLY_CAPACITY, REPLY_SLOT};
use crate::proto::{decode, encode, AgentError, Envelope, Reply, ReplyEnvelope, Request};

/// Why an agent or client operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The agent's process is gone (the runtime ended).
    #[error("the runtime's node agent is gone")]
    AgentGone,
    /// The agent refused the request.
    #[error("{0}")]
    Agent(AgentError),
    /// The agent did not answer in time.
    #[error("the node agent did not answer in time")]
    TimedOut,
    /// Shared memory failed (pool full, bad reference, ...).
    #[error("agent channel: {0}")]
    Channel(ChannelError),
    /// The reply could not be understood.
    #[error("{0}")]
    Protocol(String),
    /// The caller's interrupt check said stop before the answer came.
    #[error("interrupted while waiting for the node agent")]
    Interrupted,
}

impl From<ChannelError> for ClientError {
    fn from(e: ChannelError) -> Self {
        ClientError::Channel(e)
    }
}

/// A process's connection to its node agent. Calls are serialised (one outstanding
/// request per client); use one client per process.
#[derive(Debug)]
pub struct AgentClient {
    pool: Pool,
    requests: Channel,
    reply: Channel,
    seq: Mutex<u64>,
    /// The pid that connected (a copy inherited through `fork` is not the owner).
    owner: u32,
}

impl AgentClient {
    /// Connects through `pool` (the node pool, created by the agent) to the request channel
    /// `chan` (from `DRAGON_RUNTIME`).
    pub fn connect(pool: Pool, chan: BlockRef) -> Result<AgentClient, ClientError> {
        // SAFETY: the handle goes straight into a Channel, which never lends its block
        // mutably.
        let b = unsafe { pool.block(chan) }.map_err(ChannelError::from)?;
        let requests = Channel::attach(b)?;
        let reply = Channel::create_in(&pool, REPLY_CAPACITY, REPLY_SLOT)?;
        Ok(AgentClient {
            pool,
            requests,
            reply,
            seq: Mutex::new(0),
            owner: std::process::id(),
        })
    }

    fn agent_alive(&self) -> bool {
        self.pool.segment().header().creator().is_alive()
    }

    /// Sends `req` and waits for the answer (at most `timeout`; `None`: as long as the agent
    /// lives). An agent-side failure is [`ClientError::Agent`].
    pub fn call(&self, req: Request, timeout: Option<Duration>) -> Result<Reply, ClientError> {
        self.call_with(req, timeout, &mut || false)
    }

    /// [`call`](Self::call) that asks `interrupted` every [`LIVENESS_EVERY`] while it waits
    /// and gives up with [`ClientError::Interrupted`] when it says so (a late answer lands in the
    /// reply channel, which holds 4, and the next call skips it).
    pub fn call_with(
        &self,
        req: Request,
        timeout: Option<Duration>,
        interrupted: &mut dyn FnMut() -> bool,
    ) -> Result<Reply, ClientError> {
        let mut seq = self.seq.lock().unwrap_or_else(|e| e.into_inner());
        *seq += 1;
        let env = Envelope {
            seq: *seq,
            reply: wire(self.reply.block_ref().expect("block channel")),
            requester: std::process::id(),
            body: req,
        };
        let bytes = encode(&env);
        let deadline = timeout.map(|t| Instant::now() + t);
        let slice = |d: Option<Instant>| -> Duration {
            match d {
                None => LIVENESS_EVERY,
                Some(d) => d
                    .saturating_duration_since(Instant::now())
                    .min(LIVENESS_EVERY),
            }
        };
        loop {
            match self.requests.send(&bytes, Some(slice(deadline))) {
                Ok(()) => break,
                Err(ChannelError::TimedOut) | Err(ChannelError::Full) => {}
                Err(ChannelError::Closed) => return Err(ClientError::AgentGone),
                Err(e) => return Err(e.into()),
            }
            if !self.agent_alive() {
                return Err(ClientError::AgentGone);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(ClientError::TimedOut);
            }
        }
        loop {
            match self.reply.recv(Some(slice(deadline))) {
                Ok(m) => {
                    let r: ReplyEnvelope = decode(m.bytes()).map_err(ClientError::Protocol)?;
                    if r.seq != *seq {
                        continue; // the late answer to an abandoned call
                    }
                    return match r.body {
                        Reply::Error(e) => Err(ClientError::Agent(e)),
                        b => Ok(b),
                    };
                }
                Err(ChannelError::TimedOut) | Err(ChannelError::Empty) => {}
                Err(e) => return Err(e.into()),
            }
            if !self.agent_alive() {
                return Err(ClientError::AgentGone);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(ClientError::TimedOut);
            }
            if interrupted() {
                return Err(ClientError::Interrupted);
            }
        }
    }

    /// The node pool.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }
}

impl Drop for AgentClient {
    /// Closes the reply channel, so the agent drops its handle on it (and the block is freed)
    /// at its next maintenance instead of keeping it until this process ends. A copy
    /// inherited through `fork` leaves it alone: the channel is the parent's.
    fn drop(&mut self) {
        if std::process::id() == self.owner {
            self.reply.close();
        }
    }
}
