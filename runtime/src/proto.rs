//! Control messages between managed processes and the node agent.
//!
//! One definition used by both sides: serde types encoded with bincode (variable-length
//! integers, a 64 MiB decode limit), behind a one-byte version. A request travels on the
//! agent's request channel inside an [`Envelope`] that names the requester's reply channel
//! (a block channel in the same node pool) and a sequence number the reply echoes.

use bincode::Options;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Version byte in front of every encoded message.
pub const PROTO_VERSION: u8 = 2;

const DECODE_LIMIT: u64 = 64 << 20;

/// A block handle as it travels in messages.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WireRef {
    /// Pool segment id.
    pub segment: u64,
    /// Offset of the block.
    pub offset: u64,
    /// Allocated length.
    pub len: u64,
    /// Allocation generation.
    pub gen: u32,
}

/// A request with its return address.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Echoed in the reply, so a late reply to an abandoned call is recognised and dropped.
    pub seq: u64,
    /// The requester's reply channel.
    pub reply: WireRef,
    /// The requester's pid (the agent takes descriptors from it with `pidfd_getfd`).
    pub requester: u32,
    /// What is asked.
    pub body: Request,
}

/// A reply with the sequence number of its request.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ReplyEnvelope {
    /// The request's `seq`.
    pub seq: u64,
    /// The answer.
    pub body: Reply,
}

/// Where a standard stream of a launched process goes.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum StdioReq {
    /// The requester's own stream of the same number (`/dev/null` if it has none).
    Inherit,
    /// `/dev/null`.
    Null,
    /// stderr only: the child's stdout.
    Stdout,
    /// This descriptor of the requester.
    Fd(i32),
}

/// Kinds of runtime-wide ids.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdKind {
    /// p_uid: processes.
    Process = 0,
    /// c_uid: channels (queues).
    Channel = 1,
    /// m_uid: memory pools.
    Memory = 2,
    /// h_uid: hosts (nodes).
    Host = 3,
}

/// Start a process.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// The whole environment.
    pub env: Vec<(String, String)>,
    /// Working directory (`None`: the agent's).
    pub cwd: Option<String>,
    /// Standard input.
    pub stdin: StdioReq,
    /// Standard output.
    pub stdout: StdioReq,
    /// Standard error.
    pub stderr: StdioReq,
    /// CPU affinity (empty: the agent's mask).
    pub cpus: Vec<usize>,
    /// Own process group.
    pub new_group: bool,
    /// `(requester fd, child fd)` descriptors handed to the child.
    pub fd_map: Vec<(i32, i32)>,
    /// A name to register the process under (kind `"process"`).
    pub name: Option<String>,
}

/// What a process asks the agent.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Start a process; answered with [`Reply::Launched`].
    Launch(Launch),
    /// Exit status of a launched process; answered with [`Reply::Status`].
    Status {
        /// Its p_uid.
        puid: u64,
    },
    /// Bind `name` (in namespace `kind`) to `value`; [`Reply::Done`] or an `Exists` error.
    Register {
        /// Namespace ("process", "ddict", ...).
        kind: String,
        /// The name.
        name: String,
        /// What it stands for.
        value: Vec<u8>,
        /// Replace an existing binding instead of failing.
        replace: bool,
    },
    /// The value bound to a name: [`Reply::Value`].
    Lookup {
        /// Namespace.
        kind: String,
        /// The name.
        name: String,
    },
    /// Remove a binding: [`Reply::Value`] with the old value.
    Unregister {
        /// Namespace.
        kind: String,
        /// The name.
        name: String,
    },
    /// A fresh id: [`Reply::Id`].
    NewId {
        /// Which counter.
        kind: IdKind,
    },
    /// Every process this agent launched: [`Reply::Processes`].
    Processes,
    /// A new pool of `size` bytes owned by the agent (a DDict manager's): [`Reply::Pool`].
    CreatePool {
        /// Bytes.
        size: u64,
    },
    /// Removes a pool made with `CreatePool`: [`Reply::Done`].
    DestroyPool {
        /// Its m_uid.
        m_uid: u64,
    },
    /// Liveness check: [`Reply::Pong`].
    Ping,
    /// `body` for the agent of node `node` (this node's agent handles it itself, any other
    /// forwards it over the transport and answers with the remote agent's reply).
    Remote {
        /// The node whose agent answers.
        node: u32,
        /// The request (at most [`MAX_NESTING`] `Remote`s deep: decoding is recursive).
        #[serde(deserialize_with = "nested_request")]
        body: Box<Request>,
    },
    /// Answered with [`Reply::Status`] once the process ended (at once if it has).
    Wait {
        /// Its p_uid.
        puid: u64,
    },
    /// Every node of the runtime: [`Reply::Nodes`] (empty on a single-node runtime).
    Nodes,
    /// Send signal `sig` to a launched process that has not ended: [`Reply::Done`].
    Signal {
        /// Its p_uid.
        puid: u64,
        /// The signal number.
        sig: i32,
    },
}

/// One launched process, as [`Reply::Processes`] lists it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ProcInfo {
    /// p_uid.
    pub puid: u64,
    /// OS pid.
    pub pid: i32,
    /// Exit code once ended (negative: killed by that signal).
    pub exit_code: Option<i32>,
    /// Registered name.
    pub name: Option<String>,
}

/// Why a request failed.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The program was not found or is not executable.
    #[error("no such executable: {0}")]
    NotFound(String),
    /// Bad working directory.
    #[error("bad working directory: {0}")]
    BadCwd(String),
    /// A bad argument (NUL byte, bad CPU, bad descriptor).
    #[error("bad argument: {0}")]
    BadArgument(String),
    /// A system call failed.
    #[error("{what}: {}", nix::errno::Errno::from_raw(*errno).desc())]
    Os {
        /// Which step.
        what: String,
        /// errno.
        errno: i32,
    },
    /// No process with this p_uid.
    #[error("no process with p_uid {0}")]
    NoSuchProcess(u64),
    /// The name is taken.
    #[error("the name {0:?} is already registered")]
    Exists(String),
    /// Shared memory could not be created (no room in /dev/shm, ...).
    #[error("cannot create shared memory: {0}")]
    NoMemory(String),
    /// The runtime has no node with this index.
    #[error("the runtime has no node {0}")]
    NoSuchNode(u32),
    /// The node was lost (its agent died or stopped answering) before it answered.
    #[error("node {0} was lost (its agent died or stopped answering)")]
    NodeLost(u32),
}

/// The agent's answer.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The process runs.
    Launched {
        /// Its p_uid.
        puid: u64,
        /// Its OS pid.
        pid: i32,
    },
    /// Status of a process.
    Status {
        /// OS pid.
        pid: i32,
        /// Exit code once ended (negative: killed by that signal), else `None`.
        exit_code: Option<i32>,
    },
    /// Done.
    Done,
    /// A looked-up (or removed) value.
    Value(Option<Vec<u8>>),
    /// A fresh id.
    Id(u64),
    /// Launched processes.
    Processes(Vec<ProcInfo>),
    /// The agent's pid.
    Pong(u32),
    /// A pool was created.
    Pool {
        /// Its m_uid.
        m_uid: u64,
        /// Its segment name.
        name: String,
    },
    /// The runtime's nodes, in node order.
    Nodes(Vec<crate::cluster::NodeInfo>),
    /// The request failed.
    Error(AgentError),
}

/// How deeply `Request::Remote`s may nest in a decoded message. One level is all the
/// agents use; the decoder recurses once per level, so without a bound a message of a few
/// hundred kilobytes of nested `Remote`s overflows the decoding thread's stack.
pub const MAX_NESTING: u32 = 16;

thread_local! {
    static NESTING: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Decodes the body of a `Request::Remote`, refusing nesting deeper than [`MAX_NESTING`].
fn nested_request<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Box<Request>, D::Error> {
    struct Level;
    impl Drop for Level {
        fn drop(&mut self) {
            NESTING.set(NESTING.get() - 1);
        }
    }
    if NESTING.get() >= MAX_NESTING {
        return Err(serde::de::Error::custom(format_args!(
            "requests nested more than {MAX_NESTING} deep"
        )));
    }
    NESTING.set(NESTING.get() + 1);
    let _level = Level;
    Box::<Request>::deserialize(d)
}

fn options() -> impl Options {
    bincode::DefaultOptions::new().with_limit(DECODE_LIMIT)
}

/// Encodes a message behind the version byte.
pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = vec![PROTO_VERSION];
    options()
        .serialize_into(&mut out, v)
        .expect("control messages always encode");
    out
}

/// Decodes a message; a wrong version or malformed bytes give a message saying which.
pub fn decode<T: DeserializeOwned>(b: &[u8]) -> Result<T, String> {
    match b.first() {
        None => Err("empty control message".into()),
        Some(&v) if v != PROTO_VERSION => Err(format!(
            "control message version {v}, this side speaks {PROTO_VERSION}"
        )),
        Some(_) => options()
            .deserialize(&b[1..])
            .map_err(|e| format!("malformed control message: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_version_check() {
        let e = Envelope {
            seq: 7,
            reply: WireRef {
                segment: 1,
                offset: 4096,
                len: 512,
                gen: 3,
            },
            requester: 42,
            body: Request::Launch(Launch {
                argv: vec!["true".into()],
                env: vec![("A".into(), "b".into())],
                cwd: None,
                stdin: StdioReq::Inherit,
                stdout: StdioReq::Fd(5),
                stderr: StdioReq::Stdout,
                cpus: vec![0],
                new_group: true,
                fd_map: vec![(7, 7)],
                name: Some("w".into()),
            }),
        };
        let b = encode(&e);
        assert_eq!(decode::<Envelope>(&b).unwrap(), e);
        let mut bad = b.clone();
        bad[0] = 9;
        assert!(decode::<Envelope>(&bad).unwrap_err().contains("version 9"));
        assert!(decode::<Envelope>(&b[..b.len() / 2]).is_err());
        assert!(decode::<Envelope>(&[]).is_err());
    }
}
