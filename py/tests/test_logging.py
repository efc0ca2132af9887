"""Logging: ``dragon -l`` sends the launcher's, the agent's (Rust) and the processes'
records to the runtime's per-node file; nothing extra reaches stderr by default."""

import os
import subprocess
import sys
import textwrap

import pytest
from dragon import _log

DRAGON = os.path.join(os.path.dirname(sys.executable), "dragon")

DRIVER = """
import os, sys
from dragon import _log
from dragon.native.process import Process

def child():
    _log.warning("dragon.test", "warning from child pid %d", os.getpid())

if __name__ == "__main__":
    p = Process(target=child)
    p.start()
    p.join()
    print("driver done", p.pid, flush=True)
    sys.exit(int(sys.argv[1]))
"""


def run(tmp_path, *args, code=0):
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(DRIVER))
    env = dict(os.environ, DRAGON_LOG_DIR=str(tmp_path / "logs"))
    env.pop("DRAGON_LOG_LEVEL", None)
    env.pop("DRAGON_RUNTIME", None)
    r = subprocess.run(
        [DRAGON, *args, str(script), str(code)], env=env, capture_output=True, text=True, timeout=120
    )
    return r


def log_files(tmp_path):
    base = tmp_path / "logs"
    if not base.exists():
        return {}
    out = {}
    for rt in base.iterdir():
        for f in rt.iterdir():
            out[f"{rt.name}/{f.name}"] = f.read_text()
    return out


def test_debug_level_logs_launcher_agent_and_children_to_the_node_file(tmp_path):
    r = run(tmp_path, "-l", "DEBUG")
    assert r.returncode == 0, r.stderr
    child_pid = int(r.stdout.split()[-1])
    files = log_files(tmp_path)
    assert len(files) == 1 and next(iter(files)).endswith("/node-0.log"), files
    text = next(iter(files.values()))
    lines = text.splitlines()
    # The launcher (Python), the agent (Rust, through the native sink) and the child (Python,
    # another process) all wrote to the one file, in one format.
    assert any(" INFO node=0 " in ln and " dragon.launcher: " in ln and "driver" in ln for ln in lines), text
    agent = " dragon.rs.dragon_runtime.agent"
    assert any(" DEBUG node=0 " in ln and agent in ln and ": launched p_uid" in ln for ln in lines), text
    assert any(f"pid={child_pid} dragon.test: warning from child pid {child_pid}" in ln for ln in lines), text
    # Nothing extra on stderr without stderr=LEVEL.
    assert r.stderr == ""


def test_default_level_writes_warnings_only_and_names_the_logs_on_failure(tmp_path):
    r = run(tmp_path, code=0)
    assert r.returncode == 0 and r.stderr == ""
    (text,) = log_files(tmp_path).values()
    assert "warning from child" in text and " INFO " not in text and " DEBUG " not in text
    r = run(tmp_path, code=5)
    assert r.returncode == 5
    assert "dragon: runtime logs in " + str(tmp_path / "logs") in r.stderr


def test_level_none_writes_nothing_and_a_clean_failure_names_no_logs(tmp_path):
    r = run(tmp_path, "-l", "NONE", code=4)
    assert r.returncode == 4
    assert log_files(tmp_path) == {}
    assert "runtime logs" not in r.stderr


def test_stderr_device_gets_records_in_the_same_format(tmp_path):
    r = run(tmp_path, "-l", "stderr=INFO", "-l", "dragon_file=ERROR")
    assert r.returncode == 0
    assert " INFO node=0 " in r.stderr and "dragon.launcher: " in r.stderr
    # The file device got only ERROR and above: the child's warning is not there.
    assert all("warning from child" not in t for t in log_files(tmp_path).values())


@pytest.mark.parametrize("bad", ["LOUD", "console=DEBUG", "stderr="])
def test_bad_log_level_is_a_usage_error(tmp_path, bad):
    r = run(tmp_path, "-l", bad)
    assert r.returncode == 2
    assert r.stderr.startswith("dragon: bad log ")
    assert "Traceback" not in r.stderr


def test_parse_levels_dragonhpc_forms():
    assert _log.parse_levels([]) == (30, _log.NONE)
    assert _log.parse_levels(["DEBUG"]) == (10, _log.NONE)
    assert _log.parse_levels(["dragon_file=INFO", "actor_file=DEBUG"]) == (10, _log.NONE)
    assert _log.parse_levels(["stderr=warning,dragon_file=ERROR"]) == (40, 30)
    with pytest.raises(ValueError, match="bad log level"):
        _log.parse_levels(["VERBOSE"])
