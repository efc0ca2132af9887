"""DragonHPC's native ``Array``: a ctypes array in the node's shared memory."""

from __future__ import annotations

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
        return len(self._obj)

    def __getitem__(self, i):
        return self._obj[i]

    def __setitem__(self, i, v) -> None:
        self._obj[i] = v

    @property
    def value(self):
        """The items as a list (bytes for 'c' arrays)."""
        return self._obj.value if hasattr(self._obj, "value") else list(self._obj)

    @property
    def raw(self) -> bytes:
        """The raw bytes of a 'c' array."""
        return self._obj.raw

    def __repr__(self) -> str:
        return f"<dragon.native.array.Array {list(self._obj)!r}>"
