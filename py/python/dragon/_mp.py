"""The "dragon" multiprocessing start method (first part of issue 4).

``import dragon`` registers it: ``multiprocessing.set_start_method("dragon")`` and
``multiprocessing.get_context("dragon")`` work, whether ``multiprocessing`` was imported
before or after ``dragon``. Processes of this context are launched by the node agent (the
Policy in force applied between fork and exec, the descriptors spawn needs handed over by
number) and bootstrap like "spawn" children, so CPython's semantics (pickling with
``ForkingPickler``, ``__main__`` handling, sentinels, exit codes) hold. The other objects
of the context are CPython's spawn-compatible ones (Lock, Value, ...), made shareable
(below), except Pipe, Queue, JoinableQueue and SimpleQueue, which are message-oriented
versions (``dragon._conn``): a message is one packet on a real descriptor, and large data
(a NumPy array: any pickle-5 out-of-band buffer) travels in a block of the runtime's node
pool, copied once, which the receiver's object views in place.
"""

from __future__ import annotations

from multiprocessing import context, process

from dragon._nodecount import multinode as _multinode
from dragon._sharing import reduce_shared


class DragonProcess(process.BaseProcess):
    """A multiprocessing Process started by the Dragon runtime."""

    _start_method = "dragon"

    @staticmethod
    def _Popen(process_obj):
        # Imported here: a child of this start method never starts processes unless it asks,
        # and the launcher's Popen pulls in the native module (a shorter start for every child).
        if _multinode():
            from dragon import _mp_nodes
            from dragon.native import machine

            node = _mp_nodes.target_node()
            if node != machine.my_node_index():
                return _mp_nodes.RemotePopen(process_obj, node)
        from dragon._popen import Popen

        return Popen(process_obj)


# ----- objects that can be shared with any process of the runtime (see dragon._sharing) -----


def _rebuild_synchronized(obj, lock):
    from multiprocessing import sharedctypes

    return _shareable_sync(sharedctypes.synchronized(obj, lock))


def _shareable(base: type) -> type:
    synchronized = base.__name__.startswith("Synchronized")

    def __reduce_ex__(self, protocol):
        if context.get_spawning_popen() is not None:
            if synchronized:
                # As SynchronizedBase.__reduce__, but the copy stays shareable.
                return _rebuild_synchronized, (self._obj, self._lock)
            return base.__reduce_ex__(self, protocol)
        return reduce_shared(self)

    ns = {"__reduce_ex__": __reduce_ex__, "__module__": __name__}
    return type(base.__name__, (base,), ns)


_SHAREABLE: dict = {}
_SHAREABLE_NAMES = frozenset(
    "Lock RLock Semaphore BoundedSemaphore Condition Event Barrier "
    "Synchronized SynchronizedArray SynchronizedString".split()
)


def _shareable_classes() -> dict:
    """The shareable subclasses, made on first use (so that importing dragon does not import
    multiprocessing's queues, synchronize and sharedctypes)."""
    if not _SHAREABLE:
        from multiprocessing import sharedctypes, synchronize

        bases = {
            "Lock": synchronize.Lock,
            "RLock": synchronize.RLock,
            "Semaphore": synchronize.Semaphore,
            "BoundedSemaphore": synchronize.BoundedSemaphore,
            "Condition": synchronize.Condition,
            "Event": synchronize.Event,
            "Barrier": synchronize.Barrier,
            "Synchronized": sharedctypes.Synchronized,
            "SynchronizedArray": sharedctypes.SynchronizedArray,
            "SynchronizedString": sharedctypes.SynchronizedString,
        }
        for name, base in bases.items():
            cls = _shareable(base)
            # Same name as CPython's class (reprs show it); pickle finds it as dragon._mp.<name>
            # through the module __getattr__ below.
            cls.__qualname__ = cls.__name__ = name
            _SHAREABLE[name] = cls
            _SHAREABLE[base] = cls
    return _SHAREABLE


def __getattr__(name):
    # Unpickling finds the shareable classes by name (dragon._mp.Queue, ...).
    key = name[len("Shareable") :] if name.startswith("Shareable") else name
    if key in _SHAREABLE_NAMES:
        return _shareable_classes()[key]
    raise AttributeError(f"module 'dragon._mp' has no attribute {name!r}")


def _shareable_sync(obj):
    cls = _shareable_classes().get(type(obj))
    if cls is not None:
        obj.__class__ = cls
    return obj


class DragonContext(context.BaseContext):
    """The "dragon" context: processes launched by the node agent; its queues, locks and
    shared values can be passed to other processes any way (see above)."""

    _name = "dragon"
    Process = DragonProcess

    def Pool(self, processes=None, initializer=None, initargs=(), maxtasksperchild=None):
        """A pool of worker processes: CPython's, with DragonHPC's ``patience`` on
        ``terminate`` and ``join`` (``dragon._mp_pool``)."""
        from dragon._mp_pool import DragonPool

        if _multinode():
            from dragon import _mp_nodes

            _mp_nodes.install()
        return DragonPool(processes, initializer, initargs, maxtasksperchild, context=self.get_context())

    def Pipe(self, duplex=True):
        """A pair of message-oriented connections (``dragon._conn``): large buffers travel
        through pool blocks."""
        if _multinode():
            from dragon import _mp_nodes

            return _mp_nodes.Pipe(duplex)
        from dragon import _conn

        return _conn.Pipe(duplex)

    def Queue(self, maxsize=0):
        """A process-shared queue (unbounded by default, as CPython's; ``put`` sends at once)."""
        if _multinode():
            from dragon import _mp_nodes

            return _mp_nodes.Queue(maxsize, ctx=self.get_context())
        from dragon import _conn

        return _conn.Queue(maxsize, ctx=self.get_context())

    def JoinableQueue(self, maxsize=0):
        """A queue with task_done/join."""
        if _multinode():
            from dragon import _mp_nodes

            return _mp_nodes.JoinableQueue(maxsize, ctx=self.get_context())
        from dragon import _conn

        return _conn.JoinableQueue(maxsize, ctx=self.get_context())

    def SimpleQueue(self):
        """A simplified queue."""
        if _multinode():
            from dragon import _mp_nodes

            return _mp_nodes.SimpleQueue(ctx=self.get_context())
        from dragon import _conn

        return _conn.SimpleQueue(ctx=self.get_context())

    def Lock(self):
        """A process-shared lock."""
        return _classes()["Lock"](ctx=self.get_context())

    def RLock(self):
        """A process-shared recursive lock."""
        return _classes()["RLock"](ctx=self.get_context())

    def Semaphore(self, value=1):
        """A process-shared semaphore."""
        return _classes()["Semaphore"](value, ctx=self.get_context())

    def BoundedSemaphore(self, value=1):
        """A process-shared bounded semaphore."""
        return _classes()["BoundedSemaphore"](value, ctx=self.get_context())

    def Condition(self, lock=None):
        """A process-shared condition variable."""
        return _classes()["Condition"](lock, ctx=self.get_context())

    def Event(self):
        """A process-shared event."""
        return _classes()["Event"](ctx=self.get_context())

    def Barrier(self, parties, action=None, timeout=None):
        """A process-shared barrier."""
        return _classes()["Barrier"](parties, action, timeout, ctx=self.get_context())

    def Value(self, typecode_or_type, *args, lock=True):
        """A synchronized shared value."""
        if _multinode():
            from dragon import _mp_nodes

            return _mp_nodes.Value(typecode_or_type, *args, lock=lock, ctx=self.get_context())
        return _shareable_sync(super().Value(typecode_or_type, *args, lock=lock))

    def Array(self, typecode_or_type, size_or_initializer, *, lock=True):
        """A synchronized shared array."""
        if _multinode():
            from dragon import _mp_nodes

            return _mp_nodes.Array(typecode_or_type, size_or_initializer, lock=lock, ctx=self.get_context())
        return _shareable_sync(super().Array(typecode_or_type, size_or_initializer, lock=lock))

    def RawValue(self, typecode_or_type, *args):
        """A shared value without a lock."""
        if _multinode():
            from dragon import _mp_nodes

            return _mp_nodes.RawValue(typecode_or_type, *args)
        return super().RawValue(typecode_or_type, *args)

    def RawArray(self, typecode_or_type, size_or_initializer):
        """A shared array without a lock."""
        if _multinode():
            from dragon import _mp_nodes

            return _mp_nodes.RawArray(typecode_or_type, size_or_initializer)
        return super().RawArray(typecode_or_type, size_or_initializer)

    def Manager(self):
        """A SyncManager; on a runtime of several nodes it serves over TCP from this node,
        so its proxies work from every node."""
        if _multinode():
            from dragon import _mp_nodes

            return _mp_nodes.Manager(self.get_context())
        return super().Manager()


def _classes() -> dict:
    """The context's synchronisation classes: node-crossing ones on a runtime of several
    nodes (``dragon._mp_nodes``), else CPython's made shareable."""
    if _multinode():
        from dragon import _mp_nodes

        return vars(_mp_nodes)
    return _shareable_classes()


_registered = False
_CONTEXT_OBJECTS = (
    "Queue",
    "JoinableQueue",
    "SimpleQueue",
    "Lock",
    "RLock",
    "Semaphore",
    "BoundedSemaphore",
    "Condition",
    "Event",
    "Barrier",
    "Value",
    "Array",
    "Pipe",
    "Pool",
    "RawValue",
    "RawArray",
    "Manager",
)


def _delegating(name: str, orig):
    def method(self, *args, **kwargs):
        actual = self.get_context()
        if isinstance(actual, DragonContext):
            return getattr(actual, name)(*args, **kwargs)
        return orig(self, *args, **kwargs)

    method.__name__ = method.__qualname__ = name
    method.__doc__ = orig.__doc__
    return method


def register() -> None:
    """Adds the "dragon" start method to multiprocessing (idempotent)."""
    global _registered
    if _registered:
        return
    context._concrete_contexts["dragon"] = DragonContext()
    default_cls = type(context._default_context)
    orig = default_cls.get_all_start_methods

    def get_all_start_methods(self):
        methods = list(orig(self))
        if "dragon" not in methods:
            methods.append("dragon")
        return methods

    default_cls.get_all_start_methods = get_all_start_methods
    import multiprocessing

    # multiprocessing/__init__ bound the default context's methods at import: rebind.
    multiprocessing.get_all_start_methods = context._default_context.get_all_start_methods
    # After set_start_method("dragon"), multiprocessing.Queue() & co. (the default context's
    # methods) must make the dragon context's shareable objects, not the base class's.
    for name in _CONTEXT_OBJECTS:
        setattr(default_cls, name, _delegating(name, getattr(default_cls, name)))
        setattr(multiprocessing, name, getattr(context._default_context, name))
    # DragonHPC's examples name submodules without importing them (``mp.queues.Queue`` in
    # annotations), which works there because its package imports them. Load them on first
    # use instead (PEP 562), so processes that never touch them pay nothing.
    if not hasattr(multiprocessing, "__getattr__"):
        import importlib

        submodules = {"queues", "pool", "synchronize", "connection", "managers", "sharedctypes", "heap"}

        def __getattr__(name):
            if name in submodules:
                return importlib.import_module(f"multiprocessing.{name}")
            raise AttributeError(f"module 'multiprocessing' has no attribute {name!r}")

        multiprocessing.__getattr__ = __getattr__
    _registered = True
    if _multinode():
        import sys

        nodes = sys.modules.get("dragon._mp_nodes")
        if nodes is None or hasattr(nodes, "install"):  # (else it installs as it ends loading)
            from dragon import _mp_nodes

            _mp_nodes.install()


if "multiprocessing" in __import__("sys").modules:
    register()  # covers `import dragon._mp` first (the import hook skipped it then)
