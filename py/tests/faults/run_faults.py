"""Fault injection over whole runtimes (``make faults`` runs it small, ``make stress`` long).

Run with the venv's python (not under ``dragon``: it starts its own runtimes)::

    python py/tests/faults/run_faults.py --kills 12

Scenarios, each a fresh runtime started with the ``dragon`` launcher:

* ``data``: worker processes put large NumPy arrays on a Queue, get them, write and read a
  DDict (each value a NumPy array naming its key and version), and run Pool tasks; the
  driver SIGKILLs a random worker every round (SIGSTOP/SIGCONTs another now and then),
  replaces it, and checks after each kill that every DDict write the dead worker
  acknowledged is readable with its content, that the Queue still serves, and at the end
  that every acknowledged put was got or is still queued (the one operation a kill
  interrupts may go either way), that no item came twice or corrupt, and that every Pool
  task either gave its result or failed with a clear error naming the lost worker.
* ``agent``: ``dragon --local-nodes 3``; a node agent is SIGKILLed while workers on every
  node use a Queue: the launcher must end the run naming the node, in bounded time.
* ``launcher``: the launcher itself is SIGKILLed: the processes it leaves are found by their
  runtime id and ended (as ``dragon-cleanup`` does for a dead runtime, restricted here to
  this runtime so other runtimes on the machine are never touched).

After each scenario: no process and no ``/dev/shm`` segment of that runtime is left. Every
wait is bounded; one that runs out counts as a hang. The last line prints the counts and the
exit code is 1 when any hang, loss or failure was seen.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BIN = os.path.dirname(sys.executable)
DRAGON = os.path.join(BIN, "dragon")

# ----- the driver of the data scenario (runs under ``dragon``) ---------------------------------

DATA_DRIVER = r"""
import json, os, queue, random, signal, sys, time
import numpy as np
from dragon.data.ddict import DDict
from dragon.native.process import Process
from dragon.native.queue import Queue
from dragon.native.pool import Pool

KILLS, SEED, LOGDIR = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
KEYS = 16
rng = random.Random(SEED)


def log(f, line):
    os.write(f, (line + "\n").encode())


def arr_for(wid, seq):
    n = 1 + (wid * 7919 + seq * 104729) % (256 * 1024)  # up to 2 MiB of float64
    a = np.arange(n, dtype=np.float64)
    a[0], a[-1] = wid, seq
    return a


def check_arr(a):
    wid, seq = int(a[0]), int(a[-1])
    want = arr_for(wid, seq)
    return (wid, seq) if a.shape == want.shape and np.array_equal(a, want) else None


def putter(q, wid, path):
    f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    seq = 0
    while True:
        log(f, f"P? {seq}")
        q.put(arr_for(wid, seq), timeout=30)
        log(f, f"P {seq}")
        seq += 1


def getter(q, path):
    f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    while True:
        log(f, "G?")
        try:
            a = q.get(timeout=0.5)
        except queue.Empty:
            log(f, "G-")
            continue
        got = check_arr(a)
        if got is None:
            log(f, "BAD")
            os._exit(3)
        log(f, f"G {got[0]} {got[1]}")


def dval(wid, k, ver):
    n = 8 + (wid * 31 + k * 17 + ver * 13) % 40000
    a = np.full(n, ver, dtype=np.int64)
    a[0], a[1] = wid, k
    return a


def dd_worker(d, wid, path):
    f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    r = random.Random(wid)
    mine = {}
    ver = 0
    while True:
        k = r.randrange(KEYS)
        op = r.randrange(4)
        if op < 2:
            ver += 1
            log(f, f"D? {k} {ver}")
            d[(wid, k)] = dval(wid, k, ver)
            mine[k] = ver
            log(f, f"D {k} {ver}")
        elif op == 2:
            v = d.get((wid, k))
            want = mine.get(k)
            ok = (v is None and want is None) or (
                v is not None and want is not None and np.array_equal(v, dval(wid, k, want))
            )
            if not ok:
                log(f, f"BAD {k}")
                os._exit(3)
            log(f, "R")
        elif k in mine:
            log(f, f"X? {k}")
            d.pop((wid, k), None)
            del mine[k]
            log(f, f"X {k}")


def ck_worker(dc, wid, path):
    # Writes 4 keys in each new checkpoint of dc: writing to a newer checkpoint advances the
    # managers' working set, moving older keys forward (the window a kill here hits).
    f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    dc.sync_to_newest_checkpoint()
    while True:
        dc.checkpoint()
        c = dc.checkpoint_id
        for k in range(4):
            log(f, f"C? {c} {k}")
            dc[(wid, k)] = np.array([wid, k, c], dtype=np.int64)
            log(f, f"C {c} {k}")


def task(x):
    time.sleep(0.02 + (x % 7) * 0.01)
    return x * x


def read_log(path):
    try:
        with open(path) as fh:
            return fh.read().split("\n")[:-1]
    except OSError:
        return []


if __name__ == "__main__":
    counts = dict(kills=0, stops=0, ops=0, checks=0, undecided=0, hangs=0, lost=0, failures=0,
                  tasks_done=0, tasks_lost_with_error=0)
    fails = []

    def fail(msg):
        counts["failures"] += 1
        fails.append(msg)
        print("FAILURE", msg, flush=True)

    print("RT", os.environ["DRAGON_RUNTIME"].split(":")[1], flush=True)
    q = Queue(maxsize=8)
    d = DDict(managers_per_node=1, n_nodes=1, total_mem=256 << 20)
    dc = DDict(managers_per_node=1, n_nodes=1, total_mem=64 << 20, working_set_size=4)
    pool = Pool(3)
    roles = ["put", "put", "get", "get", "dd", "dd", "ck"]
    dead_ck = {}  # wid -> {key: acceptable checkpoint ids (None: absent)}
    workers = {}  # slot -> (Process, wid, role, path)
    next_wid = [0]
    dead_dd = []  # (wid, acceptable states per key)

    def spawn(slot):
        wid = next_wid[0]
        next_wid[0] += 1
        role = roles[slot]
        path = os.path.join(LOGDIR, f"w{wid}")
        if role == "put":
            p = Process(target=putter, args=(q, wid, path))
        elif role == "get":
            p = Process(target=getter, args=(q, path))
        elif role == "ck":
            p = Process(target=ck_worker, args=(dc, wid, path))
        else:
            p = Process(target=dd_worker, args=(d, wid, path))
        p.start()
        workers[slot] = (p, wid, role, path)

    for s in range(len(roles)):
        spawn(s)
    put_acked, put_undecided, got, got_undecided = set(), set(), [], 0

    def settle(slot):
        global got_undecided
        p, wid, role, path = workers.pop(slot)
        counts[f"killed_{role}"] = counts.get(f"killed_{role}", 0) + 1
        if p.join(30) is None:
            counts["hangs"] += 1
            fail(f"worker {wid} ({role}) not reaped within 30 s")
        lines = read_log(path)
        if "BAD" in " ".join(lines):
            fail(f"worker {wid} ({role}) read a corrupt value")
        last = lines[-1] if lines else ""
        undecided = last.endswith("?") or "?" in last.split(" ")[0]
        counts["undecided"] += int(undecided)
        counts["ops"] += sum(1 for ln in lines if not ln.split(" ")[0].endswith("?"))
        if role == "put":
            for ln in lines:
                w = ln.split(" ")
                if w[0] == "P":
                    put_acked.add((wid, int(w[1])))
                elif w[0] == "P?" and ln is last:
                    put_undecided.add((wid, int(w[1])))
        elif role == "ck":
            acc = {k: {None} for k in range(4)}
            for ln in lines:
                w = ln.split(" ")
                if w[0] == "C?":
                    acc[int(w[2])].add(int(w[1]))
                elif w[0] == "C":
                    acc[int(w[2])] = {int(w[1])}
            dead_ck[wid] = acc
            # Every dead checkpoint writer's keys, the older ones moved forward since by
            # later writers (some killed while moving them), read at the newest checkpoint.
            counts["checks"] += 1
            dc.sync_to_newest_checkpoint()
            for w2, acc2 in dead_ck.items():
                for k in range(4):
                    v = dc.get((w2, k))
                    state = None if v is None else int(v[2])
                    if v is not None and (int(v[0]), int(v[1])) != (w2, k):
                        fail(f"checkpointed key {(w2, k)} holds {v}")
                    elif state not in acc2[k]:
                        counts["lost"] += 1
                        fail(f"checkpointed key {(w2, k)}: read {state}, acknowledged {acc2[k]}")
                    acc2[k] = {state}
        elif role == "get":
            for ln in lines:
                w = ln.split(" ")
                if w[0] == "G":
                    got.append((int(w[1]), int(w[2])))
            return undecided
        else:
            acc = {k: {None} for k in range(KEYS)}
            for ln in lines:
                w = ln.split(" ")
                if w[0] == "D?":
                    acc[int(w[1])].add(int(w[2]))
                elif w[0] == "D":
                    acc[int(w[1])] = {int(w[2])}
                elif w[0] == "X?":
                    acc[int(w[1])].add(None)
                elif w[0] == "X":
                    acc[int(w[1])] = {None}
            counts["checks"] += 1
            for k in range(KEYS):
                v = d.get((wid, k))
                state = None
                if v is not None:
                    if int(v[0]) != wid or int(v[1]) != k or not np.array_equal(v, dval(wid, k, int(v[2]))):
                        fail(f"DDict key {(wid, k)} holds a corrupt value")
                        continue
                    state = int(v[2])
                if state not in acc[k]:
                    counts["lost"] += 1
                    fail(f"DDict key {(wid, k)}: read {state}, acknowledged {acc[k]}")
                if state is not None:
                    del d[(wid, k)]
        return False

    results = []
    t_end_tasks = 0
    for rnd in range(KILLS):
        time.sleep(rng.uniform(0.05, 0.3))
        if rng.random() < 0.3:
            s = rng.choice(list(workers))
            pid = workers[s][0].pid
            os.kill(pid, signal.SIGSTOP)
            time.sleep(rng.uniform(0.0, 0.1))
            os.kill(pid, signal.SIGCONT)
            counts["stops"] += 1
        if rnd % 3 == 2:
            # A Pool task in the middle of its work: SIGKILL the worker running it.
            r = pool.map_async(task, range(rnd, rnd + 6), chunksize=1)
            time.sleep(0.03)
            victims = [pid for pid in list(pool._workers)]
            if victims:
                try:
                    os.kill(rng.choice(victims), signal.SIGKILL)
                    counts["kills"] += 1
                    counts["killed_pool"] = counts.get("killed_pool", 0) + 1
                except ProcessLookupError:
                    pass
            results.append((r, list(range(rnd, rnd + 6))))
            continue
        slot = rng.choice(list(workers))
        role = workers[slot][2]
        os.kill(workers[slot][0].pid, signal.SIGKILL)
        counts["kills"] += 1
        if settle(slot):
            got_undecided += 1
        spawn(slot)
        # The Queue keeps serving this process after the kill.
        counts["checks"] += 1
        try:
            q.put(arr_for(10**6, rnd), timeout=10)
        except queue.Full:
            # A Queue that stays full after a kill (before channel layout 2, a worker killed
            # between reserving and committing a ring slot left it so): said plainly, with
            # the channel's figures, rather than as the driver's traceback.
            fail(f"after a {role} worker was killed the Queue took no put for 10 s: {dict(q._ch.stats())}")
            break
        put_acked.add((10**6, rnd))
    for slot in list(workers):
        os.kill(workers[slot][0].pid, signal.SIGKILL)
        counts["kills"] += 1
        if settle(slot):
            got_undecided += 1
    # Drain what is left; every acknowledged put was got or is still here.
    while True:
        try:
            a = q.get(timeout=1)
        except queue.Empty:
            break
        g = check_arr(a)
        if g is None:
            fail("corrupt array drained from the Queue")
        else:
            got.append(g)
    seen = set()
    for g in got:
        if g in seen:
            fail(f"item {g} got twice")
        seen.add(g)
    missing = put_acked - seen
    if len(missing) > got_undecided:
        counts["lost"] += len(missing) - got_undecided
        fail(
            f"{len(missing)} acknowledged puts never got ({got_undecided} gets were "
            f"interrupted): {sorted(missing)[:10]}"
        )
    stray = seen - put_acked - put_undecided
    if stray:
        fail(f"items got that were never put: {sorted(stray)[:10]}")
    for r, xs in results:
        try:
            assert r.get(timeout=60) == [x * x for x in xs]
            counts["tasks_done"] += len(xs)
        except AssertionError:
            fail(f"Pool results wrong for {xs}")
        except Exception as e:  # noqa: BLE001 - the check wants a clear error, not a hang
            if "worker" in str(e) and "lost" in str(e):
                counts["tasks_lost_with_error"] += 1
            elif type(e).__name__ in ("TimeoutError", "DragonTimeoutError"):
                counts["hangs"] += 1
                fail(f"Pool map of {xs} never finished (a killed worker's task was lost silently)")
            else:
                fail(f"Pool map of {xs}: {type(e).__name__}: {e}")
    pool.terminate()
    pool.join()
    d.destroy()
    dc.destroy()
    q.destroy()
    print("COUNTS " + json.dumps(counts), flush=True)
    sys.exit(1 if fails else 0)
"""

# ----- the drivers of the node-agent and launcher scenarios -------------------------------------

NODES_DRIVER = r"""
import os, queue, sys, time
from dragon.native.process import Process
from dragon.native.process_group import ProcessGroup
from dragon.native.process import ProcessTemplate
from dragon.native.queue import Queue
from dragon.infrastructure.policy import Policy
from dragon.native.machine import node_table


def pingpong(q):
    while True:
        q.put(os.urandom(100000), timeout=60)
        try:
            q.get(timeout=1)
        except queue.Empty:
            pass


if __name__ == "__main__":
    q = Queue(maxsize=16)
    nodes = int(sys.argv[1])
    ps = []
    for n in range(nodes):
        pol = Policy(placement=Policy.Placement.HOST_ID, host_id=n + 1) if nodes > 1 else None
        p = Process(target=pingpong, args=(q,), policy=pol) if pol else Process(target=pingpong, args=(q,))
        p.start()
        ps.append(p)
    rt = os.environ["DRAGON_RUNTIME"].split(":")[1]
    agent = node_table()[1]["agent_pid"] if nodes > 1 else 0
    print("ready", rt, agent, " ".join(str(p.pid) for p in ps), flush=True)
    time.sleep(300)
"""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def segments(rt: str) -> list[str]:
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(f"dragon-{rt}-"))


def runtime_pids(rt: str) -> list[int]:
    """Processes of this user whose environment names runtime ``rt``."""
    from dragon import cli

    out = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            try:
                if cli._runtime_of_env(int(d)) == int(rt, 16) and alive(int(d)):
                    out.append(int(d))
            except (OSError, ValueError):
                pass
    return out


def wait_clean(rt: str, timeout: float) -> list[str]:
    """Waits until runtime ``rt`` has no process and no segment left; what is left."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = segments(rt) + [f"pid {p}" for p in runtime_pids(rt)]
        if not left:
            return []
        time.sleep(0.1)
    return segments(rt) + [f"pid {p}" for p in runtime_pids(rt)]


def start(args: list[str], tmp: str, source: str, *driver_args: str) -> tuple[subprocess.Popen, list[str]]:
    script = os.path.join(tmp, "driver.py")
    with open(script, "w") as f:
        f.write(textwrap.dedent(source))
    env = dict(os.environ)
    env.pop("DRAGON_RUNTIME", None)
    p = subprocess.Popen(
        [DRAGON, *args, script, *driver_args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    return p, []


def scenario_data(kills: int, seed: int, counts: dict, fails: list) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        logdir = os.path.join(tmp, "logs")
        os.mkdir(logdir)
        p, _ = start([], tmp, DATA_DRIVER, str(kills), str(seed), logdir)
        try:
            out, err = p.communicate(timeout=120 + 10 * kills)
        except subprocess.TimeoutExpired:
            counts["hangs"] += 1
            fails.append("data scenario: the driver did not finish in time")
            p.kill()
            out, err = p.communicate()
        rt = None
        for line in out.splitlines():
            if line.startswith("FAILURE"):
                fails.append("data: " + line)
            if line.startswith("RT "):
                rt = line.split()[1]
            if line.startswith("COUNTS "):
                import json

                for k, v in json.loads(line[7:]).items():
                    counts[k] = counts.get(k, 0) + v
        if p.returncode != 0 and not any(f.startswith("data") for f in fails):
            # The driver's own traceback comes before its killed workers' (which print theirs
            # as the runtime ends): both ends of the output.
            fails.append(f"data scenario exited {p.returncode}: {err[:3000]} [...] {err[-2000:]}")
        if rt is None:
            fails.append("data scenario: the driver never named its runtime")
        else:
            left = wait_clean(rt, 20)
            if left:
                fails.append(f"data scenario left {left}")
        counts["runtimes"] += 1


def scenario_agent(counts: dict, fails: list) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        p, _ = start(["--local-nodes", "3"], tmp, NODES_DRIVER, "3")
        words = p.stdout.readline().split()
        if not words or words[0] != "ready":
            p.kill()
            fails.append(f"agent scenario did not start: {p.stderr.read()[-2000:]}")
            return
        rt, agent = words[1], int(words[2])
        time.sleep(1.0)  # the workers exchange data across the nodes meanwhile
        os.kill(agent, signal.SIGKILL)
        counts["kills"] += 1
        try:
            code = p.wait(60)
        except subprocess.TimeoutExpired:
            counts["hangs"] += 1
            fails.append("agent scenario: the launcher did not end within 60 s of a lost node")
            p.kill()
            code = p.wait()
        err = p.stderr.read()
        if code == 0 or "was lost" not in err:
            fails.append(f"agent scenario: exit {code}, no clear error: {err[-1500:]}")
        left = wait_clean(rt, 20)
        if left:
            fails.append(f"agent scenario left {left}")
        counts["runtimes"] += 1
        counts["checks"] += 1


def scenario_launcher(counts: dict, fails: list) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        p, _ = start([], tmp, NODES_DRIVER, "1")
        words = p.stdout.readline().split()
        if not words or words[0] != "ready":
            p.kill()
            fails.append(f"launcher scenario did not start: {p.stderr.read()[-2000:]}")
            return
        rt = words[1]
        time.sleep(0.5)
        p.kill()
        p.wait(30)
        counts["kills"] += 1
        # Workers outlive a SIGKILLed launcher by design; the runtime is dead (its pool's
        # creator is gone), so what dragon-cleanup does is done here for this runtime only.
        from dragon import cli

        cli._kill_runtime_processes(int(rt, 16))
        deadline = time.monotonic() + 20
        while runtime_pids(rt) and time.monotonic() < deadline:
            time.sleep(0.1)
        for n in segments(rt):
            os.unlink(os.path.join("/dev/shm", n))
        cli.remove_scratch_dir(int(rt, 16))
        left = wait_clean(rt, 10)
        if left:
            fails.append(f"launcher scenario left {left}")
        counts["runtimes"] += 1
        counts["checks"] += 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kills", type=int, default=12, help="kills in the data scenario")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--only", choices=["data", "agent", "launcher"], default=None)
    a = ap.parse_args()
    seed = a.seed if a.seed is not None else int.from_bytes(os.urandom(4), "little")
    print(f"faults (python): seed {seed}", flush=True)
    counts = {"kills": 0, "runtimes": 0, "checks": 0, "hangs": 0, "lost": 0}
    fails: list[str] = []
    t0 = time.monotonic()
    if a.only in (None, "data"):
        scenario_data(a.kills, seed, counts, fails)
    if a.only in (None, "agent"):
        scenario_agent(counts, fails)
    if a.only in (None, "launcher"):
        scenario_launcher(counts, fails)
    for f in fails:
        print("FAILURE", f)
    counts["failures"] = len(fails)
    print(
        "faults (python): "
        + ", ".join(f"{k} {v}" for k, v in counts.items())
        + f", {time.monotonic() - t0:.1f} s",
        flush=True,
    )
    return 1 if fails or counts["hangs"] or counts["lost"] else 0


if __name__ == "__main__":
    sys.exit(main())
