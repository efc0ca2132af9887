"""The ``dragon`` launcher and ``dragon-cleanup`` as real commands."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

BIN = os.path.dirname(sys.executable)
DRAGON = os.path.join(BIN, "dragon")
CLEANUP = os.path.join(BIN, "dragon-cleanup")

DRIVER = """
import os, sys, time
from dragon.native.process_group import ProcessGroup
from dragon.native.process import Process, ProcessTemplate

if __name__ == "__main__":
    pg = ProcessGroup()
    pg.add_process(nproc=2, template=ProcessTemplate(target=time.sleep, args=(300,)))
    pg.init()
    pg.start()
    rt = os.environ["DRAGON_RUNTIME"].split(":")[1]
    workers = " ".join(str(Process(None, ident=p).pid) for p in pg.puids)
    try:  # "ready" inside the try: the test's signal may come right after it
        print("ready", rt, workers, flush=True)
        time.sleep(300)
    except KeyboardInterrupt:
        print("driver got KeyboardInterrupt", flush=True)
        raise
"""


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids, timeout=15):
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids):
        assert time.monotonic() < deadline, f"still alive: {[p for p in pids if alive(p)]}"
        time.sleep(0.02)


def segments(rt):
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"dragon-{rt}-")]


@pytest.fixture
def driver(tmp_path):
    path = tmp_path / "driver.py"
    path.write_text(textwrap.dedent(DRIVER))
    return str(path)


def start(driver):
    p = subprocess.Popen([DRAGON, driver], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    words = p.stdout.readline().split()
    assert words[0] == "ready", words
    rt, workers = words[1], [int(w) for w in words[2:]]
    assert len(workers) == 2 and segments(rt), "runtime pool missing"
    return p, rt, workers


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 128 + 15), (signal.SIGINT, 128 + 2)])
def test_signal_tears_the_runtime_down(driver, sig, code):
    p, rt, workers = start(driver)
    p.send_signal(sig)
    assert p.wait(30) == code
    rest = p.stdout.read()
    if sig == signal.SIGINT:
        assert "KeyboardInterrupt" in rest
    wait_gone(workers + [p.pid])
    assert segments(rt) == []


def test_cleanup_after_the_launcher_is_killed(driver):
    p, rt, workers = start(driver)
    p.kill()
    p.wait(30)
    assert all(alive(w) for w in workers), "workers should outlive a SIGKILLed launcher"
    foreign = f"/dev/shm/dragon-notours-{os.getpid()}"
    with open(foreign, "w") as f:
        f.write("x")
    try:
        r = subprocess.run([CLEANUP], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        wait_gone(workers)
        assert segments(rt) == []
        assert os.path.exists(foreign), "cleanup touched a file that is not ours"
    finally:
        os.unlink(foreign)
        # The driver process itself was reparented away from us: make sure it is gone too.
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_exit_code_stdin_and_bad_usage(tmp_path):
    script = tmp_path / "d.py"
    script.write_text("import sys\nprint(sys.stdin.readline().strip()[::-1])\nsys.exit(5)\n")
    r = subprocess.run([DRAGON, str(script)], input="abc\n", capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout.strip()) == (5, "cba")
    r = subprocess.run(
        [sys.executable, "-m", "dragon", str(script)],
        input="xy\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (r.returncode, r.stdout.strip()) == (5, "yx")
    r = subprocess.run([DRAGON, "--no-such-flag", str(script)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unrecognized arguments" in r.stderr
    r = subprocess.run([DRAGON, str(tmp_path / "missing.py")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no such program" in r.stderr
    r = subprocess.run([DRAGON, "sh", "-c", "exit 9"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 9  # a non-Python executable runs directly
    r = subprocess.run([DRAGON, "-l", "LOUD", str(script)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "bad log level" in r.stderr


def test_dragon_shm_console_script_sees_the_runtime_pool():
    import json

    from dragon import _native

    rt = _native.random_runtime()
    pool = _native.Pool.create(_native.segment_name(rt, 0, "pool", 1), 1 << 20)
    r = subprocess.run(
        [os.path.join(BIN, "dragon-shm"), "ls", "--json", "--runtime", f"{rt:016x}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    segs = json.loads(r.stdout)["segments"]
    assert [s["name"] for s in segs] == [pool.name] and segs[0]["alive"] is True
    r = subprocess.run([os.path.join(BIN, "dragon-shm"), "show", "/bogus"], capture_output=True, text=True)
    assert r.returncode == 2 and "not a Dragon-RS segment name" in r.stderr
    del pool


ORPHANS = """
import os, subprocess, time
subprocess.run(["sh", "-c", "sleep 0.2 & exit 0"], check=True)  # the sleep is orphaned
launcher = os.getppid()


def zombies():
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                rest = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if rest[0] == "Z" and int(rest[1]) == launcher:
                out.append(int(d))
    return out


deadline = time.monotonic() + 20
while True:
    time.sleep(0.3)  # let the orphan end and the launcher notice
    if not zombies():
        break
    assert time.monotonic() < deadline, f"launcher left zombies: {zombies()}"
print("no zombies")
"""


def test_launcher_reaps_orphans(tmp_path):
    script = tmp_path / "orphans.py"
    script.write_text(textwrap.dedent(ORPHANS))
    r = subprocess.run([DRAGON, str(script)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "no zombies"


def test_dragon_config_console_script(tmp_path):
    """dragon-config writes, shows and removes the transport configuration file (JSON)."""
    import json

    cfg = tmp_path / "dragon-config.json"
    env = dict(os.environ, DRAGON_CONFIG=str(cfg))
    env.pop("DRAGON_OFI_RUNTIME_LIB", None)
    env.pop("DRAGON_OFI_PROVIDER", None)
    exe = os.path.join(BIN, "dragon-config")

    def run(*args, **kw):
        return subprocess.run(
            [exe, *args], capture_output=True, text=True, env=kw.get("env", env), timeout=30
        )

    r = run("add", "--ofi-runtime-lib=/opt/fabric/lib")
    assert r.returncode == 0, r.stderr
    assert json.loads(cfg.read_text())["ofi_runtime_lib"] == "/opt/fabric/lib"
    r = run("show")
    assert r.returncode == 0 and "/opt/fabric/lib" in r.stdout
    # The environment variable wins over the file.
    r = run("show", env=dict(env, DRAGON_OFI_PROVIDER="shm"))
    assert r.returncode == 0 and "shm" in r.stdout
    r = run("add", "--bogus=1")
    assert r.returncode == 2 and "dragon-config" in r.stderr
    r = run("clean")
    assert r.returncode == 0 and not cfg.exists()


def test_cleanup_usage_errors():
    """dragon-cleanup's node options are checked as dragon's are: outside an allocation,
    -w slurm is a usage error, not a hang or a silent local-only cleanup."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PBS_"))}
    r = subprocess.run([CLEANUP, "-w", "slurm"], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2 and "not inside a Slurm allocation" in r.stderr, r.stderr
    r = subprocess.run([CLEANUP, "--bogus"], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2 and "unrecognized arguments: --bogus" in r.stderr
    r = subprocess.run([CLEANUP, "--this-node"], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0 and r.stdout.startswith("dragon-cleanup: "), r.stdout
