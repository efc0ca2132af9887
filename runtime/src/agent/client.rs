//! A process's connection to its node agent.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dragon_shm::channel::{Channel, ChannelError};
use dragon_shm::heap::{BlockRef, Pool};

use super::{wire, LIVENESS_EVERY, REPLY_CAPACITY, REPLY_SLOT, WAITS_CAPACITY};
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
    link: Link,
    seq: Mutex<u64>,
}

/// The channels of a connection to the agent: its request channel, and a reply channel of
/// this process's own in the node pool.
#[derive(Debug)]
struct Link {
    pool: Pool,
    requests: Channel,
    reply: Channel,
    /// The pid that connected (a copy inherited through `fork` is not the owner).
    owner: u32,
}

impl Link {
    /// Attaches the request channel `chan` of `pool` and makes a reply channel of
    /// `capacity` answers.
    fn connect(pool: Pool, chan: BlockRef, capacity: u64) -> Result<Link, ClientError> {
        // SAFETY: the handle goes straight into a Channel, which never lends its block
        // mutably.
        let b = unsafe { pool.block(chan) }.map_err(ChannelError::from)?;
        let requests = Channel::attach(b)?;
        let reply = Channel::create_in(&pool, capacity, REPLY_SLOT)?;
        Ok(Link {
            pool,
            requests,
            reply,
            owner: std::process::id(),
        })
    }

    /// Sends `body` as request `seq`, answered into this link's reply channel (waiting for
    /// room at most until `deadline`).
    fn send(&self, seq: u64, body: Request, deadline: Option<Instant>) -> Result<(), ClientError> {
        let env = Envelope {
            seq,
            reply: wire(self.reply.block_ref().expect("block channel")),
            requester: std::process::id(),
            body,
        };
        let bytes = encode(&env);
        loop {
            match self.requests.send(&bytes, Some(slice(deadline))) {
                Ok(()) => return Ok(()),
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
    }

    /// Whether the agent that made the node pool still runs.
    fn agent_alive(&self) -> bool {
        self.pool.segment().header().creator().is_alive()
    }
}

impl Drop for Link {
    /// Closes the reply channel, so the agent drops its handle on it (and the block is freed)
    /// at its next maintenance instead of keeping it until this process ends. A copy
    /// inherited through `fork` leaves it alone: the channel is the parent's.
    fn drop(&mut self) {
        if std::process::id() == self.owner {
            self.reply.close();
        }
    }
}

impl AgentClient {
    /// Connects through `pool` (the node pool, created by the agent) to the request channel
    /// `chan` (from `DRAGON_RUNTIME`).
    pub fn connect(pool: Pool, chan: BlockRef) -> Result<AgentClient, ClientError> {
        Ok(AgentClient {
            link: Link::connect(pool, chan, REPLY_CAPACITY)?,
            seq: Mutex::new(0),
        })
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
        let deadline = timeout.map(|t| Instant::now() + t);
        self.link.send(*seq, req, deadline)?;
        loop {
            match self.link.reply.recv(Some(slice(deadline))) {
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
            if !self.link.agent_alive() {
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
        &self.link.pool
    }
}

/// The wait slice until `deadline`: [`LIVENESS_EVERY`] at most.
fn slice(deadline: Option<Instant>) -> Duration {
    match deadline {
        None => LIVENESS_EVERY,
        Some(d) => d
            .saturating_duration_since(Instant::now())
            .min(LIVENESS_EVERY),
    }
}

/// Waits for many processes (of any node) on one connection: [`add`](Self::add) asks the
/// agent for a process's end and returns at once; [`ended`](Self::ended) hands back the
/// answers as they come, in any order. One per process, read by one thread: what a parent
/// of many children on other nodes needs instead of a thread and a connection per child.
#[derive(Debug)]
pub struct AgentWaits {
    link: Link,
    /// The last sequence number, and the p_uid each outstanding `Wait` (by sequence number)
    /// asked for.
    asked: Mutex<(u64, HashMap<u64, u64>)>,
}

impl AgentWaits {
    /// Connects as [`AgentClient::connect`] does, with a reply channel of
    /// [`WAITS_CAPACITY`] answers (they can come all at once).
    pub fn connect(pool: Pool, chan: BlockRef) -> Result<AgentWaits, ClientError> {
        Ok(AgentWaits {
            link: Link::connect(pool, chan, WAITS_CAPACITY)?,
            asked: Mutex::new((0, HashMap::new())),
        })
    }

    /// Asks for the end of process `puid`; its answer comes out of [`ended`](Self::ended).
    pub fn add(&self, puid: u64) -> Result<(), ClientError> {
        let mut asked = self.asked.lock().unwrap_or_else(|e| e.into_inner());
        if asked.1.len() as u64 >= WAITS_CAPACITY {
            // More answers could come than the reply channel holds: the agent would drop
            // some after waiting for room.
            return Err(ClientError::Agent(AgentError::BadArgument(format!(
                "more than {WAITS_CAPACITY} processes waited for at once"
            ))));
        }
        asked.0 += 1;
        let seq = asked.0;
        self.link.send(seq, Request::Wait { puid }, None)?;
        asked.1.insert(seq, puid);
        Ok(())
    }

    /// How many processes are waited for.
    pub fn pending(&self) -> usize {
        self.asked.lock().unwrap_or_else(|e| e.into_inner()).1.len()
    }

    /// The processes that ended, with their exit codes (or the agent's error: the node is
    /// gone, the p_uid unknown), waiting up to `timeout` for the first; empty when none
    /// ended by then. [`ClientError::AgentGone`] when this node's agent is gone.
    #[allow(clippy::type_complexity)]
    pub fn ended(
        &self,
        timeout: Duration,
    ) -> Result<Vec<(u64, Result<i32, AgentError>)>, ClientError> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        loop {
            let m = if out.is_empty() {
                self.link.reply.recv(Some(slice(Some(deadline))))
            } else {
                self.link.reply.try_recv()
            };
            match m {
                Ok(m) => {
                    let r: ReplyEnvelope = match decode(m.bytes()) {
                        Ok(r) => r,
                        Err(e) => {
                            // Not an answer to any Wait: the others still come.
                            tracing::warn!("dropped an agent answer that does not decode: {e}");
                            continue;
                        }
                    };
                    let puid = {
                        let mut asked = self.asked.lock().unwrap_or_else(|e| e.into_inner());
                        asked.1.remove(&r.seq)
                    };
                    let Some(puid) = puid else { continue };
                    out.push((
                        puid,
                        match r.body {
                            Reply::Status {
                                exit_code: Some(c), ..
                            } => Ok(c),
                            Reply::Error(e) => Err(e),
                            b => Err(AgentError::BadArgument(format!("unexpected reply {b:?}"))),
                        },
                    ));
                }
                Err(ChannelError::TimedOut) | Err(ChannelError::Empty) => {
                    if !out.is_empty() {
                        return Ok(out);
                    }
                    if !self.link.agent_alive() {
                        return Err(ClientError::AgentGone);
                    }
                    if Instant::now() >= deadline {
                        return Ok(out);
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}
