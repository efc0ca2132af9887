"""The core of ``dragon.channels`` (errors, enums, ``Message``, the handles, ``Channel``);
the file adapters are in ``dragon._chfiles``. See ``dragon.channels``."""

from __future__ import annotations

import enum
import threading
import time

from dragon import _native, dtypes
from dragon.dtypes import DragonException, DragonObjectDestroyed
from dragon.exceptions import ChannelClosedError, DragonError, QueueEmpty, QueueFull
from dragon.managed_memory import MemoryAlloc, MemoryPool, _muid_of, _native_pool, alloc_block

_SER = "drs1"
DEFAULT_CAPACITY = 100
DEFAULT_BLOCK_SIZE = 1024
MIN_BLOCK_SIZE = 32  # a slot must hold a block handle


class ChannelError(DragonException):
    """A channel operation failed: ``ChannelError(msg, lib_err=None)``."""


class ChannelTimeout(ChannelError, TimeoutError):
    pass


class ChannelHandleNotOpenError(ChannelError):
    pass


class ChannelSendError(ChannelError):
    pass


class ChannelSendTimeout(ChannelSendError, TimeoutError):
    pass


class ChannelValueError(ChannelError, ValueError):
    pass


class ChannelFull(ChannelSendError, TimeoutError):
    pass


class ChannelRecvError(ChannelError):
    pass


class ChannelRecvTimeout(ChannelRecvError, TimeoutError):
    pass


class ChannelEmpty(ChannelRecvError, TimeoutError):
    pass


class ChannelBarrierBroken(ChannelError, threading.BrokenBarrierError):
    pass


class ChannelBarrierReady(ChannelError):
    pass


class ChannelRemoteOperationNotSupported(ChannelError):
    pass


class ChannelDestroyed(ChannelError, DragonObjectDestroyed):
    pass


class ChannelSetError(DragonException):
    pass


class ChannelSetTimeout(ChannelSetError, TimeoutError):
    pass


class OwnershipOnSend(enum.IntEnum):
    copy_on_send = 0
    transfer_ownership_on_send = 1


copy_on_send = OwnershipOnSend.copy_on_send
transfer_ownership_on_send = OwnershipOnSend.transfer_ownership_on_send


class LockType(enum.IntEnum):
    FIFO = 0
    LITE = 1
    GREEDY = 2


class EventType(enum.IntEnum):
    POLLNOTHING = 0
    POLLIN = 1
    POLLOUT = 2
    POLLINOUT = 3
    POLLEMPTY = 4
    POLLFULL = 5
    POLLSIZE = 6
    POLLRESET = 7


class FlowControl(enum.IntEnum):
    NO_FLOW_CONTROL = 0
    RESOURCES_FLOW_CONTROL = 1
    MEMORY_FLOW_CONTROL = 2
    MSGS_FLOW_CONTROL = 3


class ChannelFlags(enum.IntEnum):
    NO_FLAGS = 0
    MASQUERADE_AS_REMOTE = 1


def _timeout(timeout) -> float | None:
    if timeout is None:
        return None
    if not isinstance(timeout, int | float) or isinstance(timeout, bool):
        raise ValueError("The timeout value must be a float or int")
    if timeout < 0:
        raise ValueError("Cannot provide timeout < 0.")
    return float(timeout)


# The creator's native handle closes the channel when it goes: creators' handles stay here
# until ``destroy`` so a channel outlives the Python object that made it (as DragonHPC's).
_owned: dict[tuple, _native.Channel] = {}


class Message:
    """A message: memory to send (``create_alloc``, ``create_from_mem``) or one received."""

    __slots__ = ("_data", "_alloc", "hints", "clientid")

    def __init__(self):
        self._data = None  # a Block (whole block), bytes or bytearray
        self._alloc = None  # the MemoryAlloc it was made from
        self.hints = 0
        self.clientid = 0

    @staticmethod
    def _check(hints, clientid):
        if type(hints) is not int or hints < 0:
            raise ChannelError(
                "The hints argument must be a non-negative integer.", "DRAGON_INVALID_ARGUMENT"
            )
        if type(clientid) is not int or clientid < 0:
            raise ChannelError(
                "The clientid argument must be a non-negative integer.", "DRAGON_INVALID_ARGUMENT"
            )

    @staticmethod
    def create_from_mem(mem, hints=0, clientid=0) -> Message:
        """A message whose payload is the allocation ``mem`` (no copy)."""
        if not isinstance(mem, MemoryAlloc):
            raise TypeError(f"create_from_mem takes a MemoryAlloc, not {type(mem).__name__}")
        Message._check(hints, clientid)
        m = Message()
        m._alloc = mem
        m.hints, m.clientid = hints, clientid
        return m

    @staticmethod
    def create_empty() -> Message:
        """A message with no payload (for ``recv(dest_msg=...)``)."""
        return Message()

    @staticmethod
    def create_alloc(mpool, nbytes, hints=0, clientid=0, timeout=None) -> Message:
        """A message with a new ``nbytes`` block of ``mpool`` as payload (waits up to
        ``timeout`` for room; ChannelError when there is none)."""
        if not isinstance(mpool, MemoryPool):
            raise TypeError(f"create_alloc takes a MemoryPool, not {type(mpool).__name__}")
        Message._check(hints, clientid)
        if not isinstance(nbytes, int):
            raise TypeError(f"nbytes must be an int, not {type(nbytes).__name__}")
        if nbytes < 0:
            raise OverflowError(f"can't convert negative value {nbytes} to size_t")
        t = _timeout(timeout)
        try:
            block = alloc_block(mpool._live(), max(nbytes, 1), t)
        except (DragonError, MemoryError) as e:
            raise ChannelError(f"Could not allocate memory from pool: {e}", "DRAGON_MEMORY_ERRNO") from None
        m = Message()
        m._data = block if nbytes > 0 else b""
        m.hints, m.clientid = hints, clientid
        return m

    def _payload(self):
        """(object exporting the payload, view) ."""
        if self._alloc is not None:
            return self._alloc.get_memview()
        if self._data is None:
            raise ChannelError("the message has no payload (destroyed or empty)", "DRAGON_INVALID_ARGUMENT")
        return memoryview(self._data)

    def destroy(self, free_mem=True) -> None:
        """Ends the message; with ``free_mem`` its memory goes too (an allocation it was made
        from is freed)."""
        if self._alloc is not None and free_mem:
            self._alloc.free()
        self._alloc = None
        self._data = None

    def bytes_memview(self) -> memoryview:
        """A writable view of the payload (no copy)."""
        if type(self._data) is bytes:
            self._data = bytearray(self._data)  # inline payloads arrive as bytes
        return self._payload()

    def tobytes(self) -> bytes:
        """A copy of the payload."""
        return self._payload().tobytes()

    def clear_payload(self, start=0, stop=None) -> None:
        """Zeroes payload bytes ``start``..``stop``."""
        view = self.bytes_memview()
        stop = len(view) if stop is None else min(stop, len(view))
        if 0 <= start < stop:
            view[start:stop] = bytes(stop - start)


USE_DEFAULT = "USE_CHANNEL_DEFAULT"


class _Handle:
    __slots__ = ("_channel", "_ch", "_default", "_open")

    def __init__(self, ch, timeout):
        if not isinstance(ch, Channel):
            raise TypeError(f"a channel handle takes a Channel, not {type(ch).__name__}")
        self._channel = ch
        self._ch = None
        self._default = _timeout(timeout)
        self._open = False

    def open(self) -> None:
        """Opens the handle (ChannelDestroyed when the channel is gone)."""
        ch = self._channel._live()
        if ch.stats()["closed"]:
            raise ChannelDestroyed(
                "Could not open a handle: the channel was destroyed", "DRAGON_OBJECT_DESTROYED"
            )
        self._ch = ch
        self._open = True

    def close(self) -> None:
        """Closes the handle (ChannelHandleNotOpenError when it is not open)."""
        if not self._open:
            raise ChannelHandleNotOpenError(
                "Cannot close handle that is not open", "DRAGON_CHANNEL_HANDLE_NOT_OPENED"
            )
        self._open = False
        self._ch = None

    def __enter__(self):
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self):
        raise NotImplementedError("Not implemented for channel handles.")

    def _t(self, blocking, timeout):
        if not self._open:
            raise ChannelHandleNotOpenError("Channel handle is not open", "DRAGON_CHANNEL_HANDLE_NOT_OPENED")
        if not blocking:
            return 0.0
        if timeout == USE_DEFAULT or timeout == ChannelSendH.USE_CHANNEL_SENDH_DEFAULT:
            return self._default
        if timeout == ChannelRecvH.USE_CHANNEL_RECVH_DEFAULT:
            return self._default
        return _timeout(timeout)


class ChannelSendH(_Handle):
    """A channel's sending handle (``Channel.sendh()``)."""

    __slots__ = ()
    USE_CHANNEL_SENDH_DEFAULT = "USE_CHANNEL_SENDH_DEFAULT"
    copy_on_send = OwnershipOnSend.copy_on_send
    transfer_ownership_on_send = OwnershipOnSend.transfer_ownership_on_send

    def __init__(
        self, ch, return_mode=dtypes.WHEN_BUFFERED, wait_mode=dtypes.DEFAULT_WAIT_MODE, timeout=None, debug=0
    ):
        super().__init__(ch, timeout)

    def _fail(self, e, t):
        if isinstance(e, QueueFull):
            if t == 0:
                return ChannelFull("Channel is full", "DRAGON_CHANNEL_FULL")
            return ChannelSendTimeout(f"Timeout on send ({t} s)", "DRAGON_TIMEOUT")
        if isinstance(e, ChannelClosedError):
            return ChannelDestroyed("Channel was destroyed", "DRAGON_OBJECT_DESTROYED")
        if isinstance(e, MemoryError):
            return ChannelSendError(
                f"Could not send message: no room in the pool ({e})", "DRAGON_MEMORY_ERRNO"
            )
        return ChannelSendError(f"Could not send message: {e}", "DRAGON_FAILURE")

    def send(self, msg, dest_msg=None, ownership=copy_on_send, blocking=True, timeout=USE_DEFAULT) -> None:
        """Sends ``msg``. With ``transfer_ownership_on_send`` a payload that is a whole block
        of the channel's pool moves (no copy) and ``msg`` gives it up; otherwise the payload
        is copied (inline when it fits a slot)."""
        t = self._t(blocking, timeout)
        ch = self._ch
        if not isinstance(msg, Message):
            raise TypeError(f"send takes a Message, not {type(msg).__name__}")
        try:
            if ownership == transfer_ownership_on_send and self._move(msg, ch, t):
                return
            ch.send(msg._payload(), t)
            if ownership == transfer_ownership_on_send:
                msg.destroy()
        except DragonError as e:
            raise self._fail(e, t) from None

    def _move(self, msg, ch, t) -> bool:
        """Sends ``msg``'s block itself when it is a whole block of the channel's pool larger
        than a slot (the receiver gets the block; ``msg`` and its allocation give it up)."""
        alloc = msg._alloc
        if alloc is not None:
            s, o, n, g = alloc._ref
            if not alloc._ok or alloc._off != 0 or alloc._len != n or s != ch.ref[0]:
                return False
            if n <= self._channel._block_size:
                return False
            block = alloc._hold()
            ch.send_block(block, t)
            alloc.free()
            msg._alloc = None
            return True
        block = msg._data
        if not isinstance(block, _native.Block) or block.ref[0] != ch.ref[0]:
            return False
        if len(block) <= self._channel._block_size:
            return False
        ch.send_block(block, t)
        msg._data = None
        return True

    def send_bytes(self, msg_bytes, msg_len=0, blocking=True, timeout=USE_DEFAULT) -> None:
        """Sends a copy of ``msg_bytes`` (its first ``msg_len`` bytes when given)."""
        t = self._t(blocking, timeout)
        if msg_len and msg_len > 0:
            msg_bytes = memoryview(msg_bytes)[:msg_len]
        try:
            self._ch.send(msg_bytes, t)
        except DragonError as e:
            raise self._fail(e, t) from None


class ChannelRecvH(_Handle):
    """A channel's receiving handle (``Channel.recvh()``)."""

    __slots__ = ()
    USE_CHANNEL_RECVH_DEFAULT = "USE_CHANNEL_RECVH_DEFAULT"

    def __init__(
        self,
        ch,
        notification_type=dtypes.RECV_SYNC_MANUAL,
        signal=None,
        wait_mode=dtypes.DEFAULT_WAIT_MODE,
        timeout=None,
    ):
        if signal is not None and not isinstance(signal, int):
            raise ValueError("Signal attribute of receive handle must be an int.")
        super().__init__(ch, timeout)

    @staticmethod
    def _fail(e, t):
        if isinstance(e, QueueEmpty):
            if t == 0:
                return ChannelEmpty("Channel Empty", "DRAGON_CHANNEL_EMPTY")
            return ChannelRecvTimeout(f"Timeout on receive ({t} s)", "DRAGON_TIMEOUT")
        if isinstance(e, ChannelClosedError):
            return ChannelDestroyed("Channel was destroyed", "DRAGON_OBJECT_DESTROYED")
        return ChannelRecvError(f"Could not get message from channel: {e}", "DRAGON_FAILURE")

    def recv(self, dest_msg=None, blocking=True, timeout=USE_DEFAULT) -> Message:
        """The next message (a block message is viewed in place, not copied)."""
        t = self._t(blocking, timeout)
        try:
            data = self._ch.recv_msg(t)
        except DragonError as e:
            raise self._fail(e, t) from None
        m = dest_msg if isinstance(dest_msg, Message) else Message()
        m._alloc = None
        m._data = data
        return m

    def recv_bytes(self, blocking=True, timeout=USE_DEFAULT) -> bytes:
        """The next message's bytes."""
        t = self._t(blocking, timeout)
        try:
            return self._ch.recv(t)
        except DragonError as e:
            raise self._fail(e, t) from None


SendHandle = ChannelSendH
RecvHandle = ChannelRecvH


class Channel:
    """A channel in a ``MemoryPool``: ``Channel(mem_pool, c_uid, block_size=None,
    capacity=None, ...)``; ``Channel.attach(ser)`` reaches an existing one."""

    def __init__(
        self,
        mem_pool,
        c_uid,
        block_size=None,
        capacity=None,
        lock_type=None,
        fc_type=None,
        flags=None,
        def_alloc_pool=None,
        max_spinners=None,
        max_event_bcasts=None,
        semaphore=False,
        bounded_semaphore=False,
        initial_sem_value=0,
    ):
        if not isinstance(mem_pool, MemoryPool):
            raise TypeError(f"Channel takes a MemoryPool, not {type(mem_pool).__name__}")
        if not isinstance(c_uid, int):
            raise TypeError(f"c_uid must be an int, not {type(c_uid).__name__}")
        if not 0 <= c_uid < 2**64:
            raise OverflowError(f"c_uid {c_uid} is not a 64-bit unsigned integer")
        if semaphore or bounded_semaphore:
            raise ChannelError("semaphore channels are not supported by Dragon-RS", "DRAGON_NOT_IMPLEMENTED")
        if block_size is not None and (not isinstance(block_size, int) or block_size < MIN_BLOCK_SIZE):
            raise ChannelError(f"block_size must be an integer of at least {MIN_BLOCK_SIZE}")
        if capacity is not None and (not isinstance(capacity, int) or capacity <= 0):
            raise ChannelError("capacity must be an integer, greater than zero")
        if lock_type is not None and not isinstance(lock_type, LockType):
            raise ChannelError("lock_type must be a value of type LockType")
        capacity = DEFAULT_CAPACITY if capacity is None else capacity
        block_size = DEFAULT_BLOCK_SIZE if block_size is None else block_size
        try:
            ch = _native.Channel.create(mem_pool._live(), capacity, block_size)
        except (DragonError, MemoryError) as e:
            raise ChannelError(f"Could not create Channel: {e}", "DRAGON_FAILURE") from None
        _owned[ch.ref] = ch
        self._setup(ch, mem_pool._name, c_uid, def_alloc_pool or mem_pool, creator=True)

    def _setup(self, ch, pool_name, cuid, default_pool, creator):
        self._ch = ch
        self._ser = None
        self._ref = ch.ref
        self._pool_name = pool_name
        self._cuid = cuid
        self._default_pool = default_pool
        self._creator = creator
        s = ch.stats()
        self._capacity = s["capacity"]
        self._block_size = s["slot_size"]

    def _live(self) -> _native.Channel:
        ch = self._ch
        if ch is None:
            raise ChannelDestroyed(
                "The channel was destroyed or detached by this object", "DRAGON_OBJECT_DESTROYED"
            )
        return ch

    @classmethod
    def attach(cls, serialized_bytes, mem_pool=None) -> Channel:
        """The channel a serialized descriptor names (ChannelDestroyed when it is gone)."""
        parts = None
        try:
            parts = bytes(serialized_bytes).decode("ascii").split(":")
        except (TypeError, UnicodeDecodeError):
            pass
        if not parts or len(parts) != 8 or parts[:2] != [_SER, "chan"]:
            raise ChannelError(
                f"not a serialized Dragon-RS channel: {bytes(serialized_bytes)[:64]!r}",
                "DRAGON_INVALID_ARGUMENT",
            )
        pool_name = parts[2]
        ref = tuple(int(x) for x in parts[3:7])
        ch = _owned.get(ref)
        if ch is None:
            try:
                ch = _native.Channel.attach(pool_name, ref)
            except FileNotFoundError:
                raise ChannelDestroyed(
                    f"the channel's pool {pool_name} was destroyed", "DRAGON_OBJECT_DESTROYED"
                ) from None
            except DragonError as e:
                raise ChannelDestroyed(
                    f"The channel was destroyed and cannot be attached ({e})", "DRAGON_OBJECT_DESTROYED"
                ) from None
        if ch.stats()["closed"]:
            raise ChannelDestroyed(
                "The channel was destroyed and cannot be attached.", "DRAGON_OBJECT_DESTROYED"
            )
        obj = cls.__new__(cls)
        default = mem_pool
        if default is None:
            default = MemoryPool.empty_pool()
            default._setup(_native_pool(pool_name))
        obj._setup(ch, pool_name, int(parts[7]), default, creator=False)
        return obj

    def serialize(self) -> bytes:
        """A descriptor another process of the node attaches with ``Channel.attach`` (also
        after ``detach``; never after ``destroy``)."""
        if self._ch is None:
            if self._ser is None:
                raise ChannelError("Could not serialize channel: it was destroyed or detached")
            return self._ser
        s, o, n, g = self._ref
        return f"{_SER}:chan:{self._pool_name}:{s}:{o}:{n}:{g}:{self._cuid}".encode()

    def __reduce__(self):
        return (Channel.attach, (self.serialize(),))

    @classmethod
    def serialized_uid(cls, ch_ser) -> int:
        """The c_uid of a serialized channel."""
        return int(bytes(ch_ser).decode("ascii").rsplit(":", 1)[1])

    @classmethod
    def serialized_pool_uid_fname(cls, ch_ser) -> tuple[int, str]:
        """(m_uid, pool name) of a serialized channel's pool."""
        name = bytes(ch_ser).decode("ascii").split(":")[2]
        return _muid_of(name), name

    @classmethod
    def make_process_local(cls, pool=None, block_size=None, capacity=None, timeout=None) -> Channel:
        """A channel (in ``pool``, else the node pool) that lives until this process exits or
        ``destroy_process_local``; its c_uid comes from the node agent."""
        _timeout(timeout)
        from dragon import _runtime

        if pool is None:
            pool = MemoryPool.attach_default()
        return cls(pool, _runtime.agent().new_id("c_uid"), block_size=block_size, capacity=capacity)

    def destroy_process_local(self, timeout=None) -> None:
        """Destroys a channel made by ``make_process_local``."""
        _timeout(timeout)
        self.destroy()

    def destroy(self) -> None:
        """Destroys the channel (from any process): it is closed and drained; every blocked
        or later send and receive raises ChannelDestroyed."""
        ch = self._ch
        if ch is None and self._ser is not None:  # detached: reach it again to destroy it
            ch = Channel.attach(self._ser)._ch
        if ch is None:
            raise ChannelDestroyed(
                "The channel does not exist. It was likely already destroyed", "DRAGON_OBJECT_DESTROYED"
            )
        ch.close()
        try:
            while True:
                ch.recv_msg(0)
        except DragonError:
            pass
        _owned.pop(self._ref, None)
        self._ch = self._ser = None

    def detach(self, serialize=False) -> None:
        """Lets go of the channel (it stays until destroyed); the object keeps its descriptor
        for ``serialize()`` and ``destroy()``."""
        self._ser = self.serialize()
        self._live()
        self._ch = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self._ch is None:
            return
        if self._creator:
            self.destroy()
        else:
            self.detach()

    def sendh(
        self, return_mode=dtypes.WHEN_BUFFERED, wait_mode=dtypes.DEFAULT_WAIT_MODE, timeout=None
    ) -> ChannelSendH:
        """A new, unopened send handle (``timeout``: its default, None waits forever)."""
        return ChannelSendH(self, return_mode=return_mode, wait_mode=wait_mode, timeout=timeout)

    def recvh(
        self,
        notification_type=dtypes.RECV_SYNC_MANUAL,
        signal=None,
        wait_mode=dtypes.DEFAULT_WAIT_MODE,
        timeout=None,
    ) -> ChannelRecvH:
        """A new, unopened receive handle."""
        return ChannelRecvH(
            self, notification_type=notification_type, signal=signal, wait_mode=wait_mode, timeout=timeout
        )

    def get_pool(self) -> MemoryPool:
        """The pool the channel lives in."""
        return MemoryPool.attach(f"{_SER}:pool:{self._pool_name}".encode())

    def poll(
        self, timeout=None, wait_mode=dtypes.DEFAULT_WAIT_MODE, event_mask=EventType.POLLIN, poll_result=None
    ):
        """Waits up to ``timeout`` for ``event_mask``: POLLIN (a message waits), POLLOUT (room),
        POLLINOUT (either), POLLEMPTY, POLLFULL; POLLSIZE answers the count at once. True when
        the event happened (or the count through ``poll_result``)."""
        t = _timeout(timeout)
        ch = self._live()
        if event_mask <= 0:
            raise ValueError("event_mask must be POLLIN, POLLOUT, POLLINOUT or one of the other constants")
        if event_mask == EventType.POLLSIZE:
            if poll_result is not None:
                poll_result.value, poll_result.rc = len(ch), "DRAGON_SUCCESS"
            return True
        tests = {
            EventType.POLLIN: lambda n: n > 0,
            EventType.POLLOUT: lambda n: n < self._capacity,
            EventType.POLLINOUT: lambda n: n > 0 or n < self._capacity,
            EventType.POLLEMPTY: lambda n: n == 0,
            EventType.POLLFULL: lambda n: n >= self._capacity,
        }
        test = tests.get(event_mask)
        if test is None:
            raise ChannelError(
                f"poll event {event_mask} is not supported by Dragon-RS", "DRAGON_NOT_IMPLEMENTED"
            )
        deadline = None if t is None else time.monotonic() + t
        pause = 1e-5
        while True:
            if ch.stats()["closed"]:
                raise ChannelDestroyed("Channel was destroyed", "DRAGON_OBJECT_DESTROYED")
            if test(len(ch)):
                ok = True
                break
            if deadline is not None and time.monotonic() >= deadline:
                ok = False
                break
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)
        if poll_result is not None:
            poll_result.value, poll_result.rc = int(ok), "DRAGON_SUCCESS" if ok else "DRAGON_TIMEOUT"
        return ok

    @property
    def cuid(self) -> int:
        return self._cuid

    @property
    def capacity(self) -> int:
        """Messages the channel holds."""
        return self._capacity

    @property
    def block_size(self) -> int:
        """Largest message sent inline (larger ones go in a block of the pool)."""
        return self._block_size

    @property
    def num_msgs(self) -> int:
        """Messages waiting."""
        return len(self._live())

    @property
    def blocked_receivers(self) -> int:
        """Receivers waiting for a message."""
        return self._live().stats()["recv_waiters"]

    @property
    def default_alloc_pool(self) -> MemoryPool:
        return self._default_pool

    @property
    def is_local(self) -> bool:
        return True

    @property
    def fc_type(self) -> FlowControl:
        return FlowControl.NO_FLOW_CONTROL

    @property
    def lock_type(self) -> LockType:
        return LockType.FIFO

    def __repr__(self) -> str:
        return f"<Channel cuid={self._cuid} in {self._pool_name} capacity={self._capacity}>"


class ChannelAdapterMsgTypes(enum.IntEnum):
    """Frames of the peer-to-peer stream (``Peer2PeerReadingChannelFile.check_header``)."""

    EOT = 0
    PICKLE_PROT_5 = 1
    RAW_BYTES = 2


class ChannelSet:
    """Waits for the first of several channels to have a message: ``poll(timeout)`` returns
    ``(channel, EventType.POLLIN)`` or raises ChannelSetTimeout. (Ours looks at the channels'
    counts, sleeping a little longer each round up to 1 ms; the other events and the
    synchronisation modes are accepted and not acted on.)"""

    def __init__(
        self,
        mem_pool,
        channel_list,
        lock_type=None,
        num_allowed_spin_waiters=None,
        event_mask=EventType.POLLIN,
        capture_all_events=True,
    ):
        self._channels = list(channel_list)
        if not all(isinstance(c, Channel) for c in self._channels):
            raise ChannelSetError("a ChannelSet takes Channels")
        self._event = event_mask

    def poll(self, timeout=None, wait_mode=dtypes.IDLE_WAIT):
        t = _timeout(timeout)
        deadline = None if t is None else time.monotonic() + t
        pause = 1e-5
        while True:
            for c in self._channels:
                if len(c._live()) > 0:
                    return c, EventType.POLLIN
            if deadline is not None and time.monotonic() >= deadline:
                raise ChannelSetTimeout("Timeout on poll of the channel set", "DRAGON_TIMEOUT")
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)


class PollResult:
    """What ``Channel.poll(poll_result=...)`` fills in: ``value`` and ``rc``."""

    def __init__(self, value=None, rc=None):
        self.value = value
        self.rc = rc

    def __repr__(self) -> str:
        return f"PollResult({self.value},{self.rc})"


def register_gateways_from_env() -> None:
    """Nothing to do: channels of other nodes are reached through their object server."""


def discard_gateways() -> None:
    """Nothing to do (see ``register_gateways_from_env``)."""
