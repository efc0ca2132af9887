"""Multi-node benchmark (issue 15), every figure with its baseline measured in the same run.

Rows, on 3 local nodes (``dragon --local-nodes 3``, node agents side by side on this host,
talking only through the transport) over ``tcp`` and over ``ofi`` (libfabric
``tcp;ofi_rxm``):

* a small request round trip between two nodes (a process on node 0 asks node 1's agent
  through its own: process -> agent 0 -> transport -> agent 1 -> back), beside a raw
  loopback TCP round trip between two processes (Python sockets, the same language as the
  driver) and the same request to the process's own agent;
* 48 processes started and joined, spread round robin over the 3 nodes, beside 48 on one
  node of the same runtime and stdlib ``spawn``;
* ``dragon --local-nodes 3 hello.py`` against ``python hello.py`` (start-up and teardown).

* native Queues made on node 0 used by a process on node 1 (through node 0's object
  server): a small object's round trip, beside the raw TCP round trip; 1 MiB and 64 MiB
  NumPy arrays node 1 -> node 0 (remote put) and node 0 -> node 1 (remote get), each
  streamed as raw TCP is (one side puts, the other gets; node 0 -> node 1 also in lockstep:
  a put here, the remote get, an ack back), beside raw loopback TCP bandwidth between two
  processes (Python sockets) measured in the same run.

* the "dragon" multiprocessing start method on 3 nodes beside a 1-node runtime: Pool(3).map
  of trivial tasks and of tasks returning 8 MiB arrays (workers round robin over the
  nodes), an mp.Queue small round trip and 64 MiB arrays with a process on node 2.

* a DDict with one manager per node: small put+get ops/s of one client per node at once
  (total) beside one client of a 1-node runtime; a 64 MiB get by a process of node 2 of a
  value whose manager is on node 1, beside raw loopback TCP bandwidth.

Ray, when it imports: a 3-node local Ray cluster (``ray.cluster_utils.Cluster``) in the same
run: ``ray.get`` of a 64 MiB array made on another node, and trivial tasks. With root and slurm-wlm, a private 3-node Slurm cluster (tests/slurm/up.sh)
times ``salloc -N3 dragon hello.py`` against ``salloc -N3 python hello.py``.

Usage: ``python multinode_bench.py [--quick]``; the driver parts run this file with
``--mode``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.abspath(__file__)
BIN = os.path.dirname(sys.executable)
DRAGON = os.path.join(BIN, "dragon")


def nothing():
    pass


# ----- parts that run inside a runtime ----------------------------------------------------


def mode_rtt(n: int) -> dict:
    from dragon import _runtime

    c = _runtime.agent()
    out = {}
    for name, call in (("local", lambda: c.ping()), ("remote", lambda: c.ping_node(1))):
        for _ in range(min(200, n)):
            call()
        t = time.perf_counter()
        for _ in range(n):
            call()
        out[name] = (time.perf_counter() - t) / n * 1e6
    return out


def mode_procs(n: int, spread: bool) -> dict:
    from dragon.infrastructure.policy import Policy
    from dragon.native.process import Process

    def run_once():
        pol = None if spread else Policy(placement=Policy.Placement.LOCAL)
        t = time.perf_counter()
        ps = [Process(target=nothing, policy=pol) for _ in range(n)]
        for p in ps:
            p.start()
        for p in ps:
            p.join()
        return (time.perf_counter() - t) / n * 1e3, sorted({p.node for p in ps})

    run_once()  # warm: imports, zygote-free fresh interpreters on every node
    times, nodes = zip(*(run_once() for _ in range(3)))
    return {"ms": statistics.median(times), "nodes": nodes[0]}


def _echo(q_in, q_out) -> None:
    """Worker of ``mode_queue``: sends back what it gets (an ack for arrays) until None."""
    import numpy as np

    while True:
        x = q_in.get()
        if x is None:
            return
        q_out.put(1 if isinstance(x, np.ndarray) else x)


# Messages each Queue measurement moves before its timing starts: the pool blocks that take
# turns (in the queue, in flight, being filled) are touched once by then on both sides, as
# the raw TCP baseline's buffers are after its warm message.
WARM = 4


def _produce(q, nbytes: int, count: int) -> None:
    """Worker of ``mode_queue``: puts ``count`` arrays of ``nbytes``."""
    import numpy as np

    a = np.ones(nbytes // 8, dtype=np.float64)
    for _ in range(count):
        q.put(a)


def _consume(q, count: int, done) -> None:
    """Worker of ``mode_queue``: gets ``WARM`` arrays and says it is ready, then gets
    ``count`` more and says how many bytes it got."""
    for _ in range(WARM):
        q.get()
    done.put("ready")
    total = 0
    for _ in range(count):
        total += q.get().nbytes
    done.put(total)


def mode_queue(n: int) -> dict:
    """Native Queues made on node 0 used by a process on node 1: a small object's round
    trip (put here, the remote process gets it and puts it back), and NumPy arrays both
    ways (node 1 puts / node 0 gets, and node 0 puts / node 1 gets), in MB/s."""
    import numpy as np

    from dragon.infrastructure.policy import Policy
    from dragon.native.process import Process
    from dragon.native.queue import Queue

    far = Policy(placement=Policy.Placement.HOST_ID, host_id=2)
    q_in, q_out = Queue(maxsize=4), Queue(maxsize=4)
    p = Process(target=_echo, args=(q_in, q_out), policy=far)
    p.start()
    for i in range(200):
        q_in.put(i)
        q_out.get()
    t = time.perf_counter()
    for i in range(n):
        q_in.put(i)
        q_out.get()
    out = {"rtt": (time.perf_counter() - t) / n * 1e6}
    for size, count in ((1 << 20, max(20, n // 100)), (64 << 20, 8)):
        a = np.ones(size // 8, dtype=np.float64)
        for _ in range(WARM):
            q_in.put(a)
            q_out.get()
        t = time.perf_counter()
        for _ in range(count):
            q_in.put(a)  # a local put; the remote process's get moves it to node 1
            q_out.get()
        out[f"to1_{size}"] = size * count / (time.perf_counter() - t) / 1e6
        # The same direction streaming (as from1 and raw TCP): node 0 puts, node 1 gets.
        q, done = Queue(maxsize=2), Queue()
        c = Process(target=_consume, args=(q, count, done), policy=far)
        c.start()
        for _ in range(WARM):
            q.put(a)
        assert done.get() == "ready"
        t = time.perf_counter()
        for _ in range(count):
            q.put(a)
        assert done.get() == size * count
        out[f"to1s_{size}"] = size * count / (time.perf_counter() - t) / 1e6
        c.join()
        q = Queue(maxsize=2)
        w = Process(target=_produce, args=(q, size, count + WARM), policy=far)
        w.start()
        for _ in range(WARM):
            q.get()
        t = time.perf_counter()
        for _ in range(count):
            q.get()  # the remote process's put moved it to node 0
        out[f"from1_{size}"] = size * count / (time.perf_counter() - t) / 1e6
        w.join()
    q_in.put(None)
    p.join()
    return out


def _ddict_client(d, seconds: float, out, local: bool = False) -> None:
    """Worker of ``mode_ddict``: small puts and gets (one of each per op pair) for
    ``seconds``; reports ops/s. ``local``: every key on this node's manager
    (``d.manager(d.local_manager)``, DragonHPC's way to keep a client's data on its node)."""
    import os

    if local:
        d = d.manager(d.local_manager)

    me = os.getpid()
    i = 0
    t = time.perf_counter()
    end = t + seconds
    while time.perf_counter() < end:
        for _ in range(50):
            k = f"{me}-{i % 1000}"
            d[k] = i
            d[k]
            i += 1
    out.put(2 * i / (time.perf_counter() - t))


def _ddict_big_get(d, count: int, out) -> None:
    """Worker of ``mode_ddict``: gets the 64 MiB value ``count`` times; reports MB/s."""
    # Two warm gets: each get lands in a block of this node while the previous value is
    # still held, so two blocks take turns; both are touched before the timing (as the raw
    # TCP baseline's one receive buffer is).
    v = d["big"]
    v = d["big"]
    t = time.perf_counter()
    for _ in range(count):
        v = d["big"]
    out.put(v.nbytes * count / (time.perf_counter() - t) / 1e6)


def mode_ddict(seconds: float) -> dict:
    """DDict with one manager per node: small put+get ops/s of one client per node (all at
    once), and 64 MiB gets by a process of another node than the value's manager."""
    import numpy as np

    from dragon.data.ddict import DDict
    from dragon.infrastructure.policy import Policy
    from dragon.native.machine import System
    from dragon.native.process import Process
    from dragon.native.queue import Queue

    n = System().nnodes
    d = DDict(managers_per_node=1, n_nodes=n, total_mem=n * (256 << 20))
    out = Queue()
    on = [Policy(placement=Policy.Placement.HOST_ID, host_id=k + 1) for k in range(n)]
    ps = [Process(target=_ddict_client, args=(d, seconds, out), policy=on[k]) for k in range(n)]
    for p in ps:
        p.start()
    rates = [out.get() for _ in ps]
    for p in ps:
        p.join()
    res = {"clients": n, "total": sum(rates), "per_client": rates}
    if n > 1:
        ps = [Process(target=_ddict_client, args=(d, seconds, out, True), policy=on[k]) for k in range(n)]
        for p in ps:
            p.start()
        res["total_local"] = sum(out.get() for _ in ps)
        for p in ps:
            p.join()
    if n > 1:
        m1 = d.manager(1)  # the value lives on node 1; the reader runs on node 2
        m1["big"] = np.ones(8 << 20, dtype=np.float64)
        p = Process(target=_ddict_big_get, args=(m1, 16, out), policy=on[2 % n])
        p.start()
        res["big_get"] = out.get()
        p.join()
    d.destroy()
    return res


def mode_spawn(n: int) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    times = []
    for _ in range(3):
        t = time.perf_counter()
        ps = [ctx.Process(target=nothing) for _ in range(n)]
        for p in ps:
            p.start()
        for p in ps:
            p.join()
        times.append((time.perf_counter() - t) / n * 1e3)
    return {"ms": statistics.median(times)}


# ----- baselines and orchestration --------------------------------------------------------


def _tcp_peer(body: str):
    """A child Python process connected to us over loopback TCP, running ``body`` with its
    socket in ``s``: returns (our connection, listener, child)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    code = f"import socket\ns=socket.create_connection(('127.0.0.1',{port}))\n" + body
    child = subprocess.Popen([sys.executable, "-c", code])
    conn, _ = srv.accept()
    return conn, srv, child


def raw_tcp_rtt(n: int) -> float:
    """Round trip of 8 bytes between two processes over loopback TCP (Python sockets)."""
    conn, srv, child = _tcp_peer(
        "s.setsockopt(socket.IPPROTO_TCP,socket.TCP_NODELAY,1)\n"
        "while True:\n"
        "    b=s.recv(8)\n"
        "    if not b: break\n"
        "    s.sendall(b)\n"
    )
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for _ in range(200):
        conn.sendall(b"x" * 8)
        conn.recv(8)
    t = time.perf_counter()
    for _ in range(n):
        conn.sendall(b"x" * 8)
        conn.recv(8)
    rtt = (time.perf_counter() - t) / n * 1e6
    conn.close()
    srv.close()
    child.wait()
    return rtt


def raw_tcp_bandwidth(size: int, count: int) -> float:
    """MB/s of ``size``-byte messages between two processes over loopback TCP (Python
    sockets: sendall from one buffer, recv_into another)."""
    settle()
    conn, srv, child = _tcp_peer(
        f"buf=bytearray({size}); mv=memoryview(buf)\n"
        "while True:\n"
        "    got=0\n"
        f"    while got<{size}:\n"
        "        k=s.recv_into(mv[got:])\n"
        "        if k==0: raise SystemExit\n"
        "        got+=k\n"
        "    s.sendall(b'k')\n"
    )
    data = bytearray(b"x" * size)
    conn.sendall(data)
    conn.recv(1)
    t = time.perf_counter()
    for _ in range(count):
        conn.sendall(data)
        conn.recv(1)
    bw = size * count / (time.perf_counter() - t) / 1e6
    conn.close()
    srv.close()
    child.wait()
    return bw


def _mp_trivial(x):
    return x


def _mp_big(i):
    import numpy as np

    return np.full(1 << 20, float(i))  # 8 MiB


def mode_mp(n: int) -> dict:
    """The "dragon" multiprocessing start method on this runtime (1 or 3 nodes): Pool(3).map
    of ``n`` trivial tasks (chunksize 1; the median of three maps) and of 100 tasks returning 8 MiB arrays, its workers
    round robin over the nodes; an mp.Queue small round trip and 64 MiB arrays with a
    process on the last node."""
    import multiprocessing as mp

    import numpy as np

    from dragon.infrastructure.policy import Policy
    from dragon.native.machine import System

    mp.set_start_method("dragon", force=True)
    out = {}
    with mp.Pool(3) as pool:
        pool.map(_mp_trivial, range(300), chunksize=1)
        rates = []
        for _ in range(3):  # the median of three (the first is often slower, on any node count)
            t = time.perf_counter()
            pool.map(_mp_trivial, range(n), chunksize=1)
            rates.append(n / (time.perf_counter() - t))
        out["map"] = statistics.median(rates)
        pool.map(_mp_big, range(6))
        t = time.perf_counter()
        res = pool.map(_mp_big, range(100))
        out["big"] = 100 * (8 << 20) / (time.perf_counter() - t) / 1e9
        assert sum(float(r[0]) for r in res) == sum(range(100))
    q_in, q_out = mp.Queue(), mp.Queue()
    with Policy(placement=Policy.Placement.HOST_ID, host_id=System().nnodes):
        p = mp.Process(target=_echo, args=(q_in, q_out))
        p.start()
    for i in range(200):
        q_in.put(i)
        q_out.get()
    m = max(200, n // 5)
    t = time.perf_counter()
    for i in range(m):
        q_in.put(i)
        q_out.get()
    out["rtt"] = (time.perf_counter() - t) / m * 1e6
    a = np.ones(8 << 20)  # 64 MiB
    q_in.put(a)
    q_out.get()
    t = time.perf_counter()
    for _ in range(4):
        q_in.put(a)
        q_out.get()
    out["to_far"] = 4 * a.nbytes / (time.perf_counter() - t) / 1e6
    q_in.put(None)
    p.join()
    return out


def mode_ray(n: int) -> dict:
    """A 3-node local Ray cluster (``ray.cluster_utils.Cluster``: the head and two more
    raylets on this host, each with its own object store and one CPU): ``ray.get`` in the
    driver (on the head) of a 64 MiB array a task made on another node, and ``n`` trivial
    tasks over the cluster."""
    import numpy as np
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    store = 400 << 20
    c = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "object_store_memory": store, "include_dashboard": False},
    )
    try:
        for _ in range(2):
            c.add_node(num_cpus=1, object_store_memory=store)
        ray.init(address=c.address, log_to_driver=False)
        c.wait_for_nodes()
        head = ray.get_runtime_context().get_node_id()
        far = next(x["NodeID"] for x in ray.nodes() if x["Alive"] and x["NodeID"] != head)

        @ray.remote(num_cpus=1)
        def make(size):
            return np.ones(size // 8)

        @ray.remote(num_cpus=1)
        def trivial(x):
            return x

        times = []
        for _ in range(6):
            ref = make.options(scheduling_strategy=NodeAffinitySchedulingStrategy(far, soft=False)).remote(64 << 20)
            ray.wait([ref], fetch_local=False)  # made on the far node; not moved yet
            t = time.perf_counter()
            v = ray.get(ref)
            float(v[-1])
            times.append(time.perf_counter() - t)
            del v, ref
        out = {"get64": (64 << 20) / statistics.median(times[1:]) / 1e6}
        ray.get([trivial.remote(i) for i in range(300)])
        t = time.perf_counter()
        ray.get([trivial.remote(i) for i in range(n)])
        out["tasks"] = n / (time.perf_counter() - t)
        out["nodes"] = len([x for x in ray.nodes() if x["Alive"]])
        return out
    finally:
        ray.shutdown()
        c.shutdown()


def _cpu_times() -> tuple[int, int]:
    """(idle, total) jiffies of all CPUs since boot."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]  # guest time is in user already
    return v[3] + v[4], sum(v)


def settle(limit: float = 10.0) -> None:
    """Waits (at most ``limit`` s) until the CPUs are at least 90% idle over 0.2 s: the kernel
    frees the last run's touched pool pages, and other host work, after a run ended, which
    would otherwise land in the next measurement."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        i0, t0 = _cpu_times()
        time.sleep(0.2)
        i1, t1 = _cpu_times()
        if t1 > t0 and (i1 - i0) / (t1 - t0) >= 0.9:
            return


def under_dragon(args: list[str], transport: str, nodes: int = 3) -> dict:
    settle()
    env = dict(os.environ)
    env.pop("DRAGON_RUNTIME", None)
    flags = ["--local-nodes", str(nodes), "-t", transport] if nodes > 1 else []
    r = subprocess.run(
        [DRAGON, *flags, HERE, *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )
    if r.returncode != 0:
        raise RuntimeError(f"dragon {' '.join(args)} failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def medians(runs: list[dict]) -> dict:
    """Per key, the median of the runs' numbers (other values from the first run)."""
    out = dict(runs[0])
    for k, v in runs[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = statistics.median(r[k] for r in runs)
    return out


def startup(cmd: list[str], rounds: int) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write("print('hello')\n")
    try:
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            subprocess.run([*cmd, f.name], check=True, capture_output=True, timeout=120)
            times.append(time.perf_counter() - t)
        return statistics.median(times)
    finally:
        os.unlink(f.name)


def slurm_startup(rounds: int) -> tuple[float, float] | str:
    """(salloc -N3 python hello.py, salloc -N3 dragon hello.py) medians on a private 3-node
    Slurm cluster (tests/slurm/up.sh), or why not."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
    up, down = (
        os.path.join(repo, "tests", "slurm", "up.sh"),
        os.path.join(repo, "tests", "slurm", "down.sh"),
    )
    if os.geteuid() != 0 or not os.path.exists("/usr/sbin/slurmctld"):
        return "needs root and slurm-wlm"
    d = tempfile.mkdtemp(prefix="dragon-slurm-bench-")
    r = subprocess.run(
        [up, d], capture_output=True, text=True, timeout=120, check=False
    )
    try:
        if r.returncode != 0:
            return f"cluster did not come up: {r.stderr.strip()[-300:]}"
        env = dict(os.environ, SLURM_CONF=r.stdout.strip().split("=", 1)[1])
        env.pop("DRAGON_RUNTIME", None)
        with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
            f.write("print('hello')\n")

        def median(cmd):
            times = []
            for _ in range(rounds):
                t = time.perf_counter()
                subprocess.run(
                    cmd + [f.name],
                    check=True,
                    capture_output=True,
                    timeout=120,
                    env=env,
                )
                times.append(time.perf_counter() - t)
            return statistics.median(times)

        try:
            return median(["salloc", "-N3", sys.executable]), median(
                ["salloc", "-N3", DRAGON]
            )
        finally:
            os.unlink(f.name)
    finally:
        subprocess.run([down, d], capture_output=True, timeout=120, check=False)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--mode", choices=["rtt", "procs", "procs-local", "spawn", "queue", "ddict", "mp", "ray"])
    ap.add_argument("-n", type=int, default=0)
    a = ap.parse_args()
    if a.mode == "rtt":
        print(json.dumps(mode_rtt(a.n)))
        return 0
    if a.mode in ("procs", "procs-local"):
        print(json.dumps(mode_procs(a.n, a.mode == "procs")))
        return 0
    if a.mode == "spawn":
        print(json.dumps(mode_spawn(a.n)))
        return 0
    if a.mode == "queue":
        print(json.dumps(mode_queue(a.n)))
        return 0
    if a.mode == "ddict":
        print(json.dumps(mode_ddict(a.n)))
        return 0
    if a.mode == "mp":
        print(json.dumps(mode_mp(a.n)))
        return 0
    if a.mode == "ray":
        print(json.dumps(mode_ray(a.n)))
        return 0

    n_rtt = 2000 if a.quick else 20000
    n_procs = 12 if a.quick else 48
    rounds = 3 if a.quick else 7
    print(
        f"# multi-node bench ({'quick' if a.quick else 'full'}), {os.cpu_count()} CPUs, 3 local nodes"
    )
    # Baselines: the median of three runs each (one run of loopback TCP varies by up to a
    # third on this kind of host).
    settle()
    raw = statistics.median(raw_tcp_rtt(n_rtt) for _ in range(3))
    rows = [
        ("raw loopback TCP round trip, 8 B, Python sockets (us)", raw, None, "baseline")
    ]
    raw_bw = {
        size: statistics.median(
            raw_tcp_bandwidth(size, max(20, n_rtt // 100) if size < 1 << 24 else 8) for _ in range(3)
        )
        for size in (1 << 20, 64 << 20)
    }
    for size, bw in raw_bw.items():
        rows.append((f"raw loopback TCP, {size >> 20} MiB messages, Python sockets (MB/s)", bw, None, "baseline"))
    ddict_get = None
    for transport in ("tcp", "ofi"):
        try:
            rtt = under_dragon(["--mode", "rtt", "-n", str(n_rtt)], transport)
        except RuntimeError as e:
            print(f"# {transport}: {e}")
            continue
        rows.append(
            (
                f"[{transport}] request to own agent, round trip (us)",
                rtt["local"],
                raw,
                "x raw TCP",
            )
        )
        rows.append(
            (
                f"[{transport}] request to node 1's agent, round trip (us)",
                rtt["remote"],
                raw,
                "x raw TCP",
            )
        )
        # Medians of 3 runs (this 2-CPU host moves single runs by up to 30-50%).
        qb = medians([under_dragon(["--mode", "queue", "-n", str(n_rtt // 4)], transport) for _ in range(3)])
        rows.append(
            (f"[{transport}] native Queue round trip node 0 <-> node 1, small object (us)", qb["rtt"], raw, "x raw TCP")
        )
        for size in (1 << 20, 64 << 20):
            mib = size >> 20
            rows.append(
                (f"[{transport}] Queue {mib} MiB NumPy node 1 -> node 0, remote put (MB/s)", qb[f"from1_{size}"], raw_bw[size], "x raw TCP")
            )
            rows.append(
                (f"[{transport}] Queue {mib} MiB NumPy node 0 -> node 1, remote get (MB/s)", qb[f"to1s_{size}"], raw_bw[size], "x raw TCP")
            )
            rows.append(
                (f"[{transport}] Queue {mib} MiB NumPy node 0 -> node 1, put+remote get+ack lockstep (MB/s)", qb[f"to1_{size}"], raw_bw[size], "x raw TCP")
            )
        secs = "1" if a.quick else "3"
        # Medians of 3 runs each, the 1-node and 3-node runs alternated (the 3-client total
        # sits at the 2 CPUs' ceiling of 2x one client, so single runs fall on either side).
        dds, ones = [], []
        for _ in range(3):
            dds.append(under_dragon(["--mode", "ddict", "-n", secs], transport))
            ones.append(under_dragon(["--mode", "ddict", "-n", secs], transport, nodes=1))
        dd, one = medians(dds), medians(ones)
        rows.append((f"[{transport}] DDict small put+get, 1 client on a 1-node runtime (ops/s)", one["total"], None, "baseline"))
        rows.append(
            (f"[{transport}] DDict small put+get, 1 client per node x 3, total (ops/s)", dd["total"], one["total"], "x 1 client")
        )
        rows.append(
            (
                f"[{transport}] DDict small put+get, 1 client per node x 3, each on its node's manager, total (ops/s)",
                dd["total_local"],
                one["total"],
                "x 1 client",
            )
        )
        rows.append(
            (f"[{transport}] DDict 64 MiB get, value on node 1, reader on node 2 (MB/s)", dd["big_get"], raw_bw[64 << 20], "x raw TCP")
        )
        if transport == "tcp":
            ddict_get = dd["big_get"]
        spread = under_dragon(["--mode", "procs", "-n", str(n_procs)], transport)
        rows.append(
            (
                f"[{transport}] {n_procs} processes start+join over nodes {spread['nodes']} (ms/proc)",
                spread["ms"],
                None,
                "",
            )
        )
    # The "dragon" start method over 3 nodes, beside the same code on a 1-node runtime.
    n_map = 2000 if a.quick else 10000
    mp3 = under_dragon(["--mode", "mp", "-n", str(n_map)], "tcp")
    mp1 = under_dragon(["--mode", "mp", "-n", str(n_map)], "tcp", nodes=1)
    rows.append((f"mp Pool(3).map {n_map} trivial tasks, chunksize 1, 1-node runtime (tasks/s)", mp1["map"], None, "baseline"))
    rows.append((f"mp Pool(3).map {n_map} trivial tasks, chunksize 1, workers over 3 nodes (tasks/s)", mp3["map"], mp1["map"], "x 1 node"))
    rows.append(("mp Pool(3).map 100 tasks returning 8 MiB arrays, 1-node runtime (GB/s)", mp1["big"], None, "baseline"))
    rows.append(("mp Pool(3).map 100 tasks returning 8 MiB arrays, workers over 3 nodes (GB/s)", mp3["big"], mp1["big"], "x 1 node"))
    rows.append(("mp Queue round trip, small object, node 0 <-> node 2 (us)", mp3["rtt"], raw, "x raw TCP"))
    rows.append(("mp Queue round trip, small object, 1-node runtime (us)", mp1["rtt"], raw, "x raw TCP"))
    rows.append(("mp Queue 64 MiB NumPy node 0 -> node 2, acked (MB/s)", mp3["to_far"], raw_bw[64 << 20], "x raw TCP"))
    ray_note = ray_rows(rows, n_map, mp3, raw_bw, ddict_get)
    local = under_dragon(["--mode", "procs-local", "-n", str(n_procs)], "tcp")
    spawn = json.loads(
        subprocess.run(
            [sys.executable, HERE, "--mode", "spawn", "-n", str(n_procs)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    rows.append(
        (
            f"[tcp] {n_procs} processes start+join on node 0 only (ms/proc)",
            local["ms"],
            None,
            "",
        )
    )
    rows.append(
        (
            f"stdlib spawn, {n_procs} processes start+join (ms/proc)",
            spawn["ms"],
            None,
            "baseline",
        )
    )
    py = startup([sys.executable], rounds)
    d3 = startup([DRAGON, "--local-nodes", "3"], rounds)
    d1 = startup([DRAGON], rounds)
    rows.append(("python hello.py (s)", py, None, "baseline"))
    rows.append(
        ("dragon hello.py, 1 node (s)", d1, py, "over python: +%.3f s" % (d1 - py))
    )
    rows.append(
        (
            "dragon --local-nodes 3 hello.py (s)",
            d3,
            py,
            "over python: +%.3f s" % (d3 - py),
        )
    )
    sl = slurm_startup(rounds)
    if isinstance(sl, tuple):
        rows.append(("salloc -N3 python hello.py (s)", sl[0], None, "baseline"))
        rows.append(
            (
                "salloc -N3 dragon hello.py (s)",
                sl[1],
                sl[0],
                "over python: +%.3f s" % (sl[1] - sl[0]),
            )
        )
    w = max(len(r[0]) for r in rows)
    for name, v, base, note in rows:
        ratio = f"{v / base:8.2f}x" if base and not note.startswith("over") else " " * 9
        print(
            f"{name:<{w}}  {v:10.3f}  {ratio}  {note if note.startswith('over') or note == 'baseline' else ''}"
        )
    spread_ms = [r for r in rows if "over nodes" in r[0]]
    spawn_ms = spawn["ms"]
    for name, v, _, _ in spread_ms:
        print(
            f"# {name.split(']')[0]}]: spread over 3 nodes {v:.2f} ms/proc = {v / spawn_ms:.2f}x stdlib spawn"
        )
    print(
        "# Queue rows: calls on objects of node 0 made from node 1 go to node 0's object server over TCP;"
    )
    print(
        "#   with -t ofi, messages of 8 MiB or more (the 64 MiB rows) move between the node pools by"
    )
    print(
        "#   libfabric RMA (tcp;ofi_rxm here; a put copies the array into a block first); 1 MiB ones by the socket;"
    )
    if not isinstance(sl, tuple):
        print(f"#   3-node Slurm start-up: {sl};", end=" ")
    else:
        print("#", end=" ")
    print(ray_note)
    return 0


def ray_rows(rows: list, n_map: int, mp3: dict, raw_bw: dict, ddict_get: float | None) -> str:
    """Ray's figures on a 3-node local cluster, beside ours (a line saying why not when Ray
    is missing or fails)."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return "# Ray: not installed (pip install ray to add its rows)"
    r = subprocess.run(
        [sys.executable, HERE, "--mode", "ray", "-n", str(n_map)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if r.returncode != 0:
        return "# Ray: failed: " + " ".join((r.stderr or r.stdout).strip().splitlines()[-1:])
    ray = json.loads(r.stdout.strip().splitlines()[-1])
    rows.append((f"Ray, {ray['nodes']}-node local cluster: ray.get of a 64 MiB array made on another node (MB/s)", ray["get64"], raw_bw[64 << 20], "x raw TCP"))
    rows.append((f"Ray, {ray['nodes']}-node local cluster: {n_map} trivial tasks (tasks/s)", ray["tasks"], None, "baseline"))
    notes = [f"# Ray {__import__('ray').__version__}, in the same run:"]
    if ddict_get is not None:
        notes.append(f"#   DDict 64 MiB cross-node get / Ray's = {ddict_get / ray['get64']:.2f}x")
    notes.append(f"#   mp Pool.map trivial tasks over 3 nodes / Ray's tasks = {mp3['map'] / ray['tasks']:.2f}x")
    return "\n".join(notes)


if __name__ == "__main__":
    sys.exit(main())
