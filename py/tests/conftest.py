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


# ----- leftovers of runtimes started by a test (segments, scratch directories) -----------------

LEFTOVER_DIRS = ("/dev/shm", "/tmp")
LEFTOVER_PREFIXES = ("dragon-", "vader_segment", "ompi.")


def snapshot() -> set:
    """Paths that may be left behind by a runtime, as they are now (see ``leftovers``)."""
    out = set()
    for d in LEFTOVER_DIRS:
        out |= {os.path.join(d, n) for n in os.listdir(d) if n.startswith(LEFTOVER_PREFIXES)}
    return out


def _runtime_of(name: str) -> str | None:
    """The runtime id a segment (``dragon-<rt>-...``) or scratch directory
    (``dragon-rs-<rt>``) belongs to."""
    parts = name.split("-")
    if len(parts) >= 3 and parts[0] == "dragon" and len(parts[1]) == 16:
        return parts[1]
    if len(parts) == 3 and parts[:2] == ["dragon", "rs"] and len(parts[2]) == 16:
        return parts[2]
    return None


def _live_runtimes() -> set:
    """Runtimes whose node pool's creator (a node agent) still runs."""
    from dragon import _native

    live = set()
    for n in os.listdir("/dev/shm"):
        rt = _runtime_of(n)
        if rt and n.endswith("-pool-1"):
            try:
                if _native.segment_creator(n)[1]:
                    live.add(rt)
            except (OSError, ValueError):
                pass
    return live


def leftovers(before: set) -> list:
    """What appeared since ``snapshot()`` and belongs to no live runtime: the leftovers of
    the runtimes a test started and ended. Runtimes of other test runs sharing the machine
    (still running) are not counted; anything not tied to a runtime always is (the log
    directory, ``dragon-rs-logs-<uid>``, is meant to stay)."""
    from dragon import _native

    live = _live_runtimes()
    out = []
    for p in sorted(snapshot() - before):
        name = os.path.basename(p)
        rt = _runtime_of(name)
        if name.startswith("dragon-rs-logs-") or (rt is not None and rt in live):
            continue
        if p.startswith("/dev/shm/dragon-"):
            try:
                if _native.segment_creator(name)[1]:
                    continue  # its maker (another run's process) still runs
            except (OSError, ValueError):
                pass
        out.append(p)
    return out
