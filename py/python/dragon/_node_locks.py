"""Locks and semaphores of the "dragon" start method on a runtime of several nodes
(``dragon._mp_nodes``): CPython's ``multiprocessing.synchronize`` classes over ``NodeSemLock``,
the interface of ``_multiprocessing.SemLock`` over a native semaphore usable from every node;
``Condition``, ``Event`` and ``Barrier`` are CPython's over them (the barrier's counters in a
native array)."""

from __future__ import annotations

import threading
from multiprocessing import synchronize, util

from dragon import _native, _runtime

# ----- semaphores and locks -------------------------------------------------------------------

RECURSIVE_MUTEX, SEMAPHORE = synchronize.RECURSIVE_MUTEX, synchronize.SEMAPHORE
SEM_VALUE_MAX = synchronize.SEM_VALUE_MAX


class NodeSemLock:
    """``_multiprocessing.SemLock``'s interface over a native semaphore, usable from every
    node. As in CPython, who holds it and how often (``_count``, ``_is_mine``) is state of
    this process's handle; the shared state is the semaphore's value."""

    def __init__(self, kind: int, value: int, maxvalue: int, sem=None):
        if sem is None and value < 0:
            raise ValueError("semaphore initial value must be >= 0")
        self.kind, self.maxvalue = kind, maxvalue
        if sem is None:
            # A bounded kind (Lock, RLock, BoundedSemaphore: value == maxvalue) is a native
            # BoundedSemaphore, whose release checks the bound itself: one call, not two, on
            # another node.
            bounded = maxvalue == value and maxvalue != SEM_VALUE_MAX
            cls = _native.BoundedSemaphore if bounded else _native.Semaphore
            sem = cls(_runtime.node_pool(), value)
        self._sem = sem
        self._bounded = getattr(sem, "_kind", type(sem).__name__) == "BoundedSemaphore"
        self._n = 0
        self._tid = None
        self.name = None
        self.handle = None

    def _is_mine(self) -> bool:
        return self._n > 0 and self._tid == threading.get_ident()

    def _count(self) -> int:
        return self._n

    def _get_value(self) -> int:
        return self._sem.get_value()

    def _is_zero(self) -> bool:
        return self._sem.get_value() == 0

    def _after_fork(self) -> None:
        self._n = 0

    def acquire(self, block: bool = True, timeout: float | None = None) -> bool:
        if self.kind == RECURSIVE_MUTEX and self._is_mine():
            self._n += 1
            return True
        if timeout is not None and timeout < 0:
            timeout = 0.0
        if not self._sem.acquire(block, timeout if block else None):
            return False
        self._n += 1
        self._tid = threading.get_ident()
        return True

    def release(self) -> None:
        if self.kind == RECURSIVE_MUTEX:
            if not self._is_mine():
                raise AssertionError("attempt to release recursive lock not owned by thread")
            if self._n > 1:
                self._n -= 1
                return
        elif self.maxvalue != SEM_VALUE_MAX and not self._bounded and self._sem.get_value() >= self.maxvalue:
            raise ValueError("semaphore or lock released too many times")
        self._give_back(self._sem.release)

    def _give_back(self, release):
        """Runs ``release()``, a call that releases the semaphore (itself, or fused with other
        work where the semaphore lives), keeping this handle's count. The count drops first:
        on another node the release is a network call during which this process's other
        threads run, and one of them may take the semaphore and set the count for itself."""
        n = self._n
        self._n = max(0, n - 1)
        try:
            return release()
        except ValueError:
            self._n = n
            raise ValueError("semaphore or lock released too many times") from None
        except BaseException:
            self._n = n
            raise

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        return self.release()


def _after_fork(obj) -> None:
    obj._semlock._after_fork()


def _init_semlock(self, kind, value, maxvalue) -> None:
    self._semlock = NodeSemLock(kind, value, maxvalue)
    self._make_methods()
    util.register_after_fork(self, _after_fork)


def _sem_getstate(self):
    sl = self._semlock
    return (sl._sem, sl.kind, sl.maxvalue)


def _sem_setstate(self, state) -> None:
    sem, kind, maxvalue = state
    self._semlock = NodeSemLock(kind, 0, maxvalue, sem)
    self._make_methods()


def _semlock_class(base, init):
    ns = {
        "__init__": init,
        "__getstate__": _sem_getstate,
        "__setstate__": _sem_setstate,
        "__module__": __name__,
    }
    cls = type(base.__name__, (base,), ns)
    cls.__qualname__ = base.__name__
    return cls


Lock = _semlock_class(synchronize.Lock, lambda self, *, ctx=None: _init_semlock(self, SEMAPHORE, 1, 1))
RLock = _semlock_class(
    synchronize.RLock, lambda self, *, ctx=None: _init_semlock(self, RECURSIVE_MUTEX, 1, 1)
)
Semaphore = _semlock_class(
    synchronize.Semaphore,
    lambda self, value=1, *, ctx=None: _init_semlock(self, SEMAPHORE, value, SEM_VALUE_MAX),
)
BoundedSemaphore = _semlock_class(
    synchronize.BoundedSemaphore,
    lambda self, value=1, *, ctx=None: _init_semlock(self, SEMAPHORE, value, value),
)


class Condition(synchronize.Condition):
    """CPython's Condition over this context's lock and semaphores (picklable anywhere)."""

    def __getstate__(self):
        return (self._lock, self._sleeping_count, self._woken_count, self._wait_semaphore)


class Event(synchronize.Event):
    """CPython's Event over this context's Condition and Semaphore."""


class Barrier(synchronize.Barrier):
    """CPython's Barrier; its state and count live in a native array."""

    def __init__(self, parties, action=None, timeout=None, *, ctx):
        from dragon.native.array import Array as _Array

        self.__setstate__((parties, action, timeout, ctx.Condition(), _Array("i", 2, lock=False)))
        self._state = 0
        self._count = 0

    def __setstate__(self, state):
        self._parties, self._action, self._timeout, self._cond, self._wrapper = state

    def __getstate__(self):
        return (self._parties, self._action, self._timeout, self._cond, self._wrapper)

    @property
    def _state(self):
        return self._wrapper[0]

    @_state.setter
    def _state(self, value):
        self._wrapper[0] = value

    @property
    def _count(self):
        return self._wrapper[1]

    @_count.setter
    def _count(self, value):
        self._wrapper[1] = value
