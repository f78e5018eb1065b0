"""``flatkern.flattest_solution`` as the experiments call it: the weights and a record-ready convergence report."""

from __future__ import annotations

import time
import warnings

import torch

__all__ = ["solve_flattest"]


def solve_flattest(measurements, targets: torch.Tensor, widths: list[int], *, trace_of=None, **options) -> tuple[list[torch.Tensor], dict]:
    """``(weights, report)``: the flattest zero-loss factorization and how its solve went, on the reference backend.

    Always ``backend="torch"``, whatever ``flatkern reproduce --backend`` says: a
    solve that stops at its iteration cap (most completion solves do) ends
    wherever the last bits of its first products sent it, so another backend's
    rounding moves its records by up to 1e-3 relative (measured: the nuclear
    norm bound 4e-4, the recovery error 2e-4, the iteration counts), far beyond
    the digits ``results.json`` keeps.  Training contracts such differences
    (every trained record agreed across backends to 1e-9), so it runs on the
    chosen backend.

    ``report`` holds ``converged``, ``feasibility`` (``‖A(E) - b‖ / ‖b‖``),
    ``stationarity``, ``nuclear_norm_bound`` (the dual bound: no interpolator
    has a smaller nuclear norm), ``outer_iterations``, ``iterations`` (inner,
    all outer steps together) and ``solve_seconds`` (one thread's wall time).  A solve
    that did not converge is kept, with ``converged: false`` in its record and
    the count in the summary, instead of a warning printed by a worker.
    """
    from ..flattest_solution import flattest_solution

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # non-convergence is in the report, hence in the record
        weights, report = flattest_solution(measurements, targets, widths, trace_of=trace_of, backend="torch",
                                            return_report=True, **options)
    seconds = time.perf_counter() - start
    return [w.detach() for w in weights], dict(
        converged=bool(report.converged),
        feasibility=float(report.feasibility),
        stationarity=float(report.stationarity),
        nuclear_norm_bound=float(report.nuclear_norm_bound),
        outer_iterations=int(report.outer_iterations),
        iterations=int(report.inner_iterations),
        solve_seconds=seconds,
    )
