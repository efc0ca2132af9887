"""DragonHPC's native ``Queue``: a bounded queue in the node's shared memory.

Objects are pickled with ``pickler`` (cloudpickle by default, so closures travel, protocol
5) and sent over a channel in the runtime's node pool: small ones inline in a ring slot,
large ones and out-of-band buffers (NumPy data) in one pool block that moves to the receiver,
whose arrays then view that block (one copy in all; see ``dragon._serial``). ``put``
blocks while the queue holds ``maxsize`` items (DragonHPC's default is 100). A Queue
passed to another process (as a Process argument, or pickled) attaches to the same channel.
"""

from __future__ import annotations

import queue as _stdqueue
from typing import Any

import cloudpickle

from dragon import _native, _serial
from dragon._runtime import node_pool
from dragon.exceptions import DragonTimeoutError, DragonValueError

Full = _stdqueue.Full
Empty = _stdqueue.Empty


class Queue:
    """A process-safe FIFO queue in shared memory."""

    def __init__(
        self,
        maxsize: int = 100,
        *,
        pool: object = None,
        block_size: int = 65536,
        joinable: bool = False,
        buffered: bool = True,
        policy: object = None,
        num_streams: int = 0,
        main_channel: object = None,
        mgr_channel: object = None,
        sem_channel: object = None,
        strm_channels: list | None = None,
        pickler: Any = cloudpickle,
    ):
        if not isinstance(maxsize, int) or isinstance(maxsize, bool):
            raise TypeError("maxsize must be an int")
        if maxsize <= 0:
            maxsize = 100  # as DragonHPC: a non-positive maxsize means its default, 100
        if block_size <= 0:
            raise ValueError("block_size must be positive")
        self._pickler = pickler
        self._maxsize = maxsize
        p = pool if isinstance(pool, _native.Pool) else node_pool()
        self._ch = main_channel if main_channel is not None else _native.Channel.create(p, maxsize, 1024)
        self._inline = self._ch.stats()["slot_size"]
        self._closed = False
        self._joinable = None
        if joinable:
            from dragon.native.value import Value

            # Unfinished-task count under a lock, and an event set whenever it is zero.
            done = _native.Event(p)
            done.set()
            self._joinable = (Value("q", 0), _native.Lock(p), done)

    def __getstate__(self):
        return {
            "ch": self._ch,
            "maxsize": self._maxsize,
            "pickler": None if self._pickler is cloudpickle else self._pickler,
            "inline": self._inline,
            "joinable": self._joinable,
        }

    def __setstate__(self, st):
        self._ch = st["ch"]
        self._maxsize = st["maxsize"]
        self._pickler = st["pickler"] or cloudpickle
        self._inline = st["inline"]
        self._joinable = st["joinable"]
        self._closed = False

    def _check(self):
        if self._closed:
            raise ValueError("Queue is closed")

    def put(self, obj: Any, block: bool = True, timeout: float | None = None) -> None:
        """Adds ``obj``; waits for room up to ``timeout`` seconds (queue.Full after)."""
        self._check()
        if self._joinable is None:
            _serial.send(self._ch, obj, timeout if block else 0.0, self._inline, self._pickler)
            return
        count, lock, done = self._joinable
        with lock:
            count.value += 1
            done.clear()
        try:
            _serial.send(self._ch, obj, timeout if block else 0.0, self._inline, self._pickler)
        except BaseException:
            self._task_done()
            raise

    def put_nowait(self, obj: Any) -> None:
        """``put(obj, block=False)``."""
        self.put(obj, block=False)

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """Removes and returns the oldest item; waits up to ``timeout`` (queue.Empty after)."""
        self._check()
        return _serial.recv(self._ch, timeout if block else 0.0, self._pickler)

    def get_nowait(self) -> Any:
        """``get(block=False)``."""
        return self.get(block=False)

    def _task_done(self) -> None:
        count, lock, done = self._joinable
        with lock:
            if count.value <= 0:
                raise ValueError("task_done() called too many times")
            count.value -= 1
            if count.value == 0:
                done.set()

    def task_done(self) -> None:
        """Marks one item taken with ``get`` as processed (joinable queues)."""
        if self._joinable is None:
            raise ValueError("task_done() needs a Queue(joinable=True)")
        self._task_done()

    def join(self, timeout: float | None = None) -> None:
        """Waits until every item put has been marked done (joinable queues)."""
        if self._joinable is None:
            raise ValueError("join() needs a Queue(joinable=True)")
        if not self._joinable[2].wait(timeout):
            raise DragonTimeoutError("unfinished tasks remain")

    def poll(self, timeout: float | None = 0.0) -> bool:
        """Whether an item is waiting (does not wait; ``timeout`` is accepted for DragonHPC
        compatibility)."""
        return len(self._ch) > 0

    def empty(self) -> bool:
        """Whether the queue holds nothing (racy, as in multiprocessing)."""
        return len(self._ch) == 0

    def full(self) -> bool:
        """Whether the queue holds ``maxsize`` items (racy)."""
        return len(self._ch) >= self._maxsize

    def qsize(self) -> int:
        """Items waiting (racy)."""
        return len(self._ch)

    size = qsize

    def serialize(self) -> bytes:
        """A descriptor another process of the runtime passes to ``Queue.attach``."""
        import pickle

        return pickle.dumps(self, protocol=5)

    @staticmethod
    def attach(serialized: bytes) -> Queue:
        """The queue a ``serialize`` descriptor names."""
        import pickle

        q = pickle.loads(serialized)
        if not isinstance(q, Queue):
            raise DragonValueError("not a serialized dragon.native.queue.Queue")
        return q

    def close(self) -> None:
        """This handle stops being usable; the queue lives on for other processes."""
        self._closed = True

    @property
    def closed(self) -> bool:
        """Whether ``close`` was called on this handle."""
        return self._closed

    def destroy(self) -> None:
        """Closes the channel for everyone: blocked and later ``put``/``get`` raise EOFError
        (after the remaining items are taken)."""
        self._ch.close()
        self._closed = True
