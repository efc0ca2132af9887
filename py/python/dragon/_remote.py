"""Objects of another node: proxies that reach them through that node's object server.

Every shared object of the native module (``Channel``, ``Event``, ``Lock``, ``RLock``,
``Semaphore``, ``BoundedSemaphore``, ``Barrier``) pickles to ``attach(kind, pool name,
ref)``. On the node whose pool holds the object (or outside a multi-node runtime) that is
the object itself; on another node it is a proxy here with the same methods, whose calls
travel to that node's object server (``dragon._objserver``) over one TCP connection per
thread and node. Blocking calls block in the server, on the object, with the caller's
time-out; a node that is gone is a ``NodeLostError``, never a hang (TCP keep-alive notices a
silent peer). A message larger than a few bytes goes from the sender's buffers (NumPy data
included) straight into a block of the object's node, and a received one straight into a
block of this node, read in place as on one node.

``RemoteBlock`` does the same for the pool block under a ``Value`` or ``Array``.
"""

from __future__ import annotations

import os
import socket
import struct
import threading

from dragon import _native
from dragon._objserver import TICKET_LEN, Stream, _picklable, send_frame
from dragon._parts import header as parts_header
from dragon.exceptions import NodeLostError

KINDS = ("Channel", "Event", "Lock", "RLock", "Semaphore", "BoundedSemaphore", "Barrier")

_here: tuple[str, int] | None = None
_table: dict[int, str] = {}
_table_lock = threading.Lock()
_conns = threading.local()
_fast: dict[int, tuple[str, bytes]] = {}
_pool = None
# Messages up to this size are sent through the fast (Rust) server; larger ones go from the
# sender's buffers straight into a block of the object's pool through the Python server.
FAST_SEND_MAX = 64 << 10
_CHK = struct.Struct("<Q")  # a DDict put's checkpoint, before its key
_RANGE = struct.Struct("<QQ")  # a fast block read: offset, length
_OFF = struct.Struct("<Q")  # a fast block write: offset, then the bytes


def _my_node() -> tuple[str, int] | None:
    """(runtime hex, node index) of this process, from DRAGON_RUNTIME (None outside one)."""
    global _here
    if _here is None:
        v = os.environ.get("DRAGON_RUNTIME", "").split(":")
        if len(v) != 4:
            return None
        try:
            _here = (v[1].lower().lstrip("0") or "0", int(v[2]))
        except ValueError:
            return None
    return _here


def node_of_pool(pool_name: str) -> int | None:
    """The node whose pool ``pool_name`` is, when it belongs to this process's runtime and
    that node is not this process's; else None (the object is local)."""
    here = _my_node()
    if here is None:
        return None
    parts = pool_name.lstrip("/").split("-")
    if len(parts) < 3 or parts[0] != "dragon":
        return None
    try:
        rt, node = parts[1].lower().lstrip("0") or "0", int(parts[2])
    except ValueError:
        return None
    return node if rt == here[0] and node != here[1] else None


def attach(kind: str, pool_name: str, ref: tuple):
    """The object ``kind`` at ``ref`` of pool ``pool_name``: itself on its node, a proxy on
    another (what every shared object of ``dragon._native`` unpickles through)."""
    if kind not in KINDS:
        raise ValueError(f"not a shared object kind: {kind!r}")
    node = node_of_pool(pool_name)
    if node is None:
        return getattr(_native, kind).attach(pool_name, ref)
    return _PROXIES[kind](kind, pool_name, tuple(ref), node)


def parse_entry(entry: str) -> tuple[str, int, bytes, int]:
    """A node table ``objects`` entry (``ip:port:ticket:fast port``) as (ip, port, ticket,
    fast port)."""
    ip, port, ticket, fast = entry.rsplit(":", 3)
    return ip.strip("[]"), int(port), bytes.fromhex(ticket), int(fast)


def _address(node: int) -> tuple[str, int, bytes, int]:
    with _table_lock:
        if node not in _table:
            from dragon import _runtime

            for n in _runtime.agent().nodes():
                _table[n["node"]] = n.get("objects", "")
        entry = _table.get(node)
    if not entry:
        raise NodeLostError(f"node {node} is not a node of this runtime or serves no objects")
    return parse_entry(entry)


def _fast_address(node: int) -> tuple[str, bytes]:
    """(``ip:port``, ticket) of ``node``'s fast object server (``dragon._native.objcall``)."""
    a = _fast.get(node)
    if a is None:
        ip, _, ticket, port = _address(node)
        a = _fast[node] = (f"{ip}:{port}", ticket)
    return a


def _local_pool():
    """This node's pool (where a received block message lands)."""
    global _pool
    if _pool is None:
        from dragon._runtime import node_pool

        _pool = node_pool()
    return _pool


class _Conn:
    """One connection to a node's object server, used by one thread."""

    def __init__(self, node: int):
        self.node = node
        ip, port, ticket, _ = _address(node)
        try:
            s = socket.create_connection((ip, port), timeout=10.0)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 2)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
            s.sendall(ticket[:TICKET_LEN])
            if s.recv(1) != b"\x01":
                raise ConnectionError("the object server refused the ticket")
            s.settimeout(None)
        except OSError as e:
            raise NodeLostError(f"node {node}'s object server cannot be reached: {e}") from None
        self.sock = s
        self.stream = Stream(s)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def _conn(node: int) -> _Conn:
    try:
        conns = _conns.by_node
    except AttributeError:
        conns = _conns.by_node = {}
    c = conns.get(node)
    if c is None:
        c = conns[node] = _Conn(node)
    return c


def _drop(node: int) -> None:
    c = getattr(_conns, "by_node", {}).pop(node, None)
    if c is not None:
        c.close()


def call(node: int, op: str, kind: str, pool: str, ref: tuple, args=(), payload=(), action=None, into=None):
    """Runs ``op`` on the object at ``node``'s server; returns (value, payload): the payload
    is None, bytes, or the buffer ``into(value, length)`` gave, filled."""
    c = _conn(node)
    done = False
    try:
        send_frame(c.sock, (op, kind, pool, ref, args), payload)
        while True:
            (ok, value), plen = c.stream.header()
            if ok == "action":  # a barrier's action, to run here (this party came last)
                try:
                    action()
                    send_frame(c.sock, (True, None))
                except BaseException as e:  # noqa: BLE001 - the server raises it in the barrier
                    send_frame(c.sock, (False, _picklable(e)))
                continue
            break
        if not ok:
            done = not plen
            raise value
        buf = None
        if plen:
            buf = into(value, plen) if into is not None else bytearray(plen)
            c.stream.read_into(memoryview(buf))
            if into is None:
                buf = bytes(buf)
        done = True
        return value, buf
    except (ConnectionError, OSError) as e:
        if not done:
            raise NodeLostError(f"node {node} was lost (its object server: {e})") from None
        raise
    finally:
        if not done:  # interrupted mid-call (or the node is gone): the stream is out of step
            _drop(node)


class RemoteObject:
    """A shared object of another node (base of the proxies)."""

    def __init__(self, kind: str, pool: str, ref: tuple, node: int):
        self._kind, self._pool, self._ref, self._node = kind, pool, ref, node

    def _call(self, op, *args, payload=(), action=None, into=None):
        return call(self._node, op, self._kind, self._pool, self._ref, args, payload, action, into)[0]

    def _fast(
        self, op, block=True, timeout=None, n=1, data=None, local_pool=None, as_block=False, parts=None
    ):
        """``op`` through the node's fast object server (channel send/recv/len, locks,
        semaphores, events, small DDict puts and gets)."""
        addr, ticket = _fast_address(self._node)
        k, pool, ref = self._kind, self._pool, self._ref
        return _native.objcall(
            addr, ticket, op, k, pool, ref, block, timeout, n, data, local_pool, as_block, parts
        )

    @property
    def ref(self) -> tuple:
        """The object's block handle (in its node's pool)."""
        return self._ref

    @property
    def node(self) -> int:
        """The node the object lives on."""
        return self._node

    def __reduce__(self):
        return attach, (self._kind, self._pool, self._ref)

    def __repr__(self) -> str:
        return f"<dragon._native.{self._kind} in {self._pool} (node {self._node}, remote)>"


class RemoteChannel(RemoteObject):
    """A ``Channel`` of another node."""

    def send(self, data, timeout: float | None = None) -> None:
        if memoryview(data).nbytes <= FAST_SEND_MAX:
            self._fast("send", timeout=timeout, data=data)
        else:
            self._call("send", timeout, payload=[data])

    def send_parts(self, parts, timeout: float | None = None) -> None:
        # One block message: the buffers go from here (NumPy data included, not copied)
        # straight into a block of the channel's node.
        self._fast(
            "send",
            timeout=timeout,
            local_pool=_local_pool(),
            as_block=True,
            parts=_parts_payload(parts),
        )

    def locked_recv(self, lock: RemoteLock, timeout: float | None = None, then_release=None):
        """``with lock: self.recv_msg()`` in one round trip (``lock`` on this channel's
        node, taken within ``timeout``; False when it was not); ``then_release``, a semaphore
        of that node too, is released once the message is taken, in the same call."""
        data = _lock_prefix(lock)
        if then_release is not None:
            data += _lock_prefix(then_release)
        return self._fast("locked_recv", timeout=timeout, data=data, local_pool=_local_pool())

    def locked_send_parts(self, lock: RemoteLock, parts) -> bool:
        """``with lock: self.send_parts(parts)`` in one round trip when the message is small
        (``parts`` of one or two buffers that fit a slot go inline); False when it is too
        large for that (nothing sent)."""
        views = [memoryview(p).cast("B") for p in parts]
        size = sum(v.nbytes for v in views)
        if size <= self._slot():
            return self._fast("locked_send", data=_lock_prefix(lock) + b"".join(views)) is None
        payload = _parts_payload(views)
        if sum(memoryview(b).nbytes for b in payload) > FAST_SEND_MAX:
            return False
        data = b"".join([_lock_prefix(lock), *payload])
        return self._fast("locked_send", data=data, as_block=True) is None

    def _slot(self) -> int:
        s = self.__dict__.get("_slot_size")
        if s is None:
            s = self._slot_size = self.stats()["slot_size"]
        return s

    def _recv(self, timeout):
        return self._fast("recv", timeout=timeout, local_pool=_local_pool())

    def recv_msg(self, timeout: float | None = None):
        return self._recv(timeout)

    def recv(self, timeout: float | None = None) -> bytes:
        m = self._recv(timeout)
        return m if isinstance(m, bytes) else bytes(memoryview(m))

    def __len__(self) -> int:
        return self._fast("len")

    def close(self) -> None:
        self._call("close")

    def wake_all(self) -> None:
        self._call("wake_all")

    def stats(self) -> dict:
        return self._call("stats")


class RemoteEvent(RemoteObject):
    """An ``Event`` of another node."""

    def set(self) -> None:
        self._fast("set")

    def clear(self) -> None:
        self._fast("clear")

    def is_set(self) -> bool:
        return self._fast("value")

    def wait(self, timeout: float | None = None) -> bool:
        return self._fast("wait", timeout=timeout)


class RemoteLock(RemoteObject):
    """A ``Lock``, ``RLock``, ``Semaphore`` or ``BoundedSemaphore`` of another node."""

    def acquire(self, block: bool = True, timeout: float | None = None) -> bool:
        return self._fast("acquire", bool(block), timeout)

    def release(self, n: int = 1) -> None:
        self._fast("release", n=n)

    def is_locked(self) -> bool:
        return self._fast("value")

    def is_mine(self) -> bool:
        return self._fast("is_mine")

    def count(self) -> int:
        return self._fast("value")

    def get_value(self) -> int:
        return self._fast("value")

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


class RemoteBarrier(RemoteObject):
    """A ``Barrier`` of another node (its action, if any, runs in the party that came last)."""

    def wait(self, timeout: float | None = None, action=None) -> int:
        return self._call("wait", timeout, action is not None, action=action)

    def abort(self) -> None:
        self._call("abort")

    def reset(self) -> None:
        self._call("reset")

    @property
    def parties(self) -> int:
        return self._call("parties")

    @property
    def n_waiting(self) -> int:
        return self._call("n_waiting")

    @property
    def broken(self) -> bool:
        return self._call("broken")


class RemoteBlock(RemoteObject):
    """A pool block of another node, read and written by byte range (``Value``/``Array``)."""

    def __init__(self, pool: str, ref: tuple, node: int):
        super().__init__("Block", pool, tuple(ref), node)

    def read(self, off: int, n: int) -> bytes:
        if 0 <= n <= FAST_SEND_MAX and off >= 0:
            return self._fast("read", data=_RANGE.pack(off, n))
        return call(self._node, "read", "Block", self._pool, self._ref, (off, n))[1] or b""

    def write(self, off: int, data) -> None:
        m = memoryview(data).cast("B")
        if m.nbytes <= FAST_SEND_MAX and off >= 0:
            self._fast("write", data=_OFF.pack(off) + m)
        else:
            self._call("write", off, None, payload=[data])

    def locked_read(self, lock: RemoteLock, off: int, n: int) -> bytes:
        """``with lock: self.read(off, n)`` in one round trip (``lock`` on this block's
        node, see ``same_node``)."""
        return self._fast("locked_read", data=_lock_prefix(lock) + _RANGE.pack(off, n))

    def locked_write(self, lock: RemoteLock, off: int, data: bytes) -> None:
        """``with lock: self.write(off, data)`` in one round trip."""
        self._fast("locked_write", data=_lock_prefix(lock) + _OFF.pack(off) + data)


class RemoteKv(RemoteObject):
    """A DDict manager's index (``Kv``) of another node. A value read lands in a block of
    this node's pool and is returned as a read-only view of it; a value written goes from the
    writer's buffers into one block of the index's pool."""

    def __init__(self, pool: str, ref: tuple, node: int):
        super().__init__("Kv", pool, tuple(ref), node)

    def put_parts(self, key: bytes, parts) -> None:
        self._call("put_block", bytes(key), payload=_parts_payload(parts))

    def _read(self, op: str, key: bytes):
        found, block = call(self._node, op, "Kv", self._pool, self._ref, (bytes(key),), into=_local_block)
        return memoryview(block).toreadonly() if found else None

    def put_parts_in_range(self, c: int, key: bytes, parts) -> bool:
        """``put_parts`` if checkpoint ``c`` is in the working set (else False, nothing
        stored), in one round trip (a small value through the fast server)."""
        payload = _parts_payload(parts)
        size = sum(memoryview(b).nbytes for b in payload)
        if size <= FAST_SEND_MAX:
            data = b"".join([_CHK.pack(c), key, *payload])
            return self._fast("put_in_range", n=len(key), data=data)
        return self._call("put_block_in_range", bytes(key), c, payload=payload)

    def range_and_get(self, key: bytes):
        """(``chkpt_range()``, ``get(key)``) in one round trip; the value lands in a block
        of this node."""
        rng, block = self._fast("range_and_get", data=key, local_pool=_local_pool())
        return rng, None if block is None else memoryview(block).toreadonly()

    def get(self, key: bytes):
        return self._read("get", key)

    def take(self, key: bytes):
        return self._read("take", key)

    def contains(self, key: bytes) -> bool:
        return self._call("contains", bytes(key))

    def rekey(self, old: bytes, new: bytes) -> bool:
        return self._call("rekey", bytes(old), bytes(new))

    def chkpt_range(self) -> tuple:
        return tuple(self._call("chkpt_range"))

    def changes(self) -> int:
        return self._call("changes")

    def wait_change(self, seen: int, timeout: float) -> bool:
        """Sleeps on the manager's node (one round trip) until the index changed since
        ``seen``, at most ``timeout`` seconds."""
        return self._call("wait_change", int(seen), float(timeout))

    def set_chkpt_range(self, oldest: int, newest: int) -> None:
        self._call("set_chkpt_range", oldest, newest)

    def remove(self, key: bytes) -> bool:
        return self._call("remove", bytes(key))

    def keys(self) -> list:
        return self._call("keys")

    def clear(self) -> None:
        self._call("clear")

    def __len__(self) -> int:
        return self._call("len")

    def set_frozen(self, yes: bool) -> None:
        self._call("set_frozen", bool(yes))

    def frozen(self) -> bool:
        return self._call("frozen")

    def stats(self) -> dict:
        return self._call("stats")

    def destroy(self) -> None:
        self._call("destroy")

    def detach(self) -> None:
        """Nothing is attached here (the index lives on its node)."""


def make_manager(node: int, pool_name: str) -> tuple[tuple, tuple]:
    """Makes a DDict manager's index and checkpoint lock in the pool ``pool_name`` of node
    ``node`` (made there by its agent); returns their refs."""
    kv_ref, lock_ref = call(node, "make_manager", "Pool", pool_name, (0, 0, 0, 0))[0]
    return tuple(kv_ref), tuple(lock_ref)


_LOCK = struct.Struct("<BQQQIH")
_LOCK_KINDS = {"Lock": 2, "Semaphore": 4, "BoundedSemaphore": 5}


def _lock_prefix(lock: RemoteLock) -> bytes:
    """How a fused call names its lock (``py/src/objfast/calls.rs: lock_of``)."""
    p = lock._pool.encode()
    return _LOCK.pack(_LOCK_KINDS[lock._kind], *lock._ref, len(p)) + p


def same_node(lock, ch) -> bool:
    """Whether ``lock`` (a native lock or semaphore) and ``ch`` (a channel, or the block of a
    ``Value``/``Array``) are objects of one other node, so that a fused call can use both."""
    return (
        isinstance(lock, RemoteLock)
        and isinstance(ch, (RemoteChannel, RemoteBlock))
        and lock._node == ch._node
        and lock._kind in _LOCK_KINDS
    )


def _local_block(_value, n: int):
    """A new block of ``n`` bytes in this node's pool, for a reply's payload."""
    from dragon._runtime import node_pool

    return node_pool().alloc(n)


def _parts_payload(parts) -> list:
    """The buffers of one block in the parts layout (``dragon._parts``), without copying."""
    views = [memoryview(p).cast("B") for p in parts]
    payload = [parts_header([len(v) for v in views])]
    for v in views:
        payload.append(v)
        pad = -len(v) % 64
        if pad:
            payload.append(b"\0" * pad)
    return payload


_PROXIES = {
    "Channel": RemoteChannel,
    "Event": RemoteEvent,
    "Lock": RemoteLock,
    "RLock": RemoteLock,
    "Semaphore": RemoteLock,
    "BoundedSemaphore": RemoteLock,
    "Barrier": RemoteBarrier,
}


def _after_fork() -> None:
    """A forked child shares its parent's sockets: it forgets them (and the node table)
    without closing them, and opens its own."""
    _table.clear()
    _fast.clear()
    _conns.__dict__.clear()


os.register_at_fork(after_in_child=_after_fork)
