"""The launcher's side of a multi-node runtime: starting the member node agents, waiting
for them, carrying their output, and ending them.

``dragon --local-nodes N`` starts N-1 member agents (``python -m dragon._nodeagent``) on
this host, each a node of its own (own index, own pool and names, own transport endpoint;
they talk to each other only through the transport, as nodes on separate hosts do). Each
reports its endpoint on its stdout; the launcher (the primary agent, node 0) then dials
them all (``Agent.start_primary``). Afterwards a member's stdout and stderr carry what the
processes it started print: the launcher copies them to its own, labelled with the node.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import sys
import threading
import time

from dragon import _native

READY = "dragon-node-ready"


class BringUpError(RuntimeError):
    """A node did not come up; the message names it."""


class Member:
    """One member agent process and the read ends of its output pipes."""

    def __init__(self, node: int, name: str, pid: int, out_r: int, err_r: int):
        self.node, self.name, self.pid = node, name, pid
        self.out_r, self.err_r = out_r, err_r
        self.pidfd = _native.pidfd_open(pid)
        self.early = b""  # output after the ready line, read with it
        self.address: str | None = None


def node_dict(name: str, ip: str) -> dict:
    """This node's entry for the runtime's node table (the agent adds index, endpoint, pid)."""
    from dragon.native.machine import topology

    topo = topology()
    cpus = topo["cpus"] or sorted(os.sched_getaffinity(0))
    mem = topo["physical_mem"] or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "name": name,
        "hostname": socket.gethostname(),
        "ip": ip,
        "num_cpus": len(cpus),
        "physical_mem": mem,
    }


def local_node_name(node: int) -> str:
    """The name of local node ``node``: ``<host>-n<node>``."""
    return f"{socket.gethostname()}-n{node}"


def start_local_members(rt: int, n: int, secret: str, transport: str, timeout: float) -> list[Member]:
    """Starts the member agents of nodes 1..n-1 on this host."""
    members = []
    base = dict(os.environ)
    base.pop("DRAGON_RUNTIME", None)
    for k in range(1, n):
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        env = dict(
            base,
            DRAGON_NODE_RT=f"{rt:016x}",
            DRAGON_NODE_INDEX=str(k),
            DRAGON_NODE_SECRET=secret,
            DRAGON_NODE_NAME=local_node_name(k),
            DRAGON_NODE_IP="127.0.0.1",
            DRAGON_TRANSPORT=transport,
            DRAGON_NODE_TIMEOUT=str(timeout),
        )
        try:
            pid = _native.spawn(
                [sys.executable, "-m", "dragon._nodeagent"],
                env=list(env.items()),
                stdin=-3,
                stdout=out_w,
                stderr=err_w,
                new_group=True,
                die_with_parent=True,
            )
        finally:
            os.close(out_w)
            os.close(err_w)
        members.append(Member(k, local_node_name(k), pid, out_r, err_r))
    return members


def _drain(fd: int) -> bytes:
    """What can be read from ``fd`` without waiting (at most 64 KiB)."""
    out = b""
    while select.select([fd], [], [], 0)[0]:
        chunk = os.read(fd, 65536)
        if not chunk or len(out) > 65536:
            break
        out += chunk
    return out


def wait_ready(members: list[Member], timeout: float) -> list[tuple[int, str]]:
    """Reads each member's ready line; returns ``[(node, endpoint address)]``. Raises
    BringUpError naming every node that died or did not report within ``timeout``."""
    deadline = time.monotonic() + timeout
    bufs = {m.out_r: b"" for m in members}
    by_fd = {m.out_r: m for m in members}
    waiting = set(bufs)
    failed: list[str] = []
    while waiting:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ready, _, _ = select.select(list(waiting), [], [], left)
        for fd in ready:
            m = by_fd[fd]
            chunk = os.read(fd, 65536)
            if not chunk:
                err = _drain(m.err_r).decode(errors="replace").strip()
                why = f": {err}" if err else ""
                failed.append(f"node {m.node} ({m.name}) exited during bring-up{why}")
                waiting.discard(fd)
                continue
            bufs[fd] += chunk
            if b"\n" in bufs[fd]:
                line, rest = bufs[fd].split(b"\n", 1)
                parts = line.decode(errors="replace").split()
                if len(parts) == 3 and parts[0] == READY and parts[1] == str(m.node):
                    m.address, m.early = parts[2], rest
                else:
                    failed.append(f"node {m.node} ({m.name}) reported {line[:200]!r}")
                waiting.discard(fd)
    for fd in waiting:
        m = by_fd[fd]
        failed.append(f"node {m.node} ({m.name}) did not come up within {timeout:g} s")
    if failed:
        raise BringUpError("; ".join(failed))
    return [(m.node, m.address) for m in members]


def pump_output(members: list[Member], basic: bool, verbose: bool) -> list[threading.Thread]:
    """Copies each member's stdout/stderr to ours, line by line, labelled with the node when
    asked; returns the threads (they end at the pipes' EOF)."""
    host = socket.gethostname()

    def pump(fd: int, stream: str, sink, m: Member, early: bytes) -> None:
        if verbose:
            tag = f"[{stream}: node={m.name}, host={host}] ".encode()
        elif basic:
            tag = f"[{stream}: {m.name}] ".encode()
        else:
            tag = b""
        with os.fdopen(fd, "rb") as f:
            lines = early.splitlines(keepends=True)
            if lines and not lines[-1].endswith(b"\n"):
                lines[-1] += f.readline()
            for line in [*lines, *f]:
                sink.write(tag + line)
                sink.flush()

    threads = []
    for m in members:
        for fd, name, sink, early in (
            (m.out_r, "stdout", sys.stdout.buffer, m.early),
            (m.err_r, "stderr", sys.stderr.buffer, b""),
        ):
            t = threading.Thread(target=pump, args=(fd, name, sink, m, early), daemon=True)
            t.start()
            threads.append(t)
    return threads


def wait_members_gone(members: list[Member], patience: float) -> None:
    """Waits up to ``patience`` s for the member agents to exit (they end their processes
    and remove their segments), then kills the rest."""
    deadline = time.monotonic() + patience
    poller = select.poll()
    left_fds = {}
    for m in members:
        poller.register(m.pidfd, select.POLLIN)
        left_fds[m.pidfd] = m
    while left_fds:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        for fd, _ in poller.poll(int(left * 1000) + 1):
            poller.unregister(fd)
            left_fds.pop(fd, None)
    for m in left_fds.values():
        try:
            os.kill(m.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for m in members:
        try:
            os.waitpid(m.pid, 0)
        except ChildProcessError:
            pass
        os.close(m.pidfd)
