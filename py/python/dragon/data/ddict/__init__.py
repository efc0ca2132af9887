"""``dragon.data.ddict``: the distributed dictionary (the client ``DDict`` is in ``ddict.py``;
see its docstring for the package's other modules)."""

from .ddict import *  # noqa: F403
from .ddict import __all__  # noqa: F401
