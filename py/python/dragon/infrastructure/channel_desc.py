"""DragonHPC's ``dragon.infrastructure.channel_desc``: the description of a channel that
``dragon.globalservices.channel`` hands out, and the options of its creation."""

from __future__ import annotations

import enum


def _as_bytes(value) -> bytes:
    if isinstance(value, str):
        from dragon.utils import B64

        return B64.str_to_bytes(value) if value else b""
    return bytes(value or b"")


class _WithSdesc:
    """The ``sdesc`` attribute of a descriptor: bytes, set from bytes or a base64 string."""

    @property
    def sdesc(self) -> bytes:
        """The serialized object."""
        return self._sdesc

    @sdesc.setter
    def sdesc(self, value) -> None:
        self._sdesc = _as_bytes(value)


class ChannelDescriptor(_WithSdesc):
    """A channel: ``m_uid`` (its pool), ``c_uid``, ``name``, ``node`` (index), ``state``
    and ``sdesc`` (the serialized channel ``dragon.channels.Channel.attach`` takes; a base64
    string is accepted too)."""

    class State(enum.Enum):
        """State of the channel."""

        PENDING = 0
        ACTIVE = 1
        DEAD = 2

    def __init__(self, m_uid, c_uid, name, node, state=None, sdesc=""):
        self.m_uid = m_uid
        self.c_uid = c_uid
        self.name = name
        self.node = node
        self.sdesc = sdesc
        if state is None:
            state = self.State.PENDING
        self.state = state if isinstance(state, self.State) else self.State(state)

    def __repr__(self) -> str:
        return f"ChannelDescriptor(c_uid={self.c_uid}, name={self.name!r}, state={self.state.name})"

    def get_sdict(self) -> dict:
        """The descriptor as a dict (``from_sdict`` takes it back)."""
        from dragon.utils import B64

        return {
            "m_uid": self.m_uid,
            "c_uid": self.c_uid,
            "name": self.name,
            "node": self.node,
            "state": self.state.value,
            "sdesc": B64.bytes_to_str(self.sdesc),
        }

    @classmethod
    def from_sdict(cls, sdict: dict) -> ChannelDescriptor:
        """The descriptor of ``get_sdict()``'s dict."""
        return cls(**sdict)


class ChannelOptions:
    """Options of ``globalservices.channel.create``: ``ref_count`` (the channel goes when
    its reference count drops to zero, see ``release_refcnt``) and ``local_opts`` (an object
    or dict with ``capacity`` and ``block_size``)."""

    def __init__(self, *, local_opts=None, ref_count=False, capacity=None, block_size=None):
        self.ref_count = ref_count
        if isinstance(local_opts, dict):
            capacity = local_opts.get("capacity", capacity)
            block_size = local_opts.get("block_size", block_size)
        elif local_opts is not None:
            capacity = getattr(local_opts, "capacity", capacity)
            block_size = getattr(local_opts, "block_size", block_size)
        self.capacity = capacity
        self.block_size = block_size
        self.local_opts = local_opts
