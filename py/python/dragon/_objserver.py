"""A node's object server: processes of other nodes use this node's objects through it.

Queues (their channels), events, locks, semaphores, barriers and the blocks of ``Value`` /
``Array`` live in a node's shared memory, which other hosts cannot map. Every agent of a
multi-node runtime (the launcher on the primary, ``dragon._nodeagent`` on members) runs one
of these servers; its address and ticket are in the node table (``objects``), which only
processes of the runtime can read. A process of another node (``dragon._remote``) opens one
TCP connection per thread to it, proves the ticket, then sends operations; a thread of the
server serves each connection, so a blocking operation (``get``, ``acquire``, ``wait``)
blocks that thread only, on the object itself, with the caller's time-out.

Frames both ways: ``<IQ`` (header length, payload length), a pickled header, the payload.
A request header is ``(op, kind, pool name, ref, args)``; a reply is ``(True, value)`` or
``(False, exception)``. Payloads are message bytes: a large message goes from the sender's
buffers straight into a block of the object's pool, and from a block straight to the
socket, so it is copied once on each side. Pickles come only from peers that proved the
ticket.

A server thread waiting on behalf of a client wakes every ``SLICE`` seconds to see whether
the client is still there; one that left stops waiting, and a message taken for it that
cannot be delivered goes back into its channel. Locks a client still holds when its
connection ends are released.
"""

from __future__ import annotations

import os
import pickle
import select
import socket
import struct
import threading
import time
from _operator import _compare_digest  # hmac's, without importing hashlib

from dragon import _log, _native
from dragon._listener import Listener

FRAME = struct.Struct("<IQ")
SLICE = 0.25
TICKET_LEN = 16
MAX_HEADER = 1 << 20

# What a client may call on each kind (anything else is refused).
METHODS = {
    "Event": {"set", "clear", "is_set", "wait"},
    "Lock": {"acquire", "release", "is_locked"},
    "RLock": {"acquire", "release", "is_mine", "count"},
    "Semaphore": {"acquire", "release", "get_value"},
    "BoundedSemaphore": {"acquire", "release", "get_value"},
    "Barrier": {"wait", "abort", "reset", "parties", "n_waiting", "broken"},
    "Channel": {"send", "recv", "len", "close", "wake_all", "stats"},
    "Block": {"read", "write", "len"},
    "Pool": {"make_manager"},
    "Kv": {
        "put_block",
        "put_block_in_range",
        "range_and_get",
        "get",
        "take",
        "contains",
        "rekey",
        "chkpt_range",
        "set_chkpt_range",
        "changes",
        "wait_change",
        "remove",
        "keys",
        "clear",
        "len",
        "set_frozen",
        "frozen",
        "stats",
        "destroy",
    },
}
PROPERTIES = {"parties", "n_waiting", "broken"}


class Stream:
    """The receiving side of a connection, buffered: one ``recv`` usually brings a whole
    small frame; a payload beyond what is buffered goes straight into the caller's buffer."""

    def __init__(self, sock: socket.socket, size: int = 65536):
        self.sock = sock
        self.buf = bytearray(size)
        self.mv = memoryview(self.buf)
        self.lo = self.hi = 0
        self.consumed = 0  # bytes taken by read / read_into / skip (payloads)

    def buffered(self) -> int:
        """Bytes received and not consumed yet."""
        return self.hi - self.lo

    def _fill(self, need: int) -> None:
        if self.lo == self.hi:
            self.lo = self.hi = 0
        if self.lo + need > len(self.buf):  # make room: move what is left to the front
            left = self.hi - self.lo
            if need > len(self.buf):
                self.buf = bytearray(self.mv[self.lo : self.hi]) + bytearray(need - left)
                self.mv = memoryview(self.buf)
            else:
                self.mv[:left] = self.mv[self.lo : self.hi]
            self.lo, self.hi = 0, left
        while self.hi - self.lo < need:
            n = self.sock.recv_into(self.mv[self.hi :])
            if n == 0:
                raise ConnectionError("the connection ended")
            self.hi += n

    def header(self):
        """(header, payload length) of the next frame."""
        self._fill(FRAME.size)
        hl, pl = FRAME.unpack_from(self.buf, self.lo)
        if hl > MAX_HEADER:
            raise ConnectionError("a frame header too large")
        self.lo += FRAME.size
        self._fill(hl)
        h = pickle.loads(self.mv[self.lo : self.lo + hl])
        self.lo += hl
        return h, pl

    def read(self, n: int) -> bytes:
        """The next ``n`` bytes."""
        out = bytearray(n)
        self.read_into(memoryview(out))
        return bytes(out)

    def skip(self, n: int) -> None:
        """Discards the next ``n`` bytes."""
        chunk = memoryview(bytearray(min(max(n, 0), 1 << 20)))
        while n > 0:
            k = min(n, len(chunk))
            self.read_into(chunk[:k])
            n -= k

    def read_into(self, view: memoryview) -> None:
        """Fills ``view`` (what is buffered first, then straight from the socket)."""
        view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        self.consumed += len(view)
        got = min(len(view), self.hi - self.lo)
        if got:
            view[:got] = self.mv[self.lo : self.lo + got]
            self.lo += got
        while got < len(view):
            n = self.sock.recv_into(view[got:])
            if n == 0:
                raise ConnectionError("the connection ended")
            got += n


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes from ``sock``, unbuffered (the ticket, before a Stream exists)."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionError("the connection ended")
        got += k
    return bytes(buf)


def send_frame(sock: socket.socket, header, payload=()) -> None:
    """Sends one frame; ``payload`` is a list of buffers, sent without copying them."""
    h = pickle.dumps(header, protocol=5)
    if not payload:
        sock.sendall(FRAME.pack(len(h), 0) + h)
        return
    bufs = [memoryview(b).cast("B") for b in payload]
    total = sum(len(b) for b in bufs)
    out = [FRAME.pack(len(h), total) + h, *bufs]
    while out:
        n = sock.sendmsg(out[:64])
        while n and out:
            if n >= len(out[0]):
                n -= len(out[0])
                out.pop(0)
            else:
                out[0] = memoryview(out[0])[n:]
                n = 0


def _gone(st: Stream) -> bool:
    """Whether the client closed its end (it sends nothing while it waits for an answer)."""
    if st.buffered():
        return False
    sock = st.sock
    r, _, _ = select.select([sock], [], [], 0)
    if not r:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


class Server(Listener):
    """The object server of this node (``node``): listens on ``ip``, port chosen by the OS."""

    def __init__(self, node: int, ip: str):
        self.node = node
        self.ticket = os.urandom(TICKET_LEN)
        self.ip = ip
        self._objects: dict = {}
        self._pools: dict = {}
        self._lock = threading.Lock()
        super().__init__(ip, "dragon-objserver")
        # The hot operations (channel send/recv, locks, semaphores, events) have a server
        # in Rust (``dragon._native.objcall``'s other end), with the same ticket.
        self.fast_port = _native.objserver_start(ip, node, self.ticket)

    @property
    def address(self) -> str:
        """``ip:port:ticket:fast port`` for the node table."""
        return f"{self.ip}:{self.port}:{self.ticket.hex()}:{self.fast_port}"

    def close(self) -> None:
        """Stops both servers."""
        _native.objserver_stop(self.ip)
        super().close()

    # -- objects -----------------------------------------------------------------------

    def _pool(self, name: str):
        p = self._pools.get(name)
        if p is None:
            p = self._pools[name] = _native.Pool.open(name)
        return p

    def _object(self, kind: str, pool: str, ref: tuple):
        key = (kind, pool, tuple(ref))
        obj = self._objects.get(key)  # no lock on the common path: a dict read is atomic
        if obj is not None:
            return obj
        with self._lock:
            obj = self._objects.get(key)
            if obj is None:
                parts = pool.split("-")
                if len(parts) < 3 or parts[2] != str(self.node):
                    raise ValueError(f"{pool} is not a pool of node {self.node}")
                if kind == "Pool":
                    obj = self._pool(pool)
                elif kind == "Block":
                    obj = _native.Block.attach(self._pool(pool), tuple(ref))
                elif kind == "Kv":
                    obj = _native.Kv.attach(self._pool(pool), tuple(ref))
                else:
                    obj = getattr(_native, kind).attach(pool, tuple(ref))
                self._objects[key] = obj
            return obj

    def _forget(self, pool: str) -> None:
        with self._lock:
            for key in [k for k in self._objects if k[1] == pool]:
                del self._objects[key]
            self._pools.pop(pool, None)

    # -- one client --------------------------------------------------------------------

    def _serve(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        held: dict = {}  # lock object -> times acquired and not released
        try:
            conn.settimeout(10.0)
            if not _compare_digest(recv_exact(conn, TICKET_LEN), self.ticket):
                return
            conn.settimeout(None)
            conn.sendall(b"\x01")
            st = Stream(conn)
            while True:
                try:
                    (op, kind, pool, ref, args), plen = st.header()
                except (ConnectionError, OSError):
                    return
                mark = st.consumed
                try:
                    if op not in METHODS.get(kind, ()):
                        raise ValueError(f"no operation {op!r} on a {kind}")
                    obj = self._object(kind, pool, ref)
                    if kind == "Channel":
                        self._channel(st, obj, pool, op, args, plen)
                        continue
                    if kind == "Kv":
                        self._kv(st, obj, pool, op, args, plen)
                        continue
                    if plen and not (kind == "Block" and op == "write"):
                        raise ValueError("unexpected payload")
                    value, payload = self._call(st, obj, kind, op, args, plen, held)
                except (ConnectionError, BrokenPipeError):
                    return
                except Exception as e:
                    # The payload an operation failed before reading (a full pool, a bad
                    # range) is skipped, so the next request starts where it should.
                    st.skip(plen - (st.consumed - mark))
                    send_frame(conn, (False, _picklable(e)))
                    continue
                send_frame(conn, (True, value), payload)
        except OSError:
            pass
        finally:
            for lock, n in held.items():
                for _ in range(n):
                    try:
                        lock.release()
                    except Exception:
                        break
            conn.close()

    def _wait(self, st, fn, timeout):
        """Calls ``fn(slice)`` until it returns a true value or ``timeout`` passes (None:
        forever); between slices, stops with ConnectionError if the client left."""
        end = None if timeout is None else time.monotonic() + max(0.0, timeout)
        while True:
            left = SLICE if end is None else min(SLICE, max(0.0, end - time.monotonic()))
            r = fn(left)
            if r:
                return r
            if end is not None and time.monotonic() >= end:
                return r
            if _gone(st):
                raise ConnectionError("the client left")

    def _call(self, st, obj, kind, op, args, plen, held):
        if kind == "Block":
            if op == "len":
                return len(obj), ()
            off, n = args
            mv = memoryview(obj)
            if (
                off < 0
                or (op == "read" and (n < 0 or off + n > len(mv)))
                or (op == "write" and off + plen > len(mv))
            ):
                raise ValueError("read or write beyond the block")
            if op == "read":
                return None, [mv[off : off + n]]
            st.read_into(mv[off : off + plen])
            return None, ()
        if kind == "Pool":  # make_manager: a DDict manager's index and lock in this pool
            kv, lock = _native.Kv.create(obj), _native.Lock(obj)
            _native.Block.attach(obj, lock.ref).keep()  # lives as long as the manager
            return (kv.ref, lock.ref), ()
        if op in PROPERTIES:
            return getattr(obj, op), ()
        if op == "acquire":
            block, timeout = args
            if not block:
                ok = obj.acquire(False, None)
            else:
                ok = self._wait(st, lambda t: obj.acquire(True, t), timeout)
                if ok and _gone(st):
                    # Got in the slice in which the client left: nobody would ever release it.
                    obj.release()
                    raise ConnectionError("the client left")
            if ok and kind in ("Lock", "RLock"):
                held[obj] = held.get(obj, 0) + 1
            return bool(ok), ()
        if op == "release":
            obj.release(*args)
            if kind in ("Lock", "RLock") and held.get(obj):
                held[obj] -= 1
            return None, ()
        if op == "wait" and kind == "Event":
            (timeout,) = args
            return bool(self._wait(st, obj.wait, timeout)), ()
        if op == "wait" and kind == "Barrier":
            timeout, has_action = args
            action = (lambda: self._run_action(st)) if has_action else None
            return obj.wait(timeout, action), ()
        return getattr(obj, op)(*args), ()

    def _run_action(self, st) -> None:
        """A barrier's action runs in the client that arrived last: ask it, wait for it."""
        send_frame(st.sock, ("action", None))
        (ok, err), _ = st.header()
        if not ok:
            raise err

    def _channel(self, st, ch, pool, op, args, plen) -> None:
        if op == "send":
            (timeout,) = args
            data = st.read(plen)
            self._deliver(st, lambda t: _try(ch.send, data, t), timeout)
        elif op == "recv":
            (timeout,) = args
            m = self._wait(st, lambda t: _take(ch, t), timeout)
            if not m:
                raise _empty()
            msg = m[0]
            kind = "i" if isinstance(msg, bytes) else "b"
            try:
                send_frame(st.sock, (True, kind), [msg])
            except OSError:
                _put_back(ch, msg)
                raise
            return
        elif op == "len":
            send_frame(st.sock, (True, len(ch)))
            return
        else:
            send_frame(st.sock, (True, getattr(ch, op)()))
            return
        send_frame(st.sock, (True, None))

    def _kv(self, st, kv, pool, op, args, plen) -> None:
        if op == "put_block":
            (key,) = args
            block = self._pool(pool).alloc(plen)
            st.read_into(memoryview(block))
            kv.put_block(key, block)
            send_frame(st.sock, (True, None))
        elif op == "put_block_in_range":  # a put that only a checkpoint in the working set takes
            key, c = args
            block = self._pool(pool).alloc(plen)
            st.read_into(memoryview(block))
            old, new = kv.chkpt_range()
            if old <= c <= new:
                kv.put_block(key, block)
            send_frame(st.sock, (True, old <= c <= new))
        elif op == "range_and_get":
            rng = kv.chkpt_range()
            b = kv.get(*args)
            send_frame(st.sock, (True, (rng, b is not None)), [] if b is None else [b])
        elif op in ("get", "take"):
            b = getattr(kv, op)(*args)
            send_frame(st.sock, (True, b is not None), [] if b is None else [b])
        elif op == "len":
            send_frame(st.sock, (True, len(kv)))
        else:
            if plen:
                raise ValueError("unexpected payload")
            value = getattr(kv, op)(*args)
            if op == "destroy":  # the DDict is gone: let its pool's mapping go with it
                self._forget(pool)
            send_frame(st.sock, (True, value))

    def _deliver(self, st, fn, timeout) -> None:
        if not self._wait(st, fn, timeout):
            from dragon.exceptions import QueueFull

            raise QueueFull("timed out waiting for room")


def _try(send, data, t) -> bool:
    from dragon.exceptions import QueueFull

    try:
        send(data, t)
        return True
    except QueueFull:
        return False


def _take(ch, t):
    from dragon.exceptions import QueueEmpty

    try:
        return (ch.recv_msg(t),)
    except QueueEmpty:
        return None


def _empty():
    from dragon.exceptions import QueueEmpty

    return QueueEmpty("timed out")


def _put_back(ch, msg) -> None:
    """A message taken for a client that left goes back into its channel (at its end)."""
    try:
        if isinstance(msg, bytes):
            ch.send(msg, 1.0)
        else:
            ch.send_block(msg, 1.0)
    except Exception as e:  # the channel is full or closed: nothing else can be done
        _log.error("dragon.objserver", "a message for a client that left was dropped: %s", e)


def _picklable(e: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")


_server: Server | None = None


def start(node: int, ip: str) -> str:
    """Starts this node's object server (once); returns its ``objects`` table entry."""
    global _server
    if _server is None:
        _server = Server(node, ip)
    return _server.address


def stop() -> None:
    """Stops this node's object server."""
    global _server
    if _server is not None:
        _server.close()
        _server = None
