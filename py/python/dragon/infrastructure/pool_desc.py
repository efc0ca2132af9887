"""DragonHPC's ``dragon.infrastructure.pool_desc``: the description of a memory pool that
``dragon.globalservices.pool`` hands out."""

from __future__ import annotations

import enum

from dragon.infrastructure.channel_desc import _WithSdesc


class PoolDescriptor(_WithSdesc):
    """A pool: ``m_uid``, ``name``, ``node`` (index), ``state`` and ``sdesc`` (the
    serialized pool ``dragon.managed_memory.MemoryPool.attach`` takes)."""

    class State(enum.Enum):
        """State of the pool."""

        PENDING = 0
        ACTIVE = 1
        DEAD = 2

    def __init__(self, m_uid=0, name="", node=0, state=None, sdesc=""):
        self.m_uid = int(m_uid)
        self.name = name
        self.node = int(node)
        self.sdesc = sdesc
        if state is None:
            state = self.State.PENDING
        self.state = state if isinstance(state, self.State) else self.State(state)

    def get_sdict(self) -> dict:
        """The descriptor as a dict (``from_sdict`` takes it back)."""
        from dragon.utils import B64

        return {
            "m_uid": self.m_uid,
            "name": self.name,
            "node": self.node,
            "state": self.state.value,
            "sdesc": B64.bytes_to_str(self.sdesc),
        }

    @classmethod
    def from_sdict(cls, sdict: dict) -> PoolDescriptor:
        """The descriptor of ``get_sdict()``'s dict."""
        return cls(**sdict)


class PoolOptions:
    """Options of ``globalservices.pool.create``; ``placement``/``target_node`` are
    accepted (a pool is made on the caller's node)."""

    class Placement(enum.Enum):
        """Where DragonHPC makes the pool."""

        LOCAL = 0
        DEFERRED = 1

    def __init__(self, placement=0, target_node=0, sattr=""):
        self.placement = self.Placement(placement)
        self.target_node = int(target_node)
        self.sattr = sattr
