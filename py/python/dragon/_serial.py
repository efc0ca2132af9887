"""Serialization over channels: pickle protocol 5 with out-of-band buffers in pool blocks.

``send(ch, obj)`` pickles ``obj``; when the pickle is small and has no out-of-band buffers
it travels inline in a ring slot. Otherwise the pickle and every out-of-band buffer (NumPy
array data, bytearrays, PickleBuffers) are copied once, side by side, into one pool block
that moves to the receiver (``Channel.send_parts``). ``recv(ch)`` rebuilds the object
around views of that block: NumPy arrays read in place, and the block lives as long as any
view of it. ``bytes`` take a fast path (no pickling).
"""

from __future__ import annotations

import pickle
from typing import Any

import cloudpickle

from dragon._parts import split

_BYTES = b"\x01"  # raw bytes follow
_PICKLE = b"\x02"  # a pickle follows


def send(ch, obj: Any, timeout: float | None, inline_max: int, pickler=cloudpickle) -> None:
    """Sends ``obj`` over ``ch`` (a dragon._native.Channel)."""
    if type(obj) is bytes:
        if len(obj) + 1 <= inline_max:
            ch.send(_BYTES + obj, timeout)
        else:
            ch.send_parts([_BYTES, obj], timeout)
        return
    bufs: list = []
    try:
        data = _dumps(obj, bufs, pickler)
        raws = [b.raw() for b in bufs]
    except BufferError:  # a non-contiguous buffer: keep everything in band
        bufs, raws = [], []
        data = pickler.dumps(obj, protocol=5)
    if not raws and len(data) + 1 <= inline_max:
        ch.send(_PICKLE + data, timeout)
    else:
        ch.send_parts([_PICKLE, data, *raws], timeout)


def _dumps(obj: Any, bufs: list, pickler) -> bytes:
    """The stdlib pickler first (fast for plain data and module-level functions), the given
    pickler (cloudpickle: lambdas, closures) when that fails."""
    if pickler is cloudpickle:
        try:
            data = pickle.dumps(obj, protocol=5, buffer_callback=bufs.append)
            # Objects of the driver script (__main__) go by value: receivers run another main.
            if b"__main__" not in data:
                return data
        except (pickle.PicklingError, TypeError, AttributeError):
            pass
        bufs.clear()
    try:
        return pickler.dumps(obj, protocol=5, buffer_callback=bufs.append)
    except (pickle.PicklingError, TypeError, AttributeError) as e:
        raise TypeError(f"cannot pickle {type(obj).__name__!s} object: {e}") from e


def recv(ch, timeout: float | None, pickler=cloudpickle) -> Any:
    """Receives the next object from ``ch``."""
    return decode(ch.recv_msg(timeout))


def decode(m) -> Any:
    """The object in message ``m`` (bytes, or a Block in the parts layout)."""
    if isinstance(m, bytes):
        kind, body = m[:1], m[1:]
        return body if kind == _BYTES else pickle.loads(body)
    parts = split(m)
    kind = bytes(parts[0])
    if kind == _BYTES:
        return bytes(parts[1])
    return pickle.loads(parts[1], buffers=parts[2:])
