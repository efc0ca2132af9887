"""DragonHPC's ``dragon.globalservices.node``: the nodes of the runtime as descriptors."""

from __future__ import annotations

from dragon.infrastructure.node_desc import NodeDescriptor


class NodeError(Exception):
    """No such node."""


def _desc(n) -> NodeDescriptor:
    return NodeDescriptor(
        state=NodeDescriptor.State.ACTIVE,
        h_uid=n.h_uid,
        name=n.name,
        ip_addrs=[n.ip],
        num_cpus=n.num_cpus,
        physical_mem=n.physical_mem,
        is_primary=n.is_primary,
        host_name=n.hostname,
        cpu_devices=list(n.cpus),
        g_idx=_index(n),
        gpus=list(n.gpus),
    )


def _nodes() -> list:
    from dragon.native.machine import Node, System

    return [Node(h) for h in System().nodes]


def _index(n) -> int:
    from dragon.native.machine import node_index

    try:
        return node_index(n.h_uid)
    except ValueError:
        return 0


def query(identifier: int | str) -> NodeDescriptor:
    """The descriptor of the node named by its h_uid (``host_id``), its index in the runtime,
    its name or its hostname. Raises NodeError if there is no such node."""
    nodes = _nodes()
    for n in nodes:
        if identifier in (n.h_uid, n.name, n.hostname):
            return _desc(n)
    if isinstance(identifier, int) and 0 <= identifier < len(nodes):
        return _desc(nodes[identifier])
    raise NodeError(f"no node {identifier!r} in this runtime")


def query_all() -> list[NodeDescriptor]:
    """Every node's descriptor, in the runtime's order."""
    return [_desc(n) for n in _nodes()]


def query_total_cpus() -> int:
    """The CPUs of every node together."""
    return sum(n.num_cpus for n in _nodes())


def get_list() -> list[int]:
    """The h_uids of every node."""
    from dragon.native.machine import System

    return list(System().nodes)


def host_id() -> int:
    """This node's h_uid (DragonHPC's ``dragon.utils.host_id()``)."""
    from dragon.native.machine import current

    return current().h_uid
