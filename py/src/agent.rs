//! The node agent (`Agent`, run by the launcher or the embedded runtime's agent process) and
//! a process's connection to it (`AgentClient`): launches, status, ids, the name registry
//! and agent-owned pools.

use dragon_runtime::agent::{Agent, AgentClient, AgentWaits};
use dragon_runtime::proto::{IdKind, Launch, Reply, Request};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::blocking::timeout_of;
use crate::errors::{Error, Result};
use crate::pool::PyPool;
use crate::process::stdio_req;

#[allow(clippy::too_many_arguments)]
pub(crate) fn launch_of(
    argv: Vec<String>,
    env: Vec<(String, String)>,
    cwd: Option<String>,
    stdin: Option<i64>,
    stdout: Option<i64>,
    stderr: Option<i64>,
    cpus: Option<Vec<usize>>,
    new_group: bool,
    fd_map: Option<Vec<(i32, i32)>>,
    name: Option<String>,
) -> Result<Launch> {
    Ok(Launch {
        argv,
        env,
        cwd,
        stdin: stdio_req(stdin, false)?,
        stdout: stdio_req(stdout, false)?,
        stderr: stdio_req(stderr, true)?,
        cpus: cpus.unwrap_or_default(),
        new_group,
        fd_map: fd_map.unwrap_or_default(),
        name,
    })
}

/// The node agent, run by the launcher (or by the embedded runtime's agent process): it
/// creates the node pool and serves launch, status, id and registry requests on a thread.
#[pyclass(module = "dragon._native", name = "Agent")]
pub(crate) struct PyAgent {
    inner: Option<Agent>,
}

impl PyAgent {
    pub(crate) fn agent(&self) -> Result<&Agent> {
        self.inner
            .as_ref()
            .ok_or_else(|| Error::value("the agent was shut down"))
    }
}

#[pymethods]
impl PyAgent {
    /// Creates the pool of `pool_size` bytes for runtime `runtime`, node `node`, and starts
    /// serving. Block the signals you handle before calling this.
    #[new]
    fn new(py: Python<'_>, runtime: u64, node: u32, pool_size: usize) -> Result<Self> {
        let a = py.detach(|| Agent::start(runtime, node, pool_size))?;
        Ok(PyAgent { inner: Some(a) })
    }

    /// The `DRAGON_RUNTIME` value for managed processes.
    fn env_value(&self) -> Result<String> {
        Ok(self.agent()?.env_value())
    }

    /// The node pool's name.
    #[getter]
    fn pool_name(&self) -> Result<String> {
        Ok(self.agent()?.pool().name().to_string())
    }

    /// Starts a process with this process's descriptors; returns `(puid, pid)`.
    #[pyo3(signature = (argv, env, cwd=None, stdin=None, stdout=None, stderr=None, cpus=None, new_group=true, name=None))]
    #[allow(clippy::too_many_arguments)]
    fn launch(
        &self,
        py: Python<'_>,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        cwd: Option<String>,
        stdin: Option<i64>,
        stdout: Option<i64>,
        stderr: Option<i64>,
        cpus: Option<Vec<usize>>,
        new_group: bool,
        name: Option<String>,
    ) -> Result<(u64, i32)> {
        let l = launch_of(
            argv, env, cwd, stdin, stdout, stderr, cpus, new_group, None, name,
        )?;
        let a = self.agent()?;
        Ok(py.detach(|| a.launch(l))?)
    }

    /// Exit code of a launched process (None while it runs; negative: killed by a signal).
    fn status(&self, puid: u64) -> Result<Option<i32>> {
        Ok(self.agent()?.status(puid)?)
    }

    /// Reaps ended children; returns `[(puid, pid, exit_code)]` of launched ones.
    fn reap(&self) -> Result<Vec<(u64, i32, i32)>> {
        Ok(self.agent()?.reap())
    }

    /// Releases shared-memory holds of processes that died; returns how many.
    fn sweep(&self) -> Result<usize> {
        Ok(self.agent()?.pool().sweep())
    }

    /// Stops serving (waiting clients get an error) and removes the pool.
    fn shutdown(&mut self, py: Python<'_>) {
        if let Some(mut a) = self.inner.take() {
            py.detach(move || {
                a.stop();
                drop(a);
            });
        }
    }
}

/// A process's connection to its node agent (one per process; thread-safe).
#[pyclass(frozen, module = "dragon._native", name = "AgentClient")]
pub(crate) struct PyAgentClient {
    pub(crate) inner: AgentClient,
}

impl PyAgentClient {
    pub(crate) fn call(&self, py: Python<'_>, req: Request, timeout: Option<f64>) -> Result<Reply> {
        let t = timeout_of(timeout)?;
        let c = &self.inner;
        Ok(py.detach(|| c.call(req, t))?)
    }

    /// A registry request answered with a value (`Lookup`, `Unregister`).
    fn value<'py>(&self, py: Python<'py>, req: Request) -> Result<Option<Bound<'py, PyBytes>>> {
        match self.call(py, req, None)? {
            Reply::Value(v) => Ok(v.map(|v| PyBytes::new(py, &v))),
            r => Err(unexpected(r)),
        }
    }
}

/// The agent's request channel named by `chan` (the last field of `DRAGON_RUNTIME`).
fn chan_ref(chan: &str) -> Result<dragon_shm::heap::BlockRef> {
    dragon_runtime::agent::parse_ref(chan)
        .ok_or_else(|| Error::value(format!("bad agent channel reference {chan:?}")))
}

pub(crate) fn unexpected(r: Reply) -> Error {
    Error::runtime(format!("unexpected agent reply {r:?}"))
}

#[pymethods]
impl PyAgentClient {
    /// Connects to the agent whose request channel is `chan` (the last field of
    /// `DRAGON_RUNTIME`) through the node pool `pool`.
    #[new]
    fn new(py: Python<'_>, pool: &PyPool, chan: &str) -> Result<Self> {
        let (p, r) = (pool.inner.clone(), chan_ref(chan)?);
        let inner = py.detach(|| AgentClient::connect(p, r))?;
        Ok(PyAgentClient { inner })
    }

    /// Starts a process: standard streams None (this process's), DEVNULL (-3), STDOUT (-2,
    /// stderr only) or a descriptor of this process; `fd_map` hands descriptors of this
    /// process to the child under other numbers. Returns `(puid, pid)`.
    #[pyo3(signature = (argv, env, cwd=None, stdin=None, stdout=None, stderr=None, cpus=None, new_group=true, fd_map=None, name=None))]
    #[allow(clippy::too_many_arguments)]
    fn launch(
        &self,
        py: Python<'_>,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        cwd: Option<String>,
        stdin: Option<i64>,
        stdout: Option<i64>,
        stderr: Option<i64>,
        cpus: Option<Vec<usize>>,
        new_group: bool,
        fd_map: Option<Vec<(i32, i32)>>,
        name: Option<String>,
    ) -> Result<(u64, i32)> {
        let l = launch_of(
            argv, env, cwd, stdin, stdout, stderr, cpus, new_group, fd_map, name,
        )?;
        match self.call(py, Request::Launch(l), None)? {
            Reply::Launched { puid, pid } => Ok((puid, pid)),
            r => Err(unexpected(r)),
        }
    }

    /// `(pid, exit_code)` of a launched process; exit_code is None while it runs.
    fn status(&self, py: Python<'_>, puid: u64) -> Result<(i32, Option<i32>)> {
        match self.call(py, Request::Status { puid }, None)? {
            Reply::Status { pid, exit_code } => Ok((pid, exit_code)),
            r => Err(unexpected(r)),
        }
    }

    /// Binds `name` in namespace `kind` to `value` (NameTakenError, a KeyError, if taken,
    /// unless `replace`).
    #[pyo3(signature = (kind, name, value, replace=false))]
    fn register(
        &self,
        py: Python<'_>,
        kind: String,
        name: String,
        value: Vec<u8>,
        replace: bool,
    ) -> Result<()> {
        let req = Request::Register {
            kind,
            name,
            value,
            replace,
        };
        match self.call(py, req, None)? {
            Reply::Done => Ok(()),
            r => Err(unexpected(r)),
        }
    }

    /// The value bound to `name` in `kind`, or None.
    fn lookup<'py>(
        &self,
        py: Python<'py>,
        kind: String,
        name: String,
    ) -> Result<Option<Bound<'py, PyBytes>>> {
        self.value(py, Request::Lookup { kind, name })
    }

    /// Removes a binding; returns its value or None.
    fn unregister<'py>(
        &self,
        py: Python<'py>,
        kind: String,
        name: String,
    ) -> Result<Option<Bound<'py, PyBytes>>> {
        self.value(py, Request::Unregister { kind, name })
    }

    /// A fresh runtime-wide id: kind "p_uid", "c_uid", "m_uid" or "h_uid".
    fn new_id(&self, py: Python<'_>, kind: &str) -> Result<u64> {
        let kind = match kind {
            "p_uid" => IdKind::Process,
            "c_uid" => IdKind::Channel,
            "m_uid" => IdKind::Memory,
            "h_uid" => IdKind::Host,
            k => return Err(Error::value(format!("unknown id kind {k:?}"))),
        };
        match self.call(py, Request::NewId { kind }, None)? {
            Reply::Id(i) => Ok(i),
            r => Err(unexpected(r)),
        }
    }

    /// Every process the agent launched: `[(puid, pid, exit_code, name)]`.
    #[allow(clippy::type_complexity)]
    fn processes(&self, py: Python<'_>) -> Result<Vec<(u64, i32, Option<i32>, Option<String>)>> {
        match self.call(py, Request::Processes, None)? {
            Reply::Processes(v) => Ok(v
                .into_iter()
                .map(|p| (p.puid, p.pid, p.exit_code, p.name))
                .collect()),
            r => Err(unexpected(r)),
        }
    }

    /// A new pool of `size` bytes owned by the agent of `node` (default: this node's; it
    /// lives until `destroy_pool` or the end of the runtime): `(m_uid, segment name)`.
    #[pyo3(signature = (size, node=None))]
    fn create_pool(&self, py: Python<'_>, size: u64, node: Option<u32>) -> Result<(u64, String)> {
        let mut req = Request::CreatePool { size };
        if let Some(node) = node {
            req = Request::Remote {
                node,
                body: Box::new(req),
            };
        }
        match self.call(py, req, None)? {
            Reply::Pool { m_uid, name } => Ok((m_uid, name)),
            r => Err(unexpected(r)),
        }
    }

    /// Removes a pool made with `create_pool` (on whichever node its m_uid names).
    fn destroy_pool(&self, py: Python<'_>, m_uid: u64) -> Result<()> {
        match self.call(py, Request::DestroyPool { m_uid }, None)? {
            Reply::Done => Ok(()),
            r => Err(unexpected(r)),
        }
    }

    /// The agent's pid (a round trip: raises RuntimeGoneError when the agent is gone).
    #[pyo3(signature = (timeout=None))]
    fn ping(&self, py: Python<'_>, timeout: Option<f64>) -> Result<u32> {
        match self.call(py, Request::Ping, timeout)? {
            Reply::Pong(p) => Ok(p),
            r => Err(unexpected(r)),
        }
    }
}

/// Waits for many processes of any node on one connection to the node agent (what a parent
/// of children on other nodes uses: one thread reads every end). `add` asks and returns at
/// once; `ended` returns the ends that came, as `(puid, exit code or None)` (None: the
/// agent answered with an error: the process's node is gone, or the p_uid is unknown).
#[pyclass(frozen, module = "dragon._native", name = "AgentWaits")]
pub(crate) struct PyAgentWaits {
    inner: AgentWaits,
}

#[pymethods]
impl PyAgentWaits {
    /// Connects as `AgentClient(pool, chan)` does.
    #[new]
    fn new(py: Python<'_>, pool: &PyPool, chan: &str) -> Result<Self> {
        let (p, r) = (pool.inner.clone(), chan_ref(chan)?);
        let inner = py.detach(|| AgentWaits::connect(p, r))?;
        Ok(PyAgentWaits { inner })
    }

    /// Asks for the end of process `puid` (ValueError past `WAITS_CAPACITY`, 256, at once).
    fn add(&self, py: Python<'_>, puid: u64) -> Result<()> {
        let w = &self.inner;
        Ok(py.detach(|| w.add(puid))?)
    }

    /// The processes that ended, waiting up to `timeout` seconds for the first (an empty
    /// list when none did).
    fn ended(&self, py: Python<'_>, timeout: f64) -> Result<Vec<(u64, Option<i32>)>> {
        let t = timeout_of(Some(timeout))?.unwrap_or_default();
        let w = &self.inner;
        let got = py.detach(|| w.ended(t))?;
        Ok(got.into_iter().map(|(p, r)| (p, r.ok())).collect())
    }

    /// How many processes are waited for.
    fn pending(&self) -> usize {
        self.inner.pending()
    }
}
