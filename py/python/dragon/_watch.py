"""One thread per process that waits for the ends of processes of other nodes (children
on other nodes, the parent of a child started on another node): their sentinels are pipes
it closes as each process's agent reports the end. It waits for all of them on one agent
connection (``dragon._native.AgentWaits``), instead of a thread and a connection each."""

from __future__ import annotations

import os
import threading

from dragon import _native


class _Watcher:
    """Every process end this process waits for (children on other nodes, the parent of a
    child started on another node), on one connection to the node agent, read by one
    thread: ``add`` asks, the thread runs the ends' callbacks as the agent reports them."""

    def __init__(self):
        from dragon._runtime import RUNTIME_ENV, node_pool, parse_env

        self.pid = os.getpid()
        self.waits = _native.AgentWaits(node_pool(), parse_env(os.environ[RUNTIME_ENV])[2])
        self.lock = threading.Lock()
        self.pending: dict[int, list] = {}  # puid -> callbacks
        threading.Thread(target=self._run, name="dragon-watch", daemon=True).start()

    def add(self, puid: int, done) -> None:
        """Runs ``done(exit code or None)`` in the watcher thread once ``puid`` ended (at once
        in this thread when the agent cannot be asked)."""
        with self.lock:
            self.pending.setdefault(puid, []).append(done)
        try:
            self.waits.add(puid)
        except Exception:  # the agent is gone, or too many waits at once: ended for us
            with self.lock:
                callbacks = self.pending.get(puid, [])
                if done in callbacks:
                    callbacks.remove(done)
                if not callbacks:
                    self.pending.pop(puid, None)
            done(None)

    def _fire(self, puid: int, code) -> None:
        with self.lock:
            callbacks = self.pending.pop(puid, [])
        for done in callbacks:
            try:
                done(code)
            except Exception:
                pass

    def _run(self) -> None:
        while True:
            try:
                ended = self.waits.ended(0.25)
            except Exception:  # this node's agent is gone: every process counts as ended
                with self.lock:
                    left = list(self.pending)
                for puid in left:
                    self._fire(puid, None)
                return
            for puid, code in ended:
                self._fire(puid, code)


_watcher: list = []
_watcher_lock = threading.Lock()


def watch(puid: int, on_end=None) -> int:
    """A descriptor that polls readable once process ``puid`` (of any node) has ended: a pipe
    whose write end this process's watcher thread closes when the process's agent reports
    the end (after ``on_end(exit code or None)``)."""
    r, w = os.pipe()

    def done(code) -> None:
        try:
            if on_end is not None:
                on_end(code)
        finally:
            os.close(w)

    with _watcher_lock:
        if not _watcher or _watcher[0].pid != os.getpid():
            _watcher[:] = [_Watcher()]
        watcher = _watcher[0]
    watcher.add(puid, done)
    return r
