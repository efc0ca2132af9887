"""The exception hierarchy (``dragon.exceptions``): every Dragon condition the package raises
is a ``dragon.DragonError`` and also the builtin a multiprocessing user catches for it."""

import errno
import gc
import multiprocessing as mp
import os
import pickle
import queue
import subprocess
import threading

import dragon
import dragon._native as n
import pytest
from dragon import _runtime, exceptions
from dragon.data.ddict import DDict, DDictError, DDictFrozenError, DDictKeyError


@pytest.fixture
def rt():
    """A fresh runtime id; after the test, none of its segments may remain."""
    rt = n.random_runtime()
    yield rt
    gc.collect()  # `pytest.raises(...) as ei` makes a cycle: the frame, its locals, ei's traceback
    assert n.leftovers(rt) == [], "segments left behind"


def new_pool(rt):
    return n.Pool.create(n.segment_name(rt, 0, "pool", 1), 4 << 20)


def is_both(e, builtin):
    return isinstance(e, dragon.DragonError) and isinstance(e, builtin)


def test_every_class_is_a_dragon_error_importable_from_dragon_and_picklable():
    assert exceptions.__all__
    for name in exceptions.__all__:
        cls = getattr(dragon, name)
        assert cls is getattr(exceptions, name) and issubclass(cls, dragon.DragonError)
    e = pickle.loads(pickle.dumps(dragon.PoolFullError("full")))
    assert type(e) is dragon.PoolFullError and str(e) == "full"
    assert _runtime.RuntimeGone is dragon.RuntimeGoneError
    with pytest.raises(AttributeError):
        dragon.NoSuchError  # noqa: B018


def test_an_os_error_with_an_errno_is_its_subclass_as_oserror_is():
    e = dragon.DragonOSError(errno.ENOENT, "gone")
    assert type(e) is dragon.DragonFileNotFoundError and is_both(e, FileNotFoundError)
    assert e.errno == errno.ENOENT and str(e) == "[Errno 2] gone"
    assert type(pickle.loads(pickle.dumps(e))) is dragon.DragonFileNotFoundError
    assert type(dragon.DragonOSError(errno.ETIMEDOUT, "t")) is dragon.DragonTimeoutError
    assert type(dragon.DragonOSError("no errno")) is dragon.DragonOSError


def test_a_full_pool_is_a_dragon_error_and_a_memory_error(rt):
    pool = new_pool(rt)
    big = pool.alloc(3 << 20)
    with pytest.raises(MemoryError) as ei:
        pool.alloc(3 << 20)
    assert is_both(ei.value, MemoryError) and type(ei.value) is dragon.PoolFullError
    with pytest.raises(dragon.DragonTimeoutError) as ei:
        pool.alloc(3 << 20, timeout=0.01)
    assert is_both(ei.value, TimeoutError)
    with pytest.raises(dragon.DragonValueError) as ei:
        pool.alloc(1 << 40)  # larger than the pool can ever hold
    assert isinstance(ei.value, ValueError)
    del big


def test_channel_errors(rt):
    pool = new_pool(rt)
    ch = n.Channel.create(pool, 1, 64)
    with pytest.raises(queue.Empty) as ei:
        ch.recv(timeout=0.01)
    assert is_both(ei.value, queue.Empty) and type(ei.value) is dragon.QueueEmpty
    ch.send(b"a")
    with pytest.raises(queue.Full) as ei:
        ch.send(b"b", timeout=0.01)
    assert is_both(ei.value, queue.Full) and type(ei.value) is dragon.QueueFull
    ch.close()
    with pytest.raises(EOFError) as ei:
        ch.send(b"c")
    assert is_both(ei.value, EOFError) and type(ei.value) is dragon.ChannelClosedError
    assert ch.recv() == b"a"
    with pytest.raises(dragon.ChannelClosedError):
        ch.recv()


def test_sync_errors(rt):
    pool = new_pool(rt)
    b = n.Barrier(pool, 2)
    with pytest.raises(threading.BrokenBarrierError) as ei:
        b.wait(timeout=0.01)
    assert is_both(ei.value, threading.BrokenBarrierError)
    r = n.RLock(pool)
    with pytest.raises(AssertionError) as ei:
        r.release()
    assert is_both(ei.value, AssertionError) and type(ei.value) is dragon.LockNotOwnedError
    with pytest.raises(dragon.DragonValueError):
        n.Lock(pool).release()
    with pytest.raises(dragon.DragonValueError):
        n.Event(pool).wait(timeout=float("nan"))


def test_segment_and_process_errors():
    with pytest.raises(dragon.DragonValueError):
        n.Pool.open("/not-a-dragon-name")
    with pytest.raises(FileNotFoundError) as ei:
        n.Pool.open(n.segment_name(n.random_runtime(), 0, "pool", 1))
    assert is_both(ei.value, FileNotFoundError) and ei.value.errno == errno.ENOENT
    child = subprocess.Popen(["true"])
    child.wait()
    with pytest.raises(ProcessLookupError) as ei:
        n.pidfd_open(child.pid)  # reaped: no such process
    assert is_both(ei.value, ProcessLookupError) and ei.value.errno == errno.ESRCH
    with pytest.raises(FileNotFoundError) as ei:
        n.spawn(["/no/such/program"])
    assert is_both(ei.value, FileNotFoundError)


def test_packet_errors_keep_the_errno():
    r, w = os.pipe()
    os.close(r)
    with pytest.raises(BrokenPipeError) as ei:
        n.packet_send(w, False, b"x")
    assert is_both(ei.value, BrokenPipeError) and ei.value.errno == errno.EPIPE
    os.close(w)
    r, w = os.pipe()
    os.close(w)
    with pytest.raises(EOFError) as ei:
        n.packet_recv(r, False, 1.0)
    assert type(ei.value) is dragon.ChannelClosedError
    os.close(r)


def test_agent_errors():
    a = _runtime.agent()
    a.register("test-exc", "k", b"v")
    try:
        with pytest.raises(KeyError) as ei:
            a.register("test-exc", "k", b"w")
        assert is_both(ei.value, KeyError) and type(ei.value) is dragon.NameTakenError
    finally:
        a.unregister("test-exc", "k")
    with pytest.raises(LookupError) as ei:
        a.status(12345)
    assert is_both(ei.value, LookupError) and type(ei.value) is dragon.UnknownProcessError


def test_an_unknown_ddict_key_is_a_dragon_error_and_a_key_error():
    d = DDict(1, 1, 4 << 20)
    try:
        with pytest.raises(KeyError) as ei:
            d["missing"]
        assert is_both(ei.value, KeyError) and isinstance(ei.value, DDictKeyError)
        assert isinstance(ei.value, DDictError)
        d["k"] = 1
        d.freeze()
        with pytest.raises(DDictFrozenError) as ei:
            d["k"] = 2  # raised by the native index
        assert isinstance(ei.value, dragon.DragonError)
    finally:
        d.destroy()


def test_mp_queue_timeouts_are_dragon_errors():
    q = mp.get_context("dragon").Queue(1)
    with pytest.raises(queue.Empty) as ei:
        q.get(timeout=0.01)
    assert is_both(ei.value, queue.Empty)
    q.put(1)
    with pytest.raises(queue.Full) as ei:
        q.put(2, timeout=0.01)
    assert is_both(ei.value, queue.Full)
    assert q.get() == 1
    q.close()
    q.join_thread()
