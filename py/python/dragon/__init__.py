"""Dragon-RS: DragonHPC's Python API on a Rust runtime.

So far this package ships the native shared-memory layer, ``dragon._native`` (pools,
channels and process-shared sync objects that any process of the node can attach to).
The launcher, ``dragon.native.*``, the "dragon" start method and DDict build on it. Every
error they raise for a Dragon condition is a ``dragon.DragonError`` (``dragon.exceptions``).
"""

# Kept in step with the workspace version (Cargo.toml); a static string keeps `import dragon`
# fast (importlib.metadata costs ~80 ms in every managed process).
__version__ = "0.1.0"


def __getattr__(name: str):
    """The exception hierarchy of ``dragon.exceptions`` (``dragon.DragonError``, ...), imported
    on first use so that ``import dragon`` stays cheap in every managed process. Its names are
    the capitalised ones; anything else is a submodule, or missing."""
    if name[:1].isupper():
        import dragon.exceptions as exceptions

        if name in exceptions.__all__:
            return getattr(exceptions, name)
    raise AttributeError(f"module 'dragon' has no attribute {name!r}")


def _register_start_method() -> None:
    """Registers the "dragon" multiprocessing start method now if multiprocessing is loaded,
    else right after it is imported (so ``import dragon`` costs nothing otherwise)."""
    import sys

    if "multiprocessing.context" in sys.modules:
        from dragon import _mp

        _mp.register()
        return

    class _Hook:
        def find_spec(self, name, path=None, target=None):
            if name != "multiprocessing":
                return None
            import importlib.util

            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            if spec is None or spec.loader is None:
                return spec
            exec_module = spec.loader.exec_module

            def exec_and_register(module):
                exec_module(module)
                _mp = sys.modules.get("dragon._mp")
                if _mp is not None and not hasattr(_mp, "register"):
                    return  # dragon._mp is importing multiprocessing: it registers at its end
                from dragon import _mp

                _mp.register()

            spec.loader.exec_module = exec_and_register
            return spec

    sys.meta_path.insert(0, _Hook())


_register_start_method()
