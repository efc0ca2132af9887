"""DragonHPC's ``dragon.infrastructure.connection``: ``Connection`` and ``Pipe``.

DragonHPC builds them on channels; here they are the "dragon" start method's message-oriented
connections (``dragon._conn``): CPython's ``Connection`` API (``send``/``recv``,
``send_bytes``/``recv_bytes``/``recv_bytes_into``, ``poll``, ``fileno``, ``close``), one
message per packet, large buffers through blocks of the node's pool, and they can be passed to
any process of the node. ``ConnectionOptions`` and ``PipeOptions`` are accepted for
DragonHPC's signatures; they choose channel details that have no counterpart here.
"""

from __future__ import annotations

import enum

from dragon._conn import Connection, DuplexConnection

__all__ = ["Connection", "ConnectionOptions", "DuplexConnection", "Pipe", "PipeOptions"]


class ConnectionOptions:
    """Options of a DragonHPC connection (its channels' pools, sizes and blocking); kept
    for compatibility, with no effect here."""

    class CreationPolicy(enum.Enum):
        """When DragonHPC makes a connection's channels."""

        EARLY = 1
        RECEIVER_CREATES = 2
        SENDER_CREATES = 3
        PRE_CREATED = 4

    def __init__(
        self,
        *,
        creation_policy=None,
        min_block_size=None,
        large_block_size=None,
        huge_block_size=None,
        default_pool=None,
    ):
        self.creation_policy = creation_policy or self.CreationPolicy.EARLY
        self.min_block_size = min_block_size
        self.large_block_size = large_block_size
        self.huge_block_size = huge_block_size
        self.default_pool = default_pool


class PipeOptions:
    """Options of a DragonHPC ``Pipe``; kept for compatibility, with no effect here."""

    CreationPolicy = ConnectionOptions.CreationPolicy

    def __init__(self, *, creation_policy=None, conn_options=None):
        self.creation_policy = creation_policy or self.CreationPolicy.EARLY
        self.conn_options = conn_options or ConnectionOptions()


def Pipe(duplex: bool = True, *, channels=None, options=None):  # noqa: N802 (DragonHPC's name)
    """A pair of connected ``Connection`` objects (``duplex=False``: the receiving end
    first). ``channels`` (DragonHPC's pre-made channels) is not supported: a ValueError."""
    from dragon import _conn

    if channels is not None:
        raise ValueError("Pipe(channels=...) is not supported: the pipe makes its own transport")
    return _conn.Pipe(duplex)
