"""DragonHPC's ``dragon.infrastructure.node_desc``: the description of a node of the
runtime, as ``dragon.globalservices.node`` hands it out."""

from __future__ import annotations

import enum


class NodeDescriptor:
    """A node: ``h_uid`` (= ``host_id``), ``name``, ``host_name``, ``ip_addrs``,
    ``num_cpus``, ``physical_mem``, ``is_primary``, ``cpu_devices``, ``g_idx`` (its index in
    the runtime), ``state``; ``num_gpus``/``gpus`` for its accelerators."""

    class State(enum.IntEnum):
        """State of the node."""

        NULL = enum.auto()
        DISCOVERABLE = enum.auto()
        PENDING = enum.auto()
        ACTIVE = enum.auto()
        IDLE = enum.auto()
        ERROR = enum.auto()
        DOWN = enum.auto()

    def __init__(
        self,
        state: State = State.NULL,
        h_uid: int | None = None,
        name: str = "",
        ip_addrs: list[str] | None = None,
        port: int | None = None,
        num_cpus: int = 0,
        physical_mem: int = 0,
        is_primary: bool = False,
        host_id: int | None = None,
        host_name: str = "",
        cpu_devices: list[int] | None = None,
        g_idx: int | None = None,
        gpus: list[int] | None = None,
        **_ignored,
    ):
        self.state = self.State(state)
        self.h_uid = h_uid
        self.host_id = h_uid if host_id is None else host_id
        self.name = name
        self.ip_addrs = [f"{a}:{port}" for a in ip_addrs or []] if port is not None else list(ip_addrs or [])
        self.num_cpus = num_cpus
        self.physical_mem = physical_mem
        self.is_primary = is_primary
        self.host_name = host_name
        self.cpu_devices = cpu_devices
        self.g_idx = g_idx
        self.gpus = list(gpus or [])

    @property
    def num_gpus(self) -> int:
        """How many GPUs the node has."""
        return len(self.gpus)

    def __repr__(self) -> str:
        return f"name:{self.name}, host_id:{self.host_id} at {self.ip_addrs}, state:{self.state.name}"

    def get_sdict(self) -> dict:
        """The descriptor as a dict (``from_sdict`` takes it back)."""
        return {
            "state": int(self.state),
            "h_uid": self.h_uid,
            "name": self.name,
            "ip_addrs": self.ip_addrs,
            "num_cpus": self.num_cpus,
            "physical_mem": self.physical_mem,
            "is_primary": self.is_primary,
            "host_id": self.host_id,
            "host_name": self.host_name,
            "cpu_devices": self.cpu_devices,
            "g_idx": self.g_idx,
            "gpus": self.gpus,
        }

    @classmethod
    def from_sdict(cls, sdict: dict) -> NodeDescriptor:
        """The descriptor of ``get_sdict()``'s dict."""
        return cls(**sdict)
