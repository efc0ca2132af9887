"""DragonHPC's native ``Value``: one ctypes value in the node's shared memory."""

from __future__ import annotations

from dragon.native._shared import SharedCtype, ctype_of


class Value(SharedCtype):
    """A shared value of ``typecode_or_type`` ('i', 'd', a ctypes type...), optionally with a
    lock (``lock=True`` makes one)."""

    def __init__(self, typecode_or_type, value=None, lock=False, m_uid: int = 0):
        super().__init__(ctype_of(typecode_or_type), lock)
        if value is not None:
            self.value = value

    @property
    def value(self):
        """The current value."""
        if self._obj is None:
            return self._remote_load().value
        return self._obj.value

    @value.setter
    def value(self, v) -> None:
        if self._obj is None:
            tmp = self._ctype()
            tmp.value = v
            self._remote_store(tmp)
            return
        self._obj.value = v

    def __repr__(self) -> str:
        return f"<dragon.native.value.Value({self._item.__name__}, {self.value!r})>"
