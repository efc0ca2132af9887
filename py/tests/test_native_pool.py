"""dragon.native.pool.Pool with real worker processes."""

import os
import time

import pytest
from dragon.infrastructure.policy import Policy
from dragon.native.pool import Pool


def square(x):
    return x * x


def add(a, b, c=0):
    return a + b + c


def fail(x):
    raise ValueError(f"bad {x}")


def where(_):
    return sorted(os.sched_getaffinity(0))


def pid(_):
    time.sleep(0.01)
    return os.getpid()


def init_marker(path):
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")


def test_map_apply_starmap_imap():
    with Pool(2) as p:
        assert p.map(square, range(100)) == [x * x for x in range(100)]
        assert p.apply(add, (1, 2), {"c": 3}) == 6
        assert p.starmap(add, [(1, 2), (3, 4)]) == [3, 7]
        assert list(p.imap(square, range(10))) == [x * x for x in range(10)]
        assert sorted(p.imap_unordered(square, range(10))) == [x * x for x in range(10)]
        r = p.map_async(square, range(5))
        assert r.get(60) == [0, 1, 4, 9, 16] and r.ready() and r.successful()
        got = []
        p.apply_async(square, (7,), callback=got.append).wait(60)
        assert got == [49]


def test_errors_reach_the_caller():
    with Pool(2) as p:
        with pytest.raises(ValueError, match="bad 3"):
            p.apply(fail, (3,))
        errs = []
        r = p.map_async(fail, [1], error_callback=errs.append)
        r.wait(60)
        assert not r.successful() and isinstance(errs[0], ValueError)
        assert p.map(square, [2]) == [4]  # the pool keeps working
    with pytest.raises(ValueError):
        Pool(0)


def test_initializer_maxtasksperchild_and_close_join(tmp_path):
    marker = tmp_path / "init"
    p = Pool(2, initializer=init_marker, initargs=(str(marker),), maxtasksperchild=2)
    pids = set(p.map(pid, range(12), chunksize=1))
    p.close()
    p.join()
    assert len(pids) >= 3, "workers were replaced after maxtasksperchild tasks"
    assert len(marker.read_text().split()) >= len(pids)
    with pytest.raises(ValueError):
        p.apply(square, (1,))


def test_per_worker_policies():
    cpus = sorted(os.sched_getaffinity(0))
    policies = [Policy(cpu_affinity=[c]) for c in cpus]
    with Pool(policy=policies, processes_per_policy=1) as p:
        seen = {tuple(w) for w in p.map(where, range(50), chunksize=1)}
    assert seen <= {(c,) for c in cpus} and seen


def test_dead_worker_is_replaced():
    with Pool(1) as p:
        first = p.apply(os.getpid)
        os.kill(first, 9)
        deadline = time.monotonic() + 30
        while True:
            try:
                second = p.apply_async(os.getpid).get(5)
                break
            except TimeoutError:
                assert time.monotonic() < deadline
        assert second != first


def sleep_then_pid(t):
    time.sleep(t)
    return os.getpid()


def test_a_worker_killed_mid_task_fails_that_task_instead_of_hanging():
    # Found by the fault-injection suite (py/tests/faults): the task of a SIGKILLed worker
    # used to be lost and its result waited for forever.
    from dragon.native.pool import WorkerLostError

    with Pool(1) as p:
        victim = p.apply(os.getpid)
        r = p.apply_async(sleep_then_pid, (30,))
        time.sleep(0.5)  # the worker has taken the task and sleeps in it
        os.kill(victim, 9)
        with pytest.raises(WorkerLostError, match=f"worker {victim} was lost \\(signal 9\\)"):
            r.get(30)
        # The replacement runs the next task; a map with a lost chunk fails as a whole.
        assert p.apply(sleep_then_pid, (0,), {}) != victim
        m = p.map_async(sleep_then_pid, [0, 30, 0], chunksize=1)
        time.sleep(0.5)
        (worker,) = p._workers  # the replacement, asleep in the second chunk
        os.kill(worker, 9)
        with pytest.raises(WorkerLostError):
            m.get(30)
