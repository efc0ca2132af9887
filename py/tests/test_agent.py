"""The node agent: it starts every managed process, keeps exit codes, ids and names, and the
embedded runtime's agent ends with the script."""

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest
from dragon import _native, _runtime
from dragon.native.process import Process, ProcessError, ProcessTemplate, current


def ppid_of(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def write_puid(path):
    with open(path, "w") as f:
        f.write(str(current().puid))


def test_processes_are_started_by_the_agent_with_ids(tmp_path):
    agent = _native.segment_creator(_runtime.node_pool().name)[0]
    p = Process(target=time.sleep, args=(30,), ident="sleeper-a")
    p.start()
    try:
        assert ppid_of(p.pid) == agent and agent != os.getpid()
        # A handle by name or by p_uid sees the same process; names are unique.
        h = Process(None, ident="sleeper-a")
        assert (h.pid, h.puid, h.is_alive) == (p.pid, p.puid, True)
        with pytest.raises(ProcessError, match="already exists"):
            Process.from_template(ProcessTemplate(target=time.sleep, args=(1,)), ident="sleeper-a")
    finally:
        p.kill()
    assert p.join(30) == -signal.SIGKILL
    assert Process(None, ident=p.puid).returncode == -signal.SIGKILL
    # current() in a child is that child's handle: same p_uid as the parent's view.
    out = tmp_path / "puid"
    q = Process(target=write_puid, args=(str(out),))
    q.start()
    assert q.join(30) == 0
    assert int(out.read_text()) == q.puid != p.puid
    me = current()
    assert me.pid == os.getpid() and me.is_alive and me.puid == current().puid


def test_registry_and_ids():
    a = _runtime.agent()
    a.register("test", "k", b"v1")
    with pytest.raises(KeyError):
        a.register("test", "k", b"v2")
    a.register("test", "k", b"v2", replace=True)
    assert a.lookup("test", "k") == b"v2" and a.lookup("other", "k") is None
    assert a.unregister("test", "k") == b"v2" and a.lookup("test", "k") is None
    ids = [a.new_id("c_uid") for _ in range(3)]
    assert ids == sorted(set(ids)) and ids[0] > 1 << 32
    with pytest.raises(ValueError):
        a.new_id("x_uid")
    with pytest.raises(LookupError):
        a.status(12345)


SCRIPT = """
import os, sys, time
from dragon import _native, _runtime
from dragon.native.process import Process
p = Process(target=time.sleep, args=(300,))
p.start()
pool = _runtime.node_pool().name
agent = _native.segment_creator(pool)[0]
print(pool.split("-")[1], agent, p.pid, flush=True)
if sys.argv[1] == "hang":
    time.sleep(300)
"""


def run_script(tmp_path, mode):
    path = tmp_path / "s.py"
    path.write_text(textwrap.dedent(SCRIPT))
    env = {k: v for k, v in os.environ.items() if k != "DRAGON_RUNTIME"}
    return subprocess.Popen([sys.executable, str(path), mode], env=env, stdout=subprocess.PIPE, text=True)


def gone(pids, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(alive(p) for p in pids):
            return True
        time.sleep(0.02)
    return False


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("mode", ["exit", "hang"])
def test_embedded_runtime_ends_with_the_script(tmp_path, mode):
    s = run_script(tmp_path, mode)
    rt, agent, worker = s.stdout.readline().split()
    agent, worker = int(agent), int(worker)
    assert alive(agent) and alive(worker)
    if mode == "hang":
        s.kill()  # SIGKILL: the agent notices the script's end by its pidfd
    assert s.wait(30) in (0, -signal.SIGKILL)
    assert gone([agent, worker]), "the embedded runtime outlived its script"
    assert [n for n in os.listdir("/dev/shm") if n.startswith(f"dragon-{rt}-")] == []
    assert not os.path.exists(os.path.join(tempfile.gettempdir(), f"dragon-rs-{rt}")), "scratch dir left"


DEAD_AGENT = """
import os, signal, time
from dragon import _native, _runtime
from dragon.native.process import Process
pool = _runtime.node_pool().name
os.kill(_native.segment_creator(pool)[0], signal.SIGKILL)
t = time.monotonic()
try:
    Process(target=print).start()
except _runtime.RuntimeGone as e:
    print("RuntimeGone after %.1f s: %s" % (time.monotonic() - t, e))
"""


def test_a_dead_agent_is_a_clear_error_not_a_hang(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DRAGON_RUNTIME"}
    r = subprocess.run(
        [sys.executable, "-c", DEAD_AGENT], env=env, capture_output=True, text=True, timeout=60
    )
    assert "RuntimeGone after" in r.stdout, r.stderr
    assert float(r.stdout.split()[2]) < 5
    subprocess.run([os.path.join(os.path.dirname(sys.executable), "dragon-cleanup"), "--quiet"], check=True)


def test_reply_channels_of_dropped_clients_are_freed():
    """A client's reply channel is a block of the node pool that the agent attaches when it
    answers; a dropped client closes it and the agent lets it go at its next maintenance, so
    short-lived clients (waits for processes on other nodes) do not fill the pool."""
    pool = _runtime.node_pool()
    chan = _runtime.parse_env(os.environ["DRAGON_RUNTIME"])[2]
    _runtime.agent().ping()
    base = pool.usage()[0]
    clients = [_native.AgentClient(pool, chan) for _ in range(40)]
    for c in clients:
        c.ping()
    grown = pool.usage()[0] - base
    assert grown > 40 * 256, grown  # each holds a reply channel the agent attached
    del c, clients
    deadline = time.monotonic() + 10
    while pool.usage()[0] - base >= grown // 2:
        assert time.monotonic() < deadline, f"40 dropped clients still hold {pool.usage()[0] - base} bytes"
        time.sleep(0.05)
