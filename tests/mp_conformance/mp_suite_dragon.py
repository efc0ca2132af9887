"""CPython's process-type multiprocessing tests under the "dragon" start method."""

import dragon  # noqa: F401  (registers the start method)
import test._test_multiprocessing as _t

_t.install_tests_in_module_dict(globals(), "dragon", only_type="processes")
