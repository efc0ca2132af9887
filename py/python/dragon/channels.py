"""DragonHPC's ``dragon.channels`` over our shared-memory channels (``dragon._native.Channel``,
a bounded MPMC ring in a block of a pool).

* ``Channel(pool, c_uid, block_size=None, capacity=None)`` makes a channel in a
  ``MemoryPool``; ``serialize()`` / ``Channel.attach(ser)`` (or pickling) reach it from any
  process of the node. Messages up to ``block_size`` bytes travel inline in the ring's
  slots; larger ones in a block of the channel's pool (one copy in; the receiver views the
  block). A message sent with ``transfer_ownership_on_send`` whose memory is a whole
  allocation of the channel's pool moves that block itself: no copy at all.
* The channel lives until ``destroy()`` (by any process) or until the creating process
  exits, as DragonHPC's does; dropping or detaching the creator's object does not end it.
  After ``destroy`` every send and receive, here or in another process, raises
  ``ChannelDestroyed``.
* Handles (``sendh()``/``recvh()``, also named ``SendHandle``/``RecvHandle``) must be
  opened; ``blocking=False`` or ``timeout=0`` tries once (``ChannelFull``/``ChannelEmpty``),
  a positive time-out ends in ``ChannelSendTimeout``/``ChannelRecvTimeout`` (all of them
  ``TimeoutError``\\s). Wait, return and lock modes are accepted and not acted on.
* The file adapters (``Many2Many*ChannelFile``: one message per ``open``..``close``;
  ``Peer2Peer*ChannelFile``: a byte stream over messages) are what ``pickle.dump`` and
  ``pickle.load`` take; they are in ``dragon._chfiles``, the rest in ``dragon._channel``.
"""

from dragon._channel import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_CAPACITY,
    USE_DEFAULT,
    Channel,
    ChannelAdapterMsgTypes,
    ChannelBarrierBroken,
    ChannelBarrierReady,
    ChannelDestroyed,
    ChannelEmpty,
    ChannelError,
    ChannelFlags,
    ChannelFull,
    ChannelHandleNotOpenError,
    ChannelRecvError,
    ChannelRecvH,
    ChannelRecvTimeout,
    ChannelRemoteOperationNotSupported,
    ChannelSendError,
    ChannelSendH,
    ChannelSendTimeout,
    ChannelSet,
    ChannelSetError,
    ChannelSetTimeout,
    ChannelTimeout,
    ChannelValueError,
    EventType,
    FlowControl,
    LockType,
    Message,
    OwnershipOnSend,
    PollResult,
    RecvHandle,
    SendHandle,
    copy_on_send,
    discard_gateways,
    register_gateways_from_env,
    transfer_ownership_on_send,
)
from dragon._chfiles import (
    Many2ManyReadingChannelFile,
    Many2ManyWritingChannelFile,
    Peer2PeerReadingChannelFile,
    Peer2PeerWritingChannelFile,
)
from dragon.dtypes import ADAPTIVE_WAIT, IDLE_WAIT, SPIN_WAIT

__all__ = [
    "ADAPTIVE_WAIT",
    "IDLE_WAIT",
    "SPIN_WAIT",
    "ChannelSet",
    "Channel",
    "ChannelAdapterMsgTypes",
    "ChannelBarrierBroken",
    "ChannelBarrierReady",
    "ChannelDestroyed",
    "ChannelEmpty",
    "ChannelError",
    "ChannelFlags",
    "ChannelFull",
    "ChannelHandleNotOpenError",
    "ChannelRecvError",
    "ChannelRecvH",
    "ChannelRecvTimeout",
    "ChannelRemoteOperationNotSupported",
    "ChannelSendError",
    "ChannelSendH",
    "ChannelSendTimeout",
    "ChannelSetError",
    "ChannelSetTimeout",
    "ChannelTimeout",
    "ChannelValueError",
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_CAPACITY",
    "EventType",
    "FlowControl",
    "LockType",
    "Many2ManyReadingChannelFile",
    "Many2ManyWritingChannelFile",
    "Message",
    "OwnershipOnSend",
    "Peer2PeerReadingChannelFile",
    "Peer2PeerWritingChannelFile",
    "PollResult",
    "RecvHandle",
    "SendHandle",
    "USE_DEFAULT",
    "copy_on_send",
    "discard_gateways",
    "register_gateways_from_env",
    "transfer_ownership_on_send",
]
