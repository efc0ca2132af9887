"""CPython's process-type multiprocessing tests under the "dragon" start method on a runtime
of several nodes. Run under the launcher, one class at a time; run_conformance.py sets
DRAGON_DEFAULT_NODES=1,2 so that every process the tests start runs on another node than the
driver's:

    DRAGON_DEFAULT_NODES=1,2 dragon --local-nodes 3 mp_suite_dragon3.py WithProcessesTestQueue

The tests listed in run_conformance.KNOWN and KNOWN_NODES are skipped with their reason."""

import sys
import unittest

import dragon  # noqa: F401  (registers the start method)
import test._test_multiprocessing as _t
from run_conformance import KNOWN, KNOWN_NODES

_t.install_tests_in_module_dict(globals(), "dragon", only_type="processes")

for _tid, _reason in {**KNOWN, **KNOWN_NODES}.items():
    _cls, _test = _tid.split(".")
    if _cls in globals() and hasattr(globals()[_cls], _test):
        setattr(globals()[_cls], _test, unittest.skip(f"known: {_reason}")(getattr(globals()[_cls], _test)))

if __name__ == "__main__":
    unittest.main(argv=[sys.argv[0], "-v", *sys.argv[1:]])
