"""The "dragon" start method's zygote (dragon._zygote): children forked from a prepared
interpreter must be what spawn children are (the requester's environment, streams,
descriptors and affinity; its exit codes), and the method must keep working when the
zygote is gone or turned off."""

import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import textwrap
from multiprocessing import util

import dragon  # noqa: F401  (registers the start method)
import pytest
from dragon import _zygote

SCRIPT = textwrap.dedent(
    """
    import os, sys, time, signal
    import multiprocessing as mp
    import dragon

    def child(tag, conn):
        print("out", tag, os.environ.get("ZYGOTE_TEST"), os.getcwd())  # no flush: exit does
        print("err", tag, file=sys.stderr)
        conn.send((os.getpid(), sorted(os.sched_getaffinity(0))))
        sys.exit(7)

    def sleeper():
        time.sleep(60)

    def zygote_pids():
        # this runtime's zygotes
        mine = ("DRAGON_RUNTIME=" + os.environ["DRAGON_RUNTIME"]).encode()
        out = []
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/cmdline", "rb") as f:
                        if b"dragon._zygote" not in f.read():
                            continue
                    with open(f"/proc/{d}/environ", "rb") as f:
                        if mine in f.read().split(b"\\0"):
                            out.append(int(d))
                except OSError:
                    pass
        return out

    if __name__ == "__main__":
        ctx = mp.get_context("dragon")
        for i, cwd in enumerate((os.getcwd(), "/")):
            os.chdir(cwd)
            os.environ["ZYGOTE_TEST"] = f"env{i}"  # set after the zygote started (i = 1)
            r, w = ctx.Pipe(duplex=False)
            p = ctx.Process(target=child, args=(i, w))
            p.start()
            pid, cpus = r.recv()
            p.join(60)
            assert (pid, p.exitcode) == (p.pid, 7), (pid, p.pid, p.exitcode)
            assert cpus == sorted(os.sched_getaffinity(0)), cpus
        p = ctx.Process(target=sleeper)
        p.start()
        p.terminate()
        p.join(60)
        assert p.exitcode == -signal.SIGTERM, p.exitcode
        zs = zygote_pids()
        print("zygotes", len(zs))
        if sys.argv[1] == "kill-zygote":
            p = ctx.Process(target=sleeper)
            p.start()
            for z in zs:
                os.kill(z, signal.SIGKILL)
            p.terminate()  # its exit code is lost with the zygote: join must still return
            p.join(60)
            assert p.exitcode is not None
            r, w = ctx.Pipe(duplex=False)
            p = ctx.Process(target=child, args=(2, w))  # a new zygote serves
            p.start()
            assert r.recv()[0] == p.pid
            p.join(60)
            assert p.exitcode == 7, p.exitcode
        print("done")
    """
)


def run(tmp_path, arg, **env):
    path = tmp_path / "z.py"
    path.write_text(SCRIPT)
    e = {k: v for k, v in os.environ.items() if k != "DRAGON_RUNTIME"}  # a runtime of its own
    e.update(env)
    r = subprocess.run(
        [sys.executable, str(path), arg],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=e,
    )
    assert r.returncode == 0, r.stderr
    return r


def test_children_are_the_requesters(tmp_path):
    r = run(tmp_path, "plain")
    lines = r.stdout.splitlines()
    assert f"out 0 env0 {tmp_path}" in lines
    assert "out 1 env1 /" in lines
    assert "zygotes 1" in lines
    assert lines[-1] == "done"
    assert "err 0" in r.stderr.splitlines() and "err 1" in r.stderr.splitlines()


def test_a_killed_zygote_is_replaced(tmp_path):
    r = run(tmp_path, "kill-zygote")
    assert "out 2 env1 /" in r.stdout.splitlines()
    assert r.stdout.splitlines()[-1] == "done"


def test_without_zygote(tmp_path):
    r = run(tmp_path, "plain", DRAGON_MP_ZYGOTE="0")
    assert "zygotes 0" in r.stdout.splitlines()
    assert "out 1 env1 /" in r.stdout.splitlines()


def test_zygote_refuses_requests_it_cannot_read(tmp_path):
    """Garbage on the zygote's socket loses that connection only."""
    ctx = mp.get_context("dragon")
    p = ctx.Process(target=os.getpid)
    p.start()  # makes sure this runtime's zygote runs
    p.join(60)
    path = _zygote.socket_path([sys.executable, *util._args_from_interpreter_flags()])
    for junk in (b"\xff\xff\xff\xff", b"\x05\x00\x00\x00hello", b""):
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        s.sendall(junk)
        s.shutdown(socket.SHUT_WR)
        assert s.recv(16) == b""  # dropped, nothing forked
        s.close()
    p = ctx.Process(target=os.getpid)  # still serves
    p.start()
    p.join(60)
    assert p.exitcode == 0


def send_parent_pid(conn):
    conn.send(os.getppid())


def test_a_stopped_zygote_is_an_error_not_a_hang(monkeypatch):
    ctx = mp.get_context("dragon")
    r, w = ctx.Pipe(duplex=False)
    p = ctx.Process(target=send_parent_pid, args=(w,))
    p.start()
    zygote = r.recv()  # the zygote that serves this process is its children's parent
    p.join(60)
    assert zygote != os.getpid()
    with open(f"/proc/{zygote}/cmdline", "rb") as f:
        assert b"dragon._zygote" in f.read()
    monkeypatch.setattr(_zygote, "ANSWER_TIMEOUT", 1.0)
    os.kill(zygote, signal.SIGSTOP)
    try:
        p = ctx.Process(target=os.getpid)
        with pytest.raises(OSError, match="dragon zygote did not"):
            p.start()
    finally:
        os.kill(zygote, signal.SIGCONT)
    p = ctx.Process(target=os.getpid)  # it serves again
    p.start()
    p.join(60)
    assert p.exitcode == 0
