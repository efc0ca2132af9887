//! The multi-node side of `Agent` and `AgentClient`: bring-up of a runtime's node agents
//! over the transport (`dragon_runtime::cluster`), the node table, and requests for other
//! nodes (launch, wait, signal).

use std::time::Duration;

use dragon_runtime::cluster::{ClusterError, NodeInfo};
use dragon_runtime::proto::{Reply, Request};
use dragon_transport::{NodeId, PeerAddr, Secret};
use pyo3::exceptions::{PyRuntimeError, PyTimeoutError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::agent::{launch_of, unexpected, PyAgent, PyAgentClient};
use crate::blocking::timeout_of;
use crate::errors::Error;

/// A node's entry as a dict (the keys of `NodeInfo`).
fn node_dict<'py>(py: Python<'py>, n: &NodeInfo) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("node", n.node)?;
    d.set_item("name", &n.name)?;
    d.set_item("hostname", &n.hostname)?;
    d.set_item("ip", &n.ip)?;
    d.set_item("transport", &n.transport)?;
    d.set_item("agent_pid", n.agent_pid)?;
    d.set_item("num_cpus", n.num_cpus)?;
    d.set_item("physical_mem", n.physical_mem)?;
    d.set_item("gpus", n.gpus.clone())?;
    d.set_item(
        "gpu_vendor",
        (!n.gpu_vendor.is_empty()).then_some(n.gpu_vendor.as_str()),
    )?;
    d.set_item("objects", &n.objects)?;
    Ok(d)
}

/// `NodeInfo` from a dict with keys `name`, `hostname`, `ip`, `num_cpus`, `physical_mem`,
/// `gpus`, `gpu_vendor`, optionally `objects` (the node index, endpoint and pid are filled in by the agent).
fn node_info(d: &Bound<'_, PyDict>) -> PyResult<NodeInfo> {
    let get = |k: &str| -> PyResult<Bound<'_, PyAny>> {
        d.get_item(k)?
            .ok_or_else(|| PyValueError::new_err(format!("node info lacks {k:?}")))
    };
    Ok(NodeInfo {
        node: 0,
        name: get("name")?.extract()?,
        hostname: get("hostname")?.extract()?,
        ip: get("ip")?.extract()?,
        transport: String::new(),
        agent_pid: std::process::id(),
        num_cpus: get("num_cpus")?.extract()?,
        physical_mem: get("physical_mem")?.extract()?,
        gpus: get("gpus")?.extract()?,
        gpu_vendor: get("gpu_vendor")?
            .extract::<Option<String>>()?
            .unwrap_or_default(),
        objects: match d.get_item("objects")? {
            Some(v) => v.extract()?,
            None => String::new(),
        },
    })
}

fn cluster_err(e: ClusterError) -> PyErr {
    match e {
        e @ ClusterError::Missing { .. } => PyTimeoutError::new_err(e.to_string()),
        e => PyRuntimeError::new_err(e.to_string()),
    }
}

fn secret_of(hex: &str) -> PyResult<Secret> {
    Secret::from_hex(hex).ok_or_else(|| PyValueError::new_err("a runtime secret is 64 hex digits"))
}

/// A fresh runtime secret, 64 hex digits (the launcher hands it to member agents in their
/// environment, never on a command line).
#[pyfunction]
pub fn new_secret() -> String {
    Secret::random().to_hex()
}

#[pymethods]
impl PyAgent {
    /// The back end of this node's transport endpoint ("tcp" or "ofi", after any fallback),
    /// or None before `open_endpoint`.
    fn endpoint_backend(&self) -> PyResult<Option<&'static str>> {
        Ok(self.agent()?.endpoint_backend())
    }

    /// Opens this node's transport endpoint (`backend`: "tcp", "ofi", "ofi:PROVIDER"; an
    /// unusable ofi falls back to tcp with one warning line) on `listen` ("IP:0"); returns
    /// the address other nodes dial.
    fn open_endpoint(
        &self,
        py: Python<'_>,
        backend: &str,
        secret: &str,
        listen: &str,
    ) -> PyResult<String> {
        let s = secret_of(secret)?;
        let a = self.agent()?;
        py.detach(|| a.open_endpoint(backend, s, listen))
            .map_err(|e| PyRuntimeError::new_err(format!("transport {backend} on {listen}: {e}")))
    }

    /// Primary: dials the members (`[(node, address)]` as they reported), waits at most
    /// `timeout` s for each to join (TimeoutError naming the ones that did not), then serves
    /// other nodes' requests. `me`: this node's dict (see `nodes()`).
    fn start_primary(
        &self,
        py: Python<'_>,
        me: &Bound<'_, PyDict>,
        members: Vec<(u32, String)>,
        timeout: f64,
    ) -> PyResult<()> {
        let me = node_info(me)?;
        let peers: Vec<PeerAddr> = members
            .into_iter()
            .map(|(n, addr)| PeerAddr {
                node: NodeId(n),
                addr,
            })
            .collect();
        let a = self.agent()?;
        let t = Duration::from_secs_f64(timeout.max(0.0));
        py.detach(|| a.start_primary(me, &peers, t))
            .map_err(cluster_err)?;
        crate::objfast::set_mover(a.block_mover());
        Ok(())
    }

    /// Member: waits at most `timeout` s for the primary and the other members, then serves
    /// other nodes' requests.
    fn join_cluster(&self, py: Python<'_>, me: &Bound<'_, PyDict>, timeout: f64) -> PyResult<()> {
        let me = node_info(me)?;
        let a = self.agent()?;
        let t = Duration::from_secs_f64(timeout.max(0.0));
        py.detach(|| a.join_cluster(me, t)).map_err(cluster_err)?;
        crate::objfast::set_mover(a.block_mover());
        Ok(())
    }

    /// Every node of the runtime as dicts (`node`, `name`, `hostname`, `ip`, `transport`,
    /// `agent_pid`, `num_cpus`, `physical_mem`, `gpus`, `gpu_vendor`, `objects`); empty on a single-node
    /// runtime.
    fn nodes<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        self.agent()?
            .nodes()
            .iter()
            .map(|n| node_dict(py, n))
            .collect()
    }

    /// Primary: tells every member agent to end the runtime.
    fn cluster_shutdown(&self, py: Python<'_>) -> PyResult<()> {
        let a = self.agent()?;
        py.detach(|| a.cluster_shutdown());
        Ok(())
    }

    /// Member: whether the primary asked to end the runtime.
    fn shutdown_requested(&self) -> PyResult<bool> {
        Ok(self.agent()?.shutdown_requested())
    }

    /// Nodes whose connection was lost.
    fn lost_nodes(&self) -> PyResult<Vec<u32>> {
        Ok(self.agent()?.lost_nodes())
    }
}

#[pymethods]
impl PyAgentClient {
    /// Every node of the runtime as dicts (see `Agent.nodes`); empty on a single node.
    fn nodes<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        match self.call(py, Request::Nodes, None)? {
            Reply::Nodes(v) => v.iter().map(|n| node_dict(py, n)).collect(),
            r => Err(unexpected(r).into()),
        }
    }

    /// Starts a process on node `node` (its agent launches it; its standard streams are that
    /// agent's, which the launcher collects): arguments as `launch`, without descriptors.
    #[pyo3(signature = (node, argv, env, cwd=None, cpus=None, new_group=true, name=None))]
    #[allow(clippy::too_many_arguments)]
    fn launch_on(
        &self,
        py: Python<'_>,
        node: u32,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        cwd: Option<String>,
        cpus: Option<Vec<usize>>,
        new_group: bool,
        name: Option<String>,
    ) -> PyResult<(u64, i32)> {
        let l = launch_of(
            argv, env, cwd, None, None, None, cpus, new_group, None, name,
        )?;
        let req = Request::Remote {
            node,
            body: Box::new(Request::Launch(l)),
        };
        match self.call(py, req, None)? {
            Reply::Launched { puid, pid } => Ok((puid, pid)),
            r => Err(unexpected(r).into()),
        }
    }

    /// Waits (at most `timeout` s; None: until it ends) for a launched process on any node;
    /// returns its exit code. TimeoutError when the time passed first.
    /// Python's signal handlers run while it waits (Ctrl-C raises KeyboardInterrupt).
    #[pyo3(signature = (puid, timeout=None))]
    fn wait(&self, py: Python<'_>, puid: u64, timeout: Option<f64>) -> PyResult<i32> {
        let t = timeout_of(timeout)?;
        let c = &self.inner;
        let mut raised: Option<PyErr> = None;
        let r = py.detach(|| {
            c.call_with(Request::Wait { puid }, t, &mut || {
                // A daemon thread can still be waiting here after the interpreter has been
                // finalized (its process is exiting): there are no signal handlers to run
                // then, and attaching would panic.
                // SAFETY: Py_IsInitialized reads a flag of the runtime; CPython documents it
                // as callable at any time, without the GIL.
                if unsafe { pyo3::ffi::Py_IsInitialized() } == 0 {
                    return false;
                }
                Python::attach(|py| match py.check_signals() {
                    Ok(()) => false,
                    Err(e) => {
                        raised = Some(e);
                        true
                    }
                })
            })
        });
        if let Some(e) = raised {
            return Err(e);
        }
        match r.map_err(|e| PyErr::from(Error::from(e)))? {
            Reply::Status {
                exit_code: Some(c), ..
            } => Ok(c),
            r => Err(unexpected(r).into()),
        }
    }

    /// The pid of node `node`'s agent: a round trip to that node (through this node's agent).
    fn ping_node(&self, py: Python<'_>, node: u32) -> PyResult<u32> {
        let req = Request::Remote {
            node,
            body: Box::new(Request::Ping),
        };
        match self.call(py, req, None)? {
            Reply::Pong(p) => Ok(p),
            r => Err(unexpected(r).into()),
        }
    }

    /// Sends signal `sig` to a launched process on any node (nothing if it has ended).
    fn signal(&self, py: Python<'_>, puid: u64, sig: i32) -> PyResult<()> {
        match self.call(py, Request::Signal { puid, sig }, None)? {
            Reply::Done => Ok(()),
            r => Err(unexpected(r).into()),
        }
    }
}

/// Adds this module's functions to `dragon._native`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(new_secret, m)?)
}
