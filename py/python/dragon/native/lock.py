"""DragonHPC's native ``Lock`` in the node's shared memory (a holder that dies is recovered;
``recursive=True`` makes it re-entrant per thread)."""

from __future__ import annotations

from dragon import _native
from dragon._runtime import node_pool


class Lock:
    """A process-shared lock."""

    def __init__(self, m_uid: int = 0, recursive: bool = False):
        self._recursive = bool(recursive)
        self._l = _native.RLock(node_pool()) if recursive else _native.Lock(node_pool())

    def acquire(self, block: bool = True, timeout: float | None = None) -> bool:
        """Takes the lock; False on time-out (or when not blocking and held)."""
        return self._l.acquire(block, timeout)

    def release(self) -> None:
        """Releases (ValueError when not held)."""
        self._l.release()

    def is_recursive(self) -> bool:
        """Whether the lock is recursive."""
        return self._recursive

    def is_mine(self) -> bool:
        """Whether the calling thread owns a recursive lock."""
        return self._recursive and self._l.is_mine()

    def count(self) -> int:
        """Recursion depth of a recursive lock (0 or 1 for a plain one)."""
        return self._l.count() if self._recursive else int(self._l.is_locked())

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
