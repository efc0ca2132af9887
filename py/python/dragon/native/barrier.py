"""DragonHPC's native ``Barrier`` in the node's shared memory."""

from __future__ import annotations

import threading
from collections.abc import Callable

from dragon import _native
from dragon._runtime import node_pool

BrokenBarrierError = threading.BrokenBarrierError


class Barrier:
    """A barrier for ``parties`` processes; ``wait`` returns a distinct index per party. The
    last party to arrive calls ``action`` (if given) before the others are released; if it
    raises, the barrier breaks."""

    def __init__(
        self,
        parties: int = 2,
        action: Callable | None = None,
        timeout: float | None = None,
        m_uid: int = 0,
    ):
        if parties < 1:
            raise ValueError("parties must be >= 1")
        if action is not None and not callable(action):
            raise TypeError("action must be callable")
        self._action = action
        self._timeout = timeout
        self._b = _native.Barrier(node_pool(), parties)

    def wait(self, timeout: float | None = None) -> int:
        """Waits for all parties (BrokenBarrierError when broken or timed out)."""
        return self._b.wait(self._timeout if timeout is None else timeout, self._action)

    def abort(self) -> None:
        """Breaks the barrier."""
        self._b.abort()

    def reset(self) -> None:
        """Returns the barrier to its initial state."""
        self._b.reset()

    @property
    def parties(self) -> int:
        """Number of parties."""
        return self._b.parties

    @property
    def n_waiting(self) -> int:
        """Parties waiting now."""
        return self._b.n_waiting

    @property
    def broken(self) -> bool:
        """Whether the barrier is broken."""
        return self._b.broken

    def destroy(self) -> None:
        """Nothing to do: the barrier's memory goes with its last user."""
