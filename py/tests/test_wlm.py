"""``dragon`` over the nodes of a Slurm allocation, a PBS+PALS job and an SSH host list, with
real processes: a private 3-node Slurm cluster (tests/slurm/up.sh: munged, slurmctld, three
slurmd, emulated nodes n1 n2 n3 on this host) driven by ``salloc``; a PBS job's node file
and a stand-in ``mpiexec`` that starts its command once per host as PALS does; an ``sshd``
on loopback with its own host key and an authorized key. Each cluster or server comes up
once per module. Every run checks the nodes listed, where processes ran, the labels of
their output, the exit code, and that no process of the runtime (agents included) and no
segment of it is left."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from conftest import cmdline
from dragon.cli import _runtime_of_env
from test_multinode import alive

BIN = os.path.dirname(sys.executable)
DRAGON = os.path.join(BIN, "dragon")
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SLURM_UP = os.path.join(REPO, "tests", "slurm", "up.sh")
SLURM_DOWN = os.path.join(REPO, "tests", "slurm", "down.sh")
SBIN = "/usr/sbin:/usr/bin:/sbin:/bin"

# Lists the nodes, runs a process on each (round robin) and one on the second node by name,
# and reports the runtime, the agents' pids (for the leftover check) and whether the runtime's
# secret shows in an agent's command line or initial environment.
DRIVER = """
import os, sys
from dragon.native.machine import System, Node, current, node_table
from dragon.native.process import Process
from dragon.infrastructure.policy import Policy

def where(tag):
    print("ran", tag, current().name, flush=True)

def shows_secret(pid):
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        cmd = f.read()
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = f.read()
    return b"SECRET" in cmd or b"DRAGON_NODE_SECRET=" in env

if __name__ == "__main__":
    s = System()
    names = [Node(h).name for h in s.nodes]
    rt = os.environ["DRAGON_RUNTIME"].split(":")[1]
    agents = [n["agent_pid"] for n in node_table()[1:]]
    print("runtime", rt, "agents", *agents, flush=True)
    print("nodes", s.nnodes, *names, flush=True)
    print("secret shown", any(shows_secret(p) for p in agents), flush=True)
    ps = [Process(target=where, args=(f"rr{i}",)) for i in range(len(names))]
    for p in ps:
        p.start()
    print("workers", *[p.pid for p in ps], flush=True)
    print("rr", sorted(p.node for p in ps), [p.join() for p in ps], flush=True)
    pol = Policy(placement=Policy.Placement.HOST_NAME, host_name=names[1])
    p = Process(target=where, args=("byname",), policy=pol)
    p.start()
    print("byname", p.node, p.join(), flush=True)
"""


# ---- leftovers ---------------------------------------------------------------------------


def started_with(pid, mark):
    """Whether ``mark`` (bytes) is a variable of process ``pid``'s initial environment."""
    try:
        return mark in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def runtime_pids(rt):
    """Live processes of runtime ``rt`` on this host: its processes (DRAGON_RUNTIME) and
    agents started with it in their environment (DRAGON_NODE_RT)."""
    pids = [int(d) for d in os.listdir("/proc") if d.isdigit() and int(d) != os.getpid()]
    mark = f"DRAGON_NODE_RT={rt}".encode()
    return [p for p in pids if alive(p) and (_runtime_of_env(p) == int(rt, 16) or started_with(p, mark))]


def ssh_agents():
    """Live agents started by an SSH launch of this Python (the only ones without the
    runtime in their environment)."""
    argv = [sys.executable.encode(), b"-m", b"dragon._nodeagent", b"--env-stdin"]
    pids = [int(d) for d in os.listdir("/proc") if d.isdigit()]
    return [p for p in pids if cmdline(p).split(b"\0")[:4] == argv and alive(p)]


def segments(rt):
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"dragon-{rt}-")]


def assert_nothing_left(rt, pids=(), timeout=20):
    """Waits (bounded) until no process of runtime ``rt`` (nor ``pids``, nor an SSH agent)
    lives and no segment of it exists."""
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in pids if alive(p)] + runtime_pids(rt) + ssh_agents()
        segs = segments(rt) if rt else []
        if not left and not segs:
            return
        assert time.monotonic() < deadline, f"left behind: processes {left}, segments {segs}"
        time.sleep(0.05)


# Starts a long process on the last node and reports the runtime, the launcher's pid, the
# last node's agent and that process, then waits for it.
LONG = """
import os, time
from dragon.native.machine import node_table
from dragon.native.process import Process
from dragon.infrastructure.policy import Policy

if __name__ == "__main__":
    on_last = Policy(placement=Policy.Placement.HOST_ID, host_id=len(node_table()))
    p = Process(target=time.sleep, args=(300,), policy=on_last)
    p.start()
    rt = os.environ["DRAGON_RUNTIME"].split(":")[1]
    print("ready", rt, os.getppid(), node_table()[-1]["agent_pid"], p.pid, flush=True)
    p.join()
"""


def start_long(argv, env, tmp_path):
    """Starts ``argv`` + the LONG driver; returns (process, rt, launcher, last agent, worker)."""
    e = dict(env, PATH=BIN + os.pathsep + env.get("PATH", ""))
    e.pop("DRAGON_RUNTIME", None)
    p = subprocess.Popen(
        [*argv, driver(tmp_path, LONG)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=e,
    )
    words = p.stdout.readline().split()
    assert words and words[0] == "ready", (words, "" if words else p.stderr.read())
    return p, words[1], *[int(w) for w in words[2:5]]


def runtime_of_failure(stderr):
    """The runtime id of a failed run (from the launcher's 'runtime logs in' line)."""
    m = re.search(r"runtime logs in \S*/([0-9a-f]{16})", stderr)
    assert m, stderr
    return m.group(1)


# ---- running -----------------------------------------------------------------------------


def run(argv, env, timeout=120):
    e = dict(env)
    e.pop("DRAGON_RUNTIME", None)
    e["PATH"] = BIN + os.pathsep + e.get("PATH", "")
    t = time.monotonic()
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=e, stdin=subprocess.DEVNULL)
    print(f"{' '.join(argv[:4])}...: {time.monotonic() - t:.1f} s, exit {r.returncode}")
    return r


def driver(tmp_path, source=DRIVER):
    path = tmp_path / "driver.py"
    path.write_text(textwrap.dedent(source))
    return str(path)


def check_driver_run(r, names, secret_shown=None):
    """The DRIVER's run: exit 0, ``names`` listed, one process per node labelled with it,
    one on the second node by name; nothing left. Returns the runtime id. ``secret_shown``:
    whether the agents' command lines or initial environments show the secret (None: not
    checked; srun and mpiexec give it to them in their environment)."""
    assert r.returncode == 0, r.stdout + r.stderr
    out = {}
    for ln in r.stdout.splitlines():
        tag, sep, text = ln.partition("] ")
        assert sep and tag.startswith("[stdout: "), ln  # --basic-label: every line labelled
        out[text] = tag[len("[stdout: ") :]
    words = next(t for t in out if t.startswith("runtime ")).split()
    rt, agents = words[1], [int(p) for p in words[3:]]
    workers = [int(p) for p in next(t for t in out if t.startswith("workers ")).split()[1:]]
    assert f"nodes {len(names)} {' '.join(names)}" in out
    assert out[f"nodes {len(names)} {' '.join(names)}"] == names[0]  # the driver runs on node 0
    assert secret_shown is None or f"secret shown {secret_shown}" in out
    assert f"rr {list(range(1, len(names) + 1))} {[0] * len(names)}" in out
    assert "byname 2 0" in out
    for i, name in enumerate(names):
        assert out[f"ran rr{i} {name}"] == name  # output labelled with the node it came from
    assert out[f"ran byname {names[1]}"] == names[1]
    assert_nothing_left(rt, agents + workers)
    return rt


# ---- Slurm -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running 3-node Slurm cluster: the environment for its commands."""
    missing = [t for t in ("slurmctld", "slurmd", "munged", "salloc") if not shutil.which(t, path=SBIN)]
    if missing or os.geteuid() != 0:
        why = f"missing {', '.join(missing)}" if missing else "needs root"
        pytest.skip(f"no Slurm test cluster: {why} (make setup installs slurm-wlm and munge)")
    # Not under pytest's tmp_path: munged (user munge) must reach the directory.
    d = tempfile.mkdtemp(prefix="dragon-slurm-test-")
    t = time.monotonic()
    up = subprocess.run([SLURM_UP, d], capture_output=True, text=True, timeout=120)
    print(f"slurm cluster up in {time.monotonic() - t:.1f} s")
    try:
        assert up.returncode == 0, up.stderr
        env = dict(os.environ, SLURM_CONF=up.stdout.strip().split("=", 1)[1])
        for v in [k for k in env if k.startswith(("SLURM_JOB", "SLURM_NODELIST", "PBS_"))]:
            del env[v]
        yield env
    finally:
        down = subprocess.run([SLURM_DOWN, d], capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stderr
        assert not os.path.exists(d)


def test_slurm_three_nodes(slurm, tmp_path):
    r = run(["salloc", "-N3", "dragon", "--basic-label", driver(tmp_path)], slurm)
    check_driver_run(r, ["n1", "n2", "n3"])


def test_slurm_node_counts(slurm, tmp_path):
    d = driver(tmp_path)
    check_driver_run(run(["salloc", "-N", "2", "dragon", "--basic-label", d], slurm), ["n1", "n2"])
    check_driver_run(run(["salloc", "-N3", "dragon", "-N", "2", "--basic-label", d], slurm), ["n1", "n2"])
    # Started in a step on n3 (as a batch script runs on its node): n3 is node 0.
    argv = ["salloc", "-N3", "srun", "-N1", "-n1", "-w", "n3", "--overlap", "dragon", "--basic-label", d]
    check_driver_run(run(argv, slurm), ["n3", "n1", "n2"])
    # -s: this node only, inside the allocation; -w pbs+pals: no such job here.
    one = driver(tmp_path, "from dragon.native.machine import System\nprint('nodes', System().nnodes)\n")
    r = run(["salloc", "-N3", "dragon", "-s", one], slurm)
    assert r.returncode == 0 and "nodes 1" in r.stdout, r.stderr
    r = run(["salloc", "-N2", "dragon", "-N", "3", one], slurm)
    assert r.returncode == 2 and "-N 3: the slurm allocation has 2 node(s): n1, n2" in r.stderr, r.stderr
    r = run(["salloc", "-N2", "dragon", "-w", "pbs+pals", one], slurm)
    assert r.returncode == 2 and "not inside a PBS job" in r.stderr, r.stderr


def test_slurm_seed_examples(slurm):
    """The seed's examples run unchanged over three nodes. The ProcessGroup example places by
    hostname, which every emulated node shares, so its 12 processes all run on n1; the DDict
    example's workers go round robin over n1..n3 and use the DDict's managers, one on each
    node (the example prints how many nodes hold one)."""
    r = run(["salloc", "-N3", "dragon", os.path.join(REPO, "examples", "seed_process_group.py")], slurm)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("exited with 0") == 12, r.stdout
    r = run(["salloc", "-N3", "dragon", os.path.join(REPO, "examples", "seed_ddict.py")], slurm)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "4 keys, total 6000, managers on 3 node(s)" in r.stdout, r.stdout


def test_slurm_dragon_cleanup_cleans_every_node(slurm):
    """Inside an allocation, dragon-cleanup cleans this node and runs on every other node of
    it (one srun step): each node reports, and a stale segment of a member node is gone."""
    rt = os.urandom(8).hex()
    stale = f"/dev/shm/dragon-{rt}-2-pool-1"  # a member's pool whose agent is long gone
    with open(stale, "wb") as f:
        f.write(b"\0" * 64)
    try:
        r = run(["salloc", "-N3", "dragon-cleanup"], slurm)
        assert r.returncode == 0, r.stdout + r.stderr
        lines = r.stdout.splitlines()
        reports = [ln.split(":")[1].strip() for ln in lines if ln.startswith("dragon-cleanup: ")]
        assert len(reports) == 3 and {"n2", "n3"} <= set(reports), r.stdout
        assert not os.path.exists(stale)
    finally:
        if os.path.exists(stale):
            os.unlink(stale)
    r = run(["salloc", "-N2", "dragon-cleanup", "-N", "3"], slurm)
    assert r.returncode == 2 and "-N 3: the slurm allocation has 2 node(s)" in r.stderr, r.stderr


@pytest.mark.parametrize("mpicc", ["mpicc.mpich", "mpicc.openmpi"])
def test_slurm_mpi_ranks_over_three_nodes(slurm, tmp_path, mpicc):
    """An MPI ring + allreduce of 6 ranks placed over the allocation's 3 nodes, served PMI-1
    (MPICH) or PMIx (Open MPI) by the group: the seed's MPI pattern under a real Slurm
    allocation."""
    from test_pmi import DRIVER, RING

    if not shutil.which(mpicc):
        pytest.fail(f"{mpicc} not found: make setup installs mpich, openmpi-bin and their -dev packages")
    (tmp_path / "ring.c").write_text(RING)
    exe = str(tmp_path / "ring")
    subprocess.run([mpicc, "-O1", "-o", exe, str(tmp_path / "ring.c")], check=True, timeout=120)
    d = driver(tmp_path, DRIVER)
    r = run(["salloc", "-N3", "dragon", d, exe, "CRAY", "6", "-", "1"], slurm)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ring token 6 allreduce 15 size 6" in r.stdout, r.stdout
    assert "run 0 ok [0, 0, 0, 0, 0, 0, 0]" in r.stdout, r.stdout


def test_slurm_sigterm_tears_every_node_down(slurm, tmp_path):
    p, rt, launcher, agent, worker = start_long(["salloc", "-N3", "dragon"], slurm, tmp_path)
    os.kill(launcher, signal.SIGTERM)
    assert p.wait(60) == 128 + signal.SIGTERM, p.stderr.read()
    assert_nothing_left(rt, [launcher, agent, worker])


def test_slurm_member_that_fails_is_named(slurm, tmp_path):
    r = run(["salloc", "-N3", "dragon", driver(tmp_path)], dict(slurm, DRAGON_FAULT_NODE_EXIT="2"))
    assert r.returncode == 1, r.stderr
    assert "dragon: node 2 (n3) exited during bring-up" in r.stderr, r.stderr
    assert "runtime " not in r.stdout
    assert_nothing_left(runtime_of_failure(r.stderr))


def test_srun_that_fails_names_the_nodes(slurm, tmp_path):
    """Outside any allocation, with the environment of a job that does not exist: srun
    cannot start the step; every member node is named."""
    env = dict(slurm, SLURM_JOB_ID="987654", SLURM_JOB_NODELIST="n[1-3]")
    r = run(["dragon", "-w", "slurm", driver(tmp_path)], env)
    assert r.returncode == 1, r.stderr
    assert "dragon: node 1 (n2) exited during bring-up; node 2 (n3) exited during bring-up" in r.stderr
    assert "srun: error:" in r.stderr
    assert_nothing_left(runtime_of_failure(r.stderr))


# ---- PBS + PALS --------------------------------------------------------------------------

# Starts its command once per host of --hosts (all on this host) with the rank PALS gives,
# merging their output, forwarding SIGTERM/SIGINT/SIGHUP; logs its arguments.
MPIEXEC = """#!{python}
import os, signal, subprocess, sys
args, opts = sys.argv[1:], {{}}
while args and args[0].startswith("-"):
    opts[args[0]] = args[1]
    args = args[2:]
with open(os.environ["MPIEXEC_LOG"], "a") as f:
    print(*sys.argv[1:], file=f)
hosts = opts["--hosts"].split(",")
assert opts["--ppn"] == "1" and int(opts["-n"]) == len(hosts), opts
procs = [
    subprocess.Popen(args, env=dict(os.environ, PALS_RANKID=str(i), PMI_RANK=str(i), PALS_NODEID=str(i)))
    for i in range(len(hosts))
]
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(s, lambda sig, _: [p.send_signal(sig) for p in procs])
sys.exit(max(p.wait() for p in procs))
"""


@pytest.fixture
def pbs(tmp_path):
    """A PBS job's environment: a node file of p1 p2 p3 (several lines per host) and the
    stand-in mpiexec first on PATH."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    mpiexec = bindir / "mpiexec"
    mpiexec.write_text(MPIEXEC.format(python=sys.executable))
    mpiexec.chmod(0o755)
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("p1\np1\np2\np2\np3\np3\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PBS_"))}
    env.update(
        PBS_NODEFILE=str(nodefile),
        PBS_JOBID="1.pbs",
        MPIEXEC_LOG=str(tmp_path / "mpiexec.log"),
        PATH=f"{bindir}{os.pathsep}{env.get('PATH', '')}",
    )
    return env


def test_pbs_pals_three_nodes(pbs, tmp_path):
    check_driver_run(run(["dragon", "--basic-label", driver(tmp_path)], pbs), ["p1", "p2", "p3"])
    with open(pbs["MPIEXEC_LOG"]) as f:
        calls = f.read().splitlines()
    assert len(calls) == 1 and calls[0].startswith("-n 2 --ppn 1 --hosts p2,p3 "), calls
    assert "SECRET" not in calls[0]
    check_driver_run(
        run(["dragon", "-w", "pbs+pals", "-N", "2", "--basic-label", driver(tmp_path)], pbs), ["p1", "p2"]
    )


def test_pbs_member_that_fails_is_named(pbs, tmp_path):
    r = run(["dragon", driver(tmp_path)], dict(pbs, DRAGON_FAULT_NODE_EXIT="1"))
    assert r.returncode == 1, r.stderr
    assert "dragon: node 1 (p2) exited during bring-up" in r.stderr, r.stderr
    assert_nothing_left(runtime_of_failure(r.stderr))


# ---- SSH ---------------------------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """An sshd on 127.0.0.1 (own host key, one authorized key) and a client configuration
    naming hosts h1 h2 h3 on it and host ``dead`` on a closed port: (config, key)."""
    exe = "/usr/sbin/sshd"
    if not (os.path.exists(exe) and shutil.which("ssh") and shutil.which("ssh-keygen")):
        pytest.skip("no sshd/ssh: make setup installs openssh-server and openssh-client")
    d = tmp_path_factory.mktemp("ssh")
    for key in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
    (d / "authorized_keys").write_text((d / "user_key.pub").read_text())
    port, closed = free_port(), free_port()
    (d / "sshd_config").write_text(
        textwrap.dedent(f"""\
        Port {port}
        ListenAddress 127.0.0.1
        HostKey {d}/host_key
        PidFile none
        AuthorizedKeysFile {d}/authorized_keys
        PasswordAuthentication no
        KbdInteractiveAuthentication no
        PermitRootLogin prohibit-password
        StrictModes no
        UsePAM no
        """)
    )
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {(d / 'host_key.pub').read_text()}")
    (d / "ssh_config").write_text(
        textwrap.dedent(f"""\
        Host h1 h2 h3
          HostName 127.0.0.1
          Port {port}
        Host dead
          HostName 127.0.0.1
          Port {closed}
        Host *
          User {os.environ.get("USER", "root")}
          UserKnownHostsFile {d}/known_hosts
          StrictHostKeyChecking yes
          IdentitiesOnly yes
        """)
    )
    os.makedirs("/run/sshd", exist_ok=True)  # its privilege separation directory
    log = open(d / "sshd.log", "w")
    proc = subprocess.Popen(
        [exe, "-D", "-e", "-f", str(d / "sshd_config")], stderr=log, stdin=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 20
        while True:  # serving once it accepts connections
            assert proc.poll() is None, (d / "sshd.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "sshd does not accept connections"
                time.sleep(0.05)
        yield str(d / "ssh_config"), str(d / "user_key")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        log.close()


def ssh_flags(sshd):
    return ["--ssh-config-path", sshd[0], "--private-key", sshd[1]]


def test_ssh_hostlist(sshd, tmp_path):
    r = run(
        ["dragon", "--basic-label", *ssh_flags(sshd), "--hostlist", "h1,h2,h3", driver(tmp_path)], os.environ
    )
    check_driver_run(r, ["h1", "h2", "h3"], secret_shown=False)


def test_ssh_hostfile_first_two(sshd, tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("# our hosts\nh1\nh2\n\nh3\n")
    args = ["-w", "ssh", "-N", "2", "--hostfile", str(hosts), "--basic-label", driver(tmp_path)]
    check_driver_run(run(["dragon", *ssh_flags(sshd), *args], os.environ), ["h1", "h2"])


def test_ssh_lost_node_ends_the_run_naming_it(sshd, tmp_path):
    argv = ["dragon", *ssh_flags(sshd), "--hostlist", "h1,h2,h3"]
    p, rt, launcher, agent, worker = start_long(argv, os.environ, tmp_path)
    os.kill(agent, signal.SIGKILL)
    assert p.wait(60) != 0
    err = p.stderr.read()
    assert "dragon: node 2 (h3) was lost; ending the run" in err, err
    assert_nothing_left(rt, [launcher, agent, worker])


def test_ssh_host_that_cannot_be_reached_is_named(sshd, tmp_path):
    r = run(["dragon", *ssh_flags(sshd), "--hostlist", "h1,h2,dead", driver(tmp_path)], os.environ)
    assert r.returncode == 1, r.stderr
    assert "dragon: node 2 (dead) exited during bring-up" in r.stderr, r.stderr
    assert "Connection refused" in r.stderr
    assert_nothing_left(runtime_of_failure(r.stderr))


# ---- usage -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,env,message",
    [
        (["-m"], {}, "-m needs nodes"),
        (["-w", "slurm"], {}, "not inside a Slurm allocation"),
        (["-w", "ssh"], {}, "-w ssh needs the hosts"),
        (["-N", "2"], {}, "-N needs an allocation"),
        (["--hostlist", "a,b", "-w", "slurm"], {"SLURM_JOB_ID": "1"}, "are for an SSH launch"),
        (["--hostlist", "a,b", "--hostfile", "f"], {}, "not allowed with argument"),
        (["--hostlist", "a,a"], {}, "a node is named twice"),
        (["--local-nodes", "2", "--hostlist", "a,b"], {}, "--local-nodes runs on this host"),
        (["--private-key", "k"], {}, "are for an SSH launch"),
        (
            ["--hostlist", "a,b", "--private-key", "/nonexistent"],
            {},
            "--private-key /nonexistent: no such file",
        ),
        (["-p", "70000"], {}, "not a port number"),
    ],
)
def test_usage_errors(tmp_path, args, env, message):
    e = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PBS_"))}
    r = run(["dragon", *args, driver(tmp_path, "pass\n")], dict(e, **env), timeout=60)
    assert r.returncode == 2 and message in r.stderr, r.stderr


def test_network_prefix_and_port(tmp_path):
    """A one-node runtime (-m with one host): its address by --network-prefix (interface name
    or address prefix; matching nothing is an error), its transport's port by -p."""
    src = "from dragon.native.machine import node_table\nprint('ips', *[n['ip'] for n in node_table()])\n"
    src += "print('endpoint', node_table()[0]['transport'])\n"
    d = driver(tmp_path, src)
    port = free_port()
    r = run(["dragon", "--hostlist", "x", "-m", "--network-prefix", "lo", "-p", str(port), d], os.environ)
    assert r.returncode == 0 and "ips 127.0.0.1" in r.stdout, r.stderr
    assert f"127.0.0.1:{port}" in r.stdout, r.stdout
    r = run(["dragon", "--hostlist", "x", "-m", "--network-prefix", "127.", d], os.environ)
    assert r.returncode == 0 and "ips 127.0.0.1" in r.stdout, r.stderr
    r = run(["dragon", "--hostlist", "x", "-m", "--network-prefix", "nosuchnet", d], os.environ)
    assert r.returncode == 1 and "no network interface matches --network-prefix 'nosuchnet'" in r.stderr
