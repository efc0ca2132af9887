"""DragonHPC's native ``Semaphore`` in the node's shared memory."""

from __future__ import annotations

from dragon import _native
from dragon._runtime import node_pool


class Semaphore:
    """A process-shared counting semaphore (``bounded=True``: releasing above the initial
    value raises ValueError)."""

    def __init__(self, value: int = 1, *, m_uid: int = 0, bounded: bool = False):
        if value < 0:
            raise ValueError("semaphore initial value must be >= 0")
        cls = _native.BoundedSemaphore if bounded else _native.Semaphore
        self._s = cls(node_pool(), value)

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        """Takes one unit; False on time-out."""
        return self._s.acquire(blocking, timeout)

    def release(self, n: int = 1) -> None:
        """Returns ``n`` units."""
        self._s.release(n)

    def get_value(self) -> int:
        """Units free now."""
        return self._s.get_value()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
