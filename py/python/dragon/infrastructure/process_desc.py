"""DragonHPC's ``dragon.infrastructure.process_desc``: the description of a managed process
that ``dragon.globalservices.process`` hands out, and the options of a process launch."""

from __future__ import annotations

import enum

from dragon.infrastructure.policy import Policy


class ArgMode(enum.Enum):
    """How a process gets its starting arguments (``argdata``)."""

    NONE = 0
    PYTHON_IMMEDIATE = 1
    PYTHON_CHANNEL = 2


def mk_argmode_from_default(mode) -> ArgMode:
    """``mode`` as an ArgMode (None: PYTHON_IMMEDIATE)."""
    if mode is None:
        return ArgMode.PYTHON_IMMEDIATE
    return mode if isinstance(mode, ArgMode) else ArgMode(mode)


class ProcessDescriptor:
    """What the runtime knows about a managed process: ``p_uid``, ``p_p_uid`` (its parent),
    ``name``, ``node`` (index), ``h_uid``, ``policy``, ``state`` and ``ecode`` (exit code,
    once DEAD)."""

    class State(enum.Enum):
        """Run state of the process."""

        PENDING = enum.auto()
        ACTIVE = enum.auto()
        DEAD = enum.auto()

    def __init__(
        self,
        *,
        p_uid,
        p_p_uid=None,
        name="",
        node=0,
        policy=None,
        h_uid=None,
        live_children=None,
        gs_ret_cuid=None,
        shep_ret_cuid=None,
        state=None,
        ecode=None,
        stdin_sdesc=None,
        stdout_sdesc=None,
        stderr_sdesc=None,
    ):
        self.p_uid = int(p_uid)
        self.p_p_uid = p_p_uid
        self.name = name
        self.node = int(node)
        self.h_uid = h_uid
        self.policy = Policy.from_sdict(policy) if isinstance(policy, dict) else policy
        self.live_children = set(live_children or ())
        self.gs_ret_cuid = gs_ret_cuid
        self.shep_ret_cuid = shep_ret_cuid
        self.ecode = ecode
        if state is None:
            state = self.State.PENDING
        self.state = state if isinstance(state, self.State) else self.State(state)
        self.stdin_sdesc, self.stdout_sdesc, self.stderr_sdesc = stdin_sdesc, stdout_sdesc, stderr_sdesc
        self.stdin_conn = self.stdout_conn = self.stderr_conn = None

    def __str__(self) -> str:
        s = f"{self.p_uid}:{self.name} on {self.node}: {self.state.name}"
        return s + (f" exit {self.ecode}" if self.state is self.State.DEAD else "")

    def get_sdict(self) -> dict:
        """The descriptor as a dict of plain values (``from_sdict`` takes it back)."""
        d = {
            "p_uid": self.p_uid,
            "p_p_uid": self.p_p_uid,
            "name": self.name,
            "node": self.node,
            "live_children": sorted(self.live_children),
            "state": self.state.value,
            "policy": self.policy.get_sdict() if isinstance(self.policy, Policy) else None,
            "stdin_sdesc": self.stdin_sdesc,
            "stdout_sdesc": self.stdout_sdesc,
            "stderr_sdesc": self.stderr_sdesc,
        }
        if self.state is self.State.DEAD:
            d["ecode"] = self.ecode
        for k in ("h_uid", "gs_ret_cuid", "shep_ret_cuid"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        return d

    @property
    def sdesc(self) -> dict:
        """The serialized descriptor (``get_sdict()``)."""
        return self.get_sdict()

    @classmethod
    def from_sdict(cls, sdict: dict) -> ProcessDescriptor:
        """The descriptor of ``get_sdict()``'s dict."""
        return cls(**sdict)


class ProcessOptions:
    """Options of a process launch: ``argdata`` (bytes for the new process), ``mode`` (an
    ArgMode) and ``make_inf_channels`` (DragonHPC makes infrastructure channels for the
    process; here every process can reach the runtime without them, so it changes nothing)."""

    def __init__(self, make_inf_channels: bool = False, mode=None, argdata=None):
        self.argdata = argdata
        self.mode = mk_argmode_from_default(mode)
        self.make_inf_channels = make_inf_channels

    def get_sdict(self) -> dict:
        """The options as a dict (``from_sdict`` takes it back)."""
        return {"mode": self.mode.value, "argdata": self.argdata, "make_inf_channels": self.make_inf_channels}

    @staticmethod
    def from_sdict(sdict: dict) -> ProcessOptions:
        """The options of ``get_sdict()``'s dict."""
        return ProcessOptions(**sdict)
