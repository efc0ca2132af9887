"""DragonHPC's ``dragon.globalservices.process``: make, find, join and signal the runtime's
processes by p_uid or name, with descriptors (``ProcessDescriptor``) as answers.

Every function works on any process of the runtime, whoever started it: handles come from
``dragon.native.process.Process`` (the node agents' process table and name registry). A
process started with ``argdata`` finds its bytes in the runtime's name registry under a key
its environment names (``DRAGON_ARGDATA``), read once; ``create_with_argdata`` of a Python
target with DragonHPC's recipe (``-c "...; _dragon_native_python_process_main()"`` with
cloudpickled ``(target, args, kwargs)``) runs that callable.
"""

from __future__ import annotations

import base64
import enum
import json
import os
import select
import signal
import time
import uuid

from dragon._argdata import ARGDATA_ENV
from dragon.exceptions import ProcessError
from dragon.infrastructure.facts import PMIBackend
from dragon.infrastructure.policy import Policy
from dragon.infrastructure.process_desc import ArgMode, ProcessDescriptor, ProcessOptions
from dragon.native.process import Process, ProcessTemplate

PIPE = ProcessTemplate.PIPE
STDOUT = ProcessTemplate.STDOUT
DEVNULL = ProcessTemplate.DEVNULL

_handles: dict[int, Process] = {}  # processes this process started or looked up


class JoinErrors(enum.Enum):
    """Per-process status of a ``multi_join`` (DragonHPC's GSProcessJoinListResponse.Errors)."""

    SUCCESS = 0  # exited: the exit code is given
    UNKNOWN = 1  # no such process
    TIMEOUT = 2  # still running at the timeout
    SELF = 3  # a process cannot join itself


class ProcessCreateMessage:
    """A request to make a process (DragonHPC's ``GSProcessCreate``): what
    ``get_create_message`` returns and ``group.create`` takes, serialized or not."""

    def __init__(
        self,
        exe,
        run_dir=".",
        args=(),
        env=None,
        user_name="",
        options=None,
        stdin=None,
        stdout=None,
        stderr=None,
        pmi=None,
        policy=None,
    ):
        self.exe = os.fspath(exe)
        self.run_dir = os.fspath(run_dir or ".")
        self.args = [os.fspath(a) if isinstance(a, os.PathLike) else a for a in (args or ())]
        self.env = dict(env or {})
        self.user_name = user_name or ""
        self.options = options if options is not None else ProcessOptions()
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self.pmi = pmi
        self.policy = policy

    def get_sdict(self) -> dict:
        """The request as a dict of plain values."""
        opts = self.options.get_sdict()
        if opts["argdata"] is not None:
            opts["argdata"] = base64.b64encode(opts["argdata"]).decode()
        return {
            "exe": self.exe,
            "run_dir": self.run_dir,
            "args": list(self.args),
            "env": self.env,
            "user_name": self.user_name,
            "options": opts,
            "stdin": self.stdin,
            "stdout": self.stdout,
            "stderr": self.stderr,
            "pmi": None
            if self.pmi is None
            else "cray"
            if self.pmi is True
            else PMIBackend.from_str(str(self.pmi)).value,
            "policy": self.policy.get_sdict() if isinstance(self.policy, Policy) else None,
        }

    def serialize(self) -> str:
        """The request as a JSON string (``deserialize`` takes it back)."""
        return json.dumps(self.get_sdict())

    @classmethod
    def from_sdict(cls, d: dict) -> ProcessCreateMessage:
        """The request of ``get_sdict()``'s dict."""
        d = dict(d)
        opts = dict(d.pop("options") or {})
        if opts.get("argdata") is not None:
            opts["argdata"] = base64.b64decode(opts["argdata"])
        pol = d.pop("policy", None)
        return cls(
            **d, options=ProcessOptions.from_sdict(opts), policy=Policy.from_sdict(pol) if pol else None
        )

    @classmethod
    def deserialize(cls, s: str | bytes | dict) -> ProcessCreateMessage:
        """The request of ``serialize()``'s string."""
        return cls.from_sdict(s if isinstance(s, dict) else json.loads(s))


def get_create_message(
    exe,
    run_dir,
    args,
    env,
    user_name="",
    options=None,
    stdin=None,
    stdout=None,
    stderr=None,
    group=None,
    user=None,
    umask=-1,
    pipesize=-1,
    pmi=None,
    policy=None,
) -> ProcessCreateMessage:
    """A request to make a process (for ``group.create``); ``group``, ``user``, ``umask``
    and ``pipesize`` are accepted and not used, as in DragonHPC."""
    return ProcessCreateMessage(
        exe, run_dir, args, env, user_name, options, stdin, stdout, stderr, pmi, policy
    )


def get_create_message_with_argdata(
    exe,
    run_dir,
    args,
    env,
    argdata=None,
    user_name="",
    options=None,
    stdin=None,
    stdout=None,
    stderr=None,
    group=None,
    user=None,
    umask=-1,
    pipesize=-1,
    pmi=None,
    policy=None,
) -> ProcessCreateMessage:
    """As ``get_create_message``, with ``argdata`` (bytes) delivered to the new process."""
    if argdata is not None and not isinstance(argdata, (bytes, bytearray, memoryview)):
        raise TypeError("argdata must be bytes")
    opts = options if options is not None else ProcessOptions()
    opts = ProcessOptions(
        opts.make_inf_channels, ArgMode.PYTHON_IMMEDIATE, None if argdata is None else bytes(argdata)
    )
    return ProcessCreateMessage(exe, run_dir, args, env, user_name, opts, stdin, stdout, stderr, pmi, policy)


def _launch(
    msg: ProcessCreateMessage, soft: bool = False, group_policy: Policy | None = None
) -> ProcessDescriptor:
    from dragon import _runtime

    if msg.pmi is not None:
        raise ProcessError(
            "a process with pmi is an MPI rank of a group: group.create or ProcessGroup(pmi=...)"
        )
    name = msg.user_name or None
    if name is not None and _runtime.agent().lookup("process", name) is not None:
        if soft:
            return query(name)
        raise ProcessError(f"A process '{name}' already exists within the Dragon runtime.")
    env = dict(msg.env)
    if msg.options.argdata is not None:
        key = f"argdata-{uuid.uuid4().hex}"
        _runtime.agent().register("argdata", key, msg.options.argdata)
        env[ARGDATA_ENV] = key
    t = ProcessTemplate(
        msg.exe, tuple(msg.args), None, msg.run_dir, env, msg.stdin, msg.stdout, msg.stderr, msg.policy
    )
    p = Process.from_template(t, ident=name)
    p._group_policy = group_policy
    try:
        p.start()
    except Exception as e:
        if ARGDATA_ENV in env:
            _runtime.agent().unregister("argdata", env[ARGDATA_ENV])
        raise ProcessError(f"launching {msg.exe} failed: {e}") from e
    _handles[p.puid] = p
    return _describe(p)


def _describe(p: Process) -> ProcessDescriptor:
    from dragon import _runtime

    code = p.returncode
    desc = ProcessDescriptor(
        p_uid=p.puid,
        p_p_uid=_runtime.my_puid() if p.puid in _handles and p._t is not None else None,
        name=p.name,
        node=p._node,  # index of its node
        h_uid=p.h_uid,
        policy=p.policy,
        state=ProcessDescriptor.State.ACTIVE if code is None else ProcessDescriptor.State.DEAD,
        ecode=code,
    )
    desc.stdin_conn, desc.stdout_conn, desc.stderr_conn = p.stdin_conn, p.stdout_conn, p.stderr_conn
    return desc


def _handle(identifier: int | str) -> Process:
    if isinstance(identifier, bool) or not isinstance(identifier, (int, str)):
        raise ProcessError(f"a process is named by its p_uid (int) or name (str), not {identifier!r}")
    if isinstance(identifier, int) and identifier in _handles:
        return _handles[identifier]
    p = Process.__new__(Process)
    try:
        found = p._attach(identifier)
    except (LookupError, ValueError) as e:  # a p_uid of no node of this runtime
        raise ProcessError(f"no process {identifier!r} in this runtime: {e}") from None
    if not found:
        raise ProcessError(f"no process {identifier!r} in this runtime")
    _handles[p.puid] = p
    return p


def create(
    exe,
    run_dir,
    args,
    env,
    user_name="",
    options=None,
    soft=False,
    stdin=None,
    stdout=None,
    stderr=None,
    group=None,
    user=None,
    umask=-1,
    pipesize=-1,
    pmi=None,
    policy=None,
) -> ProcessDescriptor:
    """Starts ``exe`` with ``args`` in ``run_dir`` (``env`` added to this environment) and
    returns its descriptor. ``user_name`` names it (``soft``: an existing process of that
    name is returned instead of an error); ``stdin``/``stdout``/``stderr`` take ``PIPE``
    (the descriptor's ``*_conn``), ``DEVNULL`` or ``STDOUT``; ``policy`` places it."""
    msg = get_create_message(
        exe, run_dir, args, env, user_name, options, stdin, stdout, stderr, pmi=pmi, policy=policy
    )
    if options is not None and options.argdata is not None:
        msg.options = ProcessOptions(options.make_inf_channels, options.mode, options.argdata)
    return _launch(msg, soft)


def create_with_argdata(
    exe,
    run_dir,
    args,
    env,
    argdata=None,
    user_name="",
    options=None,
    soft=False,
    pmi=None,
    stdin=None,
    stdout=None,
    stderr=None,
    policy=None,
) -> ProcessDescriptor:
    """As ``create``, delivering ``argdata`` (bytes) to the new process: a Python target
    started with DragonHPC's recipe runs the cloudpickled ``(target, args, kwargs)``."""
    msg = get_create_message_with_argdata(
        exe, run_dir, args, env, argdata, user_name, options, stdin, stdout, stderr, pmi=pmi, policy=policy
    )
    return _launch(msg, soft)


def get_list() -> list[int]:
    """The p_uids of the runtime's processes, alive and dead."""
    from dragon import _runtime

    return [puid for puid, *_ in _runtime.agent().processes()]


def query(identifier: int | str) -> ProcessDescriptor:
    """The descriptor of a process (alive or ended: its ``ecode``), by p_uid or name.
    Raises ProcessError if there is no such process."""
    return _describe(_handle(identifier))


def runtime_reboot(*, puids=None, huids=None, hostnames=None):
    """DragonHPC restarts the runtime on other nodes here; this runtime does not replace
    nodes of a running allocation, so it raises ProcessError."""
    raise ProcessError(
        "runtime_reboot is not supported: this runtime does not replace nodes of a running allocation"
    )


def kill(identifier: int | str, sig: int = signal.SIGKILL, hide_stderr: bool = False) -> None:
    """Sends ``sig`` to a process (nothing if it has ended). Raises ProcessError if there is
    no such process."""
    p = _handle(identifier)
    if p.returncode is None:
        try:
            p.send_signal(sig)
        except ProcessLookupError:
            pass  # it ended meanwhile


def join(identifier: int | str, timeout: float | None = None) -> int | None:
    """Waits for a process to end: its exit code, or None after ``timeout`` seconds.
    Raises ProcessError for an unknown process or a join of oneself."""
    from dragon import _runtime

    p = _handle(identifier)
    if p.puid == _runtime.my_puid():
        raise ProcessError(f"join to {identifier} is a deadlocking self-join")
    return p.join(None if timeout is None else max(timeout, 0))


def get_multi_join_success_puids(statuses: dict) -> tuple[list[tuple[int, int]], bool]:
    """From ``multi_join``'s status dict: the ``(p_uid, exit code)`` of processes that
    exited, and whether any timed out."""
    done = [(int(k), v[1]) for k, v in statuses.items() if v[0] == JoinErrors.SUCCESS.value]
    return done, any(v[0] == JoinErrors.TIMEOUT.value for v in statuses.values())


def get_multi_join_failure_puids(statuses: dict) -> tuple[list[tuple[int, int]], bool]:
    """From ``multi_join``'s status dict: the ``(p_uid, exit code)`` of processes that
    exited non-zero, and whether any timed out."""
    bad = [
        (int(k), v[1])
        for k, v in statuses.items()
        if v[0] == JoinErrors.SUCCESS.value and v[1] not in (0, None)
    ]
    return bad, any(v[0] == JoinErrors.TIMEOUT.value for v in statuses.values())


def multi_join(identifiers, timeout=None, join_all=False, return_on_bad_exit=False):
    """Waits for processes: with ``join_all`` until every one exited (or, with
    ``return_on_bad_exit``, one exited non-zero), else until any exited; ``timeout`` bounds
    the wait. Returns ``(list of (p_uid, exit code) or None, {str(p_uid): [status, code]})``
    as DragonHPC does: None when nothing (``join_all``: not everything) exited in time."""
    from dragon import _runtime

    if len(identifiers) == 0:
        raise ProcessError("multi_join attempted on zero processes. Empty multi_join is disallowed.")
    me = _runtime.my_puid()
    handles = {}
    status: dict[str, list] = {}
    for ident in identifiers:
        try:
            p = _handle(ident)
        except ProcessError:
            status[str(ident)] = [JoinErrors.UNKNOWN.value, None]
            continue
        if p.puid == me:
            status[str(p.puid)] = [JoinErrors.SELF.value, None]
        else:
            handles[p.puid] = p
    deadline = None if timeout is None else time.monotonic() + max(timeout, 0)
    while True:
        done = {puid: p.returncode for puid, p in handles.items() if p.returncode is not None}
        if join_all:
            finished = len(done) == len(handles) or (
                return_on_bad_exit and any(c != 0 for c in done.values())
            )
        else:
            finished = bool(done)
        left = None if deadline is None else deadline - time.monotonic()
        if finished or (left is not None and left <= 0) or not handles:
            break
        fds = [p.sentinel for puid, p in handles.items() if puid not in done and p.sentinel is not None]
        wait = 0.1 if left is None else min(left, 0.1)
        if fds:
            select.select(fds, [], [], wait)
        else:
            time.sleep(wait)
    for puid in handles:
        status[str(puid)] = (
            [JoinErrors.SUCCESS.value, done[puid]] if puid in done else [JoinErrors.TIMEOUT.value, None]
        )
    ok, _ = get_multi_join_success_puids(status)
    if ok and (not join_all or len(ok) == len(identifiers)):
        return ok, status
    if ok or any(v[0] == JoinErrors.TIMEOUT.value for v in status.values()):
        return None, status
    raise ProcessError(f"process join of {list(identifiers)} failed: {status}")
