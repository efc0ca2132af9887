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

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dragon_shm::channel::{Channel, ChannelError};
use dragon_shm::heap::{BlockRef, Pool};
use dragon_shm::name::{SegmentKind, SegmentName};
use dragon_shm::SegmentError;
use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::proto::{
    decode, encode, AgentError, Envelope, IdKind, Launch, ProcInfo, Reply, ReplyEnvelope, Request,
    StdioReq, WireRef,
};
use crate::spawn::{pidfd_getfd, pidfd_open, spawn, SpawnError, SpawnSpec, Stdio};

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
}

impl From<ChannelError> for ClientError {
    fn from(e: ChannelError) -> Self {
        ClientError::Channel(e)
    }
}

#[derive(Debug)]
struct Proc {
    pid: i32,
    exit_code: Option<i32>,
    name: Option<String>,
}

#[derive(Debug, Default)]
struct State {
    procs: HashMap<u64, Proc>,
    by_pid: HashMap<i32, u64>,
    names: HashMap<(String, String), Vec<u8>>,
    next_ids: [u64; 4],
    pools: HashMap<u64, Pool>,
}

/// Reply channels the serving thread has attached, by reference, with the requester's pid.
type Replies = HashMap<WireRef, (u32, Channel)>;

impl State {
    fn new_id(&mut self, kind: IdKind) -> u64 {
        let slot = &mut self.next_ids[kind as usize];
        *slot += 1;
        ID_BASE + *slot
    }

    fn record(&mut self, pid: i32, status: WaitStatus) -> Option<(u64, i32)> {
        let code = match status {
            WaitStatus::Exited(_, c) => c,
            WaitStatus::Signaled(_, s, _) => -(s as i32),
            _ => return None,
        };
        let puid = *self.by_pid.get(&pid)?;
        self.by_pid.remove(&pid);
        let p = self.procs.get_mut(&puid)?;
        p.exit_code = Some(code);
        Some((puid, code))
    }

    /// Reaps every ended child; returns the launched ones as (p_uid, pid, exit code).
    fn reap(&mut self) -> Vec<(u64, i32, i32)> {
        let mut out = vec![];
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return out,
                Ok(st) => {
                    if let Some(pid) = st.pid() {
                        if let Some((puid, code)) = self.record(pid.as_raw(), st) {
                            tracing::debug!("p_uid {puid} (pid {pid}) ended: exit code {code}");
                            out.push((puid, pid.as_raw(), code));
                        }
                    }
                }
            }
        }
    }

    fn status(&mut self, puid: u64) -> Result<(i32, Option<i32>), AgentError> {
        let (pid, code) = match self.procs.get(&puid) {
            None => return Err(AgentError::NoSuchProcess(puid)),
            Some(p) => (p.pid, p.exit_code),
        };
        if code.is_some() {
            return Ok((pid, code));
        }
        if let Ok(st) = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
            if let Some((_, c)) = self.record(pid, st) {
                return Ok((pid, Some(c)));
            }
        }
        Ok((pid, None))
    }
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
            .spawn(move || serve(&s2))
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
        launch(&self.shared, req, std::process::id())
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

fn block_all_signals() {
    use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow};
    let _ = pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&SigSet::all()), None);
}

fn serve(sh: &Shared) {
    block_all_signals();
    let mut replies = Replies::new();
    let mut last = Instant::now();
    while !sh.stop.load(Ordering::SeqCst) {
        match sh.requests.recv(Some(MAINTENANCE_EVERY)) {
            Ok(m) => handle(sh, &mut replies, m.bytes()),
            Err(ChannelError::TimedOut) | Err(ChannelError::Empty) => {}
            Err(ChannelError::Closed) => break,
            Err(e) => {
                tracing::error!("request channel failed, the agent stops serving: {e}");
                break;
            }
        }
        if last.elapsed() >= MAINTENANCE_EVERY {
            last = Instant::now();
            maintenance(sh, &mut replies);
        }
    }
}

fn maintenance(sh: &Shared, replies: &mut Replies) {
    sh.state().reap();
    // Reply channels of processes that ended go (their blocks are then freed).
    replies.retain(|_, (pid, _)| nix::sys::signal::kill(Pid::from_raw(*pid as i32), None).is_ok());
    sh.pool.sweep();
}

fn handle(sh: &Shared, replies: &mut Replies, bytes: &[u8]) {
    let env: Envelope = match decode(bytes) {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!("dropped a request that does not decode: {e}");
            return;
        }
    };
    let body = match env.body {
        Request::Launch(l) => match launch(sh, l, env.requester) {
            Ok((puid, pid)) => Reply::Launched { puid, pid },
            Err(e) => Reply::Error(e),
        },
        Request::Status { puid } => match sh.state().status(puid) {
            Ok((pid, exit_code)) => Reply::Status { pid, exit_code },
            Err(e) => Reply::Error(e),
        },
        Request::Register {
            kind,
            name,
            value,
            replace,
        } => {
            let mut st = sh.state();
            let key = (kind, name);
            if !replace && st.names.contains_key(&key) {
                Reply::Error(AgentError::Exists(key.1))
            } else {
                st.names.insert(key, value);
                Reply::Done
            }
        }
        Request::Lookup { kind, name } => {
            Reply::Value(sh.state().names.get(&(kind, name)).cloned())
        }
        Request::Unregister { kind, name } => Reply::Value(sh.state().names.remove(&(kind, name))),
        Request::NewId { kind } => Reply::Id(sh.state().new_id(kind)),
        Request::Processes => {
            let st = sh.state();
            let mut v: Vec<ProcInfo> = st
                .procs
                .iter()
                .map(|(&puid, p)| ProcInfo {
                    puid,
                    pid: p.pid,
                    exit_code: p.exit_code,
                    name: p.name.clone(),
                })
                .collect();
            v.sort_by_key(|p| p.puid);
            Reply::Processes(v)
        }
        Request::Ping => Reply::Pong(std::process::id()),
        Request::CreatePool { size } => {
            let mut st = sh.state();
            let m_uid = st.new_id(IdKind::Memory);
            let name = SegmentName::new(sh.runtime, sh.node, SegmentKind::Pool, m_uid);
            match Pool::create(&name, size as usize) {
                Ok(p) => {
                    st.pools.insert(m_uid, p);
                    Reply::Pool {
                        m_uid,
                        name: name.to_string(),
                    }
                }
                Err(e) => Reply::Error(AgentError::NoMemory(format!("{e:?}"))),
            }
        }
        Request::DestroyPool { m_uid } => match sh.state().pools.remove(&m_uid) {
            Some(_) => Reply::Done,
            None => Reply::Error(AgentError::BadArgument(format!(
                "no pool with m_uid {m_uid}"
            ))),
        },
    };
    let out = encode(&ReplyEnvelope { seq: env.seq, body });
    let ch = match replies.entry(env.reply) {
        std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
        std::collections::hash_map::Entry::Vacant(v) => {
            let ch = sh
                .pool
                .block(block_ref(env.reply))
                .map_err(ChannelError::from)
                .and_then(Channel::attach);
            match ch {
                Ok(ch) => v.insert((env.requester, ch)),
                Err(e) => {
                    tracing::warn!(
                        "bad reply channel from pid {}, request dropped: {e}",
                        env.requester
                    );
                    return;
                }
            }
        }
    };
    // A requester that stopped reading must not stall the agent.
    if ch.1.send(&out, Some(Duration::from_secs(1))).is_err() {
        replies.remove(&env.reply);
    }
}

fn launch(sh: &Shared, req: Launch, requester: u32) -> Result<(u64, i32), AgentError> {
    let own = requester == std::process::id();
    let pidfd = if own {
        None
    } else {
        Some(pidfd_open(requester as i32).map_err(|e| os_err("pidfd_open(requester)", e))?)
    };
    let mut held: Vec<OwnedFd> = vec![];
    let mut take = |fd: i32| -> Result<i32, Errno> {
        match &pidfd {
            None => Ok(fd),
            Some(p) => {
                let f = pidfd_getfd(p, fd)?;
                let raw = f.as_raw_fd();
                held.push(f);
                Ok(raw)
            }
        }
    };
    let mut stdio = |s: StdioReq, n: i32| -> Result<Stdio, AgentError> {
        Ok(match s {
            StdioReq::Null => Stdio::Null,
            StdioReq::Stdout => Stdio::Stdout,
            StdioReq::Inherit if own => Stdio::Inherit,
            StdioReq::Inherit => match take(n) {
                Ok(fd) => Stdio::Fd(fd),
                Err(Errno::EBADF) => Stdio::Null,
                Err(e) => return Err(os_err("pidfd_getfd", e)),
            },
            StdioReq::Fd(fd) => Stdio::Fd(take(fd).map_err(|e| os_err("pidfd_getfd", e))?),
        })
    };
    let stdin = stdio(req.stdin, 0)?;
    let stdout = stdio(req.stdout, 1)?;
    let stderr = stdio(req.stderr, 2)?;
    let mut fd_map = Vec::with_capacity(req.fd_map.len());
    for &(src, dst) in &req.fd_map {
        fd_map.push((take(src).map_err(|e| os_err("pidfd_getfd", e))?, dst));
    }
    let mut st = sh.state();
    let puid = st.new_id(IdKind::Process);
    let mut env = req.env;
    env.retain(|(k, _)| k != "DRAGON_PUID");
    env.push(("DRAGON_PUID".into(), puid.to_string()));
    let spec = SpawnSpec {
        argv: req.argv,
        env,
        cwd: req.cwd.map(Into::into),
        stdin,
        stdout,
        stderr,
        cpus: req.cpus,
        new_process_group: req.new_group,
        die_with_parent: false,
        pass_fds: vec![],
        fd_map,
    };
    // The state lock is held across the spawn so that the reaper cannot see the child end
    // before it is recorded.
    let pid = spawn(&spec)
        .map_err(|e| {
            tracing::info!(
                "launch of {:?} for pid {requester} failed: {e}",
                spec.argv.first()
            );
            agent_err(e)
        })?
        .as_raw();
    tracing::debug!(
        "launched p_uid {puid} as pid {pid} for pid {requester}: {:?}",
        spec.argv
    );
    if let Some(n) = &req.name {
        st.names
            .insert(("process".into(), n.clone()), puid.to_le_bytes().to_vec());
    }
    st.procs.insert(
        puid,
        Proc {
            pid,
            exit_code: None,
            name: req.name,
        },
    );
    st.by_pid.insert(pid, puid);
    Ok((puid, pid))
}

/// A process's connection to its node agent. Calls are serialised (one outstanding
/// request per client); use one client per process.
#[derive(Debug)]
pub struct AgentClient {
    pool: Pool,
    requests: Channel,
    reply: Channel,
    seq: Mutex<u64>,
}

impl AgentClient {
    /// Connects through `pool` (the node pool, created by the agent) to the request channel
    /// `chan` (from `DRAGON_RUNTIME`).
    pub fn connect(pool: Pool, chan: BlockRef) -> Result<AgentClient, ClientError> {
        let b = pool.block(chan).map_err(ChannelError::from)?;
        let requests = Channel::attach(b)?;
        let reply = Channel::create_in(&pool, REPLY_CAPACITY, REPLY_SLOT)?;
        Ok(AgentClient {
            pool,
            requests,
            reply,
            seq: Mutex::new(0),
        })
    }

    fn agent_alive(&self) -> bool {
        self.pool.segment().header().creator().is_alive()
    }

    /// Sends `req` and waits for the answer (at most `timeout`; `None`: as long as the agent
    /// lives). An agent-side failure is [`ClientError::Agent`].
    pub fn call(&self, req: Request, timeout: Option<Duration>) -> Result<Reply, ClientError> {
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
        }
    }

    /// The node pool.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dragon_shm::platform::random_u64;

    fn launch_req(argv: &[&str]) -> Launch {
        Launch {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: std::env::vars().collect(),
            cwd: None,
            stdin: StdioReq::Null,
            stdout: StdioReq::Null,
            stderr: StdioReq::Null,
            cpus: vec![],
            new_group: true,
            fd_map: vec![],
            name: None,
        }
    }

    fn wait_code(c: &AgentClient, puid: u64) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match c.call(Request::Status { puid }, None).unwrap() {
                Reply::Status {
                    exit_code: Some(x), ..
                } => return x,
                Reply::Status { pid, .. } => {
                    assert!(Instant::now() < deadline, "pid {pid} did not end");
                    let fd = pidfd_open(pid).unwrap();
                    let mut p = [nix::poll::PollFd::new(
                        std::os::fd::AsFd::as_fd(&fd),
                        nix::poll::PollFlags::POLLIN,
                    )];
                    let _ = nix::poll::poll(&mut p, nix::poll::PollTimeout::from(1000u16));
                }
                r => panic!("unexpected {r:?}"),
            }
        }
    }

    #[test]
    fn launch_status_registry_ids_and_agent_death() {
        let rt = random_u64();
        let mut agent = Agent::start(rt, 0, 8 << 20).unwrap();
        let env = agent.env_value();
        let chan = parse_ref(env.rsplit(':').next().unwrap()).unwrap();
        let pool = Pool::open(&SegmentName::new(rt, 0, SegmentKind::Pool, 1)).unwrap();
        let c = AgentClient::connect(pool, chan).unwrap();

        // Launch through the channel; exit codes and signals come back.
        let Reply::Launched { puid, pid } = c
            .call(Request::Launch(launch_req(&["sh", "-c", "exit 7"])), None)
            .unwrap()
        else {
            panic!()
        };
        assert!(puid > ID_BASE && pid > 0);
        assert_eq!(wait_code(&c, puid), 7);
        let mut l = launch_req(&["sleep", "30"]);
        l.name = Some("sleeper".into());
        let Reply::Launched {
            puid: p2,
            pid: pid2,
        } = c.call(Request::Launch(l), None).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            c.call(
                Request::Lookup {
                    kind: "process".into(),
                    name: "sleeper".into()
                },
                None
            )
            .unwrap(),
            Reply::Value(Some(p2.to_le_bytes().to_vec()))
        );
        nix::sys::signal::kill(Pid::from_raw(pid2), nix::sys::signal::SIGKILL).unwrap();
        assert_eq!(wait_code(&c, p2), -9);

        // Errors are typed.
        match c.call(Request::Launch(launch_req(&["/no/such/prog"])), None) {
            Err(ClientError::Agent(AgentError::NotFound(_))) => {}
            r => panic!("unexpected {r:?}"),
        }
        match c.call(Request::Status { puid: 1 }, None) {
            Err(ClientError::Agent(AgentError::NoSuchProcess(1))) => {}
            r => panic!("unexpected {r:?}"),
        }
        let reg = |replace| Request::Register {
            kind: "ddict".into(),
            name: "d".into(),
            value: vec![1, 2],
            replace,
        };
        assert_eq!(c.call(reg(false), None).unwrap(), Reply::Done);
        assert!(matches!(
            c.call(reg(false), None),
            Err(ClientError::Agent(AgentError::Exists(_)))
        ));
        assert_eq!(c.call(reg(true), None).unwrap(), Reply::Done);
        let Reply::Id(a) = c
            .call(
                Request::NewId {
                    kind: IdKind::Channel,
                },
                None,
            )
            .unwrap()
        else {
            panic!()
        };
        let Reply::Id(b) = c
            .call(
                Request::NewId {
                    kind: IdKind::Channel,
                },
                None,
            )
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(b, a + 1);
        let Reply::Processes(ps) = c.call(Request::Processes, None).unwrap() else {
            panic!()
        };
        assert_eq!(ps.len(), 2);
        assert_eq!(ps[1].name.as_deref(), Some("sleeper"));

        // A stopped agent: requests fail instead of hanging.
        agent.stop();
        match c.call(Request::Ping, Some(Duration::from_secs(2))) {
            Err(ClientError::AgentGone) | Err(ClientError::TimedOut) => {}
            r => panic!("unexpected {r:?}"),
        }
        drop(c);
        drop(agent);
        assert!(dragon_shm::testing::leftovers(rt).is_empty());
    }
}
