"""``dragon.data.ddict``: the distributed dictionary (see ``ddict.py``)."""

from .ddict import *  # noqa: F403
from .ddict import __all__  # noqa: F401
