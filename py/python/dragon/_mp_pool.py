"""The "dragon" start method's ``Pool``: CPython's ``multiprocessing.pool.Pool`` (workers are
the context's processes) with DragonHPC's ``patience`` on ``terminate`` and ``join``.

DragonHPC's start method gives a Pool built on its native Pool, whose ``terminate(patience=)``
and ``join(patience=)`` bound how long workers get after each signal; its multiprocessing
unit tests call ``pool.terminate(patience=1)``. Here ``terminate`` is CPython's (SIGTERM to
every worker, then wait for them) and a worker still running ``patience`` seconds later is
sent SIGKILL; ``join(patience)`` waits for the workers up to ``patience`` seconds, then ends
the ones left the same way. Without ``patience`` both are exactly CPython's.
"""

from __future__ import annotations

import threading
import time
from multiprocessing import pool as _pool


class DragonPool(_pool.Pool):
    """``multiprocessing.pool.Pool`` with DragonHPC's ``patience`` arguments."""

    def _kill_after(self, patience: float, workers: list) -> tuple[threading.Event, threading.Thread]:
        """A thread that sends SIGKILL to the workers still running after ``patience``
        seconds, unless the returned event is set first."""
        done = threading.Event()

        def escalate() -> None:
            if not done.wait(patience):
                for p in workers:
                    if p.exitcode is None:
                        p.kill()

        t = threading.Thread(target=escalate, name="dragon-pool-patience", daemon=True)
        t.start()
        return done, t

    def terminate(self, patience: float | None = None) -> None:
        """Stops the workers now (work not done yet is dropped): SIGTERM to each, and SIGKILL
        to those still running ``patience`` seconds later (None: wait as CPython does)."""
        if patience is None:
            super().terminate()
            return
        done, t = self._kill_after(max(0.0, patience), list(self._pool))
        try:
            super().terminate()
        finally:
            done.set()
            t.join()

    def join(self, patience: float | None = None) -> None:
        """Waits for the workers to exit after ``close`` or ``terminate``. With ``patience``,
        workers still running after ``patience`` seconds are terminated (SIGTERM, then
        SIGKILL ``patience`` seconds later) and the pool is then joined."""
        if patience is None:
            super().join()
            return
        if self._state == _pool.RUN:
            raise ValueError("Pool is still running")
        deadline = time.monotonic() + max(0.0, patience)
        for p in list(self._pool):
            p.join(max(0.0, deadline - time.monotonic()))
        if any(p.exitcode is None for p in self._pool):
            self.terminate(patience)
        super().join()
