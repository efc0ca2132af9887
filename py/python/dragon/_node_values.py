"""Shared memory of the "dragon" start method on a runtime of several nodes
(``dragon._mp_nodes``): ``Value``, ``Array``, ``RawValue``, ``RawArray`` as native
``Value``/``Array`` in CPython's ``Synchronized*`` wrappers, and ``heap.BufferWrapper`` over a
native block; on another node each access reads or writes the bytes through its node's
server."""

from __future__ import annotations

import ctypes
import sys
from multiprocessing import context, sharedctypes

from dragon.native.array import Array as _NArray
from dragon.native.value import Value as _NValue


class _RemoteView:
    """Items of another node's block, read and written one at a time through its node's
    server: what ``BufferWrapper.create_memoryview()`` gives on another node."""

    def __init__(self, block, size: int, fmt: str = "B"):
        import struct

        self._block, self._size, self._fmt = block, size, fmt
        self._item = struct.Struct(fmt)

    def cast(self, fmt: str) -> _RemoteView:
        return _RemoteView(self._block, self._size, fmt)

    def __len__(self) -> int:
        return self._size // self._item.size

    def _off(self, i: int) -> int:
        return range(len(self))[i] * self._item.size

    def __getitem__(self, i: int):
        return self._item.unpack(self._block.read(self._off(i), self._item.size))[0]

    def __setitem__(self, i: int, v) -> None:
        self._block.write(self._off(i), self._item.pack(v))


class BufferWrapper:
    """``multiprocessing.heap.BufferWrapper`` (shared bytes, CPython's private arena kept by
    descriptor) over a native block, picklable to any node: on its own node
    ``create_memoryview()`` is a memoryview of the block, on another a ``_RemoteView``."""

    def __init__(self, size: int):
        if size < 0:
            raise ValueError(f"Size {size:n} out of range")
        if sys.maxsize <= size:
            raise OverflowError(f"Size {size:n} too large")
        from dragon.native.array import Array as _Array

        self._size = size
        self._arr = _Array("B", max(1, size), lock=False)

    def create_memoryview(self):
        a = self._arr
        if a._obj is not None:
            return memoryview(a._obj).cast("B")[: self._size]
        return _RemoteView(a._block, self._size)


# ----- shared values --------------------------------------------------------------------------


class _NoLock:
    """Raw shared objects have no lock and no ``get_obj`` (as CPython's raw ctypes objects):
    reading the attribute raises AttributeError."""

    def __get__(self, obj, cls=None):
        raise AttributeError("a raw shared object has no lock")


class _RawValue(_NValue):
    """A shared value without a lock (a native Value; the fields of a Structure read and
    written as attributes, from every node)."""

    get_lock = get_obj = acquire = release = _NoLock()

    def __init__(self, typecode_or_type, *args):
        super().__init__(typecode_or_type, None, lock=False)
        if args:
            tmp = self._ctype(*args)
            ctypes.memmove(ctypes.addressof(self._obj), ctypes.addressof(tmp), ctypes.sizeof(tmp))

    def _field(self, name: str):
        ct = self.__dict__.get("_ctype")
        if ct is not None and issubclass(ct, ctypes.Structure) and any(f[0] == name for f in ct._fields_):
            return getattr(ct, name)
        return None

    def __getattr__(self, name):
        if name.startswith("_") or self._field(name) is None:
            raise AttributeError(name)
        obj = self.__dict__["_obj"]
        return getattr(obj if obj is not None else self._remote_load(), name)

    def __setattr__(self, name, v) -> None:
        f = None if name.startswith("_") else self._field(name)
        if f is None:
            object.__setattr__(self, name, v)
        elif self._obj is not None:
            setattr(self._obj, name, v)
        else:
            obj = self._remote_load()
            setattr(obj, name, v)
            self._remote_store(obj, f.offset, f.size)


class _RawArray(_NArray):
    """A shared array without a lock (a native Array)."""

    get_lock = get_obj = acquire = release = _NoLock()


def RawValue(typecode_or_type, *args):
    """A shared value without a lock, usable from every node."""
    return _RawValue(typecode_or_type, *args)


def RawArray(typecode_or_type, size_or_initializer):
    """A shared array without a lock, usable from every node."""
    return _RawArray(typecode_or_type, size_or_initializer, lock=False)


def _wrap(obj, lock):
    """CPython's synchronized wrapper class for ``obj`` (picklable to any node)."""
    if isinstance(obj, _NArray):
        cls = SynchronizedString if obj._item is ctypes.c_char else SynchronizedArray
    elif issubclass(obj._ctype, ctypes.Structure):
        cls = _struct_class(obj._ctype)
    else:
        cls = Synchronized
    return cls(obj, lock)


def _reduce_sync(self):
    return _wrap, (self._obj, self._lock)


def _fused(sync):
    """(native semaphore, block) when ``sync``'s object and lock live on one other node and
    this thread does not hold the lock: "take the lock, read or write, give it back" is then
    one call there (``RemoteBlock.locked_read``/``locked_write``); else None."""
    from dragon import _remote

    obj, sl = sync._obj, getattr(sync._lock, "_semlock", None)
    if sl is None or obj._obj is not None or sl._is_mine():
        return None
    sem = sl._sem
    return (sem, obj._block) if _remote.same_node(sem, obj._block) else None


_value = sharedctypes.Synchronized.value  # CPython's property: the lock around each access


def _get_value(self):
    f = _fused(self)
    if f is None:
        return _value.fget(self)
    ct = self._obj._ctype
    return ct.from_buffer_copy(f[1].locked_read(f[0], 0, ctypes.sizeof(ct))).value


def _set_value(self, v) -> None:
    f = _fused(self)
    if f is None:
        _value.fset(self, v)
        return
    tmp = self._obj._ctype()
    tmp.value = v  # converted (or refused) as CPython's assignment does, before any call
    f[1].locked_write(f[0], 0, bytes(tmp))


def _get_item(self, i):
    f = _fused(self) if isinstance(i, int) else None
    if f is None:
        return sharedctypes.SynchronizedArray.__getitem__(self, i)
    a = self._obj
    size, i = ctypes.sizeof(a._item), range(a._length)[i]
    return a._item.from_buffer_copy(f[1].locked_read(f[0], i * size, size)).value


def _set_item(self, i, v) -> None:
    f = _fused(self) if isinstance(i, int) else None
    if f is None:
        sharedctypes.SynchronizedArray.__setitem__(self, i, v)
        return
    a = self._obj
    i = range(a._length)[i]
    tmp = (a._item * 1)()
    tmp[0] = v  # converted as the array's own item assignment
    f[1].locked_write(f[0], i * ctypes.sizeof(a._item), bytes(tmp))


def _sync_class(base, **ns):
    ns.update({"__reduce__": _reduce_sync, "__module__": __name__})
    cls = type(base.__name__, (base,), ns)
    cls.__qualname__ = base.__name__
    return cls


# CPython's wrappers; on another node than their object, one access (lock, bytes, unlock) is
# one call where the object lives.
Synchronized = _sync_class(sharedctypes.Synchronized, value=property(_get_value, _set_value))
_ITEMS = {"__getitem__": _get_item, "__setitem__": _set_item}
SynchronizedArray = _sync_class(sharedctypes.SynchronizedArray, **_ITEMS)
SynchronizedString = _sync_class(sharedctypes.SynchronizedString, **_ITEMS)
_STRUCT_CLASSES: dict = {}


def _struct_class(ct):
    """As sharedctypes.synchronized does for a Structure: a property per field."""
    cls = _STRUCT_CLASSES.get(ct)
    if cls is None:
        d = {f[0]: sharedctypes.make_property(f[0]) for f in ct._fields_}
        d["__reduce__"] = _reduce_sync
        cls = _STRUCT_CLASSES[ct] = type("Synchronized" + ct.__name__, (sharedctypes.SynchronizedBase,), d)
    return cls


def _lock_for(lock, ctx):
    if lock in (True, None):
        return (ctx or context._default_context.get_context()).RLock()
    if not hasattr(lock, "acquire"):
        raise AttributeError(f"{lock!r} has no method 'acquire'")
    return lock


def Value(typecode_or_type, *args, lock=True, ctx=None):
    """A synchronized shared value (CPython's wrapper over a native Value)."""
    obj = RawValue(typecode_or_type, *args)
    if lock is False:
        return obj
    return _wrap(obj, _lock_for(lock, ctx))


def Array(typecode_or_type, size_or_initializer, *, lock=True, ctx=None):
    """A synchronized shared array (CPython's wrapper over a native Array)."""
    obj = RawArray(typecode_or_type, size_or_initializer)
    if lock is False:
        return obj
    return _wrap(obj, _lock_for(lock, ctx))
