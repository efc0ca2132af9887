# ruff: noqa: E501  (DragonHPC's argument-check messages are kept whole, one per line)
"""DragonHPC's distributed dictionary, on the runtime's shared memory.

Layout: a DDict has ``managers_per_node * n_nodes`` managers (or ``len(policy) *
managers_per_policy``). Each manager owns a pool of ``total_mem / managers`` bytes, created by
the node agent (so it lives as long as the runtime, or until ``destroy()``), and an index in
that pool (``dragon._native.Kv``: a hash map in shared memory). A key goes to manager
``stable_hash(canonical key bytes) % managers``; canonical bytes are ``str``, ``int`` and
``bytes`` by value and other keys by their pickle, so every process and node agrees.

A client on the manager's node writes the value straight into the manager's pool (one copy:
pickle protocol 5, out-of-band buffers such as NumPy data copied once next to the pickle)
and commits it in the index. A get returns objects rebuilt around read-only views of the
stored block: a NumPy value is a read-only ndarray viewing the manager's memory, two gets
share memory, and the view stays valid after the key is replaced or deleted (the block goes
when the last view does, or when the process holding it dies).

Checkpoints (DragonHPC's model): each client has a checkpoint id; ``checkpoint()`` moves it
forward, ``rollback()`` back. Each manager keeps a working set of at most
``working_set_size`` checkpoints; writing to a newer one advances the set and retires the
oldest (its keys move forward unless a newer checkpoint has them). A get at checkpoint c
sees the newest value written at or before c. With ``wait_for_keys``, only keys written
with ``pput`` persist across checkpoints; a get at c for another key waits until it is
written at c.

This module holds the client, ``DDict``; the rest of the package: ``manager`` (a client's
handle on a manager), ``encoding`` (canonical key bytes, stored values), ``checkpoints``
(the working set, retiring, persisting and restoring), ``persister`` (checkpoint
persisters), ``extras`` (DragonHPC's methods beyond the dict protocol), ``views`` (what
``keys()``/``values()``/``items()`` return), ``filtering`` (``filter``'s process tree). The DDict errors are part of ``dragon.exceptions``; every name is importable
from here and from ``dragon.data.ddict``.
"""

from __future__ import annotations

import base64
import os
import pickle
import socket
import time

from dragon import _native, _remote, _runtime
from dragon.exceptions import (
    DDictCheckpointSyncError,
    DDictError,
    DDictFrozenError,
    DDictFullError,
    DDictFutureCheckpointError,
    DDictKeyError,
    DDictPersistCheckpointError,
    DDictSyncError,
    DDictTimeoutError,
    DDictUnableToCreateError,
)

from .checkpoints import _Checkpoints, _wait_change
from .encoding import _CHK, _PERSIST, _TOMB, _key_bytes, _key_of, _tag, _value_of, _value_parts
from .extras import _Extras
from .filtering import FilterContextManager, FilterIterator
from .manager import DDictManagerStats, _Manager
from .persister import (
    CheckpointPersister,
    DAOSCheckpointPersister,
    NULLCheckpointPersister,
    PosixCheckpointPersister,
)
from .views import DDictItemsView, DDictKeysView, DDictMappingProxy, DDictValuesView

__all__ = [
    "DDict",
    "DDictError",
    "DDictSyncError",
    "DDictFullError",
    "DDictFrozenError",
    "DDictTimeoutError",
    "DDictPersistCheckpointError",
    "DDictKeyError",
    "DDictCheckpointSyncError",
    "DDictUnableToCreateError",
    "DDictFutureCheckpointError",
    "DDictManagerStats",
    "CheckpointPersister",
    "NULLCheckpointPersister",
    "PosixCheckpointPersister",
    "DAOSCheckpointPersister",
    "DDICT_MIN_SIZE",
    "DDictKeysView",
    "DDictValuesView",
    "DDictItemsView",
    "DDictMappingProxy",
    "FilterContextManager",
    "FilterIterator",
]

DDICT_MIN_SIZE = 3 * 1024**2
DDICT_DEFAULT_TIMEOUT = None
_POOL_OVERHEAD = 1 << 20


class DDict(_Checkpoints, _Extras):
    """A dictionary spread over managers in shared memory (DragonHPC's DDict API)."""

    def __init__(
        self,
        managers_per_node: int | None = 1,
        n_nodes: int | None = 1,
        total_mem: int = DDICT_MIN_SIZE,
        *,
        working_set_size: int = 1,
        wait_for_keys: bool = False,
        wait_for_writers: bool = False,
        policy=None,
        managers_per_policy: int = 1,
        orc_policy=None,
        persist_freq: int = 0,
        name: str = "",
        timeout: float | None = DDICT_DEFAULT_TIMEOUT,
        trace: bool = False,
        restart: bool = False,
        read_only: bool = False,
        restore_from: int | None = None,
        persist_count: int = 0,
        persist_path: str = "",
        persister_class: type = NULLCheckpointPersister,
        streams_per_manager: int = 5,
        manager_pool_full_thresh: float = 0.9,
    ):
        # DragonHPC's argument checks, with its exception types.
        if read_only:
            if not name:
                raise AttributeError(
                    "When creating a read-only Dragon Distributed Dict you must provide the name to restore the dictionary."
                )
            if restore_from is None:
                raise AttributeError(
                    "When creating a read-only Dragon Distributed Dict you must provide the checkpoint ID to restore from."
                )
            if wait_for_keys or wait_for_writers:
                raise AttributeError(
                    "When creating a read-only Dragon Distributed Dict, specifying wait_for_keys or wait_for_writers is invalid."
                )
            if working_set_size != 1:
                raise AttributeError(
                    "When creating a read-only Dragon Distributed Dict, working set size should be 1."
                )
            if persist_count != 0:
                raise AttributeError(
                    "When creating a read-only Dragon Distributed Dict, specifying a non-zero persist count is invalid."
                )
        if restore_from is not None:
            if not name:
                raise AttributeError(
                    "When restoring from a checkpoint in Dragon Distributed Dict you must provide the name to restore the dictionary."
                )
        elif persister_class is NULLCheckpointPersister and persist_freq != 0:
            raise AttributeError(
                "When using NULLCheckpointPersister, specifying a non-zero persist_freq is invalid."
            )
        if not isinstance(working_set_size, int) or working_set_size < 1:
            raise ValueError("The working set size of a DDict cannot be less than 1.")
        if working_set_size == 1 and (wait_for_keys or wait_for_writers):
            raise ValueError(
                "The working set size must be greater than one when specifying wait_for_keys or wait_for_writers."
            )
        if persist_freq < 0:
            raise ValueError("Persist frequency should be non-negative.")
        if persist_count < -1:
            raise ValueError("Persist count should be greater or equal to -1.")
        if type(managers_per_node) is not int and type(managers_per_policy) is not int:
            raise AttributeError(
                "When creating a Dragon Distributed Dict you must provide managers_per_node or managers_per_policy."
            )
        if type(total_mem) is not int:
            raise AttributeError("When creating a Dragon Distributed Dict you must provide total_mem.")
        if type(policy) is not list and type(n_nodes) is not int:
            raise AttributeError(
                "When creating a Dragon Distributed Dict if you provide a single policy you must provide n_nodes."
            )
        if type(policy) is list and (n_nodes is not None or managers_per_node is not None):
            raise AttributeError(
                "When creating a Dragon Distributed Dict if you provide a list of policies you must provide n_nodes = None and managers_per_node=None."
            )
        if restart and policy is not None:
            raise AttributeError(
                "When restarting a Dragon Distributed Dict if you specified restart you must not provide policy."
            )
        if isinstance(policy, list):
            if not policy:
                raise AttributeError(
                    "When creating a Dragon Distributed Dict if you provide a list of policies you must provide at least one policy in the list."
                )
            n = len(policy) * managers_per_policy
        else:
            if managers_per_node < 1 or n_nodes < 1:
                raise ValueError("managers_per_node and n_nodes must be at least 1")
            n = managers_per_node * n_nodes
        if total_mem <= 0:
            raise ValueError("total_mem must be positive")
        if timeout is not None and timeout < 0:
            raise ValueError("timeout must be None or non-negative")

        agent = _runtime.agent()
        self._empty: list[int] = []
        if restart:
            if not name:
                raise AttributeError("restart=True needs the name of the DDict to bring back")
            old = agent.lookup("ddict", name)
            if old is not None:
                # Still alive in this runtime (destroyed with allow_restart): attach to it.
                self._init_from(pickle.loads(old), timeout, creator=True)
                return
            if persister_class is NULLCheckpointPersister:
                persister_class = PosixCheckpointPersister
        if not name:
            import secrets

            name = secrets.token_hex(5)  # DragonHPC names every DDict
        self._opts = {
            "name": name,
            "n": n,
            "working_set_size": working_set_size,
            "wait_for_keys": wait_for_keys,
            "wait_for_writers": wait_for_writers,
            "persist_freq": persist_freq,
            "persist_count": persist_count,
            "persist_path": persist_path,
            "persister": persister_class,
            "read_only": read_only,
            "total_mem": total_mem,
        }
        per = max(total_mem // n, 1 << 20)
        nodes = _manager_nodes(n, managers_per_node, n_nodes, policy, managers_per_policy)
        here = _my_node()
        made = []
        try:
            for node in nodes:
                m_uid, pname = agent.create_pool(per + _POOL_OVERHEAD, None if node == here else node)
                made.append(m_uid)
                if node != here:  # the index and lock are made on the manager's node
                    kv_ref, lock_ref = _remote.make_manager(node, pname)
                    made[-1] = (m_uid, pname, kv_ref, lock_ref, node)
                    continue
                pool = _native.Pool.open(pname)
                kv = _native.Kv.create(pool)
                lock = _native.Lock(pool)
                # The lock lives as long as the manager, not as long as some handle on it.
                _native.Block.attach(pool, lock.ref).keep()
                made[-1] = (m_uid, pname, kv.ref, lock.ref, node, kv, lock)
        except Exception as e:
            for m in made:
                try:
                    agent.destroy_pool(m if isinstance(m, int) else m[0])
                except Exception:
                    pass
            if isinstance(e, (MemoryError, OSError, DDictFullError)):
                raise DDictUnableToCreateError(f"cannot create the DDict's managers: {e}") from e
            raise
        desc = {
            "v": 1,
            "opts": self._opts,
            "managers": [m[:5] for m in made],
            "rt": os.environ.get("DRAGON_RUNTIME"),
        }
        if name:
            try:
                agent.register("ddict", name, pickle.dumps(desc))
            except KeyError:
                for m in made:
                    agent.destroy_pool(m[0])
                raise DDictError(f"a DDict named {name!r} already exists in this runtime") from None
        self._init_from(desc, timeout, creator=True)
        if restart or restore_from is not None:
            chk = restore_from
            if chk is None:
                ids = self.persisted_ids()
                chk = ids[-1] if ids else None
            if chk is not None:
                self._restore(chk)
            elif restart:
                self._empty = list(range(n))  # nothing to bring back: every manager starts empty
            if read_only:
                for m in self._mgrs:
                    m.kv.set_frozen(True)

    # ----- construction and lifetime ------------------------------------------------------

    def _init_from(self, desc: dict, timeout, creator: bool = False) -> None:
        self._desc = desc
        self._opts = desc["opts"]
        self._mgrs = [_Manager(*m) for m in desc["managers"]]
        self._n = len(self._mgrs)
        self._timeout = timeout
        self._chkpt = 0
        self._chosen: int | None = None
        self._batch: bool | None = None
        self._creator = creator
        self._destroyed = False
        self._key_pickler = None
        self._value_pickler = None
        local = [i for i, m in enumerate(self._mgrs) if m.local] or list(range(self._n))
        self._main = local[os.getpid() % len(local)]
        self._wfk = self._opts["wait_for_keys"]
        self._ws = self._opts["working_set_size"]
        if not hasattr(self, "_empty"):
            self._empty = []

    def serialize(self) -> str:
        """A string another process can ``attach`` with."""
        return base64.b64encode(pickle.dumps(self._desc)).decode()

    @classmethod
    def attach(cls, serialized_dict: str, *, timeout: float | None = None, trace: bool = False) -> DDict:
        """Attaches to the DDict ``serialized_dict`` (from ``serialize()``)."""
        try:
            desc = pickle.loads(base64.b64decode(serialized_dict))
        except Exception as e:
            raise DDictError(f"not a serialized DDict: {e}") from None
        d = cls.__new__(cls)
        try:
            d._init_from(desc, timeout)
        except FileNotFoundError:
            raise DDictError("the DDict no longer exists (destroyed, or its runtime ended)") from None
        return d

    def __getstate__(self):
        return {"s": self.serialize(), "t": self._timeout, "c": self._chkpt, "m": self._chosen}

    def __setstate__(self, state):
        d = DDict.attach(state["s"], timeout=state["t"])
        self.__dict__.update(d.__dict__)
        self._chkpt, self._chosen = state["c"], state["m"]

    def detach(self) -> None:
        """Drops this process's handles (the DDict stays for others)."""
        for m in self._mgrs:
            m.kv.detach()
        self._mgrs = []

    def destroy(self, allow_restart: bool = False) -> None:
        """Frees every value and manager. With a persister and ``allow_restart``, the
        current checkpoint is persisted first so ``restart=True`` can bring it back."""
        if self._destroyed:
            return
        if allow_restart:
            # The data stays (in this runtime: its pools; for a later runtime: the persister's
            # files) so that DDict(..., name=..., restart=True) brings it back.
            if self._opts["persister"] is not NULLCheckpointPersister:
                self.persist()
            self.detach()
            self._destroyed = True
            return
        agent = _runtime.agent()
        for m in self._mgrs:
            try:
                m.kv.destroy()
            except Exception:
                pass
            try:
                agent.destroy_pool(m.m_uid)
            except Exception:
                pass
        if self._opts["name"]:
            try:
                agent.unregister("ddict", self._opts["name"])
            except Exception:
                pass
        self._mgrs = []
        self._destroyed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.detach()

    def _live(self) -> list:
        if not self._mgrs:
            raise DDictError("this DDict handle was destroyed or detached")
        return self._mgrs

    # ----- placement ------------------------------------------------------------------------

    def _place(self, key) -> tuple[_Manager, bytes]:
        kb = _key_bytes(key, self._key_pickler)
        mgrs = self._live()
        if self._chosen is not None:
            return mgrs[self._chosen], kb
        return mgrs[_native.stable_hash(kb) % self._n], kb

    def which_manager(self, key: object) -> int:
        """Index of the manager a put of ``key`` goes to."""
        kb = _key_bytes(key, self._key_pickler)
        return self._chosen if self._chosen is not None else _native.stable_hash(kb) % self._n

    def manager(self, id: int) -> DDict:
        """A handle whose operations all go to manager ``id``."""
        if not isinstance(id, int) or id < 0 or id >= self._n:
            raise DDictError(f"The value {id} is not a valid manager id.")
        d = DDict.attach(self.serialize(), timeout=self._timeout)
        d._chosen, d._chkpt = id, self._chkpt
        d._key_pickler, d._value_pickler = self._key_pickler, self._value_pickler
        return d

    def pickler(self, key_pickler=None, value_pickler=None) -> DDict:
        """A handle that (de)serialises keys and values with the given picklers."""
        d = DDict.attach(self.serialize(), timeout=self._timeout)
        d._chosen, d._chkpt = self._chosen, self._chkpt
        d._key_pickler, d._value_pickler = key_pickler, value_pickler
        return d

    # ----- checkpoints and persistence: the base class _Checkpoints (checkpoints.py) ----------

    # ----- the dict protocol ----------------------------------------------------------------

    def _put(self, key, value, persistent: bool) -> None:
        if self._opts.get("read_only"):
            raise DDictError("the DDict is read-only")
        m, kb = self._place(key)
        parts = _value_parts(value, persistent or bool(self._batch), self._value_pickler)
        c = self._chkpt
        if m.put_in_range(c, _CHK.pack(c) + kb, parts):
            return  # the common case: c is in the working set (one round trip to a far manager)
        self._advance(m, c)
        m.kv.put_parts(_CHK.pack(c) + kb, parts)

    def __setitem__(self, key, value) -> None:
        self._put(key, value, False)

    def pput(self, key, value) -> None:
        """A put whose key persists across checkpoints."""
        self._put(key, value, True)

    def _lookup(self, m: _Manager, kb: bytes):
        """The block visible at this client's checkpoint, or None."""
        c = self._chkpt
        if c == 0 and not self._wfk:
            (old, _), b = m.range_and_get(_CHK.pack(0) + kb)
            if old == 0:
                return None if b is None or _tag(b) == _TOMB[0] else b
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        while True:
            seen = m.kv.changes()  # before looking: a write after this wakes the wait below
            old, new = m.kv.chkpt_range()
            if c < old:
                raise DDictCheckpointSyncError(
                    f"checkpoint {c} was retired from the working set ({old}..{new})"
                )
            for cc in range(min(c, new), old - 1, -1):
                b = m.kv.get(_CHK.pack(cc) + kb)
                if b is None:
                    continue
                tag = _tag(b)
                if tag == _TOMB[0]:
                    return None
                if cc == c or not self._wfk or tag & _PERSIST:
                    return b
                break  # a non-persistent key from an older checkpoint: wait for c's
            else:
                if not self._wfk:
                    return None
                # wait_for_keys: a key not written yet is waited for (as DragonHPC does)
            if not _wait_change(m, seen, deadline):
                raise DDictTimeoutError(f"timed out waiting for the key to be written in checkpoint {c}")

    def __getitem__(self, key):
        m, kb = self._place(key)
        b = self._lookup(m, kb)
        if b is None:
            return self.__missing__(key)
        return _value_of(b, self._value_pickler)

    def __missing__(self, key, *, err=None):
        """Called by ``d[key]`` for a key that is not there; raises DDictKeyError (a
        KeyError). A subclass may return a value instead, as with ``dict``; as in DragonHPC,
        ``get`` goes through ``d[key]`` and so through this hook too."""
        raise DDictKeyError(key)

    def get(self, key, default=None):
        """The value of ``key``, or ``default``."""
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key) -> bool:
        m, kb = self._place(key)
        c = self._chkpt
        old, new = m.kv.chkpt_range()
        if c < old:
            raise DDictCheckpointSyncError(f"checkpoint {c} was retired from the working set ({old}..{new})")
        if c == 0:
            b = m.kv.get(_CHK.pack(0) + kb)
            return b is not None and _tag(b) != _TOMB[0]
        for cc in range(min(c, new), old - 1, -1):
            b = m.kv.get(_CHK.pack(cc) + kb)
            if b is not None:
                tag = _tag(b)
                return tag != _TOMB[0] and (cc == c or not self._wfk or bool(tag & _PERSIST))
        return False

    def __delitem__(self, key) -> None:
        m, kb = self._place(key)
        c = self._chkpt
        if c == 0 and m.kv.chkpt_range() == (0, 0):
            if not m.kv.remove(_CHK.pack(0) + kb):
                raise DDictKeyError(key)
            return
        if key not in self:
            raise DDictKeyError(key)
        self._advance(m, c)
        m.kv.remove(_CHK.pack(c) + kb)
        old, _ = m.kv.chkpt_range()
        if any(m.kv.contains(_CHK.pack(cc) + kb) for cc in range(old, c)):
            m.kv.put_parts(_CHK.pack(c) + kb, [_TOMB])  # masks the older checkpoints' value

    def pop(self, key, default: object = None):
        """Removes ``key`` and returns its value (``default`` when absent... DragonHPC raises
        DDictKeyError when no default is given)."""
        m, kb = self._place(key)
        if self._chkpt == 0 and m.kv.chkpt_range() == (0, 0):
            b = m.kv.take(_CHK.pack(0) + kb)
            if b is None:
                if default is not None:
                    return default
                raise DDictKeyError(key)
            return _value_of(b, self._value_pickler)
        try:
            v = self[key]
        except KeyError:
            if default is not None:
                return default
            raise
        del self[key]
        return v

    def _visible(self, mgrs) -> list[tuple[_Manager, bytes, bytes]]:
        """(manager, canonical key, index key) of every key visible at this checkpoint."""
        c = self._chkpt
        out = []
        for m in mgrs:
            best: dict[bytes, tuple[int, bytes]] = {}
            old, new = m.kv.chkpt_range()
            for ik in m.kv.keys():
                cc = _CHK.unpack_from(ik)[0]
                if cc > c or cc < old:
                    continue
                kb = ik[8:]
                if kb not in best or best[kb][0] < cc:
                    best[kb] = (cc, ik)
            for kb, (cc, ik) in best.items():
                if c == 0 and cc == 0 and not self._wfk:
                    out.append((m, kb, ik))
                    continue
                b = m.kv.get(ik)
                if b is None:
                    continue
                tag = _tag(b)
                if tag != _TOMB[0] and (cc == c or not self._wfk or tag & _PERSIST):
                    out.append((m, kb, ik))
        return out

    def _scope(self, local: bool):
        mgrs = self._live()
        if self._chosen is not None:
            return [mgrs[self._chosen]]
        if local:
            return [m for m in mgrs if m.local]
        return mgrs

    def __len__(self) -> int:
        if self._chkpt == 0 and not self._wfk and self._ws == 1:
            return sum(len(m.kv) for m in self._scope(False))
        return len(self._visible(self._scope(False)))

    def _iter_keys(self, local: bool):
        return (_key_of(kb, self._key_pickler) for _, kb, _ in self._visible(self._scope(local)))

    def _iter_items(self, local: bool):
        for m, kb, ik in self._visible(self._scope(local)):
            b = m.kv.get(ik)
            if b is not None:
                yield _key_of(kb, self._key_pickler), _value_of(b, self._value_pickler)

    def keys(self) -> DDictKeysView:
        """A live view of the keys visible at this client's checkpoint (``len``, ``in``,
        iteration; ``list(d.keys())`` for a list)."""
        return DDictKeysView(self)

    def __iter__(self):
        return self._iter_keys(False)

    def values(self) -> DDictValuesView:
        """A live view of the values."""
        return DDictValuesView(self)

    def items(self) -> DDictItemsView:
        """A live view of the (key, value) pairs."""
        return DDictItemsView(self)

    def local_keys(self) -> DDictKeysView:
        """A live view of the keys of the managers on this node."""
        return DDictKeysView(self, local=True)

    def local_values(self) -> DDictValuesView:
        """A live view of the values of the managers on this node."""
        return DDictValuesView(self, local=True)

    def local_items(self) -> DDictItemsView:
        """A live view of the pairs of the managers on this node."""
        return DDictItemsView(self, local=True)

    def local_len(self) -> int:
        """Number of keys on this node's managers."""
        return len(self._visible(self._scope(True)))

    def clear(self) -> None:
        """Removes every key."""
        for m in self._scope(False):
            m.kv.clear()

    def update(self, dict2) -> None:
        """Puts every pair of ``dict2`` (a dict or a DDict)."""
        for k, v in dict2.items():
            self[k] = v

    def popitem(self) -> tuple:
        """Removes and returns some (key, value) pair."""
        for _m, kb, _ in self._visible(self._scope(False)):
            k = _key_of(kb, self._key_pickler)
            return k, self.pop(k)
        raise DDictKeyError(None, "popitem(): the DDict is empty")

    def copy(self, name: str = "") -> dict:
        """A plain dict with every pair."""
        return dict(self.items())

    # ----- DragonHPC's extensions (more in the base class _Extras, extras.py) ----------------

    @property
    def local_managers(self) -> list[int]:
        """Managers on this node."""
        return [i for i, m in enumerate(self._live()) if m.local]

    @property
    def local_manager(self) -> int:
        """A manager on this node."""
        return self._main

    @property
    def main_manager(self) -> int:
        """This client's main manager."""
        return self._main

    @property
    def manager_nodes(self) -> list:
        """The node of each manager (``dragon.native.machine.Node``)."""
        from dragon.native.machine import Node, current

        if not _table_nodes():
            return [current()] * self._n
        return [Node(m.node + 1) for m in self._live()]

    @property
    def empty_managers(self) -> list[int]:
        """Managers that came back empty from a restart (their data was lost)."""
        return list(self._empty)

    @staticmethod
    def synchronize_ddicts(serialized_ddicts: list[str]) -> None:
        """Copies every key of the first DDict that has data into the empty managers of the
        others (after a restart that lost some managers)."""
        ds = [DDict.attach(s) for s in serialized_ddicts]
        try:
            full = next((d for d in ds if not d._empty), None)
            if full is None:
                return
            for d in ds:
                if d is full or not d._empty:
                    continue
                for k, v in full.items():
                    if d.which_manager(k) in d._empty:
                        d[k] = v
                d._empty = []
        finally:
            for d in ds:
                d.detach()

    def get_name(self) -> str:
        """The DDict's name."""
        return self._opts["name"]

    @property
    def timeout(self):
        return self._timeout

    @property
    def stats(self) -> list[DDictManagerStats]:
        """Figures per manager."""
        out = []
        names = {n["node"]: n["hostname"] for n in _table_nodes()}
        for i, m in enumerate(self._live()):
            host = names.get(m.node) or socket.gethostname()
            s = m.kv.stats()
            used, cap = s["pool_used"], s["pool_capacity"]
            out.append(
                DDictManagerStats(
                    manager_id=i,
                    hostname=host,
                    total_bytes=cap,
                    total_used_bytes=used,
                    pool_free_space=cap - used,
                    pool_utilization=100.0 * used / cap if cap else 0.0,
                    num_keys=s["count"],
                    current_pool_allocations_used=s["pool_holds"],
                )
            )
        return out

    def dstats(self) -> dict[int, DDictManagerStats]:
        """``stats`` by manager id."""
        return {s.manager_id: s for s in self.stats}

    def sync(self, timeout: float | None = None) -> None:
        """Nothing to wait for: every put is visible when it returns."""

    def __repr__(self) -> str:
        name = self._opts.get("name") or "unnamed"
        return f"<DDict {name}: {self._n} managers, checkpoint {self._chkpt}>"


def _table_nodes() -> list:
    from dragon.native import machine

    return machine.node_table()


def _my_node() -> int:
    from dragon.native import machine

    return machine.my_node_index() if machine.node_table() else 0


def _manager_nodes(n: int, per_node, n_nodes, policy, per_policy) -> list[int]:
    """The node of each of the ``n`` managers: ``n_nodes`` nodes of the runtime from node 0
    (wrapping when it has fewer), ``per_node`` managers each; with a list of policies, the
    node each policy names, ``per_policy`` managers each. One node: all there."""
    table = _table_nodes()
    if not table:
        return [0] * n
    if isinstance(policy, list):
        from dragon.native.process import _target_node

        return [_target_node(p, False) for p in policy for _ in range(per_policy)]
    return [k % len(table) for k in range(n_nodes) for _ in range(per_node)]
