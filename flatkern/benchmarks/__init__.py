"""``flatkern bench``: flatkern's exact Hessian trace next to the ways people compute it today.

Every regime builds one problem (weights, measurements, targets) and hands the
same tensors to every provider, so the ratios within one table are measured
in one run on one machine:

- ``flatkern[<backend>]``: ``flatkern.hessian_trace`` for each backend
  available on the device (``torch`` is the plain-torch reference, eager);
- the peers (``peers.py``): the reference under ``torch.compile``, the
  autograd Hessian, the exact HVP loop, Hutchinson-100 (loop and vmap),
  BackPACK's ``DiagGGNExact``, curvlinops' Hutch++.

A quick run (the default) leaves ``torch.compile`` and the exact HVP loop
to ``--full``: compiling alone takes 20-60 s per regime on 2 cores.

The package, one seam per module:

    timing.py       the one timing harness of every benchmark in the repository
                    (interleaved rounds, medians, CPU time, peak memory)
    problems.py     regimes, their tensors, the Provider record and the flatkern rows
    peers.py        the peers, ``providers_for(device)`` (every row of a table), and
                    ``PEER_INSTALL``, the README's install command for the peers
    report.py       one row (``measure``), one regime (``run_regime``), the tables, the command line
    floors.py       the bare matrix products of the trace and of a training step
    cpu_kernels.py  the fused C++ CPU kernels against plain torch (``python bench/bench_cpu_kernels.py``)
    training.py     a regularized training step against a plain one (``python bench/bench_training.py``)
    gpu_check.py    the Triton backend on a GPU, correctness then speed (``python bench/gpu_check.py``)

This package is the one home of the benchmark code: ``bench/`` holds the
results (``RESULTS.md``, ``results/``), the pytest-benchmark file of the peers
(``test_bench_peers.py``) and one thin script per command above, which calls
that module's ``main``; ``python -m flatkern.benchmarks.<module>`` is the same.

``flatkern.cli`` calls ``add_arguments(parser)`` and ``run(args)``;
``python -m flatkern.benchmarks`` runs ``main()``.
"""

from .peers import (
    HUTCHPP_MATVECS, NUM_PROBES, PEER_INSTALL, PEERS, backpack_trace, curvlinops_hutchpp, flatkern_auto_backend,
    hutchinson_loop, hutchinson_vmap, hvp_loop_trace, providers_for,
)
from .problems import REGIMES, TEST_REGIMES, Problem, Provider, Regime, flat_loss, make_problem, peer_predict
from .report import add_arguments, environment, fwd_bwd, main, measure, run, run_regime, to_markdown, to_text, warm_up
from .timing import Timing, interleave, peak_memory, ratio, time_once

__all__ = [
    "Regime", "Problem", "Provider", "REGIMES", "TEST_REGIMES", "PEERS", "PEER_INSTALL", "make_problem", "providers_for",
    "flatkern_auto_backend", "measure", "run_regime", "add_arguments", "run", "main",
    "Timing", "interleave", "ratio", "time_once", "peak_memory",
]
