"""DragonHPC's ``dragon.infrastructure.parameters``: facts about the calling process
(``this_process.my_puid``, ``index``, ...), as user code reads them."""

from __future__ import annotations

import os
import socket


class LaunchParameters:
    """What DragonHPC's ``this_process`` offers to user code; values are read on access."""

    @property
    def my_puid(self) -> int:
        """This process's p_uid (from the node agent)."""
        from dragon import _runtime

        return _runtime.my_puid()

    @property
    def index(self) -> int:
        """Index of this node in the runtime."""
        v = os.environ.get("DRAGON_RUNTIME", "")
        parts = v.split(":")
        return int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else 0

    @property
    def hostname(self) -> str:
        """This node's host name."""
        return socket.gethostname()

    @property
    def mode(self) -> str:
        """How the runtime runs: ``"single"`` (one node) or ``"multi"``."""
        from dragon.native import machine

        return "multi" if len(machine.node_table()) > 1 else "single"

    @property
    def pid(self) -> int:
        """The OS pid."""
        return os.getpid()

    @property
    def default_pd(self) -> str:
        """The node's default pool (the runtime's node pool) as a base64 serialized
        descriptor: ``MemoryPool.attach(B64.str_to_bytes(default_pd))`` opens it."""
        from dragon.managed_memory import MemoryPool
        from dragon.utils import B64

        return B64.bytes_to_str(MemoryPool.attach_default().serialize())

    @property
    def inf_pd(self) -> str:
        """DragonHPC's infrastructure pool descriptor: this runtime has one pool per node for
        both, so the same as ``default_pd``."""
        return self.default_pd

    @property
    def num_gw_channels_per_node(self) -> int:
        """DragonHPC's gateway channels per node: none here (nodes talk through the agents'
        transport), so 0."""
        return 0

    def env(self) -> dict:
        """The runtime's environment variables."""
        return {k: v for k, v in os.environ.items() if k.startswith("DRAGON_")}


this_process = LaunchParameters()


def reload_this_process() -> None:
    """Nothing to reload: values are read on access."""
