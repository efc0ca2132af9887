"""DragonHPC's ``dragon.utils``: ``B64``, the base64 strings serialized descriptors travel
as (command lines, environment variables), and ``host_id``."""

from __future__ import annotations

import base64
import binascii


class B64:
    """``str(B64(data))`` is ``data`` base64-encoded; ``B64.from_str(s).decode()`` undoes it."""

    def __init__(self, data):
        self._encoded = base64.b64encode(bytes(data)).decode("ascii")

    def __str__(self) -> str:
        return self._encoded

    def decode(self) -> bytes:
        """The bytes this string encodes (ValueError when it is not base64)."""
        try:
            return base64.b64decode(self._encoded.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise ValueError("Invalid Base64 Value") from None

    @classmethod
    def from_str(cls, serialized_str) -> B64:
        """A B64 holding an already encoded string (bytes are taken as ASCII)."""
        obj = cls.__new__(cls)
        if isinstance(serialized_str, bytes | bytearray):
            serialized_str = bytes(serialized_str).decode("ascii", "replace")
        obj._encoded = str(serialized_str).strip()
        return obj

    @classmethod
    def bytes_to_str(cls, the_bytes) -> str:
        """``the_bytes`` base64-encoded."""
        return str(cls(the_bytes))

    @classmethod
    def str_to_bytes(cls, the_str) -> bytes:
        """The bytes a base64 string encodes."""
        return cls.from_str(the_str).decode()


def b64encode(data) -> str:
    """``data`` base64-encoded (DragonHPC's helper of the same name)."""
    return B64.bytes_to_str(data)


def b64decode(s) -> bytes:
    """The bytes of a base64 string."""
    return B64.str_to_bytes(s)


def host_id() -> int:
    """This node's h_uid."""
    from dragon.globalservices.node import host_id as _host_id

    return _host_id()
