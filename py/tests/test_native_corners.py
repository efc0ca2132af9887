"""Corners of DragonHPC's native API (issue 19, item 4), with real processes: ProcessGroup's
error names, Queue's ``size``/``node``/``thread_wait``/``QueueError``, the native Pool's
``ApplyResult``/``MapResult``/``kill``/``terminate(patience)``; ``Process.parent()``/``children()``
and ``ProcessTemplate.sdesc``/``from_sdict``; the "dragon" start method's
``Pool.terminate(patience=)`` (with DragonHPC's own unit test of it, read from its repository:
``DRAGONHPC_REPO``, skipped when absent)."""

import os
import threading
import time

import numpy as np
import pytest
from dragon.exceptions import ProcessError
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
    q2 = Queue()
    q2.close()
    with pytest.raises(ValueError):
        q2.size()  # as DragonHPC: a closed handle
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

    # join(patience): after close, workers still busy after the patience are stopped
    p = Pool(2)
    r = p.apply_async(nap, (60,))
    quick = p.apply_async(square, (3,))
    assert quick.get(30) == 9
    p.close()
    t0 = time.monotonic()
    p.join(patience=0.5)
    assert 0.4 < time.monotonic() - t0 < 15 and not r.ready()


# ----- Process: parent(), children(), ProcessTemplate ---------------------------------------


def sleeper(seconds):
    time.sleep(seconds)


def family_child(q, go):
    """Starts a grandchild, reports the family as this child sees it, waits for ``go``."""
    from dragon.native.process import Process, current

    me = current()
    g = Process(sleeper, args=(60,))
    g.start()
    par = me.parent()
    q.put(
        {
            "me": me.puid,
            "parent": None if par is None else par.puid,
            "parent_pid": None if par is None else par.pid,
            "parent_alive": None if par is None else par.is_alive,
            "children": [c.puid for c in me.children()],
            "grandchild": g.puid,
            "grandchild_parent": g.parent().puid,
        }
    )
    go.get()
    g.kill()
    g.join()


def test_parent_and_children():
    from dragon import _runtime
    from dragon.native.process import Process, current

    me = current()
    assert me.parent() is None  # the top: no process of the runtime started pytest
    q, go = Queue(), Queue()
    p = Process(family_child, args=(q, go))
    p.start()
    seen = q.get(timeout=30)
    assert seen["me"] == p.puid
    assert seen["parent"] == _runtime.my_puid() == me.puid
    assert seen["parent_pid"] == os.getpid() and seen["parent_alive"] is True
    assert seen["children"] == [seen["grandchild"]]
    assert seen["grandchild_parent"] == p.puid
    # the same family seen from here, through the runtime's records
    assert [c.puid for c in p.children()] == [seen["grandchild"]]
    assert p.puid in [c.puid for c in me.children()]
    g = Process(None, ident=seen["grandchild"])
    assert g.parent().puid == p.puid and g.parent().pid == p.pid
    assert g.children() == []
    go.put(1)
    assert p.join(60) == 0
    # children() lists live children only
    assert p.children() == []
    assert p.puid not in [c.puid for c in me.children()]
    with pytest.raises(ProcessError):
        Process(sleeper, args=(0,)).parent()  # not started
    q.destroy()
    go.destroy()


def test_process_is_a_template_with_sdesc():
    import json
    import sys

    from dragon.infrastructure.policy import Policy
    from dragon.native.process import Process, ProcessTemplate

    assert issubclass(Process, ProcessTemplate)
    with pytest.raises(NotImplementedError):
        ProcessTemplate(sleeper, args=(0,)).start()
    q = Queue()
    pol = Policy(cpu_affinity=[0])
    here = os.path.dirname(os.path.abspath(__file__))  # the child imports this module
    t = ProcessTemplate(put_later, args=(q, 0), cwd=here, env={"A": "1"}, policy=pol)
    sd = json.loads(json.dumps(t.sdesc))  # plain values only
    assert sd == t.get_sdict()
    assert sd["is_python"] is True and sd["target"] == sys.executable and sd["argdata"]
    assert sd["cwd"] == here and sd["env"] == {"A": "1"}
    t2 = ProcessTemplate.from_sdict(sd)
    assert t2.is_python and t2.cwd == here and t2.env == {"A": "1"}
    assert t2.policy.cpu_affinity == [0]
    f, args, kwargs = t2.get_original_python_parameters()
    assert f.__name__ == "put_later" and kwargs == {}
    p = Process.from_template(t2)
    assert isinstance(p, ProcessTemplate) and p.cwd == here and p.env == {"A": "1"}
    p.start()
    assert q.get(timeout=30) == "late" and p.join(60) == 0
    # a Process's own sdesc, and a Process made from an sdict (unstarted)
    p2 = Process.from_sdict(p.sdesc)
    assert isinstance(p2, Process) and p2.puid is None
    p2.start()
    assert q.get(timeout=30) == "late" and p2.join(60) == 0
    # an executable target
    te = ProcessTemplate("true", args=("x",))
    sde = te.sdesc
    assert sde["is_python"] is False and sde["target"] == "true" and sde["args"] == ["x"]
    assert sde["argdata"] is None and sde["policy"] is None
    pe = Process.from_sdict(sde)
    pe.start()
    assert pe.join(60) == 0
    with pytest.raises(ProcessError):
        Process(None, ident=pe.puid).get_sdict()  # a handle has no template
    q.destroy()


# ----- the "dragon" start method's Pool: terminate(patience=...) -----------------------------


def ignore_sigterm():
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def test_mp_pool_terminate_and_join_patience():
    import multiprocessing as mp

    ctx = mp.get_context("dragon")
    p = ctx.Pool(2)
    assert p.map(square, range(5)) == [0, 1, 4, 9, 16]
    p.map_async(nap, [0.1] * 1000, chunksize=1)
    t0 = time.monotonic()
    p.terminate(patience=1)
    p.join()
    assert time.monotonic() - t0 < 10
    # workers that ignore SIGTERM get SIGKILL once the patience is over
    p = ctx.Pool(2, initializer=ignore_sigterm)
    assert p.map(square, range(3)) == [0, 1, 4]
    p.map_async(nap, [60, 60], chunksize=1)  # both workers busy for a minute
    time.sleep(0.3)
    t0 = time.monotonic()
    p.terminate(patience=0.5)
    took = time.monotonic() - t0
    assert 0.4 < took < 10
    p.join()
    assert all(w.exitcode is not None for w in p._pool)
    # join(patience): close, then workers still busy after the patience are ended
    p = ctx.Pool(1, initializer=ignore_sigterm)
    p.apply_async(nap, (60,))
    time.sleep(0.3)
    p.close()
    t0 = time.monotonic()
    p.join(patience=0.5)
    assert time.monotonic() - t0 < 10
    with pytest.raises(ValueError):
        ctx.Pool(1).join(patience=1)  # still running


DRAGONHPC = os.environ.get("DRAGONHPC_REPO", "/work/.mirror/DragonHPC+dragon/repo")


@pytest.mark.skipif(not os.path.isdir(DRAGONHPC), reason="DragonHPC's source (DRAGONHPC_REPO) is not here")
def test_dragonhpc_pool_unittest_terminate_with_patience(tmp_path):
    """DragonHPC's multiprocessing unit test of Pool.terminate(patience=1), run unchanged (its
    files as they are in DragonHPC's repository) under our launcher."""
    import subprocess
    import sys

    for f in ("common.py", "test_pool.py"):
        src = subprocess.run(
            ["git", "-C", DRAGONHPC, "show", f"HEAD:examples/multiprocessing/unittests/{f}"],
            capture_output=True,
            check=True,
        ).stdout
        (tmp_path / f).write_bytes(src)
    dragon = os.path.join(os.path.dirname(sys.executable), "dragon")
    env = dict(os.environ)
    env.pop("DRAGON_RUNTIME", None)
    r = subprocess.run(
        [dragon, "test_pool.py", "-v", "WithProcessesTestPool.test_terminate"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "test_terminate" in r.stderr and "OK" in r.stderr, r.stderr


# ----- DDict: views, __missing__, wait_for, clone, filter, profile ----------------------------

MiB = 1 << 20


@pytest.fixture
def ddict():
    from dragon.data.ddict import DDict

    d = DDict(managers_per_node=4, n_nodes=1, total_mem=64 * MiB)
    yield d
    d.destroy()


def test_ddict_views(ddict):
    from dragon.data.ddict import DDictItemsView, DDictKeysView, DDictMappingProxy, DDictValuesView

    d = ddict
    for i in range(10):
        d[f"k{i}"] = i
    ks, vs, its = d.keys(), d.values(), d.items()
    assert (
        isinstance(ks, DDictKeysView) and isinstance(vs, DDictValuesView) and isinstance(its, DDictItemsView)
    )
    assert len(ks) == len(vs) == len(its) == 10
    assert sorted(ks) == sorted(list(d.keys())) == [f"k{i}" for i in sorted(range(10), key=str)]
    assert "k3" in ks and "nope" not in ks
    assert 7 in vs and 70 not in vs
    assert ("k4", 4) in its and ("k4", 5) not in its and ("nope", 1) not in its and 3 not in its
    assert dict(its) == {f"k{i}": i for i in range(10)} == d.copy()
    d["k10"] = 10  # views are live
    del d["k0"]
    assert len(ks) == 10 and "k10" in ks and "k0" not in ks and sorted(vs) == list(range(1, 11))
    with pytest.raises(NotImplementedError):
        reversed(ks)
    # one node: the local views hold everything
    assert sorted(d.local_keys()) == sorted(ks) and len(d.local_items()) == 10 and "k5" in d.local_keys()
    assert sorted(d.local_values()) == list(range(1, 11))
    # a manager's handle sees its own keys only
    m = d.manager(d.which_manager("k5"))
    assert "k5" in m.keys() and len(m.keys()) < 10
    proxy = ks.mapping
    assert isinstance(proxy, DDictMappingProxy)
    assert proxy["k5"] == 5 and proxy.get("zz", 1) == 1 and len(proxy) == 10 and "k5" in proxy
    with pytest.raises(TypeError):
        proxy["k5"] = 6  # read-only
    with pytest.raises(TypeError):
        hash(proxy)
    m.detach()


def test_ddict_missing_hook(ddict):
    from dragon.data.ddict import DDict, DDictKeyError

    with pytest.raises(DDictKeyError):
        ddict["absent"]

    class Zeroes(DDict):
        def __missing__(self, key, *, err=None):
            return 0

    z = Zeroes.attach(ddict.serialize())
    z["one"] = 1
    assert z["one"] == 1 and z["absent"] == 0
    assert z.get("absent", 5) == 0  # as DragonHPC: get goes through d[key]
    assert ddict.get("absent", 5) == 5
    z.detach()


def write_later(d, key, value, delay):
    time.sleep(delay)
    d[key] = value
    d.detach()


def test_ddict_wait_for(ddict):
    from dragon.data.ddict import DDictTimeoutError
    from dragon.native.process import Process

    d = ddict
    d["hello"] = "there"
    d.wait_for("hello", "there")  # already there: returns at once
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        d.wait_for("hello", "world", 0.3)  # another value: waits, then times out
    assert time.monotonic() - t0 >= 0.29
    with pytest.raises(DDictTimeoutError):
        d.wait_for("absent", 1, 0.05)
    p = Process(write_later, args=(d, "hello", "world", 0.3))
    p.start()
    d.wait_for("hello", "world", 60)
    assert d["hello"] == "world"
    assert p.join(60) == 0
    arr = np.arange(1000.0)
    p = Process(write_later, args=(d, "arr", arr, 0.1))
    p.start()
    d.wait_for("arr", arr, 60)  # out-of-band buffers compare by their bytes
    assert p.join(60) == 0


def test_ddict_clone(ddict):
    from dragon.data.ddict import DDict, DDictError

    src = ddict
    for i in range(20):
        src[i] = f"v{i}"
    src.pput("p", np.arange(5))
    a = DDict(managers_per_node=4, n_nodes=1, total_mem=64 * MiB)
    b = DDict(managers_per_node=4, n_nodes=1, total_mem=64 * MiB)
    other = DDict(managers_per_node=2, n_nodes=1, total_mem=64 * MiB)
    try:
        a["junk"] = 1  # cleared by the clone
        src.clone([a.serialize(), b.serialize()])
        for t in (a, b):
            assert len(t) == 21 and "junk" not in t
            assert {k: t[k] for k in range(20)} == {i: f"v{i}" for i in range(20)}
            assert list(t["p"]) == [0, 1, 2, 3, 4]
        a[0] = "changed"  # a copy: the source is untouched
        assert src[0] == "v0"
        with pytest.raises(RuntimeError):
            src.clone([other.serialize()])  # different number of managers
        with pytest.raises(DDictError):
            src.clone([42])
        with pytest.raises(ValueError):
            src.clone([])
    finally:
        for t in (a, b, other):
            t.destroy()


def top_values(d, out, n):
    for v in sorted(d.values(), reverse=True)[:n]:
        out.put(v)


def greater(x, y):
    return x > y


def top_values_or_die(d, out, n):
    import signal

    if d.which_manager("any key") == 0:  # a manager's handle names its manager
        os.kill(os.getpid(), signal.SIGKILL)
    top_values(d, out, n)


def test_ddict_filter(ddict):
    d = ddict
    for i in range(200):
        d[f"k{i}"] = (i * 37) % 1000
    values = sorted(((i * 37) % 1000 for i in range(200)), reverse=True)
    counts = [0] * 4
    for i in range(200):
        counts[d.which_manager(f"k{i}")] += 1
    assert all(counts)  # every manager has keys
    # 4 managers, branching 2: a tree of aggregators over the per-manager processes
    for bf in (2, 5):
        with d.filter(top_values, (10,), greater, branching_factor=bf) as it:
            got = list(it)
        assert len(got) == 40 and got == sorted(got, reverse=True)
        assert got[:10] == values[:10]  # the overall top 10
    # leaving the block early stops the filter's processes (none is left: conftest checks)
    with d.filter(top_values, (100,), greater, 2) as it:
        assert next(it) == values[0]
    with pytest.raises(ValueError):
        d.filter(top_values, (1,), greater, 1)
    # a filter process that dies ends its stream: the others' values still come
    with d.filter(top_values_or_die, (5,), greater, 2) as it:
        got = list(it)
    assert len(got) == 15 and got == sorted(got, reverse=True)


def test_ddict_profile(ddict):
    text = ddict.profile()
    assert isinstance(text, str) and "Total Time" in text
    ddict.profile_reset()
    assert "Total Time" in ddict.profile()


def flood(dd, out_queue):
    try:
        for i in range(1000):
            out_queue.put(i)
    except EOFError:
        pass


def test_ddict_filter_reader_that_reads_nothing(ddict):
    """DragonHPC's test_filter_flood: writers fill their streams, the reader leaves the block
    without reading; every filter process ends."""
    ddict["a"] = 1
    t0 = time.monotonic()
    with ddict.filter(flood, (), greater):
        time.sleep(1)
    assert time.monotonic() - t0 < 30


# ----- the same corners over two local nodes, under the launcher -----------------------------

TWO_NODES = """
import time
from dragon.data.ddict import DDict
from dragon.infrastructure.policy import Policy
from dragon.native.process import Process, current
from dragon.native.queue import Queue


def node_of_manager(d, out):
    out.put((current().h_uid, d.manager_nodes[d.which_manager("x")].h_uid))


def never(x, y):
    return False


def far_child(q, go):
    me = current()
    g = Process(time.sleep, args=(60,))
    g.start()
    mine = Queue()  # made on this node
    q.put((me.h_uid, me.parent().puid, [c.puid for c in me.children()], g.puid, g.parent().puid, mine))
    go.get()
    g.kill()
    g.join()


if __name__ == "__main__":
    d = DDict(managers_per_node=1, n_nodes=2, total_mem=8 << 20)
    with d.filter(node_of_manager, (), never, 2) as it:
        pairs = sorted(it)
    print("filter", pairs, flush=True)
    d.destroy()
    q, go = Queue(), Queue()
    p = Process(far_child, args=(q, go), policy=Policy(placement=Policy.Placement.HOST_ID, host_id=2))
    p.start()
    node, parent, children, g, gparent, far_q = q.get(timeout=60)
    print("family", node, parent == current().puid, children == [g], gparent == p.puid, flush=True)
    print("from here", [c.puid for c in p.children()] == [g], Process(None, ident=g).parent().puid == p.puid)
    print("queue nodes", q.node, far_q.node, flush=True)
    go.put(1)
    print("joined", p.join(60), p.children(), flush=True)
    print("top", current().parent(), flush=True)  # the driver: the launcher is no process of ours
"""


def test_corners_on_two_local_nodes(tmp_path):
    """Filter processes run on their manager's node; parent()/children() and Queue.node work
    for processes and queues of another node."""
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(TWO_NODES))
    env = dict(os.environ)
    env.pop("DRAGON_RUNTIME", None)
    dragon = os.path.join(os.path.dirname(sys.executable), "dragon")
    r = subprocess.run(
        [dragon, "--local-nodes", "2", str(script)], capture_output=True, text=True, timeout=180, env=env
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "filter [(1, 1), (2, 2)]" in r.stdout, r.stdout + r.stderr
    assert "family 2 True True True" in r.stdout, r.stdout + r.stderr
    assert "from here True True" in r.stdout, r.stdout + r.stderr
    assert "queue nodes 1 2" in r.stdout, r.stdout + r.stderr
    assert "joined 0 []" in r.stdout, r.stdout + r.stderr
    assert "top None" in r.stdout, r.stdout + r.stderr
