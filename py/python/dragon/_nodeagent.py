"""A member node agent of a multi-node runtime: ``python -m dragon._nodeagent``.

The launcher starts one per node other than its own (on this host for ``--local-nodes``),
with this environment (never a command line: the secret is in it):

``DRAGON_NODE_RT``       the runtime id (hex)
``DRAGON_NODE_INDEX``    this node's index (1..n-1)
``DRAGON_NODE_SECRET``   the runtime's secret (hex); removed from the environment at once
``DRAGON_NODE_NAME``     the node's name (``<host>-n<k>`` for a local node)
``DRAGON_NODE_IP``       the address to listen on and to publish
``DRAGON_TRANSPORT``     ``tcp`` or ``ofi`` (see ``dragon -t``)
``DRAGON_NODE_TIMEOUT``  seconds bring-up may take
``DRAGON_FAULT_NODE_EXIT`` (fault injection for tests) node indices, comma-separated, whose
                         agent exits at once with an error instead of coming up

The agent creates this node's pool (``/dragon-<rt>-<k>-pool-1``) and its request channel,
opens its transport endpoint, and writes ``dragon-node-ready <k> <address>`` on stdout;
the launcher then dials every member. After that its stdout and stderr carry the output of
the processes it starts (they inherit them), which the launcher labels with the node. It
runs until the primary ends the runtime, the primary's node is lost, or SIGTERM/SIGHUP;
then it ends every process it started (it is their subreaper) and removes this node's
segments only (other nodes may share ``/dev/shm`` with it).
"""

from __future__ import annotations

import os
import signal
import socket
import sys

from dragon import _log, _native
from dragon._multinode import READY, node_dict
from dragon._runtime import pool_size
from dragon.cli import _end_descendants, _remove_segments


def main() -> int:
    env = os.environ
    try:
        rt = int(env["DRAGON_NODE_RT"], 16)
        node = int(env["DRAGON_NODE_INDEX"])
        secret = env.pop("DRAGON_NODE_SECRET")
        name = env.get("DRAGON_NODE_NAME") or f"{socket.gethostname()}-n{node}"
        ip = env.get("DRAGON_NODE_IP", "127.0.0.1")
        transport = env.get("DRAGON_TRANSPORT", "tcp")
        timeout = float(env.get("DRAGON_NODE_TIMEOUT", "30"))
    except (KeyError, ValueError) as e:
        print(f"dragon node agent: bad or missing setting {e}", file=sys.stderr)
        return 2
    for k in ("RT", "INDEX", "NAME", "IP", "TIMEOUT"):
        env.pop(f"DRAGON_NODE_{k}", None)
    if str(node) in env.pop("DRAGON_FAULT_NODE_EXIT", "").split(","):
        print(f"dragon node agent {node}: stopped by DRAGON_FAULT_NODE_EXIT", file=sys.stderr)
        return 3
    sigs = {signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    _native.set_child_subreaper()
    _log.configure(rt, node)
    try:
        agent = _native.Agent(rt, node, pool_size())
    except Exception as e:
        print(f"dragon node agent {node}: cannot create the node pool: {e}", file=sys.stderr)
        return 1
    code = 0
    try:
        addr = agent.open_endpoint(transport, secret, f"{ip}:0")
        del secret
        print(READY, node, addr, flush=True)
        agent.join_cluster(node_dict(name, ip), timeout)
        _log.info("dragon.nodeagent", "node %d (%s) joined runtime %016x", node, name, rt)
        while True:
            info = signal.sigtimedwait(sigs, 0.25)
            agent.reap()
            if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGHUP):
                break
            if agent.shutdown_requested():
                break
            if 0 in agent.lost_nodes():
                _log.error("dragon.nodeagent", "node %d: the primary node was lost; ending", node)
                code = 1
                break
    except Exception as e:
        print(f"dragon node agent {node}: {e}", file=sys.stderr, flush=True)
        _log.error("dragon.nodeagent", "node %d: %s", node, e)
        code = 1
    _end_descendants(os.getpid())
    agent.shutdown()
    _remove_segments(rt, node)
    return code


if __name__ == "__main__":
    sys.exit(main())
