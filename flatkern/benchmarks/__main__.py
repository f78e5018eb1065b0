"""``python -m flatkern.benchmarks``: the same as ``flatkern bench``."""

import sys

from .report import main

sys.exit(main())
