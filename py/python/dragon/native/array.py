"""DragonHPC's native ``Array``: a ctypes array in the node's shared memory."""

from __future__ import annotations

import ctypes

from dragon.native._shared import SharedCtype, ctype_of


class Array(SharedCtype):
    """A shared array of ``typecode_or_type`` with ``size_or_initializer`` items (a length or
    a sequence), with a lock unless ``lock=False``."""

    def __init__(self, typecode_or_type, size_or_initializer, lock=True, m_uid: int = 0):
        item = ctype_of(typecode_or_type)
        if isinstance(size_or_initializer, int):
            if size_or_initializer < 0:
                raise ValueError("array size must be >= 0")
            n, init = size_or_initializer, None
        else:
            init = list(size_or_initializer)
            n = len(init)
        super().__init__(item, lock, length=n)
        if init is not None:
            self._obj[:] = init

    def __len__(self) -> int:
        return self._length

    def _view(self):
        """The ctypes array: in place on its node, a copy fetched from it on another."""
        return self._obj if self._obj is not None else self._remote_load()

    def __getitem__(self, i):
        if self._obj is None and isinstance(i, int):
            size = ctypes.sizeof(self._item)
            i = range(self._length)[i]
            return self._item.from_buffer_copy(self._block.read(i * size, size)).value
        return self._view()[i]

    def __setitem__(self, i, v) -> None:
        if self._obj is not None:
            self._obj[i] = v
            return
        # Another node's array: only the bytes of the items assigned are stored.
        size = ctypes.sizeof(self._item)
        obj = self._remote_load()
        obj[i] = v
        r = range(self._length)[i]
        if isinstance(r, int):
            self._remote_store(obj, r * size, size)
        elif len(r) and r.step == 1:
            self._remote_store(obj, r.start * size, len(r) * size)
        elif len(r):
            self._remote_store(obj)

    @property
    def value(self):
        """The items as a list (bytes for 'c' arrays)."""
        obj = self._view()
        return obj.value if hasattr(obj, "value") else list(obj)

    @value.setter
    def value(self, v) -> None:
        """Sets a 'c' array's bytes (as ctypes' char arrays)."""
        if self._obj is not None:
            self._obj.value = v
            return
        obj = self._remote_load()
        obj.value = v
        self._remote_store(obj)

    @property
    def raw(self) -> bytes:
        """The raw bytes of a 'c' array."""
        return self._view().raw

    @raw.setter
    def raw(self, v) -> None:
        """Sets a 'c' array's raw bytes (as ctypes' char arrays)."""
        if self._obj is not None:
            self._obj.raw = v
            return
        obj = self._remote_load()
        obj.raw = v
        self._remote_store(obj)

    def __repr__(self) -> str:
        return f"<dragon.native.array.Array {list(self._view())!r}>"
