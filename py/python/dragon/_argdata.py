"""Starting arguments (``argdata``) of a process made by ``dragon.globalservices.process``:
bytes kept in the runtime's name registry (kind ``"argdata"``) under a key the process's
environment names, read once by the process."""

from __future__ import annotations

import os

ARGDATA_ENV = "DRAGON_ARGDATA"


def run() -> None:
    """Runs the ``(target, args, kwargs)`` this process's argdata holds (cloudpickle or
    pickle): the body of DragonHPC's ``_dragon_native_python_process_main``."""
    import pickle

    from dragon import _runtime
    from dragon.exceptions import ProcessError

    key = os.environ.pop(ARGDATA_ENV, None)
    if key is None:
        raise ProcessError("this process was not started with argdata (dragon.globalservices.process)")
    data = _runtime.agent().unregister("argdata", key)
    if data is None:
        raise ProcessError(f"the argdata of this process ({key}) is gone")
    target, args, kwargs = pickle.loads(data)
    target(*args, **kwargs)
