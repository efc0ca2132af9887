"""``DDict.filter``: DragonHPC's tree of processes that filters a DDict manager by manager
and merges the results.

``filter(mgr_code, mgr_code_args, comparator, branching_factor)`` starts one aggregator
process. An aggregator with one manager runs ``mgr_code(dd.manager(i), out, *mgr_code_args)``
itself (on the manager's node); with more it starts up to ``branching_factor`` children
(aggregators of a share of the managers, or one process per manager when they are few
enough), each with its own stream, and merges what they send in order with a heap: the
next value out is the one ``comparator(x, y)`` ranks first (``comparator(x, y)`` is True
when x is "better" than y). ``mgr_code`` is expected to put its values best first. The
caller reads the merged values from the context manager's iterator.

A stream is a native Queue plus an Event the reader sets when it stops reading: a writer's
``put`` then raises EOFError (so producers stop early when the reader leaves the ``with``
block), and the reader drains what is left so no writer stays blocked. The end of a stream
is a sentinel each writer puts when done.
"""

from __future__ import annotations

import heapq
import queue
import sys
import traceback

import cloudpickle

from dragon.native.event import Event
from dragon.native.queue import Queue

_END = "ddict-filter-stream-end"


class _Stream:
    """One writer's values to one reader (see the module's docstring)."""

    def __init__(self):
        self._q = Queue()
        self._gone = Event()
        self._ended = False

    def put(self, item) -> None:
        """Sends ``item``; EOFError once the reader has stopped reading."""
        while True:
            if self._gone.is_set():
                raise EOFError("the filter's reader stopped reading")
            try:
                self._q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue  # look at the reader again

    def end(self) -> None:
        """The writer is done."""
        try:
            self.put(_END)
        except EOFError:
            pass

    def get(self, writer=None):
        """The next item; EOFError at the end of the stream, or once ``writer`` (the
        writing process) has ended without ending it (it died)."""
        if self._ended:
            raise EOFError("end of the filter stream")
        while True:
            try:
                item = self._q.get(timeout=None if writer is None else 0.5)
                break
            except queue.Empty:
                if not writer.is_alive:
                    try:
                        item = self._q.get(timeout=0)  # anything it sent before it ended
                        break
                    except queue.Empty:
                        self._ended = True
                        raise EOFError("the filter's writer ended without ending its stream") from None
        if isinstance(item, str) and item == _END:
            self._ended = True
            raise EOFError("end of the filter stream")
        return item

    def close(self) -> None:
        """The reader stops: writers' puts fail from now on; what they sent is dropped."""
        self._gone.set()
        while not self._ended:
            try:
                self._drain_one(0.2)
            except (EOFError, queue.Empty):
                break  # the end, or nothing more came: the writer has seen the event

    def _drain_one(self, timeout: float):
        item = self._q.get(timeout=timeout)
        if isinstance(item, str) and item == _END:
            self._ended = True

    def destroy(self) -> None:
        """Frees the stream (every process done with it)."""
        self._q.destroy()


class _Entry:
    __slots__ = ("value", "index", "better")

    def __init__(self, value, index: int, better):
        self.value, self.index, self.better = value, index, better

    def __lt__(self, other: _Entry) -> bool:
        return bool(self.better(self.value, other.value))


def _policy_for(node: int | None):
    if node is None:
        return None
    from dragon.infrastructure.policy import Policy

    return Policy(placement=Policy.Placement.HOST_ID, host_id=node + 1)


def filter_manager(dd, code: bytes, args: bytes, out: _Stream, manager_id: int) -> None:
    """Runs the user's code on manager ``manager_id`` of ``dd`` with ``out`` as its queue."""
    try:
        fn, fargs = cloudpickle.loads(code), cloudpickle.loads(args)
        fn(dd.manager(manager_id), out, *fargs)
    except EOFError:
        pass  # the reader left early
    except Exception:
        print(
            f"There was an exception in filter_manager:\n{traceback.format_exc()}",
            file=sys.stderr,
            flush=True,
        )
        raise
    finally:
        out.end()


def filter_aggregator(
    dd, managers: list, branching: int, code: bytes, args: bytes, cmp: bytes, out: _Stream
) -> None:
    """Filters the managers ``managers`` (list of (manager id, node index or None)) into
    ``out``: itself for one manager, else through child processes merged in order."""
    from dragon.native.process import Process

    if len(managers) == 1:
        filter_manager(dd, code, args, out, managers[0][0])
        return
    better = cloudpickle.loads(cmp)
    if len(managers) > branching:
        parts = min(branching, max(2, len(managers) // branching))
        size = -(-len(managers) // parts)
        shares = [managers[i : i + size] for i in range(0, len(managers), size)]
        jobs = [(filter_aggregator, (dd, s, branching, code, args, cmp), s[0][1]) for s in shares]
    else:
        jobs = [(filter_manager, (dd, code, args), node) for _, node in managers]
    streams, procs = [], []
    try:
        for i, (target, fargs, node) in enumerate(jobs):
            s = _Stream()
            extra = (s,) if target is filter_aggregator else (s, managers[i][0])
            p = Process(target, args=(*fargs, *extra), policy=_policy_for(node))
            p.start()
            streams.append(s)
            procs.append(p)
        heap: list[_Entry] = []
        for i, s in enumerate(streams):
            try:
                heapq.heappush(heap, _Entry(s.get(procs[i]), i, better))
            except EOFError:
                pass
        while heap:
            e = heapq.heappop(heap)
            out.put(e.value)
            try:
                heapq.heappush(heap, _Entry(streams[e.index].get(procs[e.index]), e.index, better))
            except EOFError:
                pass
    except EOFError:
        pass  # our reader left early
    finally:
        out.end()
        for s in streams:
            s.close()
        for p in procs:
            p.join()
        for s in streams:
            s.destroy()


class FilterIterator:
    """The merged values of a filter, in order (iterate it inside the ``with`` block)."""

    def __init__(self, stream: _Stream, proc=None):
        self._stream = stream
        self._proc = proc

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return self._stream.get(self._proc)
        except EOFError:
            raise StopIteration from None

    def close(self) -> None:
        """Stops reading; the filter's processes stop at their next put."""
        self._stream.close()


class FilterContextManager:
    """What ``DDict.filter`` returns: ``with dd.filter(...) as values:`` gives the iterator;
    leaving the block stops the filter's processes and waits for them."""

    def __init__(self, proc, stream: _Stream):
        self._proc = proc
        self._stream = stream
        self._iter: FilterIterator | None = None

    def __enter__(self) -> FilterIterator:
        self._iter = FilterIterator(self._stream, self._proc)
        return self._iter

    def __exit__(self, *exc) -> bool:
        self._stream.close()
        self._proc.join()
        self._stream.destroy()
        return False


def start_filter(
    dd, mgr_code, mgr_code_args: tuple, comparator, branching_factor: int
) -> FilterContextManager:
    """Starts the root aggregator of ``dd.filter(...)`` (see the module's docstring)."""
    from dragon.native.process import Process

    if branching_factor < 2:
        raise ValueError("branching_factor must be at least 2")
    from dragon.native import machine

    multi = bool(machine.node_table())
    managers = [(i, m.node if multi else None) for i, m in enumerate(dd._live())]
    managers.sort(key=lambda t: -1 if t[1] is None else t[1])  # neighbours share subtrees
    stream = _Stream()
    p = Process(
        filter_aggregator,
        args=(
            dd,
            managers,
            branching_factor,
            cloudpickle.dumps(mgr_code),
            cloudpickle.dumps(tuple(mgr_code_args)),
            cloudpickle.dumps(comparator),
            stream,
        ),
    )
    p.start()
    return FilterContextManager(p, stream)
