"""The file-like channel adapters of ``dragon.channels`` (what ``pickle.dump`` / ``pickle.load``
and DragonHPC's connections write to and read from).

* ``Many2ManyWritingChannelFile`` gathers everything written between ``open`` and ``close``
  and sends it as one message at ``close``; ``Many2ManyReadingChannelFile`` reads one
  message per ``open``..``close``. So any number of writers and readers share a channel, one
  object per message.
* ``Peer2PeerWritingChannelFile`` / ``Peer2PeerReadingChannelFile`` carry a byte stream for
  one writer and one reader: writes are sent in messages of up to ``large_blk_size`` bytes
  (bigger writes on their own) and reads run across message boundaries. The stream may
  carry DragonHPC's connection framing (``write_raw_header``, ``write_eot``,
  ``check_header``): an 8-byte raw header ``0x40`` + 7-byte little-endian length, an
  end-of-transmission byte ``0x20``, or a pickle-5 stream (``0x80 0x05``).

A message larger than a channel slot arrives as a block of the channel's pool and is read
in place (one copy, into the reader's buffer).
"""

from __future__ import annotations

import pickle
import threading

from dragon import dtypes
from dragon._channel import (
    USE_DEFAULT,
    Channel,
    ChannelAdapterMsgTypes,
    ChannelError,
    ChannelRecvH,
    ChannelSendH,
)
from dragon.managed_memory import MemoryPool

EOT_BYTE = 0x20
RAW_BYTE = 0x40
RAW_HDR_SZ = 8
MAX_RAW_LEN = 2**56 - 1


def _chunk(buf) -> memoryview:
    if isinstance(buf, pickle.PickleBuffer):
        buf = buf.raw()
    view = memoryview(buf)
    return view if view.format == "B" and view.c_contiguous else view.cast("B")


class _Reader:
    """Shared reading state: the current message's view and a cursor."""

    def __init__(self, channel: Channel, timeout=None):
        if not isinstance(channel, Channel):
            raise TypeError(f"a channel file takes a Channel, not {type(channel).__name__}")
        self._h = ChannelRecvH(channel, timeout=timeout)
        self._h.open()
        self._lock = threading.Lock()
        self._opened = False
        self._msg = None  # keeps a received block alive while viewed
        self._view = None
        self._cursor = 0
        self._blocking = True
        self._timeout = USE_DEFAULT

    def open(self) -> None:
        self._lock.acquire()
        self._opened = True

    def _drop(self) -> None:
        self._msg = self._view = None
        self._cursor = 0

    def close(self) -> None:
        if not self._opened:
            return
        self._drop()
        self._opened = False
        self._lock.release()

    def __enter__(self):
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _next(self) -> None:
        m = self._h.recv(blocking=self._blocking, timeout=self._timeout)
        self._msg = m
        self._view = m._payload()
        self._cursor = 0

    def _check_open(self) -> None:
        if not self._opened:
            raise ChannelError("Adapter not opened for reading")

    def readline(self) -> bytes:
        self._check_open()
        out = bytearray()
        while True:
            if self._view is None:
                self._next()
            v = self._view
            data = v[self._cursor :]
            i = bytes(data).find(b"\n")
            if i >= 0:
                out += data[: i + 1]
                self._cursor += i + 1
                return bytes(out)
            out += data
            self._cursor = len(v)
            if not self._more_after_end():
                return bytes(out)

    def _more_after_end(self) -> bool:
        return False


class Many2ManyReadingChannelFile(_Reader):
    """Reads one message per ``open``..``close`` (the dual of ``Many2ManyWritingChannelFile``)."""

    def __init__(self, channel: Channel, wait_mode=dtypes.DEFAULT_WAIT_MODE):
        super().__init__(channel)

    def set_adapter_timeout(self, blocking=True, timeout=None) -> None:
        """How long a read waits for the message (``blocking=False``: not at all)."""
        self._blocking = blocking
        self._timeout = timeout

    def read(self, size=-1) -> bytearray:
        if size is None or size <= 0:
            raise ValueError("invalid size for this adapter")
        buf = bytearray(size)
        n = self.readinto(buf)
        del buf[n:]
        return buf

    def readinto(self, buf) -> int:
        self._check_open()
        if self._view is None:
            self._next()
        dst = _chunk(buf)
        n = min(len(dst), len(self._view) - self._cursor)
        dst[:n] = self._view[self._cursor : self._cursor + n]
        self._cursor += n
        return n

    def get_remaining_data(self):
        """(the rest of the current message as a memoryview, its offset in the message)."""
        self._check_open()
        if self._view is None:
            self._next()
        off = self._cursor
        self._cursor = len(self._view)
        return self._view[off:], off


class Peer2PeerReadingChannelFile(_Reader):
    """Reads a byte stream that spans messages (one reader per channel)."""

    def __init__(self, channel: Channel, *, options=None, wait_mode=dtypes.DEFAULT_WAIT_MODE):
        super().__init__(channel)
        self._options = options
        self._side_buf = None

    def open(self) -> None:
        super().open()
        self._cursor = self._cursor if self._view is not None else 0

    def close(self) -> None:
        if not self._opened:
            return
        self._drop()
        self._opened = False
        self._lock.release()

    def set_side_buf(self, buf) -> None:
        """Also append everything read to ``buf`` (a bytearray)."""
        assert isinstance(buf, bytearray)
        self._side_buf = buf

    def _more_after_end(self) -> bool:
        self._drop()
        return True

    def _advance(self, n: int) -> None:
        self._cursor += n
        if self._cursor >= len(self._view):
            self._drop()

    def check_header(self):
        """(ChannelAdapterMsgTypes, length or None) of the frame at the read position."""
        self._check_open()
        if self._view is None:
            self._next()
        v = self._view[self._cursor : self._cursor + RAW_HDR_SZ]
        if len(v) >= 1 and v[0] == EOT_BYTE:
            return ChannelAdapterMsgTypes.EOT, None
        if len(v) >= 2 and v[0] == 0x80 and v[1] == 0x05:
            return ChannelAdapterMsgTypes.PICKLE_PROT_5, None
        if len(v) == RAW_HDR_SZ and v[0] == RAW_BYTE:
            return ChannelAdapterMsgTypes.RAW_BYTES, int.from_bytes(v[1:8], "little")
        raise ConnectionError(f"unexpected header: {bytes(v)!r}")

    def advance_raw_header(self, msglen) -> None:
        """Skips the raw header just checked."""
        self._advance(RAW_HDR_SZ)

    def read(self, size=-1) -> bytearray:
        if size is None or size <= 0:
            raise ValueError("invalid size for this adapter")
        buf = bytearray(size)
        self.readinto(buf, accumulate_sb=False)
        if self._side_buf is not None:
            self._side_buf.extend(buf)
        return buf

    def readinto(self, buf, accumulate_sb=True) -> int:
        self._check_open()
        dst = _chunk(buf)
        done = 0
        while done < len(dst):
            if self._view is None:
                self._next()
            n = min(len(dst) - done, len(self._view) - self._cursor)
            dst[done : done + n] = self._view[self._cursor : self._cursor + n]
            done += n
            self._advance(n)
        if self._side_buf is not None and accumulate_sb:
            self._side_buf.extend(dst)
        return done


class _Writer:
    def __init__(self, channel: Channel, timeout=None):
        if not isinstance(channel, Channel):
            raise TypeError(f"a channel file takes a Channel, not {type(channel).__name__}")
        self._channel = channel
        self._h = ChannelSendH(channel, timeout=timeout)
        self._h.open()
        self._lock = threading.Lock()
        self._opened = False
        self._blocking = True
        self._timeout = USE_DEFAULT

    def _send(self, data) -> None:
        self._h.send_bytes(data, blocking=self._blocking, timeout=self._timeout)

    def __enter__(self):
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Many2ManyWritingChannelFile(_Writer):
    """Sends everything written between ``open`` and ``close`` as one message at ``close``."""

    def __init__(
        self,
        channel: Channel,
        buffer_pool=None,
        wait_mode=dtypes.DEFAULT_WAIT_MODE,
        return_mode=dtypes.WHEN_BUFFERED,
    ):
        if buffer_pool is not None and not isinstance(buffer_pool, MemoryPool):
            raise ValueError("Optional buffer pool must be an instance of MemoryPool")
        super().__init__(channel)
        self._parts: list[bytes] = []

    def open(self) -> None:
        self._lock.acquire()
        self._parts = []
        self._opened = True

    def set_adapter_timeout(self, blocking=True, timeout=None) -> None:
        """How long ``close`` waits for room in the channel."""
        self._blocking = blocking
        self._timeout = timeout

    def write(self, buf) -> int:
        if not self._opened:
            raise ChannelError("Many2ManyWriting adapter not opened for writing")
        view = _chunk(buf)
        if len(view):
            self._parts.append(bytes(view))
        return len(view)

    def flush(self) -> None:
        """Nothing to do: the message goes at ``close``."""

    def close(self) -> None:
        if not self._opened:
            return
        try:
            if self._parts:
                parts, self._parts = self._parts, []
                self._send(parts[0] if len(parts) == 1 else b"".join(parts))
        finally:
            self._opened = False
            self._lock.release()


class Peer2PeerWritingChannelFile(_Writer):
    """Writes a byte stream into messages (one writer per channel)."""

    def __init__(
        self,
        channel: Channel,
        *,
        options=None,
        timeout=300,
        wait_mode=dtypes.DEFAULT_WAIT_MODE,
        return_mode=dtypes.WHEN_BUFFERED,
    ):
        opts = {"small_blk_size": 2**10, "large_blk_size": 2**17, "huge_blk_size": 2**21, "buffer_pool": None}
        if isinstance(options, dict):
            opts.update(options)
        if opts["large_blk_size"] <= opts["small_blk_size"]:
            raise ValueError("Large block size is smaller than or equal to small block size")
        if opts["huge_blk_size"] <= opts["large_blk_size"]:
            raise ValueError("Huge block size is smaller than or equal to large block size")
        super().__init__(channel, timeout=timeout)
        self._limit = opts["large_blk_size"]
        self._huge = opts["huge_blk_size"]  # the largest message: a bigger write is split
        self._buf = bytearray()

    def open(self) -> None:
        self._lock.acquire()
        self._buf = bytearray()
        self._opened = True

    def _check_open(self) -> None:
        if not self._opened:
            raise ChannelError("Adapter not opened for writing")

    def write(self, buf) -> int:
        self._check_open()
        view = _chunk(buf)
        n = len(view)
        if len(self._buf) + n <= self._limit:
            self._buf += view
            return n
        self.flush()
        if n > self._limit:
            # A stream: the reader reads across messages, so a write larger than any
            # message the pool can hold (DragonHPC's example sends twice the pool) goes in
            # pieces.
            for off in range(0, n, self._huge):
                self._send(view[off : off + self._huge])
        else:
            self._buf += view
        return n

    def write_raw_header(self, msglen) -> None:
        """The 8-byte raw-bytes header for a ``msglen``-byte payload."""
        if msglen < 0 or msglen > MAX_RAW_LEN:
            raise ConnectionError(f"xfer size exceeds plausible limits of {MAX_RAW_LEN} bytes")
        self.write(bytes([RAW_BYTE]) + int(msglen).to_bytes(7, "little"))

    def write_eot(self) -> None:
        """The end-of-transmission marker."""
        self.write(bytes([EOT_BYTE]))

    def flush(self) -> None:
        self._check_open()
        if self._buf:
            data, self._buf = self._buf, bytearray()
            self._send(data)

    def close(self) -> None:
        if not self._opened:
            return
        try:
            self.flush()
        finally:
            self._opened = False
            self._lock.release()
