"""DragonHPC's ``dragon.utils``: small helpers its examples import."""

from __future__ import annotations


def host_id() -> int:
    """This node's h_uid."""
    from dragon.globalservices.node import host_id as _host_id

    return _host_id()
