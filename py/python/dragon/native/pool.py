"""DragonHPC's native ``Pool`` of worker processes, each optionally with its own Policy.

Tasks go to the workers through a shared-memory Queue and results come back through another;
a feeder thread and a result thread in the parent keep ``apply_async``/``map_async`` from
blocking. ``policy`` may be one Policy or a list of them; with ``processes_per_policy``
each policy gets that many workers (so each worker can have its own CPU/GPU binding). A
worker that exits (``maxtasksperchild``, or killed) is replaced while the pool is open.

A worker announces each task it takes (``("start", pid, (job, idx))`` on the result queue)
before running it, so a worker killed in the middle of a task fails that task's result with
``WorkerLostError`` instead of leaving it waiting forever (multiprocessing's Pool hangs
there). The few instructions between taking a task off the queue and announcing it remain a
window where a SIGKILL loses the task unannounced.
"""

from __future__ import annotations

import itertools
import os
import queue as _stdqueue
import signal
import threading
import time
from collections.abc import Callable, Iterable

from dragon.exceptions import DragonTimeoutError
from dragon.infrastructure.policy import Policy
from dragon.native.process import Process
from dragon.native.queue import Queue

_SENTINEL = None


class WorkerLostError(RuntimeError):
    """A worker process died (killed, crashed) while running this task: its result is lost."""


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
        results.put(("start", os.getpid(), (job, idx)))
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


class ApplyResult:
    """The future result of ``apply_async`` (DragonHPC's ``ApplyResult``; ``AsyncResult`` is
    another name for it, as in multiprocessing)."""

    def __init__(self, pool: Pool | None = None, callback=None, error_callback=None):
        self._pool = pool
        self._event = threading.Event()
        self._cb, self._ecb = callback, error_callback
        self._success: bool | None = None
        self._value = None

    def _set(self, idx: int, value) -> None:
        ok, v = value
        ok, v = (True, v[0]) if ok else (False, v)
        self._success, self._value = ok, v
        self._done()

    def _done(self) -> None:
        if self._success and self._cb is not None:
            self._cb(self._value)
        if not self._success and self._ecb is not None:
            self._ecb(self._value)
        self._event.set()
        self._pool = None

    def ready(self) -> bool:
        """Whether the result has arrived."""
        return self._event.is_set()

    def successful(self) -> bool:
        """Whether the call returned without raising (ValueError before it is ready)."""
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return bool(self._success)

    def wait(self, timeout: float | None = None) -> None:
        """Waits for the result (at most ``timeout`` seconds)."""
        self._event.wait(timeout)

    def get(self, timeout: float | None = None):
        """The result; raises the worker's exception, or DragonTimeoutError (a TimeoutError)
        after ``timeout`` seconds."""
        if not self._event.wait(timeout):
            raise DragonTimeoutError("the result did not arrive in time")
        if not self._success:
            raise self._value
        return self._value


AsyncResult = ApplyResult


class MapResult(ApplyResult):
    """The future result of ``map_async``/``starmap_async`` (DragonHPC's ``MapResult``): a
    list of ``length`` values computed in chunks of ``chunksize``. The first exception of
    any chunk is the result's error; it is ready (and the callback or error callback runs)
    once every chunk came back."""

    def __init__(self, pool: Pool | None, chunksize: int, length: int, callback=None, error_callback=None):
        super().__init__(pool, callback, error_callback)
        self._success = True
        self._value = [None] * length
        self._chunksize = chunksize
        self._left = 0 if chunksize <= 0 or length == 0 else -(-length // chunksize)
        if self._left == 0:
            self._done()

    def _set(self, idx: int, value) -> None:
        ok, v = value
        self._left -= 1
        if ok and self._success:
            self._value[idx * self._chunksize : (idx + 1) * self._chunksize] = v
        elif not ok and self._success:
            self._success, self._value = False, v  # only the first exception is kept
        if self._left == 0:
            self._done()


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
        # pid -> (job, idx) of the task each worker announced and has not finished.
        self._running: dict = {}
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
            self._handle(job, idx, value)

    def _handle(self, job, idx, value) -> None:
        if job == "exit":
            self._worker_exited(idx)
            return
        if job == "start":
            self._running[idx] = value
            return
        for pid, t in list(self._running.items()):
            if t == (job, idx):
                del self._running[pid]
        with self._lock:
            target = self._jobs.get(job)
        if target is not None:
            target._set(idx, value)

    def _lost(self, pid: int, p: Process) -> None:
        """A worker died: its announced, unfinished task fails with WorkerLostError. Results
        already queued (the task may have finished just before the death) are taken first."""
        if pid not in self._running:
            return
        while pid in self._running:
            try:
                job, idx, value = self._results.get(timeout=0)
            except (_stdqueue.Empty, EOFError):
                break
            self._handle(job, idx, value)
        task = self._running.pop(pid, None)
        if task is None:
            return
        job, idx = task
        with self._lock:
            target = self._jobs.get(job)
        if target is not None:
            code = p.returncode
            how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            target._set(
                idx, (False, WorkerLostError(f"pool worker {pid} was lost ({how}) while running this task"))
            )

    def _worker_exited(self, pid: int) -> None:
        with self._lock:
            entry = self._workers.pop(pid, None)
        if entry is None:
            return
        slot, p = entry
        p.join(5)
        self._lost(pid, p)
        if self._state == "running":
            self._start_worker(slot)

    def _replace_dead(self) -> None:
        with self._lock:
            dead = [(pid, e) for pid, e in self._workers.items() if not e[1].is_alive]
        for pid, (slot, p) in dead:
            with self._lock:
                self._workers.pop(pid, None)
            self._lost(pid, p)
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
        return Pool._chunked(iterable, chunksize, nworkers)[0]

    @staticmethod
    def _chunked(iterable: Iterable, chunksize: int | None, nworkers: int) -> tuple[list, int, int]:
        """(chunks, chunk size, number of items)."""
        items = list(iterable)
        if chunksize is None:
            chunksize, extra = divmod(len(items), nworkers * 4)
            chunksize += 1 if extra else 0
        chunksize = max(1, chunksize)
        return [items[i : i + chunksize] for i in range(0, len(items), chunksize)], chunksize, len(items)

    def apply_async(self, func, args=(), kwds=None, callback=None, error_callback=None) -> ApplyResult:
        """Runs ``func(*args, **kwds)`` in a worker; returns an ApplyResult."""
        self._check_running()
        kwds = dict(kwds or {})
        call = _Call(func, kwds) if kwds else func
        r = ApplyResult(self, callback, error_callback)
        self._submit(call, [[tuple(args)]], True, r)
        return r

    def apply(self, func, args=(), kwds=None):
        """Runs ``func(*args, **kwds)`` in a worker and returns its result."""
        return self.apply_async(func, args, kwds).get()

    def map_async(self, func, iterable, chunksize=None, callback=None, error_callback=None) -> MapResult:
        """Like ``map`` but returns a MapResult."""
        self._check_running()
        chunks, size, n = self._chunked(iterable, chunksize, len(self._policies))
        r = MapResult(self, size, n, callback, error_callback)
        self._submit(func, chunks, False, r)
        return r

    def map(self, func, iterable, chunksize=None) -> list:
        """``[func(x) for x in iterable]`` computed by the workers, in order."""
        return self.map_async(func, iterable, chunksize).get()

    def starmap_async(self, func, iterable, chunksize=None, callback=None, error_callback=None) -> MapResult:
        """Like ``starmap`` but returns a MapResult."""
        self._check_running()
        chunks, size, n = self._chunked([tuple(a) for a in iterable], chunksize, len(self._policies))
        r = MapResult(self, size, n, callback, error_callback)
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

    def _stop(self, signals: tuple, patience: float | None) -> None:
        """Stops accepting work and sends the workers each signal of ``signals`` in turn,
        waiting up to ``patience`` seconds (None: no limit) for them to exit after each."""
        self._state = "terminating"
        self._pending.put(_SENTINEL)
        with self._lock:  # taken from the table, so the result thread never joins them too
            procs = [p for _, p in self._workers.values()]
            self._workers.clear()
        for sig in signals:
            procs = [p for p in procs if p.is_alive]
            if not procs:
                break
            for p in procs:
                p.send_signal(sig)
            deadline = None if patience is None else time.monotonic() + patience
            for p in procs:
                p.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def terminate(self, patience: float = 60) -> None:
        """Stops the workers now (work not done yet is dropped): SIGTERM, then, for workers
        still running ``patience`` seconds later, SIGKILL (DragonHPC sends SIGINT first; our
        workers end on SIGTERM, so that step is skipped)."""
        self._stop((signal.SIGTERM, signal.SIGKILL), patience)

    def kill(self) -> None:
        """Stops the workers at once with SIGKILL (work not done yet is dropped)."""
        self._stop((signal.SIGKILL,), 10)

    def join(self, patience: float | None = None) -> None:
        """Waits for the workers to exit (after ``close`` or ``terminate``). With
        ``patience`` (DragonHPC's), workers still running ``patience`` seconds later are
        stopped as ``terminate(patience)`` does."""
        if self._state == "running":
            raise ValueError("Pool is still running")
        if patience is not None:
            # The result thread ends once every worker has exited (it joins them itself).
            self._collector.join(max(0.0, patience))
            if self._collector.is_alive():
                self._stop((signal.SIGTERM, signal.SIGKILL), patience)
        self._collector.join()
        with self._lock:
            procs = [p for _, p in self._workers.values()]
        for p in procs:
            p.join()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc) -> None:
        self.kill()


class _Call:
    """``func`` with keyword arguments, as one picklable callable."""

    def __init__(self, func, kwds):
        self.func, self.kwds = func, kwds

    def __call__(self, *args):
        return self.func(*args, **self.kwds)
