"""DragonHPC's DDict extensions beyond the dict protocol, as a base class of ``DDict``:
broadcast puts (``bput``/``bget``), batches, ``fetch_add``, freezing, ``wait_for``,
``clone``, ``filter`` (its process tree is in ``filtering``), ``profile``."""

from __future__ import annotations

import time

from dragon import _parts
from dragon.exceptions import DDictError, DDictKeyError, DDictTimeoutError

from .encoding import _CHK, _PERSIST, _key_bytes, _value_of, _value_parts
from .filtering import FilterContextManager, start_filter


class _Extras:
    """DragonHPC's DDict methods beyond the dict protocol (``DDict`` inherits them)."""

    def bput(self, key, value) -> None:
        """Puts ``key`` on every manager (read back with ``bget`` from the nearest)."""
        kb = _key_bytes(key, self._key_pickler)
        parts = _value_parts(value, False, self._value_pickler)
        c = self._chkpt
        for m in self._live():
            self._advance(m, c)
            m.kv.put_parts(_CHK.pack(c) + kb, parts)

    def bget(self, key):
        """The value of a ``bput`` key, from this client's main manager."""
        kb = _key_bytes(key, self._key_pickler)
        b = self._lookup(self._live()[self._main], kb)
        if b is None:
            raise DDictKeyError(key)
        return _value_of(b, self._value_pickler)

    def start_batch_put(self, persist: bool = False) -> None:
        """Starts a batch of puts (``persist``: they persist across checkpoints)."""
        if self._batch is not None:
            raise DDictError("a batch put is already in progress")
        self._batch = bool(persist)

    def end_batch_put(self) -> None:
        """Ends the batch (puts are already visible)."""
        if self._batch is None:
            raise DDictError("no batch put in progress")
        self._batch = None

    def fetch_add(self, key, val: int = 1) -> int:
        """Adds ``val`` to the integer at ``key`` (0 when absent) atomically against other
        fetch_adds; returns the new value."""
        m, _ = self._place(key)
        with m.lock:
            cur = self.get(key, 0)
            if not isinstance(cur, int):
                raise DDictError(f"fetch_add needs an int value at {key!r}, not {type(cur).__name__}")
            new = cur + val
            self[key] = new
        return new

    def freeze(self) -> None:
        """Makes the DDict read-only (writes raise DDictFrozenError)."""
        for m in self._live():
            m.kv.set_frozen(True)

    def unfreeze(self) -> None:
        """Allows writes again."""
        for m in self._live():
            m.kv.set_frozen(False)

    def is_frozen(self) -> bool:
        """Whether the DDict is frozen."""
        return all(m.kv.frozen for m in self._live())

    @property
    def frozen(self) -> bool:
        return self.is_frozen()

    def wait_for(self, key, value, timeout: float | None = None) -> None:
        """Waits until ``key`` holds ``value`` (its serialized bytes equal those of
        ``value``, as DragonHPC compares them); returns at once if it already does.
        ``timeout`` (seconds) overrides the DDict's; DDictTimeoutError (a TimeoutError)
        after it."""
        m, kb = self._place(key)
        want = [bytes(p) for p in _value_parts(value, False, self._value_pickler)]
        limit = self._timeout if timeout is None else timeout
        deadline = None if limit is None else time.monotonic() + limit
        pause = 0.0005
        while True:
            if key in self:
                b = self._lookup(m, kb)
                if b is not None:
                    got = _parts.split(b)
                    if got[0][0] & ~_PERSIST == want[0][0] and [bytes(p) for p in got[1:]] == want[1:]:
                        return
            if deadline is not None and time.monotonic() >= deadline:
                raise DDictTimeoutError(f"timed out waiting for {key!r} to hold the value")
            time.sleep(pause if deadline is None else max(0.0, min(pause, deadline - time.monotonic())))
            pause = min(pause * 2, 0.01)

    def clone(self, clone_list: list[str]) -> None:
        """Makes every DDict of ``clone_list`` (serialized DDicts, ``serialize()``) a copy
        of this one: each is cleared and gets every pair visible at this handle's
        checkpoint (persistent keys stay persistent). They must have as many managers as
        this one (RuntimeError otherwise), so each key lands on the manager of the same
        index."""
        if len(clone_list) == 0:
            raise ValueError("The list of serialized ddicts must not be empty.")
        for s in clone_list:
            if not isinstance(s, str):
                raise DDictError("The serialized dictionary must be a string.")
        targets = [type(self).attach(s, timeout=self._timeout) for s in clone_list]
        try:
            for t in targets:
                if t._n != self._n:
                    raise RuntimeError(
                        "Metadata mismatches. Could not clone dictionary with different metadata."
                    )
            pairs = []  # (manager index, canonical key, block): stored parts are copied as they are
            for i, m in enumerate(self._live()):
                for _, kb, ik in self._visible([m]):
                    b = m.kv.get(ik)
                    if b is not None:
                        pairs.append((i, kb, b))
            for t in targets:
                t.clear()
                mgrs = t._live()
                for m in mgrs:
                    m.kv.set_chkpt_range(0, 0)  # a fresh dictionary: pairs go in checkpoint 0
                for i, kb, b in pairs:
                    mgrs[i].kv.put_parts(_CHK.pack(0) + kb, list(_parts.split(b)))
        finally:
            for t in targets:
                t.detach()

    def filter(
        self, mgr_code, mgr_code_args: tuple, comparator, branching_factor: int = 5
    ) -> FilterContextManager:
        """DragonHPC's filter: runs ``mgr_code(dd_i, out, *mgr_code_args)`` for every
        manager ``i`` (``dd_i`` is ``self.manager(i)``; it runs on that manager's node) and
        merges what each puts in ``out`` (best first) into one stream ordered by
        ``comparator(x, y)`` (True when x is better than y), through a tree of processes at
        most ``branching_factor`` wide. Returns a context manager: ``with d.filter(...) as
        values: for v in values: ...``; leaving the block stops the filter."""
        return start_filter(self, mgr_code, mgr_code_args, comparator, branching_factor)

    def profile(self) -> str:
        """DragonHPC's client profile, as text: the time since this handle was made (or
        ``profile_reset``), "Total Time". This client does not time its operations (they
        are calls into shared memory), so no other entries are listed."""
        start = self.__dict__.setdefault("_profile_start", time.monotonic())
        return f"DDictClient:\n  Total Time: {time.monotonic() - start:.6f} s\n"

    def profile_reset(self) -> None:
        """Starts ``profile``'s clock again."""
        self._profile_start = time.monotonic()
