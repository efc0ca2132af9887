"""CPython's process-type multiprocessing tests under the "dragon" start method; the tests
listed in run_conformance.KNOWN are skipped with their reason (they would hang or fail)."""

import unittest

import dragon  # noqa: F401  (registers the start method)
import test._test_multiprocessing as _t
from run_conformance import KNOWN

_t.install_tests_in_module_dict(globals(), "dragon", only_type="processes")

for _tid, _reason in KNOWN.items():
    _cls, _test = _tid.split(".")
    if _cls in globals() and hasattr(globals()[_cls], _test):
        setattr(globals()[_cls], _test, unittest.skip(f"known: {_reason}")(getattr(globals()[_cls], _test)))
