"""Shared ctypes storage in pool blocks: the base of ``Value`` and ``Array``."""

from __future__ import annotations

import ctypes

from dragon import _native
from dragon._remote import RemoteBlock, node_of_pool
from dragon._runtime import node_pool

TYPECODES = {
    "c": ctypes.c_char,
    "u": ctypes.c_wchar,
    "b": ctypes.c_byte,
    "B": ctypes.c_ubyte,
    "h": ctypes.c_short,
    "H": ctypes.c_ushort,
    "i": ctypes.c_int,
    "I": ctypes.c_uint,
    "l": ctypes.c_long,
    "L": ctypes.c_ulong,
    "q": ctypes.c_longlong,
    "Q": ctypes.c_ulonglong,
    "f": ctypes.c_float,
    "d": ctypes.c_double,
}


def ctype_of(typecode_or_type):
    """The ctypes type for a typecode ('i', 'd', ...) or a ctypes type."""
    if isinstance(typecode_or_type, str):
        try:
            return TYPECODES[typecode_or_type]
        except KeyError:
            raise TypeError(f"bad typecode {typecode_or_type!r} (one of {''.join(TYPECODES)})") from None
    if isinstance(typecode_or_type, type) and issubclass(
        typecode_or_type, ctypes._SimpleCData | ctypes.Structure
    ):
        return typecode_or_type
    raise TypeError(f"not a typecode or ctypes type: {typecode_or_type!r}")


class SharedCtype:
    """A ctypes object living in a block of the node pool; pickles to an attach recipe. On
    another node it is reached through that node's object server (``dragon._remote``): each
    read fetches the object's bytes, each write stores the bytes it changed."""

    def __init__(self, ctype, lock, length=None):
        # Array types (item * n) do not pickle: keep (item, n) and rebuild.
        self._item, self._length = (ctype, None) if length is None else (ctype, length)
        if length is not None:
            ctype = ctype * length
        pool = node_pool()
        self._pool_name = pool.name
        self._block = pool.alloc(max(1, ctypes.sizeof(ctype)))
        memoryview(self._block)[:] = b"\0" * len(self._block)
        self._ctype = ctype
        self._obj = ctype.from_buffer(memoryview(self._block)[: ctypes.sizeof(ctype)])
        if lock is True:
            lock = _native.RLock(pool)
        self._lock = lock or None

    def __getstate__(self):
        return {
            "pool": self._pool_name,
            "ref": self._block.ref,
            "item": self._item,
            "length": self._length,
            "lock": self._lock,
        }

    def __setstate__(self, st):
        self._pool_name = st["pool"]
        self._item, self._length = st["item"], st["length"]
        self._ctype = self._item if self._length is None else self._item * self._length
        self._lock = st["lock"]
        node = node_of_pool(st["pool"])
        if node is not None:  # made on another node: read and written through its server
            self._block = RemoteBlock(st["pool"], st["ref"], node)
            self._obj = None
            return
        self._block = _native.Block.attach(_native.Pool.open(st["pool"]), st["ref"])
        self._obj = self._ctype.from_buffer(memoryview(self._block)[: ctypes.sizeof(self._ctype)])

    # Another node's object: byte ranges of the block, fetched or stored per access.

    def _remote_load(self):
        """The whole object, copied from its node."""
        return self._ctype.from_buffer_copy(self._block.read(0, ctypes.sizeof(self._ctype)))

    def _remote_store(self, obj, off: int = 0, n: int | None = None) -> None:
        """Stores bytes ``off .. off + n`` of ``obj`` (a ctypes object of the same type)."""
        raw = memoryview(obj).cast("B")
        self._block.write(off, raw[off : len(raw) if n is None else off + n])

    def acquire(self, *args) -> bool:
        """Takes the object's lock (RuntimeError when it has none)."""
        if self._lock is None:
            raise RuntimeError("this object has no lock")
        return self._lock.acquire(*args)

    def release(self) -> None:
        """Releases the object's lock."""
        if self._lock is None:
            raise RuntimeError("this object has no lock")
        self._lock.release()

    def get_lock(self):
        """The lock (None when created with ``lock=False``)."""
        return self._lock

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
