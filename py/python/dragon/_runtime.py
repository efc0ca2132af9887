"""How a process finds its runtime's shared memory.

Under the ``dragon`` launcher (or in any process it manages) ``DRAGON_RUNTIME`` names the
runtime (``1:<runtime id hex>:<node>:<agent channel>``), and its node pool is
``/dragon-<rt>-<node>-pool-1``. Without it (plain ``python script.py``), the first runtime
object creates an embedded runtime: a node pool owned by this process, removed when the
process exits, and ``DRAGON_RUNTIME`` set so that processes started from here find it.
A ``DRAGON_RUNTIME`` whose runtime is gone is a clear error, never a hang.
"""

from __future__ import annotations

import atexit
import os
import threading

from dragon import _native

RUNTIME_ENV = "DRAGON_RUNTIME"
RUNTIME_ENV_VERSION = "1"
DEFAULT_POOL_SIZE = 1 << 30

_lock = threading.Lock()
_pool = None
_embedded = False


class RuntimeGone(RuntimeError):
    """The runtime named by DRAGON_RUNTIME no longer exists."""


def pool_size() -> int:
    """Size of a node pool: ``DRAGON_DEFAULT_SEG_SZ`` bytes, else a quarter of the free space
    of /dev/shm, at most 1 GiB (the segment is sparse)."""
    v = os.environ.get("DRAGON_DEFAULT_SEG_SZ")
    if v:
        try:
            return max(1 << 20, int(v))
        except ValueError:
            raise ValueError(f"DRAGON_DEFAULT_SEG_SZ must be a number of bytes, not {v!r}") from None
    try:
        st = os.statvfs("/dev/shm")
        return max(1 << 20, min(DEFAULT_POOL_SIZE, st.f_bavail * st.f_frsize // 4))
    except OSError:
        return DEFAULT_POOL_SIZE


def parse_env(value: str) -> tuple[int, int]:
    """(runtime id, node index) from a DRAGON_RUNTIME value."""
    parts = value.split(":")
    if len(parts) < 3 or parts[0] != RUNTIME_ENV_VERSION:
        raise RuntimeGone(f"{RUNTIME_ENV}={value!r} is not a runtime this version of dragon understands")
    try:
        return int(parts[1], 16), int(parts[2])
    except ValueError:
        raise RuntimeGone(f"{RUNTIME_ENV}={value!r} is malformed") from None


def env_value(rt: int, node: int = 0) -> str:
    """The DRAGON_RUNTIME value for runtime ``rt``."""
    return f"{RUNTIME_ENV_VERSION}:{rt:016x}:{node}:"


def node_pool() -> _native.Pool:
    """This node's pool of the current runtime (creating an embedded runtime if needed)."""
    global _pool, _embedded
    with _lock:
        if _pool is not None:
            return _pool
        value = os.environ.get(RUNTIME_ENV)
        if value:
            rt, node = parse_env(value)
            name = _native.segment_name(rt, node, "pool", 1)
            try:
                _pool = _native.Pool.open(name)
            except FileNotFoundError:
                raise RuntimeGone(
                    f"the Dragon runtime {rt:016x} named by {RUNTIME_ENV} is gone "
                    "(its launcher ended); unset it to start an embedded runtime"
                ) from None
        else:
            rt = _native.random_runtime()
            _pool = _native.Pool.create(_native.segment_name(rt, 0, "pool", 1), pool_size())
            os.environ[RUNTIME_ENV] = env_value(rt)
            _embedded = True
            atexit.register(_shutdown)
        return _pool


def _shutdown() -> None:
    global _pool
    with _lock:
        _pool = None  # the creator's last handle unlinks the segment


def _after_fork_in_child() -> None:
    global _pool, _embedded, _lock
    _lock = threading.Lock()
    if _embedded:
        # The child must not unlink the parent's pool: drop our handle without owning it.
        _embedded = False
    _pool = None


os.register_at_fork(after_in_child=_after_fork_in_child)
