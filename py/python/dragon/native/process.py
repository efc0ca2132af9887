"""Processes: DragonHPC's ``Process``, ``ProcessTemplate`` and ``current``.

A ``Process`` runs a Python callable (closures and lambdas travel with cloudpickle) or an
executable (a string target, found in ``cwd`` or on ``PATH``). The Policy in force (the
template's, merged over the group's and the thread's) is applied by the runtime's spawn
module between fork and exec: CPU affinity (intersected with the CPUs this runtime may use;
an affinity naming none of them leaves the mask alone), the GPU visible-devices variable of
the detected vendor (remapped through a mask the runtime inherited; no GPUs, no variable),
the working directory and the environment. Processes start in their own process group.

Processes are started by the node agent (the launcher, or the embedded runtime's agent
process), which gives them their ``puid``, reaps them and keeps their exit codes; the
creating process gets the OS pid and a pidfd as the sentinel.

On a multi-node runtime the Policy's placement picks the node (``HOST_NAME``: a node's name
or hostname, ``HOST_ID``: its h_uid, ``LOCAL``: this node; ``ANYWHERE``/``DEFAULT``: round
robin over the nodes, per creating process, as DragonHPC's default). A process on another
node is launched by that node's agent: its output goes through that agent to the launcher
(labelled with the node), its payload travels inline in its environment (or through the
runtime's registry when large), and its handle works through the agents: ``join`` and
``sentinel`` wait for the remote exit, ``terminate``/``kill`` signal it there. A process
whose standard streams are redirected (``PIPE``, files, descriptors) runs on this node
unless its policy names another node, which is then an error (descriptors do not cross
nodes).
"""

from __future__ import annotations

import binascii
import os
import select
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from dragon import _funcpickle, _runtime
from dragon.exceptions import ChannelClosedError, ProcessError
from dragon.infrastructure.policy import Policy, policy_env
from dragon.native import _lineage, machine
from dragon.native._placement import (  # noqa: F401  (re-exported: process_group and ddict use them)
    _default_nodes,
    _gpu_env,
    _policy_for,
    _resolve_cpus,
    _target_node,
    _wait_remote,
)
from dragon.native._template import ProcessTemplate

_INLINE_PAYLOAD_MAX = 96 * 1024
# A payload for another node travels through the registry, in one transport message (1 MiB).
_REMOTE_PAYLOAD_MAX = 512 * 1024


class _PipeConn:
    """The parent's end of a child's standard stream (``PIPE``): ``recv`` returns text."""

    def __init__(self, fd: int, writable: bool):
        self._f = os.fdopen(fd, "w" if writable else "r", buffering=1 if writable else -1)

    def recv(self) -> str:
        """The next line of output; ChannelClosedError (an EOFError) once the child closed
        the stream."""
        line = self._f.readline()
        if line == "":
            raise ChannelClosedError("the process closed its output")
        return line

    def send(self, data: str) -> None:
        """Writes to the child's stdin."""
        self._f.write(data)
        self._f.flush()

    def fileno(self) -> int:
        return self._f.fileno()

    def close(self) -> None:
        self._f.close()


def _payload(t: ProcessTemplate) -> bytes:
    """The pickled ``(target, args, kwargs)`` of a Python template. Functions of the driver
    script go by value; the light pickler spares the child importing cloudpickle (~50 ms)."""
    try:
        return _funcpickle.dumps((t.target, t.args, t.kwargs))
    except Exception:
        import cloudpickle  # lambdas, closures, functions of the driver script

        try:
            return cloudpickle.dumps((t.target, t.args, t.kwargs), protocol=5)
        except Exception as e:
            raise ProcessError(f"cannot pickle the target and its arguments: {e}") from e


class Process(ProcessTemplate):
    """One managed process; ``start`` launches it, ``join`` waits for its exit code. As in
    DragonHPC it is a ``ProcessTemplate`` (its ``target``, ``args``, ``cwd``, ...,
    ``sdesc``); a handle on an existing process (``Process(None, ident=...)``) has none."""

    PIPE = ProcessTemplate.PIPE
    STDOUT = ProcessTemplate.STDOUT
    DEVNULL = ProcessTemplate.DEVNULL

    def __init__(
        self,
        target: Callable | str,
        args: tuple | None = None,
        kwargs: dict | None = None,
        cwd: str = ".",
        env: dict | None = None,
        ident: str | None = None,
        _pmi: Any = None,
        stdin: int | None = None,
        stdout: int | str | None = None,
        stderr: int | str | None = None,
        policy: Policy | None = None,
        options: Any = None,
    ):
        # Process(None, ident=NAME_OR_PUID) is a handle on an existing process of the runtime.
        if ident is not None and self._attach(ident):
            return
        self._setup(
            ProcessTemplate(target, args, kwargs, cwd, env, stdin, stdout, stderr, policy, options), ident
        )

    def _attach(self, ident: str | int) -> bool:
        a = _runtime.agent()
        if isinstance(ident, str):
            v = a.lookup("process", ident)
            if v is None:
                return False
            puid = int.from_bytes(v, "little")
        else:
            puid = int(ident)
        try:
            pid, code = a.status(puid)
        except LookupError:
            if puid != _runtime.my_puid():
                return False
            pid, code = os.getpid(), None  # this process, not one the agent started
        self._bind(puid, pid, code, ident if isinstance(ident, str) else None)
        return True

    def _bind(self, puid: int, pid: int, code: int | None, name: str | None, managed: bool = True) -> None:
        self._setup(None, name)
        self._puid, self._pid, self._returncode = puid, pid, code
        self._node = _runtime.node_of(puid)
        self._unmanaged = not managed
        if code is None and pid != os.getpid() and not self._remote:
            self._pidfd = _runtime.sentinel(pid)

    @classmethod
    def _handle(cls, puid: int, pid: int, code: int | None = None, managed: bool = True) -> Process:
        p = cls.__new__(cls)
        p._bind(puid, pid, code, None, managed)
        return p

    def _setup(self, template: ProcessTemplate | None, ident: str | None) -> None:
        self._t = template
        self._ident = ident
        self._group_policy: Policy | None = None
        self._pid: int | None = None
        self._puid: int | None = None
        self._pidfd: int | None = None
        self._returncode: int | None = None
        self._result_path: str | None = None
        self._raw_pipes = False  # Popen wraps PIPE descriptors itself
        self._pipe_fds: dict = {}
        self.stdin_conn = self.stdout_conn = self.stderr_conn = None
        self._node = machine.my_node_index()  # index of the node it runs on
        self._result_key: str | None = None  # where a remote Python target's error goes
        self._extra_env: dict = {}  # set by its group (PMI settings of an MPI rank)
        self._forced_node: int | None = None  # set by its group: placed before it starts
        self._unmanaged = False  # a handle on a process the agent did not start (see parent())
        self._ended = False  # such a process has ended (its exit code is unknown)

    @classmethod
    def from_template(cls, template: ProcessTemplate, ident: str | None = None, _pmi: Any = None) -> Process:
        """A process made from a template; ``ident`` must be a new name."""
        if ident is not None and _runtime.agent().lookup("process", ident) is not None:
            raise ProcessError(f"A process '{ident}' already exists within the Dragon runtime.")
        p = cls.__new__(cls)
        p._setup(template, ident)
        return p

    # ----- the template it was made from (DragonHPC's Process is a ProcessTemplate) -----

    def get_original_python_parameters(self) -> tuple[Callable, tuple, dict]:
        """The callable, args and kwargs as given."""
        if self._t is None:
            raise ProcessError("a handle on an existing process has no template")
        return self._t.get_original_python_parameters()

    @property
    def is_python(self) -> bool:
        """Whether the target is a Python callable."""
        return self._t is not None and self._t.is_python

    @property
    def target(self):
        """The target (callable or executable)."""
        return None if self._t is None else self._t.target

    @property
    def args(self) -> tuple:
        """Positional arguments of the target."""
        return () if self._t is None else self._t.args

    @property
    def kwargs(self) -> dict:
        """Keyword arguments of the target."""
        return {} if self._t is None else self._t.kwargs

    @property
    def policy(self):
        """The process's own Policy (None: the one in force at start)."""
        return None if self._t is None else self._t.policy

    @property
    def cwd(self) -> str | None:
        """The working directory it was made with."""
        return None if self._t is None else self._t.cwd

    @property
    def env(self) -> dict:
        """Environment variables it was made with (added to the inherited ones)."""
        return {} if self._t is None else self._t.env

    @property
    def stdin(self):
        """The stdin setting it was made with (``PIPE``, ..., None)."""
        return None if self._t is None else self._t.stdin

    @property
    def stdout(self):
        """The stdout setting it was made with."""
        return None if self._t is None else self._t.stdout

    @property
    def stderr(self):
        """The stderr setting it was made with."""
        return None if self._t is None else self._t.stderr

    @property
    def options(self):
        """The options it was made with."""
        return None if self._t is None else self._t.options

    def get_sdict(self) -> dict:
        """The template part as a dict (see ``ProcessTemplate.get_sdict``)."""
        if self._t is None:
            raise ProcessError("a handle on an existing process has no template")
        return self._t.get_sdict()

    # ----- family (DragonHPC's parent() and children()) ----------------------------------

    def parent(self) -> Process | None:
        """A handle on the process that started this one with ``start()``, or None at the
        top (the driver, processes of the "dragon" start method, a plain script). A parent
        the agent did not start (a plain script running the embedded runtime) gets a handle
        with its ``puid`` and ``pid``, alive while its pid is; its exit code is unknown
        (``join`` returns None)."""
        if self._puid is None:
            raise ProcessError("process not started")
        rec = _lineage.parent_of(self._puid)
        if rec is None:
            return None
        puid, pid = rec
        try:
            pid, code = _runtime.agent().status(puid)
        except LookupError:
            if puid == _runtime.my_puid():
                return current()
            return Process._handle(puid, pid, None, managed=False)
        return Process._handle(puid, pid, code)

    def children(self) -> list[Process]:
        """Handles on the processes this one started with ``start()`` that are still running
        (DragonHPC's live children), in start order."""
        if self._puid is None:
            raise ProcessError("process not started")
        a = _runtime.agent()
        out = []
        for puid in _lineage.started_by(self._puid):
            try:
                pid, code = a.status(puid)
            except LookupError:
                continue
            if code is None:
                out.append(Process._handle(puid, pid))
        return out

    @property
    def ident(self):
        """The name or p_uid the process was made or found with."""
        return self._ident if self._ident is not None else self._puid

    # ----- identity -----------------------------------------------------------------

    @property
    def puid(self) -> int | None:
        """The process's unique id, given by the node agent (None before start)."""
        return self._puid

    @property
    def pid(self) -> int | None:
        """The OS pid (None before start)."""
        return self._pid

    @property
    def name(self) -> str:
        """The name given as ``ident``, else one made from the puid."""
        return self._ident or f"process-{self.puid}"

    @property
    def node(self) -> int:
        """h_uid of the node the process runs on."""
        return self._node + 1

    h_uid = node

    @property
    def _remote(self) -> bool:
        return self._node != machine.my_node_index()

    @property
    def sentinel(self) -> int | None:
        """A file descriptor that polls readable once the process has exited."""
        if self._pidfd is None and self._remote and self._puid is not None and self._returncode is None:
            # Another node's process: a pipe that this process's watcher thread closes when
            # its agent says it ended (or its node is gone).
            from dragon._watch import watch

            self._pidfd = watch(self._puid)
        return self._pidfd

    # ----- lifecycle ----------------------------------------------------------------

    def _stream(self, v, fd_index: int, parent_fds: list, keep: list):
        if v is None:
            return None
        if v == ProcessTemplate.PIPE:
            r, w = os.pipe()
            child_end, parent_end = (r, w) if fd_index == 0 else (w, r)
            parent_fds.append(child_end)
            keep.append((fd_index, parent_end))
            return child_end
        if isinstance(v, (str, os.PathLike)):
            fd = os.open(v, os.O_RDONLY if fd_index == 0 else os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            parent_fds.append(fd)
            return fd
        if v in (ProcessTemplate.STDOUT, ProcessTemplate.DEVNULL):
            if v == ProcessTemplate.STDOUT and fd_index != 2:
                raise ValueError("STDOUT is only valid for stderr")
            return v
        if isinstance(v, int) and v >= 0:
            return v
        raise ValueError(f"bad value for a standard stream: {v!r}")

    def start(self) -> None:
        """Launches the process with the policy in force applied."""
        if self._pid is not None:
            raise ProcessError("process already started")
        if self._t is None:
            raise ProcessError("a handle on an existing process cannot be started")
        t = self._t
        pol = _policy_for(t.policy, self._group_policy)
        local_streams = any(v is not None for v in (t.stdin, t.stdout, t.stderr))
        node = self._forced_node if self._forced_node is not None else _target_node(pol, local_streams)
        if node != machine.my_node_index():
            self._start_remote(t, pol, node)
            _lineage.record(self._puid)
            return
        cwd = os.path.abspath(t.cwd)
        env = dict(os.environ)
        env.update({str(k): str(v) for k, v in t.env.items()})
        env.update(policy_env(pol))
        env.update(self._extra_env)
        _gpu_env(env, pol, machine.current())
        cpus = _resolve_cpus(pol.cpu_affinity) if pol.cpu_affinity else None
        payload_file = None
        if t.is_python:
            data = _payload(t)
            if len(data) <= _INLINE_PAYLOAD_MAX:
                env["DRAGON_WORKER_PAYLOAD"] = binascii.b2a_base64(data, newline=False).decode()
            else:
                fd, payload_file = tempfile.mkstemp(prefix="payload-", dir=_runtime.scratch_dir())
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                env["DRAGON_WORKER_PAYLOAD_FILE"] = payload_file
            fd, self._result_path = tempfile.mkstemp(prefix="result-", dir=_runtime.scratch_dir())
            os.close(fd)
            env["DRAGON_WORKER_RESULT"] = self._result_path
            argv = [sys.executable, "-m", "dragon._worker"]
        else:
            prog = os.fspath(t.target)
            if "/" not in prog:
                local = os.path.join(cwd, prog)
                if os.path.isfile(local) and os.access(local, os.X_OK):
                    prog = local
            argv = [prog, *map(str, t.args)]
        child_fds: list = []
        keep: list = []
        try:
            stdin = self._stream(t.stdin, 0, child_fds, keep)
            stdout = self._stream(t.stdout, 1, child_fds, keep)
            stderr = self._stream(t.stderr, 2, child_fds, keep)
            multi = bool(machine.node_table())
            self._puid, self._pid = _runtime.agent().launch(
                argv,
                list(env.items()),
                cwd=cwd,
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                cpus=cpus,
                new_group=True,
                # On several nodes the registry is the primary's: the name is bound below.
                name=None if multi else self._ident,
            )
            if multi and self._ident is not None:
                self._bind_name()
        except BaseException:
            for _, fd in keep:
                os.close(fd)
            if payload_file:
                os.unlink(payload_file)
            self._drop_result()
            raise
        finally:
            for fd in child_fds:
                os.close(fd)
        self._pipe_fds = dict(keep)
        for idx, fd in keep:
            if self._raw_pipes:
                continue
            conn = _PipeConn(fd, writable=(idx == 0))
            if idx == 0:
                self.stdin_conn = conn
            elif idx == 1:
                self.stdout_conn = conn
            else:
                self.stderr_conn = conn
        self._pidfd = _runtime.sentinel(self._pid)
        _lineage.record(self._puid)

    def _bind_name(self) -> None:
        _runtime.agent().register("process", self._ident, self._puid.to_bytes(8, "little"), replace=True)

    def _start_remote(self, t: ProcessTemplate, pol: Policy, node: int) -> None:
        """Launches on node ``node`` through its agent (see the module's docs)."""
        env = dict(os.environ)
        env.update({str(k): str(v) for k, v in t.env.items()})
        env.update(policy_env(pol))
        env.update(self._extra_env)
        _gpu_env(env, pol, machine.Node(node + 1))
        a = _runtime.agent()
        payload_key = None
        if t.is_python:
            data = _payload(t)
            if len(data) <= _INLINE_PAYLOAD_MAX:
                env["DRAGON_WORKER_PAYLOAD"] = binascii.b2a_base64(data, newline=False).decode()
            elif len(data) > _REMOTE_PAYLOAD_MAX:
                raise ProcessError(
                    f"the target and arguments pickle to {len(data)} bytes: a process on another "
                    f"node takes at most {_REMOTE_PAYLOAD_MAX} (pass large data through files)"
                )
            else:
                payload_key = uuid.uuid4().hex
                a.register("payload", payload_key, data)
                env["DRAGON_WORKER_PAYLOAD_KEY"] = payload_key
            self._result_key = uuid.uuid4().hex
            env["DRAGON_WORKER_RESULT_KEY"] = self._result_key
            argv = [sys.executable, "-m", "dragon._worker"]
        else:
            argv = [os.fspath(t.target), *map(str, t.args)]
        n_cpus = machine.node_table()[node]["num_cpus"]
        cpus = ([c for c in pol.cpu_affinity if c < n_cpus] or None) if pol.cpu_affinity else None
        try:
            self._puid, self._pid = a.launch_on(
                node, argv, list(env.items()), cwd=os.path.abspath(t.cwd), cpus=cpus, new_group=True
            )
        except BaseException:
            if payload_key is not None:
                a.unregister("payload", payload_key)
            raise
        self._node = node
        if self._ident is not None:
            self._bind_name()

    def _reap(self, block: bool) -> bool:
        if self._returncode is not None:
            return True
        if self._pid is None or self._pid == os.getpid():
            return False
        if self._unmanaged:  # no exit code: ended once its pidfd polls readable
            if not self._ended and self._pidfd is not None:
                self._ended = bool(select.select([self._pidfd], [], [], None if block else 0)[0])
            return self._ended
        if self._remote:
            code = _wait_remote(self._puid, None) if block else _runtime.agent().status(self._puid)[1]
            if code is None:
                return False
            self._returncode = code
            return True
        if block and self._pidfd is not None:
            select.select([self._pidfd], [], [])
        _, code = _runtime.agent().status(self._puid)
        if code is None:
            return False
        self._returncode = code
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        return True

    def join(self, timeout: float | None = None) -> int | None:
        """Waits for the exit (at most ``timeout`` seconds); returns the exit code or None."""
        if self._pid is None:
            raise ProcessError("process not started")
        if self._returncode is not None:
            return self._returncode
        if self._remote:
            code = _wait_remote(self._puid, None if timeout is None else max(0.0, timeout))
            if code is not None:
                self._returncode = code
            return code
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        poller = select.poll()
        poller.register(self._pidfd, select.POLLIN)
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if poller.poll(None if left is None else int(left * 1000)):
                self._reap(True)
                return self._returncode
            if deadline is not None and time.monotonic() >= deadline:
                return None

    @property
    def returncode(self) -> int | None:
        """Exit code (negative: killed by that signal); None while running."""
        self._reap(False)
        return self._returncode

    exitcode = returncode

    @property
    def is_alive(self) -> bool:
        """Started and not yet exited."""
        return self._pid is not None and not self._reap(False)

    def send_signal(self, sig: int) -> None:
        """Sends ``sig`` to the process."""
        if self._pid is None:
            raise ProcessError("process not started")
        if self._returncode is None:
            if self._remote:
                _runtime.agent().signal(self._puid, int(sig))
                return
            try:
                os.kill(self._pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        """SIGTERM."""
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL."""
        self.send_signal(signal.SIGKILL)

    def user_error(self) -> str | None:
        """The traceback of an exception the Python target raised, if any."""
        if self._result_key:
            v = _runtime.agent().lookup("result", self._result_key)
            return v.decode(errors="replace") if v else None
        if not self._result_path:
            return None
        try:
            with open(self._result_path) as f:
                text = f.read()
        except OSError:
            return None
        return text or None

    def _drop_result(self) -> None:
        if self._result_path:
            try:
                os.unlink(self._result_path)
            except OSError:
                pass
            self._result_path = None

    def __del__(self):
        try:
            if self._pidfd is not None:
                os.close(self._pidfd)
            self._drop_result()
        except Exception:
            pass


def current() -> Process:
    """The calling process, as a ``Process`` handle (``puid``, ``pid``, ``name``, ...)."""
    return Process(None, ident=_runtime.my_puid())


class Popen:
    """DragonHPC's ``Popen``: a managed executable with the ``subprocess.Popen`` interface
    (``stdin``/``stdout``/``stderr`` are binary file objects for ``PIPE``)."""

    PIPE = ProcessTemplate.PIPE
    STDOUT = ProcessTemplate.STDOUT
    DEVNULL = ProcessTemplate.DEVNULL

    def __init__(
        self,
        args,
        executable=None,
        stdin=None,
        stdout=None,
        stderr=None,
        preexec_fn=None,
        shell=False,
        cwd=None,
        env=None,
        group=None,
        user=None,
        proc_name=None,
        umask=-1,
        pipesize=-1,
        policy=None,
    ):
        if preexec_fn is not None:
            raise ValueError("preexec_fn is not supported: the runtime starts the process")
        if group is not None or user is not None:
            raise ValueError("group and user changes are not supported")
        if isinstance(args, (str, bytes, os.PathLike)):
            argv = [os.fsdecode(args)]
        else:
            argv = [os.fsdecode(a) for a in args]
        if not argv:
            raise ValueError("empty argument list")
        if shell:
            argv = ["/bin/sh", "-c", " ".join(argv)]
        if executable is not None:
            argv[0] = os.fsdecode(executable)
        self.args = args
        self._p = Process(
            target=argv[0],
            args=tuple(argv[1:]),
            cwd=cwd or ".",
            env=env,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            policy=policy,
            ident=proc_name,
        )
        self._p._raw_pipes = True
        self._p.start()
        fds = self._p._pipe_fds
        self.stdin = os.fdopen(fds[0], "wb") if 0 in fds else None
        self.stdout = os.fdopen(fds[1], "rb") if 1 in fds else None
        self.stderr = os.fdopen(fds[2], "rb") if 2 in fds else None

    @property
    def pid(self) -> int:
        """The OS pid."""
        return self._p.pid

    @property
    def puid(self) -> int:
        """The runtime's process id."""
        return self._p.puid

    @property
    def returncode(self):
        """Exit code, or None while running."""
        return self._p.returncode

    def poll(self):
        """The exit code if the process has ended, else None."""
        return self._p.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Waits for the exit; subprocess.TimeoutExpired after ``timeout`` seconds."""
        code = self._p.join(timeout)
        if code is None:
            import subprocess

            raise subprocess.TimeoutExpired(self.args, timeout)
        return code

    def communicate(self, input: bytes | None = None, timeout: float | None = None):
        """Sends ``input``, reads stdout and stderr to the end, waits; returns (out, err)."""

        out: list = []
        err: list = []
        readers = []
        for f, sink in ((self.stdout, out), (self.stderr, err)):
            if f is not None:
                t = threading.Thread(target=lambda f=f, sink=sink: sink.append(f.read()), daemon=True)
                t.start()
                readers.append(t)
        if self.stdin is not None:
            try:
                if input:
                    self.stdin.write(input)
                self.stdin.close()
            except BrokenPipeError:
                pass
        self.wait(timeout)
        for t in readers:
            t.join()
        return (out[0] if out else None, err[0] if err else None)

    def send_signal(self, sig: int) -> None:
        """Sends ``sig``."""
        self._p.send_signal(sig)

    def terminate(self) -> None:
        """SIGTERM."""
        self._p.terminate()

    def kill(self) -> None:
        """SIGKILL."""
        self._p.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for f in (self.stdin, self.stdout, self.stderr):
            if f is not None:
                f.close()
        self.wait()


def _dragon_native_python_process_main() -> None:
    """Entry of a Python process made by ``dragon.globalservices.process`` with DragonHPC's
    recipe: runs the cloudpickled ``(target, args, kwargs)`` of its argdata."""
    from dragon._argdata import run

    run()
