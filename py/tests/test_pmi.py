"""MPI programs as members of a ``ProcessGroup(pmi=...)``: the runtime serves them PMI-1
(``dragon._pmi``) and PMIx (``dragon._pmix``, for Open MPI). Real MPICH and Open MPI from
Debian's packages; the programs are built here with ``mpicc.mpich`` and ``mpicc.openmpi``.
Every run goes through the ``dragon`` launcher (1 node and 3 local nodes) and leaves no
process or segment behind."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from conftest import leftovers, snapshot
from dragon._pmi import process_mapping
from dragon.infrastructure.facts import PMIBackend
from dragon.native.process_group import ProcessGroup

DRAGON = os.path.join(os.path.dirname(sys.executable), "dragon")

RING = r"""
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank, size;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (argc > 1 && strcmp(argv[1], "abort") == 0 && rank == 1) MPI_Abort(MPI_COMM_WORLD, 3);
    if (argc > 1 && strcmp(argv[1], "exit") == 0 && rank == 1) exit(5);
    if (argc > 1 && strcmp(argv[1], "quit") == 0 && rank == 1) exit(0);
    int token = rank == 0 ? 1 : 0;
    if (rank != 0) {
        MPI_Recv(&token, 1, MPI_INT, rank - 1, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        token += 1;
    }
    MPI_Send(&token, 1, MPI_INT, (rank + 1) % size, 0, MPI_COMM_WORLD);
    if (rank == 0) MPI_Recv(&token, 1, MPI_INT, size - 1, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    int sum = 0;
    MPI_Allreduce(&rank, &sum, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    if (rank == 0) printf("ring token %d allreduce %d size %d\n", token, sum, size);
    fflush(stdout);
    MPI_Finalize();
    return 0;
}
"""

DRIVER = """
import os, sys
from dragon.native.process import ProcessTemplate
from dragon.native.process_group import ProcessGroup
from dragon.infrastructure.facts import PMIBackend

PMI = {"cray": "cray", "pmix": "pmix", "CRAY": PMIBackend.CRAY, "true": True}[sys.argv[2]]

def python_worker():
    print("python worker PMI_RANK", os.environ.get("PMI_RANK", "unset"), flush=True)

if __name__ == "__main__":
    exe, n, mode, runs = sys.argv[1], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
    for run in range(runs):
        pg = ProcessGroup(pmi=PMI)
        pg.add_process(nproc=n, template=ProcessTemplate(target=exe, args=[mode] if mode != "-" else []))
        if mode == "-" and run == 0:
            pg.add_process(nproc=1, template=ProcessTemplate(target=python_worker))
        pg.init()
        pg.start()
        try:
            pg.join(120)
            print("run", run, "ok", sorted(c for _, c in pg.exit_status), flush=True)
        except Exception as e:
            print("run", run, "error", type(e).__name__, str(e).splitlines()[0], flush=True)
        pg.close()
"""


def build(tmp_path_factory, compiler, package):
    if not shutil.which(compiler):
        pytest.fail(f"{compiler} not found: make setup installs {package}")
    d = tmp_path_factory.mktemp("mpi")
    (d / "ring.c").write_text(RING)
    subprocess.run([compiler, "-O1", "-o", str(d / "ring"), str(d / "ring.c")], check=True, timeout=120)
    return str(d / "ring")


@pytest.fixture(scope="module")
def ring(tmp_path_factory):
    return build(tmp_path_factory, "mpicc.mpich", "mpich and libmpich-dev")


@pytest.fixture(scope="module")
def ring_ompi(tmp_path_factory):
    return build(tmp_path_factory, "mpicc.openmpi", "openmpi-bin, libopenmpi-dev and libpmix-dev")


def run(tmp_path, ring, nodes, pmi, n, mode="-", runs=1):
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(DRIVER))
    e = dict(os.environ)
    e.pop("DRAGON_RUNTIME", None)
    flags = ["--local-nodes", str(nodes)] if nodes > 1 else []
    argv = [DRAGON, *flags, str(script), ring, pmi, str(n), mode, str(runs)]
    before = snapshot()
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=e, cwd=tmp_path)
    # the runtime's segments and scratch directory, the PMIx server's directory, Open MPI's
    # segments and session directory (of ranks killed after an abort, too)
    left = leftovers(before)
    assert left == [], left
    return r


def test_four_ranks_on_one_node_twice_with_a_python_worker(tmp_path, ring):
    r = run(tmp_path, ring, 1, "cray", 4, runs=2)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("ring token 4 allreduce 6 size 4") == 2, r.stdout
    assert "run 0 ok [0, 0, 0, 0, 0]" in r.stdout and "run 1 ok [0, 0, 0, 0]" in r.stdout
    assert "python worker PMI_RANK unset" in r.stdout  # not a rank: no PMI settings


@pytest.mark.parametrize("pmi", ["pmix", "CRAY", "true"])
def test_six_ranks_over_three_local_nodes(tmp_path, ring, pmi):
    r = run(tmp_path, ring, 3, pmi, 6)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ring token 6 allreduce 15 size 6" in r.stdout
    assert "run 0 ok [0, 0, 0, 0, 0, 0, 0]" in r.stdout  # 6 ranks and the Python worker


@pytest.mark.parametrize("mode", ["abort", "exit"])
def test_a_rank_that_aborts_or_exits_ends_the_group(tmp_path, ring, mode):
    """Rank 1 calls MPI_Abort(3) or exit(5) right after MPI_Init: the other ranks, which
    would wait for it for ever, are ended and join raises. (After an exit, another rank may
    abort first on its own, having lost its peer: then that abort's code is the one.)"""
    r = run(tmp_path, ring, 3, "cray", 4, mode=mode)
    assert r.returncode == 0, r.stdout + r.stderr
    err = "run 0 error DragonUserCodeError Error(s) in user-provided code resulted in exit codes: "
    assert err in r.stdout, r.stdout
    if mode == "abort":
        assert err + "[3]" in r.stdout, r.stdout


@pytest.mark.parametrize("mode", ["exit", "quit"])
def test_a_rank_that_ends_without_finalize_fails_the_group(tmp_path, ring, mode):
    """Rank 1 exits with status 0 after MPI_Init without MPI_Finalize ("quit"): its peers
    would wait for it for ever, so the group ends and join says which rank did it."""
    r = run(tmp_path, ring, 1, "cray", 3, mode=mode)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "run 0 error DragonUserCodeError" in r.stdout, r.stdout
    if mode == "quit":
        assert "exit codes: [0" in r.stdout, r.stdout


def test_open_mpi_ring_on_one_node_twice_with_a_python_worker(tmp_path, ring_ompi):
    """An Open MPI program (PMIx only) as group members: the runtime's PMIx server answers
    it, with a new namespace for each run."""
    r = run(tmp_path, ring_ompi, 1, "pmix", 4, runs=2)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("ring token 4 allreduce 6 size 4") == 2, r.stdout
    assert "run 0 ok [0, 0, 0, 0, 0]" in r.stdout and "run 1 ok [0, 0, 0, 0]" in r.stdout


@pytest.mark.parametrize("pmi", ["cray", "pmix"])
def test_open_mpi_ring_over_three_local_nodes(tmp_path, ring_ompi, pmi):
    """Six Open MPI ranks round robin over 3 local nodes; whatever flavour was asked, an Open
    MPI program gets PMIx (the library picks what it speaks)."""
    r = run(tmp_path, ring_ompi, 3, pmi, 6)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ring token 6 allreduce 15 size 6" in r.stdout
    assert "run 0 ok [0, 0, 0, 0, 0, 0, 0]" in r.stdout


@pytest.mark.parametrize("mode", ["abort", "quit"])
def test_an_open_mpi_rank_that_aborts_or_quits_ends_the_group(tmp_path, ring_ompi, mode):
    r = run(tmp_path, ring_ompi, 3, "pmix", 4, mode=mode)
    assert r.returncode == 0, r.stdout + r.stderr
    err = "run 0 error DragonUserCodeError Error(s) in user-provided code resulted in exit codes: "
    assert err in r.stdout, r.stdout
    if mode == "abort":
        assert err + "[3" in r.stdout, r.stdout


def test_pmi_values_and_process_mapping():
    with pytest.raises(ValueError, match="restart"):
        ProcessGroup(pmi="pmix", restart=True)
    for bad in ("slurm", 3):
        with pytest.raises(ValueError):
            ProcessGroup(pmi=bad)
    assert ProcessGroup(pmi=True).pmi is PMIBackend.CRAY
    assert ProcessGroup(pmi="PMIX").pmi is PMIBackend.PMIX
    assert ProcessGroup().pmi is None
    # Round robin over 3 nodes, then a block of 2 on one node.
    assert process_mapping([0, 1, 2, 0, 1, 2]) == "(vector,(0,1,1),(1,1,1),(2,1,1),(0,1,1),(1,1,1),(2,1,1))"
    assert process_mapping([5, 5, 7, 7]) == "(vector,(0,1,2),(1,1,2))"


MPI4PY = """
from mpi4py import MPI
c = MPI.COMM_WORLD
total = c.allreduce(c.Get_rank())
if c.Get_rank() == 0:
    print("mpi4py size", c.Get_size(), "sum", total, flush=True)
"""

MPI4PY_DRIVER = """
import sys
from dragon.native.process import ProcessTemplate
from dragon.native.process_group import ProcessGroup

if __name__ == "__main__":
    script, libdir = sys.argv[1], sys.argv[2]
    pg = ProcessGroup(pmi="pmix")
    t = ProcessTemplate(target=sys.executable, args=[script], env={"LD_LIBRARY_PATH": libdir})
    pg.add_process(nproc=3, template=t)
    pg.init()
    pg.start()
    pg.join(120)
    print("group ok", sorted(c for _, c in pg.exit_status), flush=True)
    pg.close()
"""


def test_mpi4py_script_as_a_group_member_over_three_nodes(tmp_path):
    """An mpi4py script (its interpreter the group member's program) over 3 local nodes.
    mpi4py's wheel links libmpi.so.12, which Debian's MPICH names libmpich.so.12: the
    rank's environment points at a directory that has the other name too."""
    pytest.importorskip("mpi4py", reason="mpi4py is installed by make py-env")
    lib = tmp_path / "lib"
    lib.mkdir()
    os.symlink("/usr/lib/x86_64-linux-gnu/libmpich.so.12", lib / "libmpi.so.12")
    (tmp_path / "m4.py").write_text(MPI4PY)
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(MPI4PY_DRIVER))
    e = dict(os.environ)
    e.pop("DRAGON_RUNTIME", None)
    argv = [DRAGON, "--local-nodes", "3", str(script), str(tmp_path / "m4.py"), str(lib)]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=e, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "mpi4py size 3 sum 3" in r.stdout and "group ok [0, 0, 0]" in r.stdout, r.stdout


def test_an_open_mpi_program_without_libpmix_is_refused_clearly(tmp_path, monkeypatch):
    """Where libpmix cannot be loaded, a program linked with Open MPI's libmpi.so.40 (PMIx
    only) would never find its peers: start() refuses it with a clear error instead of a
    hang. The stand-in is a real ELF whose DT_NEEDED names libmpi.so.40 (a library of that
    soname built here); libpmix's absence is made by pointing the loader at no file."""
    if not shutil.which("cc"):
        pytest.fail("cc not found: make setup installs build-essential")
    (tmp_path / "fake.c").write_text("int MPI_Init(void *a, void *b) { return 0; }\n")
    prog = "int MPI_Init(void *, void *);\nint main(void) { return MPI_Init(0, 0); }\n"
    (tmp_path / "prog.c").write_text(prog)
    lib = tmp_path / "libmpi.so.40"
    cc = ["cc", "-shared", "-fPIC", "-Wl,-soname,libmpi.so.40", "-o", str(lib), str(tmp_path / "fake.c")]
    subprocess.run(cc, check=True, timeout=60)
    link = ["cc", "-o", str(tmp_path / "prog"), str(tmp_path / "prog.c"), str(lib)]
    subprocess.run(link, check=True, timeout=60)
    from dragon import _pmix
    from dragon.exceptions import DragonProcessGroupStartError
    from dragon.native.process import ProcessTemplate

    monkeypatch.setattr(_pmix, "LIBRARIES", (str(tmp_path / "no-libpmix.so"),))
    monkeypatch.setattr(_pmix, "_HOST", None)
    pg = ProcessGroup(pmi=PMIBackend.CRAY)
    pg.add_process(nproc=2, template=ProcessTemplate(target=str(tmp_path / "prog")))
    pg.init()
    with pytest.raises(
        DragonProcessGroupStartError, match="is an Open MPI program: libpmix is not installed"
    ):
        pg.start()
    assert pg.puids == []


GS_DRIVER = """
import os, sys
from dragon.globalservices import group, process
from dragon.infrastructure import process_desc
from dragon.infrastructure.facts import PMIBackend

if __name__ == "__main__":
    exe, n = sys.argv[1], int(sys.argv[2])
    msg = process.get_create_message(exe=exe, run_dir=os.getcwd(), args=[], env=None, pmi=PMIBackend.CRAY)
    grp = group.create(items=[(n - 1, msg.serialize()), (1, msg.serialize())], policy=None, soft=False)
    active = process_desc.ProcessDescriptor.State.ACTIVE
    puids = [r.desc.p_uid for s in grp.sets for r in s if r.desc.state == active]
    done, _ = process.multi_join(puids, join_all=True, timeout=120)
    print("gs group", [len(s) for s in grp.sets], "codes", sorted(c for _, c in done), flush=True)
    group.destroy(grp.g_uid)
"""


@pytest.mark.parametrize("nodes", [1, 3])
def test_mpi_ranks_through_the_global_services_group_api(tmp_path, ring, nodes):
    """DragonHPC's dragon_group_mpi_demo pattern: create messages with pmi=PMIBackend.CRAY
    given to group.create run as one MPI job (ranks across the items, served PMI)."""
    script = tmp_path / "gs.py"
    script.write_text(textwrap.dedent(GS_DRIVER))
    e = dict(os.environ)
    e.pop("DRAGON_RUNTIME", None)
    flags = ["--local-nodes", str(nodes)] if nodes > 1 else []
    before = snapshot()
    r = subprocess.run(
        [DRAGON, *flags, str(script), ring, "4"],
        capture_output=True,
        text=True,
        timeout=300,
        env=e,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ring token 4 allreduce 6 size 4" in r.stdout, r.stdout
    assert "gs group [3, 1] codes [0, 0, 0, 0]" in r.stdout, r.stdout
    assert leftovers(before) == []
