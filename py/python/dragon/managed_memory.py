"""DragonHPC's ``dragon.managed_memory``: ``MemoryPool`` and ``MemoryAlloc`` over our heap
pool segments (``dragon._native.Pool`` / ``Block``).

* A ``MemoryPool(size, fname, uid)`` is the pool segment ``/dragon-<rt>-<node>-pool-<uid>``
  of the current runtime (an embedded one is started when there is none); ``attach_default``
  is the node pool the runtime made. Another process of the node attaches from
  ``serialize()`` (bytes; ``dragon.utils.B64`` makes them a string) or from the pickled
  object. Our pool's name goes when ``destroy()`` is called, or when the creating process
  lets go of it (it exits, or drops every handle without ``destroy``): the runtime never
  leaves a segment behind, where DragonHPC keeps such a pool until ``destroy``.
* A ``MemoryAlloc`` is one allocation. As in DragonHPC it lives until ``free()`` (by any
  process), not until its handles go: the allocation carries a hold that belongs to no
  process (``Block.keep``), released by ``free``. Each handle (the creator's, every
  attached one) also holds the block while it lives, so ``free`` never pulls memory from
  under a view in use; the bytes go with the last of them.
"""

from __future__ import annotations

import enum
import os

from dragon import _native
from dragon.dtypes import DragonException
from dragon.exceptions import DragonError

DRAGON_MEMORY_DEFAULT_TIMEOUT = 300
_SER = "drs1"


class DragonMemoryError(DragonException):
    """A managed-memory operation failed: ``DragonMemoryError(lib_err, msg)``."""

    def __init__(self, lib_err, msg):
        super().__init__(msg, lib_err)


class DragonMemoryTypeError(DragonMemoryError, TypeError):
    """A serialized descriptor that does not describe an allocation."""


class DragonPoolError(DragonMemoryError):
    """A pool operation failed."""

    @enum.unique
    class Errors(enum.Enum):
        SUCCESS = 0
        FAIL = 1
        CREATE_FAIL = 2
        ATTACH_FAIL = 3


class DragonPoolCreateFail(DragonPoolError):
    """The pool could not be made (its m_uid is taken, a bad size, GPU memory)."""


class DragonPoolAttachFail(DragonPoolError):
    """The serialized pool could not be attached (destroyed, malformed, another node)."""


class DragonPoolDetachFail(DragonPoolError):
    """The pool could not be detached."""


class DragonPoolAllocationNotAvailable(DragonPoolError):
    """No room for the allocation now."""


class PoolType(enum.Enum):
    """Kinds of pool memory; ours are all POSIX shared memory (``SHM``)."""

    SHM = 0
    FILE = 1
    HUGEPAGE = 2
    GPU = 3
    PRIVATE = 4


class AllocType(enum.Enum):
    """What an allocation is for; accepted and not recorded (our pool keeps no manifest)."""

    DATA = 0
    CHANNEL = 1
    CHANNEL_BUFFER = 2
    BOOTSTRAP = 3


# One native handle per pool name and process, so attaching is cheap (a pool segment is
# mapped once); a destroyed or detached pool leaves the table.
_open: dict[str, _native.Pool] = {}


def _here() -> tuple[int, int]:
    """(runtime id, node) of this process's runtime, starting an embedded one if needed."""
    from dragon import _runtime

    _runtime.node_pool()
    rt, node, _ = _runtime.parse_env(os.environ[_runtime.RUNTIME_ENV])
    return rt, node


def _native_pool(name: str) -> _native.Pool:
    p = _open.get(name)
    if p is None:
        p = _open[name] = _native.Pool.open(name)
    return p


def _muid_of(name: str) -> int:
    return int(name.rsplit("-", 1)[1])


def _parse(ser, kind: str, n: int, exc) -> list[str]:
    try:
        parts = bytes(ser).decode("ascii").split(":")
    except (TypeError, UnicodeDecodeError):
        parts = []
    if len(parts) != n + 2 or parts[0] != _SER or parts[1] != kind:
        raise exc(
            "DRAGON_INVALID_ARGUMENT", f"not a serialized Dragon-RS {kind} descriptor: {bytes(ser)[:64]!r}"
        )
    return parts[2:]


class MemoryAlloc:
    """One allocation of a ``MemoryPool`` (or a view of part of it, from ``clone``)."""

    __slots__ = ("_pool_name", "_block", "_ref", "_off", "_len", "__weakref__")

    def __init__(self):
        self._block = None

    @classmethod
    def _make(cls, pool_name, block, off, length):
        m = cls.__new__(cls)
        m._pool_name = pool_name
        m._block = block
        m._ref = block.ref
        m._off = off
        m._len = length
        return m

    def _live(self):
        if self._block is None:
            raise DragonMemoryError(
                "DRAGON_OBJECT_DESTROYED", "the allocation was freed or detached by this handle"
            )
        return self._block

    def get_memview(self) -> memoryview:
        """A writable memoryview of the allocation's bytes (no copy)."""
        return memoryview(self._live())[self._off : self._off + self._len]

    def get_int_ptr(self) -> int:
        """The address of the allocation's first byte in this process."""
        import ctypes

        view = self.get_memview()
        if view.readonly or self._len == 0:
            raise DragonMemoryError("DRAGON_INVALID_OPERATION", "no address for an empty allocation")
        return ctypes.addressof(ctypes.c_char.from_buffer(view))

    def serialize(self) -> bytes:
        """A descriptor another process of the node attaches with ``MemoryAlloc.attach``."""
        s, o, n, g = self._ref
        return f"{_SER}:mem:{self._pool_name}:{s}:{o}:{n}:{g}:{self._off}:{self._len}".encode()

    @classmethod
    def attach(cls, ser_bytes) -> MemoryAlloc:
        """The allocation a serialized descriptor names (DragonMemoryTypeError when it is not
        one; DragonMemoryError when it was freed or its pool destroyed)."""
        pool_name, s, o, n, g, off, length = _parse(ser_bytes, "mem", 7, DragonMemoryTypeError)
        try:
            block = _native.Block.attach(_native_pool(pool_name), (int(s), int(o), int(n), int(g)))
        except DragonError as e:
            raise DragonMemoryError("DRAGON_MEMORY_ERRNO", f"Could not attach to memory: {e}") from e
        return cls._make(pool_name, block, int(off), int(length))

    def __reduce__(self):
        return (MemoryAlloc.attach, (self.serialize(),))

    def clone(self, offset=0, length=None) -> MemoryAlloc:
        """A handle on the part of this allocation from ``offset`` (``length`` bytes, or to
        the end); the same memory, no copy."""
        if not isinstance(offset, int):
            raise TypeError(f"Allocation offset must be int, got type {type(offset)}")
        if offset < 0:
            raise RuntimeError("Offset cannot be less than 0 for memory allocations")
        if length is not None and not isinstance(length, int):
            raise TypeError(f"Allocation custom length must be int, got type {type(length)}")
        if length is not None and length < 0:
            raise RuntimeError("Length cannot be less than 0 for memory allocations")
        rest = self._len - offset
        if rest < 0 or (length is not None and length > rest):
            raise DragonPoolError("DRAGON_INVALID_ARGUMENT", "Could not clone allocation: range outside it")
        return MemoryAlloc._make(
            self._pool_name, self._live(), self._off + offset, rest if length is None else length
        )

    def detach(self) -> None:
        """Drops this handle's hold (the allocation stays until ``free``)."""
        self._live()
        self._block = None

    def free(self) -> None:
        """Frees the allocation (from any process); its bytes go once no handle holds them.
        Freeing it twice is a DragonMemoryError."""
        self._live()
        try:
            _native_pool(self._pool_name).release_kept(self._ref)
        except DragonError as e:
            raise DragonMemoryError(
                "DRAGON_INVALID_ARGUMENT", f"could not free allocation (freed already?): {e}"
            ) from e
        self._block = None

    def copy(self, pool: MemoryPool, timeout=None) -> MemoryAlloc:
        """A new allocation in ``pool`` holding a copy of these bytes."""
        m = (
            pool.alloc_blocking(max(self._len, 1), timeout=timeout)
            if timeout is not None
            else pool.alloc(self._len)
        )
        m.get_memview()[:] = self.get_memview()
        return m

    def clear(self, start=0, stop=None) -> None:
        """Zeroes bytes ``start``..``stop`` (to the end by default)."""
        view = self.get_memview()
        stop = self._len if stop is None else min(stop, self._len)
        if 0 <= start < stop:
            view[start:stop] = bytes(stop - start)

    @property
    def size(self) -> int:
        """Bytes in the allocation (or the cloned part)."""
        return self._len

    @property
    def id(self) -> int:
        """An identifier unique among the pool's live allocations."""
        s, o, n, g = self._ref
        return (g << 48) ^ o

    @property
    def pool(self) -> MemoryPool:
        """The pool of the allocation."""
        return MemoryPool.attach(f"{_SER}:pool:{self._pool_name}".encode())

    def _key(self):
        return (self._pool_name, self._ref, self._off, self._len)

    def __hash__(self) -> int:
        return hash(self._key())

    def __eq__(self, other) -> bool:
        if not isinstance(other, MemoryAlloc):
            return NotImplemented
        return self._key() == other._key()

    def is_the_same_as(self, other: MemoryAlloc) -> bool:
        """Whether both handles are the same bytes of the same allocation."""
        if not isinstance(other, MemoryAlloc):
            raise DragonMemoryError(
                "DRAGON_INVALID_OPERATION", "Cannot compare MemoryAlloc with value of different type."
            )
        return self._key() == other._key()

    def __repr__(self) -> str:
        return f"<MemoryAlloc {self._pool_name} offset={self._ref[1]}+{self._off} size={self._len}>"


class MemoryPool:
    """A pool of shared memory: ``MemoryPool(size, fname, uid)`` makes one of at least
    ``size`` usable bytes with m_uid ``uid``; ``MemoryPool.attach(ser)`` opens one."""

    def __init__(
        self,
        size,
        fname,
        uid,
        pre_alloc_blocks=None,
        min_block_size=None,
        max_allocations=None,
        gpu_memory=False,
        numa_node=-1,
    ):
        if not isinstance(size, int):
            raise TypeError(f"Pool size must be int, got type {type(size)}")
        if not isinstance(uid, int):
            raise TypeError(f"Pool uid must be int, got type {type(uid)}")
        if not isinstance(fname, str):
            raise TypeError(f"Pool file name must be str, got type {type(fname)}")
        if gpu_memory:
            raise DragonPoolCreateFail(
                "DRAGON_NOT_IMPLEMENTED", "GPU memory pools are not supported by Dragon-RS"
            )
        if size < 1:
            raise DragonPoolCreateFail("DRAGON_INVALID_ARGUMENT", f"Could not create pool: size {size} < 1")
        if not 0 < uid < 2**64:
            raise DragonPoolCreateFail(
                "DRAGON_INVALID_ARGUMENT", f"Could not create pool: m_uid {uid} not in 1..2**64-1"
            )
        rt, node = _here()
        name = _native.segment_name(rt, node, "pool", uid)
        # The segment also holds the pool's headers and hold tables (about 1/32 of it).
        total = size + size // 16 + (1 << 20)
        try:
            pool = _native.Pool.create(name, total)
        except FileExistsError:
            raise DragonPoolCreateFail(
                "DRAGON_MEMORY_POOL_EXISTS", f"Could not create pool: m_uid {uid} is taken"
            ) from None
        except (DragonError, OSError) as e:
            raise DragonPoolCreateFail("DRAGON_FAILURE", f"Could not create pool: {e}") from e
        _open[name] = pool
        self._setup(pool, fname)

    def _setup(self, pool, fname=None):
        self._pool = pool
        self._name = pool.name
        self._muid = _muid_of(pool.name)
        self._fname = fname if fname is not None else pool.name

    @classmethod
    def create(cls, size, fname, uid, **kwargs) -> MemoryPool:
        """The same as ``MemoryPool(size, fname, uid, ...)``."""
        return cls(size, fname, uid, **kwargs)

    @classmethod
    def empty_pool(cls) -> MemoryPool:
        """A pool object attached to nothing."""
        mp = cls.__new__(cls)
        mp._pool = None
        mp._name = mp._fname = ""
        mp._muid = 0
        return mp

    @classmethod
    def attach(cls, pool_ser, *, existing_memory_pool=None) -> MemoryPool:
        """The pool a serialized descriptor names (DragonPoolAttachFail when it is gone)."""
        if len(pool_ser) == 0:
            raise ValueError("Zero length serialized pool descriptor cannot be attached.")
        if existing_memory_pool is not None and not isinstance(existing_memory_pool, MemoryPool):
            raise TypeError(f"Unsupported {type(existing_memory_pool)} != MemoryPool")
        (name,) = _parse(pool_ser, "pool", 1, DragonPoolAttachFail)
        try:
            pool = _native_pool(name)
        except (DragonError, OSError) as e:
            raise DragonPoolAttachFail(
                "DRAGON_MEMORY_ERRNO", f"Could not attach to serialized pool {name}: {e}"
            ) from e
        mp = existing_memory_pool if existing_memory_pool is not None else cls.__new__(cls)
        mp._setup(pool)
        return mp

    @classmethod
    def attach_default(cls) -> MemoryPool:
        """This node's default pool (the runtime's node pool)."""
        from dragon import _runtime

        mp = cls.__new__(cls)
        pool = _runtime.node_pool()
        _open.setdefault(pool.name, pool)
        mp._setup(pool)
        return mp

    @classmethod
    def make_process_local(
        cls, name, size, min_block_size=None, pre_allocs=None, timeout=None, gpu_memory=False
    ):
        """A pool that lives as long as this process (m_uid from the node agent)."""
        if timeout is not None and (not isinstance(timeout, int | float) or timeout < 0):
            raise ValueError("make_process_local timeout must be a float or int >= 0")
        from dragon import _runtime

        uid = _runtime.agent().new_id("m_uid")
        return cls(size, str(name), uid, gpu_memory=gpu_memory)

    @classmethod
    def serialized_uid_fname(cls, pool_ser) -> tuple[int, str]:
        """(m_uid, segment name) of a serialized pool."""
        (name,) = _parse(pool_ser, "pool", 1, DragonPoolError)
        return _muid_of(name), name

    def _live(self):
        if self._pool is None:
            raise DragonPoolError(
                "DRAGON_OBJECT_DESTROYED", f"the pool {self._name or ''} was destroyed or detached"
            )
        return self._pool

    def destroy(self) -> None:
        """Destroys the pool: its name goes now (from any process); memory still mapped by
        handles stays valid until they go."""
        pool = self._live()
        try:
            pool.unlink()
        except FileNotFoundError:
            raise DragonPoolError(
                "DRAGON_OBJECT_DESTROYED", f"Could not destroy pool {self._name}: gone already"
            ) from None
        finally:
            if _open.get(self._name) is pool:
                del _open[self._name]
            self._pool = None

    def detach(self, serialize=False) -> None:
        """Lets go of the pool (it stays until destroyed)."""
        if serialize:
            self.serialize()
        self._live()
        self._pool = None

    def serialize(self) -> bytes:
        """A descriptor another process of the node attaches with ``MemoryPool.attach``."""
        return f"{_SER}:pool:{self._name}".encode()

    def __reduce__(self):
        return (MemoryPool.attach, (self.serialize(),))

    def _alloc(self, size, timeout, alloc_type, blocking):
        if alloc_type is not None and type(alloc_type) is not AllocType:
            raise DragonMemoryError(
                "DRAGON_INVALID_ARGUMENT", "alloc_type must be None or of type AllocType."
            )
        if not isinstance(size, int):
            raise TypeError(f"Allocation size must be int, got type {type(size)}")
        if size < (1 if blocking else 0):
            raise RuntimeError(f"Size cannot be less than {1 if blocking else 0} for memory allocations")
        pool = self._live()
        try:
            block = pool.alloc(max(size, 1), timeout)
            block.keep()
        except TimeoutError:
            raise TimeoutError("The blocking allocation timed out") from None
        except (MemoryError, ValueError) as e:
            raise DragonPoolAllocationNotAvailable(
                "DRAGON_DYNHEAP_REQUESTED_SIZE_NOT_AVAILABLE",
                f"An allocation of size={size} is not available: {e}",
            ) from None
        return MemoryAlloc._make(self._name, block, 0, size)

    def alloc(self, size, alloc_type=None) -> MemoryAlloc:
        """Allocates ``size`` bytes now (DragonPoolAllocationNotAvailable when there is no
        room)."""
        return self._alloc(size, None, alloc_type, False)

    def alloc_blocking(self, size, timeout=None, alloc_type=None) -> MemoryAlloc:
        """Allocates ``size`` bytes, waiting up to ``timeout`` seconds (None: forever) for
        room (TimeoutError)."""
        if timeout is not None:
            if not isinstance(timeout, int | float):
                raise ValueError("receive timeout must be a float or int")
            if timeout < 0:
                raise ValueError("Cannot provide timeout < 0 to alloc_blocking operation")
        return self._alloc(size, timeout if timeout is not None else 1e9, alloc_type, True)

    def alloc_from_bytes(self, bytes_object) -> MemoryAlloc:
        """A new allocation holding a copy of ``bytes_object``."""
        m = self.alloc(len(bytes_object))
        m.get_memview()[:] = bytes_object
        return m

    @property
    def is_local(self) -> bool:
        """Pools are memory of this node."""
        return True

    @property
    def muid(self) -> int:
        """The pool's m_uid (its segment id)."""
        return self._muid

    @property
    def rt_uid(self) -> int:
        """The id of the runtime the pool belongs to."""
        return int(self._name.split("-")[1], 16)

    @property
    def free_space(self) -> int:
        """Bytes not allocated."""
        used, cap = self._live().usage()
        return cap - used

    @property
    def size(self) -> int:
        """Bytes allocations can use in all."""
        return self._live().usage()[1]

    @property
    def utilization(self) -> float:
        """Percent of the pool allocated."""
        used, cap = self._live().usage()
        return 100.0 * used / cap if cap else 0.0

    @property
    def current_allocations(self) -> int:
        """Allocated blocks."""
        s = self._live().stats()
        return s["blocks"] - s["free_blocks"]

    @property
    def name(self) -> str:
        """The pool's segment name."""
        return self._name

    def __repr__(self) -> str:
        return f"<MemoryPool {self._name} muid={self._muid}>"
