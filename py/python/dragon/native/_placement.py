"""Where and how a native process runs: the Policy in force (thread's, group's, template's),
the node it goes to, its CPU set and GPU variable, and waiting for a process of another node.
Used by ``dragon.native.process`` (which re-exports these names) and ``process_group``."""

from __future__ import annotations

import itertools
import os
import time

from dragon import _runtime
from dragon.infrastructure.policy import Policy, PolicyError
from dragon.native import machine


def _resolve_cpus(cpus: list[int]) -> list[int] | None:
    allowed = os.sched_getaffinity(0)
    use = [c for c in cpus if c in allowed]
    return use or None


def _policy_for(template_policy: Policy | None, group_policy: Policy | None) -> Policy:
    p = Policy.thread_policy()
    if group_policy is not None:
        p = Policy.merge(p, group_policy)
    if template_policy is not None:
        p = Policy.merge(p, template_policy)
    return p


_round_robin = itertools.count()  # this process's launches with no placement, over the nodes


def _default_nodes(n: int) -> list[int]:
    """The nodes processes with no placement go round robin over: all ``n``, or the indices
    listed in ``DRAGON_DEFAULT_NODES`` (comma-separated; e.g. ``1,2`` keeps node 0, the
    driver's, free)."""
    v = os.environ.get("DRAGON_DEFAULT_NODES", "").strip()
    if not v:
        return list(range(n))
    try:
        nodes = [int(x) for x in v.split(",") if x.strip()]
    except ValueError:
        raise PolicyError(f"DRAGON_DEFAULT_NODES={v!r}: not a list of node indices") from None
    bad = [k for k in nodes if not 0 <= k < n]
    if bad or not nodes:
        raise PolicyError(f"DRAGON_DEFAULT_NODES={v!r}: this runtime has nodes 0..{n - 1}")
    return nodes


def _target_node(p: Policy, local_streams: bool) -> int:
    """The index of the node a process with policy ``p`` runs on (PolicyError if the policy
    names no node of the runtime, or another node for a process with local streams)."""
    me = machine.my_node_index()
    P = Policy.Placement
    if p.placement == P.HOST_NAME and p.host_name:
        try:
            node = machine.node_index(p.host_name)
        except ValueError:
            raise PolicyError(f"no node named {p.host_name!r} in this runtime") from None
    elif p.placement == P.HOST_ID and p.host_id not in (-1, None):
        try:
            node = machine.node_index(int(p.host_id))
        except ValueError:
            raise PolicyError(f"no node with h_uid {p.host_id} in this runtime") from None
    elif p.placement == P.LOCAL or local_streams or not machine.node_table():
        return me
    else:
        nodes = _default_nodes(len(machine.node_table()))
        return nodes[next(_round_robin) % len(nodes)]
    if node != me and local_streams:
        raise PolicyError(
            f"a process with redirected standard streams cannot run on another node (node {node})"
        )
    return node


def _gpu_env(env: dict, pol: Policy, node: machine.Node) -> None:
    """Sets the node's GPU visible-devices variable for the policy's GPU affinity."""
    if pol.gpu_affinity and node.gpus:
        visible = node.gpus
        env[node.gpu_env_str] = ",".join(str(visible[i]) for i in pol.gpu_affinity if i < len(visible))


def _wait_remote(puid: int, timeout: float | None) -> int | None:
    """Waits for process ``puid`` on another node; its exit code, or None after ``timeout``.
    Without a timeout: one ``Wait`` the process's agent answers at its end, on this thread's
    own connection (so other calls of this process do not wait behind it). With one: its
    status, asked again with a growing pause (1 to 50 ms), so an expired wait leaves nothing
    registered on either node."""
    if timeout is None:
        return _runtime.waiter_client().wait(puid, None)
    deadline = time.monotonic() + timeout
    pause = 0.001
    while True:
        code = _runtime.agent().status(puid)[1]
        left = deadline - time.monotonic()
        if code is not None or left <= 0:
            return code
        time.sleep(min(pause, left))
        pause = min(pause * 2, 0.05)
