"""Placement and affinity of processes: DragonHPC's ``Policy``.

A :class:`Policy` says where a process (or an object's manager) should run: on which node
(``placement`` with ``host_name`` or ``host_id``), how a group spreads over nodes
(``distribution``), which CPUs and GPUs it may use (``cpu_affinity``, ``gpu_affinity``) and how
it waits (``wait_mode``). Fields left at their defaults take the value of the policy in force
around them: ``with Policy(...):`` blocks nest, each one merged over the one outside it, and
the result is what :meth:`Policy.thread_policy` returns and what processes started inside
inherit (through the ``DRAGON_POLICY_CONTEXT_ENV`` environment variable).
"""

from __future__ import annotations

import enum
import json
import os
import threading
from dataclasses import dataclass, field, fields
from typing import Any

from dragon.exceptions import PolicyError

#: Environment variable that carries the policy in force to child processes (JSON).
DRAGON_POLICY_CONTEXT_ENV = "DRAGON_POLICY_CONTEXT_ENV"


@dataclass
class Policy:
    """Where and how a process runs; see the module documentation."""

    class Placement(enum.IntEnum):
        """Which node a process goes to."""

        LOCAL = -5  #: the node of the process that starts it
        ANYWHERE = -4  #: any node, by the runtime's choice
        HOST_NAME = -3  #: the node named by ``host_name``
        HOST_ID = -2  #: the node with ``host_id`` (an h_uid)
        DEFAULT = -1  #: inherit

    class Distribution(enum.IntEnum):
        """How a group of processes spreads over nodes."""

        ROUNDROBIN = 1
        BLOCK = 2
        DEFAULT = 3

    class WaitMode(enum.IntEnum):
        """How blocked processes wait (our blocking calls always sleep after a short spin)."""

        IDLE = 1
        SPIN = 2
        DEFAULT = 3

    placement: Policy.Placement = Placement.DEFAULT
    host_name: str = ""
    host_id: int = -1
    distribution: Policy.Distribution = Distribution.DEFAULT
    cpu_affinity: list[int] = field(default_factory=list)
    gpu_env_str: str = ""
    gpu_affinity: list[int] = field(default_factory=list)
    wait_mode: Policy.WaitMode = WaitMode.DEFAULT
    refcounted: bool = True

    def __post_init__(self) -> None:
        self.placement = Policy.Placement(self.placement)
        self.distribution = Policy.Distribution(self.distribution)
        self.wait_mode = Policy.WaitMode(self.wait_mode)
        if not isinstance(self.host_name, str):
            raise TypeError(f"host_name must be a str, not {type(self.host_name).__name__}")
        if not isinstance(self.gpu_env_str, str):
            raise TypeError("gpu_env_str must be a str")
        if isinstance(self.host_id, bool) or not isinstance(self.host_id, int):
            raise TypeError(f"host_id must be an int, not {type(self.host_id).__name__}")
        self.cpu_affinity = _int_list("cpu_affinity", self.cpu_affinity)
        self.gpu_affinity = _int_list("gpu_affinity", self.gpu_affinity)

    # ----- serialization -------------------------------------------------------------

    def get_sdict(self) -> dict[str, Any]:
        """The policy as a dict of plain values (``from_sdict`` reverses it)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def sdesc(self) -> dict[str, Any]:
        """Same as :meth:`get_sdict`."""
        return self.get_sdict()

    @staticmethod
    def from_sdict(sdict: dict[str, Any]) -> Policy:
        """Rebuilds a policy from :meth:`get_sdict` output."""
        return Policy(**sdict)

    def _to_json(self) -> str:
        d = self.get_sdict()
        for k in ("placement", "distribution", "wait_mode"):
            d[k] = int(d[k])
        return json.dumps(d)

    @staticmethod
    def _from_json(s: str) -> Policy:
        return Policy.from_sdict(json.loads(s))

    # ----- merging and the context stack -----------------------------------------------

    @staticmethod
    def merge(low_policy: Policy, high_policy: Policy) -> Policy:
        """A new policy: ``low_policy`` with every field that ``high_policy`` sets (not at
        its default) taken from ``high_policy``."""
        if not isinstance(low_policy, Policy) or not isinstance(high_policy, Policy):
            raise TypeError("Policy.merge takes two Policy objects")
        out = {}
        for f in fields(Policy):
            default = f.default_factory() if callable(f.default_factory) else f.default
            hv = getattr(high_policy, f.name)
            out[f.name] = getattr(low_policy, f.name) if hv == default else hv
        return Policy(**out)

    @staticmethod
    def global_policy() -> Policy:
        """The runtime's default: anywhere, round robin, idle waits."""
        return Policy(
            placement=Policy.Placement.ANYWHERE,
            distribution=Policy.Distribution.ROUNDROBIN,
            wait_mode=Policy.WaitMode.IDLE,
        )

    @staticmethod
    def thread_policy() -> Policy:
        """The policy in force in this thread: the innermost ``with Policy(...)`` merged over
        the outer ones and over what this process inherited."""
        stack = _stack()
        return stack[-1] if stack else _inherited()

    def __enter__(self) -> Policy:
        merged = Policy.merge(Policy.thread_policy(), self)
        _stack().append(merged)
        return self

    def __exit__(self, *exc: object) -> None:
        stack = _stack()
        if stack:
            stack.pop()


def _int_list(name: str, v: Any) -> list[int]:
    if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
        raise TypeError(f"{name} must be a list of ints, not {type(v).__name__}")
    out = []
    for x in v:
        if isinstance(x, bool) or not isinstance(x, int):
            raise TypeError(f"{name} must contain ints, found {x!r}")
        if x < 0:
            raise ValueError(f"{name} entries must be >= 0, found {x}")
        out.append(x)
    return out


_local = threading.local()


def _stack() -> list[Policy]:
    s = getattr(_local, "stack", None)
    if s is None:
        s = _local.stack = []
    return s


def _inherited() -> Policy:
    s = os.environ.get(DRAGON_POLICY_CONTEXT_ENV)
    if not s:
        return Policy()
    try:
        return Policy._from_json(s)
    except (ValueError, TypeError) as e:
        raise PolicyError(f"bad {DRAGON_POLICY_CONTEXT_ENV} in the environment: {e}") from None


def policy_env(policy: Policy) -> dict[str, str]:
    """Environment entries that make a child process inherit ``policy``."""
    return {DRAGON_POLICY_CONTEXT_ENV: policy._to_json()}
