"""A DDict's checkpoints (DragonHPC's model) and their persistence.

Each client has a checkpoint id; ``checkpoint()`` moves it forward, ``rollback()`` back.
Each manager keeps a working set of at most ``working_set_size`` checkpoints; writing to a
newer one advances the set and retires the oldest (its keys move forward unless a newer
checkpoint has them; with a persister, the retired checkpoint is written out every
``persist_freq`` checkpoints). ``persist()`` writes the client's checkpoint now,
``restore(c)`` brings a persisted one back.
"""

from __future__ import annotations

import time

from dragon import _parts
from dragon.exceptions import (
    DDictCheckpointSyncError,
    DDictError,
    DDictPersistCheckpointError,
    DDictTimeoutError,
)

from .encoding import _CHK, _PERSIST, _TOMB, _tag
from .manager import _Manager
from .persister import NULLCheckpointPersister

# Longest single wait on a manager's change count: a remote wait holds a thread of the
# manager node's object server, which a client that went away must not keep for long.
WAIT_SLICE = 1.0


def _wait_change(m: _Manager, seen: int, deadline: float | None) -> bool:
    """Sleeps until manager ``m``'s index changed since ``seen`` (a put, a removal, a move of
    its working set), at most until ``deadline``: False once the deadline passed."""
    while True:
        left = WAIT_SLICE if deadline is None else min(WAIT_SLICE, deadline - time.monotonic())
        if left <= 0:
            return False
        if m.kv.wait_change(seen, left):
            return True


class _Checkpoints:
    """The checkpoint methods of ``DDict`` (a base class of it). They use the DDict's
    managers (``_mgrs``, ``_live()``), options (``_opts``: persister, persist_freq, ...),
    ``_timeout``, this client's ``_chkpt`` and ``_batch``, ``_wfk`` (wait_for_keys), ``_ws``
    (working_set_size) and ``_visible``."""

    def _advance(self, m: _Manager, c: int) -> None:
        """Makes checkpoint ``c`` part of ``m``'s working set (writers only)."""
        old, new = m.kv.chkpt_range()
        if old <= c <= new:
            return
        if c < old:
            raise DDictCheckpointSyncError(
                f"checkpoint {c} was retired from manager {self._mgrs.index(m)}'s working set ({old}..{new})"
            )
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        while True:
            seen = m.kv.changes()  # before looking: a write after this wakes the wait below
            with m.lock:
                old, new = m.kv.chkpt_range()
                while new < c:
                    if new + 1 - old + 1 > self._ws:
                        if not self._retirable(m, old):
                            break
                        self._retire(m, old)
                        old += 1
                    new += 1
                    m.kv.set_chkpt_range(old, new)
                if new >= c:
                    return
            # wait_for_keys: the oldest checkpoint still has keys the next one lacks.
            if not _wait_change(m, seen, deadline):
                raise DDictTimeoutError(
                    f"timed out waiting for checkpoint {old} to be complete so that checkpoint {c} can begin"
                )

    def _retirable(self, m: _Manager, o: int) -> bool:
        """With wait_for_keys, checkpoint ``o`` may retire only once every non-persistent key
        written in it has been written in ``o + 1`` too."""
        if not self._wfk:
            return True
        prefix, nxt = _CHK.pack(o), _CHK.pack(o + 1)
        for ik in m.kv.keys():
            if ik.startswith(prefix):
                b = m.kv.get(ik)
                if b is not None and not (_tag(b) & _PERSIST) and _tag(b) != _TOMB[0]:
                    if not m.kv.contains(nxt + ik[8:]):
                        return False
        return True

    def _retire(self, m: _Manager, o: int) -> None:
        """Retires checkpoint ``o``: keys move forward to ``o + 1`` unless it has them
        (with wait_for_keys only persistent ones); tombstones go."""
        prefix = _CHK.pack(o)
        items = []
        persister = self._persister(m)
        for ik in m.kv.keys():
            if not ik.startswith(prefix):
                continue
            kb = ik[8:]
            blk = m.kv.get(ik)
            if blk is None:
                continue
            tag = _tag(blk)
            if persister is not None:
                items.append((kb, bytes(blk)))
            keep = tag != _TOMB[0] and (not self._wfk or tag & _PERSIST)
            if keep:
                m.kv.rekey(ik, _CHK.pack(o + 1) + kb)
            else:
                m.kv.remove(ik)
        freq = self._opts["persist_freq"]
        if persister is not None and freq and o % freq == 0:
            persister.dump(o, items)

    def _persister(self, m: _Manager):
        cls = self._opts["persister"]
        if cls is NULLCheckpointPersister or cls is None:
            return None
        return cls(
            self._opts["name"] or "ddict",
            self._opts["persist_path"],
            self._mgrs.index(m),
            self._opts["persist_count"],
        )

    def checkpoint(self) -> None:
        """Moves this client to the next checkpoint."""
        if self._batch is not None:
            raise DDictError("Could not proceed checkpoint during batch put.")
        self._chkpt += 1

    def rollback(self) -> None:
        """Moves this client to the previous checkpoint (not below 0)."""
        if self._batch is not None:
            raise DDictError("Could not rollback checkpoint during batch put.")
        self._chkpt = max(0, self._chkpt - 1)

    def sync_to_newest_checkpoint(self) -> None:
        """Moves this client to the newest checkpoint of any manager."""
        mgrs = self._live() if self._chosen is None else [self._live()[self._chosen]]
        self._chkpt = max(m.kv.chkpt_range()[1] for m in mgrs)

    @property
    def checkpoint_id(self) -> int:
        """This client's checkpoint."""
        return self._chkpt

    @checkpoint_id.setter
    def checkpoint_id(self, chkpt_id: int) -> None:
        self._chkpt = int(chkpt_id)

    @property
    def current_checkpoint_id(self) -> int:
        """This client's checkpoint (an alias)."""
        return self._chkpt

    @property
    def wait_for_keys(self) -> bool:
        """Whether only pput keys persist across checkpoints."""
        return self._wfk

    def persist(self) -> None:
        """Writes this client's current checkpoint to the persister now."""
        cls = self._opts["persister"]
        if cls is NULLCheckpointPersister:
            raise DDictPersistCheckpointError("this DDict has no persister (persister_class)")
        c = self._chkpt
        for m in self._live():
            items = [(kb, bytes(m.kv.get(ik))) for mm, kb, ik in self._visible([m]) if mm is m]
            self._persister(m).dump(c, items)

    def persisted_ids(self) -> list[int]:
        """Checkpoints every manager has persisted."""
        cls = self._opts["persister"]
        if cls is NULLCheckpointPersister:
            return []
        sets = [set(self._persister(m).ids()) for m in self._live()]
        return sorted(set.intersection(*sets)) if sets else []

    def restore(self, chkpt: int) -> None:
        """Loads persisted checkpoint ``chkpt`` into the working set and moves there."""
        if self._batch is not None:
            raise DDictError("Restoring checkpoint during batch put is invalid.")
        if chkpt not in self.persisted_ids():
            raise DDictPersistCheckpointError(f"checkpoint {chkpt} was not persisted by every manager")
        self._restore(chkpt)

    def _restore(self, chkpt: int) -> None:
        for m in self._live():
            items = self._persister(m).load(chkpt)
            was_frozen = m.kv.frozen
            m.kv.set_frozen(False)
            m.kv.clear()
            m.kv.set_chkpt_range(chkpt, chkpt)
            for kb, stored in items:
                mv = memoryview(stored)
                m.kv.put_parts(_CHK.pack(chkpt) + kb, _parts.split(mv))
            m.kv.set_frozen(was_frozen)
        self._chkpt = chkpt

    def advance(self) -> None:
        """Read-only replay: moves to the next persisted checkpoint."""
        later = [i for i in self.persisted_ids() if i > self._chkpt]
        if not later:
            raise DDictPersistCheckpointError("no later persisted checkpoint")
        self._restore(later[0])
