"""MPI launch benchmark (issue 17): a 4-rank MPICH hello (MPI_Init, MPI_Barrier,
MPI_Finalize) started as a ``ProcessGroup(pmi=...)`` inside a running runtime against
``mpiexec -n 4`` of the same binary, medians of the same number of runs, in one run.

Usage: ``python mpi_bench.py [--rounds N]`` (``make bench-mpi``); the group part runs this
file under ``dragon`` with ``--group``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

HELLO = r"""
#include <mpi.h>
int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    MPI_Barrier(MPI_COMM_WORLD);
    MPI_Finalize();
    return 0;
}
"""
DRAGON = os.path.join(os.path.dirname(sys.executable), "dragon")


def group(exe: str, rounds: int) -> float:
    from dragon.native.process import ProcessTemplate
    from dragon.native.process_group import ProcessGroup

    times = []
    for _ in range(rounds + 1):
        t = time.perf_counter()
        pg = ProcessGroup(pmi="cray")
        pg.add_process(nproc=4, template=ProcessTemplate(target=exe))
        pg.init()
        pg.start()
        pg.join(120)
        pg.close()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])  # the first warms the page cache


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--group", metavar="EXE")
    a = ap.parse_args()
    if a.group:
        print(group(a.group, a.rounds))
        return 0
    with tempfile.TemporaryDirectory() as d:
        src, exe = os.path.join(d, "hello.c"), os.path.join(d, "hello")
        with open(src, "w") as f:
            f.write(HELLO)
        subprocess.run(["mpicc", "-O1", "-o", exe, src], check=True)
        subprocess.run(["mpiexec", "-n", "4", exe], check=True)
        mpx = []
        for _ in range(a.rounds):
            t = time.perf_counter()
            subprocess.run(["mpiexec", "-n", "4", exe], check=True)
            mpx.append(time.perf_counter() - t)
        env = dict(os.environ)
        env.pop("DRAGON_RUNTIME", None)
        r = subprocess.run(
            [DRAGON, os.path.abspath(__file__), "--group", exe, "--rounds", str(a.rounds)],
            capture_output=True, text=True, check=True, env=env,
        )  # fmt: skip
        pg = float(r.stdout.strip().splitlines()[-1])
    m = statistics.median(mpx)
    print(f"# MPI launch bench, {os.cpu_count()} CPUs, 4-rank MPICH hello (init + barrier + finalize), medians of {a.rounds}")
    print(f"mpiexec -n 4 hello (s)                          {m:8.3f}   baseline")
    print(f"ProcessGroup(pmi='cray'), 4 ranks, start+join (s) {pg:8.3f}   {pg / m:5.2f}x mpiexec")
    return 0


if __name__ == "__main__":
    sys.exit(main())
