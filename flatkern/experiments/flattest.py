"""Experiment 1: the flattest factorization of a given matrix, found by training.

For a random ``M`` (shape ``(d_L, d_0)``, rank ``r``, distinct singular values)
and a depth ``L``, minimize the ``Isotropic`` trace of the Hessian over
factorizations ``W_L ⋯ W_1 = M`` and compare it with the theorem's minimum
``flatness_lower_bound(M, L) = 2 L (d_0 d_L)^{1/L} ‖M‖_*^{2-2/L}`` (docs/MATH.md).

Methods (``ratio`` = Isotropic trace / lower bound at the reached ``E``):

- ``flattest_solution``: ``flatkern.flattest_solution`` with ``E = M`` as the
  constraint (``Isotropic`` measurements, targets ``M``): the minimum itself,
  by a constrained solve.
- ``flatness``: ``flatkern.optim.FlatnessRegularized`` on ``‖E - M‖_F² + lam · tr``,
  ``lam`` decaying, then ``lam = 0`` steps (``steps · max(1, L - 2)`` regularized steps).
- ``balanced``: the balanced factorization (closed form, every layer ``Σ^{1/L}``).
- ``weight_decay``: gradient descent on ``‖E - M‖_F² + mu Σ_j ‖W_j‖_F²``, ``mu``
  decaying (``steps / 2`` steps), then ``mu = 0`` steps; its optimum is the
  balanced factorization, so it is not the flattest for ``L >= 3`` either.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..measurements import Isotropic
from ..ops import end_to_end, hessian_trace
from ..theory import flatness_lower_bound
from .baselines import balanced_factorization
from .recovery import _generator
from .training import standard_init, train_flatness, train_gd

__all__ = ["FlattestSettings", "make_matrix", "run_flattest"]


@dataclass(frozen=True)
class FlattestSettings:
    steps: int = 1500
    polish_steps: int = 200
    eta: float = 0.5
    lam_start: float = 1e-1
    lam_end: float = 1e-5
    wd_start: float = 1e-1
    wd_end: float = 1e-6


def make_matrix(shape: tuple[int, int], rank: int, seed: int) -> torch.Tensor:
    """Gaussian factors ``X Yᵀ`` (``(d_L, r)``, ``(d_0, r)``), scaled to ``‖M‖_F = √d_L``; float64."""
    g = _generator("flattest", tuple(shape), rank, seed)
    M = torch.randn(shape[0], rank, generator=g, dtype=torch.float64) @ torch.randn(shape[1], rank, generator=g, dtype=torch.float64).T
    return M * (shape[0] ** 0.5 / M.norm())


def _record(method: str, weights, M: torch.Tensor, depth: int, backend: str) -> dict:
    with torch.no_grad():
        weights = [w.detach() for w in weights]
        E = end_to_end(weights, backend=backend)
        trace = float(hessian_trace(weights, Isotropic(), backend=backend))
        return dict(
            method=method,
            fit_error=float((E - M).norm() / M.norm()),
            nuclear_norm=float(torch.linalg.matrix_norm(E, ord="nuc")),
            trace=trace,
            trace_isotropic=trace,
            lower_bound=float(flatness_lower_bound(E, depth)),
            ratio=trace / float(flatness_lower_bound(E, depth)),
        )


def run_flattest(shape: tuple[int, int], rank: int, depth: int, seed: int, settings: FlattestSettings, backend: str = "auto") -> list[dict]:
    """The three methods on one ``(M, depth)``; hidden widths ``max(d_L, d_0)``."""
    M = make_matrix(shape, rank, seed)
    s = settings
    widths = [shape[1]] + [max(shape)] * (depth - 1) + [shape[0]]
    iso = Isotropic()
    g = _generator("flattest-init", tuple(shape), rank, depth, seed)
    W = standard_init(widths, generator=g)
    # deeper chains move toward the flattest factorization more slowly (the trace's gradient
    # in the balancing directions shrinks with depth): L - 2 times the budget from L = 4 on
    train_flatness(W, iso, M, steps=s.steps * max(1, depth - 2), lam_start=s.lam_start, lam_end=s.lam_end, polish_steps=s.polish_steps,
                   eta=s.eta, backend=backend)
    records = [_record("flatness", W, M, depth, backend)]
    from .solution import solve_flattest

    W, report = solve_flattest(iso, M, widths, backend=backend)
    records.insert(0, dict(_record("flattest_solution", W, M, depth, backend), **report))
    records.append(_record("balanced", balanced_factorization(M, widths), M, depth, backend))
    W = standard_init(widths, generator=g)
    # half the budget: the weight-decay optimum (the balanced point) is reached sooner
    train_gd(W, iso, M, steps=s.steps // 2, eta=s.eta, weight_decay=(s.wd_start, s.wd_end), backend=backend)
    train_gd(W, iso, M, steps=s.polish_steps, eta=s.eta, backend=backend)
    records.append(_record("weight_decay", W, M, depth, backend))
    return [dict(experiment="flattest", depth=depth, n=None, seed=seed, rel_error=None,
                 shape=list(shape), rank=rank, **r) for r in records]
