"""Runtime benchmarks in one run: this runtime (dragon-rs) against stdlib multiprocessing
(spawn and fork) and, with ``--dragonhpc VENV``, DragonHPC's runtime from that venv.

Workloads (issues 3 and 4): Queue ping-pong of a small object (processes on different cores, and
on one core); Pipe ping-pong (multiprocessing's Pipe of the runtime under test); Queue throughput for 64 B, 4 KiB, 1 MiB, 64 MiB NumPy payloads with memcpy
measured in the same run; 16 processes started and joined; a ProcessGroup of 16;
``dragon hello.py`` against ``python hello.py``; for multiprocessing contexts (stdlib
spawn/fork and the "dragon" start method, ours and DragonHPC's): Pool(2) creation,
``Pool.map`` of trivial tasks (chunksize 1) and of tasks returning 8 MiB arrays (the first such
map, then the same map again). Every figure is printed with its ratio to
stdlib spawn (and memcpy for bandwidth).

What the receiver does: in the plain queue throughput rows it takes each array (a view of
the block, no byte read); in the "receiver sums" rows it sums every element before taking
the next, beside numpy's sum in one process over the same sizes (same cache regime). Every
mode runs the same code with the same pinning (sender on the first CPU, receiver on the last),
DragonHPC's columns included.

Usage: ``python runtime_bench.py [--quick] [--dragonhpc /opt/dragonhpc]``. The same file is
run in worker mode (``--mode``) by itself; with ``--mode dragonhpc`` it runs under
DragonHPC's launcher and imports DragonHPC's ``dragon`` package (the native API is the same).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.abspath(__file__)
SIZES = [64, 4096, 1 << 20, 64 << 20]


def _pin(cpu):
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


# ----- workloads (run in the measured runtime) --------------------------------------------


def echo(qin, qout, n, cpu):
    _pin(cpu)
    for _ in range(n):
        qout.put(qin.get())


def pipe_echo(conn, n, cpu):
    _pin(cpu)
    for _ in range(n):
        conn.send(conn.recv())


def sink(q, n, cpu):
    _pin(cpu)
    for _ in range(n):
        q.get()


def sink_sum(q, n, cpu, out):
    """As ``sink``, but the receiver reads every element (sums the array) before the next."""
    _pin(cpu)
    total = 0.0
    for _ in range(n):
        total += float(q.get().sum())
    out.put(total)


def nothing():
    pass


def ident(x):
    return x


def make_8mib(i):
    import numpy as np

    return np.full(1 << 20, float(i))


def median3(run) -> float:
    """The median of 3 runs of ``run`` (one round of process starts is noisy on 2 cores)."""
    return sorted(run() for _ in range(3))[1]


def measure(mode: str, quick: bool) -> dict:
    import numpy as np

    if mode in ("spawn", "fork", "dragon"):
        import multiprocessing as mp

        if mode == "dragon":
            import dragon  # noqa: F401  (registers the "dragon" start method)

            # DragonHPC's context objects (Pipe) work only after this.
            mp.set_start_method("dragon", force=True)
        ctx = mp.get_context(mode)
        Q = ctx.Queue
        P = lambda target, args=(): ctx.Process(target=target, args=args)  # noqa: E731
        join = lambda p: p.join()  # noqa: E731
        PG = None
    else:
        from dragon.native.process import Process, ProcessTemplate
        from dragon.native.process_group import ProcessGroup
        from dragon.native.queue import Queue

        Q = lambda: Queue(maxsize=16)  # noqa: E731
        P = lambda target, args=(): Process(target=target, args=args)  # noqa: E731
        join = lambda p: p.join()  # noqa: E731
        PG = (ProcessGroup, ProcessTemplate)
    out = {}
    cpus = sorted(os.sched_getaffinity(0))
    n_rt = 2000 if quick else 20000
    for label, (mine, peer) in {
        "diff-core": (cpus[0], cpus[-1]),
        "one-core": (cpus[0], cpus[0]),
    }.items():
        if label == "diff-core" and len(cpus) < 2:
            continue
        qa, qb = Q(), Q()
        p = P(echo, (qa, qb, n_rt + 100, peer))
        p.start()
        os.sched_setaffinity(0, {mine})
        for _ in range(100):
            qa.put(1)
            qb.get()
        t = time.perf_counter()
        for _ in range(n_rt):
            qa.put(1)
            qb.get()
        out[f"queue round trip, small object, {label} (us)"] = (
            (time.perf_counter() - t) / n_rt * 1e6
        )
        join(p)
        os.sched_setaffinity(0, set(cpus))
    # Pipe ping-pong through the multiprocessing API of the runtime under test.
    import multiprocessing as mp

    if mode in ("spawn", "fork", "dragon"):
        pctx = mp.get_context(mode)
    else:
        import dragon  # noqa: F401  (registers the "dragon" start method)

        mp.set_start_method("dragon", force=True)
        pctx = mp.get_context("dragon")
    if len(cpus) >= 2:
        a_end, b_end = pctx.Pipe()
        p = pctx.Process(target=pipe_echo, args=(b_end, n_rt + 100, cpus[-1]))
        p.start()
        os.sched_setaffinity(0, {cpus[0]})
        for _ in range(100):
            a_end.send(1)
            a_end.recv()
        t = time.perf_counter()
        for _ in range(n_rt):
            a_end.send(1)
            a_end.recv()
        out["pipe round trip, small object, diff-core (us)"] = (
            (time.perf_counter() - t) / n_rt * 1e6
        )
        p.join()
        os.sched_setaffinity(0, set(cpus))
    for size in SIZES:
        # At least 0.5 s of small messages in a full run (a few thousand are noise).
        n = max(
            4, min(2000 if quick else 20000, (64 << 20) * (2 if quick else 8) // size)
        )
        a = np.ones(size // 8 or 1, dtype=np.float64)
        q = Q()
        warm = max(4, n // 4)  # untimed: first-touch page faults of fresh shared memory
        p = P(sink, (q, n + warm, cpus[-1]))
        p.start()
        for _ in range(warm):
            q.put(a)
        t = time.perf_counter()
        for _ in range(n):
            q.put(a)
        join(p)
        dt = time.perf_counter() - t
        out[f"queue throughput, {size} B numpy (GB/s)"] = a.nbytes * n / dt / 1e9
        if size >= 1 << 20:  # the receiver uses the data: it sums every element
            n2 = max(4, n // 4)
            done = Q()
            p = P(sink_sum, (q, n2 + 2, cpus[-1], done))
            p.start()
            for _ in range(2):
                q.put(a)
            t = time.perf_counter()
            for _ in range(n2):
                q.put(a)
            total = done.get()
            dt = time.perf_counter() - t
            join(p)
            assert total == float(a.size) * (n2 + 2), total
            out[f"queue throughput, {size} B numpy, receiver sums (GB/s)"] = a.nbytes * n2 / dt / 1e9

    def start_join_16():
        procs = []
        t = time.perf_counter()
        for _ in range(16):
            procs.append(P(nothing))
            procs[-1].start()
        for p in procs:
            join(p)
        return (time.perf_counter() - t) / 16 * 1e3

    out["16 processes start+join (ms per process)"] = median3(start_join_16)
    if PG is not None:
        ProcessGroup, ProcessTemplate = PG
        t = time.perf_counter()
        pg = ProcessGroup()
        pg.add_process(nproc=16, template=ProcessTemplate(target=nothing))
        pg.init()
        pg.start()
        pg.join()
        pg.close()
        out["ProcessGroup of 16 (ms per process)"] = (
            (time.perf_counter() - t) / 16 * 1e3
        )
    else:
        # multiprocessing.Pool of the context under test, 2 workers (this machine's cores).
        def pool_life():
            t = time.perf_counter()
            pool = ctx.Pool(2)
            pool.map(ident, range(2), chunksize=1)
            pool.close()
            pool.join()
            return (time.perf_counter() - t) * 1e3

        out["Pool(2) create, first map, close (ms)"] = median3(pool_life)
        with ctx.Pool(2) as pool:
            pool.map(ident, range(100), chunksize=1)
            n = 2000 if quick else 10000
            t = time.perf_counter()
            pool.map(ident, range(n), chunksize=1)
            out[f"Pool.map {n} trivial tasks, chunksize 1 (tasks/s)"] = n / (
                time.perf_counter() - t
            )
            pool.map(make_8mib, range(4), chunksize=1)
            n = 40 if quick else 100
            # The same map twice: the first pays for first-touch page faults of memory no
            # process had used (on this VM ~3 us per 4 KiB page of /dev/shm, ~2 us of
            # anonymous memory); the second shows the steady state.
            labels = (
                f"Pool.map {n} tasks returning 8 MiB arrays",
                f"Pool.map {n} x 8 MiB arrays, again",
            )
            for label in labels:
                t = time.perf_counter()
                res = pool.map(make_8mib, range(n), chunksize=1)
                dt = time.perf_counter() - t
                assert float(res[-1][0]) == n - 1
                out[f"{label} (GB/s)"] = n * (8 << 20) / dt / 1e9
                del res
    return out


def sum_gbps() -> dict:
    """numpy sum bandwidth in one process for the sizes whose queue rows have a summing
    receiver, over a rotating set of arrays spanning 64 MiB (the same cache regime)."""
    import numpy as np

    out = {}
    for size in (1 << 20, 64 << 20):
        arrs = [np.ones(size // 8) for _ in range(max(1, (64 << 20) // size))]
        n = max(10, (512 << 20) // size)
        t = time.perf_counter()
        for i in range(n):
            float(arrs[i % len(arrs)].sum())
        out[size] = size * n / (time.perf_counter() - t) / 1e9
    return out


def memcpy_gbps() -> dict:
    """memcpy bandwidth per payload size, into a rotating set of destinations that spans
    64 MiB (as a queue's blocks do), so caches do not flatter small sizes."""
    import numpy as np

    out = {}
    for size in SIZES:
        a = np.ones(size // 8 or 1)
        k = max(2, (64 << 20) // max(size, 1))
        dsts = [np.empty_like(a) for _ in range(min(k, 4096))]
        for d in dsts:
            np.copyto(d, a)  # fault the pages in
        n = max(10, (256 << 20) // size)
        t = time.perf_counter()
        for i in range(n):
            np.copyto(dsts[i % len(dsts)], a)
        out[size] = a.nbytes * n / (time.perf_counter() - t) / 1e9
    return out


# ----- driver -----------------------------------------------------------------------------


def run_mode(python: list[str], mode: str, quick: bool) -> dict:
    with tempfile.NamedTemporaryFile("r", suffix=".json") as f:
        cmd = [*python, HERE, "--mode", mode, "--out", f.name] + (
            ["--quick"] if quick else []
        )
        env = {k: v for k, v in os.environ.items() if k != "DRAGON_RUNTIME"}
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
        if r.returncode != 0:
            return {
                "error": (r.stderr or r.stdout).strip().splitlines()[-1:] or ["failed"]
            }
        return json.load(open(f.name))


def hello_times(dragon_cmd: list[str], reps: int) -> tuple[float, float]:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write("print('hello')\n")
    try:

        def timed(cmd):
            best = float("inf")
            for _ in range(reps):
                t = time.perf_counter()
                subprocess.run(cmd, capture_output=True, check=True, timeout=600)
                best = min(best, time.perf_counter() - t)
            return best

        return timed([sys.executable, f.name]), timed([*dragon_cmd, f.name])
    finally:
        os.unlink(f.name)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--dragonhpc", metavar="VENV", help="a venv with dragonhpc installed"
    )
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.mode:
        res = measure(a.mode, a.quick)
        with open(a.out, "w") as f:
            json.dump(res, f)
        return 0
    here_bin = os.path.dirname(sys.executable)
    our_launcher = [os.path.join(here_bin, "dragon")]
    cols = {
        "dragon-rs": run_mode(our_launcher, "native", a.quick),
        "rs-mp": run_mode(our_launcher, "dragon", a.quick),
        "spawn": run_mode([sys.executable], "spawn", a.quick),
        "fork": run_mode([sys.executable], "fork", a.quick),
    }
    if a.dragonhpc:
        dhpc = [os.path.join(a.dragonhpc, "bin", "dragon"), "-s"]
        cols["DragonHPC"] = run_mode(dhpc, "native", a.quick)
        cols["DHPC-mp"] = run_mode(dhpc, "dragon", a.quick)
    mc = memcpy_gbps()
    py_t, our_t = hello_times([os.path.join(here_bin, "dragon")], 3 if a.quick else 5)
    keys = []
    for c in cols.values():
        for k in c:
            if k != "error" and k not in keys:
                keys.append(k)
    names = list(cols)
    print(f"# runtime bench ({'quick' if a.quick else 'full'}), {os.cpu_count()} CPUs")
    print("# dragon-rs: native API under our launcher; rs-mp: multiprocessing with the")
    print(
        "# 'dragon' start method under our launcher; DHPC-mp: the same under DragonHPC"
    )
    print(
        f"{'workload':<60}"
        + "".join(f"{n:>11}" for n in names)
        + f"{'rs/spawn':>9}{'mp/spawn':>9}"
    )
    for k in keys:
        row = f"{k:<60}"
        for n in names:
            v = cols[n].get(k)
            row += f"{v:>11.2f}" if isinstance(v, float) else f"{'n/a':>11}"
        sp = cols["spawn"].get(k)
        for c in ("dragon-rs", "rs-mp"):
            ours = cols[c].get(k)
            row += (
                f"{ours / sp:>9.2f}"
                if isinstance(ours, float) and isinstance(sp, float) and sp
                else f"{'':>9}"
            )
        print(row)
    for n, c in cols.items():
        if "error" in c:
            print(f"{n}: failed: {c['error']}")
    for size, g in sum_gbps().items():
        k = f"queue throughput, {size} B numpy, receiver sums (GB/s)"
        ours = cols["dragon-rs"].get(k)
        if isinstance(ours, float):
            print(f"numpy sum of {size} B in process: {g:.2f} GB/s; dragon-rs queue with a summing receiver / it = {ours / g:.2f}")
    for size, g in mc.items():
        k = f"queue throughput, {size} B numpy (GB/s)"
        ours, mine = cols["dragon-rs"].get(k), cols["rs-mp"].get(k)
        if isinstance(ours, float):
            print(
                f"memcpy {size} B: {g:.2f} GB/s; dragon-rs queue / memcpy = {ours / g:.2f}"
                + (
                    f"; rs-mp queue / memcpy = {mine / g:.2f}"
                    if isinstance(mine, float)
                    else ""
                )
            )
    print(
        f"python hello.py {py_t * 1e3:.0f} ms; dragon hello.py {our_t * 1e3:.0f} ms (+{(our_t - py_t) * 1e3:.0f} ms)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
