"""The "dragon" multiprocessing start method (processes launched by the runtime)."""

import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import subprocess
import sys
import textwrap
import time

import dragon  # noqa: F401  (registers the start method)
from dragon.infrastructure.policy import Policy

CTX = mp.get_context("dragon")


def put_double(q, x):
    q.put(x * 2)


def report_affinity(conn):
    conn.send(sorted(os.sched_getaffinity(0)))
    conn.close()


def sleeper():
    time.sleep(60)


class Sub(CTX.Process):
    def __init__(self, q):
        super().__init__()
        self.q = q

    def run(self):
        self.q.put(("subclass", self.name, os.getpid()))


def test_registered_and_listed():
    assert "dragon" in mp.get_all_start_methods()
    assert CTX.get_start_method() == "dragon"


def test_process_semantics():
    q = CTX.Queue()
    ps = [CTX.Process(target=put_double, args=(q, i), name=f"w{i}") for i in range(3)]
    for p in ps:
        p.start()
    assert sorted(q.get(timeout=30) for _ in ps) == [0, 2, 4]
    for p in ps:
        p.join(30)
        assert p.exitcode == 0 and not p.is_alive() and p.name.startswith("w")
    p = CTX.Process(target=sleeper, daemon=True)
    p.start()
    assert p.is_alive() and p.pid > 0
    assert multiprocessing.connection.wait([p.sentinel], timeout=0.05) == []
    p.terminate()
    p.join(30)
    assert p.exitcode == -signal.SIGTERM
    p = CTX.Process(target=sleeper)
    p.start()
    p.kill()
    p.join(30)
    assert p.exitcode == -signal.SIGKILL
    s = Sub(q)
    s.start()
    kind, name, pid = q.get(timeout=30)
    s.join(30)
    assert kind == "subclass" and pid == s.pid and s.exitcode == 0


def test_policy_affinity_reaches_mp_children():
    cpu = sorted(os.sched_getaffinity(0))[-1]
    r, w = CTX.Pipe(duplex=False)
    with Policy(cpu_affinity=[cpu]):
        p = CTX.Process(target=report_affinity, args=(w,))
        p.start()
    assert r.recv() == [cpu]
    p.join(30)
    assert p.exitcode == 0


SCRIPT = """
{first}
{second}

def f(q):
    q.put(os.getpid())

if __name__ == "__main__":
    mp.set_start_method("dragon")
    q = mp.Queue()
    p = mp.Process(target=f, args=(q,))
    p.start()
    child = q.get(timeout=30)
    p.join()
    with mp.Pool(2) as pool:
        squares = pool.map(abs, [-1, -2, -3])
    print(child == p.pid, p.exitcode, squares)
"""


def test_import_order_and_set_start_method(tmp_path):
    for first, second in (
        ("import os, dragon", "import multiprocessing as mp"),
        ("import os, multiprocessing as mp", "import dragon"),
    ):
        path = tmp_path / "s.py"
        path.write_text(textwrap.dedent(SCRIPT.format(first=first, second=second)))
        r = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "True 0 [1, 2, 3]"


def test_submodules_resolve_without_import():
    code = "import dragon, multiprocessing as mp; print(mp.queues.Queue.__name__, mp.pool.Pool.__name__)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == ["Queue", "Pool"], r.stderr


def from_pickled(blob, tag):
    import cloudpickle

    q = cloudpickle.loads(blob)
    q.put(tag)


def bump_via_queue(inbox):
    value, lock, done = inbox.get(timeout=60)
    with lock:
        value.value += 1
    done.set()


def test_context_objects_can_be_shared_any_way():
    """DragonHPC's examples pickle a Queue by hand for many processes and pass Values
    through Queues; CPython's spawn objects refuse that, the dragon context's do not."""
    import cloudpickle

    q = CTX.Queue()
    blob = cloudpickle.dumps(q)  # one pickle, loaded by three processes
    ps = [CTX.Process(target=from_pickled, args=(blob, i)) for i in range(3)]
    for p in ps:
        p.start()
    assert sorted(q.get(timeout=60) for _ in ps) == [0, 1, 2]
    for p in ps:
        p.join(60)
        assert p.exitcode == 0
    inbox = CTX.Queue()
    value, lock = CTX.Value("i", 41), CTX.Lock()
    ev = CTX.Event()
    p = CTX.Process(target=bump_via_queue, args=(inbox,))
    p.start()
    inbox.put((value, lock, ev))  # through a queue: not a spawn
    assert ev.wait(60) and value.value == 42
    p.join(60)
    assert p.exitcode == 0
    # The spawn context keeps CPython's rule.
    import pytest

    with pytest.raises(RuntimeError, match="inheritance"):
        cloudpickle.dumps(mp.get_context("spawn").Queue())


def test_default_context_objects_after_set_start_method():
    code = textwrap.dedent("""
        import dragon, multiprocessing as mp, cloudpickle
        mp.set_start_method("dragon")
        q, v = mp.Queue(), mp.Value("d", 1.5)
        cloudpickle.loads(cloudpickle.dumps(q)).put("via a pickle")
        print(q.get(timeout=30), cloudpickle.loads(cloudpickle.dumps(v)).value)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == ["via", "a", "pickle", "1.5"], r.stderr


def relay(inbox, outbox):
    import cloudpickle

    value = cloudpickle.loads(inbox.get(timeout=60))
    value.value += 1
    outbox.put(cloudpickle.dumps(value))  # a second hop, from a process that received it


def test_shared_values_stay_shareable_after_a_hop():
    import cloudpickle

    inbox, outbox = CTX.Queue(), CTX.Queue()
    v = CTX.Value("i", 1)
    p = CTX.Process(target=relay, args=(inbox, outbox))
    p.start()
    inbox.put(cloudpickle.dumps(v))
    back = cloudpickle.loads(outbox.get(timeout=60))
    assert back.value == 2 == v.value
    p.join(60)
    assert p.exitcode == 0


def make_array(i):
    import numpy as np

    return np.full(1 << 20, i, dtype=np.float64)  # 8 MiB


def echo_conn(conn):
    obj = conn.recv()
    obj[0] = -1.0  # what the receiver got is writable, as under CPython
    conn.send(obj)
    conn.close()


def put_big(q, n):
    import numpy as np

    q.put({"a": np.arange(n, dtype=np.int64), "small": np.zeros(4), "b": bytearray(b"x" * n)})


def _in_pool_block(arr) -> bool:
    import dragon._native as native

    base = arr.base
    while base is not None and not isinstance(base, memoryview):
        base = getattr(base, "base", None)
    return isinstance(base, memoryview) and isinstance(base.obj, native.Block)


def test_large_buffers_cross_queues_pipes_and_pool_results_in_pool_blocks():
    import numpy as np
    from dragon import _runtime

    n = 1 << 20
    for q in (CTX.Queue(), CTX.SimpleQueue(), CTX.JoinableQueue()):
        p = CTX.Process(target=put_big, args=(q, n))
        p.start()
        got = q.get(timeout=60) if not isinstance(q, type(CTX.SimpleQueue())) else q.get()
        p.join(30)
        assert p.exitcode == 0
        assert np.array_equal(got["a"], np.arange(n)) and got["a"].flags.writeable
        assert _in_pool_block(got["a"]), "a large array must arrive in a pool block"
        assert not _in_pool_block(got["small"])  # small buffers stay in band
        assert got["b"] == bytearray(b"x" * n)
    a, b = CTX.Pipe()
    p = CTX.Process(target=echo_conn, args=(b,))
    p.start()
    a.send(np.arange(n, dtype=np.float64))
    back = a.recv()
    p.join(30)
    assert back[0] == -1.0 and back[1] == 1.0 and back[-1] == n - 1 and _in_pool_block(back)
    with CTX.Pool(2) as pool:
        res = pool.map(make_array, range(6))
    assert [float(r[7]) for r in res] == [float(i) for i in range(6)]
    assert all(_in_pool_block(r) for r in res)
    # The blocks go back to the pool when the last view goes.
    pool_ = _runtime.node_pool()
    del got, back, res
    import gc

    gc.collect()
    before = pool_.stats()["used"]
    with CTX.Pool(1) as pool:
        res = pool.map(make_array, range(3))
    peak = pool_.stats()["used"]
    # (small blocks of the runtime's own, such as a new process's reply channel, come and go)
    assert peak >= before + 3 * (8 << 20) - (1 << 20)
    del res
    gc.collect()
    assert pool_.stats()["used"] <= peak - 3 * (8 << 20)


def test_large_message_spills_when_the_pool_is_short(tmp_path):
    script = tmp_path / "full.py"
    script.write_text(
        textwrap.dedent(
            """
            import glob, mmap, multiprocessing as mp, os
            import numpy as np
            import dragon
            from dragon import _runtime

            def base_of(a):
                base = a.base
                while not isinstance(base, memoryview):
                    base = base.base
                return base.obj

            def segments():
                rt, _, _ = _runtime.parse_env(os.environ["DRAGON_RUNTIME"])
                return sorted(glob.glob(f"/dev/shm/dragon-{rt:016x}-*"))

            ctx = mp.get_context("dragon")
            a, b = ctx.Pipe()
            big = np.ones((48 << 20) // 8)  # larger than the 32 MiB pool: a spill segment
            a.send(big)
            assert any("-raw-" in s for s in segments()), segments()
            got = b.recv()
            assert got.nbytes == big.nbytes and float(got.sum()) == float(big.size)
            assert isinstance(base_of(got), mmap.mmap) and got.flags.writeable
            assert not any("-raw-" in s for s in segments()), "the receiver unlinks the spill"
            assert _runtime.node_pool().stats()["used"] < (1 << 20)
            q = ctx.Queue()
            q.put(big)
            assert float(q.get(timeout=30).sum()) == float(big.size)
            a.send(np.ones((4 << 20) // 8))  # fits: a pool block
            assert isinstance(base_of(b.recv()), dragon._native.Block)
            print("ok")
            """
        )
    )
    env = dict(os.environ, DRAGON_DEFAULT_SEG_SZ=str(32 << 20))
    env.pop("DRAGON_RUNTIME", None)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def square(x):
    return x * x


def test_process_pool_executor_with_the_dragon_context():
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=2, mp_context=CTX) as ex:
        assert list(ex.map(square, range(20))) == [x * x for x in range(20)]
        f = ex.submit(square, 12)
        assert f.result(timeout=60) == 144
        pids = set(ex.map(_pid, range(8)))
    assert len(pids) >= 1 and os.getpid() not in pids


def _pid(_):
    return os.getpid()
