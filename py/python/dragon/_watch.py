"""The ends of processes of other nodes that this process waits for (children on other
nodes, the parent of a child started on another node): their sentinels are pipes closed as
each process's agent reports the end. A lane (one agent connection,
``dragon._native.AgentWaits``, read by one thread) waits for up to its capacity (256) at
once, instead of a thread and a connection each; a process waiting for more opens more
lanes. When no lane can be had (this node's agent is gone, or its pool has no room for a
lane's reply channel), a thread of its own waits for the process, as a join would."""

from __future__ import annotations

import os
import threading

from dragon import _native

LANE_MAX = None  # tests: how many processes a lane takes, fewer than its capacity


class _Lane:
    """One agent connection and the thread that reads its answers."""

    def __init__(self):
        from dragon._runtime import RUNTIME_ENV, node_pool, parse_env

        self.waits = _native.AgentWaits(node_pool(), parse_env(os.environ[RUNTIME_ENV])[2])
        self.lock = threading.Lock()
        self.pending: dict[int, list] = {}  # puid -> callbacks
        self.closed = False
        threading.Thread(target=self._run, name="dragon-watch", daemon=True).start()

    def take(self, puid: int, done) -> bool:
        """Asks for ``puid``'s end, ``done`` to run in this lane's thread then; False when
        this lane is full or its agent connection failed (``done`` is not kept)."""
        with self.lock:
            if self.closed or (LANE_MAX is not None and self.waits.pending() >= LANE_MAX):
                return False
            try:
                self.waits.add(puid)  # ValueError when the lane is full
            except Exception:
                return False
            self.pending.setdefault(puid, []).append(done)
            return True

    def _run(self) -> None:
        while True:
            try:
                ended = self.waits.ended(0.25)
            except Exception:  # this node's agent is gone: every process counts as ended
                with self.lock:
                    self.closed = True
                    left, self.pending = self.pending, {}
                for callbacks in left.values():
                    for done in callbacks:
                        done(None)
                return
            for puid, code in ended:
                with self.lock:
                    callbacks = self.pending.pop(puid, [])
                for done in callbacks:
                    done(code)


_lanes: list[_Lane] = []
_lanes_lock = threading.Lock()


def _after_fork() -> None:
    """A forked child waits for nothing of its parent's (and may not take a lock a thread of
    the parent held at the fork)."""
    global _lanes, _lanes_lock
    _lanes, _lanes_lock = [], threading.Lock()


os.register_at_fork(after_in_child=_after_fork)


def _wait_alone(puid: int, done) -> None:
    from dragon.native._placement import _wait_remote

    code = None
    try:
        code = _wait_remote(puid, None)
    except Exception:
        pass  # the runtime or the node is gone: the process counts as ended
    done(code)


def watch(puid: int, on_end=None) -> int:
    """A descriptor that polls readable once process ``puid`` (of any node) has ended: a pipe
    whose write end is closed when the process's agent reports the end, after
    ``on_end(exit code, or None when its node or the runtime is gone)``."""
    r, w = os.pipe()

    def done(code) -> None:
        try:
            if on_end is not None:
                on_end(code)
        except BaseException:
            pass
        finally:
            os.close(w)

    with _lanes_lock:
        for lane in _lanes:
            if lane.take(puid, done):
                return r
        try:
            lane = _Lane()
        except Exception:
            lane = None
        if lane is not None:
            _lanes.append(lane)
            if lane.take(puid, done):
                return r
    threading.Thread(target=_wait_alone, args=(puid, done), name="dragon-watch-alone", daemon=True).start()
    return r
