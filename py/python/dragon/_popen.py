"""The "dragon" start method's Popen: a multiprocessing child launched by the node agent.

Kept apart from ``dragon._mp`` (which registers the start method in every process that
imports multiprocessing) so that only processes that start children load the native module
for it.
"""

from __future__ import annotations

import io
import os
from multiprocessing import context, popen_spawn_posix, reduction, spawn, util

from dragon import _runtime


class Popen(popen_spawn_posix.Popen):
    """Launches a multiprocessing child through the runtime."""

    method = "dragon"

    def _launch(self, process_obj):
        from multiprocessing import resource_tracker

        tracker_fd = resource_tracker.getfd()
        self._fds.append(tracker_fd)
        prep_data = spawn.get_preparation_data(process_obj._name)
        fp = io.BytesIO()
        context.set_spawning_popen(self)
        try:
            reduction.dump(prep_data, fp)
            reduction.dump(process_obj, fp)
        finally:
            context.set_spawning_popen(None)
        parent_r = child_w = child_r = parent_w = None
        try:
            parent_r, child_w = os.pipe()
            child_r, parent_w = os.pipe()
            # As spawn.get_command_line, but the child imports dragon first so that the
            # "dragon" start method exists when spawn's prepare() sets it.
            prog = (
                "import dragon; from multiprocessing.spawn import spawn_main; "
                f"spawn_main(tracker_fd={tracker_fd}, pipe_handle={child_r})"
            )
            cmd = [
                spawn.get_executable(),
                *util._args_from_interpreter_flags(),
                "-c",
                prog,
                "--multiprocessing-fork",
            ]
            self._fds.extend([child_r, child_w])
            from dragon.infrastructure.policy import Policy

            pol = Policy.thread_policy()
            allowed = os.sched_getaffinity(0)
            cpus = [c for c in pol.cpu_affinity if c in allowed] or None
            self._puid, self.pid = _runtime.agent().launch(
                [os.fsdecode(a) for a in cmd],
                list(os.environ.items()),
                cpus=cpus,
                new_group=False,
                fd_map=[(fd, fd) for fd in sorted(set(self._fds))],
            )
            self._pidfd = _runtime.sentinel(self.pid)
            self.sentinel = parent_r
            with open(parent_w, "wb", closefd=False) as f:
                f.write(fp.getbuffer())
        finally:
            fds_to_close = [self._pidfd] if getattr(self, "_pidfd", None) is not None else []
            for fd in (parent_r, parent_w):
                if fd is not None:
                    fds_to_close.append(fd)
            self.finalizer = util.Finalize(self, util.close_fds, fds_to_close)
            for fd in (child_r, child_w):
                if fd is not None:
                    os.close(fd)

    def poll(self, flag=os.WNOHANG):
        """The exit code once the child ended (from the node agent, its parent), else None;
        ``flag=0`` waits for the end."""
        if self.returncode is None:
            import select

            # The pidfd turns readable when the child ends: no agent round trip before then
            # (Process.start polls every earlier child).
            if not select.select([self._pidfd], [], [], None if flag != os.WNOHANG else 0)[0]:
                return None
            _, code = _runtime.agent().status(self._puid)
            if code is not None:
                self.returncode = code
        return self.returncode
