"""Checkpoint persisters: how retired checkpoints of a DDict reach storage (DragonHPC's
``persister_class``)."""

from __future__ import annotations

import os
import pickle

from dragon.exceptions import DDictError, DDictPersistCheckpointError


class CheckpointPersister:
    """Base of checkpoint persisters (how retired checkpoints reach storage)."""

    def __init__(self, ddict_name: str, persist_path: str, manager_id: int, persist_count: int = 0):
        self.name, self.path, self.manager_id, self.count = (
            ddict_name,
            persist_path,
            manager_id,
            persist_count,
        )

    def dump(self, chkpt_id: int, items: list[tuple[bytes, bytes]]) -> None:
        """Stores a checkpoint's (canonical key, stored value) pairs."""

    def load(self, chkpt_id: int) -> list[tuple[bytes, bytes]]:
        """The pairs of a persisted checkpoint."""
        raise DDictPersistCheckpointError(f"checkpoint {chkpt_id} was not persisted")

    def ids(self) -> list[int]:
        """Persisted checkpoint ids, oldest first."""
        return []


class NULLCheckpointPersister(CheckpointPersister):
    """Persists nothing (DragonHPC's default)."""


class PosixCheckpointPersister(CheckpointPersister):
    """One file per manager and checkpoint under ``persist_path``:
    ``<name>_<manager>_<chkpt>.dat`` (a pickle of the stored bytes)."""

    def _file(self, chkpt_id: int) -> str:
        return os.path.join(self.path or ".", f"{self.name}_{self.manager_id}_{chkpt_id}.dat")

    def dump(self, chkpt_id, items):
        os.makedirs(self.path or ".", exist_ok=True)
        tmp = self._file(chkpt_id) + ".tmp"
        with open(tmp, "wb") as f:
            pickle.dump(items, f, protocol=5)
        os.replace(tmp, self._file(chkpt_id))
        if self.count > 0:
            for old in self.ids()[: -self.count]:
                os.unlink(self._file(old))

    def load(self, chkpt_id):
        try:
            with open(self._file(chkpt_id), "rb") as f:
                return pickle.load(f)
        except FileNotFoundError:
            raise DDictPersistCheckpointError(f"checkpoint {chkpt_id} was not persisted") from None

    def ids(self):
        prefix = f"{self.name}_{self.manager_id}_"
        try:
            names = os.listdir(self.path or ".")
        except FileNotFoundError:
            return []
        out = []
        for n in names:
            if n.startswith(prefix) and n.endswith(".dat"):
                try:
                    out.append(int(n[len(prefix) : -4]))
                except ValueError:
                    pass
        return sorted(out)


class DAOSCheckpointPersister(CheckpointPersister):
    """DragonHPC's DAOS persister: DAOS is not supported here (use PosixCheckpointPersister)."""

    def __init__(self, *args, **kwargs):
        raise DDictError("DAOSCheckpointPersister needs DAOS, which Dragon-RS does not support")
