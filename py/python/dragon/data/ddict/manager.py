"""A DDict's managers as its clients see them: each is a pool created by the node agent,
an index in it (``dragon._native.Kv``) and a lock for the checkpoint working set."""

from __future__ import annotations

from dataclasses import dataclass, field

from dragon import _native, _remote


@dataclass
class DDictManagerStats:
    """Figures of one manager, as DragonHPC reports them."""

    manager_id: int
    hostname: str
    total_bytes: int
    total_used_bytes: int
    pool_free_space: int
    pool_utilization: float
    num_keys: int
    free_blocks: dict = field(default_factory=dict)
    max_pool_allocations: int = 0
    max_pool_allocations_used: int = 0
    current_pool_allocations_used: int = 0
    timekeeper_stats: dict = field(default_factory=dict)


class _Manager:
    """A client's handle on one manager: its pool, index and checkpoint lock."""

    def __init__(self, m_uid: int, pool_name: str, kv_ref, lock_ref, node: int = 0):
        self.m_uid, self.pool_name, self.kv_ref, self.lock_ref, self.node = (
            m_uid,
            pool_name,
            tuple(kv_ref),
            tuple(lock_ref),
            node,
        )
        far = _remote.node_of_pool(pool_name)
        self.local = far is None
        if far is not None:  # a manager of another node: through its object server
            self.pool = None
            self.kv = _remote.RemoteKv(pool_name, self.kv_ref, far)
            self.lock = _remote.attach("Lock", pool_name, self.lock_ref)
            return
        self.pool = _native.Pool.open(pool_name)
        self.kv = _native.Kv.attach(self.pool, self.kv_ref)
        self.lock = _native.Lock.attach(pool_name, self.lock_ref)

    def put_in_range(self, c: int, key: bytes, parts) -> bool:
        """Stores ``parts`` under ``key`` if checkpoint ``c`` is in the working set (False,
        nothing stored, when it is not): one round trip to a manager of another node."""
        if not self.local:
            return self.kv.put_parts_in_range(c, key, parts)
        old, new = self.kv.chkpt_range()
        if not old <= c <= new:
            return False
        self.kv.put_parts(key, parts)
        return True

    def range_and_get(self, key: bytes):
        """(working set, the block of ``key`` or None), read together: one round trip to a
        manager of another node."""
        if not self.local:
            return self.kv.range_and_get(key)
        return self.kv.chkpt_range(), self.kv.get(key)

    def desc(self) -> tuple:
        return (self.m_uid, self.pool_name, self.kv_ref, self.lock_ref, self.node)
