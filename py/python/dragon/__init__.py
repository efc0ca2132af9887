"""Dragon-RS: DragonHPC's Python API on a Rust runtime.

So far this package ships the native shared-memory layer, ``dragon._native`` (pools,
channels and process-shared sync objects that any process of the node can attach to).
The launcher, ``dragon.native.*``, the "dragon" start method and DDict build on it.
"""

# Kept in step with the workspace version (Cargo.toml); a static string keeps `import dragon`
# fast (importlib.metadata costs ~80 ms in every managed process).
__version__ = "0.1.0"
