"""DragonHPC's ``dragon.globalservices.channel``: channels made in a pool named by m_uid
(the node's default pool, ``facts.default_pool_muid_from_index(index)``, or one of
``globalservices.pool``), found by c_uid or name from any process of the node.

A channel is a ``dragon.channels.Channel``; it is recorded in the name registry (kinds
``"gs-channel"``/``"gs-channel-name"``) with its serialized descriptor, reference count and
state. It lives until ``destroy`` (or its reference count drops to zero with
``release_refcnt``), or until the process that made it exits (as every channel of
``dragon.channels``). Channels live in one node's memory: a pool of another node is a clear
error.
"""

from __future__ import annotations

import json
import time

from dragon.infrastructure import facts
from dragon.infrastructure.channel_desc import ChannelDescriptor, ChannelOptions

__all__ = [
    "ChannelError",
    "create",
    "destroy",
    "get_list",
    "get_refcnt",
    "join",
    "query",
    "release_refcnt",
    "wait",
]

_made: dict[int, object] = {}  # c_uid -> the Channel this process made (kept open)
ACTIVE, DEAD = ChannelDescriptor.State.ACTIVE, ChannelDescriptor.State.DEAD


class ChannelError(Exception):
    """No such channel, or a channel operation failed."""


def _agent():
    from dragon import _runtime

    return _runtime.agent()


def _pool(m_uid: int):
    from dragon.globalservices import pool as gspool
    from dragon.managed_memory import MemoryPool
    from dragon.native import machine

    me = machine.my_node_index()
    if m_uid == facts.default_pool_muid_from_index(me):
        return MemoryPool.attach_default()
    if facts.FIRST_DEFAULT_MUID <= m_uid < facts.FIRST_DEFAULT_MUID + (1 << 20):
        raise ChannelError(
            f"m_uid {m_uid} is node {m_uid - facts.FIRST_DEFAULT_MUID}'s default pool: a channel is "
            f"made in a pool of its own node ({me})"
        )
    try:
        d = gspool.query(m_uid)
    except gspool.PoolError:
        raise ChannelError(f"no pool with m_uid {m_uid}") from None
    if d.node != me:
        raise ChannelError(
            f"pool {m_uid} lives on node {d.node}: a channel is made in a pool of its own node"
        )
    return MemoryPool.attach(d.sdesc)


def _c_uid(identifier: int | str) -> int:
    if isinstance(identifier, str):
        v = _agent().lookup("gs-channel-name", identifier)
        if v is None:
            raise ChannelError(f"no channel named {identifier!r}")
        return int(v)
    return int(identifier)


def _record(c_uid: int) -> dict | None:
    v = _agent().lookup("gs-channel", str(c_uid))
    return None if v is None else json.loads(v)


def _save(rec: dict) -> None:
    _agent().register("gs-channel", str(rec["c_uid"]), json.dumps(rec).encode(), replace=True)


def _desc(rec: dict) -> ChannelDescriptor:
    state = ChannelDescriptor.State(rec["state"])
    if state is ACTIVE:
        from dragon.channels import Channel
        from dragon.channels import ChannelError as ChError

        try:  # its maker exited (or it was destroyed outside this API): it is gone
            Channel.attach(rec["sdesc"].encode()).detach()
        except ChError:
            state = DEAD
    return ChannelDescriptor(
        rec["m_uid"], rec["c_uid"], rec["name"], rec["node"], state, rec["sdesc"].encode()
    )


def create(
    m_uid, user_name="", options=None, soft=False, puid_override=None, policy=None
) -> ChannelDescriptor:
    """Makes a channel in the pool ``m_uid`` of this node. ``user_name`` names it (``soft``:
    an existing channel of that name is returned instead of an error); ``options``
    (``ChannelOptions``) sets capacity, block size and reference counting."""
    from dragon.channels import Channel
    from dragon.native import machine

    a = _agent()
    if user_name and a.lookup("gs-channel-name", user_name) is not None:
        if soft:
            return query(user_name)
        raise ChannelError(f"a channel named {user_name!r} exists already")
    opts = options if options is not None else ChannelOptions()
    mem = _pool(int(m_uid))
    c_uid = a.new_id("c_uid")
    try:
        ch = Channel(
            mem, c_uid, block_size=getattr(opts, "block_size", None), capacity=getattr(opts, "capacity", None)
        )
    except Exception as e:
        raise ChannelError(f"could not make a channel in pool {m_uid}: {e}") from e
    name = user_name or f"dragon_channel_{c_uid}"
    rec = {
        "m_uid": int(m_uid),
        "c_uid": c_uid,
        "name": name,
        "node": machine.my_node_index(),
        "state": ACTIVE.value,
        "sdesc": ch.serialize().decode(),
        "refcnt": 1 if getattr(opts, "ref_count", False) else 0,
    }
    _save(rec)
    a.register("gs-channel-name", name, str(c_uid).encode())
    _made[c_uid] = ch
    return _desc(rec)


def query(identifier: int | str, *, inc_refcnt: bool = False) -> ChannelDescriptor:
    """The descriptor of a channel, by c_uid or name (``inc_refcnt``: one more reference)."""
    c = _c_uid(identifier)
    rec = _record(c)
    if rec is None:
        raise ChannelError(f"no channel {identifier!r}")
    if inc_refcnt:
        rec["refcnt"] += 1
        _save(rec)
    return _desc(rec)


def wait_for(identifier, predicate, timeout=None, tries=1, interval=0.1):
    """Queries the channel until ``predicate(descriptor)`` holds (or ``timeout`` passes:
    TimeoutError); returns the descriptor."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            d = query(identifier)
            if predicate(d):
                return d
        except ChannelError:
            pass
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"channel {identifier!r}: condition not met in {timeout} s")
        time.sleep(interval)


def wait(identifier, state=DEAD, **kwds) -> ChannelDescriptor:
    """Waits until the channel is in ``state`` (default: DEAD)."""
    return wait_for(identifier, lambda d: d.state == state, **kwds)


def join(identifier: int | str, timeout: float | None = None) -> ChannelDescriptor:
    """Waits until a channel of that name (or c_uid) exists and returns its descriptor
    (TimeoutError after ``timeout`` seconds)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    pause = 0.001
    while True:
        try:
            return query(identifier)
        except ChannelError:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"no channel {identifier!r} after {timeout} s") from None
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


def destroy(identifier: int | str, *, just_decref: bool = False) -> None:
    """Destroys a channel: every blocked and later send or receive raises
    ``ChannelDestroyed``. ``just_decref``: drops one reference, and destroys only at zero."""
    from dragon.channels import Channel
    from dragon.channels import ChannelError as ChError

    c = _c_uid(identifier)
    rec = _record(c)
    if rec is None:
        raise ChannelError(f"no channel {identifier!r}")
    if just_decref:
        rec["refcnt"] = max(0, rec["refcnt"] - 1)
        if rec["refcnt"] > 0:
            _save(rec)
            return
    if rec["state"] == ACTIVE.value:
        ch = _made.pop(c, None)
        try:
            (ch if ch is not None else Channel.attach(rec["sdesc"].encode())).destroy()
        except ChError:
            pass  # gone with its maker already
    rec["state"] = DEAD.value
    _save(rec)
    _agent().unregister("gs-channel-name", rec["name"])


def get_refcnt(identifier: int | str) -> int:
    """The channel's reference count."""
    rec = _record(_c_uid(identifier))
    if rec is None:
        raise ChannelError(f"no channel {identifier!r}")
    return rec["refcnt"]


def release_refcnt(identifier: int | str) -> None:
    """Drops one reference; the channel is destroyed at zero."""
    destroy(identifier, just_decref=True)


def get_list() -> list[int]:
    """The c_uids of the live channels this process made."""
    return [c for c, ch in _made.items() if _record(c) is not None]
