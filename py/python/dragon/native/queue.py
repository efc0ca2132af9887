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
import time
from typing import Any

import cloudpickle

from dragon import _native, _serial
from dragon._runtime import node_pool
from dragon.exceptions import DragonTimeoutError, DragonValueError, QueueError

Full = _stdqueue.Full
Empty = _stdqueue.Empty

__all__ = ["Queue", "QueueError", "Full", "Empty"]


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
                raise QueueError("task_done() called too many times")
            count.value -= 1
            if count.value == 0:
                done.set()

    def task_done(self) -> None:
        """Marks one item taken with ``get`` as processed (joinable queues)."""
        if self._joinable is None:
            raise QueueError("task_done() needs a Queue(joinable=True)")
        self._task_done()

    def join(self, timeout: float | None = None) -> None:
        """Waits until every item put has been marked done (joinable queues)."""
        if self._joinable is None:
            raise QueueError("join() needs a Queue(joinable=True)")
        if not self._joinable[2].wait(timeout):
            raise DragonTimeoutError("unfinished tasks remain")

    def poll(self, timeout: float | None = 0.0) -> bool:
        """Whether an item is waiting; waits up to ``timeout`` seconds for one (None: until
        one arrives), without taking it. The wait checks the channel with a growing pause
        (0.1 ms to 10 ms)."""
        if len(self._ch) > 0:
            return True
        if timeout is not None and timeout <= 0:
            return False
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.0001
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return len(self._ch) > 0
            time.sleep(pause if left is None else min(pause, left))
            if len(self._ch) > 0:
                return True
            pause = min(pause * 2, 0.01)

    def thread_wait(self, timeout: float | None, done_ev: Any, ready: list) -> None:
        """DragonHPC's waiter for ``dragon.native``'s multi-object wait: waits until an item
        is waiting, ``done_ev`` (an Event, e.g. ``threading.Event``) is set by someone else,
        or ``timeout`` seconds pass (None: no limit). If an item is waiting first, appends
        this queue to ``ready``. Sets ``done_ev`` in every case before returning."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done_ev.is_set():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            if self.poll(0.01 if left is None else min(0.01, left)) and not done_ev.is_set():
                ready.append(self)
                break
        done_ev.set()

    @property
    def node(self) -> int:
        """The h_uid of the node whose shared memory holds the queue (the numbering of
        ``Process.node`` and ``dragon.native.machine.Node``)."""
        from dragon.native import machine

        node = getattr(self._ch, "_node", None)  # a queue of another node: a RemoteChannel
        if node is None:
            node = machine.my_node_index()
        return node + 1

    def empty(self) -> bool:
        """Whether the queue holds nothing (racy, as in multiprocessing)."""
        return len(self._ch) == 0

    def full(self) -> bool:
        """Whether the queue holds ``maxsize`` items (racy)."""
        return len(self._ch) >= self._maxsize

    def qsize(self) -> int:
        """Items waiting (racy)."""
        return len(self._ch)

    def size(self) -> int:
        """DragonHPC's name for ``qsize``: the approximate number of items waiting
        (ValueError on a closed handle, as DragonHPC's)."""
        self._check()
        return len(self._ch)

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
