"""Corners of DragonHPC's native API (issue 19, item 4), with real processes: ProcessGroup's
error names, Queue's ``size``/``node``/``thread_wait``/``QueueError``, the native Pool's
``ApplyResult``/``MapResult``/``kill``/``terminate(patience)``."""

import threading
import time

import pytest
from dragon.native.pool import ApplyResult, AsyncResult, MapResult, Pool
from dragon.native.queue import Queue, QueueError


def square(x):
    return x * x


def fail_on_3(x):
    if x == 3:
        raise ValueError("three")
    return x


def nap(x):
    time.sleep(x)
    return x


def put_later(q, delay):
    time.sleep(delay)
    q.put("late")


# ----- ProcessGroup's errors -----------------------------------------------------------


def test_process_group_error_names():
    import dragon.exceptions as ex
    from dragon.native import process_group as pg

    names = [
        "DragonProcessGroupError",
        "DragonProcessGroupException",
        "DragonProcessGroupAlreadyInitialized",
        "DragonProcessGroupIdleError",
        "DragonProcessGroupStartError",
        "DragonProcessGroupRunningError",
        "DragonUserCodeError",
        "DragonProcessGroupJoinError",
        "DragonProcessGroupSignalError",
    ]
    for n in names:
        cls = getattr(pg, n)
        assert cls is getattr(ex, n)
        assert issubclass(cls, pg.DragonProcessGroupError)
        assert issubclass(cls, ex.DragonError)


def test_process_group_raises_its_named_errors():
    from dragon.native.process import ProcessTemplate
    from dragon.native.process_group import DragonProcessGroupError, DragonUserCodeError, ProcessGroup

    g = ProcessGroup()
    g.add_process(2, ProcessTemplate(fail_on_3, args=(3,)))
    g.init()
    with pytest.raises(DragonProcessGroupError):
        g.init()  # AlreadyInitialized is a DragonProcessGroupError
    g.start()
    with pytest.raises(DragonUserCodeError):
        g.join(30)
    g.close()


# ----- Queue ------------------------------------------------------------------------------


def test_queue_size_node_and_error():
    from dragon.native.machine import current

    q = Queue()
    assert q.size() == 0
    q.put(1)
    q.put(2)
    assert q.size() == 2 == q.qsize()
    assert q.node == current().h_uid
    with pytest.raises(QueueError):
        q.task_done()  # not joinable
    with pytest.raises(ValueError):  # QueueError is also the ValueError raised before
        q.join()
    assert q.get() == 1 and q.get() == 2
    jq = Queue(joinable=True)
    with pytest.raises(QueueError):
        jq.task_done()  # nothing to mark done
    q.destroy()
    jq.destroy()


def test_queue_poll_waits():
    from dragon.native.process import Process

    q = Queue()
    t0 = time.monotonic()
    assert q.poll(0.2) is False
    assert time.monotonic() - t0 >= 0.19
    p = Process(put_later, args=(q, 0.3))
    p.start()
    assert q.poll(30) is True
    assert q.size() == 1  # poll does not take the item
    assert q.get() == "late"
    assert p.join(30) == 0
    q.destroy()


def test_queue_thread_wait():
    from dragon.native.process import Process

    # an item arrives from another process: the queue is reported ready
    q = Queue()
    ev = threading.Event()
    ready = []
    p = Process(put_later, args=(q, 0.2))
    p.start()
    q.thread_wait(30, ev, ready)
    assert ready == [q] and ev.is_set()
    assert q.get() == "late"
    assert p.join(30) == 0
    # a time-out: nothing ready, the event is set
    ev, ready = threading.Event(), []
    t0 = time.monotonic()
    q.thread_wait(0.2, ev, ready)
    assert ready == [] and ev.is_set() and time.monotonic() - t0 >= 0.19
    # another waiter set the event first: returns without reporting this queue
    ev, ready = threading.Event(), []
    threading.Timer(0.1, ev.set).start()
    q.thread_wait(None, ev, ready)
    assert ready == []
    q.destroy()


# ----- native Pool ------------------------------------------------------------------------


def test_pool_result_classes():
    with Pool(2) as p:
        r = p.apply_async(square, (7,))
        assert isinstance(r, ApplyResult) and not isinstance(r, MapResult)
        assert AsyncResult is ApplyResult
        assert r.get(30) == 49 and r.successful()
        got = []
        m = p.map_async(square, range(10), chunksize=3, callback=got.append)
        assert isinstance(m, MapResult) and isinstance(m, ApplyResult)
        assert m.get(30) == [x * x for x in range(10)]
        m.wait(5)
        assert got == [[x * x for x in range(10)]]
        errs = []
        bad = p.map_async(fail_on_3, range(8), chunksize=2, error_callback=errs.append)
        with pytest.raises(ValueError, match="three"):
            bad.get(30)
        assert not bad.successful() and len(errs) == 1
        s = p.starmap_async(pow, [(2, 3), (3, 2)])
        assert isinstance(s, MapResult) and s.get(30) == [8, 9]
        empty = p.map_async(square, [])
        assert empty.ready() and empty.get(1) == []
        slow = p.apply_async(nap, (5,))
        with pytest.raises(TimeoutError):
            slow.get(0.05)
        with pytest.raises(ValueError):
            slow.successful()  # not ready


def test_pool_kill_and_terminate_patience():
    p = Pool(2)
    assert p.map(square, range(4)) == [0, 1, 4, 9]
    r = p.apply_async(nap, (60,))
    time.sleep(0.2)
    t0 = time.monotonic()
    p.kill()
    p.join()
    assert time.monotonic() - t0 < 15
    assert not r.ready()
    with pytest.raises(ValueError):
        p.apply_async(square, (1,))

    p = Pool(2)
    p.apply_async(nap, (60,))
    time.sleep(0.2)
    t0 = time.monotonic()
    p.terminate(patience=5)
    p.join()
    assert time.monotonic() - t0 < 15
