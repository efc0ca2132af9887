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
  process (``Block.keep``), released by ``free``; handles and their views hold only the
  pool's mapping (so a view stays safe to touch, and a view used after ``free`` sees what
  the pool puts there next, as DragonHPC's does). A process that exits holds nothing.
"""

from __future__ import annotations

import ctypes
import enum
import os
import time

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


# A user's m_uid names the segment id USER_MUID_BASE + m_uid, so user pools never meet the
# runtime's own (the node pool is 1, the agent's pools count from 2**32): DragonHPC's
# examples and tests make pools with m_uid 1.
USER_MUID_BASE = 1 << 63


def _muid_of(name: str) -> int:
    sid = int(name.rsplit("-", 1)[1])
    return sid - USER_MUID_BASE if sid >= USER_MUID_BASE else sid


def _segment_size(size: int) -> int:
    """The segment size whose heap holds ``size`` bytes in one allocation: the segment also
    holds the pool's header, process table and two hold tables of 16-byte entries (one per
    KiB of segment, at least 4096, rounded up to a power of two), and each block a 64-byte
    header (py/tests/test_lower_memory.py checks the result)."""
    want = size + 128
    total = want
    for _ in range(8):
        slots = 1 << (max(total // 1024, 4096) - 1).bit_length()
        nxt = want + 32 * slots + 9088
        if nxt == total:
            break
        total = nxt
    return total


def alloc_block(pool: _native.Pool, size: int, timeout: float | None) -> _native.Block:
    """A block of ``size`` bytes of ``pool``, now (``timeout`` None) or within ``timeout``
    seconds. When there is no room it first releases the holds of processes that ended
    (``Pool.sweep``; the node agent sweeps only its node pool): a process that attached an
    allocation and exited without letting go must not keep it after ``free()``."""
    try:
        return pool.alloc(size, None)
    except MemoryError:
        if pool.sweep():
            try:
                return pool.alloc(size, None)
            except MemoryError:
                pass
        if timeout is None or timeout <= 0:
            raise
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        try:
            return pool.alloc(size, max(min(left, 0.25), 0.0))
        except TimeoutError:
            if pool.sweep():
                continue
            if time.monotonic() >= deadline:
                raise


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

    __slots__ = ("_pool_name", "_npool", "_ref", "_addr", "_off", "_len", "_ok", "__weakref__")

    def __init__(self):
        self._ok = False

    @classmethod
    def _make(cls, pool_name, npool, ref, addr, off, length):
        m = cls.__new__(cls)
        m._pool_name = pool_name
        m._npool = npool  # keeps the pool mapped while the handle (or a view) lives
        m._ref = ref
        m._addr = addr
        m._off = off
        m._len = length
        m._ok = True
        return m

    @classmethod
    def _of_block(cls, pool_name, npool, block, off, length):
        view = memoryview(block)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(view))
        return cls._make(pool_name, npool, block.ref, addr, off, length)

    def _check(self):
        if not self._ok:
            raise DragonMemoryError(
                "DRAGON_OBJECT_DESTROYED", "the allocation was freed or detached by this handle"
            )

    def _hold(self) -> _native.Block:
        """A hold on the whole block (DragonMemoryError when it was freed meanwhile)."""
        self._check()
        try:
            return _native.Block.attach(self._npool, self._ref)
        except DragonError as e:
            raise DragonMemoryError("DRAGON_INVALID_ARGUMENT", f"the allocation was freed: {e}") from e

    def get_memview(self) -> memoryview:
        """A writable memoryview of the allocation's bytes (no copy). As in DragonHPC, a view
        used after ``free()`` sees whatever the pool puts there next."""
        self._check()
        if self._len == 0:
            return memoryview(bytearray())
        arr = (ctypes.c_ubyte * self._len).from_address(self._addr + self._off)
        arr._pool = self._npool
        return memoryview(arr).cast("B")

    def get_int_ptr(self) -> int:
        """The address of the allocation's first byte in this process."""
        self._check()
        return self._addr + self._off

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
            npool = _native_pool(pool_name)
            block = _native.Block.attach(npool, (int(s), int(o), int(n), int(g)))
        except (DragonError, OSError) as e:
            raise DragonMemoryError("DRAGON_MEMORY_ERRNO", f"Could not attach to memory: {e}") from e
        return cls._of_block(pool_name, npool, block, int(off), int(length))

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
        self._check()
        rest = self._len - offset
        if rest < 0 or (length is not None and length > rest):
            raise DragonPoolError("DRAGON_INVALID_ARGUMENT", "Could not clone allocation: range outside it")
        n = rest if length is None else length
        return MemoryAlloc._make(self._pool_name, self._npool, self._ref, self._addr, self._off + offset, n)

    def detach(self) -> None:
        """Lets go of this handle (the allocation stays until ``free``)."""
        self._check()
        self._ok = False

    def free(self) -> None:
        """Frees the allocation (from any process); its memory goes back to the pool now,
        unless a channel still carries it. Freeing it twice is a DragonMemoryError."""
        self._check()
        try:
            self._npool.release_kept(self._ref)
        except DragonError as e:
            raise DragonMemoryError(
                "DRAGON_INVALID_ARGUMENT", f"could not free allocation (freed already?): {e}"
            ) from e
        self._ok = False

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
        mp = MemoryPool.__new__(MemoryPool)
        mp._setup(self._npool)
        return mp

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


class MemoryAllocations:
    """What ``MemoryPool.get_allocations`` answers: how many allocations the pool holds. Our
    pool keeps no manifest of types and ids, so every allocation is ``AllocType.DATA`` and
    ``alloc_id`` is not known."""

    def __init__(self, num_allocs: int):
        self._n = num_allocs

    @property
    def num_allocs(self) -> int:
        """Number of allocations in the pool."""
        return self._n

    def _check(self, idx):
        if idx < 0 or idx >= self._n:
            raise RuntimeError("Index out of bounds")

    def alloc_type(self, idx) -> AllocType:
        self._check(idx)
        return AllocType.DATA

    def alloc_id(self, idx) -> int:
        self._check(idx)
        raise DragonMemoryError(
            "DRAGON_NOT_IMPLEMENTED", "allocation ids are not recorded by Dragon-RS pools"
        )


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
        if not 0 <= uid < USER_MUID_BASE:
            raise DragonPoolCreateFail(
                "DRAGON_INVALID_ARGUMENT", f"Could not create pool: m_uid {uid} not in 0..2**63-1"
            )
        rt, node = _here()
        name = _native.segment_name(rt, node, "pool", USER_MUID_BASE + uid)
        try:
            pool = _native.Pool.create(name, _segment_size(size))
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
            block = alloc_block(pool, max(size, 1), timeout)
            block.keep()
        except TimeoutError:
            raise TimeoutError("The blocking allocation timed out") from None
        except (MemoryError, ValueError) as e:
            raise DragonPoolAllocationNotAvailable(
                "DRAGON_DYNHEAP_REQUESTED_SIZE_NOT_AVAILABLE",
                f"An allocation of size={size} is not available: {e}",
            ) from None
        return MemoryAlloc._of_block(self._name, pool, block, 0, size)

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
        if timeout == 0:  # DragonHPC: a zero time-out tries once (not a TimeoutError)
            return self._alloc(size, None, alloc_type, True)
        return self._alloc(size, timeout if timeout is not None else 1e9, alloc_type, True)

    def alloc_from_bytes(self, bytes_object) -> MemoryAlloc:
        """A new allocation holding a copy of ``bytes_object``."""
        m = self.alloc(len(bytes_object))
        m.get_memview()[:] = bytes_object
        return m

    def get_allocations(self, alloc_type=None) -> MemoryAllocations:
        """The pool's allocations (every block of it: allocations, channels, messages)."""
        if alloc_type is not None and type(alloc_type) is not AllocType:
            raise DragonMemoryError(
                "DRAGON_INVALID_ARGUMENT", "alloc_type must be None or of type AllocType."
            )
        if alloc_type not in (None, AllocType.DATA):
            return MemoryAllocations(0)
        return MemoryAllocations(self.current_allocations)

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
        return self._live().stats()["blocks"]  # blocks in use

    @property
    def name(self) -> str:
        """The pool's segment name."""
        return self._name

    def __repr__(self) -> str:
        return f"<MemoryPool {self._name} muid={self._muid}>"
