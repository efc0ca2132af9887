"""The embedded runtime's node agent: ``python -m dragon._agent READY_FD SCRIPT_PID``.

Started by the first runtime object of a plain ``python script.py``. It creates the node
pool and serves the agent's requests (on a thread of the native module), writes the
runtime's ``DRAGON_RUNTIME`` value to READY_FD, and runs until the script asks it to stop
(SIGTERM) or the script dies (its pidfd polls readable). Then it ends every process it
started (and their descendants: it is their subreaper) and removes the runtime's segments.
"""

from __future__ import annotations

import os
import select
import signal
import sys

from dragon import _log, _native
from dragon._runtime import pool_size, remove_scratch_dir
from dragon.cli import _end_descendants, _remove_segments


def main(argv: list[str]) -> int:
    ready_fd, script_pid = int(argv[0]), int(argv[1])
    sigs = {signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        script = _native.pidfd_open(script_pid)
        _native.set_child_subreaper()
        rt = _native.random_runtime()
        _log.configure(rt, 0)
        agent = _native.Agent(rt, 0, pool_size())
    except Exception as e:
        os.write(ready_fd, f"error: {e}\n".encode())
        return 1
    os.write(ready_fd, (agent.env_value() + "\n").encode())
    os.close(ready_fd)
    poller = select.poll()
    poller.register(script, select.POLLIN)
    while True:
        info = signal.sigtimedwait(sigs, 0.25)
        if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGHUP):
            break
        if info is not None and info.si_signo == signal.SIGINT:
            continue  # the script decides what Ctrl-C means
        agent.reap()
        if poller.poll(0):
            break  # the script is gone
    _log.info("dragon.agent", "embedded runtime %016x ends", rt)
    _end_descendants(os.getpid())
    agent.shutdown()
    _remove_segments(rt)
    remove_scratch_dir(rt)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
