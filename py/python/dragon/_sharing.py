"""Objects of the "dragon" start method that can be shared with any process of the runtime.

Under DragonHPC a Queue, Lock, Value, ... of the "dragon" context can be passed to another
process any way: as a Process argument, through a Queue, pickled by hand (its examples do
all three). CPython's spawn objects refuse pickling outside a spawn (assert_spawning). The
dragon context's objects pickle everywhere: outside a spawn they are pickled as a spawn
would (CPython's own state), with a stand-in "spawning Popen" whose descriptors travel as
(pid, fd) and are copied by the receiver with pidfd_getfd (so one pickle can be loaded by
many processes while the sender keeps the object); semaphores reopen by name.

Both the context's synchronisation objects (``dragon._mp``) and its queues
(``dragon._conn``) pickle this way, so it is a module of its own below both.
"""

from __future__ import annotations

import os
from multiprocessing import context, reduction


class _FdOfProcess:
    """A descriptor of a live process of this runtime, copied on ``detach``."""

    def __init__(self, fd: int):
        self.pid, self.fd = os.getpid(), fd

    def detach(self) -> int:
        if self.pid == os.getpid():
            return os.dup(self.fd)
        # Imported here (down the order): a process that only unpickles in its own pid, or
        # never, does not load the native module for it.
        from dragon import _native

        pidfd = _native.pidfd_open(self.pid)
        try:
            return _native.pidfd_getfd(pidfd, self.fd)
        except ProcessLookupError:
            from dragon.exceptions import DragonOSError  # the error path only (start-up speed)

            raise DragonOSError(f"the process {self.pid} that shared this object has ended") from None
        finally:
            os.close(pidfd)


class _SharingPopen:
    """Stands in for the spawning Popen while a dragon-context object is pickled."""

    @staticmethod
    def duplicate_for_child(fd: int) -> int:
        return fd

    @staticmethod
    def DupFd(fd: int) -> _FdOfProcess:
        return _FdOfProcess(fd)


def _loads_shared(data: bytes):
    return reduction.ForkingPickler.loads(data)


def reduce_shared(obj):
    """``obj.__reduce_ex__`` outside a spawn: ``obj`` pickled as a spawn would, with
    ``_SharingPopen`` standing in for the spawning Popen."""
    context.set_spawning_popen(_SharingPopen)
    try:
        data = bytes(reduction.ForkingPickler.dumps(obj))
    finally:
        context.set_spawning_popen(None)
    return _loads_shared, (data,)
