"""A member node agent of a multi-node runtime: ``python -m dragon._nodeagent``.

The launcher starts one per node other than its own (see ``dragon._wlm``), configured by
this environment only (never a command line: the secret is in it):

``DRAGON_NODE_RT``       the runtime id (hex)
``DRAGON_NODE_INDEX``    this node's index (1..n-1); when absent, the start step's rank + 1
                         (``SLURM_PROCID``, ``PALS_RANKID`` or ``PMI_RANK``)
``DRAGON_NODE_SECRET``   the runtime's secret (hex); removed from ``os.environ`` at once, so
                         no child inherits it (``/proc/<pid>/environ`` of the agent, readable
                         by its owner only, still shows it; ssh starts avoid even that)
``DRAGON_NODE_NAME``     the node's name; when absent ``SLURMD_NODENAME``, else entry k of
                         ``DRAGON_NODE_NAMES`` (every node's name, comma-separated), else
                         the host name
``DRAGON_NODE_IP``       the address to listen on and to publish; when absent, the one
                         ``DRAGON_NETWORK_PREFIX`` names, else the default route's
``DRAGON_NODE_PORT``     the transport's port (default 0: any)
``DRAGON_TRANSPORT``     ``tcp`` or ``ofi`` (see ``dragon -t``)
``DRAGON_NODE_TIMEOUT``  seconds bring-up may take
``DRAGON_NODE_LABEL``    ``1``: prefix every line this agent and its processes write with
                         ``<k-1>: `` (as ``srun --label`` does), for start steps that merge
                         the output of several nodes (mpiexec)
``DRAGON_FAULT_NODE_EXIT`` (fault injection for tests) node indices, comma-separated, whose
                         agent exits at once with an error instead of coming up

With ``--env-stdin`` (an SSH launch) the agent first reads that environment from its
standard input, one line of JSON ``{"env": {...}, "cwd": DIR}``, into its own (so it is in
no command line and not in ``/proc/<pid>/environ``); the rest of the stream is a lifeline:
when it ends (the launcher or its ssh is gone), the agent ends as on SIGTERM.

The agent creates this node's pool (``/dragon-<rt>-<k>-pool-1``) and its request channel,
opens its transport endpoint, and writes ``dragon-node-ready <k> <address> <name> <tcp|ofi>`` on
stdout; the launcher then dials every member. After that its stdout and stderr carry the
output of the processes it starts (they inherit them), which the launcher labels with the
node. It runs until the primary ends the runtime, the primary's node is lost, or
SIGTERM/SIGHUP (also while bring-up still waits); then it ends every process it started (it
is their subreaper) and removes this node's segments only (other nodes may share
``/dev/shm`` with it).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time

from dragon import _log, _native, _objserver, _writers
from dragon._multinode import FAILED, READY, node_dict
from dragon._runtime import pool_size
from dragon._wlm import RANK_VARS, node_address
from dragon.cli import _end_descendants, _remove_segments

TERM_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
# Blocked in every thread (before any is started): the main loop takes them with sigtimedwait.
SIGNALS = {*TERM_SIGNALS, signal.SIGCHLD, signal.SIGINT}


def _index(env) -> int:
    if "DRAGON_NODE_INDEX" in env:
        return int(env["DRAGON_NODE_INDEX"])
    for v in RANK_VARS:
        if v in env:
            return int(env[v]) + 1
    raise KeyError("DRAGON_NODE_INDEX")


def _name(env, node: int) -> str:
    names = env.get("DRAGON_NODE_NAMES", "").split(",")
    listed = names[node] if node < len(names) else ""
    return env.get("DRAGON_NODE_NAME") or env.get("SLURMD_NODENAME") or listed or socket.gethostname()


def _env_from_stdin() -> None:
    """``--env-stdin``: the environment from the first line of stdin, then the lifeline."""
    msg = json.loads(sys.stdin.buffer.readline() or b"{}")
    os.environ.update(msg.get("env", {}))
    try:
        os.chdir(msg.get("cwd") or ".")
    except OSError:
        pass  # no such directory on this host: stay in the login directory

    def lifeline() -> None:
        while os.read(0, 65536):
            pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=lifeline, daemon=True).start()


def _label_output(node: int) -> threading.Thread:
    """Makes fds 1 and 2 (inherited by the processes this agent starts) a pipe whose lines
    go to the original stdout prefixed ``<node-1>: ``; returns the thread that copies them."""
    out = os.dup(1)
    r, w = os.pipe()
    os.dup2(w, 1)
    os.dup2(w, 2)
    os.close(w)
    tag = f"{node - 1}: ".encode()

    def pump() -> None:
        with os.fdopen(r, "rb") as f, os.fdopen(out, "wb", buffering=0) as sink:
            for line in f:
                sink.write(tag + line)

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    return t


def main() -> int:
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    if sys.argv[1:] == ["--env-stdin"]:
        _env_from_stdin()
    elif sys.argv[1:]:
        print(f"dragon node agent: unknown arguments {sys.argv[1:]} (only --env-stdin)", file=sys.stderr)
        return 2
    env = os.environ
    try:
        rt = int(env["DRAGON_NODE_RT"], 16)
        node = _index(env)
        secret = env.pop("DRAGON_NODE_SECRET")
        name = _name(env, node)
        transport = env.get("DRAGON_TRANSPORT", "tcp")
        timeout = float(env.get("DRAGON_NODE_TIMEOUT", "30"))
        port = int(env.get("DRAGON_NODE_PORT", "0"))
    except (KeyError, ValueError) as e:
        print(f"dragon node agent: bad or missing setting {e}", file=sys.stderr)
        return 2
    pump = _label_output(node) if env.pop("DRAGON_NODE_LABEL", "") == "1" else None
    try:
        code, abandon = _serve(rt, node, name, secret, transport, timeout, port)
    except BaseException as e:
        _fail(node, f"{type(e).__name__}: {e}")
        raise
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        if pump is not None:
            os.close(1)
            os.close(2)
            pump.join(timeout=5.0)
    if abandon:
        os._exit(code)  # the agent's threads are still in bring-up
    return code


def _fail(node: int, why: str) -> None:
    """Says why this agent cannot come up: on stderr, and to the launcher on stdout."""
    print(f"dragon node agent {node}: {why}", file=sys.stderr, flush=True)
    print(FAILED, node, why.replace("\n", " "), flush=True)


def _serve(
    rt: int, node: int, name: str, secret: str, transport: str, timeout: float, port: int
) -> tuple[int, bool]:
    """Runs the agent; returns (exit code, whether its bring-up thread is still waiting)."""
    env = os.environ
    try:
        ip = env.get("DRAGON_NODE_IP") or node_address(env.get("DRAGON_NETWORK_PREFIX"))
    except ValueError as e:
        _fail(node, str(e))
        return 2, False
    for k in ("RT", "INDEX", "NAME", "NAMES", "IP", "PORT", "TIMEOUT"):
        env.pop(f"DRAGON_NODE_{k}", None)
    if str(node) in env.pop("DRAGON_FAULT_NODE_EXIT", "").split(","):
        _fail(node, "stopped by DRAGON_FAULT_NODE_EXIT")
        return 3, False
    _native.set_child_subreaper()
    _log.configure(rt, node)
    try:
        agent = _native.Agent(rt, node, pool_size())
    except Exception as e:
        _fail(node, f"cannot create the node pool: {e}")
        return 1, False
    code = 0
    joining = None
    try:
        try:
            addr = agent.open_endpoint(transport, secret, f"{ip}:{port}")
        except Exception as e:
            _fail(node, str(e))
            raise
        del secret
        print(READY, node, addr, name, agent.endpoint_backend(), flush=True)
        # Bring-up waits in a thread, so that SIGTERM (the start step ending) is seen now.
        failed: list[BaseException] = []

        def join() -> None:
            try:
                me = node_dict(name, ip)
                me["objects"] = _objserver.start(node, ip)
                agent.join_cluster(me, timeout)
                _log.info("dragon.nodeagent", "node %d (%s) joined runtime %016x", node, name, rt)
            except BaseException as e:
                failed.append(e)

        joining = threading.Thread(target=join, daemon=True)
        joining.start()
        next_sweep = 0.0
        while True:
            # Short: the primary's end of the runtime is seen within this (its teardown time).
            info = signal.sigtimedwait(SIGNALS, 0.02)
            agent.reap()
            now = time.monotonic()
            if now >= next_sweep and not joining.is_alive():
                # Pipe writer counts of this node's processes that died without closing.
                _writers.sweep(rt, node, agent.nodes)
                next_sweep = now + 0.5
            if info is not None and info.si_signo in TERM_SIGNALS:
                break
            if joining.is_alive():
                continue
            if failed:
                raise failed[0]
            if agent.shutdown_requested():
                break
            if 0 in agent.lost_nodes():
                _log.error("dragon.nodeagent", "node %d: the primary node was lost; ending", node)
                code = 1
                break
    except Exception as e:
        if joining is not None:  # else _fail said it
            print(f"dragon node agent {node}: {e}", file=sys.stderr, flush=True)
        _log.error("dragon.nodeagent", "node %d: %s", node, e)
        code = 1
    _end_descendants(os.getpid())
    if joining is not None and joining.is_alive():
        # Ended during bring-up: the agent's threads are still in it; its segments go by name.
        _remove_segments(rt, node)
        return code or 1, True
    _objserver.stop()
    agent.shutdown()
    _remove_segments(rt, node)
    _writers.remove(rt, node)
    return code, False


if __name__ == "__main__":
    sys.exit(main())
