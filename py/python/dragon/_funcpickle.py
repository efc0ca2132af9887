"""Functions of the driver script, pickled by value without cloudpickle on the receiving side.

A process target defined in ``__main__`` (a function or a lambda) cannot be pickled by
reference: the child runs another main module. cloudpickle pickles it by value, but loading
its output imports cloudpickle, which costs a short-lived child ~50 ms of CPU. For the common
case (a plain function or lambda of ``__main__`` whose globals are modules, plain data and
other such functions), ``dumps`` here writes the function as its marshalled code plus the
globals it names, its defaults and closure; loading it needs only ``marshal`` and this module.
Anything else (classes of ``__main__``, mutual recursion, objects pickle cannot handle)
raises :class:`Unsupported`, and the caller falls back to cloudpickle.
"""

from __future__ import annotations

import builtins
import importlib
import io
import marshal
import pickle
import types


class Unsupported(Exception):
    """The object needs cloudpickle."""


def _names(code: types.CodeType, out: set) -> set:
    out.update(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            _names(c, out)
    return out


def _make_function(code, name, qualname, globals_, defaults, kwdefaults, closure, attrs, self_names=()):
    g = {"__builtins__": builtins, "__name__": "__main__"}
    g.update(globals_)
    cells = None if closure is None else tuple(types.CellType(v) for v in closure)
    f = types.FunctionType(marshal.loads(code), g, name, defaults, cells)
    f.__qualname__ = qualname
    f.__kwdefaults__ = kwdefaults
    f.__module__ = "__main__"
    if attrs:
        f.__dict__.update(attrs)
    for n in self_names:
        g[n] = f  # a recursive function names itself
    return f


class _Pickler(pickle.Pickler):
    def __init__(self, file):
        super().__init__(file, protocol=5)
        self._busy: set = set()

    def reducer_override(self, obj):
        if isinstance(obj, types.ModuleType):
            if obj.__name__ == "__main__":
                raise Unsupported("the main module itself")
            return importlib.import_module, (obj.__name__,)
        if getattr(obj, "__module__", None) != "__main__":
            return NotImplemented
        if type(obj) is not types.FunctionType:
            raise Unsupported(f"{type(obj).__name__} of __main__")
        if id(obj) in self._busy:
            raise Unsupported("functions of __main__ that refer to each other")
        self._busy.add(id(obj))
        try:
            code = obj.__code__
            names = _names(code, set())
            here = [n for n in sorted(names) if n in obj.__globals__]
            glob = {n: obj.__globals__[n] for n in here if obj.__globals__[n] is not obj}
            self_names = tuple(n for n in here if obj.__globals__[n] is obj)
            closure = None
            if obj.__closure__ is not None:
                try:
                    closure = [c.cell_contents for c in obj.__closure__]
                except ValueError:  # an empty cell
                    raise Unsupported("a closure cell that is not set yet") from None
            return _make_function, (
                marshal.dumps(code),
                obj.__name__,
                obj.__qualname__,
                glob,
                obj.__defaults__,
                obj.__kwdefaults__,
                closure,
                dict(obj.__dict__) or None,
                self_names,
            )
        finally:
            self._busy.discard(id(obj))


def dumps(obj) -> bytes:
    """Pickles ``obj`` (protocol 5), functions of ``__main__`` by value; raises
    :class:`Unsupported` when it takes cloudpickle."""
    f = io.BytesIO()
    try:
        _Pickler(f).dump(obj)
    except Unsupported:
        raise
    except Exception as e:
        raise Unsupported(str(e)) from e
    return f.getvalue()
