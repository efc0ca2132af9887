"""Soak (issue 18, item 5): many processes churn Queues, a DDict and a Pool for minutes while
the driver samples the memory of the runtime's processes and of its /dev/shm segments.

Run under the launcher: ``dragon bench/py/soak.py [--procs 200] [--minutes 10]`` (``make
soak``). Each worker loops until told to stop: it puts a NumPy array (4 KiB to 1 MiB) into
one of four queues, takes one from the next queue, writes and reads back keys of its own in
the DDict (a bounded key space, so the DDict's size is flat too) and checks every value it
reads. The driver maps a Pool over small tasks between samples. Every ``--every`` seconds it
prints the summed private RSS of the runtime's processes and the bytes its segments use; at the end,
whether both were flat after warm-up (the last third within 10% of the middle third), the
errors (must be 0), and, after the run, that no segment of the runtime is left.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from dragon.data.ddict import DDict
from dragon.native.event import Event
from dragon.native.pool import Pool
from dragon.native.process import Process
from dragon.native.queue import Queue


def worker(i, queues, d, stop, errors):
    rng = np.random.default_rng(i)
    n = 0
    while not stop.is_set():
        size = int(rng.choice([512, 8192, 131072]))  # float64s: 4 KiB .. 1 MiB
        a = np.full(size, float(i), dtype=np.float64)
        try:
            queues[i % 4].put(a, timeout=30)
            b = queues[(i + 1) % 4].get(timeout=30)
            if b.size not in (512, 8192, 131072) or b[0] != b[-1]:
                errors.put(f"worker {i}: a queue item was corrupted")
            key = f"w{i}-{n % 8}"
            d[key] = a[:64]
            if not np.array_equal(d[key], a[:64]):
                errors.put(f"worker {i}: DDict read back another value")
        except Exception as e:  # counted, not fatal: the soak reports every error
            if not stop.is_set():
                errors.put(f"worker {i}: {type(e).__name__}: {e}")
        n += 1


def square(x):
    return x * x


def rss_and_shm(rt: str) -> tuple[int, int]:
    """Summed private resident memory (``RssAnon``: heap and stacks, what a leak grows) of
    this runtime's processes, and the bytes its segments use. (``VmRSS`` would also count
    every process's touched pages of the shared pool, each time: those are the /dev/shm
    figure, counted once.)"""
    rss = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if f"DRAGON_RUNTIME=1:{rt}:".encode() not in f.read() and int(pid) != os.getpid():
                    continue
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        rss += int(line.split()[1]) * 1024
        except (OSError, ValueError):
            continue
    shm = 0
    for n in os.listdir("/dev/shm"):
        if n.startswith(f"dragon-{rt}-"):
            try:
                shm += os.stat(f"/dev/shm/{n}").st_blocks * 512
            except OSError:
                pass
    return rss, shm


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--procs", type=int, default=200)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--every", type=float, default=15.0)
    a = ap.parse_args()
    rt = os.environ["DRAGON_RUNTIME"].split(":")[1]
    queues = [Queue(maxsize=64) for _ in range(4)]
    errors = Queue(maxsize=10000)
    stop = Event()
    d = DDict(1, 1, 512 << 20)
    procs = [Process(target=worker, args=(i, queues, d, stop, errors)) for i in range(a.procs)]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    print(f"# soak: {a.procs} processes on {os.cpu_count()} CPUs for {a.minutes} min, runtime {rt}", flush=True)
    print(f"{'t (s)':>8} {'private RSS (MB)':>17} {'/dev/shm (MB)':>14} {'pool tasks':>11}", flush=True)
    samples = []
    tasks = 0
    with Pool(2) as pool:
        while time.monotonic() - t0 < a.minutes * 60:
            deadline = time.monotonic() + a.every
            while time.monotonic() < deadline:
                assert pool.map(square, range(50)) == [x * x for x in range(50)]
                tasks += 50
            rss, shm = rss_and_shm(rt)
            samples.append((rss, shm))
            print(f"{time.monotonic() - t0:8.0f} {rss / 1e6:17.0f} {shm / 1e6:14.0f} {tasks:11}", flush=True)
    stop.set()
    for p in procs:
        p.join(120)
    codes = [p.returncode for p in procs]
    errs = []
    while errors.poll():
        errs.append(errors.get())
    d.destroy()
    third = max(1, len(samples) // 3)
    mid, last = samples[third : 2 * third], samples[2 * third :]

    def flat(k):
        m = sum(s[k] for s in mid) / max(1, len(mid))
        return all(abs(s[k] - m) <= 0.1 * m for s in last) if mid else False

    print(f"private RSS flat after warm-up: {flat(0)}; /dev/shm flat after warm-up: {flat(1)}")
    print(f"errors: {len(errs)}; processes that did not exit 0: {sum(c != 0 for c in codes)}")
    for e in errs[:10]:
        print("  ", e)
    return 0 if not errs and all(c == 0 for c in codes) and flat(0) and flat(1) else 1


if __name__ == "__main__":
    sys.exit(main())
