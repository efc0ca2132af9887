"""DragonHPC's native ``Event`` in the node's shared memory."""

from __future__ import annotations

from dragon import _native
from dragon._runtime import node_pool


class Event:
    """A process-shared flag; ``wait`` sleeps until it is set."""

    def __init__(self, m_uid: int = 0):
        self._e = _native.Event(node_pool())

    def set(self) -> None:
        """Sets the flag and wakes every waiter."""
        self._e.set()

    def clear(self) -> None:
        """Clears the flag."""
        self._e.clear()

    def is_set(self) -> bool:
        """Whether the flag is set."""
        return self._e.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Waits until set (at most ``timeout`` seconds); returns the flag."""
        return self._e.wait(timeout)

    def destroy(self) -> None:
        """Nothing to do: the event's memory goes with its last user."""
