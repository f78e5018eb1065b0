"""Speed of the fused C++ CPU kernels of the trace against plain torch: ``flatkern.benchmarks.cpu_kernels``.

    python bench/bench_cpu_kernels.py [--quick] [--threads N] [--only TEXT] [--rounds N]

The benchmark lives in the package (``python -m flatkern.benchmarks.cpu_kernels`` is the same
command); this file keeps the command that the README and bench/RESULTS.md quote.
"""

import sys

from flatkern.benchmarks.cpu_kernels import main

if __name__ == "__main__":
    sys.exit(main())
