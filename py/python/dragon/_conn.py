"""Connections and queues of the "dragon" start method.

CPython's ``Pipe`` is a byte stream (a socket pair, or an ``os.pipe`` one way) over which
every message is a length header and a body, written and read with several system calls;
its ``Queue`` adds a feeder thread that every ``put`` wakes. Here a connection is still a
real descriptor (so ``connection.wait``, ``select``, EOF when the last writer closes, fd
passing and pickling by ``DupFd`` keep CPython's meaning), but message-oriented:

* a one-way pipe (and the pipe inside ``Queue``/``SimpleQueue``) is a packet-mode pipe
  (``O_DIRECT``, non-blocking); a duplex ``Pipe`` is two of them, one each way, with an
  ``AF_UNIX`` socket pair beside them only for descriptor passing (``fileno()`` is the read
  end of the incoming pipe; ``reduction.send_handle``/``recv_handle`` use the socket). On
  this machine a pipe round trip between two processes costs well under half a socket
  pair's, which is why the data does not go on the socket as in CPython;
* every message is one packet, put with one system call and taken with one, atomically,
  whatever the number of readers and writers, so a ``Queue`` needs no reader or writer
  lock; the receiver polls for a few microseconds before sleeping (``dragon._native``);
* a message larger than a packet (4 KiB on a pipe, 64 KiB on a ``Connection`` built on a
  socket) travels in a block of the runtime's node pool: the pickle and every large
  out-of-band buffer (NumPy array data, pickle protocol 5) copied once into the block,
  whose hold is parked until the receiver takes it, and whose arrays then view it in place.
  When the pool is short (less than an eighth would stay free) the block is a spill
  segment of its own in /dev/shm, which the receiver unlinks as it maps it (and the
  runtime removes at its end if the message is never received);
* ``Queue.put`` pickles and sends at once; only when the pipe is full does it hand the
  message to a feeder thread (CPython's), so ``put`` never blocks and the queue is
  unbounded. Pickling errors are reported as CPython's feeder reports them (printed, the
  queue goes on).
"""

from __future__ import annotations

import errno
import fcntl
import io
import os
import pickle
import re
import socket
import stat
import struct
import sys
import threading
import weakref
from multiprocessing import connection, context, queues, reduction, util

from dragon import _native, _parts, _runtime
from dragon._sharing import reduce_shared
from dragon.exceptions import DragonOSError, QueueEmpty, QueueFull

PIPE_PACKET = 4096  # PIPE_BUF: the largest atomic pipe write
SOCK_PACKET = 64 * 1024  # dragon._native.packet_recv takes at most this
OOB_MIN = 16 * 1024  # pickle-5 buffers this large go out of band (into the block)
PIPE_SIZE = 1 << 20  # pipe capacity asked for (a packet takes one of its pages)
DUPLEX_PIPE_SIZE = 256 * 1024  # each way of a duplex Pipe: 64 packets in flight

_INLINE = 0  # the rest of the packet is the message
_BLOCK = 1  # a pool block: "<QQQI" ref, then the pool name
_SPILL = 2  # a spill segment: its name
_NDARRAY = 3  # a small NumPy array by value (see _nd_packet)
# A spill packet's name: a raw segment of ours, nothing else (the receiver unlinks it).
_SPILL_NAME = re.compile(r"/?dragon-[0-9a-f]{16}-[0-9]+-raw-[0-9]+")

_REF = struct.Struct("<QQQI")
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)

_packet_send = _native.packet_send
_packet_recv = _native.packet_recv
_packet_poll = _native.packet_poll


# ----- pickling ---------------------------------------------------------------------------


class _Pickler5(pickle.Pickler):
    """Pickles as multiprocessing's ForkingPickler does (its reducers: connections, sockets,
    ...) at protocol 5; the reducer table is a class attribute, kept in step with
    ``ForkingPickler.register`` (building a ForkingPickler per message copies it each time)."""

    dispatch_table: dict = {}


_n_reducers = -1


def _sync_reducers() -> None:
    global _n_reducers
    extra = reduction.ForkingPickler._extra_reducers
    if len(extra) != _n_reducers:
        _Pickler5.dispatch_table = {**reduction.ForkingPickler._copyreg_dispatch_table, **extra}
        _n_reducers = len(extra)


def _collect(bufs: list):
    def cb(pb):
        try:
            m = pb.raw()
        except BufferError:  # not contiguous: in band
            return True
        if m.nbytes < OOB_MIN:
            return True
        bufs.append(m)
        return False

    return cb


# One reusable pickler (memo cleared after each use) for whichever thread gets it first; a
# thread that finds it busy (another thread, or a reducer that sends) builds its own.
_shared_bufs: list = []
_shared_file = io.BytesIO()
_shared = None
_shared_table = None  # the reducer table _shared was built with
_shared_lock = threading.Lock()


_SCALARS = frozenset({int, float, str, bytes, bool, type(None)})  # no reducer involved
_dumps_plain = pickle.dumps


def dumps(obj) -> tuple[bytes, list]:
    """``obj`` pickled as a dragon connection sends it: (pickle, out-of-band buffers)."""
    global _shared, _shared_table
    _sync_reducers()
    if not _shared_lock.acquire(False):
        bufs: list = []
        f = io.BytesIO()
        _Pickler5(f, 5, buffer_callback=_collect(bufs)).dump(obj)
        return f.getvalue(), bufs
    try:
        if _shared_table is not _Pickler5.dispatch_table:
            _shared = _Pickler5(_shared_file, 5, buffer_callback=_collect(_shared_bufs))
            _shared_table = _Pickler5.dispatch_table
        try:
            _shared.dump(obj)
            return _shared_file.getvalue(), _shared_bufs[:]
        finally:
            _shared.clear_memo()
            _shared_file.seek(0)
            _shared_file.truncate()
            _shared_bufs.clear()
    finally:
        _shared_lock.release()


_loads = pickle.loads


# ----- packets ----------------------------------------------------------------------------


def _node_pool():
    """This node's pool: the runtime module's handle once it is set (reset after a fork),
    without its lock; every message larger than a packet asks for it."""
    p = _runtime._pool
    return p if p is not None else _runtime.node_pool()


_pools: dict = {}


def _pool_named(name: str):
    pool = _node_pool()
    if pool.name == name:
        return pool
    p = _pools.get(name)
    if p is None:
        p = _pools[name] = _native.Pool.open(name)
    return p


def _spill(parts: list) -> bytes:
    """Writes ``parts`` (in the ``dragon._parts`` layout) into a new spill segment; returns
    its packet."""
    rt, node, _ = _runtime.parse_env(os.environ[_runtime.RUNTIME_ENV])
    ident = int.from_bytes(os.urandom(8), "little") >> 1
    name = _native.segment_name(rt, node, "raw", ident)
    path = "/dev/shm/" + name.lstrip("/")
    views = [memoryview(p).cast("B") for p in parts]
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        for chunk in [_parts.header([v.nbytes for v in views]), *views]:
            rest = memoryview(chunk)
            while rest:  # a write may take less than it was given
                rest = rest[os.write(fd, rest) :]
            os.lseek(fd, -len(chunk) % 64, os.SEEK_CUR)  # the next part's 64-byte boundary
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)
    return bytes([_SPILL]) + name.encode()


def _big_packet(parts: list, nbytes: int) -> bytes:
    """A block (or spill) packet carrying ``parts``."""
    pool = _node_pool()
    used, capacity = pool.usage()
    # Leave an eighth of the pool to the runtime's own messages and objects.
    if capacity - used - nbytes - 64 * (len(parts) + 2) >= capacity // 8:
        try:
            b = pool.alloc_parts(parts)
        except (MemoryError, ValueError):
            pass
        else:
            ref = b.keep()
            return bytes([_BLOCK]) + _REF.pack(*ref) + pool.name.encode()
    return _spill(parts)


def _nd_packet(obj, limit: int) -> bytes | None:
    """The packet of a plain NumPy array, without pickle (whose reduction of an ndarray
    costs a small message most of its time), or None (pickle it).

    The array's header: kind, len(dtype.str), ndim, order (0 C, 1 Fortran), dtype.str,
    shape as little-endian int64. An array that fits in one packet follows its header
    there (received, it is a new writable array, as unpickling gives); a larger one goes
    with its header as the two parts of a pool block (received, a copy below ``OOB_MIN``
    bytes and a view of the block from there on, as pickle-5 in-band and out-of-band
    buffers give)."""
    np = sys.modules.get("numpy")  # an array is only here if numpy was imported
    if np is None or type(obj) is not np.ndarray:
        return None
    dt = obj.dtype
    if dt.hasobject or dt.fields is not None or dt.metadata is not None or not dt.itemsize:
        return None
    flags = obj.flags
    order = 0 if flags.c_contiguous else 1 if flags.f_contiguous else -1
    ds = dt.str.encode()
    if order < 0 or len(ds) > 255:
        return None
    shape = obj.shape
    head = bytes((_NDARRAY, len(ds), len(shape), order)) + ds + struct.pack(f"<{len(shape)}q", *shape)
    # The bytes, viewed in that order as uint8 (every dtype has a buffer then: datetime64 has
    # no buffer format of its own).
    raw = obj.ravel("F" if order else "C").view(np.uint8)
    if len(head) + obj.nbytes < limit:
        return head + raw.data
    return _big_packet([head, raw], len(head) + obj.nbytes)


def _nd_from(head, data=None):
    """The array of an ``_NDARRAY`` header: its bytes follow it in ``head`` (copied) or are
    ``data`` (viewed in place)."""
    import numpy as np

    ld, nd, order = head[1], head[2], head[3]
    shape = struct.unpack_from(f"<{nd}q", head, 4 + ld)
    if data is None:
        data = bytearray(memoryview(head)[4 + ld + 8 * nd :])
    dtype = bytes(head[4 : 4 + ld]).decode()
    return np.frombuffer(data, dtype).reshape(shape, order="F" if order else "C")


def _from_parts(parts: list):
    """The object of a block or spill packet's parts: an array (header, bytes) or a pickle
    and its out-of-band buffers."""
    if parts[0][0] == _NDARRAY:
        data = parts[1]
        if data.nbytes < OOB_MIN:
            # As a pickle carries a buffer this small (in band): a copy, so that the block
            # is freed now and not when the array dies.
            data = bytearray(data)
        return _nd_from(parts[0], data)
    return _loads(parts[0], buffers=parts[1:])


def encode_obj(obj, limit: int) -> bytes:
    """The packet for object ``obj`` on a connection whose packets hold ``limit`` bytes."""
    if type(obj) in _SCALARS:  # no reducer involved: the common small message, shortest
        return encode(_dumps_plain(obj, 5), (), limit)
    pkt = _nd_packet(obj, limit)
    if pkt is not None:
        return pkt
    data, bufs = dumps(obj)
    return encode(data, bufs, limit)


def encode(data, bufs: list, limit: int) -> bytes:
    """The packet for a message of ``data`` (bytes-like) and out-of-band ``bufs``."""
    if not bufs:
        n = len(data) if type(data) is bytes else memoryview(data).nbytes
        if n < limit:
            return b"\x00" + data
        return _big_packet([data], n)
    return _big_packet([data, *bufs], memoryview(data).nbytes + sum(b.nbytes for b in bufs))


def send_packet(fd: int, sock: bool, packet: bytes, block: bool = True) -> bool:
    """Sends ``packet`` (see ``dragon._native.packet_send``); a packet that cannot be sent
    frees what it holds before the error propagates."""
    try:
        return _packet_send(fd, sock, packet, block)
    except BaseException:
        discard(packet)
        raise


def discard(packet: bytes) -> None:
    """Frees what an unsent packet holds (its pool hold or spill segment)."""
    kind = packet[0]
    if kind == _BLOCK:
        ref = _REF.unpack_from(packet, 1)
        _pool_named(packet[1 + _REF.size :].decode()).release_kept(ref)
    elif kind == _SPILL:
        try:
            os.unlink(_spill_path(packet))
        except FileNotFoundError:
            pass


def _spill_path(packet: bytes) -> str:
    """The file of a spill packet's segment; a name that is not one of our raw segments
    (a corrupt packet: "../" or another runtime's object) is refused, never opened or
    unlinked."""
    name = packet[1:].decode(errors="replace")
    if not _SPILL_NAME.fullmatch(name):
        raise DragonOSError(f"bad message on a dragon connection (spill segment {name[:80]!r})")
    return "/dev/shm/" + name.lstrip("/")


def _open_parts(packet: bytes) -> list:
    kind = packet[0]
    if kind == _BLOCK:
        ref = _REF.unpack_from(packet, 1)
        pool = _pool_named(packet[1 + _REF.size :].decode())
        b = _native.Block.attach(pool, ref)
        pool.release_kept(ref)
        return _parts.split(b)
    if kind == _SPILL:
        import mmap

        path = _spill_path(packet)
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            os.unlink(path)
            m = mmap.mmap(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        return _parts.split(m)
    raise DragonOSError(f"bad message on a dragon connection (kind {kind})")


def decode(packet: bytes):
    """The object a packet carries."""
    if packet[0] == _INLINE:
        return _loads(memoryview(packet)[1:])
    if packet[0] == _NDARRAY:
        return _nd_from(packet)
    return _from_parts(_open_parts(packet))


def decode_bytes(packet: bytes) -> bytes:
    """The bytes a packet carries (a message sent with ``send`` and large buffers is
    pickled again, in band, as CPython's ``recv_bytes`` would return it)."""
    if packet[0] == _INLINE:
        return packet[1:]
    if packet[0] == _NDARRAY:
        return bytes(reduction.ForkingPickler.dumps(_nd_from(packet)))
    parts = _open_parts(packet)
    if len(parts) == 1:
        return bytes(parts[0])
    return bytes(reduction.ForkingPickler.dumps(_from_parts(parts)))


# ----- Connection -------------------------------------------------------------------------


def _is_socket(fd: int) -> bool:
    return stat.S_ISSOCK(os.fstat(fd).st_mode)


class Connection(connection.Connection):
    """A connection of the "dragon" context: CPython's ``Connection`` API over a
    message-oriented descriptor (see the module's doc)."""

    def __init__(self, handle, readable=True, writable=True):
        super().__init__(handle, readable, writable)
        self._sock = _is_socket(self._handle)
        self._limit = SOCK_PACKET if self._sock else PIPE_PACKET
        self._wfd = self._handle  # where messages go out (a duplex end: its other pipe)

    def _send_bytes(self, buf):
        send_packet(self._wfd, self._sock, encode(buf, (), self._limit))

    def _recv_bytes(self, maxsize=None):
        data = decode_bytes(_packet_recv(self._handle, self._sock, None))
        if maxsize is not None and len(data) > maxsize:
            return None
        b = io.BytesIO(data)
        b.seek(0, io.SEEK_END)  # as CPython's: positioned after the message
        return b

    def _poll(self, timeout):
        return _packet_poll(self._handle, timeout)

    def send(self, obj):
        """Sends a picklable object (large buffers in a pool block, read in place)."""
        if self._handle is None or not self._writable:
            self._check_closed()
            self._check_writable()
        send_packet(self._wfd, self._sock, encode_obj(obj, self._limit))

    def recv(self):
        """Receives an object sent with ``send``."""
        if self._handle is None or not self._readable:
            self._check_closed()
            self._check_readable()
        return decode(_packet_recv(self._handle, self._sock, None))


class DuplexConnection(Connection):
    """An end of a duplex ``Pipe``: messages come in on one packet pipe, whose read end is
    ``fileno()`` (so ``connection.wait``, ``select`` and EOF when the peer is gone keep their
    meaning), and go out on another; descriptors (``reduction.send_handle``/``recv_handle``)
    travel on a Unix socket pair kept beside them. A pipe round trip costs well under half
    a socket's (see the module's doc)."""

    def __init__(self, rfd: int, wfd: int, sfd: int):
        connection.Connection.__init__(self, rfd, True, True)
        self._sock = False
        self._limit = PIPE_PACKET
        self._wfd = wfd
        self._sfd = sfd

    def _close(self, _close=os.close):
        try:
            _close(self._handle)
        finally:
            try:
                _close(self._wfd)
            finally:
                _close(self._sfd)

    def _handle_socket(self) -> socket.socket:
        self._check_closed()
        return socket.fromfd(self._sfd, socket.AF_UNIX, socket.SOCK_STREAM)


def _reduce_connection(conn):
    df = reduction.DupFd(conn.fileno())
    return _rebuild_connection, (df, conn.readable, conn.writable)


def _rebuild_connection(df, readable, writable):
    return Connection(df.detach(), readable, writable)


def _reduce_duplex(conn):
    fds = (conn.fileno(), conn._wfd, conn._sfd)
    return _rebuild_duplex, tuple(reduction.DupFd(fd) for fd in fds)


def _rebuild_duplex(rdf, wdf, sdf):
    fds: list[int] = []
    try:
        for df in (rdf, wdf, sdf):
            fds.append(df.detach())
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return DuplexConnection(*fds)


reduction.register(Connection, _reduce_connection)
reduction.register(DuplexConnection, _reduce_duplex)

_std_send_handle = reduction.send_handle
_std_recv_handle = reduction.recv_handle


def send_handle(conn, handle, destination_pid):
    """``multiprocessing.reduction.send_handle``, which also takes a duplex ``Pipe`` end of
    the "dragon" context (its descriptors go on the socket beside its pipes)."""
    if isinstance(conn, DuplexConnection):
        with conn._handle_socket() as s:
            reduction.sendfds(s, [handle])
    else:
        _std_send_handle(conn, handle, destination_pid)


def recv_handle(conn):
    """``multiprocessing.reduction.recv_handle`` for a duplex ``Pipe`` end of the "dragon"
    context as well as CPython's connections."""
    if isinstance(conn, DuplexConnection):
        with conn._handle_socket() as s:
            return reduction.recvfds(s, 1)[0]
    return _std_recv_handle(conn)


# multiprocessing looks these up on the module when called (reduction.send_handle(...)).
reduction.send_handle = send_handle
reduction.recv_handle = recv_handle
reduction.AbstractReducer.send_handle = send_handle
reduction.AbstractReducer.recv_handle = recv_handle


def _packet_pipe(size: int = 0) -> tuple[int, int]:
    r, w = os.pipe2(os.O_DIRECT | os.O_NONBLOCK | os.O_CLOEXEC)
    if size:
        try:
            fcntl.fcntl(w, _F_SETPIPE_SZ, size)
        except OSError:  # above fs.pipe-max-size (or the user's pipe quota): keep the default
            pass
    return r, w


def Pipe(duplex: bool = True, _size: int = 0):
    """A pair of connected ``Connection`` objects (``duplex=False``: receive end first)."""
    if duplex:
        fds: list[int] = []
        try:
            fds += _packet_pipe(_size or DUPLEX_PIPE_SIZE)
            fds += _packet_pipe(_size or DUPLEX_PIPE_SIZE)
            s1, s2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            fds += (s1.detach(), s2.detach())
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        r1, w1, r2, w2, a, b = fds
        return DuplexConnection(r1, w2, a), DuplexConnection(r2, w1, b)
    r, w = _packet_pipe(_size)
    return Connection(r, writable=False), Connection(w, readable=False)


# ----- sharing outside a spawn --------------------------------------------------------------


class _Shareable:
    """Pickles outside a spawn too (DragonHPC's queues go anywhere); see dragon._sharing."""

    def __reduce_ex__(self, protocol):
        if context.get_spawning_popen() is not None:
            return super().__reduce_ex__(protocol)
        return reduce_shared(self)


# ----- queues -------------------------------------------------------------------------------

_sentinel = object()


def _local_locks(q) -> None:
    """Readers and writers need no lock (a message is one packet); CPython's lock attributes
    exist, per process, for code that reaches into them (Pool's terminate takes the inqueue's
    read lock)."""
    q._rlock = threading.Lock()
    q._wlock = threading.Lock()


class _FeedState:
    """What ``put`` and the feeder thread share: messages handed over and not yet sent."""

    __slots__ = ("pending",)

    def __init__(self):
        self.pending = 0


class Queue(_Shareable, queues.Queue):
    """multiprocessing's Queue (unbounded by default, ``put`` never blocks on an unbounded
    queue), on a packet pipe: ``put`` sends at once; a feeder thread only takes over while
    the pipe is full."""

    def __init__(self, maxsize=0, *, ctx):
        if maxsize <= 0:
            from multiprocessing.synchronize import SEM_VALUE_MAX as maxsize
        self._maxsize = maxsize
        self._reader, self._writer = Pipe(duplex=False, _size=PIPE_SIZE)
        self._opid = os.getpid()
        self._sem = ctx.BoundedSemaphore(maxsize)
        self._ignore_epipe = False
        self._reset()
        util.register_after_fork(self, Queue._after_fork)

    def __getstate__(self):
        context.assert_spawning(self)
        return (self._ignore_epipe, self._maxsize, self._reader, self._writer, self._sem, self._opid)

    def __setstate__(self, state):
        (self._ignore_epipe, self._maxsize, self._reader, self._writer, self._sem, self._opid) = state
        self._reset()

    def _reset(self, after_fork=False):
        super()._reset(after_fork)
        self._state = _FeedState()
        self._wfd = self._writer._handle
        self._rfd = self._reader._handle
        _local_locks(self)

    def _encode(self, obj):
        """The packet for ``obj``, or None after reporting a pickling error."""
        try:
            return encode_obj(obj, PIPE_PACKET)
        except Exception as e:
            self._sem.release()
            self._on_queue_feeder_error(e, obj)
            return None

    def put(self, obj, block=True, timeout=None):
        """Puts ``obj`` (waits for room only on a queue with a ``maxsize``)."""
        if self._closed:
            raise ValueError(f"Queue {self!r} is closed")
        if not self._sem.acquire(block, timeout):
            raise QueueFull
        self._put(obj)

    def _put(self, obj):
        pkt = self._encode(obj)
        if pkt is None:
            return
        if self._state.pending == 0 and send_packet(self._wfd, False, pkt, block=False):
            return
        with self._notempty:
            if self._thread is None:
                self._start_thread()
            self._state.pending += 1
            self._buffer.append(pkt)
            self._notempty.notify()

    def get(self, block=True, timeout=None):
        """Removes and returns an item (queue.Empty after ``timeout``, or at once when not
        ``block`` and nothing waits)."""
        if self._closed:
            raise ValueError(f"Queue {self!r} is closed")
        pkt = _packet_recv(self._rfd, False, timeout if block else 0.0)
        if pkt is None:
            raise QueueEmpty
        self._sem.release()
        return decode(pkt)

    def empty(self):
        """Whether nothing waits (racy, as in CPython)."""
        return not _packet_poll(self._rfd, 0.0)

    def _start_thread(self):
        self._buffer.clear()
        self._thread = threading.Thread(
            target=_feed,
            args=(
                self._buffer,
                self._notempty,
                self._state,
                self._wfd,
                self._reader.close,
                self._writer.close,
                self._ignore_epipe,
                self._on_queue_feeder_error,
                self._sem,
            ),
            name="QueueFeederThread",
            daemon=True,
        )
        self._thread.start()
        if not self._joincancelled:
            self._jointhread = util.Finalize(
                self._thread, queues.Queue._finalize_join, [weakref.ref(self._thread)], exitpriority=-5
            )
        self._close = util.Finalize(
            self, Queue._finalize_close, [self._buffer, self._notempty, self._state], exitpriority=10
        )

    @staticmethod
    def _finalize_close(buffer, notempty, state):
        with notempty:
            state.pending += 1
            buffer.append(_sentinel)
            notempty.notify()


def _feed(buffer, notempty, state, wfd, reader_close, writer_close, ignore_epipe, onerror, sem):
    """The feeder thread: sends what ``put`` handed over (packets), in order."""
    while True:
        with notempty:
            while not buffer:
                notempty.wait()
            pkt = buffer.popleft()
        try:
            if pkt is _sentinel:
                reader_close()
                writer_close()
                return
            try:
                send_packet(wfd, False, pkt)
            except Exception as e:
                if ignore_epipe and getattr(e, "errno", 0) == errno.EPIPE:
                    return
                if util.is_exiting():
                    return
                sem.release()
                onerror(e, pkt)
        finally:
            with notempty:
                state.pending -= 1


class JoinableQueue(Queue, queues.JoinableQueue):
    """multiprocessing's JoinableQueue on the dragon Queue."""

    def __init__(self, maxsize=0, *, ctx):
        Queue.__init__(self, maxsize, ctx=ctx)
        self._unfinished_tasks = ctx.Semaphore(0)
        self._cond = ctx.Condition()

    def __getstate__(self):
        return Queue.__getstate__(self) + (self._cond, self._unfinished_tasks)

    def __setstate__(self, state):
        Queue.__setstate__(self, state[:-2])
        self._cond, self._unfinished_tasks = state[-2:]

    def _put(self, obj):
        with self._cond:
            self._unfinished_tasks.release()  # counted before any reader can see it
        Queue._put(self, obj)


class SimpleQueue(_Shareable, queues.SimpleQueue):
    """multiprocessing's SimpleQueue on a packet pipe (no locks needed)."""

    def __init__(self, *, ctx):
        self.__setstate__(Pipe(duplex=False, _size=PIPE_SIZE))

    def __getstate__(self):
        context.assert_spawning(self)
        return (self._reader, self._writer)

    def __setstate__(self, state):
        (self._reader, self._writer) = state
        self._poll = self._reader.poll
        _local_locks(self)

    def get(self):
        """Removes and returns an item, waiting for one."""
        return self._reader.recv()

    def put(self, obj):
        """Puts ``obj`` (waits while the pipe is full, as CPython's)."""
        self._writer.send(obj)


__all__ = ["Connection", "Pipe", "Queue", "JoinableQueue", "SimpleQueue"]
