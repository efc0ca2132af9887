"""dragon.native.process and process_group with real processes."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from dragon.infrastructure.policy import Policy
from dragon.native.process import Process, ProcessTemplate
from dragon.native.process_group import DragonUserCodeError, ProcessGroup


def write_to(path, text):
    with open(path, "w") as f:
        f.write(text)


def test_python_target_closure_and_exit_codes(tmp_path):
    out = tmp_path / "o"
    word = "closure"
    p = Process(target=lambda: write_to(out, word))  # a lambda closing over a local
    p.start()
    assert p.join() == 0 and p.returncode == 0 and p.puid > (1 << 32)
    # Handles by p_uid see the same process; puids are unique.
    same = Process(None, ident=p.puid)
    assert (same.pid, same.returncode, same.puid) == (p.pid, 0, p.puid)
    assert out.read_text() == "closure"
    p = Process(target=sys.exit, args=(7,))
    p.start()
    assert p.join(30) == 7
    p = Process(target=time.sleep, args=(30,))
    p.start()
    assert p.join(0.05) is None and p.is_alive
    p.kill()
    assert p.join(30) == -signal.SIGKILL and not p.is_alive


def test_executable_targets(tmp_path):
    p = Process(target="sh", args=("-c", "exit 5"))
    p.start()
    assert p.join(30) == 5
    with pytest.raises(FileNotFoundError):
        Process(target="no-such-program-dragon").start()
    script = tmp_path / "local.sh"
    script.write_text('#!/bin/sh\necho "$PWD"\n')
    script.chmod(0o755)
    p = Process(target="local.sh", cwd=str(tmp_path), stdout=Process.PIPE)
    p.start()
    assert p.stdout_conn.recv().strip() == str(tmp_path)
    with pytest.raises(EOFError):
        p.stdout_conn.recv()
    assert p.join(30) == 0


def test_policy_cpu_affinity_is_applied(tmp_path):
    allowed = sorted(os.sched_getaffinity(0))
    out = tmp_path / "cpus"
    p = Process(
        target=lambda: write_to(out, repr(sorted(os.sched_getaffinity(0)))),
        policy=Policy(cpu_affinity=[allowed[-1]]),
    )
    p.start()
    assert p.join(30) == 0
    assert out.read_text() == repr([allowed[-1]])
    # An affinity naming none of our CPUs leaves the mask alone (seed example on small nodes).
    p = Process(
        target=lambda: write_to(out, repr(sorted(os.sched_getaffinity(0)))),
        policy=Policy(cpu_affinity=[4096]),
    )
    p.start()
    assert p.join(30) == 0
    assert out.read_text() == repr(allowed)


def test_gpu_affinity_sets_the_vendor_mask(tmp_path, monkeypatch):
    monkeypatch.setenv("DRAGON_GPUS", "nvidia:8")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,5,7")
    out = tmp_path / "gpus"
    p = Process(
        target=lambda: write_to(out, os.environ.get("CUDA_VISIBLE_DEVICES", "unset")),
        policy=Policy(gpu_affinity=[1, 3]),
    )
    p.start()
    assert p.join(30) == 0
    assert out.read_text() == "3,7"  # remapped through the inherited mask
    monkeypatch.setenv("DRAGON_GPUS", "none")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    p = Process(
        target=lambda: write_to(out, os.environ.get("CUDA_VISIBLE_DEVICES", "unset")),
        policy=Policy(gpu_affinity=[0]),
    )
    p.start()
    assert p.join(30) == 0
    assert out.read_text() == "unset"


def hello(i, d):
    write_to(os.path.join(d, str(i)), "hi")


def boom():
    raise ValueError("boom from the worker")


def test_group_runs_joins_and_reports(tmp_path):
    pg = ProcessGroup()
    for i in range(3):
        pg.add_process(nproc=1, template=ProcessTemplate(target=hello, args=(i, str(tmp_path))))
    pg.init()
    pg.start()
    assert len(pg.puids) <= 3
    pg.join(60)
    assert pg.puids == [] and sorted(c for _, c in pg.exit_status) == [0, 0, 0]
    pg.close()
    assert sorted(os.listdir(tmp_path)) == ["0", "1", "2"]


def test_user_code_error_carries_the_traceback():
    pg = ProcessGroup()
    pg.add_process(nproc=2, template=ProcessTemplate(target=boom, stderr=ProcessTemplate.DEVNULL))
    pg.init()
    pg.start()
    with pytest.raises(DragonUserCodeError) as e:
        pg.join(60)
    assert "exit codes: [1, 1]" in str(e.value) and "boom from the worker" in str(e.value)
    pg.close()
    with ProcessGroup(ignore_error_on_exit=True) as pg:
        pg.add_process(nproc=1, template=ProcessTemplate(target=boom, stderr=ProcessTemplate.DEVNULL))
        pg.init()
        pg.start()
        pg.join(60)
        assert pg.exit_status[0][1] == 1


def test_join_timeout_then_stop_and_restart(tmp_path):
    pg = ProcessGroup()
    pg.add_process(nproc=2, template=ProcessTemplate(target=time.sleep, args=(60,)))
    pg.init()
    pg.start()
    with pytest.raises(TimeoutError):
        pg.join(0.2)
    pg.stop(patience=2)
    pg.join(10)  # signalled by the group: not a user error
    assert len(pg.exit_status) == 2
    pg.close()

    pg = ProcessGroup(restart=True)
    pg.add_process(nproc=2, template=ProcessTemplate(target=time.sleep, args=(0.05,)))
    pg.init()
    pg.start()
    deadline = time.monotonic() + 30
    while len(pg.inactive_puids) < 6:
        assert time.monotonic() < deadline, "workers were not restarted"
        time.sleep(0.01)
    assert len(pg.puids) <= 2  # never more than the group's size
    pg.stop(patience=2)
    pg.join(10)
    pg.close()
    assert pg.puids == []


def test_walltime_stops_the_group():
    pg = ProcessGroup(walltime=0.5)
    pg.add_process(nproc=1, template=ProcessTemplate(target=time.sleep, args=(60,)))
    pg.init()
    pg.start()
    t0 = time.monotonic()
    pg.join(30)
    assert time.monotonic() - t0 < 20
    pg.close()


SEED = """
import os
import dragon
from dragon.infrastructure.policy import Policy
from dragon.native.machine import System, Node
from dragon.native.process_group import ProcessGroup
from dragon.native.process import ProcessTemplate

gpu_affinities = [[3],[2],[1],[0]]
cpu_affinities = [list(range(c, c+8)) for c in range(0, 32, 8)]
num_gpus_per_node = 4

def hello_world(message):
    return f"Hello {message}"

if __name__ == '__main__':
    alloc = System()
    nodelist = alloc.nodes
    polaris_policies_for_gpus = []
    for node in nodelist:
        node_name = Node(node).hostname
        for i in range(num_gpus_per_node):
            pol = Policy(host_name=node_name,
                         cpu_affinity=cpu_affinities[i],
                         gpu_affinity=gpu_affinities[i],
                         placement=Policy.Placement.HOST_NAME,)
            polaris_policies_for_gpus.append(pol)
    pg = ProcessGroup()
    for pol in polaris_policies_for_gpus:
        pg.add_process(nproc=1,
                       template=ProcessTemplate(target=hello_world,
                                                args=('hello',),
                                                cwd=os.getcwd(),
                                                policy=pol,))
    pg.init()
    pg.start()
    pg.join()
    pg.close()
    print("seed ok", len(pg.exit_status))
"""


def test_seed_process_group_example_runs(tmp_path):
    script = tmp_path / "seed_pg.py"
    script.write_text(textwrap.dedent(SEED))
    r = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    from dragon.native.machine import System

    assert r.stdout.strip() == f"seed ok {4 * System().nnodes}"  # 4 per node (12 on 3 nodes)


def test_popen_interface(tmp_path):
    import subprocess as sp

    from dragon.native.process import Popen

    p = Popen(["cat"], stdin=Popen.PIPE, stdout=Popen.PIPE)
    out, err = p.communicate(b"round trip\n", timeout=30)
    assert (out, err, p.returncode) == (b"round trip\n", None, 0)
    p = Popen("echo $((6*7)); echo oops >&2; exit 3", shell=True, stdout=Popen.PIPE, stderr=Popen.STDOUT)
    out, _ = p.communicate(timeout=30)
    assert out.split() == [b"42", b"oops"] and p.wait() == 3
    p = Popen(["sleep", "30"])
    with pytest.raises(sp.TimeoutExpired):
        p.wait(0.05)
    p.kill()
    assert p.wait(30) == -signal.SIGKILL
    with pytest.raises(FileNotFoundError):
        Popen(["no-such-program-dragon"])
    with pytest.raises(ValueError):
        Popen(["true"], preexec_fn=lambda: None)
