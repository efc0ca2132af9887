"""The "dragon" multiprocessing start method (first part of issue 4).

``import dragon`` registers it: ``multiprocessing.set_start_method("dragon")`` and
``multiprocessing.get_context("dragon")`` work, whether ``multiprocessing`` was imported
before or after ``dragon``. Processes of this context are launched by the node agent (the
Policy in force applied between fork and exec, the descriptors spawn needs handed over by
number) and bootstrap like "spawn" children, so CPython's semantics (pickling with
``ForkingPickler``, ``__main__`` handling, sentinels, exit codes) hold. The other objects
of the context (Queue, Lock, Pipe, ...) are still CPython's spawn-compatible ones; moving
them onto the runtime's shared memory is the rest of issue 4.
"""

from __future__ import annotations

import io
import os
from multiprocessing import context, popen_spawn_posix, process, reduction, spawn, util

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

            if flag != os.WNOHANG:
                select.select([self._pidfd], [], [])
            _, code = _runtime.agent().status(self._puid)
            if code is not None:
                self.returncode = code
        return self.returncode


class DragonProcess(process.BaseProcess):
    """A multiprocessing Process started by the Dragon runtime."""

    _start_method = "dragon"

    @staticmethod
    def _Popen(process_obj):
        return Popen(process_obj)


class DragonContext(context.BaseContext):
    """The "dragon" context."""

    _name = "dragon"
    Process = DragonProcess


_registered = False


def register() -> None:
    """Adds the "dragon" start method to multiprocessing (idempotent)."""
    global _registered
    if _registered:
        return
    context._concrete_contexts["dragon"] = DragonContext()
    default_cls = type(context._default_context)
    orig = default_cls.get_all_start_methods

    def get_all_start_methods(self):
        methods = list(orig(self))
        if "dragon" not in methods:
            methods.append("dragon")
        return methods

    default_cls.get_all_start_methods = get_all_start_methods
    import multiprocessing

    # multiprocessing/__init__ bound the default context's methods at import: rebind.
    multiprocessing.get_all_start_methods = context._default_context.get_all_start_methods
    # DragonHPC's examples name submodules without importing them (``mp.queues.Queue`` in
    # annotations), which works there because its package imports them. Load them on first
    # use instead (PEP 562), so processes that never touch them pay nothing.
    if not hasattr(multiprocessing, "__getattr__"):
        import importlib

        submodules = {"queues", "pool", "synchronize", "connection", "managers", "sharedctypes", "heap"}

        def __getattr__(name):
            if name in submodules:
                return importlib.import_module(f"multiprocessing.{name}")
            raise AttributeError(f"module 'multiprocessing' has no attribute {name!r}")

        multiprocessing.__getattr__ = __getattr__
    _registered = True
