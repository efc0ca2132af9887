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
  ``sentinel`` is a pipe closed when the child's agent reports its end (one thread and one
  agent connection per process wait for all its children: ``dragon._watch``), and signals go
  through the agents. The child's ``parent_process()`` sentinel works the same way.
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
``CrossNodeError`` when one is unpickled on another node). A connection's end of file and
``fileno()`` are ``dragon._node_conn``'s and ``dragon._writers``' (writer counts kept per
process, taken back from processes that died).
"""

from __future__ import annotations

import io
import os
import sys
import weakref
from multiprocessing import connection, managers, popen_fork, queues, reduction, sharedctypes, spawn, util

from dragon import _runtime
from dragon._node_conn import (  # noqa: F401
    JoinableQueue,
    Pipe,
    Queue,
    SimpleQueue,
    _install_wait,
    _QueuePickler,
    close_all,
)
from dragon._node_locks import (  # noqa: F401  (the context looks these up here)
    Barrier,
    BoundedSemaphore,
    Condition,
    Event,
    Lock,
    RLock,
    Semaphore,
)
from dragon._node_values import Array, BufferWrapper, RawArray, RawValue, Value  # noqa: F401
from dragon._nodecount import multinode
from dragon._watch import watch as _watch
from dragon.exceptions import CrossNodeError

_PAYLOAD_ENV = "DRAGON_MP_PAYLOAD_KEY"
_PARENT_ENV = "DRAGON_MP_PARENT_PUID"


# ----- placement ----------------------------------------------------------------------------


def target_node() -> int:
    """The node the next process of this context goes to: the Policy in force, else round
    robin over the runtime's nodes."""
    from dragon.native._placement import _policy_for, _target_node

    return _target_node(_policy_for(None, None), False)


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
        from dragon._popen import bootstrap_data
        from dragon.infrastructure.policy import Policy
        from dragon.native import machine
        from dragon.native.process import _REMOTE_PAYLOAD_MAX

        data = bootstrap_data(self, process_obj).getvalue()
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

        # The watcher thread holds no reference to this Popen: once the child ended, the
        # Popen dies with its Process and its finalizer with it, as under spawn (CPython's
        # TestFinalize checks that no finalizer is left once the test's Process is gone).
        me = weakref.ref(self)

        def ended(code):
            popen = me()
            if popen is not None:
                popen._code = code
            del popen
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
    # The queues' feeder and reader pickle through multiprocessing.queues._ForkingPickler:
    # this one lets this module's queues send large buffers out of band (dragon._node_conn).
    queues._ForkingPickler = _QueuePickler
    # A child's end (BaseProcess._bootstrap calls util._exit_function) closes its pipe
    # handles, as the system closes a process's descriptors: readers elsewhere see EOF.
    if not getattr(util._exit_function, "_dragon_nodes", False):
        util._exit_function = _exit_function_closing(util._exit_function)


def _exit_function_closing(orig):
    def _exit_function(*args, **kwargs):
        try:
            return orig(*args, **kwargs)  # finalizers first: they may still send
        finally:
            close_all()

    _exit_function._dragon_nodes = True
    return _exit_function


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
