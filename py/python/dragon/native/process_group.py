"""Groups of processes: DragonHPC's ``ProcessGroup``.

``add_process(nproc, template)`` any number of times, then ``init()``, ``start()``,
``join(timeout)`` and ``close()`` (or use the group as a context manager). With
``restart=True`` an exited process is started again from its template until ``stop()``.
``walltime`` (seconds) stops the group when it passes. After ``join``, a Python target that
raised (or any process that exited non-zero, unless the group signalled it) makes ``join``
raise :class:`DragonUserCodeError` with the exit codes and the tracebacks, unless
``ignore_error_on_exit=True``.

``pmi`` (``PMIBackend.CRAY``/``PMIX``, ``"cray"``/``"pmix"`` or ``True``) makes the group's
processes that run programs MPI ranks, in the order added: the group serves them PMI-1
(``dragon._pmi``), and PMIx (``dragon._pmix``) for Open MPI programs or ``"pmix"``; a rank
that calls ``MPI_Abort``, exits non-zero or exits without ``MPI_Finalize`` ends the others.
Python callables in such a group run beside the ranks, without PMI settings.
"""

from __future__ import annotations

import select
import signal
import threading
import time

from dragon.exceptions import (  # noqa: F401  (re-exported: DragonHPC's names, as its module has them)
    DragonProcessGroupAlreadyInitialized,
    DragonProcessGroupError,
    DragonProcessGroupException,
    DragonProcessGroupIdleError,
    DragonProcessGroupJoinError,
    DragonProcessGroupRunningError,
    DragonProcessGroupSignalError,
    DragonProcessGroupStartError,
    DragonTimeoutError,
    DragonUserCodeError,
)
from dragon.infrastructure.facts import PMIBackend
from dragon.infrastructure.policy import Policy
from dragon.native.process import Process, ProcessTemplate

_POLL_MS = 100


# Libraries of MPI implementations that find their launcher through PMIx only.
_PMIX_ONLY = (b"libmpi.so.40", b"libopen-rte.so", b"libpmix.so")


def _needs_pmix(target, cwd: str) -> bool:
    """Whether a rank program is linked with Open MPI (which finds its launcher through PMIx
    only). Only ELF files are looked at: scripts run an interpreter, whose MPI is unknown."""
    import os
    import shutil

    prog = os.fspath(target)
    path = prog if "/" in prog else (shutil.which(prog) or os.path.join(cwd, prog))
    try:
        with open(path, "rb") as f:
            head = f.read(4 << 20)
    except OSError:
        return False  # not readable here: the launch reports it
    return head[:4] == b"\x7fELF" and any(lib in head for lib in _PMIX_ONLY)


def _pmi_backend(pmi) -> PMIBackend | None:
    """``pmi`` as DragonHPC accepts it: None, a PMIBackend, "cray"/"pmix", or True (CRAY)."""
    if pmi is None or pmi is False:
        return None
    if pmi is True:
        return PMIBackend.CRAY
    if isinstance(pmi, PMIBackend):
        return pmi
    if isinstance(pmi, str):
        return PMIBackend.from_str(pmi)
    raise ValueError(f"pmi must be a PMIBackend, 'cray', 'pmix' or True, not {pmi!r}")


class ProcessGroup:
    """A set of managed processes started, watched and ended together."""

    def __init__(
        self,
        restart: bool = False,
        ignore_error_on_exit: bool = False,
        pmi: str | None = None,
        walltime: float | None = None,
        policy: Policy | None = None,
        critical: bool = False,
        name: str | None = None,
    ):
        self.pmi = _pmi_backend(pmi)
        if self.pmi is not None and restart:
            raise ValueError("restart=True cannot be combined with pmi: an MPI rank cannot be replaced alone")
        if walltime is not None and walltime <= 0:
            raise ValueError("walltime must be positive")
        if policy is not None and not isinstance(policy, Policy):
            raise TypeError("policy must be a Policy")
        self.restart = restart
        self.ignore_error_on_exit = ignore_error_on_exit
        self.walltime = walltime
        self.policy = policy
        self.critical = critical
        self.name = name
        self._templates: list[tuple[int, ProcessTemplate]] = []
        self._initialized = False
        self._lock = threading.Condition()
        self._active: dict = {}  # puid -> (Process, template)
        self._inactive: list[tuple[int, int]] = []
        self._errors: list[tuple[int, int, str | None]] = []
        self._signalled: set = set()
        self._stopping = False
        self._monitor: threading.Thread | None = None
        self._started_at: float | None = None
        self._closed = False
        self._pmi_server = None  # the PMI-1 service of this start (pmi groups)
        self._pmix_job = None  # its PMIx namespace, when a rank needs PMIx (Open MPI)
        self._ranks: dict[int, int] = {}  # puid -> MPI rank of this start
        self._aborted: tuple[int, int] | None = None  # (rank, code) of a PMI_Abort

    # ----- building -----------------------------------------------------------------

    def add_process(self, nproc: int, template: ProcessTemplate) -> None:
        """Adds ``nproc`` processes made from ``template``."""
        if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
            raise ValueError("nproc must be a positive int")
        if not isinstance(template, ProcessTemplate):
            raise TypeError("template must be a ProcessTemplate")
        if self._monitor is not None:
            raise DragonProcessGroupStartError("cannot add processes to a started group")
        self._templates.append((nproc, template))

    def init(self) -> None:
        """Readies the group (DragonHPC creates its manager here)."""
        if self._initialized:
            raise DragonProcessGroupAlreadyInitialized("init() called twice")
        self._initialized = True

    # ----- running ------------------------------------------------------------------

    def _launch(self, template: ProcessTemplate, node: int | None = None, env: dict | None = None) -> Process:
        p = Process.from_template(template)
        p._group_policy = self.policy
        p._forced_node = node
        p._extra_env = env or {}
        p.start()
        with self._lock:
            self._active[p.puid] = (p, template)
        return p

    def start(self) -> None:
        """Starts every process."""
        if not self._initialized:
            raise DragonProcessGroupStartError("call init() before start()")
        if self._monitor is not None:
            raise DragonProcessGroupStartError("the group was started already")
        if not self._templates:
            raise DragonProcessGroupStartError("the group has no processes")
        self._started_at = time.monotonic()
        try:
            if self.pmi is not None:
                self._start_ranks()
            else:
                for nproc, t in self._templates:
                    for _ in range(nproc):
                        self._launch(t)
        except BaseException as e:
            self._stopping = True
            self._signal_all(signal.SIGKILL)
            self._reap_all_blocking()
            for service in (self._pmi_server, self._pmix_job):
                if service is not None:
                    service.close()
            raise DragonProcessGroupStartError(f"launching the group failed: {e}") from e
        self._monitor = threading.Thread(target=self._watch, name="dragon-pg-monitor", daemon=True)
        self._monitor.start()

    def _start_ranks(self) -> None:
        """A PMI group: its processes running programs (not Python callables) are the MPI
        ranks, in the order added. Their nodes are decided first (the process mapping needs
        them), then each starts with its PMI settings on its node."""
        from dragon import _pmi
        from dragon.native import machine
        from dragon.native.process import _policy_for, _target_node

        plan = []
        for nproc, t in self._templates:
            local = any(v is not None for v in (t.stdin, t.stdout, t.stderr))
            for _ in range(nproc):
                node = None if t.is_python else _target_node(_policy_for(t.policy, self.policy), local)
                plan.append((t, node))
        nodes = [n for _, n in plan if n is not None]
        if not nodes:
            raise ValueError("a PMI group needs at least one process running a program (an MPI rank)")
        programs = {(str(t.target), t.cwd) for t, n in plan if n is not None}
        openmpi = [prog for prog, cwd in sorted(programs) if _needs_pmix(prog, cwd)]  # each read once
        table = machine.node_table()
        host = table[machine.my_node_index()]["ip"] if table else "127.0.0.1"
        self._ranks = {}
        self._pmi_server = _pmi.PMIServer(nodes, host, self._pmi_abort)
        if openmpi or self.pmi == PMIBackend.PMIX:
            from dragon import _pmix

            try:
                hosts = [table[n]["hostname"] if table else "localhost" for n in nodes]
                self._pmix_job = _pmix.PMIxJob(hosts, host, self._pmi_abort)
            except _pmix.PMIxUnavailable as e:
                if openmpi:  # MPICH ranks of a "pmix" group are served by PMI-1 alone
                    raise DragonProcessGroupStartError(f"{openmpi[0]} is an Open MPI program: {e}") from None
        rank = 0
        for t, node in plan:
            if node is None:  # a Python worker beside the ranks
                self._launch(t)
                continue
            env = self._pmi_server.env(rank)
            if self._pmix_job is not None:
                env.update(self._pmix_job.env(rank))
            p = self._launch(t, node, env)
            with self._lock:
                self._ranks[p.puid] = rank
            rank += 1

    def _unfinalized(self, puid: int) -> bool:
        """Whether a rank that started MPI (PMI-1 init or PMIx connect) ended without
        finalizing it. Programs of the group that never started MPI are not ranks in effect."""
        rank = self._ranks.get(puid)
        if rank is None or self._pmi_server is None:
            return False
        servers = [(self._pmi_server.initialized, self._pmi_server.finalized)]
        if self._pmix_job is not None:
            servers.append((self._pmix_job.connected, self._pmix_job.finalized))
        return any(rank in began and rank not in ended for began, ended in servers)

    def _pmi_abort(self, rank: int, code: int, message: str) -> None:
        """A rank called MPI_Abort: the group's other processes end (as mpiexec does)."""
        with self._lock:
            if self._aborted is None:
                self._aborted = (rank, code)
                why = f"MPI rank {rank} called MPI_Abort({code}) {message}".rstrip()
                self._errors.append((-1, code, why))
        threading.Thread(target=self._end_ranks, daemon=True).start()

    def _end_ranks(self) -> None:
        """Ends every process of a PMI group still running: a rank that aborted or failed
        leaves the others waiting in collective calls for ever."""
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + 2.0
        with self._lock:
            while self._active and time.monotonic() < deadline:
                self._lock.wait(0.1)
        self._signal_all(signal.SIGKILL)

    def _watch(self) -> None:
        while True:
            with self._lock:
                procs = [p for p, _ in self._active.values()]
                if not procs and (self._stopping or not self.restart):
                    self._lock.notify_all()
                    return
            if self.walltime is not None and not self._stopping:
                if time.monotonic() - self._started_at >= self.walltime:
                    threading.Thread(target=self.stop, daemon=True).start()
            poller = select.poll()
            for p in procs:
                if p.sentinel is not None:
                    poller.register(p.sentinel, select.POLLIN)
            ready = poller.poll(_POLL_MS) if procs else time.sleep(_POLL_MS / 1000) or []
            if not ready:
                continue
            for p in procs:
                if not p.is_alive:
                    self._exited(p)

    def _exited(self, p: Process) -> None:
        code = p.returncode
        with self._lock:
            entry = self._active.pop(p.puid, None)
            if entry is None:
                return  # already recorded
            template = entry[1]
            self._inactive.append((p.puid, code))
            failed = code != 0 and p.puid not in self._signalled
            if failed:
                self._errors.append((p.puid, code, p.user_error()))
            elif code == 0 and self._unfinalized(p.puid):
                failed = True  # its peers wait for it in collective calls for ever
                rank = self._ranks[p.puid]
                self._errors.append((p.puid, code, f"MPI rank {rank} exited without calling MPI_Finalize"))
            p._drop_result()
            respawn = self.restart and not self._stopping
            end_ranks = failed and self._pmi_server is not None and self._active and not self._stopping
            if not self._active and self._pmi_server is not None:
                self._pmi_server.close()
                if self._pmix_job is not None:
                    self._pmix_job.close()
            self._lock.notify_all()
        if end_ranks:  # an MPI rank that fails takes its group down, as under mpiexec
            threading.Thread(target=self._end_ranks, daemon=True).start()
        if respawn:
            try:
                self._launch(template)
            except Exception as e:  # keep watching the others; report at join
                with self._lock:
                    self._errors.append((-1, -1, f"restart failed: {e}"))

    def join(self, timeout: float | None = None) -> None:
        """Waits until every process has exited (with ``restart=True``: until the group is
        stopped). Raises TimeoutError after ``timeout`` seconds, and DragonUserCodeError
        when processes failed (unless ``ignore_error_on_exit``)."""
        if self._monitor is None:
            raise DragonProcessGroupIdleError("the group was not started")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._active or (self.restart and not self._stopping):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise DragonTimeoutError(f"processes still running after {timeout} s")
                self._lock.wait(0.2 if left is None else min(left, 0.2))
        self._raise_errors()

    def _raise_errors(self) -> None:
        with self._lock:
            errors, self._errors = self._errors, []
        if errors and not self.ignore_error_on_exit:
            codes = [c for _, c, _ in errors]
            tbs = "\n".join(f"--- puid {puid} ---\n{tb}" for puid, _, tb in errors if tb)
            msg = f"Error(s) in user-provided code resulted in exit codes: {codes}"
            raise DragonUserCodeError(msg + ("\n" + tbs if tbs else ""))

    def _signal_all(self, sig: int) -> None:
        with self._lock:
            procs = [p for p, _ in self._active.values()]
            self._signalled.update(p.puid for p in procs)
        for p in procs:
            p.send_signal(sig)

    def _reap_all_blocking(self) -> None:
        with self._lock:
            procs = [p for p, _ in self._active.values()]
        for p in procs:
            p.join()
            self._exited(p)

    def send_signal(self, sig: int, hide_stderr: bool = False) -> None:
        """Sends ``sig`` to every running process."""
        self._signal_all(sig)

    def terminate(self, hide_stderr: bool = False) -> None:
        """SIGTERM to every running process."""
        self._signal_all(signal.SIGTERM)

    def kill(self, hide_stderr: bool = False) -> None:
        """SIGKILL to every running process."""
        self._signal_all(signal.SIGKILL)

    def stop(self, patience: float = 5.0) -> None:
        """Stops restarting, then ends the processes: SIGINT, after ``patience`` seconds
        SIGTERM, then SIGKILL."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._monitor is None:
            return
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            self._signal_all(sig)
            deadline = time.monotonic() + patience
            with self._lock:
                while self._active and time.monotonic() < deadline:
                    self._lock.wait(min(0.1, max(0.0, deadline - time.monotonic())))
                if not self._active:
                    break

    def stop_restart(self) -> None:
        """Stops restarting processes; running ones go on."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()

    def close(self, patience: float = 5.0) -> None:
        """Stops the group if it still runs and releases it."""
        if self._closed:
            return
        with self._lock:
            running = bool(self._active)
        if running or (self.restart and not self._stopping):
            self.stop(patience)
        if self._monitor is not None:
            self._monitor.join()
        self._closed = True

    # ----- status -------------------------------------------------------------------

    @property
    def puids(self) -> list[int]:
        """puids of the running processes."""
        with self._lock:
            return list(self._active)

    @property
    def inactive_puids(self) -> list[tuple[int, int]]:
        """(puid, exit code) of the processes that have exited."""
        with self._lock:
            return list(self._inactive)

    @property
    def exit_status(self) -> list[tuple[int, int]]:
        """(puid, exit code) of the processes that have exited."""
        return self.inactive_puids

    @property
    def in_error_state(self) -> bool:
        """Whether processes failed and the failure was not reported yet."""
        with self._lock:
            return bool(self._errors)

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self):
        try:
            if not self._closed and self._monitor is not None:
                self.close(patience=1.0)
        except Exception:
            pass
