"""A sweep's seeds as one batch of problems against one run per seed: ``flatkern.benchmarks.sweeps``.

    python bench/bench_sweeps.py [--quick] [--rounds N] [--seeds N] [--only TEXT]

The benchmark lives in the package (``python -m flatkern.benchmarks.sweeps`` is the same
command); this file keeps the command that the README and bench/RESULTS.md quote.
"""

import sys

from flatkern.benchmarks.sweeps import main

if __name__ == "__main__":
    sys.exit(main())
