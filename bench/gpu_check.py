#!/usr/bin/env python
"""GPU check of the Triton backend: ``flatkern.benchmarks.gpu_check``.

    python bench/gpu_check.py                      # on a CUDA machine; writes $OUT (or bench/results)
    python bench/gpu_check.py --sections mlp,per-problem   # the ReLU-network op and per-problem sets only
    TRITON_INTERPRET=1 python bench/gpu_check.py --device cpu --tiny   # the same logic, tiny, in the interpreter

The check lives in the package; this file runs it from the checkout it sits in (first on
``sys.path``, so a machine with a copy of the repository and no install runs it too).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flatkern.benchmarks.gpu_check import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
