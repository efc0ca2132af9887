"""The parts layout of a block that holds several byte strings side by side.

``u32 count, u32 0, count x u64 length``, then each part at the next 64-byte boundary. The
Rust side writes it (``Pool.alloc_parts``, ``Channel.send_parts``, ``Kv.put_parts``); the
start method's spill segments are written here with ``header``. Kept free of imports beyond
the standard library: every child of the start method loads it.
"""

from __future__ import annotations

import struct


def start(count: int) -> int:
    """Offset of the first part in a block of ``count`` parts."""
    return (8 + 8 * count + 63) // 64 * 64


def header(lengths: list[int]) -> bytes:
    """The layout's header for parts of ``lengths`` bytes, padded to the first part."""
    n = len(lengths)
    return struct.pack(f"<II{n}Q", n, 0, *lengths).ljust(start(n), b"\0")


def split(buf) -> list[memoryview]:
    """Views of the parts of ``buf`` (any buffer in the layout), in place. A buffer that is
    not in the layout (a count or a length reaching past its end, a nonzero second word)
    raises ValueError: a part is never silently cut short."""
    mv = memoryview(buf)
    size = mv.nbytes
    if size < 8:
        raise ValueError(f"a parts block holds at least 8 bytes, not {size}")
    n = int.from_bytes(mv[0:4], "little")
    if int.from_bytes(mv[4:8], "little") != 0 or 8 + 8 * n > size:
        raise ValueError(f"not a parts block: count {n} in {size} bytes")
    off = start(n)
    out = []
    for ln in struct.unpack_from(f"<{n}Q", mv, 8):
        if off > size or ln > size - off:
            raise ValueError(f"part of {ln} bytes at {off} passes the end of a {size}-byte block")
        out.append(mv[off : off + ln])
        off += (ln + 63) // 64 * 64
    return out
