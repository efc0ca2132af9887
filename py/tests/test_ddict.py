"""dragon.data.ddict.DDict with real processes."""

import os
import pickle
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from dragon import _runtime
from dragon.data.ddict import (
    DDict,
    DDictCheckpointSyncError,
    DDictError,
    DDictFrozenError,
    DDictFullError,
    DDictKeyError,
    DDictTimeoutError,
    PosixCheckpointPersister,
)
from dragon.native.event import Event
from dragon.native.machine import System
from dragon.native.process import Process, ProcessTemplate
from dragon.native.process_group import ProcessGroup

MiB = 1 << 20


def manager_pools():
    rt = _runtime.node_pool().name.split("-")[1]
    return sorted(
        n for n in os.listdir("/dev/shm") if n.startswith(f"dragon-{rt}-") and not n.endswith("-pool-1")
    )


@pytest.fixture
def dd():
    before = manager_pools()
    d = DDict(managers_per_node=2, n_nodes=1, total_mem=64 * MiB)
    yield d
    d.destroy()
    assert manager_pools() == before, "destroy() left manager pools behind"


def test_seed_example_runs_and_leaves_nothing():
    before = manager_pools()
    alloc = System()
    num_nodes = int(alloc.nnodes)
    dict_mem_per_node = 1 * 1024**3
    dist_dict = DDict(managers_per_node=1, n_nodes=num_nodes, total_mem=num_nodes * dict_mem_per_node)
    dist_dict["hello"] = "world"
    assert dist_dict["hello"] == "world"
    dist_dict.destroy()
    assert manager_pools() == before


def test_dict_protocol(dd):
    dd["a"] = 1
    dd[2] = [1, 2, 3]
    dd[b"k"] = b"raw bytes"
    dd[("t", 1)] = {"x": 1.5}
    assert dd["a"] == 1 and dd[2] == [1, 2, 3] and dd[b"k"] == b"raw bytes" and dd[("t", 1)] == {"x": 1.5}
    assert len(dd) == 4 and "a" in dd and "zz" not in dd
    assert sorted(map(repr, dd.keys())) == sorted(map(repr, ["a", 2, b"k", ("t", 1)]))
    assert sorted(map(repr, iter(dd))) == sorted(map(repr, dd.keys()))
    assert dict(dd.items())[2] == [1, 2, 3] and len(dd.values()) == 4
    dd["a"] = "replaced"
    assert dd["a"] == "replaced" and len(dd) == 4
    with pytest.raises(DDictKeyError) as ei:
        dd["missing"]
    assert isinstance(ei.value, KeyError) and isinstance(ei.value, DDictError)
    assert dd.get("missing", 7) == 7 and dd.get("a") == "replaced"
    del dd["a"]
    with pytest.raises(KeyError):
        del dd["a"]
    assert dd.pop(2) == [1, 2, 3] and dd.pop(2, "dflt") == "dflt"
    with pytest.raises(KeyError):
        dd.pop(2)
    k, v = dd.popitem()
    assert k in (b"k", ("t", 1)) and len(dd) == 1
    dd.update({"u1": 1, "u2": 2})
    assert dd.copy() == {**{kk: vv for kk, vv in dd.items()}} and len(dd.copy()) == 3
    dd.clear()
    assert len(dd) == 0 and list(dd.keys()) == []
    # Placement is stable and within range; manager(i) handles see only their manager.
    assert {dd.which_manager(f"key{i}") for i in range(50)} == {0, 1}
    m1 = dd.manager(1)
    m1["only-here"] = 5
    assert m1["only-here"] == 5 and dd.manager(0).get("only-here") is None
    assert list(m1.keys()) == ["only-here"]  # keys() is a view (DragonHPC's DDictKeysView)
    m1.detach()
    with pytest.raises(DDictError):
        dd.manager(2)


def test_bad_input_leaves_the_ddict_working(dd):
    lock = threading.Lock()
    with pytest.raises(TypeError):
        dd["k"] = lock
    with pytest.raises(TypeError):
        dd[lock] = 1
    dd["k"] = "fine"
    assert dd["k"] == "fine" and len(dd) == 1
    dd["f"] = lambda x: x * 3  # closures and lambdas travel by value
    assert dd["f"](3) == 9
    with pytest.raises((ValueError, AttributeError)):
        DDict(1, 1, 64 * MiB, working_set_size=0)
    with pytest.raises(ValueError):
        DDict(1, 1, 64 * MiB, wait_for_keys=True)
    with pytest.raises(AttributeError):
        DDict(1, 1, 64 * MiB, read_only=True)
    with pytest.raises(AttributeError):
        DDict(1, 1, 64 * MiB, persist_freq=2)
    with pytest.raises(ValueError):
        DDict(1, 1, 0)


def test_numpy_values_are_read_only_views_that_outlive_their_key(dd):
    a = np.arange(1_000_000, dtype=np.float64)
    dd["arr"] = a
    x, y = dd["arr"], dd["arr"]
    assert isinstance(x, np.ndarray) and (x == a).all()
    assert not x.flags.writeable and not x.flags.owndata
    assert np.shares_memory(x, y), "two gets of one key must view the same block"
    with pytest.raises(ValueError):
        x[0] = 1.0
    dd["arr"] = np.zeros(10)
    assert (dd["arr"] == 0).all() and x[999_999] == 999_999.0
    del dd["arr"]
    assert x[123] == 123.0 and y[5] == 5.0  # the views still read the old block
    holds_with_views = sum(s.current_pool_allocations_used for s in dd.stats)
    del x, y
    assert sum(s.current_pool_allocations_used for s in dd.stats) < holds_with_views


def writer(d, base, n):
    for i in range(n):
        d[f"{base}-{i}"] = np.full(1000, base * 100000 + i, dtype=np.int64)


def reader(d, bases, n, out):
    bad = 0
    for b in bases:
        for i in range(n):
            v = d[f"{b}-{i}"]
            bad += int(v[0] != b * 100000 + i or v.shape != (1000,))
    out["r" + str(os.getpid())] = bad


def test_many_writers_and_readers_in_processes(dd):
    n = 300
    grp = ProcessGroup()
    for b in range(4):
        grp.add_process(1, ProcessTemplate(target=writer, args=(dd, b, n)))
    grp.init()
    grp.start()
    grp.join(120)
    grp.close()
    assert len(dd) == 4 * n
    readers = [Process(target=reader, args=(dd, range(4), n, dd)) for _ in range(2)]
    for p in readers:
        p.start()
    for p in readers:
        assert p.join(120) == 0
    assert [dd[f"r{p.pid}"] for p in readers] == [0, 0]
    # A DDict pickled by hand attaches too.
    d2 = pickle.loads(pickle.dumps(dd))
    assert d2["3-7"][0] == 300007
    d3 = DDict.attach(dd.serialize())
    assert len(d3) == len(dd)
    d2.detach()
    d3.detach()


def adder(d, n):
    for _ in range(n):
        d.fetch_add("counter", 1)


def test_fetch_add_bput_bget_freeze(dd):
    ps = [Process(target=adder, args=(dd, 200)) for _ in range(3)]
    for p in ps:
        p.start()
    for p in ps:
        assert p.join(120) == 0
    assert dd["counter"] == 600
    dd.bput("everywhere", {"v": 1})
    assert dd.bget("everywhere") == {"v": 1}
    assert all(dd.manager(i).get("everywhere") == {"v": 1} for i in range(2))
    dd.start_batch_put(persist=True)
    dd["b1"] = 1
    dd.end_batch_put()
    assert dd["b1"] == 1
    dd.freeze()
    assert dd.is_frozen()
    with pytest.raises(DDictFrozenError):
        dd["x"] = 1
    with pytest.raises(DDictFrozenError):
        del dd["b1"]
    assert dd["b1"] == 1
    dd.unfreeze()
    dd["x"] = 1
    st = dd.stats
    # counter, b1, x and one copy of "everywhere" on each of the 2 managers
    assert len(st) == 2 and sum(s.num_keys for s in st) == 5 == len(dd)
    assert dd.local_managers == [0, 1] and dd.main_manager in (0, 1)


def test_full_is_prompt_and_keeps_earlier_values():
    d = DDict(managers_per_node=1, n_nodes=1, total_mem=8 * MiB)
    try:
        stored = 0
        t = time.monotonic()
        with pytest.raises(DDictFullError):
            for i in range(100):
                d[i] = np.full(MiB // 8, i, dtype=np.int64)
                stored += 1
        assert time.monotonic() - t < 10
        assert stored >= 2
        for i in range(stored):
            assert d[i][0] == i and d[i].shape == (MiB // 8,)
        del d[0]
        d["again"] = np.ones(MiB // 8)  # deleting frees room
        assert d["again"].sum() == MiB // 8
    finally:
        d.destroy()


def test_checkpoints_working_set_and_rollback():
    d = DDict(1, 1, 32 * MiB, working_set_size=2)
    try:
        d["k"] = "v0"
        d["only0"] = "zero"
        d.checkpoint()
        assert d.checkpoint_id == 1
        assert d["k"] == "v0"  # older checkpoints are visible (keys persist without wait_for_keys)
        d["k"] = "v1"
        assert d["k"] == "v1"
        d.rollback()
        assert d["k"] == "v0"
        d.checkpoint()
        del d["only0"]
        assert "only0" not in d
        d.rollback()
        assert d["only0"] == "zero"  # deletion at checkpoint 1 masks only from 1 on
        d.checkpoint()
        d.checkpoint()
        d["k"] = "v2"  # advances the working set to (1, 2): checkpoint 0 retires
        assert d["k"] == "v2"
        other = DDict.attach(d.serialize())
        other.sync_to_newest_checkpoint()
        assert other.checkpoint_id == 2 and other["k"] == "v2"
        other.detach()
        d.checkpoint_id = 0
        with pytest.raises(DDictCheckpointSyncError):
            d["k"]
        with pytest.raises(DDictCheckpointSyncError):
            d["k"] = "late"
    finally:
        d.destroy()


def write_at(d, chkpt, key, value, ready):
    ready.wait(60)
    d.checkpoint_id = chkpt
    d[key] = value


def test_wait_for_keys():
    d = DDict(1, 1, 32 * MiB, working_set_size=3, wait_for_keys=True, timeout=60)
    try:
        d["plain"] = "p0"
        d.pput("persist", "P0")
        d.checkpoint()
        assert d["persist"] == "P0"  # persistent keys carry over
        ev = Event()
        p = Process(target=write_at, args=(d, 1, "plain", "p1", ev))
        p.start()
        ev.set()
        assert d["plain"] == "p1"  # waits for checkpoint 1's value, not checkpoint 0's
        assert p.join(60) == 0
        quick = DDict.attach(d.serialize(), timeout=0.2)
        quick.checkpoint_id = 2
        t = time.monotonic()
        with pytest.raises(DDictTimeoutError):
            quick["plain"]
        assert time.monotonic() - t < 5
        assert quick["persist"] == "P0"
        quick.detach()
    finally:
        d.destroy()


def test_named_ddicts_and_persistence_across_runtimes(tmp_path):
    path = str(tmp_path)
    d = DDict(
        1,
        1,
        16 * MiB,
        name="pers",
        persist_freq=1,
        persist_path=path,
        persister_class=PosixCheckpointPersister,
        working_set_size=2,
    )
    try:
        with pytest.raises(DDictError):
            DDict(1, 1, 16 * MiB, name="pers")
        d["a"] = np.arange(5)
        d["b"] = "bee"
        d.persist()
        assert d.persisted_ids() == [0]
    finally:
        d.destroy()
    # Another program (a new runtime) brings the DDict back by name.
    code = textwrap.dedent(f"""
        from dragon.data.ddict import DDict, PosixCheckpointPersister
        d = DDict(1, 1, 16 * 2**20, name="pers", restart=True, persist_path={path!r},
                  persister_class=PosixCheckpointPersister)
        print(d["a"].tolist(), d["b"], d.checkpoint_id)
        d.destroy()
    """)
    env = {k: v for k, v in os.environ.items() if k != "DRAGON_RUNTIME"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["[0,", "1,", "2,", "3,", "4]", "bee", "0"], r.stdout


def test_read_only_restore(tmp_path):
    path = str(tmp_path)
    d = DDict(1, 1, 16 * MiB, name="ro", persist_path=path, persister_class=PosixCheckpointPersister)
    d["x"] = 42
    d.persist()
    d.destroy()
    r = DDict(
        1,
        1,
        16 * MiB,
        name="ro",
        read_only=True,
        restore_from=0,
        persist_path=path,
        persister_class=PosixCheckpointPersister,
    )
    try:
        assert r["x"] == 42
        with pytest.raises((DDictError, DDictFrozenError)):
            r["x"] = 1
    finally:
        r.destroy()


def test_dragon_shm_shows_ddict_managers(dd):
    import json

    dd["a"] = np.arange(1000)
    dd["b"] = 1
    dd["c"] = "three"
    tool = os.path.join(os.path.dirname(sys.executable), "dragon-shm")

    def show(i):
        r = subprocess.run([tool, "show", dd._mgrs[i].pool_name, "--json"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["ddict_manager"]

    m = dd.which_manager("a")
    before = show(m)
    assert sum(show(i)["keys"] for i in range(2)) == 3
    view = dd["a"]
    during = show(m)
    assert during["process_holds"] == before["process_holds"] + 1 and during["gets"] == before["gets"] + 1
    del view
    assert show(m)["process_holds"] == before["process_holds"]


def test_restart_within_the_runtime_and_names():
    d = DDict(1, 1, 16 * MiB, working_set_size=2, wait_for_keys=True)
    name = d.get_name()
    assert len(name) == 10  # unnamed DDicts get a name, as under DragonHPC
    d["k"] = "kept"
    d.destroy(allow_restart=True)
    back = DDict(1, 1, 16 * MiB, working_set_size=2, wait_for_keys=True, name=name, restart=True)
    try:
        assert back["k"] == "kept" and back.empty_managers == []
    finally:
        back.destroy()
    fresh = DDict(1, 1, 16 * MiB, name="never-made", restart=True)
    try:
        assert fresh.empty_managers == [0] and len(fresh) == 0
    finally:
        fresh.destroy()


def late_writer(d, ev):
    ev.wait(60)
    d["late"] = "here"


def test_wait_for_keys_waits_for_keys_not_written_yet():
    d = DDict(1, 1, 16 * MiB, working_set_size=2, wait_for_keys=True, timeout=60)
    try:
        ev = Event()
        p = Process(target=late_writer, args=(d, ev))
        p.start()
        ev.set()
        assert d["late"] == "here"  # waits instead of raising DDictKeyError
        assert p.join(60) == 0
        # A writer cannot retire checkpoint 0 while its non-persistent keys are missing in 1.
        w = DDict.attach(d.serialize(), timeout=0.3)
        w.checkpoint_id = 2
        with pytest.raises(DDictTimeoutError):
            w["x"] = 1
        d.checkpoint()
        d["late"] = "again"  # checkpoint 1 now has every key of 0
        w["x"] = 1  # so 0 can retire and 2 begin
        assert w["x"] == 1
        w.detach()
    finally:
        d.destroy()


def read_late(d, q):
    q.put(d["later"])


def test_waiting_for_a_key_sleeps_until_it_is_written():
    """A reader waiting for a key (wait_for_keys) sleeps on its manager's change count, not
    in a poll loop: while it waits the manager's index shows one sleeper, and the write
    wakes it. (On several nodes the sleeper is the manager node's object server thread.)"""
    d = DDict(1, 1, 16 * MiB, working_set_size=2, wait_for_keys=True, timeout=60)
    try:
        from dragon.native.queue import Queue

        q = Queue()
        p = Process(target=read_late, args=(d, q))
        p.start()
        kv = d._mgrs[0].kv
        deadline = time.monotonic() + 60
        while kv.stats()["change_waiters"] == 0:
            assert time.monotonic() < deadline, "the reader never went to sleep on the index"
            assert p.join(0.01) is None, "the reader ended without the key"
        assert not q.poll()
        d["later"] = "written"
        assert q.get(timeout=60) == "written"
        assert p.join(60) == 0
        assert kv.stats()["change_waiters"] == 0
    finally:
        d.destroy()


def test_seed_ddict_example_and_nothing_left_after_the_script():
    here = os.path.dirname(os.path.abspath(__file__))
    example = os.path.join(here, "..", "..", "examples", "seed_ddict.py")
    env = {k: v for k, v in os.environ.items() if k != "DRAGON_RUNTIME"}
    dragon = os.path.join(os.path.dirname(sys.executable), "dragon")
    r = subprocess.run([dragon, example], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("4 keys, total 6000, managers on 1 node(s)"), r.stderr
    # A script that never destroys its DDict: the runtime's end removes the manager pools.
    code = (
        "from dragon.data.ddict import DDict; import os; d = DDict(2, 1, 64 << 20); d['k'] = 1; "
        "print(os.environ['DRAGON_RUNTIME'].split(':')[1])"
    )
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    rt = r.stdout.strip()
    assert r.returncode == 0 and len(rt) == 16, r.stderr
    assert [n for n in os.listdir("/dev/shm") if n.startswith(f"dragon-{rt}-")] == []


def _cpu_ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:  # ended meanwhile
        return 0
    return int(fields[11]) + int(fields[12])  # utime + stime


def _pids():
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return -1


def test_idle_managers_use_no_cpu():
    """Managers are shared-memory indexes, not spinning processes: with a DDict of two
    managers holding data and nobody using it, the runtime's processes stay idle."""
    d = DDict(managers_per_node=2, n_nodes=1, total_mem=16 * MiB)
    try:
        for i in range(200):
            d[f"k{i}"] = np.full(256, i)
        agent = _runtime._embedded_agent
        assert agent is not None
        procs = [agent] + [p for p in _pids() if _ppid(p) == agent]
        before = {p: _cpu_ticks(p) for p in procs}
        t0 = time.monotonic()
        time.sleep(2.0)  # the measurement window (no synchronisation depends on it)
        used = sum(max(0, _cpu_ticks(p) - before[p]) for p in procs)
        ticks = os.sysconf("SC_CLK_TCK") * (time.monotonic() - t0)
        # At most 2 % of one CPU (the agent's reaper wakes twice a second).
        assert used <= max(2, 0.02 * ticks), f"{used} ticks in {ticks:.0f}"
        assert d["k7"][3] == 7
    finally:
        d.destroy()


THREADS = """
import threading
import numpy as np
from dragon.data.ddict import DDict

d = DDict(managers_per_node=1, n_nodes=1, total_mem=64 << 20)
def work(t):
    for i in range(400):
        d[(t, i % 20)] = np.full(2000, i)
        assert d[(t, i % 20)][0] == i
        len(d)
ts = [threading.Thread(target=work, args=(t,)) for t in range(4)]
[t.start() for t in ts]
[t.join() for t in ts]
print("threads done", len(d), flush=True)
d.destroy()
"""


def test_one_handle_used_by_many_threads_at_once(tmp_path):
    """Threads of one process share a DDict handle (the object server does so for every
    client of a node): a thread waiting for the handle must not hold the GIL, or the thread
    inside an operation can never return (the whole process froze). In a child process,
    so that a freeze is a time-out here rather than a hung test run."""
    script = tmp_path / "threads.py"
    script.write_text(THREADS)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "threads done 80" in r.stdout
