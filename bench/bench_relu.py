"""The exact Hessian trace of ReLU MLPs against its GEMM floor, torch.func, Hutchinson and BackPACK (issue 19).

    python bench/bench_relu.py [--quick] [--threads N] [--rounds N] [--only TEXT] [--json PATH]

784-512-512-10 and 64-256-256-10 MLPs, cross-entropy, float32 on CPU, batch 128 and 512; every
number a ratio to flatkern's value measured in the same interleaved rounds.  The benchmark
lives in the package (``python -m flatkern.benchmarks.piecewise`` is the same command; its
docstring lists the rows); this file keeps the command that results quote.
"""

import sys

from flatkern.benchmarks.piecewise import main

if __name__ == "__main__":
    sys.exit(main())
