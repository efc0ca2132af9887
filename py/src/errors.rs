//! Every error of the native module as a Python exception, in this one place.
//!
//! A binding returns [`Result`]: `?` turns an error of the shared-memory layer or the runtime
//! (or a Python exception already raised) into an [`Error`], and PyO3 raises it through
//! `From<Error> for PyErr` below, which picks its class in `dragon.exceptions`. Each class
//! derives from `DragonError` and from the builtin a multiprocessing user catches
//! (`MemoryError` for a full pool, `queue.Empty`, `EOFError`, ...); see that module.

use dragon_runtime::agent::ClientError;
use dragon_runtime::proto::AgentError;
use dragon_runtime::spawn::SpawnError;
use dragon_shm::channel::ChannelError;
use dragon_shm::heap::AllocError;
use dragon_shm::kv::KvError;
use dragon_shm::platform::Errno;
use dragon_shm::sync::SyncError;
use dragon_shm::SegmentError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;

/// The result of a binding.
pub(crate) type Result<T, E = Error> = std::result::Result<T, E>;

/// The internal code a packet call reports end of file with (errno values are positive).
pub(crate) const EOF: i32 = -1;

/// A failed native call, as it reaches Python.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    #[error(transparent)]
    Segment(#[from] SegmentError),
    #[error(transparent)]
    Alloc(#[from] AllocError),
    #[error(transparent)]
    Channel(#[from] ChannelError),
    #[error(transparent)]
    Sync(#[from] SyncError),
    /// (`KvError` is not a `std::error::Error`: converted below.)
    #[error("DDict index: {0:?}")]
    Kv(KvError),
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Client(#[from] ClientError),
    /// A system call (named, may be "") failed with this errno.
    #[error("{0}: {1}")]
    Os(&'static str, Errno),
    /// A packet call on a connection's descriptor: an errno, or [`EOF`].
    #[error("packet call: code {0}")]
    Packet(i32),
    /// A Dragon condition the binding itself finds (a bad argument, a detached handle, ...).
    #[error("{1}")]
    Raise(Class, String),
    /// A Python exception (a signal handler's, a callback's, a conversion's).
    #[error(transparent)]
    Py(#[from] PyErr),
}

impl From<KvError> for Error {
    fn from(e: KvError) -> Self {
        Error::Kv(e)
    }
}

impl Error {
    /// A `DragonValueError`.
    pub(crate) fn value(msg: impl Into<String>) -> Self {
        Error::Raise(Class::Value, msg.into())
    }

    /// A `DragonRuntimeError`.
    pub(crate) fn runtime(msg: impl Into<String>) -> Self {
        Error::Raise(Class::Runtime, msg.into())
    }
}

/// The classes of `dragon.exceptions` native errors raise.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Class {
    Value,
    Runtime,
    Timeout,
    Os,
    FileNotFound,
    PoolFull,
    QueueFull,
    QueueEmpty,
    ChannelClosed,
    PeerLost,
    BrokenBarrier,
    LockNotOwned,
    RuntimeGone,
    UnknownProcess,
    NameTaken,
    DDictFull,
    DDictFrozen,
    NodeLost,
    CrossNode,
}

const CLASSES: usize = Class::CrossNode as usize + 1;

impl Class {
    /// The class whose `as u8` is `code` (what the object fast path sends).
    pub(crate) fn from_code(code: u8) -> Option<Class> {
        use Class::*;
        const ALL: [Class; CLASSES] = [
            Value,
            Runtime,
            Timeout,
            Os,
            FileNotFound,
            PoolFull,
            QueueFull,
            QueueEmpty,
            ChannelClosed,
            PeerLost,
            BrokenBarrier,
            LockNotOwned,
            RuntimeGone,
            UnknownProcess,
            NameTaken,
            DDictFull,
            DDictFrozen,
            NodeLost,
            CrossNode,
        ];
        ALL.get(code as usize).copied()
    }
}

/// Each class, imported from `dragon.exceptions` the first time it is raised.
static TYPES: [PyOnceLock<Py<PyType>>; CLASSES] = [const { PyOnceLock::new() }; CLASSES];

impl Class {
    fn name(self) -> &'static str {
        match self {
            Class::Value => "DragonValueError",
            Class::Runtime => "DragonRuntimeError",
            Class::Timeout => "DragonTimeoutError",
            Class::Os => "DragonOSError",
            Class::FileNotFound => "DragonFileNotFoundError",
            Class::PoolFull => "PoolFullError",
            Class::QueueFull => "QueueFull",
            Class::QueueEmpty => "QueueEmpty",
            Class::ChannelClosed => "ChannelClosedError",
            Class::PeerLost => "PeerLostError",
            Class::BrokenBarrier => "BrokenBarrierError",
            Class::LockNotOwned => "LockNotOwnedError",
            Class::RuntimeGone => "RuntimeGoneError",
            Class::UnknownProcess => "UnknownProcessError",
            Class::NameTaken => "NameTakenError",
            Class::DDictFull => "DDictFullError",
            Class::DDictFrozen => "DDictFrozenError",
            Class::NodeLost => "NodeLostError",
            Class::CrossNode => "CrossNodeError",
        }
    }

    /// An exception of this class with `args` (a message, or `(errno, message)`).
    fn err<A: pyo3::PyErrArguments + Send + Sync + 'static>(self, args: A) -> PyErr {
        Python::attach(|py| {
            match TYPES[self as usize].import(py, "dragon.exceptions", self.name()) {
                Ok(t) => PyErr::from_type(t.clone(), args),
                Err(e) => e,
            }
        })
    }
}

/// `DragonOSError(errno, message)`: it becomes the errno's subclass (`FileNotFoundError`,
/// `ProcessLookupError`, `BrokenPipeError`, ...), as `OSError(errno, message)` does.
fn os(errno: Errno, what: &str) -> PyErr {
    let msg = if what.is_empty() {
        errno.desc().to_string()
    } else {
        format!("{what}: {}", errno.desc())
    };
    Class::Os.err((errno as i32, msg))
}

fn segment(e: SegmentError) -> PyErr {
    match e {
        SegmentError::Os(errno) => os(errno, "shared memory"),
        SegmentError::BadName
        | SegmentError::BadMagic
        | SegmentError::BadVersion { .. }
        | SegmentError::WrongKind { .. }
        | SegmentError::BadSize
        | SegmentError::InitTimeout
        | SegmentError::OutOfBounds
        | SegmentError::Corrupt => Class::Value.err(e.to_string()),
        // A kind of failure this build does not know yet (the enum is non-exhaustive).
        e => Class::Runtime.err(e.to_string()),
    }
}

fn alloc(e: AllocError) -> PyErr {
    match e {
        AllocError::Full | AllocError::HoldTableFull | AllocError::ProcessTableFull => {
            Class::PoolFull.err(format!("dragon pool: {e}"))
        }
        AllocError::TooLarge | AllocError::ZeroSize | AllocError::BadRef => {
            Class::Value.err(format!("dragon pool: {e}"))
        }
        AllocError::TimedOut => Class::Timeout.err("timed out waiting for pool space"),
        AllocError::Interrupted => Class::Runtime.err("interrupted"),
        AllocError::Segment(e) => segment(e),
        e => Class::Runtime.err(format!("dragon pool: {e}")),
    }
}

fn channel(e: ChannelError) -> PyErr {
    match e {
        ChannelError::Full => Class::QueueFull.err("channel is full"),
        ChannelError::Empty => Class::QueueEmpty.err("channel is empty"),
        ChannelError::Closed => Class::ChannelClosed.err("channel is closed"),
        ChannelError::TimedOut => Class::Timeout.err("timed out"),
        ChannelError::PeerLost => Class::PeerLost.err("a peer of the channel died"),
        ChannelError::TooLarge => Class::Value.err("message too large for this channel"),
        ChannelError::Alloc(e) => alloc(e),
        ChannelError::Segment(e) => segment(e),
        ChannelError::Interrupted | ChannelError::Corrupt => Class::Runtime.err(e.to_string()),
        e => Class::Runtime.err(e.to_string()),
    }
}

fn sync(e: SyncError) -> PyErr {
    match e {
        SyncError::TimedOut => Class::Timeout.err("timed out"),
        SyncError::Broken => Class::BrokenBarrier.err(String::new()),
        SyncError::Overflow => Class::Value.err("released too many times"),
        SyncError::NotOwner => Class::LockNotOwned.err("attempt to release a lock not owned"),
        SyncError::NotHeld => Class::Value.err("release of an unlocked lock"),
        SyncError::BadLayout(what) => Class::Value.err(format!("not a dragon object: {what}")),
        SyncError::Alloc(e) => alloc(e),
        SyncError::Interrupted => Class::Runtime.err("interrupted"),
        e => Class::Runtime.err(e.to_string()),
    }
}

fn kv(e: KvError) -> PyErr {
    match e {
        KvError::Full => Class::DDictFull
            .err("the DDict manager's memory is full (delete keys or make the DDict larger)"),
        KvError::Frozen => {
            Class::DDictFrozen.err("the DDict is frozen (read-only): unfreeze() it to write")
        }
        KvError::Corrupt => Class::Runtime.err("the DDict index is damaged or destroyed"),
        KvError::Alloc(a) => alloc(a),
        e => Class::Runtime.err(e.to_string()),
    }
}

fn spawn(e: SpawnError) -> PyErr {
    match e {
        SpawnError::NotFound(_) | SpawnError::BadCwd(_) => Class::FileNotFound.err(e.to_string()),
        SpawnError::BadArgument(_) | SpawnError::BadCpu(_) => Class::Value.err(e.to_string()),
        SpawnError::Os(what, errno) => os(errno, what),
        e => Class::Runtime.err(e.to_string()),
    }
}

fn agent(e: AgentError) -> PyErr {
    match e {
        AgentError::NotFound(_) | AgentError::BadCwd(_) => Class::FileNotFound.err(e.to_string()),
        AgentError::BadArgument(_) => Class::Value.err(e.to_string()),
        AgentError::Os { errno, .. } => Class::Os.err((errno, e.to_string())),
        AgentError::NoSuchProcess(_) => Class::UnknownProcess.err(e.to_string()),
        AgentError::Exists(_) => Class::NameTaken.err(e.to_string()),
        AgentError::NoMemory(_) => Class::PoolFull.err(e.to_string()),
        AgentError::NoSuchNode(_) => Class::Value.err(e.to_string()),
        AgentError::NodeLost(_) => Class::NodeLost.err(e.to_string()),
        e => Class::Runtime.err(e.to_string()),
    }
}

fn client(e: ClientError) -> PyErr {
    match e {
        ClientError::Agent(a) => agent(a),
        ClientError::AgentGone => Class::RuntimeGone
            .err("the Dragon runtime's node agent is gone (its launcher or script ended)"),
        ClientError::TimedOut => Class::Timeout.err(e.to_string()),
        ClientError::Channel(c) => channel(c),
        ClientError::Protocol(s) => Class::Runtime.err(s),
        e => Class::Runtime.err(e.to_string()),
    }
}

impl From<Error> for PyErr {
    fn from(e: Error) -> PyErr {
        match e {
            Error::Segment(e) => segment(e),
            Error::Alloc(e) => alloc(e),
            Error::Channel(e) => channel(e),
            Error::Sync(e) => sync(e),
            Error::Kv(e) => kv(e),
            Error::Spawn(e) => spawn(e),
            Error::Agent(e) => agent(e),
            Error::Client(e) => client(e),
            Error::Os(what, errno) => os(errno, what),
            // As CPython's Connection: a bare EOFError once every writer closed.
            Error::Packet(EOF) => Class::ChannelClosed.err(String::new()),
            Error::Packet(code) => os(Errno::from_raw(code), ""),
            Error::Raise(class, msg) => class.err(msg),
            Error::Py(e) => e,
        }
    }
}
