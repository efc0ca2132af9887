"""Whether this process runs in a runtime of several nodes, from its environment alone (the
launcher sets ``DRAGON_NUM_NODES`` for the driver; every process inherits it). A module of
its own, importing nothing, so that the "dragon" start method asks it in every process for
the price of two environment lookups."""

from __future__ import annotations

import os

NODES_ENV = "DRAGON_NUM_NODES"


def multinode() -> bool:
    """True in a runtime of more than one node."""
    v = os.environ.get(NODES_ENV)
    if not v or v == "1" or not os.environ.get("DRAGON_RUNTIME"):
        return False
    try:
        return int(v) > 1
    except ValueError:
        return False
