"""The exceptions of Dragon-RS, in one hierarchy (re-exported by ``dragon``).

Every error the runtime raises for a Dragon condition is a ``DragonError``, and also the
builtin exception a ``multiprocessing`` user catches for it, so ``except MemoryError`` or
``except queue.Empty`` keep working::

    DragonError
    ├── DragonValueError (ValueError)          bad argument, name, handle or layout
    ├── DragonRuntimeError (RuntimeError)      damaged structure, protocol error, interrupted
    │   ├── RuntimeGoneError                   the runtime (its node agent) is gone
    │   ├── NodeLostError                      another node (its agent) was lost
    │   └── CrossNodeError                     an object of another node (not supported yet)
    ├── DragonOSError (OSError)                a system call failed (errno kept); made with an
    │   │                                      errno, it is that errno's subclass, as OSError is:
    │   ├── DragonTimeoutError (TimeoutError)  a blocking call ran out of time (or ETIMEDOUT)
    │   └── DragonFileNotFoundError (FileNotFoundError), DragonProcessLookupError,
    │       DragonBrokenPipeError, ...         one per builtin subclass of OSError
    ├── PoolFullError (MemoryError)            a pool, its hold or process table is full
    ├── QueueFull (queue.Full), QueueEmpty (queue.Empty)
    ├── ChannelClosedError (EOFError)          closed channel; every writer of a connection closed
    │   └── PeerLostError                      a peer of the channel died
    ├── BrokenBarrierError (threading.BrokenBarrierError)
    ├── LockNotOwnedError (AssertionError)     release of an RLock this thread does not own
    ├── UnknownProcessError (LookupError)      no process with this p_uid
    ├── NameTakenError (KeyError)              the name is registered already
    ├── ProcessError                           a process could not be started or signalled
    ├── DragonProcessGroupError                ProcessGroup (its subclasses below)
    ├── PolicyError                            a policy that cannot be applied
    └── DDictError                             the distributed dictionary (its subclasses below;
                                               DDictKeyError is a KeyError, DDictTimeoutError
                                               a DragonTimeoutError)

The native module (``dragon._native``) raises these classes; which error of the Rust layers
maps to which is in one place, ``py/src/errors.rs``. Importing this module costs only the
standard library's ``errno``, ``queue`` and ``threading``.
"""

from __future__ import annotations

import errno as _errno
import queue
import threading


class DragonError(Exception):
    """Base of every Dragon-RS error."""


class DragonValueError(DragonError, ValueError):
    """A bad argument, segment name, handle (destroyed, detached) or object layout."""


class DragonRuntimeError(DragonError, RuntimeError):
    """Something inside the runtime failed: a damaged structure, an unexpected reply, an
    interrupted wait, an embedded runtime that did not start."""


class RuntimeGoneError(DragonRuntimeError):
    """The runtime named by DRAGON_RUNTIME (its node agent) no longer exists."""


class NodeLostError(DragonRuntimeError):
    """Another node of the runtime was lost (its agent died or stopped answering) before it
    answered."""


class CrossNodeError(DragonRuntimeError):
    """Something that exists on one node only by nature was used from another: a raw
    ``Pool`` or ``Block`` of another node, a descriptor passed to a process there, a
    ``multiprocessing.shared_memory`` segment, process arguments too large to send. (Queues,
    locks, events, values, DDicts and the like work from every node.)"""


class DragonOSError(DragonError, OSError):
    """A system call failed. ``DragonOSError(errno, message)`` is the errno's subclass
    (``DragonFileNotFoundError`` for ENOENT, ...), as ``OSError(errno, message)`` is."""

    def __new__(cls, *args):
        if cls is DragonOSError and args and isinstance(args[0], int):
            cls = _BY_ERRNO.get(args[0], cls)
        return super().__new__(cls, *args)


class DragonTimeoutError(DragonOSError, TimeoutError):
    """A blocking call ran out of time."""


class DragonBlockingIOError(DragonOSError, BlockingIOError):
    """A DragonOSError that is a BlockingIOError (EAGAIN, ...)."""


class DragonChildProcessError(DragonOSError, ChildProcessError):
    """A DragonOSError that is a ChildProcessError (ECHILD)."""


class DragonBrokenPipeError(DragonOSError, BrokenPipeError):
    """A DragonOSError that is a BrokenPipeError (EPIPE: every reader closed)."""


class DragonConnectionAbortedError(DragonOSError, ConnectionAbortedError):
    """A DragonOSError that is a ConnectionAbortedError (ECONNABORTED)."""


class DragonConnectionRefusedError(DragonOSError, ConnectionRefusedError):
    """A DragonOSError that is a ConnectionRefusedError (ECONNREFUSED)."""


class DragonConnectionResetError(DragonOSError, ConnectionResetError):
    """A DragonOSError that is a ConnectionResetError (ECONNRESET)."""


class DragonFileExistsError(DragonOSError, FileExistsError):
    """A DragonOSError that is a FileExistsError (EEXIST: the segment exists)."""


class DragonFileNotFoundError(DragonOSError, FileNotFoundError):
    """A DragonOSError that is a FileNotFoundError (ENOENT: no such segment, program or
    working directory)."""


class DragonInterruptedError(DragonOSError, InterruptedError):
    """A DragonOSError that is an InterruptedError (EINTR)."""


class DragonIsADirectoryError(DragonOSError, IsADirectoryError):
    """A DragonOSError that is an IsADirectoryError (EISDIR)."""


class DragonNotADirectoryError(DragonOSError, NotADirectoryError):
    """A DragonOSError that is a NotADirectoryError (ENOTDIR)."""


class DragonPermissionError(DragonOSError, PermissionError):
    """A DragonOSError that is a PermissionError (EACCES, EPERM)."""


class DragonProcessLookupError(DragonOSError, ProcessLookupError):
    """A DragonOSError that is a ProcessLookupError (ESRCH: the process is gone)."""


def _errno_classes() -> dict[int, type]:
    """The DragonOSError subclass of each errno that has a builtin OSError subclass."""
    by_builtin = {b: c for c in DragonOSError.__subclasses__() for b in c.__bases__ if b is not DragonOSError}
    out = {}
    for code in _errno.errorcode:
        cls = by_builtin.get(type(OSError(code, "")))
        if cls is not None:
            out[code] = cls
    return out


_BY_ERRNO = _errno_classes()


class PoolFullError(DragonError, MemoryError):
    """No room now: a pool is full (or its hold or process table; or /dev/shm for a new
    pool)."""


class QueueFull(DragonError, queue.Full):
    """A queue or channel is full (after the time-out, or at once when not blocking)."""


class QueueEmpty(DragonError, queue.Empty):
    """A queue or channel is empty (after the time-out, or at once when not blocking)."""


class QueueError(DragonError, ValueError):
    """A native Queue misused (``task_done``/``join`` on a queue that is not joinable, ...);
    DragonHPC's ``dragon.native.queue.QueueError``. Also a ValueError, which is what this
    package raised before the DragonHPC name existed."""


class ChannelClosedError(DragonError, EOFError):
    """The channel is closed (and, for a receiver, drained), or every writer of a
    connection closed."""


class PeerLostError(ChannelClosedError):
    """A peer of the channel died and its waiters were woken."""


class BrokenBarrierError(DragonError, threading.BrokenBarrierError):
    """The barrier is broken (aborted, or a wait timed out)."""


class LockNotOwnedError(DragonError, AssertionError):
    """Release of a recursive lock this thread does not own (multiprocessing raises
    AssertionError)."""


class UnknownProcessError(DragonError, LookupError):
    """The node agent knows no process with this p_uid."""


class NameTakenError(DragonError, KeyError):
    """The name is already registered with the node agent."""


# ----- processes, process groups, policies ----------------------------------------------------


class ProcessError(DragonError):
    """A process could not be started or signalled."""


class DragonProcessGroupError(DragonError):
    """Base of the ProcessGroup errors."""


class DragonUserCodeError(DragonProcessGroupError):
    """Processes of the group failed in user code."""


class DragonProcessGroupAlreadyInitialized(DragonProcessGroupError):
    """``init`` called twice."""


class DragonProcessGroupStartError(DragonProcessGroupError):
    """The group could not start (not initialized, already running, or a launch failed)."""


class DragonProcessGroupIdleError(DragonProcessGroupError):
    """The operation needs a running group."""


class DragonProcessGroupException(DragonProcessGroupError):
    """DragonHPC's general ProcessGroup exception (a DragonProcessGroupError)."""


class DragonProcessGroupRunningError(DragonProcessGroupError):
    """The group failed while running (DragonHPC's name; joining its processes failed)."""


class DragonProcessGroupJoinError(DragonProcessGroupError):
    """Joining the group failed (DragonHPC's name)."""


class DragonProcessGroupSignalError(DragonProcessGroupError):
    """Signalling the group's processes failed (DragonHPC's name)."""


class PolicyError(DragonError):
    """A policy that cannot be applied."""


# ----- the distributed dictionary -----------------------------------------------------------


class DDictError(DragonError):
    """A DDict operation failed. ``DDictError(msg)`` or DragonHPC's ``DDictError(err, msg)``."""

    def __init__(self, *args):
        if len(args) == 2 and isinstance(args[0], int):
            self.lib_err, msg = args
            super().__init__(msg)
        else:
            self.lib_err = None
            super().__init__(*args)


class DDictSyncError(DDictError):
    """Synchronising DDicts failed."""


class DDictFullError(DDictError):
    """The manager's memory is full; earlier values are intact."""


class DDictFrozenError(DDictError):
    """The DDict is frozen (read-only)."""


class DDictTimeoutError(DDictError, DragonTimeoutError):
    """The operation did not finish within the DDict's timeout."""


class DDictPersistCheckpointError(DDictError):
    """No such persisted checkpoint."""


class DDictKeyError(DDictError, KeyError):
    """The key is not in the DDict (also a ``KeyError``)."""

    def __init__(self, key, msg: str = "key not found"):
        DDictError.__init__(self, msg)
        self.key = key
        self.args = (key,)

    def __str__(self):
        return f"{self.key!r}"


class DDictCheckpointSyncError(DDictError):
    """The client's checkpoint has been retired from the manager's working set."""


class DDictUnableToCreateError(DDictError):
    """The DDict could not be created."""


class DDictFutureCheckpointError(DDictError):
    """The checkpoint does not exist yet."""


__all__ = [name for name, v in globals().items() if isinstance(v, type) and issubclass(v, DragonError)]
