"""DragonHPC's live views of a DDict: what ``keys()``, ``values()``, ``items()`` and their
``local_`` forms return, and the read-only ``DDictMappingProxy`` of a view's ``mapping``.

A view reads the DDict each time it is used (``len``, iteration, ``in``), at the checkpoint
of the DDict handle it came from, so it follows later puts and deletes. Keys have no order,
so ``reversed`` is a NotImplementedError, as in DragonHPC. Membership: ``k in d.keys()`` is
``k in d``; for ``local_keys()`` also "on a manager of this node". Where DragonHPC raises
NotImplementedError (``in`` on values and items, ``mapping`` of a local view) these views
answer: ``(k, v) in d.items()`` looks ``k`` up and compares its value, ``v in d.values()``
compares against every value (a scan).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


class _View:
    def __init__(self, ddict, local: bool = False):
        self._ddict = ddict
        self._local = local

    def __len__(self) -> int:
        return self._ddict.local_len() if self._local else len(self._ddict)

    def __reversed__(self):
        raise NotImplementedError("There is no ordering to DDict keys and therefore they cannot be reversed.")

    @property
    def mapping(self) -> DDictMappingProxy:
        """A read-only proxy of the DDict the view belongs to."""
        return DDictMappingProxy(self._ddict)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({list(self)!r})"


class DDictKeysView(_View):
    """The keys of a DDict (``d.keys()``; ``d.local_keys()``: those of this node's
    managers): ``len``, iteration and ``in``."""

    def __iter__(self) -> Iterator:
        return self._ddict._iter_keys(self._local)

    def __contains__(self, key: Any) -> bool:
        if key not in self._ddict:
            return False
        return not self._local or self._ddict.which_manager(key) in self._ddict.local_managers


class DDictValuesView(_View):
    """The values of a DDict (``d.values()``, ``d.local_values()``)."""

    def __iter__(self) -> Iterator:
        return (v for _, v in self._ddict._iter_items(self._local))

    def __contains__(self, value: Any) -> bool:
        for v in self:
            if v is value or v == value:
                return True
        return False


class DDictItemsView(_View):
    """The (key, value) pairs of a DDict (``d.items()``, ``d.local_items()``)."""

    def __iter__(self) -> Iterator:
        return self._ddict._iter_items(self._local)

    def __contains__(self, item: Any) -> bool:
        try:
            key, value = item
        except (TypeError, ValueError):
            return False
        if key not in self._ddict or (
            self._local and self._ddict.which_manager(key) not in self._ddict.local_managers
        ):
            return False
        try:
            v = self._ddict[key]
        except KeyError:
            return False
        return v is value or bool(v == value)


class DDictMappingProxy:
    """A read-only live proxy of a DDict, like ``types.MappingProxyType`` of a dict."""

    def __init__(self, ddict):
        self._ddict = ddict

    def __contains__(self, key) -> bool:
        return key in self._ddict

    def __getitem__(self, key):
        return self._ddict[key]

    def __iter__(self):
        return iter(self._ddict)

    def __len__(self) -> int:
        return len(self._ddict)

    def __reversed__(self):
        raise NotImplementedError("Keys are not ordered on DDicts and cannot be reversed.")

    __hash__ = None  # type: ignore[assignment]  (unhashable, as a mapping proxy of a dict)

    def copy(self) -> dict:
        """A plain dict with every pair (``DDict.copy``)."""
        return self._ddict.copy()

    def get(self, key, default=None):
        """The value of ``key``, or ``default``."""
        return self._ddict.get(key, default)

    def keys(self) -> DDictKeysView:
        """The DDict's keys view."""
        return self._ddict.keys()

    def values(self) -> DDictValuesView:
        """The DDict's values view."""
        return self._ddict.values()

    def items(self) -> DDictItemsView:
        """The DDict's items view."""
        return self._ddict.items()
