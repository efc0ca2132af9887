"""DragonHPC's native API (``dragon.native.*``).

The public names DragonHPC exports here (``from dragon.native import Process, Queue``) are
loaded on first use, so importing one submodule does not import them all.
"""

import importlib

_EXPORTS = {
    "Semaphore": "semaphore",
    "cpu_count": "machine",
    "Lock": "lock",
    "Event": "event",
    "Barrier": "barrier",
    "Process": "process",
    "Popen": "process",
    "Value": "value",
    "Array": "array",
    "Pool": "pool",
    "Queue": "queue",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'dragon.native' has no attribute {name!r}")
    return getattr(importlib.import_module(f"dragon.native.{mod}"), name)
