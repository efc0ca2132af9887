"""dragon._native across real processes (multiprocessing "spawn" children attach by pickle)."""

import multiprocessing as mp
import os
import pickle
import queue
import signal
import threading
import time

import dragon._native as n
import pytest

CTX = mp.get_context("spawn")


@pytest.fixture
def rt():
    """A fresh runtime id; after the test, none of its segments may remain."""
    rt = n.random_runtime()
    yield rt
    assert n.leftovers(rt) == [], "segments left behind"


def new_pool(rt):
    return n.Pool.create(n.segment_name(rt, 0, "pool", 1), 64 << 20)


def payload(producer, seq):
    size = 20_000 if seq % 7 == 0 else 10 + seq % 50
    head = f"{producer}:{seq}:".encode()
    return head + bytes((producer * 31 + seq + i) % 251 for i in range(size - len(head)))


def produce(ch, producer, count):
    for seq in range(count):
        ch.send(payload(producer, seq))


def wait_until(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition never became true"
        time.sleep(0.001)


def test_channel_many_producers_mixed_sizes(rt):
    pool = new_pool(rt)
    ch = n.Channel.create(pool, 16, 64)
    procs = [CTX.Process(target=produce, args=(ch, p, 300)) for p in range(3)]
    for p in procs:
        p.start()
    last = {}
    got = 0
    while got < 900:
        m = ch.recv(timeout=30)
        producer, seq, _ = m.split(b":", 2)
        producer, seq = int(producer), int(seq)
        assert m == payload(producer, seq), "payload corrupted"
        assert last.get(producer, -1) < seq, "FIFO per producer violated"
        last[producer] = seq
        got += 1
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert last == {0: 299, 1: 299, 2: 299}
    with pytest.raises(queue.Empty):
        ch.recv(timeout=0.01)
    # Nobody mid-operation, no position reserved and left uncommitted.
    st = ch.stats()
    assert (st["mid_operation"], st["uncommitted_send"], st["uncommitted_recv"]) == (0, None, None), st
    assert pool.stats()["holds"] >= 1  # the channel block itself
    del ch
    assert pool.stats()["blocks"] == 0


def set_later(ev):
    ev.set()


def test_event_set_in_child_wakes_parent(rt):
    pool = new_pool(rt)
    ev = n.Event(pool)
    assert ev.wait(0.01) is False
    p = CTX.Process(target=set_later, args=(ev,))
    p.start()
    assert ev.wait(30) is True
    p.join(30)
    assert p.exitcode == 0


def hold_lock(lock, ready):
    lock.acquire()
    ready.set()
    time.sleep(600)  # killed long before


def test_lock_of_killed_holder_is_recovered(rt):
    pool = new_pool(rt)
    lock = n.Lock(pool)
    ready = n.Event(pool)
    p = CTX.Process(target=hold_lock, args=(lock, ready))
    p.start()
    assert ready.wait(30)
    assert lock.acquire(timeout=0.05) is False
    os.kill(p.pid, signal.SIGKILL)
    p.join(30)
    assert lock.acquire_recovering(timeout=10) is True
    lock.release()
    assert lock.acquire_recovering(timeout=10) is False
    lock.release()
    pool.sweep()


def blocked_recv(ch):
    # Python leaves SIGINT ignored when it started ignored (a background job of a
    # non-interactive shell, as CI may run us): install the handler a terminal gives.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        ch.recv()
    except KeyboardInterrupt:
        os._exit(42)
    os._exit(1)


def test_ctrl_c_interrupts_a_blocked_receive(rt):
    pool = new_pool(rt)
    ch = n.Channel.create(pool, 4, 64)
    p = CTX.Process(target=blocked_recv, args=(ch,))
    p.start()
    wait_until(lambda: ch.stats()["recv_waiters"] == 1, 30)
    os.kill(p.pid, signal.SIGINT)
    p.join(30)
    assert p.exitcode == 42


def barrier_party(b, out):
    out.send(str(b.wait(30)).encode())


def test_barrier_across_processes(rt):
    pool = new_pool(rt)
    b = n.Barrier(pool, 3)
    out = n.Channel.create(pool, 8, 64)
    procs = [CTX.Process(target=barrier_party, args=(b, out)) for _ in range(2)]
    for p in procs:
        p.start()
    mine = b.wait(30)
    theirs = {int(out.recv(timeout=30)) for _ in procs}
    assert {mine} | theirs == {0, 1, 2}
    for p in procs:
        p.join(30)


def test_errors_are_clear_python_exceptions(rt):
    pool = new_pool(rt)
    ch = n.Channel.create(pool, 2, 64)
    ch.send(b"a")
    ch.send(b"b")
    with pytest.raises(queue.Full):
        ch.send(b"c", timeout=0.01)
    ch.close()
    with pytest.raises(EOFError):
        ch.send(b"d")
    assert ch.recv() == b"a" and ch.recv() == b"b"
    with pytest.raises(EOFError):
        ch.recv()
    with pytest.raises(ValueError):
        pool.alloc(1 << 40)  # larger than the pool can ever hold
    big = pool.alloc(40 << 20)
    with pytest.raises(MemoryError):
        pool.alloc(40 << 20)  # does not fit now
    del big
    with pytest.raises(ValueError):
        n.Pool.open("/not-a-dragon-name")
    with pytest.raises(FileNotFoundError):
        n.Pool.open(n.segment_name(n.random_runtime(), 0, "pool", 1))
    lock = n.Lock(pool)
    with pytest.raises(ValueError):
        lock.release()
    sem = n.Semaphore(pool, 1)
    assert sem.acquire() and not sem.acquire(block=False)
    sem.release()
    assert sem.get_value() == 1
    with pytest.raises(TypeError):
        ch.send(object())


def test_thread_blocked_in_wait_releases_the_gil(rt):
    pool = new_pool(rt)
    ev = n.Event(pool)
    t = threading.Thread(target=ev.wait, args=(30,))
    t.start()
    # If the waiting thread held the GIL, this loop could not run.
    counter = sum(range(100_000))
    assert counter > 0
    ev.set()
    t.join(30)
    assert not t.is_alive()


def test_pickled_handles_attach_in_the_same_process(rt):
    pool = new_pool(rt)
    ch = n.Channel.create(pool, 4, 64)
    again = pickle.loads(pickle.dumps(ch))
    again.send(b"through the copy")
    assert ch.recv(timeout=1) == b"through the copy"
    assert pickle.loads(pickle.dumps(pool)).name == pool.name
