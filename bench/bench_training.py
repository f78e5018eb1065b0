"""Cost of a flatness-regularized training step against an unregularized one: ``flatkern.benchmarks.training``.

    python bench/bench_training.py [--quick] [--threads N] [--only TEXT] [--rounds N]

The benchmark lives in the package (``python -m flatkern.benchmarks.training`` is the same
command); this file keeps the command that the README and bench/RESULTS.md quote.
"""

import sys

from flatkern.benchmarks.training import main

if __name__ == "__main__":
    sys.exit(main())
