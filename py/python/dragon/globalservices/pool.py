"""DragonHPC's ``dragon.globalservices.pool``: memory pools made by the runtime, named by
m_uid or name, that live until destroyed (or the runtime ends), whoever made them.

A pool is made by this node's agent (``create_pool``) and recorded in the name registry
(kinds ``"gs-pool"``/``"gs-pool-name"``); ``dragon.managed_memory.MemoryPool.attach`` opens
its descriptor's ``sdesc`` in any process of the node.
"""

from __future__ import annotations

import json

from dragon.infrastructure.pool_desc import PoolDescriptor, PoolOptions

__all__ = ["PoolError", "create", "destroy", "get_list", "query"]

_made: list[int] = []  # m_uids of the pools this process made


class PoolError(Exception):
    """No such pool, or a pool operation failed."""


def _agent():
    from dragon import _runtime

    return _runtime.agent()


def _record(m_uid: int) -> dict | None:
    v = _agent().lookup("gs-pool", str(m_uid))
    return None if v is None else json.loads(v)


def _m_uid(identifier: int | str) -> int:
    if isinstance(identifier, str):
        v = _agent().lookup("gs-pool-name", identifier)
        if v is None:
            raise PoolError(f"no pool named {identifier!r}")
        return int(v)
    return int(identifier)


def _desc(rec: dict, state=PoolDescriptor.State.ACTIVE) -> PoolDescriptor:
    from dragon.managed_memory import _SER

    sdesc = f"{_SER}:pool:{rec['segment']}".encode()
    return PoolDescriptor(m_uid=rec["m_uid"], name=rec["name"], node=rec["node"], state=state, sdesc=sdesc)


def create(
    size: int, user_name: str = "", options: PoolOptions | None = None, soft: bool = False
) -> PoolDescriptor:
    """Makes a pool of at least ``size`` usable bytes on this node. ``user_name`` names it
    (``soft``: an existing pool of that name is returned instead of an error)."""
    from dragon.native import machine

    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise PoolError(f"size must be a positive int, not {size!r}")
    a = _agent()
    if user_name and a.lookup("gs-pool-name", user_name) is not None:
        if soft:
            return query(user_name)
        raise PoolError(f"a pool named {user_name!r} exists already")
    try:
        m_uid, segment = a.create_pool(size + (size >> 4) + (1 << 20))  # headers and tables
    except Exception as e:
        raise PoolError(f"could not make a pool of {size} bytes: {e}") from e
    name = user_name or f"dragon_pool_{m_uid}"
    rec = {"m_uid": m_uid, "name": name, "node": machine.my_node_index(), "segment": segment}
    a.register("gs-pool", str(m_uid), json.dumps(rec).encode())
    a.register("gs-pool-name", name, str(m_uid).encode())
    _made.append(m_uid)
    return _desc(rec)


def query(identifier: int | str) -> PoolDescriptor:
    """The descriptor of a pool, by m_uid or name (PoolError if there is none)."""
    rec = _record(_m_uid(identifier))
    if rec is None:
        raise PoolError(f"no pool {identifier!r}")
    return _desc(rec)


def destroy(identifier: int | str) -> PoolDescriptor:
    """Destroys a pool (its memory goes once no process maps it) and forgets it."""
    m = _m_uid(identifier)
    rec = _record(m)
    if rec is None:
        raise PoolError(f"no pool {identifier!r}")
    a = _agent()
    a.destroy_pool(m)
    a.unregister("gs-pool", str(m))
    a.unregister("gs-pool-name", rec["name"])
    return _desc(rec, PoolDescriptor.State.DEAD)


def get_list() -> list[int]:
    """The m_uids of the pools this process made that still exist."""
    return [m for m in _made if _record(m) is not None]
