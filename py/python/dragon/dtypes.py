"""DragonHPC's ``dragon.dtypes``: the base exception of the lower-level faces
(``dragon.managed_memory``, ``dragon.channels``) and the wait, return and notification modes
their handles take.

Our channels have one wait strategy (spin briefly, then sleep on a futex) and a send returns
once the message is in the channel, so the modes are accepted and recorded, never acted on.
"""

from __future__ import annotations

from dragon.exceptions import DragonError


class DragonException(DragonError):
    """Base of DragonHPC's lower-level exceptions: ``DragonException(msg, lib_err=None)``.
    ``lib_err`` names the condition (``"DRAGON_TIMEOUT"``, ...) where DragonHPC gives its C
    return code."""

    def __init__(self, msg, lib_err=None, lib_msg=None, lib_err_str=None):
        super().__init__(msg)
        self._msg = msg
        self._lib_err = lib_err
        self._lib_msg = lib_msg
        self._lib_err_str = lib_err_str if lib_err_str is not None else lib_err

    def __str__(self) -> str:
        if self._lib_err_str is None:
            return f"Dragon Message: {self._msg}"
        return f"Dragon Message: {self._msg} | Return Code: {self._lib_err_str}"

    @property
    def lib_err(self):
        """The condition, or None."""
        return self._lib_err


class DragonObjectDestroyed(DragonException):
    """The object was destroyed."""


class _Mode:
    """A named mode value (DragonHPC's ``WaitMode``, ``ReturnWhen``, ``RecvNotifType``)."""

    def __init__(self, kind: str, value: int):
        self._kind = kind
        self._value = value

    @property
    def value(self) -> int:
        return self._value

    def __eq__(self, other) -> bool:
        return isinstance(other, _Mode) and (other._kind, other._value) == (self._kind, self._value)

    def __hash__(self) -> int:
        return hash((self._kind, self._value))

    def __repr__(self) -> str:
        return f"{self._kind}({self._value})"

    def __reduce__(self):
        return (_Mode, (self._kind, self._value))


def WaitMode(wait_mode: int = 0) -> _Mode:  # noqa: N802 (DragonHPC's class name)
    """A wait mode: ``IDLE_WAIT`` (0), ``SPIN_WAIT`` (1), ``ADAPTIVE_WAIT`` (2)."""
    return _Mode("WaitMode", wait_mode)


def ReturnWhen(return_when: int = 1) -> _Mode:  # noqa: N802
    """When a send returns: ``WHEN_IMMEDIATE``, ``WHEN_BUFFERED``, ... ."""
    return _Mode("ReturnWhen", return_when)


def RecvNotifType(notification_type: int = 1) -> _Mode:  # noqa: N802
    """How a receiver is told: ``RECV_SYNC_MANUAL`` or ``RECV_SYNC_SIGNAL``."""
    return _Mode("RecvNotifType", notification_type)


IDLE_WAIT = WaitMode(0)
SPIN_WAIT = WaitMode(1)
ADAPTIVE_WAIT = WaitMode(2)
DEFAULT_WAIT_MODE = ADAPTIVE_WAIT

WHEN_IMMEDIATE = ReturnWhen(0)
WHEN_BUFFERED = ReturnWhen(1)
WHEN_DEPOSITED = ReturnWhen(2)
WHEN_RECEIVED = ReturnWhen(3)

RECV_SYNC_SIGNAL = RecvNotifType(0)
RECV_SYNC_MANUAL = RecvNotifType(1)
