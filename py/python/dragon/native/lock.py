"""DragonHPC's native ``Lock`` in the node's shared memory (a holder that dies is recovered)."""

from __future__ import annotations

from dragon import _native
from dragon._runtime import node_pool


class Lock:
    """A process-shared lock."""

    def __init__(self, m_uid: int = 0, recursive: bool = False):
        if recursive:
            raise NotImplementedError("recursive native Locks are not built yet")
        self._l = _native.Lock(node_pool())

    def acquire(self, block: bool = True, timeout: float | None = None) -> bool:
        """Takes the lock; False on time-out (or when not blocking and held)."""
        return self._l.acquire(block, timeout)

    def release(self) -> None:
        """Releases (ValueError when not held)."""
        self._l.release()

    def is_recursive(self) -> bool:
        """Always False here."""
        return False

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
