"""Connections and queues of the "dragon" start method on a runtime of several nodes
(``dragon._mp_nodes``): ``Connection``, CPython's connection interface over native channels
(one message per ``send_bytes``; a large one through a pool block), ``Pipe``, a
``connection.wait`` that takes them beside descriptors, and CPython's ``Queue``,
``JoinableQueue`` and ``SimpleQueue`` over them."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import types
import weakref
from multiprocessing import connection, queues, reduction, synchronize, util

from dragon import _native, _runtime, _writers
from dragon._conn import dumps

PIPE_CAPACITY = 64  # messages in flight each way of a Pipe (a larger one waits for room)
PIPE_SLOT = 1024  # a message up to this size travels inline in the ring

# ----- connections ----------------------------------------------------------------------------

_BYTES = b"\x01"  # dragon._serial's mark for raw bytes
# An object pickled at protocol 5 whose large buffers (NumPy data, PickleBuffers of at least
# dragon._conn.OOB_MIN bytes) are out of band: the parts are this mark, the pickle, then one
# part per buffer. The sender's buffers go into the message's block as they are (to another
# node: from the array to the socket, into a block there), and the received object views
# them in that block (writable, alive as long as it is), as on one node (dragon._conn).
_OOB = b"\x05"


def _unpack(m):
    """A Connection message as (its mark, the parts after it): an inline message (bytes) is
    its first byte and the rest, a block message (or bytearray) is in the parts layout."""
    if isinstance(m, bytes):
        return m[:1], [m[1:]]
    from dragon._parts import split

    parts = split(m)
    return bytes(parts[0]), parts[1:]


def _loads(mark, parts, m):
    """The object of message ``m`` (unpacked as ``mark, parts``): a pickle sent as bytes, or
    an out-of-band one, whose buffers it views in the message's block while this node's
    pool is at most a quarter used, and copies out of it from there on (the block then goes
    back at once): objects a program keeps never take the room messages in flight need."""
    if mark != _OOB:
        return reduction.ForkingPickler.loads(parts[0])
    bufs = parts[1:]
    if not isinstance(m, bytearray):  # a block (a bytearray: it had no room to land in)
        from dragon._remote import _local_pool

        used, capacity = _local_pool().usage()
        if used > capacity // 4:
            bufs = [bytearray(b) for b in bufs]
    return reduction.ForkingPickler.loads(parts[0], buffers=bufs)


def _object(m):
    """The object in message ``m``."""
    return _loads(*_unpack(m), m)


_EOF = b"\x06"  # a wake-up sent by the last writer's close: readers then check the count
EOF_SLICE = 0.25  # a reader waiting for a message looks this often whether writers are left

_counted: weakref.WeakSet = weakref.WeakSet()  # this process's open handles that count


def close_all() -> None:
    """Closes every handle of this process that counts as a writer (a process's end: as the
    system closes its descriptors), so that readers of other processes see end of file."""
    for c in list(_counted):
        try:
            c.close()
        except Exception:
            pass


class _Descriptor:
    """What ``Connection.fileno()`` returns: one end of a socket pair, always writable, and
    readable exactly while its connection has a message waiting or is at end of file, so
    that ``select``, ``selectors`` and event loops can wait on it. A thread keeps it so,
    checking with ``wait``'s growing pause (0.1 to 10 ms); the connection's own receives
    update it at once."""

    def __init__(self, conn: Connection):
        self._mine, self._other = socket.socketpair()
        self._mine.setblocking(False)
        self._lock = threading.Lock()
        self._set = False
        self._stop = threading.Event()
        self.pid = os.getpid()
        if conn._rx is not None:
            threading.Thread(
                target=self._run, args=(weakref.ref(conn),), name="dragon-conn-fileno", daemon=True
            ).start()

    def fileno(self) -> int:
        return self._mine.fileno()

    def refresh(self, conn: Connection) -> bool:
        """Makes the descriptor readable or not as ``conn`` is now; returns which."""
        with self._lock:
            if self._stop.is_set():
                return False
            try:
                ready = conn._ready()
            except Exception:
                ready = True  # its node is gone: a receive raises, as at end of file
            if ready and not self._set:
                self._other.send(b"\0")
            elif not ready and self._set:
                try:
                    self._mine.recv(1)
                except BlockingIOError:
                    pass
            self._set = ready
            return ready

    def _run(self, ref) -> None:
        pause = 0.0001
        while not self._stop.is_set():
            conn = ref()
            if conn is None or conn._closed:
                return
            was = self._set
            now = self.refresh(conn)
            del conn
            pause = 0.0001 if now != was else min(pause * 2, 0.01)
            self._stop.wait(pause)

    def close(self) -> None:
        with self._lock:
            self._stop.set()
            self._mine.close()
            self._other.close()


class Connection:
    """``multiprocessing.connection.Connection``'s interface over native channels (``rx``
    to receive, ``tx`` to send), usable from every node. Each ``send_bytes`` is one message.

    End of file as with descriptors: ``rwc`` counts the open handles (in every process)
    that can write into ``rx``'s channel and ``twc`` those of ``tx``'s (native semaphores
    used as counters, with the channels). A handle counts from its creation (``Pipe``), its
    pickling (for the copy it makes) or its inheritance by fork, until it is closed, garbage
    collected or its process ends (``close_all``). A reader that finds its channel empty and
    no writer left raises EOFError. The counts of a process killed without its end running
    are given back by its node's agent (``dragon._writers``)."""

    def __init__(self, rx, tx, rwc=None, twc=None):
        self._rx, self._tx = rx, tx
        self._rwc, self._twc = rwc, twc
        self._closed = False
        self._fd: _Descriptor | None = None
        if twc is not None:
            self._pid = os.getpid()
            _counted.add(self)
            util.register_after_fork(self, Connection._after_fork)
            _writers.note(twc, 1)

    def _after_fork(self) -> None:
        # A forked child's copy is a writer too (multiprocessing runs this in every child it
        # starts: a handle this process unpickled itself is counted already).
        if not self._closed and self._twc is not None and self._pid != os.getpid():
            self._pid = os.getpid()
            self._twc.release()
            _writers.note(self._twc, 1)

    # -- state
    @property
    def closed(self) -> bool:
        """True if the connection is closed."""
        return self._closed

    @property
    def readable(self) -> bool:
        """True if the connection is readable."""
        return self._rx is not None

    @property
    def writable(self) -> bool:
        """True if the connection is writable."""
        return self._tx is not None

    def _check_closed(self):
        if self._closed:
            raise OSError("handle is closed")

    def _check_readable(self):
        if self._rx is None:
            raise OSError("connection is write-only")

    def _check_writable(self):
        if self._tx is None:
            raise OSError("connection is read-only")

    def fileno(self) -> int:
        """A descriptor for ``select`` and event loops: readable while a message waits or at
        end of file, always writable (see ``_Descriptor``); made at the first call. Reading
        or writing it yourself is not a way to use the connection."""
        self._check_closed()
        fd = self._fd
        if fd is None or fd.pid != os.getpid():  # none yet, or a forked copy's
            fd = self._fd = _Descriptor(self)
            if self._rx is not None:
                fd.refresh(self)
        return fd.fileno()

    def close(self) -> None:
        """Closes this handle; the last writer's close is the readers' end of file."""
        if self._closed:
            return
        self._closed = True
        fd, self._fd = self._fd, None
        if fd is not None and fd.pid == os.getpid():
            fd.close()
        twc, self._twc = self._twc, None
        if twc is None:
            return
        _counted.discard(self)
        try:
            _writers.note(twc, -1)
            twc.acquire(False)
            if twc.get_value() == 0:  # wakes a reader waiting now (a later one finds the count)
                self._tx.send(_EOF, 0.0)
        except Exception:
            # The count is gone with every handle of its node (no reader is left to tell),
            # or the channel is full (its reader finds the count when it has drained it).
            pass

    def __del__(self):
        if not getattr(self, "_closed", True) and self._twc is not None and not sys.is_finalizing():
            try:
                self.close()
            except Exception:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __reduce__(self):
        if self._closed:
            raise OSError("handle is closed")
        if self._twc is not None:
            try:
                self._twc.release()  # the copy this pickle makes is a writer from now on
            except Exception:
                pass  # gone with every reader (see close)
        return (Connection, (self._rx, self._tx, self._rwc, self._twc))

    # -- sending
    def send_bytes(self, buf, offset: int = 0, size: int | None = None) -> None:
        """Sends a bytes-like object (or ``size`` bytes of it from ``offset``) as one message."""
        self._check_closed()
        self._check_writable()
        m = memoryview(buf)
        if m.itemsize > 1:
            m = m.cast("B")
        n = m.nbytes
        if offset < 0:
            raise ValueError("offset is negative")
        if n < offset:
            raise ValueError("buffer length < offset")
        if size is None:
            size = n - offset
        elif size < 0:
            raise ValueError("size is negative")
        elif offset + size > n:
            raise ValueError("buffer length < offset + size")
        self._send(m[offset : offset + size])

    def _send(self, m) -> None:
        if len(m) + 1 <= PIPE_SLOT:
            self._tx.send(_BYTES + bytes(m), None)
        else:
            self._tx.send_parts([_BYTES, m], None)

    def send(self, obj) -> None:
        """Sends a picklable object (a large buffer in it, such as NumPy data, goes out of
        band: not copied into the pickle, viewed in place by the receiver)."""
        self._check_closed()
        self._check_writable()
        self._locked_send(None, obj)

    # -- receiving
    def _take(self):
        """The next message; EOFError when none is left and no handle can write any more."""
        m = self._next()
        fd = self._fd
        if fd is not None and fd.pid == os.getpid():
            fd.refresh(self)  # not readable any more if that was the last message
        return m

    def _next(self):
        rwc = self._rwc
        if rwc is None:
            return self._rx.recv_msg(None)
        from dragon.exceptions import QueueEmpty

        while True:
            try:
                m = self._rx.recv_msg(EOF_SLICE)
            except QueueEmpty:
                m = None
            if m is not None and not (type(m) is bytes and m == _EOF):
                return m
            if rwc.get_value() == 0 and len(self._rx) == 0:
                raise EOFError

    def _recv(self) -> bytes:
        m = self._take()
        mark, parts = _unpack(m)
        if mark == _OOB:  # an object sent by send(): its pickle, in band
            return reduction.ForkingPickler.dumps(_loads(mark, parts, m))
        return bytes(parts[0])

    def _recv_any(self):
        """A Queue's ``_recv_bytes``: the pickle of the next message, or the object itself
        (``_Received``) when it came out of band (``_QueuePickler.loads`` unwraps it)."""
        self._check_closed()
        self._check_readable()
        m = self._rx.recv_msg(None)
        mark, parts = _unpack(m)
        if mark == _OOB:
            return _Received(_loads(mark, parts, m))
        return parts[0]

    def recv_bytes(self, maxlength: int | None = None) -> bytes:
        """Receives one message as bytes (OSError if it is longer than ``maxlength``)."""
        self._check_closed()
        self._check_readable()
        if maxlength is not None and maxlength < 0:
            raise ValueError("negative maxlength")
        data = self._recv()
        if maxlength is not None and len(data) > maxlength:
            raise OSError("bad message length")
        return data

    def recv_bytes_into(self, buf, offset: int = 0) -> int:
        """Receives one message into ``buf`` at byte ``offset``; its size in bytes
        (``BufferTooShort`` carrying the message when it does not fit)."""
        self._check_closed()
        self._check_readable()
        with memoryview(buf) as m:
            itemsize = m.itemsize
            bytesize = itemsize * len(m)
            if offset < 0:
                raise ValueError("negative offset")
            if offset > bytesize:
                raise ValueError("offset too large")
            data = self._recv()
            size = len(data)
            if bytesize < offset + size:
                from multiprocessing import BufferTooShort

                raise BufferTooShort(data)
            m.cast("B")[offset : offset + size] = data
            return size

    # -- a lock around one message (what CPython's queues do), fused on another node
    def _locked_recv(self, lock, then_release=None):
        """``with lock: obj = self.recv()``, then ``then_release.release()`` (a semaphore of
        this context, or None), unpickled after both. When ``lock`` and the channel live on
        one other node, one call there does it all (the lock is taken and given back there,
        and the semaphore released there too when it lives on that node)."""
        self._check_closed()
        self._check_readable()
        sem = _fused(lock, self._rx)
        if sem is None:
            with lock:
                m = self._rx.recv_msg(None)
        else:
            after = None if then_release is None else _fused(then_release, self._rx)
            if after is not None:
                m = then_release._semlock._give_back(lambda: self._rx.locked_recv(sem, then_release=after))
                return _object(m)
            m = self._rx.locked_recv(sem)
        if then_release is not None:
            then_release.release()
        return _object(m)

    def _locked_send(self, lock, obj) -> None:
        """``with lock: self.send(obj)`` (``lock`` None: no lock), pickled before the lock is
        taken; fused as ``_locked_recv`` where it can be."""
        data, bufs = dumps(obj)  # as ForkingPickler, at protocol 5, large buffers apart
        if not bufs:
            self._locked_send_bytes(lock, data)
            return
        self._check_closed()
        self._check_writable()
        parts = [_OOB, data, *bufs]
        sem = None if lock is None else _fused(lock, self._tx)
        if sem is not None and self._tx.locked_send_parts(sem, parts):
            return
        if lock is None:
            self._tx.send_parts(parts, None)
            return
        with lock:
            self._tx.send_parts(parts, None)

    def _locked_send_bytes(self, lock, buf) -> None:
        """``with lock: self.send_bytes(buf)``, fused as ``_locked_recv_bytes`` when the
        message is small enough for one call."""
        self._check_closed()
        self._check_writable()
        sem = _fused(lock, self._tx)
        if sem is not None:
            m = memoryview(buf)
            if m.itemsize > 1 or m.ndim != 1:
                m = m.cast("B")
            if self._tx.locked_send_parts(sem, [_BYTES, m]):
                return
        if lock is None:
            self.send_bytes(buf)
            return
        with lock:
            self.send_bytes(buf)

    def recv(self):
        """Receives one object (unpickled from the message's block, its large buffers viewed
        there, not copied)."""
        self._check_closed()
        self._check_readable()
        return _object(self._take())

    def _ready(self) -> bool:
        if self._closed or len(self._rx) > 0:
            return True
        return self._rwc is not None and self._rwc.get_value() == 0  # end of file

    def poll(self, timeout: float | None = 0.0) -> bool:
        """Whether a message is waiting; waits up to ``timeout`` seconds (None: for ever) for
        one, checking with a growing pause (0.1 to 10 ms)."""
        self._check_closed()
        self._check_readable()
        return bool(wait([self], timeout))

    def __repr__(self) -> str:
        return f"<dragon multi-node Connection, readable={self.readable}, writable={self.writable}>"


_queue_pipes = threading.local()  # ``made`` is True while a queue of this thread makes its pipe


def Pipe(duplex: bool = True) -> tuple[Connection, Connection]:
    """A pair of connections over native channels of this node, with end of file (but the
    pipe a queue makes: its readers never expect one, see ``_QueuePipe``)."""
    pool = _runtime.node_pool()
    counted = not getattr(_queue_pipes, "made", False)

    def end():
        ch = _native.Channel.create(pool, PIPE_CAPACITY, PIPE_SLOT)
        return ch, (_native.Semaphore(pool, 1) if counted else None)

    a, wa = end()
    if not duplex:
        return Connection(a, None, wa, None), Connection(None, a, None, wa)
    b, wb = end()
    return Connection(a, b, wa, wb), Connection(b, a, wb, wa)


class _QueuePipe:
    """Base of this module's queues: the pipe CPython's ``__init__`` makes keeps no writer
    count (nobody reads a queue's pipe to its end of file)."""

    def __init__(self, *args, **kwargs):
        _queue_pipes.made = True
        try:
            super().__init__(*args, **kwargs)
        finally:
            _queue_pipes.made = False


_orig_wait = connection.wait  # replaced by a copy of the original in _install_wait


def wait(object_list, timeout: float | None = None) -> list:
    """``multiprocessing.connection.wait`` that also takes connections of a multi-node
    runtime (checked with a growing pause, 0.1 to 10 ms) beside descriptors."""
    ours = [o for o in object_list if isinstance(o, Connection)]
    if not ours:
        return _orig_wait(object_list, timeout)
    others = [o for o in object_list if not isinstance(o, Connection)]
    deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
    pause = 0.0001
    while True:
        ready = [o for o in ours if o._ready()]
        if others:
            ready += _orig_wait(others, 0)
        if ready:
            return ready
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            return []
        step = pause if left is None else min(pause, left)
        if others:
            got = _orig_wait(others, step)
            if got:
                return got + [o for o in ours if o._ready()]
        else:
            time.sleep(step)
        pause = min(pause * 2, 0.01)


def _wait_trampoline(object_list, timeout=None):
    # Runs as the code of multiprocessing.connection.wait itself (see _install_wait): only
    # names of that module's globals (sys) are used.
    return sys.modules["dragon._node_conn"].wait(object_list, timeout)


def _install_wait() -> None:
    """Makes ``multiprocessing.connection.wait`` take this module's connections, wherever
    it was imported from: its code object is swapped, so references taken before (``from
    multiprocessing.connection import wait`` in user code, ``multiprocessing.pool``,
    ``concurrent.futures.process``) use it too. The original goes on as ``_orig_wait``."""
    global _orig_wait
    w = connection.wait
    if getattr(w, "_dragon_nodes", False):
        return
    _orig_wait = types.FunctionType(w.__code__, w.__globals__, w.__name__, w.__defaults__, w.__closure__)
    w.__code__ = _wait_trampoline.__code__
    w._dragon_nodes = True


# ----- queues ---------------------------------------------------------------------------------


def _fused(lock, ch):
    """The native semaphore under ``lock`` (a lock of this context) when it and channel
    ``ch`` are objects of one other node, so that "take the lock, move one message, give the
    lock back" is one call there; else None."""
    from dragon import _remote

    sl = getattr(lock, "_semlock", None)
    sem = getattr(sl, "_sem", None)
    if sem is None or sl.kind == synchronize.RECURSIVE_MUTEX or not _remote.same_node(sem, ch):
        return None
    return sem


class _NoLock:
    """The feeder thread's write lock when its sends take the real one where it lives."""

    @staticmethod
    def acquire(*_a):
        return True

    @staticmethod
    def release():
        pass


class _Staged:
    """An object ``put`` hands to the feeder thread: the feeder's ``_ForkingPickler.dumps``
    (``_QueuePickler``) passes it on untouched and the feeder's send pickles it with its
    buffers out of band (``Connection._locked_send``)."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj


class _Received:
    """An object a queue's reader already unpickled (out of band) where CPython's ``get``
    expects the pickle; ``_QueuePickler.loads`` returns ``obj``."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj


class _QueuePickler(reduction.ForkingPickler):
    """``multiprocessing.queues._ForkingPickler`` in a process of a multi-node runtime:
    ForkingPickler, but for the two wrappers above, which only this module's queues make."""

    @classmethod
    def dumps(cls, obj, protocol=None):
        if type(obj) is _Staged:
            return obj
        return super().dumps(obj, protocol)

    @staticmethod
    def loads(data, /, **kwargs):
        if type(data) is _Received:
            return data.obj
        return reduction.ForkingPickler.loads(data, **kwargs)


_SCALARS = frozenset({int, float, str, bytes, bool, type(None)})  # nothing out of band


class _FusedQueue:
    """What ``Queue`` and ``JoinableQueue`` change in CPython's code: a blocking ``get``, and
    the feeder's send, take their lock and move their message in one call where they live;
    an object's large buffers (NumPy data) go out of band, viewed in place by the reader."""

    def put(self, obj, block=True, timeout=None):
        if type(obj) not in _SCALARS:
            obj = _Staged(obj)
        super().put(obj, block, timeout)

    def get(self, block=True, timeout=None):
        if self._closed or not (block and timeout is None):
            return super().get(block, timeout)
        return self._reader._locked_recv(self._rlock, self._sem)

    def _reset(self, after_fork=False):
        super()._reset(after_fork)
        self._recv_bytes = self._reader._recv_any

    def _start_thread(self):
        wlock, writer, onerror = self._wlock, self._writer, self._on_queue_feeder_error

        def send_bytes(buf):
            if type(buf) is _Staged:
                writer._locked_send(wlock, buf.obj)
            else:
                writer._locked_send_bytes(wlock, buf)

        def on_error(e, obj):
            onerror(e, obj.obj if type(obj) is _Staged else obj)

        saved = self._send_bytes, self._wlock, self.__dict__.pop("_on_queue_feeder_error", None)
        # What the thread is given: it takes the lock itself (or where the lock lives).
        self._send_bytes, self._wlock, self._on_queue_feeder_error = send_bytes, _NoLock, on_error
        try:
            return super()._start_thread()
        finally:
            self._send_bytes, self._wlock, own = saved
            del self._on_queue_feeder_error
            if own is not None:
                self._on_queue_feeder_error = own


class Queue(_QueuePipe, _FusedQueue, queues.Queue):
    """CPython's Queue (feeder thread, unbounded by default) over a node-crossing pipe;
    picklable anywhere."""

    def __getstate__(self):
        return (
            self._ignore_epipe,
            self._maxsize,
            self._reader,
            self._writer,
            self._rlock,
            self._wlock,
            self._sem,
            self._opid,
        )


class JoinableQueue(_QueuePipe, _FusedQueue, queues.JoinableQueue):
    """CPython's JoinableQueue over a node-crossing pipe; picklable anywhere."""

    def __getstate__(self):
        return Queue.__getstate__(self) + (self._cond, self._unfinished_tasks)


class SimpleQueue(_QueuePipe, queues.SimpleQueue):
    """CPython's SimpleQueue over a node-crossing pipe; picklable anywhere."""

    def __getstate__(self):
        return (self._reader, self._writer, self._rlock, self._wlock)

    def get(self):
        return self._reader._locked_recv(self._rlock)

    def put(self, obj):
        self._writer._locked_send(self._wlock, obj)
