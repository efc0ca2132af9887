"""Dragon-RS: DragonHPC's Python API on a Rust runtime.

So far this package ships the native shared-memory layer, ``dragon._native`` (pools,
channels and process-shared sync objects that any process of the node can attach to).
The launcher, ``dragon.native.*``, the "dragon" start method and DDict build on it.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("dragon-rs")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"
