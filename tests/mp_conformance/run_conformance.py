"""Runs CPython's own multiprocessing tests (Lib/test/_test_multiprocessing.py, the
process-type classes) under "spawn" and under "dragon" in one run, one class per subprocess
with a timeout, and prints passed/failed/skipped per class and in total.

The bar (issue 4): every test that passes under "spawn" passes under "dragon", except the
tests listed in KNOWN with a one-line reason naming a real limitation. Exit status 1 when
the bar does not hold.

With ``--nodes N`` a third column runs each class under ``dragon --local-nodes N``
(``mp_suite_dragon3``), every process the tests start placed on nodes 1..N-1 (never beside
the driver); the same bar holds there, except the tests in KNOWN_NODES.

Usage: python run_conformance.py [--timeout SECONDS] [--only CLASS_SUBSTRING] [--nodes N]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

#: test id -> reason it cannot pass under "dragon" (real limitations only). mp_suite_dragon
#: skips these, with the reason, rather than let them hang until the class's timeout.
KNOWN: dict[str, str] = {
    "WithProcessesTestConnection.test_missing_fd_transfer": (
        "the child os.write()s a raw byte into its conn.fileno(), which for a duplex Pipe end is "
        "the read end of its incoming packet pipe (the data is on pipes, not a socket pair, for "
        "a 4 us round trip instead of 7.5): the write fails (EBADF) and the parent's "
        "recv_handle() waits forever (it still holds the child's end)"
    ),
}

#: test id -> reason it cannot pass under "dragon" on a runtime of several nodes (the
#: processes of the test spread over the nodes); mp_suite_dragon3 skips these too.
KNOWN_NODES: dict[str, str] = {
    "WithProcessesTestConnection.test_fd_transfer": (
        "passes a file descriptor to a child with reduction.send_handle: descriptors do not "
        "cross nodes (the child runs on another node)"
    ),
    "WithProcessesTestConnection.test_large_fd_transfer": (
        "passes a file descriptor to a child with reduction.send_handle: descriptors do not "
        "cross nodes (the child runs on another node)"
    ),
    "WithProcessesTestSharedMemory.test_shared_memory_across_processes": (
        "maps a multiprocessing.shared_memory segment in a child on another node: a segment is "
        "a file of one node's /dev/shm, so the pickled SharedMemory is a CrossNodeError there "
        "(local nodes share /dev/shm, but the child's own resource tracker would unlink it)"
    ),
    "WithProcessesTestHeap.test_heap": (
        "inspects CPython's private mmap arena (multiprocessing.heap.BufferWrapper._heap); on "
        "several nodes BufferWrapper is a pool block that crosses nodes, with no such arena"
    ),
    "WithProcessesTestHeap.test_free_from_gc": (
        "inspects CPython's private mmap arena (multiprocessing.heap.BufferWrapper._heap); on "
        "several nodes BufferWrapper is a pool block that crosses nodes, with no such arena"
    ),
}

OUTCOME = r"(ok|FAIL|ERROR|skipped.*|expected failure|unexpected success)"
LINE = re.compile(r"^(test\w+) \((?:[\w.]+\.)?(\w+)\.\1\)(?:\s.*)? \.\.\. " + OUTCOME + "$")


def classes(method: str) -> list[str]:
    code = (
        f"import mp_suite_{method} as m; "
        "print('\\n'.join(n for n in dir(m) if n.startswith('WithProcesses')))"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, check=True)
    return r.stdout.split()


def _cpython_shm() -> set[str]:
    """CPython's own names in /dev/shm (named semaphores, SharedMemory segments)."""
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith(("sem.mp-", "psm_"))}
    except OSError:
        return set()


def fmt(counts: list[int]) -> str:
    """passed/failed/skipped."""
    return "/".join(map(str, counts))


def run_class(method: str, cls: str, timeout: float, nodes: int = 0) -> tuple[dict, float, str]:
    env = {k: v for k, v in os.environ.items() if k != "DRAGON_RUNTIME"}
    cmd = [sys.executable, "-m", "unittest", "-v", f"mp_suite_{method}.{cls}"]
    if method == "dragon3":
        # Under the launcher with `nodes` local nodes; every process the tests start runs on
        # a node other than the driver's (round robin over nodes 1..n-1).
        launcher = os.path.join(os.path.dirname(sys.executable), "dragon")
        cmd = [launcher, "--local-nodes", str(nodes), "mp_suite_dragon3.py", cls]
        env["DRAGON_DEFAULT_NODES"] = ",".join(str(k) for k in range(1, nodes))
    before = _cpython_shm()
    t = time.monotonic()
    try:
        r = subprocess.run(
            cmd,
            check=False,
            cwd=HERE,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        out, note = r.stdout + r.stderr, ""
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
        note = "TIMEOUT"
    results = {}
    lines = out.splitlines()
    for i, line in enumerate(lines):
        m = LINE.match(line.strip())
        if not m:
            # Multi-line form: "testX (mod.Class.testX)\nDocstring ... ok"
            m2 = re.match(r"^(test\w+) \((?:[\w.]+\.)?(\w+)\.\1\)$", line.strip())
            if m2 and i + 1 < len(lines):
                m3 = re.search(r"\.\.\. " + OUTCOME + "$", lines[i + 1])
                if m3:
                    results[m2.group(1)] = m3.group(1)
            continue
        results[m.group(1)] = m.group(3)
    # Names that appeared during the class run and outlived all its processes: reported on
    # the row, then removed (the harness assumes it runs alone, as `make test` runs it).
    # Known source: test_many_processes terminates 100 children about 1 ms after their start; a child killed while importing test._test_multiprocessing, whose
    # skip_if_broken_multiprocessing_synchronize() makes a Lock, between sem_open and the
    # resource tracker's register, leaves that name (CPython's own window; under "spawn" the
    # test starts 5 slower children, which rarely get that far).
    left = sorted(_cpython_shm() - before)
    if left:
        note = (note + " " if note else "") + "removed from /dev/shm: " + " ".join(left)
        for n in left:
            try:
                os.unlink(os.path.join("/dev/shm", n))
            except OSError:
                pass
    return results, time.monotonic() - t, note


def status(s: str) -> str:
    if s in ("ok", "expected failure"):
        return "pass"
    if s.startswith("skipped"):
        return "skip"
    return "fail"


class _Tee:
    """Writes to two streams (the table to stdout and to ``--out``)."""

    def __init__(self, a, b):
        self._a, self._b = a, b

    def write(self, text):
        self._a.write(text)
        self._b.write(text)
        self._b.flush()

    def flush(self):
        self._a.flush()
        self._b.flush()


def main() -> int:
    ap = argparse.ArgumentParser()
    # Every line of the table goes to stdout and, with --out, to that file as well.
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--only", default="")
    ap.add_argument("--out", default="", help="also write the table to this file (make conformance: last-run.txt)")
    ap.add_argument(
        "--nodes",
        type=int,
        default=0,
        help="also run under 'dragon --local-nodes N' (N >= 2), the tests' processes on nodes 1..N-1",
    )
    a = ap.parse_args()
    names = [c for c in classes("spawn") if a.only in c]
    methods = ("spawn", "dragon", "dragon3") if a.nodes >= 2 else ("spawn", "dragon")
    total = {m: [0, 0, 0] for m in methods}
    regressions = []
    if a.out:
        sys.stdout = _Tee(sys.stdout, open(a.out, "w"))  # noqa: SIM115 (closed at exit)
    heads = {"spawn": "spawn p/f/s", "dragon": "dragon p/f/s", "dragon3": f"{a.nodes} nodes p/f/s"}
    print(f"{'class':<44}" + "".join(f"{heads[m]:>16}" for m in methods) + f"{'time s':>16}")
    for cls in names:
        row = {}
        times = []
        notes = []
        for method in methods:
            res, dt, note = run_class(method, cls, a.timeout, a.nodes)
            times.append(dt)
            if note:
                notes.append(f"{method}: {note}")
            counts = [0, 0, 0]
            for s in res.values():
                counts[["pass", "fail", "skip"].index(status(s))] += 1
            for i in range(3):
                total[method][i] += counts[i]
            row[method] = (res, counts)
        sp = row["spawn"][0]
        for method in methods[1:]:
            dr = row[method][0]
            known = KNOWN if method == "dragon" else {**KNOWN, **KNOWN_NODES}
            for test, s in sp.items():
                if status(s) == "pass" and status(dr.get(test, "missing")) != "pass":
                    tid = f"{cls}.{test}"
                    if tid not in known:
                        regressions.append((f"{tid} [{heads[method]}]", dr.get(test, "missing")))
        print(
            f"{cls:<44}"
            + "".join(f"{fmt(row[m][1]):>16}" for m in methods)
            + f"{'/'.join(f'{x:.0f}' for x in times):>16} {' '.join(notes)}",
            flush=True,
        )
    print(f"{'TOTAL (passed/failed/skipped)':<44}" + "".join(f"{fmt(total[m]):>16}" for m in methods))
    for tid, reason in KNOWN.items():
        print(f"known: {tid}: {reason}")
    if "dragon3" in methods:
        for tid, reason in KNOWN_NODES.items():
            print(f"known on {a.nodes} nodes: {tid}: {reason}")
    if regressions:
        print("tests that pass under spawn but not under dragon:")
        for tid, s in regressions:
            print(f"  {tid}: {s}")
        return 1
    print(
        "bar holds: every test that passes under spawn passes under dragon"
        + (f", on one node and on {a.nodes} nodes" if "dragon3" in methods else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
