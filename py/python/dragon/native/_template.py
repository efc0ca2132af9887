"""DragonHPC's ``ProcessTemplate``: what to start, for one process or many (a group's, a
pool's); ``dragon.native.process.Process`` extends it. ``get_sdict``/``from_sdict`` turn a
template into a dict of plain values (JSON-serializable) and back."""

from __future__ import annotations

import binascii
import os
import sys
from collections.abc import Callable
from typing import Any

from dragon.infrastructure.policy import Policy


class ProcessTemplate:
    """What to start (target, args, cwd, env, streams, policy) for one or many processes."""

    PIPE = -1
    STDOUT = -2
    DEVNULL = -3

    def __init__(
        self,
        target: Callable | str,
        args: tuple | None = None,
        kwargs: dict | None = None,
        cwd: str = ".",
        env: dict | None = None,
        stdin: int | None = None,
        stdout: int | str | None = None,
        stderr: int | str | None = None,
        policy: Policy | None = None,
        options: Any = None,
    ):
        if not (callable(target) or isinstance(target, (str, bytes, os.PathLike))):
            raise TypeError(f"target must be a callable or an executable name, not {type(target).__name__}")
        if policy is not None and not isinstance(policy, Policy):
            raise TypeError("policy must be a dragon.infrastructure.policy.Policy")
        self.target = target
        self.args = tuple(args or ())
        self.kwargs = dict(kwargs or {})
        self.cwd = os.fspath(cwd) if cwd is not None else "."
        self.env = dict(env or {})
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self.policy = policy
        self.options = options

    @property
    def is_python(self) -> bool:
        """Whether the target is a Python callable."""
        return callable(self.target)

    def get_original_python_parameters(self) -> tuple[Callable, tuple, dict]:
        """The callable, args and kwargs as given."""
        return self.target, self.args, self.kwargs

    def start(self) -> None:
        """A template cannot be started: make a ``Process`` from it (``Process.from_template``)."""
        raise NotImplementedError("You need to create a Process object from this template to start it.")

    @property
    def sdesc(self) -> dict:
        """The template as a dict of plain values (``get_sdict``)."""
        return self.get_sdict()

    def get_sdict(self) -> dict:
        """The template as a JSON-serializable dict with DragonHPC's keys (``is_python``,
        ``target``, ``args``, ``argdata``, ``env``, ``cwd``, ``stdout``, ``stderr``,
        ``stdin``, ``options``, ``policy``); ``from_sdict`` rebuilds it. For a Python target,
        ``target``/``args`` are the interpreter command that runs it and ``argdata`` is the
        cloudpickled ``(callable, args, kwargs)`` in base64; ``policy`` and ``options`` are
        pickled in base64 too."""
        import cloudpickle

        def b64(obj) -> str | None:
            if obj is None:
                return None
            return binascii.b2a_base64(cloudpickle.dumps(obj), newline=False).decode()

        if self.is_python:
            target, args = sys.executable, ["-m", "dragon._worker"]
            argdata = b64((self.target, self.args, self.kwargs))
        else:
            target, args, argdata = os.fsdecode(self.target), list(self.args), None
        return {
            "is_python": self.is_python,
            "target": target,
            "args": args,
            "argdata": argdata,
            "env": dict(self.env),
            "cwd": self.cwd,
            "stdout": self.stdout,
            "stderr": self.stderr,
            "stdin": self.stdin,
            "options": b64(self.options),
            "policy": b64(self.policy),
        }

    @classmethod
    def from_sdict(cls, sdict: dict):
        """The template (or, called on ``Process``, an unstarted process) that ``get_sdict``
        described."""
        import cloudpickle

        def unb64(v):
            return None if v is None else cloudpickle.loads(binascii.a2b_base64(v))

        if sdict["is_python"]:
            target, args, kwargs = unb64(sdict["argdata"])
        else:
            target, args, kwargs = sdict["target"], sdict["args"], None
        return cls(
            target,
            args,
            kwargs,
            cwd=sdict["cwd"],
            env=sdict["env"],
            stdin=sdict["stdin"],
            stdout=sdict["stdout"],
            stderr=sdict["stderr"],
            policy=unb64(sdict["policy"]),
            options=unb64(sdict["options"]),
        )
