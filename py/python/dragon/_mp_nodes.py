"""The "dragon" start method on a runtime of several nodes (issue 16).

On one node the context's objects are CPython's own, shared by descriptor (``dragon._mp``,
``dragon._conn``). Descriptors do not cross nodes, so on a runtime of several nodes
(``DRAGON_NUM_NODES`` > 1, set by the launcher) the context switches to objects built on the
runtime's native objects, which work from every node (``dragon._remote``), while keeping
CPython's classes and so their semantics:

* **Processes** go round robin over the nodes (``DRAGON_DEFAULT_NODES`` limits the set), or
  where the ``Policy`` in force puts them. A child on this node starts as on one node; a
  child on another node is launched by that node's agent (``RemotePopen``): its bootstrap
  data (what spawn writes into the child's pipe) travels through the runtime's registry, its
  ``sentinel`` is a pipe a thread closes when the child's agent reports its end, and signals
  go through the agents. The child's ``parent_process()`` sentinel works the same way.
* **Locks and semaphores** are CPython's ``multiprocessing.synchronize`` classes over
  ``NodeSemLock``, the interface of ``_multiprocessing.SemLock`` over a native semaphore
  (ownership and recursion counts are per process, as in CPython's SemLock), so
  ``Condition``, ``Event`` and ``Barrier`` are CPython's too (the barrier's two counters live
  in a native array).
* **Connections** (``Pipe``; the pipe inside CPython's ``Queue``, ``JoinableQueue`` and
  ``SimpleQueue``, so also ``Pool``'s and ``ProcessPoolExecutor``'s queues) are
  ``Connection`` objects over native channels: one message per ``send_bytes``, a large one
  through a pool block. ``multiprocessing.connection.Pipe`` itself is replaced, so CPython's
  own queue classes (and subclasses such as ``concurrent.futures``' queue) use them.
  ``connection.wait`` accepts them (it checks them with a growing pause, 0.1 to 10 ms).
* **Value, Array, RawValue, RawArray** are the native ``Value``/``Array`` (on another node
  each access reads or writes the object's bytes through its node's server), wrapped in
  CPython's ``Synchronized*`` classes with a lock of this context.
* **Manager()**'s server goes where any process would and serves over TCP on its node's
  address.

What does not cross nodes, by nature: descriptors (``reduction.send_handle``, sockets,
``DupFd``: a clear ``CrossNodeError`` when a child on another node would need one), and
``multiprocessing.shared_memory`` (a segment of one node's /dev/shm: a clear
``CrossNodeError`` when one is unpickled on another node). A connection here never reports
end of file: a reader whose writers have all closed or ended waits as on an open pipe (give
``poll`` or ``get`` a timeout), since channels, unlike descriptors, do not count the handles
other processes hold; and it has no ``fileno()``.
"""

from __future__ import annotations

import ctypes
import io
import os
import sys
import threading
import time
import types
from multiprocessing import (
    connection,
    context,
    managers,
    popen_fork,
    queues,
    reduction,
    sharedctypes,
    spawn,
    synchronize,
    util,
)

from dragon import _native, _runtime
from dragon._nodecount import multinode
from dragon.exceptions import CrossNodeError
from dragon.native.array import Array as _NArray
from dragon.native.value import Value as _NValue

_PAYLOAD_ENV = "DRAGON_MP_PAYLOAD_KEY"
_PARENT_ENV = "DRAGON_MP_PARENT_PUID"
PIPE_CAPACITY = 64  # messages in flight each way of a Pipe (a larger one waits for room)
PIPE_SLOT = 1024  # a message up to this size travels inline in the ring


# ----- placement ----------------------------------------------------------------------------


def target_node() -> int:
    """The node the next process of this context goes to: the Policy in force, else round
    robin over the runtime's nodes."""
    from dragon.native._placement import _policy_for, _target_node

    return _target_node(_policy_for(None, None), False)


def _watch(puid: int, on_end=None) -> int:
    """A descriptor that polls readable once process ``puid`` (of any node) has ended: a pipe
    whose write end a thread closes when the process's agent reports the end."""
    from dragon.native._placement import _wait_remote

    r, w = os.pipe()

    def watch() -> None:
        code = None
        try:
            code = _wait_remote(puid, None)
        except Exception:
            pass  # the runtime or the node is gone: the process counts as ended
        if on_end is not None:
            on_end(code)
        os.close(w)

    threading.Thread(target=watch, name=f"dragon-mp-watch-{puid}", daemon=True).start()
    return r


_watchable: list = []


def _watchable_puid() -> int:
    """This process's p_uid if its agent knows it (it launched the process), else 0: a child
    forked by the zygote has an id its agent never saw, so a child of it on another node could
    not watch it end (it gets no parent sentinel that closes, rather than a wrong one)."""
    if not _watchable:
        puid = _runtime.my_puid()
        try:
            _runtime.agent().status(puid)
        except Exception:
            puid = 0
        _watchable.append(puid)
    return _watchable[0]


class RemotePopen(popen_fork.Popen):
    """Starts a multiprocessing child on another node through that node's agent."""

    method = "dragon"

    def __init__(self, process_obj, node: int):
        self._node = node
        self._code = None
        super().__init__(process_obj)

    @staticmethod
    def duplicate_for_child(fd):
        raise CrossNodeError(
            "an object that holds a descriptor (a socket, a file, CPython's own Queue or Lock "
            "made outside the 'dragon' context) cannot go to a process on another node"
        )

    DupFd = duplicate_for_child

    def _launch(self, process_obj):
        from dragon.infrastructure.policy import Policy
        from dragon.native import machine
        from dragon.native.process import _REMOTE_PAYLOAD_MAX

        prep_data = spawn.get_preparation_data(process_obj._name)
        fp = io.BytesIO()
        context.set_spawning_popen(self)
        try:
            reduction.dump(prep_data, fp)
            reduction.dump(process_obj, fp)
        finally:
            context.set_spawning_popen(None)
        data = fp.getvalue()
        if len(data) > _REMOTE_PAYLOAD_MAX:
            raise CrossNodeError(
                f"the process object and its arguments pickle to {len(data)} bytes: a process on "
                f"another node takes at most {_REMOTE_PAYLOAD_MAX} (pass large data through a Queue)"
            )
        import uuid

        a = _runtime.agent()
        key = uuid.uuid4().hex
        a.register("payload", key, data)
        self._key = key
        env = dict(os.environ)
        env[_PAYLOAD_ENV] = key
        env[_PARENT_ENV] = str(_watchable_puid())
        pol = Policy.thread_policy()
        n_cpus = machine.node_table()[self._node]["num_cpus"]
        cpus = ([c for c in pol.cpu_affinity if c < n_cpus] or None) if pol.cpu_affinity else None
        interpreter = [os.fsdecode(x) for x in (spawn.get_executable(), *util._args_from_interpreter_flags())]
        argv = [
            *interpreter,
            "-c",
            "from dragon._mp_nodes import remote_main; remote_main()",
            "--multiprocessing-fork",
        ]
        try:
            self._puid, self.pid = a.launch_on(
                self._node, argv, list(env.items()), cwd=os.getcwd(), cpus=cpus, new_group=False
            )
        except BaseException:
            a.unregister("payload", key)
            raise

        def ended(code):
            self._code = code
            try:  # still there if the child ended before it took it
                a.unregister("payload", key)
            except Exception:
                pass

        self.sentinel = _watch(self._puid, ended)
        self.finalizer = util.Finalize(self, util.close_fds, [self.sentinel])

    def poll(self, flag=os.WNOHANG):
        """The exit code once the child ended (negative: the signal), else None; ``flag=0``
        waits for the end."""
        if self.returncode is None:
            # connection.wait polls (no select(): descriptor numbers may pass 1023).
            if not connection.wait([self.sentinel], 0 if flag == os.WNOHANG else None):
                return None
            code = self._code
            if code is None:
                try:
                    code = _runtime.agent().status(self._puid)[1]
                except Exception:
                    code = 255  # its node is gone
            self.returncode = code if code is not None else 255
        return self.returncode

    def _send_signal(self, sig):
        if self.returncode is None:
            try:
                _runtime.agent().signal(self._puid, int(sig))
            except Exception:
                pass  # already ended (as ProcessLookupError in CPython)


_keep: list = []  # descriptors that must stay open as long as the process


def remote_main() -> None:
    """Entry of a multiprocessing child launched on another node: as ``spawn_main``, with the
    bootstrap data from the registry."""
    key = os.environ.pop(_PAYLOAD_ENV)
    parent = int(os.environ.pop(_PARENT_ENV))
    data = _runtime.agent().unregister("payload", key)
    if data is None:
        sys.exit("dragon: the bootstrap data of this process is gone (its parent ended?)")
    from multiprocessing import process

    if parent:
        parent_sentinel = _watch(parent)
    else:  # a parent its agent cannot watch: a sentinel that never becomes readable
        parent_sentinel, w = os.pipe()
        _keep.append(w)
    fp = io.BytesIO(bytes(data))
    process.current_process()._inheriting = True
    try:
        preparation_data = reduction.pickle.load(fp)
        spawn.prepare(preparation_data)
        self = reduction.pickle.load(fp)
    finally:
        del process.current_process()._inheriting
    sys.exit(self._bootstrap(parent_sentinel))


# ----- semaphores and locks -------------------------------------------------------------------

RECURSIVE_MUTEX, SEMAPHORE = synchronize.RECURSIVE_MUTEX, synchronize.SEMAPHORE
SEM_VALUE_MAX = synchronize.SEM_VALUE_MAX


class NodeSemLock:
    """``_multiprocessing.SemLock``'s interface over a native semaphore, usable from every
    node. As in CPython, who holds it and how often (``_count``, ``_is_mine``) is state of
    this process's handle; the shared state is the semaphore's value."""

    def __init__(self, kind: int, value: int, maxvalue: int, sem=None):
        if sem is None and value < 0:
            raise ValueError("semaphore initial value must be >= 0")
        self.kind, self.maxvalue = kind, maxvalue
        self._sem = sem if sem is not None else _native.Semaphore(_runtime.node_pool(), value)
        self._n = 0
        self._tid = None
        self.name = None
        self.handle = None

    def _is_mine(self) -> bool:
        return self._n > 0 and self._tid == threading.get_ident()

    def _count(self) -> int:
        return self._n

    def _get_value(self) -> int:
        return self._sem.get_value()

    def _is_zero(self) -> bool:
        return self._sem.get_value() == 0

    def _after_fork(self) -> None:
        self._n = 0

    def acquire(self, block: bool = True, timeout: float | None = None) -> bool:
        if self.kind == RECURSIVE_MUTEX and self._is_mine():
            self._n += 1
            return True
        if timeout is not None and timeout < 0:
            timeout = 0.0
        if not self._sem.acquire(block, timeout if block else None):
            return False
        self._n += 1
        self._tid = threading.get_ident()
        return True

    def release(self) -> None:
        if self.kind == RECURSIVE_MUTEX:
            if not self._is_mine():
                raise AssertionError("attempt to release recursive lock not owned by thread")
            if self._n > 1:
                self._n -= 1
                return
        elif self.maxvalue != SEM_VALUE_MAX and self._sem.get_value() >= self.maxvalue:
            raise ValueError("semaphore or lock released too many times")
        # The count drops before the semaphore is released: on another node the release is a
        # network call during which this process's other threads run, and one of them may
        # take the semaphore and set the count for itself.
        n = self._n
        self._n = max(0, n - 1)
        try:
            self._sem.release()
        except BaseException:
            self._n = n
            raise

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        return self.release()


def _after_fork(obj) -> None:
    obj._semlock._after_fork()


def _init_semlock(self, kind, value, maxvalue) -> None:
    self._semlock = NodeSemLock(kind, value, maxvalue)
    self._make_methods()
    util.register_after_fork(self, _after_fork)


def _sem_getstate(self):
    sl = self._semlock
    return (sl._sem, sl.kind, sl.maxvalue)


def _sem_setstate(self, state) -> None:
    sem, kind, maxvalue = state
    self._semlock = NodeSemLock(kind, 0, maxvalue, sem)
    self._make_methods()


def _semlock_class(base, init):
    ns = {
        "__init__": init,
        "__getstate__": _sem_getstate,
        "__setstate__": _sem_setstate,
        "__module__": __name__,
    }
    cls = type(base.__name__, (base,), ns)
    cls.__qualname__ = base.__name__
    return cls


Lock = _semlock_class(synchronize.Lock, lambda self, *, ctx=None: _init_semlock(self, SEMAPHORE, 1, 1))
RLock = _semlock_class(
    synchronize.RLock, lambda self, *, ctx=None: _init_semlock(self, RECURSIVE_MUTEX, 1, 1)
)
Semaphore = _semlock_class(
    synchronize.Semaphore,
    lambda self, value=1, *, ctx=None: _init_semlock(self, SEMAPHORE, value, SEM_VALUE_MAX),
)
BoundedSemaphore = _semlock_class(
    synchronize.BoundedSemaphore,
    lambda self, value=1, *, ctx=None: _init_semlock(self, SEMAPHORE, value, value),
)


class Condition(synchronize.Condition):
    """CPython's Condition over this context's lock and semaphores (picklable anywhere)."""

    def __getstate__(self):
        return (self._lock, self._sleeping_count, self._woken_count, self._wait_semaphore)


class Event(synchronize.Event):
    """CPython's Event over this context's Condition and Semaphore."""


class Barrier(synchronize.Barrier):
    """CPython's Barrier; its state and count live in a native array."""

    def __init__(self, parties, action=None, timeout=None, *, ctx):
        from dragon.native.array import Array as _Array

        self.__setstate__((parties, action, timeout, ctx.Condition(), _Array("i", 2, lock=False)))
        self._state = 0
        self._count = 0

    def __setstate__(self, state):
        self._parties, self._action, self._timeout, self._cond, self._wrapper = state

    def __getstate__(self):
        return (self._parties, self._action, self._timeout, self._cond, self._wrapper)

    @property
    def _state(self):
        return self._wrapper[0]

    @_state.setter
    def _state(self, value):
        self._wrapper[0] = value

    @property
    def _count(self):
        return self._wrapper[1]

    @_count.setter
    def _count(self, value):
        self._wrapper[1] = value


class _RemoteView:
    """Items of another node's block, read and written one at a time through its node's
    server: what ``BufferWrapper.create_memoryview()`` gives on another node."""

    def __init__(self, block, size: int, fmt: str = "B"):
        import struct

        self._block, self._size, self._fmt = block, size, fmt
        self._item = struct.Struct(fmt)

    def cast(self, fmt: str) -> _RemoteView:
        return _RemoteView(self._block, self._size, fmt)

    def __len__(self) -> int:
        return self._size // self._item.size

    def _off(self, i: int) -> int:
        return range(len(self))[i] * self._item.size

    def __getitem__(self, i: int):
        return self._item.unpack(self._block.read(self._off(i), self._item.size))[0]

    def __setitem__(self, i: int, v) -> None:
        self._block.write(self._off(i), self._item.pack(v))


class BufferWrapper:
    """``multiprocessing.heap.BufferWrapper`` (shared bytes, CPython's private arena kept by
    descriptor) over a native block, picklable to any node: on its own node
    ``create_memoryview()`` is a memoryview of the block, on another a ``_RemoteView``."""

    def __init__(self, size: int):
        if size < 0:
            raise ValueError(f"Size {size:n} out of range")
        if sys.maxsize <= size:
            raise OverflowError(f"Size {size:n} too large")
        from dragon.native.array import Array as _Array

        self._size = size
        self._arr = _Array("B", max(1, size), lock=False)

    def create_memoryview(self):
        a = self._arr
        if a._obj is not None:
            return memoryview(a._obj).cast("B")[: self._size]
        return _RemoteView(a._block, self._size)


# ----- connections ----------------------------------------------------------------------------

_BYTES = b"\x01"  # dragon._serial's mark for raw bytes


class Connection:
    """``multiprocessing.connection.Connection``'s interface over native channels (``rx``
    to receive, ``tx`` to send), usable from every node. Each ``send_bytes`` is one message."""

    def __init__(self, rx, tx):
        self._rx, self._tx = rx, tx
        self._closed = False

    # -- state
    @property
    def closed(self) -> bool:
        """True if the connection is closed."""
        return self._closed

    @property
    def readable(self) -> bool:
        """True if the connection is readable."""
        return self._rx is not None

    @property
    def writable(self) -> bool:
        """True if the connection is writable."""
        return self._tx is not None

    def _check_closed(self):
        if self._closed:
            raise OSError("handle is closed")

    def _check_readable(self):
        if self._rx is None:
            raise OSError("connection is write-only")

    def _check_writable(self):
        if self._tx is None:
            raise OSError("connection is read-only")

    def fileno(self) -> int:
        """Connections of a multi-node runtime have no descriptor (``connection.wait`` takes
        them all the same)."""
        self._check_closed()
        raise OSError("a connection of a multi-node Dragon runtime has no file descriptor")

    def close(self) -> None:
        """Closes this handle."""
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __reduce__(self):
        if self._closed:
            raise OSError("handle is closed")
        return (Connection, (self._rx, self._tx))

    # -- sending
    def send_bytes(self, buf, offset: int = 0, size: int | None = None) -> None:
        """Sends a bytes-like object (or ``size`` bytes of it from ``offset``) as one message."""
        self._check_closed()
        self._check_writable()
        m = memoryview(buf)
        if m.itemsize > 1:
            m = m.cast("B")
        n = m.nbytes
        if offset < 0:
            raise ValueError("offset is negative")
        if n < offset:
            raise ValueError("buffer length < offset")
        if size is None:
            size = n - offset
        elif size < 0:
            raise ValueError("size is negative")
        elif offset + size > n:
            raise ValueError("buffer length < offset + size")
        self._send(m[offset : offset + size])

    def _send(self, m) -> None:
        if len(m) + 1 <= PIPE_SLOT:
            self._tx.send(_BYTES + bytes(m), None)
        else:
            self._tx.send_parts([_BYTES, m], None)

    def send(self, obj) -> None:
        """Sends a picklable object."""
        self._check_closed()
        self._check_writable()
        self._send(memoryview(reduction.ForkingPickler.dumps(obj)))

    # -- receiving
    def _recv(self, timeout=None) -> bytes:
        from dragon import _serial

        return _serial.recv(self._rx, timeout)

    def recv_bytes(self, maxlength: int | None = None) -> bytes:
        """Receives one message as bytes (OSError if it is longer than ``maxlength``)."""
        self._check_closed()
        self._check_readable()
        if maxlength is not None and maxlength < 0:
            raise ValueError("negative maxlength")
        data = self._recv()
        if maxlength is not None and len(data) > maxlength:
            raise OSError("bad message length")
        return data

    def recv_bytes_into(self, buf, offset: int = 0) -> int:
        """Receives one message into ``buf`` at byte ``offset``; its size in bytes
        (``BufferTooShort`` carrying the message when it does not fit)."""
        self._check_closed()
        self._check_readable()
        with memoryview(buf) as m:
            itemsize = m.itemsize
            bytesize = itemsize * len(m)
            if offset < 0:
                raise ValueError("negative offset")
            if offset > bytesize:
                raise ValueError("offset too large")
            data = self._recv()
            size = len(data)
            if bytesize < offset + size:
                from multiprocessing import BufferTooShort

                raise BufferTooShort(data)
            m.cast("B")[offset : offset + size] = data
            return size

    def recv(self):
        """Receives one object."""
        self._check_closed()
        self._check_readable()
        return reduction.ForkingPickler.loads(self._recv())

    def _ready(self) -> bool:
        return self._closed or len(self._rx) > 0

    def poll(self, timeout: float | None = 0.0) -> bool:
        """Whether a message is waiting; waits up to ``timeout`` seconds (None: for ever) for
        one, checking with a growing pause (0.1 to 10 ms)."""
        self._check_closed()
        self._check_readable()
        return bool(wait([self], timeout))

    def __repr__(self) -> str:
        return f"<dragon multi-node Connection, readable={self.readable}, writable={self.writable}>"


def Pipe(duplex: bool = True) -> tuple[Connection, Connection]:
    """A pair of connections over native channels of this node."""
    pool = _runtime.node_pool()
    a = _native.Channel.create(pool, PIPE_CAPACITY, PIPE_SLOT)
    if not duplex:
        return Connection(a, None), Connection(None, a)
    b = _native.Channel.create(pool, PIPE_CAPACITY, PIPE_SLOT)
    return Connection(a, b), Connection(b, a)


_orig_wait = connection.wait  # replaced by a copy of the original in _install_wait


def wait(object_list, timeout: float | None = None) -> list:
    """``multiprocessing.connection.wait`` that also takes connections of a multi-node
    runtime (checked with a growing pause, 0.1 to 10 ms) beside descriptors."""
    ours = [o for o in object_list if isinstance(o, Connection)]
    if not ours:
        return _orig_wait(object_list, timeout)
    others = [o for o in object_list if not isinstance(o, Connection)]
    deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
    pause = 0.0001
    while True:
        ready = [o for o in ours if o._ready()]
        if others:
            ready += _orig_wait(others, 0)
        if ready:
            return ready
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            return []
        step = pause if left is None else min(pause, left)
        if others:
            got = _orig_wait(others, step)
            if got:
                return got + [o for o in ours if o._ready()]
        else:
            time.sleep(step)
        pause = min(pause * 2, 0.01)


def _wait_trampoline(object_list, timeout=None):
    # Runs as the code of multiprocessing.connection.wait itself (see _install_wait): only
    # names of that module's globals (sys) are used.
    return sys.modules["dragon._mp_nodes"].wait(object_list, timeout)


def _install_wait() -> None:
    """Makes ``multiprocessing.connection.wait`` take this module's connections, wherever
    it was imported from: its code object is swapped, so references taken before (``from
    multiprocessing.connection import wait`` in user code, ``multiprocessing.pool``,
    ``concurrent.futures.process``) use it too. The original goes on as ``_orig_wait``."""
    global _orig_wait
    w = connection.wait
    if getattr(w, "_dragon_nodes", False):
        return
    _orig_wait = types.FunctionType(w.__code__, w.__globals__, w.__name__, w.__defaults__, w.__closure__)
    w.__code__ = _wait_trampoline.__code__
    w._dragon_nodes = True


def _reduce_shm(self):
    from dragon.native import machine

    return _rebuild_shm, (self.name, self.size, machine.my_node_index())


def _rebuild_shm(name: str, size: int, node: int):
    from multiprocessing import shared_memory

    from dragon.native import machine

    me = machine.my_node_index()
    if node != me:
        raise CrossNodeError(
            f"the shared_memory segment {name!r} is a file of node {node}'s /dev/shm: a process "
            f"on node {me} cannot map it (share data between nodes with a Queue, Array or DDict)"
        )
    return shared_memory.SharedMemory(name, False, size)


def install() -> None:
    """Makes this process's multiprocessing cross nodes (idempotent): CPython's own queues
    get node-crossing pipes through ``connection.Pipe``, ``connection.wait`` takes them,
    ``heap.BufferWrapper`` and ``sharedctypes``' functions make native shared memory, and a
    ``SharedMemory`` unpickled on another node is a clear error."""
    connection.Pipe = Pipe
    from multiprocessing import heap

    heap.BufferWrapper = BufferWrapper
    # A shared_memory segment is a file of one node's /dev/shm: unpickled on another node it
    # is a clear error (a name passed by hand cannot be caught).
    from multiprocessing import shared_memory

    shared_memory.SharedMemory.__reduce__ = _reduce_shm
    # multiprocessing.sharedctypes' own functions (used directly, without a context) too.
    sharedctypes.RawValue, sharedctypes.RawArray = RawValue, RawArray
    sharedctypes.Value, sharedctypes.Array = Value, Array
    _install_wait()


# ----- queues ---------------------------------------------------------------------------------


class Queue(queues.Queue):
    """CPython's Queue (feeder thread, unbounded by default) over a node-crossing pipe;
    picklable anywhere."""

    def __init__(self, maxsize=0, *, ctx):
        install()
        super().__init__(maxsize, ctx=ctx)

    def __getstate__(self):
        return (
            self._ignore_epipe,
            self._maxsize,
            self._reader,
            self._writer,
            self._rlock,
            self._wlock,
            self._sem,
            self._opid,
        )


class JoinableQueue(queues.JoinableQueue):
    """CPython's JoinableQueue over a node-crossing pipe; picklable anywhere."""

    def __init__(self, maxsize=0, *, ctx):
        install()
        super().__init__(maxsize, ctx=ctx)

    def __getstate__(self):
        return Queue.__getstate__(self) + (self._cond, self._unfinished_tasks)


class SimpleQueue(queues.SimpleQueue):
    """CPython's SimpleQueue over a node-crossing pipe; picklable anywhere."""

    def __init__(self, *, ctx):
        install()
        super().__init__(ctx=ctx)

    def __getstate__(self):
        return (self._reader, self._writer, self._rlock, self._wlock)


# ----- shared values --------------------------------------------------------------------------


class _NoLock:
    """Raw shared objects have no lock and no ``get_obj`` (as CPython's raw ctypes objects):
    reading the attribute raises AttributeError."""

    def __get__(self, obj, cls=None):
        raise AttributeError("a raw shared object has no lock")


class _RawValue(_NValue):
    """A shared value without a lock (a native Value; the fields of a Structure read and
    written as attributes, from every node)."""

    get_lock = get_obj = acquire = release = _NoLock()

    def __init__(self, typecode_or_type, *args):
        super().__init__(typecode_or_type, None, lock=False)
        if args:
            tmp = self._ctype(*args)
            ctypes.memmove(ctypes.addressof(self._obj), ctypes.addressof(tmp), ctypes.sizeof(tmp))

    def _field(self, name: str):
        ct = self.__dict__.get("_ctype")
        if ct is not None and issubclass(ct, ctypes.Structure) and any(f[0] == name for f in ct._fields_):
            return getattr(ct, name)
        return None

    def __getattr__(self, name):
        if name.startswith("_") or self._field(name) is None:
            raise AttributeError(name)
        obj = self.__dict__["_obj"]
        return getattr(obj if obj is not None else self._remote_load(), name)

    def __setattr__(self, name, v) -> None:
        f = None if name.startswith("_") else self._field(name)
        if f is None:
            object.__setattr__(self, name, v)
        elif self._obj is not None:
            setattr(self._obj, name, v)
        else:
            obj = self._remote_load()
            setattr(obj, name, v)
            self._remote_store(obj, f.offset, f.size)


class _RawArray(_NArray):
    """A shared array without a lock (a native Array)."""

    get_lock = get_obj = acquire = release = _NoLock()


def RawValue(typecode_or_type, *args):
    """A shared value without a lock, usable from every node."""
    return _RawValue(typecode_or_type, *args)


def RawArray(typecode_or_type, size_or_initializer):
    """A shared array without a lock, usable from every node."""
    return _RawArray(typecode_or_type, size_or_initializer, lock=False)


def _wrap(obj, lock):
    """CPython's synchronized wrapper class for ``obj`` (picklable to any node)."""
    if isinstance(obj, _NArray):
        cls = SynchronizedString if obj._item is ctypes.c_char else SynchronizedArray
    elif issubclass(obj._ctype, ctypes.Structure):
        cls = _struct_class(obj._ctype)
    else:
        cls = Synchronized
    return cls(obj, lock)


def _reduce_sync(self):
    return _wrap, (self._obj, self._lock)


def _sync_class(base):
    cls = type(base.__name__, (base,), {"__reduce__": _reduce_sync, "__module__": __name__})
    cls.__qualname__ = base.__name__
    return cls


Synchronized = _sync_class(sharedctypes.Synchronized)
SynchronizedArray = _sync_class(sharedctypes.SynchronizedArray)
SynchronizedString = _sync_class(sharedctypes.SynchronizedString)
_STRUCT_CLASSES: dict = {}


def _struct_class(ct):
    """As sharedctypes.synchronized does for a Structure: a property per field."""
    cls = _STRUCT_CLASSES.get(ct)
    if cls is None:
        d = {f[0]: sharedctypes.make_property(f[0]) for f in ct._fields_}
        d["__reduce__"] = _reduce_sync
        cls = _STRUCT_CLASSES[ct] = type("Synchronized" + ct.__name__, (sharedctypes.SynchronizedBase,), d)
    return cls


def _lock_for(lock, ctx):
    if lock in (True, None):
        return (ctx or context._default_context.get_context()).RLock()
    if not hasattr(lock, "acquire"):
        raise AttributeError(f"{lock!r} has no method 'acquire'")
    return lock


def Value(typecode_or_type, *args, lock=True, ctx=None):
    """A synchronized shared value (CPython's wrapper over a native Value)."""
    obj = RawValue(typecode_or_type, *args)
    if lock is False:
        return obj
    return _wrap(obj, _lock_for(lock, ctx))


def Array(typecode_or_type, size_or_initializer, *, lock=True, ctx=None):
    """A synchronized shared array (CPython's wrapper over a native Array)."""
    obj = RawArray(typecode_or_type, size_or_initializer)
    if lock is False:
        return obj
    return _wrap(obj, _lock_for(lock, ctx))


# ----- managers -------------------------------------------------------------------------------


def Manager(ctx):
    """CPython's SyncManager whose server (placed as any process of the context) listens on
    its node's address, so proxies work from every node."""
    m = SyncManager(address=_NODE_ADDRESS, ctx=ctx)
    m.start()
    return m


_NODE_ADDRESS = ("", 0)  # "the address of the node the server runs on, any port"


class SyncManager(managers.SyncManager):
    """A SyncManager whose server, wherever it runs, listens on its own node's address."""

    def start(self, initializer=None, initargs=()):
        """As BaseManager.start, except that a server that ends before it sends its address
        is an error (these connections report no end of file, so CPython's ``recv`` would
        wait for ever)."""
        if self._state.value != managers.State.INITIAL:
            if self._state.value == managers.State.STARTED:
                raise managers.ProcessError("Already started server")
            if self._state.value == managers.State.SHUTDOWN:
                raise managers.ProcessError("Manager has shut down")
            raise managers.ProcessError(f"Unknown state {self._state.value!r}")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        reader, writer = connection.Pipe(duplex=False)
        self._process = self._ctx.Process(
            target=type(self)._run_server,
            args=(
                self._registry,
                self._address,
                self._authkey,
                self._serializer,
                writer,
                initializer,
                initargs,
            ),
        )
        ident = ":".join(str(i) for i in self._process._identity)
        self._process.name = type(self).__name__ + "-" + ident
        self._process.start()
        writer.close()
        if reader not in connection.wait([reader, self._process.sentinel]):
            self._process.join()
            raise EOFError(
                f"the manager's server process ended (exit code {self._process.exitcode}) before it started"
            )
        self._address = reader.recv()
        reader.close()
        self._state.value = managers.State.STARTED
        self.shutdown = util.Finalize(
            self,
            type(self)._finalize_manager,
            args=(
                self._process,
                self._address,
                self._authkey,
                self._state,
                self._Client,
                self._shutdown_timeout,
            ),
            exitpriority=0,
        )

    @classmethod
    def _run_server(cls, registry, address, authkey, serializer, writer, initializer=None, initargs=()):
        if tuple(address) == _NODE_ADDRESS:
            from dragon.native import machine

            address = (machine.node_table()[machine.my_node_index()]["ip"], 0)
        return super()._run_server(registry, address, authkey, serializer, writer, initializer, initargs)


if multinode():
    install()
