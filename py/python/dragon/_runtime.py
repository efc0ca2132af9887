"""How a process finds its runtime: the node pool and the node agent.

Under the ``dragon`` launcher (or in any process the runtime manages) ``DRAGON_RUNTIME`` names
the runtime: ``1:<runtime id hex>:<node>:<agent request channel>``. The node pool is
``/dragon-<rt>-<node>-pool-1``; its creator is the node agent, so the runtime lives exactly
as long as the agent's process. Without it (plain ``python script.py``), the first runtime
object starts an embedded runtime: a detached agent process (``python -m dragon._agent``)
tied to this script, which ends it (and every process it started) when the script exits.
A ``DRAGON_RUNTIME`` whose runtime is gone is a clear error, never a hang.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading

from dragon import _log, _native
from dragon.exceptions import DragonRuntimeError, DragonValueError, RuntimeGoneError

RUNTIME_ENV = "DRAGON_RUNTIME"
RUNTIME_ENV_VERSION = "1"
DEFAULT_POOL_SIZE = 1 << 30

_lock = threading.RLock()
_pool = None
_client = None
_embedded_agent: int | None = None  # pid of the embedded runtime's agent (ours to end)
_my_puid: int | None = None


#: The runtime named by DRAGON_RUNTIME no longer exists (the name this module has always had).
RuntimeGone = RuntimeGoneError


def pool_size() -> int:
    """Size of a node pool: ``DRAGON_DEFAULT_SEG_SZ`` bytes, else a quarter of the free space
    of /dev/shm, at most 1 GiB (the segment is sparse)."""
    v = os.environ.get("DRAGON_DEFAULT_SEG_SZ")
    if v:
        try:
            return max(1 << 20, int(v))
        except ValueError:
            raise DragonValueError(f"DRAGON_DEFAULT_SEG_SZ must be a number of bytes, not {v!r}") from None
    try:
        st = os.statvfs("/dev/shm")
        return max(1 << 20, min(DEFAULT_POOL_SIZE, st.f_bavail * st.f_frsize // 4))
    except OSError:
        return DEFAULT_POOL_SIZE


def parse_env(value: str) -> tuple[int, int, str]:
    """(runtime id, node index, agent channel) from a DRAGON_RUNTIME value."""
    parts = value.split(":")
    if len(parts) != 4 or parts[0] != RUNTIME_ENV_VERSION or not parts[3]:
        raise RuntimeGone(f"{RUNTIME_ENV}={value!r} is not a runtime this version of dragon understands")
    try:
        return int(parts[1], 16), int(parts[2]), parts[3]
    except ValueError:
        raise RuntimeGone(f"{RUNTIME_ENV}={value!r} is malformed") from None


def _start_embedded() -> str:
    """Starts the embedded runtime's agent; returns its DRAGON_RUNTIME value."""
    global _embedded_agent
    r, w = os.pipe()
    try:
        pid = _native.spawn(
            [sys.executable, "-m", "dragon._agent", str(w), str(os.getpid())],
            env=list(os.environ.items()),
            stdin=-3,
            new_group=True,
            pass_fds=[w],
        )
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    with os.fdopen(r, "rb") as f:
        line = f.readline().decode().strip()
    if not line.startswith(RUNTIME_ENV_VERSION + ":"):
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        raise DragonRuntimeError(f"the embedded Dragon runtime did not start{': ' + line if line else ''}")
    _embedded_agent = pid
    atexit.register(_shutdown)
    return line


def _attach() -> None:
    global _pool, _client
    value = os.environ.get(RUNTIME_ENV)
    if not value:
        value = _start_embedded()
        os.environ[RUNTIME_ENV] = value
        os.environ.setdefault("DRAGON_DEFAULT_SEG_SZ", str(pool_size()))  # as DragonHPC's
    rt, node, chan = parse_env(value)
    name = _native.segment_name(rt, node, "pool", 1)
    try:
        pool = _native.Pool.open(name)
    except FileNotFoundError:
        raise RuntimeGone(
            f"the Dragon runtime {rt:016x} named by {RUNTIME_ENV} is gone "
            "(its launcher ended); unset it to start an embedded runtime"
        ) from None
    _client = _native.AgentClient(pool, chan)
    _pool = pool
    _log.configure(rt, node)


def node_pool() -> _native.Pool:
    """This node's pool of the current runtime (starting an embedded runtime if needed)."""
    with _lock:
        if _pool is None:
            _attach()
        return _pool


def agent() -> _native.AgentClient:
    """This process's connection to its node agent (starting an embedded runtime if needed)."""
    with _lock:
        if _client is None:
            _attach()
        return _client


_waiter = threading.local()


def waiter_client() -> _native.AgentClient:
    """This thread's own connection to the node agent, for calls that wait long (a wait for
    a process on another node), which would hold up the process's shared connection. One per
    thread and process, reused: a wait abandoned after its timeout is answered late into it
    and skipped by the next call."""
    c = getattr(_waiter, "client", None)
    if c is None or _waiter.pid != os.getpid():
        node_pool()
        c = _native.AgentClient(_pool, parse_env(os.environ[RUNTIME_ENV])[2])
        _waiter.client, _waiter.pid = c, os.getpid()
    return c


#: Ids are ``ID_BASE + (node << NODE_SHIFT) + n``: an id names the node it was made on.
ID_BASE = 1 << 32
NODE_SHIFT = 40


def node_of(uid: int) -> int:
    """The index of the node a p_uid (or other runtime id) was made on."""
    return max(0, uid - ID_BASE) >> NODE_SHIFT


def my_puid() -> int:
    """This process's p_uid: the one the agent gave it at launch, else a fresh one."""
    global _my_puid
    with _lock:
        if _my_puid is None:
            c = agent()
            v = os.environ.get("DRAGON_PUID")
            agent_pid = _native.segment_creator(_pool.name)[0]
            if v and v.isdigit() and os.getppid() == agent_pid:
                _my_puid = int(v)
            else:
                _my_puid = c.new_id("p_uid")
        return _my_puid


def scratch_dir(rt: int | None = None) -> str:
    """A private directory of the runtime for files that must not outlive it (launch
    payloads, worker results); the runtime's teardown and ``dragon-cleanup`` remove it."""
    if rt is None:
        node_pool()  # attaches, or starts the embedded runtime (which sets DRAGON_RUNTIME)
        rt = parse_env(os.environ[RUNTIME_ENV])[0]
    d = scratch_path(rt)
    os.makedirs(d, mode=0o700, exist_ok=True)
    st = os.lstat(d)
    if st.st_uid != os.getuid() or st.st_mode & 0o077 or not os.path.isdir(d) or os.path.islink(d):
        raise PermissionError(f"{d} is not a private directory of this user: refusing to use it")
    return d


def scratch_path(rt: int) -> str:
    """Where runtime ``rt``'s scratch directory is on this host (made or not)."""
    import tempfile

    return os.path.join(tempfile.gettempdir(), f"dragon-rs-{rt:016x}")


def remove_scratch_dir(rt: int) -> None:
    """Removes the runtime's scratch directory (teardown)."""
    import shutil

    shutil.rmtree(scratch_path(rt), ignore_errors=True)


def sentinel(pid: int) -> int:
    """A descriptor that polls readable once process ``pid`` (just launched) has ended: its
    pidfd, or, when it already ended and was reaped, a pipe that is already at end of file."""
    try:
        return _native.pidfd_open(pid)
    except ProcessLookupError:
        r, w = os.pipe()
        os.close(w)
        return r


def _shutdown() -> None:
    """End of a script that started an embedded runtime: its agent ends the runtime's
    processes and removes its segments; we wait for that."""
    global _pool, _client, _embedded_agent
    mp = sys.modules.get("multiprocessing.util")
    if mp is not None:
        # Join non-daemon multiprocessing children first, as the interpreter would have.
        try:
            mp._exit_function()
        except Exception:
            pass
    with _lock:
        _client = None
        _pool = None
        pid, _embedded_agent = _embedded_agent, None
    if pid is not None:
        try:
            os.kill(pid, signal.SIGTERM)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def _after_fork_in_child() -> None:
    global _pool, _client, _embedded_agent, _lock, _my_puid
    _lock = threading.RLock()
    # The child uses the parent's runtime (DRAGON_RUNTIME is inherited) with handles of its
    # own; it never ends the parent's embedded agent.
    _embedded_agent = None
    _pool = None
    _client = None
    _my_puid = None


os.register_at_fork(after_in_child=_after_fork_in_child)
