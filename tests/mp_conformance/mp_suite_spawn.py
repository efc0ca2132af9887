"""CPython's process-type multiprocessing tests under the "spawn" start method (baseline)."""

import test._test_multiprocessing as _t

_t.install_tests_in_module_dict(globals(), "spawn", only_type="processes")
