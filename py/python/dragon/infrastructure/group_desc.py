"""DragonHPC's ``dragon.infrastructure.group_desc``: the description of a group of
resources (here: processes) that ``dragon.globalservices.group`` hands out."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from dragon.infrastructure.policy import Policy
from dragon.infrastructure.process_desc import ProcessDescriptor


@dataclass
class GroupDescriptor:
    """A group: ``g_uid``, ``name``, ``policy``, ``state`` and ``sets``, one list of
    ``GroupMember`` per item the group was made or extended with."""

    class State(enum.IntEnum):
        """State of the group."""

        PENDING = 0
        ACTIVE = 1
        DEAD = 2

    @dataclass
    class GroupMember:
        """One member: ``uid`` (its p_uid), ``placement`` (its node index), ``desc`` (its
        ProcessDescriptor), ``state``, ``error_code`` and ``error_info``."""

        class Errors(enum.Enum):
            """Whether the member was made."""

            SUCCESS = 0
            FAIL = 1
            ALREADY = 2

        state: object = None
        uid: int | None = None
        placement: int | None = None
        desc: object = None
        error_code: object = None
        error_info: str | None = None

        def get_sdict(self) -> dict:
            """The member as a dict (``from_sdict`` takes it back)."""
            return {
                "state": self.state if isinstance(self.state, int) else self.state.value,
                "uid": self.uid,
                "placement": self.placement,
                "desc": self.desc.get_sdict() if self.desc is not None else None,
                "error_code": self.error_code.value
                if isinstance(self.error_code, enum.Enum)
                else self.error_code,
                "error_info": self.error_info,
            }

        @classmethod
        def from_sdict(cls, d: dict) -> GroupDescriptor.GroupMember:
            """The member of ``get_sdict()``'s dict."""
            d = dict(d)
            if isinstance(d.get("desc"), dict):
                d["desc"] = ProcessDescriptor.from_sdict(d["desc"])
            return cls(**d)

    state: State = State.PENDING
    g_uid: int | None = None
    name: str | None = None
    sets: list = field(default_factory=list)
    policy: object = None
    resilient: bool = False

    def __post_init__(self):
        if isinstance(self.policy, dict):
            self.policy = Policy.from_sdict(self.policy)
        self.sets = [
            [
                m if isinstance(m, GroupDescriptor.GroupMember) else GroupDescriptor.GroupMember.from_sdict(m)
                for m in s
            ]
            for s in self.sets
        ]

    def get_sdict(self) -> dict:
        """The group as a dict (``from_sdict`` takes it back)."""
        return {
            "state": int(self.state),
            "g_uid": self.g_uid,
            "name": self.name,
            "sets": [[m.get_sdict() for m in s] for s in self.sets],
            "policy": self.policy.get_sdict() if isinstance(self.policy, Policy) else None,
            "resilient": self.resilient,
        }

    @property
    def sdesc(self) -> dict:
        """The serialized descriptor (``get_sdict()``)."""
        return self.get_sdict()

    @classmethod
    def from_sdict(cls, d: dict) -> GroupDescriptor:
        """The group of ``get_sdict()``'s dict."""
        return cls(**d)
