"""``python -m dragon PROG [ARGS...]``: the same launcher as ``dragon``."""

import sys

from dragon.cli import main

sys.exit(main())
