"""DragonHPC's native ``Pool`` of worker processes, each optionally with its own Policy.

Tasks go to the workers through a shared-memory Queue and results come back through another;
a feeder thread and a result thread in the parent keep ``apply_async``/``map_async`` from
blocking. ``policy`` may be one Policy or a list of them; with ``processes_per_policy``
each policy gets that many workers (so each worker can have its own CPU/GPU binding). A
worker that exits (``maxtasksperchild``, or killed) is replaced while the pool is open.
"""

from __future__ import annotations

import itertools
import os
import queue as _stdqueue
import threading
from collections.abc import Callable, Iterable

from dragon.exceptions import DragonTimeoutError
from dragon.infrastructure.policy import Policy
from dragon.native.process import Process
from dragon.native.queue import Queue

_SENTINEL = None


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker (as multiprocessing shows it)."""


def _worker(tasks: Queue, results: Queue, initializer, initargs, maxtasks) -> None:
    if initializer is not None:
        initializer(*initargs)
    done = 0
    while maxtasks is None or done < maxtasks:
        task = tasks.get()
        if task is _SENTINEL:
            break
        job, idx, func, chunk, star = task
        try:
            if star:
                value = (True, [func(*a) for a in chunk])
            else:
                value = (True, [func(a) for a in chunk])
        except BaseException as e:  # noqa: BLE001 - reported to the caller
            import traceback

            e.__cause__ = RemoteTraceback("\n" + traceback.format_exc())
            value = (False, e)
        try:
            results.put((job, idx, value))
        except TypeError as e:  # an unpicklable result: report it instead
            results.put((job, idx, (False, TypeError(f"unpicklable result: {e}"))))
        done += 1
    results.put(("exit", os.getpid(), None))


class AsyncResult:
    """The future result of ``apply_async``/``map_async``."""

    def __init__(self, nchunks: int, callback=None, error_callback=None, single=False):
        self._event = threading.Event()
        self._parts: dict = {}
        self._n = nchunks
        self._error = None
        self._cb, self._ecb, self._single = callback, error_callback, single
        if nchunks == 0:
            self._finish()

    def _set(self, idx: int, value) -> None:
        ok, v = value
        if not ok and self._error is None:
            self._error = v
        self._parts[idx] = v if ok else []
        if len(self._parts) == self._n:
            self._finish()

    def _finish(self) -> None:
        if self._error is None and self._cb is not None:
            self._cb(self._value())
        if self._error is not None and self._ecb is not None:
            self._ecb(self._error)
        self._event.set()

    def _value(self):
        out = list(itertools.chain.from_iterable(self._parts[i] for i in range(self._n)))
        return out[0] if self._single else out

    def ready(self) -> bool:
        """Whether the result has arrived."""
        return self._event.is_set()

    def successful(self) -> bool:
        """Whether the call returned without raising (ValueError before it is ready)."""
        if not self.ready():
            raise ValueError("result is not ready")
        return self._error is None

    def wait(self, timeout: float | None = None) -> None:
        """Waits for the result (at most ``timeout`` seconds)."""
        self._event.wait(timeout)

    def get(self, timeout: float | None = None):
        """The result; raises the worker's exception, or DragonTimeoutError."""
        if not self._event.wait(timeout):
            raise DragonTimeoutError("the result did not arrive in time")
        if self._error is not None:
            raise self._error
        return self._value()


class _Iter:
    def __init__(self, ordered: bool):
        self._q: _stdqueue.Queue = _stdqueue.Queue()
        self._ordered = ordered
        self._next = 0
        self._held: dict = {}
        self._total: int | None = None
        self._got = 0

    def _set(self, idx: int, value) -> None:
        self._q.put((idx, value))

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            if self._total is not None and self._got >= self._total and not self._held:
                raise StopIteration
            if self._ordered and self._next in self._held:
                ok, v = self._held.pop(self._next)
                self._next += 1
                if not ok:
                    raise v
                return v[0]
            idx, (ok, v) = self._q.get()
            self._got += 1
            if not self._ordered:
                if not ok:
                    raise v
                return v[0]
            self._held[idx] = (ok, v)

    def next(self, timeout=None):
        return self.__next__()


class Pool:
    """A pool of worker processes in the Dragon runtime."""

    def __init__(
        self,
        processes: int | None = None,
        initializer: Callable | None = None,
        initargs: tuple = (),
        maxtasksperchild: int | None = None,
        *,
        policy: Policy | list[Policy] | None = None,
        processes_per_policy: int | None = None,
    ):
        if maxtasksperchild is not None and (not isinstance(maxtasksperchild, int) or maxtasksperchild < 1):
            raise ValueError("maxtasksperchild must be a positive int or None")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        policies: list[Policy | None]
        if isinstance(policy, list):
            if not all(isinstance(p, Policy) for p in policy):
                raise TypeError("policy must be a Policy or a list of Policies")
            per = processes_per_policy or 1
            policies = [p for p in policy for _ in range(per)]
            if processes is not None and processes != len(policies):
                raise ValueError("processes must equal len(policy) * processes_per_policy")
        else:
            n = processes if processes is not None else (os.cpu_count() or 1)
            if n < 1:
                raise ValueError("Number of processes must be at least 1")
            policies = [policy] * n
        self._policies = policies
        self._init = (initializer, initargs, maxtasksperchild)
        self._tasks = Queue(maxsize=1024)
        self._results = Queue(maxsize=1024)
        self._pending: _stdqueue.Queue = _stdqueue.Queue()
        self._jobs: dict = {}
        self._job_ids = itertools.count()
        self._lock = threading.Lock()
        self._state = "running"
        self._workers: dict = {}
        for i in range(len(policies)):
            self._start_worker(i)
        self._feeder = threading.Thread(target=self._feed, daemon=True, name="dragon-pool-feeder")
        self._feeder.start()
        self._collector = threading.Thread(target=self._collect, daemon=True, name="dragon-pool-results")
        self._collector.start()

    # ----- workers ------------------------------------------------------------------

    def _start_worker(self, slot: int) -> None:
        initializer, initargs, maxtasks = self._init
        p = Process(
            target=_worker,
            args=(self._tasks, self._results, initializer, initargs, maxtasks),
            policy=self._policies[slot],
        )
        p.start()
        with self._lock:
            self._workers[p.pid] = (slot, p)

    def _feed(self) -> None:
        while True:
            task = self._pending.get()
            if task is _SENTINEL:
                for _ in range(len(self._policies)):
                    self._tasks.put(_SENTINEL)
                return
            self._tasks.put(task)

    def _collect(self) -> None:
        while True:
            try:
                job, idx, value = self._results.get(timeout=0.2)
            except _stdqueue.Empty:
                self._replace_dead()
                if self._state != "running" and not self._workers:
                    return
                continue
            except EOFError:
                return
            if job == "exit":
                self._worker_exited(idx)
                continue
            with self._lock:
                target = self._jobs.get(job)
            if target is not None:
                target._set(idx, value)

    def _worker_exited(self, pid: int) -> None:
        with self._lock:
            entry = self._workers.pop(pid, None)
        if entry is None:
            return
        slot, p = entry
        p.join(5)
        if self._state == "running":
            self._start_worker(slot)

    def _replace_dead(self) -> None:
        with self._lock:
            dead = [(pid, e) for pid, e in self._workers.items() if not e[1].is_alive]
        for pid, (slot, _p) in dead:
            with self._lock:
                self._workers.pop(pid, None)
            if self._state == "running":
                self._start_worker(slot)

    # ----- submitting ---------------------------------------------------------------

    def _check_running(self) -> None:
        if self._state != "running":
            raise ValueError("Pool not running")

    def _submit(self, func, chunks: list, star: bool, result) -> None:
        job = next(self._job_ids)
        with self._lock:
            self._jobs[job] = result
        for idx, chunk in enumerate(chunks):
            self._pending.put((job, idx, func, chunk, star))

    @staticmethod
    def _chunks(iterable: Iterable, chunksize: int | None, nworkers: int) -> list:
        items = list(iterable)
        if chunksize is None:
            chunksize, extra = divmod(len(items), nworkers * 4)
            chunksize += 1 if extra else 0
        chunksize = max(1, chunksize)
        return [items[i : i + chunksize] for i in range(0, len(items), chunksize)]

    def apply_async(self, func, args=(), kwds=None, callback=None, error_callback=None) -> AsyncResult:
        """Runs ``func(*args, **kwds)`` in a worker; returns an AsyncResult."""
        self._check_running()
        kwds = dict(kwds or {})
        call = _Call(func, kwds) if kwds else func
        r = AsyncResult(1, callback, error_callback, single=True)
        self._submit(call, [[tuple(args)]], True, r)
        return r

    def apply(self, func, args=(), kwds=None):
        """Runs ``func(*args, **kwds)`` in a worker and returns its result."""
        return self.apply_async(func, args, kwds).get()

    def map_async(self, func, iterable, chunksize=None, callback=None, error_callback=None) -> AsyncResult:
        """Like ``map`` but returns an AsyncResult."""
        self._check_running()
        chunks = self._chunks(iterable, chunksize, len(self._policies))
        r = AsyncResult(len(chunks), callback, error_callback)
        self._submit(func, chunks, False, r)
        return r

    def map(self, func, iterable, chunksize=None) -> list:
        """``[func(x) for x in iterable]`` computed by the workers, in order."""
        return self.map_async(func, iterable, chunksize).get()

    def starmap_async(
        self, func, iterable, chunksize=None, callback=None, error_callback=None
    ) -> AsyncResult:
        """Like ``starmap`` but returns an AsyncResult."""
        self._check_running()
        chunks = self._chunks([tuple(a) for a in iterable], chunksize, len(self._policies))
        r = AsyncResult(len(chunks), callback, error_callback)
        self._submit(func, chunks, True, r)
        return r

    def starmap(self, func, iterable, chunksize=None) -> list:
        """``[func(*a) for a in iterable]`` computed by the workers, in order."""
        return self.starmap_async(func, iterable, chunksize).get()

    def _imap(self, func, iterable, chunksize: int, ordered: bool):
        self._check_running()
        it = _Iter(ordered)
        items = [[x] for x in iterable] if chunksize == 1 else self._chunks(iterable, chunksize, 1)
        it._total = len(items)
        self._submit(func, items, False, it)
        return it

    def imap(self, func, iterable, chunksize: int = 1):
        """An iterator over ``func(x)`` in order."""
        if chunksize != 1:
            return iter(self.map(func, iterable, chunksize))
        return self._imap(func, iterable, 1, True)

    def imap_unordered(self, func, iterable, chunksize: int = 1):
        """An iterator over ``func(x)`` in completion order."""
        if chunksize != 1:
            return iter(self.map(func, iterable, chunksize))
        return self._imap(func, iterable, 1, False)

    # ----- ending -------------------------------------------------------------------

    def close(self) -> None:
        """No more tasks; workers exit once the queued ones are done."""
        if self._state == "running":
            self._state = "closing"
            self._pending.put(_SENTINEL)

    def terminate(self) -> None:
        """Stops the workers now."""
        self._state = "terminating"
        self._pending.put(_SENTINEL)
        with self._lock:
            procs = [p for _, p in self._workers.values()]
        for p in procs:
            p.kill()
        for p in procs:
            p.join(10)
        with self._lock:
            self._workers.clear()

    def join(self) -> None:
        """Waits for the workers to exit (after ``close`` or ``terminate``)."""
        if self._state == "running":
            raise ValueError("Pool is still running")
        self._collector.join()
        with self._lock:
            procs = [p for _, p in self._workers.values()]
        for p in procs:
            p.join()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc) -> None:
        self.terminate()


class _Call:
    """``func`` with keyword arguments, as one picklable callable."""

    def __init__(self, func, kwds):
        self.func, self.kwds = func, kwds

    def __call__(self, *args):
        return self.func(*args, **self.kwds)
