"""How a DDict stores keys and values.

A key's canonical bytes (``_key_bytes``) decide its manager (``stable_hash(bytes) %
managers``) and are its index key, behind the checkpoint id (``_CHK``): ``str``, ``int``
and ``bytes`` by value and other keys by their pickle, so every process and node agrees. A
value is stored as the parts of one pool block: a tag byte (bytes, pickle or tombstone, with
the persist flag), then the bytes or the pickle and its out-of-band buffers.
"""

from __future__ import annotations

import pickle
import struct
from typing import Any

import cloudpickle

from dragon import _parts

_BYTES = b"\x01"
_PICKLE = b"\x02"
_TOMB = b"\x00"
_PERSIST = 0x80  # flag on the tag: the key persists across checkpoints

_CHK = struct.Struct("<Q")


def _key_bytes(key: Any, key_pickler=None) -> bytes:
    """Canonical bytes of a key (the documented stable form)."""
    if key_pickler is not None:
        return b"P" + key_pickler.dumps(key)
    t = type(key)
    if t is str:
        return b"s" + key.encode("utf-8", "surrogatepass")
    if t is bytes:
        return b"b" + key
    if t is int:
        return b"i" + str(key).encode()
    try:
        return b"p" + pickle.dumps(key, protocol=5)
    except Exception:
        try:
            return b"p" + cloudpickle.dumps(key, protocol=5)
        except Exception as e:
            raise TypeError(f"cannot pickle key of type {t.__name__}: {e}") from e


def _key_of(kb: bytes, key_pickler=None) -> Any:
    tag, body = kb[:1], kb[1:]
    if tag == b"s":
        return body.decode("utf-8", "surrogatepass")
    if tag == b"b":
        return bytes(body)
    if tag == b"i":
        return int(body)
    if tag == b"P":
        return key_pickler.loads(body)
    return pickle.loads(body)


def _value_parts(value: Any, persistent: bool, value_pickler=None) -> list:
    flag = _PERSIST if persistent else 0
    if type(value) is bytes and value_pickler is None:
        return [bytes([_BYTES[0] | flag]), value]
    bufs: list = []
    pk = value_pickler
    try:
        if pk is not None:
            data = pk.dumps(value)
        else:
            try:
                data = pickle.dumps(value, protocol=5, buffer_callback=bufs.append)
                if b"__main__" in data:
                    raise pickle.PicklingError("by value")
            except (pickle.PicklingError, TypeError, AttributeError):
                bufs.clear()
                data = cloudpickle.dumps(value, protocol=5, buffer_callback=bufs.append)
        raws = [b.raw() for b in bufs]
    except BufferError:
        raws = []
        data = cloudpickle.dumps(value, protocol=5)
    except Exception as e:
        raise TypeError(f"cannot pickle value of type {type(value).__name__}: {e}") from e
    return [bytes([_PICKLE[0] | flag]), data, *raws]


def _tag(block) -> int:
    mv = memoryview(block)
    return mv[_parts.start(int.from_bytes(mv[0:4], "little"))]


def _value_of(block, value_pickler=None) -> Any:
    parts = _parts.split(block)
    tag = parts[0][0] & ~_PERSIST
    if tag == _BYTES[0]:
        return bytes(parts[1])
    if value_pickler is not None:
        return value_pickler.loads(bytes(parts[1]))
    return pickle.loads(parts[1], buffers=parts[2:])
