"""The machine the runtime runs on: DragonHPC's ``System`` and ``Node``.

On a single-node runtime ``System().nodes`` lists this node, and ``Node`` describes it from
the node's topology (``dragon._native.topology``: hwloc when the package was built with it,
else sysfs and the CPU affinity mask; detected once per process), its hostname and address,
and the GPU devices it can see. On a multi-node runtime the node table comes from the
agents (their bring-up exchanged it): node ``k`` has h_uid ``k + 1`` (the primary, the
launcher's node, is h_uid 1), a name (``<host>-n<k>`` for a local node; names are unique,
hostnames need not be), its hostname, address, CPU count and memory; this process's own
node is still described from its topology.

GPU detection looks at ``/proc/driver/nvidia/gpus`` (NVIDIA) and the KFD topology (AMD).
The environment variable ``DRAGON_GPUS`` overrides it, so GPU-dependent behaviour can be
exercised on machines without GPUs: ``DRAGON_GPUS=none``, ``DRAGON_GPUS=nvidia:4`` (devices
0-3) or ``DRAGON_GPUS=amd:0,2`` (vendor ``nvidia``, ``amd`` or ``intel``). A visible-devices
mask the process inherited (``CUDA_VISIBLE_DEVICES``, ``ROCR_VISIBLE_DEVICES``,
``ZE_AFFINITY_MASK``) limits the devices reported.
"""

from __future__ import annotations

import glob
import os
import socket

from dragon.exceptions import DragonValueError
from dragon.infrastructure.policy import Policy

#: Environment variable that each GPU vendor's runtime reads to restrict visible devices.
GPU_ENV_STR = {"nvidia": "CUDA_VISIBLE_DEVICES", "amd": "ROCR_VISIBLE_DEVICES", "intel": "ZE_AFFINITY_MASK"}

#: h_uid of this node while the runtime spans one node.
_LOCAL_H_UID = 1

_topo: dict | None = None


def topology() -> dict:
    """This node's topology (cached): source, cpus, cores, numa_nodes, physical_mem,
    packages, gpus (see ``dragon._native.topology``)."""
    global _topo
    if _topo is None:
        from dragon import _native

        _topo = _native.topology()
    return _topo


def _parse_devices(spec: str) -> list[int] | None:
    spec = spec.strip()
    if not spec:
        return []
    out = []
    for part in spec.split(","):
        part = part.strip()
        if not part.isdigit():
            return None  # UUIDs or MIG names: leave the list alone
        out.append(int(part))
    return out


def detect_gpus() -> tuple[str | None, list[int]]:
    """(vendor or None, visible device indices) on this node; see the module docs."""
    override = os.environ.get("DRAGON_GPUS")
    if override is not None:
        override = override.strip().lower()
        if override in ("", "none", "0"):
            return None, []
        vendor, _, devs = override.partition(":")
        if vendor not in GPU_ENV_STR:
            raise DragonValueError(f"DRAGON_GPUS: unknown vendor {vendor!r} (nvidia, amd or intel)")
        if devs.isdigit():
            devices = list(range(int(devs)))
        else:
            parsed = _parse_devices(devs)
            if parsed is None:
                raise DragonValueError(f"DRAGON_GPUS: bad device list {devs!r}")
            devices = parsed
    else:
        vendor, devices = None, []
        nv = sorted(glob.glob("/proc/driver/nvidia/gpus/*"))
        if nv:
            vendor, devices = "nvidia", list(range(len(nv)))
        else:
            amd = 0
            for props in glob.glob("/sys/class/kfd/kfd/topology/nodes/*/properties"):
                try:
                    with open(props) as f:
                        if any(ln.startswith("simd_count") and ln.split()[1] != "0" for ln in f):
                            amd += 1
                except OSError:
                    pass
            if amd:
                vendor, devices = "amd", list(range(amd))
        if vendor is None:
            # No driver loaded: GPUs still show as PCI display devices.
            pci = topology()["gpus"]
            if pci:
                vendor = pci[0][0]
                devices = [g[2] for g in pci if g[0] == vendor]
        if vendor is None:
            return None, []
    mask = os.environ.get(GPU_ENV_STR[vendor])
    if mask is not None:
        visible = _parse_devices(mask)
        if visible is not None:
            devices = [d for d in devices if d in visible]
    return vendor, devices


def _local_ip() -> str:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # no packet is sent; picks the outgoing address
            return s.getsockname()[0]
    except OSError:
        try:
            return socket.gethostbyname(socket.gethostname())
        except OSError:
            return "127.0.0.1"


_table_cache: list[dict] | None = None


def node_table() -> list[dict]:
    """The runtime's node table (dicts: node, name, hostname, ip, num_cpus, physical_mem,
    ...); empty on a single-node runtime or outside any runtime."""
    global _table_cache
    if _table_cache is None:
        if not os.environ.get("DRAGON_RUNTIME"):
            return []
        from dragon import _runtime

        _table_cache = list(_runtime.agent().nodes())
    return _table_cache


def my_node_index() -> int:
    """The index of the node this process runs on (0 outside a multi-node runtime)."""
    parts = os.environ.get("DRAGON_RUNTIME", "").split(":")
    try:
        return int(parts[2])
    except (IndexError, ValueError):
        return 0


def node_index(ident: int | str) -> int:
    """The index of the node named by an h_uid, a node name or a hostname; ValueError if
    the runtime has no such node."""
    table = node_table()
    if isinstance(ident, bool) or not isinstance(ident, (int, str)):
        raise TypeError(f"Node() takes an h_uid or a hostname, not {type(ident).__name__}")
    if not table:
        host = socket.gethostname()
        if ident in (_LOCAL_H_UID, host, "localhost") or (
            isinstance(ident, str) and ident.split(".")[0] == host.split(".")[0]
        ):
            return 0
        raise DragonValueError(f"no node {ident!r} in this runtime (nodes: {host!r}, h_uid {_LOCAL_H_UID})")
    if isinstance(ident, int):
        if 1 <= ident <= len(table):
            return ident - 1
    elif ident == "localhost":
        return my_node_index()
    else:
        for key in ("name", "hostname"):
            for n in table:
                if ident == n[key] or ident.split(".")[0] == n[key].split(".")[0]:
                    return n["node"]
    names = ", ".join(f"{n['name']!r} (h_uid {n['node'] + 1})" for n in table)
    raise DragonValueError(f"no node {ident!r} in this runtime (nodes: {names})")


class Node:
    """One node of the runtime, named by its h_uid, its name or its hostname."""

    def __init__(self, ident: int | str):
        self._index = node_index(ident)
        table = node_table()
        self._info = table[self._index] if table else None
        self._local = self._index == my_node_index()
        if self._local:
            self._topo = topology()
            self._cpus = list(self._topo["cpus"]) or sorted(os.sched_getaffinity(0))
            self._vendor, self._gpus = detect_gpus()
        else:
            # Another node: what its agent reported (CPU count, memory, GPUs).
            n = self._info["num_cpus"]
            self._cpus = list(range(n))
            self._topo = {
                "source": "remote",
                "physical_mem": self._info["physical_mem"],
                "cores": [[c] for c in range(n)],
                "numa_nodes": [(0, list(range(n)), self._info["physical_mem"])],
            }
            self._vendor, self._gpus = self._info.get("gpu_vendor"), list(self._info.get("gpus", []))

    @property
    def h_uid(self) -> int:
        """The node's unique id in the runtime."""
        return self._index + 1

    @property
    def name(self) -> str:
        """Dragon's name of the node."""
        return self._info["name"] if self._info else f"node{self.h_uid}"

    @property
    def hostname(self) -> str:
        """Host name of the node."""
        return self._info["hostname"] if self._info else socket.gethostname()

    @property
    def ip(self) -> str:
        """IPv4 address of the node."""
        return self._info["ip"] if self._info else _local_ip()

    @property
    def num_cpus(self) -> int:
        """Number of CPUs the runtime may use on this node."""
        return len(self._cpus)

    @property
    def cpus(self) -> list[int]:
        """The CPUs the runtime may use on this node."""
        return list(self._cpus)

    @property
    def num_gpus(self) -> int:
        """Number of visible GPUs."""
        return len(self._gpus)

    @property
    def gpus(self) -> list[int]:
        """Visible GPU device indices."""
        return list(self._gpus)

    @property
    def gpu_vendor(self) -> str | None:
        """``"nvidia"``, ``"amd"``, ``"intel"`` or None."""
        return self._vendor

    @property
    def gpu_env_str(self) -> str:
        """The environment variable the GPU vendor uses for device masks ("" without GPUs)."""
        return GPU_ENV_STR.get(self._vendor or "", "")

    @property
    def physical_mem(self) -> int:
        """Physical memory in bytes."""
        return self._topo["physical_mem"] or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    @property
    def cores(self) -> list[list[int]]:
        """The usable CPUs grouped by physical core."""
        return [list(c) for c in self._topo["cores"]]

    @property
    def numa_nodes(self) -> list[tuple[int, list[int], int]]:
        """(os index, CPUs, memory bytes) of each NUMA node."""
        return [(i, list(c), m) for i, c, m in self._topo["numa_nodes"]]

    @property
    def topology_source(self) -> str:
        """Where the topology came from: ``"hwloc"`` or ``"sysfs"``."""
        return self._topo["source"]

    @property
    def is_primary(self) -> bool:
        """Whether this node runs the runtime's launcher."""
        return self._index == 0

    def __repr__(self) -> str:
        return f"Node(h_uid={self.h_uid}, hostname={self.hostname!r})"


class System:
    """The set of nodes of the runtime."""

    @property
    def nodes(self) -> list[int]:
        """h_uids of the nodes."""
        return [n["node"] + 1 for n in node_table()] or [_LOCAL_H_UID]

    @property
    def nnodes(self) -> int:
        """Number of nodes."""
        return len(self.nodes)

    @property
    def primary_node(self) -> Node:
        """The node of the launcher."""
        return Node(_LOCAL_H_UID)

    @property
    def restarted(self) -> bool:
        """Whether the runtime was restarted (never, so far)."""
        return False

    @staticmethod
    def cpu_count() -> int:
        """Number of CPUs over all nodes."""
        return sum(Node(h).num_cpus for h in System().nodes)

    def hostname_policies(self) -> list[Policy]:
        """One policy per node, placing by host name (the node's name on a multi-node
        runtime: local nodes share one hostname)."""
        return [
            Policy(placement=Policy.Placement.HOST_NAME, host_name=_placement_name(h)) for h in self.nodes
        ]

    def gpu_policies(self) -> list[Policy]:
        """One policy per GPU of every node (hostname placement, that one GPU)."""
        out = []
        for h in self.nodes:
            node = Node(h)
            for g in node.gpus:
                out.append(
                    Policy(
                        placement=Policy.Placement.HOST_NAME,
                        host_name=_placement_name(h),
                        gpu_affinity=[g],
                    )
                )
        return out


def _placement_name(h_uid: int) -> str:
    node = Node(h_uid)
    return node.name if node_table() else node.hostname


def cpu_count() -> int:
    """Number of CPUs in the runtime."""
    return System.cpu_count()


def current() -> Node:
    """The node this process runs on."""
    return Node(my_node_index() + 1)
