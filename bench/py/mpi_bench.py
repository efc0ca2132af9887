"""MPI launch benchmark (issue 17): a 4-rank hello (MPI_Init, MPI_Barrier, MPI_Finalize)
started as a ``ProcessGroup(pmi=...)`` inside a running runtime against the MPI's own
launcher on the same binary (``mpiexec.hydra -n 4`` for MPICH, served PMI-1 by the group;
``mpirun.openmpi -n 4`` for Open MPI, served PMIx), medians of the same number of runs, in
one run.

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


MPIS = [  # name, compiler, launcher, the group's pmi value
    ("MPICH", "mpicc.mpich", ["mpiexec.hydra", "-n", "4"], "cray"),
    (
        "Open MPI",
        "mpicc.openmpi",
        ["mpirun.openmpi", "--allow-run-as-root", "--oversubscribe", "-n", "4"],
        "pmix",
    ),
]


def group(exe: str, rounds: int, pmi: str) -> float:
    from dragon.native.process import ProcessTemplate
    from dragon.native.process_group import ProcessGroup

    times = []
    for _ in range(rounds + 1):
        t = time.perf_counter()
        pg = ProcessGroup(pmi=pmi)
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
    ap.add_argument("--pmi", default="cray")
    a = ap.parse_args()
    if a.group:
        print(group(a.group, a.rounds, a.pmi))
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "hello.c")
        with open(src, "w") as f:
            f.write(HELLO)
        for name, cc, launcher, pmi in MPIS:
            exe = os.path.join(d, f"hello-{cc}")
            subprocess.run([cc, "-O1", "-o", exe, src], check=True)
            subprocess.run([*launcher, exe], check=True)
            mpx = []
            for _ in range(a.rounds):
                t = time.perf_counter()
                subprocess.run([*launcher, exe], check=True)
                mpx.append(time.perf_counter() - t)
            env = dict(os.environ)
            env.pop("DRAGON_RUNTIME", None)
            r = subprocess.run(
                [DRAGON, os.path.abspath(__file__), "--group", exe, "--rounds", str(a.rounds), "--pmi", pmi],
                capture_output=True, text=True, check=True, env=env,
            )  # fmt: skip
            rows.append(
                (
                    name,
                    " ".join(launcher[:1] + launcher[-2:]),
                    pmi,
                    statistics.median(mpx),
                    float(r.stdout.split()[-1]),
                )
            )
    print(
        f"# MPI launch bench, {os.cpu_count()} CPUs, 4-rank hello (init + barrier + finalize), medians of {a.rounds}"
    )
    for name, launcher, pmi, m, pg in rows:
        print(f"{name:8} {launcher + ' hello (s)':40} {m:8.3f}   baseline")
        print(
            f"{name:8} {f'ProcessGroup(pmi={pmi!r}), start+join (s)':40} {pg:8.3f}   {pg / m:5.2f}x {launcher.split()[0]}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
