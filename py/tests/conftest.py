"""Shared checks: no test leaves a process of the runtime behind.

Managed processes are children of the node agent (in these tests, the embedded runtime's
agent process, a child of pytest that lives for the session) or of the "dragon" start
method's zygote (a child of the agent), so "left behind" means: a child of the agent, the
zygote or pytest (the agent and the zygote aside) that was not there before.
"""

import os
import time

import pytest


def children_of(pid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(d))
    return out


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def is_mp_helper(pid):
    """Long-lived helpers: multiprocessing's (resource tracker, forkserver) and the "dragon"
    start method's zygote (whose children do count)."""
    cmd = cmdline(pid)
    return b"resource_tracker" in cmd or b"forkserver" in cmd or b"dragon._zygote" in cmd


def agent_pid():
    """Pid of this process's embedded runtime agent, or None before the runtime started."""
    from dragon import _runtime

    return _runtime._embedded_agent


def runtime_processes():
    """Processes of this test run: children of pytest and of its runtime's agent."""
    a = agent_pid()
    procs = set(children_of(os.getpid())) - {a}
    if a is not None:
        procs |= set(children_of(a))
    for z in [p for p in procs if b"dragon._zygote" in cmdline(p)]:
        procs |= set(children_of(z))
    return {p for p in procs if not is_mp_helper(p)}


@pytest.fixture(autouse=True)
def no_processes_left():
    before = runtime_processes()
    yield
    deadline = time.monotonic() + 5
    while runtime_processes() - before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert runtime_processes() - before == set(), "processes left behind"
