"""The light by-value pickler for functions of the driver script (dragon._funcpickle)."""

import pickle
import textwrap

import pytest
from dragon import _funcpickle

SRC = textwrap.dedent(
    """
    import math
    K = 3

    def helper(x):
        return x * K

    def fact(n):
        return 1 if n < 2 else n * fact(n - 1)

    def rec(n):
        return 0 if n == 0 else 1 + alias(n - 1)

    alias = rec

    def uses(x, y=2.5, *, z=5):
        return helper(x) + math.floor(y) + z + fact(4)

    def outer():
        a = 10

        def inner(b):
            return a + b + helper(1)

        return inner

    lam = lambda q: [helper(i) for i in range(q)]

    class Local:
        pass

    def makes_local():
        return Local()
    """
)


@pytest.fixture
def main_ns():
    ns = {"__name__": "__main__"}  # functions defined here belong to "__main__"
    exec(compile(SRC, "<driver>", "exec"), ns)
    return ns


def test_main_functions_round_trip_by_value(main_ns):
    ns = main_ns
    cases = [
        (ns["uses"], (1,), {"z": 1}),
        (ns["fact"], (6,), {}),
        (ns["rec"], (5,), {}),
        (ns["outer"](), (2,), {}),
        (ns["lam"], (4,), {}),
    ]
    for f, args, kw in cases:
        data = _funcpickle.dumps((f, args, kw))
        assert b"cloudpickle" not in data
        g, a, k = pickle.loads(data)
        assert g(*a, **k) == f(*args, **kw)
        assert g.__name__ == f.__name__ and g.__module__ == "__main__"
    # By value: a later change to a global of the driver does not reach the copy.
    g = pickle.loads(_funcpickle.dumps(ns["helper"]))
    ns["K"] = 100
    assert g(2) == 6


def test_what_needs_cloudpickle_is_refused(main_ns):
    for obj in (main_ns["Local"], main_ns["makes_local"], main_ns["Local"]()):
        with pytest.raises(_funcpickle.Unsupported):
            _funcpickle.dumps(obj)
    with pytest.raises(_funcpickle.Unsupported):
        _funcpickle.dumps(lambda: open)  # a lambda of an importable module: by reference fails
