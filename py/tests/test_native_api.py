"""dragon.native Queue, Event, Lock, Semaphore, Barrier across managed processes."""

import os
import queue
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from dragon.native.barrier import Barrier
from dragon.native.event import Event
from dragon.native.lock import Lock
from dragon.native.process import Process, ProcessTemplate
from dragon.native.process_group import ProcessGroup
from dragon.native.queue import Queue
from dragon.native.semaphore import Semaphore


def producer(q, n):
    for i in range(n):
        if i % 10 == 0:
            q.put(np.full(250_000, i, dtype=np.int32))  # 1 MB: travels in a pool block
        else:
            q.put(("item", i, "x" * (i % 300)))


def test_queue_between_processes_in_order():
    q = Queue()
    p = Process(target=producer, args=(q, 200))
    p.start()
    for i in range(200):
        v = q.get(timeout=60)
        if i % 10 == 0:
            assert isinstance(v, np.ndarray) and v.shape == (250_000,) and (v == i).all()
        else:
            assert v == ("item", i, "x" * (i % 300))
    assert p.join(60) == 0
    with pytest.raises(queue.Empty):
        q.get(timeout=0.01)


def test_queue_bounds_and_errors():
    q = Queue(maxsize=2)
    q.put(1)
    q.put_nowait(lambda x: x + 1)  # closures and lambdas travel (cloudpickle)
    assert q.full() and q.qsize() == 2
    with pytest.raises(queue.Full):
        q.put(3, timeout=0.01)
    assert q.get() == 1 and q.get()(41) == 42
    with pytest.raises(queue.Empty):
        q.get_nowait()
    lock = threading.Lock()
    with pytest.raises(TypeError):
        q.put(lock)  # unpicklable: a clear error, nothing sent
    assert q.empty()
    q.destroy()
    with pytest.raises(ValueError):
        q.put(1)


def set_it(ev):
    ev.set()


def count_under_lock(lock, q, n):
    for _ in range(n):
        with lock:
            v = q.get()
            q.put(v + 1)


def arrive(b, q):
    q.put(b.wait(timeout=60))


def test_sync_objects_across_processes():
    ev = Event()
    p = Process(target=set_it, args=(ev,))
    p.start()
    assert ev.wait(60)
    assert p.join(60) == 0

    lock, q = Lock(), Queue()
    q.put(0)
    pg = ProcessGroup()
    pg.add_process(nproc=3, template=ProcessTemplate(target=count_under_lock, args=(lock, q, 200)))
    pg.init()
    pg.start()
    pg.join(120)
    pg.close()
    assert q.get(timeout=5) == 600

    b, out = Barrier(4), Queue()
    pg = ProcessGroup()
    pg.add_process(nproc=3, template=ProcessTemplate(target=arrive, args=(b, out)))
    pg.init()
    pg.start()
    mine = b.wait(timeout=60)
    theirs = {out.get(timeout=60) for _ in range(3)}
    pg.join(60)
    pg.close()
    assert theirs | {mine} == {0, 1, 2, 3}

    s = Semaphore(2)
    assert s.acquire() and s.acquire() and not s.acquire(timeout=0.01)
    s.release(2)
    assert s.get_value() == 2
    b = Semaphore(1, bounded=True)
    assert b.acquire()
    b.release()
    with pytest.raises(ValueError):
        b.release()

    r = Lock(recursive=True)
    assert r.is_recursive() and r.acquire() and r.acquire() and r.count() == 2 and r.is_mine()
    r.release()
    r.release()
    assert r.count() == 0
    with pytest.raises(AssertionError):
        r.release()


SCRIPT = """
import os
from dragon.native.queue import Queue
q = Queue()
q.put(b"x" * 100000)
print(os.environ["DRAGON_RUNTIME"].split(":")[1])
"""


def test_embedded_runtime_ends_with_the_script(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DRAGON_RUNTIME"}
    path = tmp_path / "s.py"
    path.write_text(textwrap.dedent(SCRIPT))
    r = subprocess.run([sys.executable, str(path)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    rt = r.stdout.strip()
    assert len(rt) == 16
    assert [n for n in os.listdir("/dev/shm") if n.startswith(f"dragon-{rt}-")] == []


def test_stale_runtime_is_a_clear_error(tmp_path):
    env = dict(os.environ, DRAGON_RUNTIME="1:00000000deadbeef:0:1.0.0.0")
    code = "from dragon.native.queue import Queue; Queue()"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "RuntimeGone" in r.stderr and "is gone" in r.stderr


def fill_and_send(q, n):
    a = np.arange(n, dtype=np.float64)
    q.put({"a": a, "b": bytes(range(256)) * 4096, "tag": "big"})


def test_numpy_values_arrive_as_views_of_one_block():
    q = Queue()
    p = Process(target=fill_and_send, args=(q, 2_000_000))
    p.start()
    v = q.get(timeout=60)
    assert p.join(60) == 0
    a = v["a"]
    assert a.shape == (2_000_000,) and a[123456] == 123456.0 and v["tag"] == "big"
    assert v["b"] == bytes(range(256)) * 4096
    # The array views shared memory (not a private copy): its buffer is not owned by numpy.
    assert not a.flags.owndata and a.base is not None
    q.put(b"raw bytes fast path" * 1000)
    assert q.get(timeout=5) == b"raw bytes fast path" * 1000


def bump(v, arr, n):
    for _ in range(n):
        with v:
            v.value += 1
        with arr:
            arr[0] += 1.5


def test_value_and_array_across_processes():
    from dragon.native.array import Array
    from dragon.native.value import Value

    v = Value("i", 0, lock=True)
    arr = Array("d", [0.0, 2.0, 3.0])
    pg = ProcessGroup()
    pg.add_process(nproc=3, template=ProcessTemplate(target=bump, args=(v, arr, 100)))
    pg.init()
    pg.start()
    pg.join(120)
    pg.close()
    assert v.value == 300 and arr[0] == 450.0 and arr[1:] == [2.0, 3.0] and len(arr) == 3
    c = Array("c", b"hello")
    assert c.value == b"hello" and c.raw == b"hello"
    with pytest.raises(TypeError):
        Value("z")
    plain = Value("d", 1.5)
    assert plain.value == 1.5 and plain.get_lock() is None


def consume_and_mark(q, n):
    for _ in range(n):
        q.get()
        q.task_done()


def test_joinable_queue():
    q = Queue(joinable=True)
    for i in range(20):
        q.put(i)
    with pytest.raises(TimeoutError):
        q.join(timeout=0.05)
    p = Process(target=consume_and_mark, args=(q, 20))
    p.start()
    q.join(timeout=60)
    assert p.join(60) == 0
    with pytest.raises(ValueError):
        q.task_done()
    with pytest.raises(ValueError):
        Queue().task_done()


def test_barrier_action_runs_once_per_generation():
    counter = Queue()
    b = Barrier(1, action=lambda: counter.put("ran"))
    assert b.wait(5) == 0 and b.wait(5) == 0
    assert [counter.get(timeout=5), counter.get(timeout=5)] == ["ran", "ran"]
    assert counter.empty()

    def boom():
        raise RuntimeError("action failed")

    bad = Barrier(1, action=boom)
    with pytest.raises(RuntimeError, match="action failed"):
        bad.wait(5)
    assert bad.broken


def test_queue_serialize_attach():
    q = Queue()
    desc = q.serialize()
    other = Queue.attach(desc)
    other.put("via the descriptor")
    assert q.get(timeout=5) == "via the descriptor"
    with pytest.raises(ValueError):
        Queue.attach(__import__("pickle").dumps(42))


def test_driver_functions_start_without_cloudpickle(tmp_path):
    """A target of the driver script travels by value; plain ones load without cloudpickle
    (a short-lived child saves ~50 ms), classes of the script still work (cloudpickle)."""
    script = tmp_path / "drv.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            from dragon.native.process import Process

            K = 21

            def twice(x):
                return 2 * x

            def child(path):
                with open(path, "w") as f:
                    f.write(f"{'cloudpickle' in sys.modules} {twice(K)}")

            class Box:
                def __init__(self, v):
                    self.v = v

            def child_box(path, box):
                with open(path, "w") as f:
                    f.write(str(box.v))

            if __name__ == "__main__":
                for target, args in ((child, (sys.argv[1],)), (child_box, (sys.argv[2], Box(7)))):
                    p = Process(target=target, args=args)
                    p.start()
                    p.join()
                    assert p.returncode == 0
            """
        )
    )
    a, b = tmp_path / "a", tmp_path / "b"
    env = {k: v for k, v in os.environ.items() if k != "DRAGON_RUNTIME"}
    r = subprocess.run(
        [sys.executable, str(script), str(a), str(b)], capture_output=True, text=True, env=env, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert a.read_text() == "False 42"
    assert b.read_text() == "7"
