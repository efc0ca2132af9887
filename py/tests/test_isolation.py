"""Isolation between users and between runtimes (issue 18, item 4), with real processes of
another user (``runuser -u nobody``, the system's python3 for the probes).

A runtime's segments and scratch directory are owner-only, so another user can neither map
its memory nor reach its zygote; its object servers and transport refuse a peer that has
not proved the runtime's secret (and keep serving the runtime); ``dragon-cleanup`` run by
root never touches another user's segments or processes; two runtimes of one user side by
side stay independent, a cleanup between them included.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

DRAGON = os.path.join(os.path.dirname(sys.executable), "dragon")
CLEANUP = os.path.join(os.path.dirname(sys.executable), "dragon-cleanup")

DRIVER = """
import json, os, sys
from dragon import _runtime
from dragon.native import machine
from dragon.native.process import Process
from dragon.native.queue import Queue
from dragon.infrastructure.policy import Policy

def echo(q, r):
    r.put(q.get(timeout=60) * 2)

if __name__ == "__main__":
    rt = os.environ["DRAGON_RUNTIME"].split(":")[1]
    q, r = Queue(), Queue()
    scratch = _runtime.scratch_dir()
    from dragon import _zygote
    zsock = _zygote.socket_path([sys.executable])
    segs = sorted(n for n in os.listdir("/dev/shm") if n.startswith(f"dragon-{rt}-"))
    table = machine.node_table()
    info = {"rt": rt, "scratch": scratch, "zygote": zsock, "segments": segs,
            "objects": [n["objects"] for n in table], "transport": [n["transport"] for n in table]}
    print(json.dumps(info), flush=True)
    assert sys.stdin.readline().strip() == "go"
    # still whole after the probes: a process on the last node echoes through both queues
    far = Policy(placement=Policy.Placement.HOST_ID, host_id=len(table) or 1)
    p = Process(target=echo, args=(q, r), policy=far)
    p.start()
    q.put(21)
    print("echo", r.get(timeout=60), flush=True)
    p.join(60)
    print("exit", p.returncode, flush=True)
"""

PROBE = r"""
import json, os, socket, sys
info = json.loads(sys.argv[1])
out = {}
def attempt(name, fn):
    try:
        fn()
        out[name] = "allowed"
    except PermissionError:
        out[name] = "denied"
    except OSError as e:
        out[name] = f"error {e.errno}"
for s in info["segments"]:
    attempt("open " + s, lambda s=s: os.close(os.open("/dev/shm/" + s, os.O_RDONLY)))
attempt("list scratch", lambda: os.listdir(info["scratch"]))
def zygote():
    c = socket.socket(socket.AF_UNIX)
    c.connect(info["zygote"])
attempt("zygote", zygote)
def talk(addr, payload):
    host, port = addr.split(":")[:2]
    c = socket.create_connection((host, int(port)), timeout=20)
    c.sendall(payload)
    c.shutdown(socket.SHUT_WR)
    got = b""
    try:
        while True:
            d = c.recv(65536)
            if not d:
                break
            got += d
    except OSError:
        pass
    return got
for i, a in enumerate(info["objects"]):
    # a forged ticket, then an operation: the server must close without an answer
    out[f"objects {i}"] = len(talk(a, os.urandom(16) + b"\0" * 64))
for i, a in enumerate(info["transport"]):
    out[f"transport {i} answered"] = len(talk(a, b"DRGN" + os.urandom(60)))
print(json.dumps(out))
"""


def need_runuser():
    if os.geteuid() != 0 or not shutil.which("runuser") or not os.path.exists("/usr/bin/python3"):
        pytest.fail("these tests run as root with runuser and /usr/bin/python3 (the CI machine has them)")


def start(tmp_path, nodes):
    (tmp_path / "driver.py").write_text(textwrap.dedent(DRIVER))
    e = dict(os.environ)
    e.pop("DRAGON_RUNTIME", None)
    flags = ["--local-nodes", str(nodes)] if nodes > 1 else []
    p = subprocess.Popen(
        [DRAGON, *flags, str(tmp_path / "driver.py")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e, cwd=tmp_path,
    )  # fmt: skip
    line = p.stdout.readline()
    if not line:
        p.wait(60)
        pytest.fail("driver did not start: " + p.stderr.read())
    return p, json.loads(line)


def finish(p):
    out, err = p.communicate("go\n", timeout=120)
    assert p.returncode == 0, out + err
    assert "echo 42" in out and "exit 0" in out, out + err


def as_nobody(code, *args):
    r = subprocess.run(
        ["runuser", "-u", "nobody", "--", "/usr/bin/python3", "-c", code, *args],
        capture_output=True, text=True, timeout=120, cwd="/",
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_another_user_cannot_reach_a_runtime(tmp_path):
    need_runuser()
    p, info = start(tmp_path, 2)
    try:
        assert info["segments"] and len(info["objects"]) == 2
        st = os.stat(info["scratch"])
        assert st.st_mode & 0o777 == 0o700
        for s in info["segments"]:
            assert os.stat("/dev/shm/" + s).st_mode & 0o777 == 0o600, s
        got = json.loads(as_nobody(PROBE, json.dumps(info)))
        for s in info["segments"]:
            assert got["open " + s] == "denied", got
        assert got["list scratch"] == "denied", got
        assert got["zygote"] in ("denied", "error 2"), got  # the directory hides it either way
        assert got["objects 0"] == 0 and got["objects 1"] == 0, got
        assert got["transport 0 answered"] == 0 and got["transport 1 answered"] == 0, got
    finally:
        finish(p)


def test_cleanup_never_touches_another_users_segments_or_processes(tmp_path):
    """A stale-looking segment and a process of user nobody, both named after a runtime
    that is not running: root's dragon-cleanup leaves both alone."""
    need_runuser()
    fake = "dragon-00000000deadbeef-0-pool-1"
    path = "/dev/shm/" + fake
    make = f"open({path!r}, 'wb').write(bytes(4096))"
    try:
        as_nobody(make)
        assert os.stat(path).st_uid != os.getuid()
        sleeper = subprocess.Popen(
            ["runuser", "-u", "nobody", "--", "/usr/bin/python3", "-c", "import sys; sys.stdin.read()"],
            stdin=subprocess.PIPE, env=dict(os.environ, DRAGON_RUNTIME="1:00000000deadbeef:0:1.1.1.1"),
        )  # fmt: skip
        try:
            r = subprocess.run([CLEANUP, "--this-node"], capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stdout + r.stderr
            assert os.path.exists(path), "root's cleanup removed another user's segment"
            assert sleeper.poll() is None, "root's cleanup killed another user's process"
        finally:
            sleeper.communicate(b"", timeout=60)
    finally:
        if os.path.exists(path):
            os.unlink(path)


def test_two_runtimes_of_one_user_stay_independent(tmp_path):
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir()
    b_dir.mkdir()
    a, ia = start(a_dir, 1)
    try:
        b, ib = start(b_dir, 2)
        try:
            assert ia["rt"] != ib["rt"] and not set(ia["segments"]) & set(ib["segments"])
            assert ia["scratch"] != ib["scratch"]
            r = subprocess.run([CLEANUP, "--this-node"], capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stdout + r.stderr
            for info in (ia, ib):  # a cleanup between two live runtimes removes nothing of theirs
                for s in info["segments"]:
                    assert os.path.exists("/dev/shm/" + s), s
        finally:
            finish(b)
    finally:
        finish(a)
