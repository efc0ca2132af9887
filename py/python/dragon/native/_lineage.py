"""Who started whom: the records behind ``Process.parent()`` and ``Process.children()``.

The node agent knows every process it launched but not who asked for it, so the process
that starts one records it in the runtime's name registry (kind ``lineage``), one round trip
each (~50 µs, beside a launch's milliseconds):

* ``p<child puid>``: the parent's p_uid and OS pid (16 bytes, little-endian);
* ``c<parent puid>:<k>``: chunk ``k`` of the p_uids the parent started, in start order, at
  most ``_CHUNK`` a chunk. Only the parent writes its chunks (under a lock of its own), so a
  start rewrites one chunk of at most 4 KiB, never the whole list.

Processes started otherwise (the launcher's driver, children of the "dragon" start method,
a plain script) have no ``p`` record: ``parent()`` is None for them. Records live as long as
the runtime (a few dozen bytes per started process).
"""

from __future__ import annotations

import struct
import threading

from dragon import _runtime

_KIND = "lineage"
_CHUNK = 512
_lock = threading.Lock()
_mine: list[int] = []  # p_uids this process started, in order


def record(child_puid: int) -> None:
    """Records that this process started ``child_puid``."""
    import os

    me = _runtime.my_puid()
    a = _runtime.agent()
    a.register(_KIND, f"p{child_puid}", struct.pack("<QQ", me, os.getpid()), replace=True)
    with _lock:
        _mine.append(child_puid)
        k = (len(_mine) - 1) // _CHUNK
        chunk = _mine[k * _CHUNK :]
        a.register(_KIND, f"c{me}:{k}", struct.pack(f"<{len(chunk)}Q", *chunk), replace=True)


def parent_of(puid: int) -> tuple[int, int] | None:
    """(p_uid, OS pid) of the process that started ``puid``, or None if no process of the
    runtime did."""
    v = _runtime.agent().lookup(_KIND, f"p{puid}")
    return None if v is None else struct.unpack("<QQ", v)


def started_by(puid: int) -> list[int]:
    """The p_uids ``puid`` started, in start order."""
    if puid == _runtime.my_puid():
        with _lock:
            return list(_mine)
    a = _runtime.agent()
    out: list[int] = []
    k = 0
    while True:
        v = a.lookup(_KIND, f"c{puid}:{k}")
        if v is None:
            return out
        out.extend(struct.unpack(f"<{len(v) // 8}Q", v))
        k += 1
