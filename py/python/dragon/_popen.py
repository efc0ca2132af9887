"""The "dragon" start method's Popen: a multiprocessing child forked by the runtime's zygote
(``dragon._zygote``), or launched by the node agent as a fresh interpreter.

Kept apart from ``dragon._mp`` (which registers the start method in every process that
imports multiprocessing) so that only processes that start children load the native module
for it.
"""

from __future__ import annotations

import io
import os
from multiprocessing import context, popen_spawn_posix, reduction, spawn, util

from dragon import _runtime, _zygote


def bootstrap_data(popen, process_obj) -> io.BytesIO:
    """What spawn writes into a child's pipe (its preparation data, then the process
    object), pickled with ``popen`` as the spawning Popen (whose ``DupFd`` decides what
    happens to descriptors)."""
    fp = io.BytesIO()
    context.set_spawning_popen(popen)
    try:
        reduction.dump(spawn.get_preparation_data(process_obj._name), fp)
        reduction.dump(process_obj, fp)
    finally:
        context.set_spawning_popen(None)
    return fp


class Popen(popen_spawn_posix.Popen):
    """Launches a multiprocessing child through the runtime."""

    method = "dragon"

    def _launch(self, process_obj):
        from multiprocessing import resource_tracker

        tracker_fd = resource_tracker.getfd()
        self._fds.append(tracker_fd)
        fp = bootstrap_data(self, process_obj)
        parent_r = child_w = child_r = parent_w = None
        try:
            parent_r, child_w = os.pipe()
            child_r, parent_w = os.pipe()
            interpreter = [
                os.fsdecode(a) for a in (spawn.get_executable(), *util._args_from_interpreter_flags())
            ]
            self._fds.extend([child_r, child_w])
            from dragon.infrastructure.policy import Policy

            pol = Policy.thread_policy()
            allowed = os.sched_getaffinity(0)
            cpus = [c for c in pol.cpu_affinity if c in allowed] or None
            fds = sorted(set(self._fds))
            forked = _zygote.launch(
                interpreter, fds, cpus, {"tracker_fd": tracker_fd, "pipe_handle": child_r}
            )
            if forked is not None:
                self.pid, conn = forked
                self._puid = None
                self._exit_fd = conn.detach()  # the zygote sends the exit code here
            else:
                # As spawn.get_command_line, but the child imports dragon first so that the
                # "dragon" start method exists when spawn's prepare() sets it.
                prog = (
                    "import dragon; from multiprocessing.spawn import spawn_main; "
                    f"spawn_main(tracker_fd={tracker_fd}, pipe_handle={child_r})"
                )
                self._puid, self.pid = _runtime.agent().launch(
                    [*interpreter, "-c", prog, "--multiprocessing-fork"],
                    list(os.environ.items()),
                    cpus=cpus,
                    new_group=False,
                    fd_map=[(fd, fd) for fd in fds],
                )
                self._exit_fd = _runtime.sentinel(self.pid)
            self.sentinel = parent_r
            with open(parent_w, "wb", closefd=False) as f:
                f.write(fp.getbuffer())
        finally:
            fds_to_close = [self._exit_fd] if getattr(self, "_exit_fd", None) is not None else []
            for fd in (parent_r, parent_w):
                if fd is not None:
                    fds_to_close.append(fd)
            self.finalizer = util.Finalize(self, util.close_fds, fds_to_close)
            for fd in (child_r, child_w):
                if fd is not None:
                    os.close(fd)

    def poll(self, flag=os.WNOHANG):
        """The exit code once the child ended, else None; ``flag=0`` waits for the end. It
        comes from the child's parent: the zygote (on ``_exit_fd``) or the node agent (whose
        pidfd ``_exit_fd`` is)."""
        if self.returncode is None:
            import select

            # Readable once the child has ended: no round trip before then (Process.start
            # polls every earlier child).
            wait = None if flag != os.WNOHANG else 0
            if not select.select([self._exit_fd], [], [], wait)[0]:
                return None
            if self._puid is None:
                code = _zygote.read_exit_code(self._exit_fd)
                if code is None:
                    # The zygote ended before the child (the runtime is going down): the
                    # node agent, subreaper of both, reaps it, and its code is lost.
                    pidfd = _runtime.sentinel(self.pid)
                    try:
                        if not select.select([pidfd], [], [], wait)[0]:
                            return None
                    finally:
                        os.close(pidfd)
                    code = 255
                self.returncode = code
            else:
                _, code = _runtime.agent().status(self._puid)
                if code is not None:
                    self.returncode = code
        return self.returncode
