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

import math
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch

from ..measurements import Isotropic
from ..ops import end_to_end, hessian_trace
from ..theory import flatness_lower_bound
from .base import COMMON_FIELDS, INT, NUMBER, STYLE, Experiment, fit, fmt, mean, pyplot, swept_problems
from .baselines import balanced_factorization
from .recovery import _generator
from .training import standard_init, train_flatness, train_gd

__all__ = ["FlattestSettings", "FlattestGrid", "FlattestTask", "FLATTEST", "METHODS", "make_matrix", "run_flattest"]

METHODS = ("flattest_solution", "flatness", "balanced", "weight_decay")


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

    W, report = solve_flattest(iso, M, widths)  # on the reference backend: solution.py says why
    records.insert(0, dict(_record("flattest_solution", W, M, depth, backend), **report))
    records.append(_record("balanced", balanced_factorization(M, widths), M, depth, backend))
    W = standard_init(widths, generator=g)
    # half the budget: the weight-decay optimum (the balanced point) is reached sooner
    train_gd(W, iso, M, steps=s.steps // 2, eta=s.eta, weight_decay=(s.wd_start, s.wd_end), backend=backend)
    train_gd(W, iso, M, steps=s.polish_steps, eta=s.eta, backend=backend)
    records.append(_record("weight_decay", W, M, depth, backend))
    return [dict(experiment="flattest", depth=depth, n=None, seed=seed, rel_error=None,
                 shape=list(shape), rank=rank, **r) for r in records]


# ---------------------------------------------------------------- the experiment (base.py's protocol)


class FlattestTask(NamedTuple):
    experiment: str   # "flattest"
    shape: tuple      # (d_L, d_0) of M
    rank: int
    depth: int
    seed: int


@dataclass(frozen=True)
class FlattestGrid:
    """The sweep (matrices, depths, seeds) and the budget of one grid's ``flattest`` experiment."""

    matrices: tuple = (((8, 8), 2), ((10, 6), 3))   # (shape (d_L, d_0), rank)
    depths: tuple = (2, 3, 4, 5)
    seeds: tuple = (0,)
    budget: FlattestSettings = field(default_factory=lambda: FlattestSettings(steps=1500, polish_steps=200))


class Flattest(Experiment):
    """Trace over the theorem's minimum for factorizations of a fixed ``M`` (``ratio``; 1 is the flattest)."""

    name = "flattest"
    figure_name = "flattest_ratio.png"
    Task = FlattestTask
    axes = ("sizes", "ranks", "depths", "seeds")

    def sweep(self, s: FlattestGrid, axes: dict) -> FlattestGrid:
        # sizes / ranks make square d × d matrices of each rank (no n: a fixed M, not measurements)
        matrices = s.matrices
        if "sizes" in axes or "ranks" in axes:
            given = tuple((shape[0], rank, ()) for shape, rank in s.matrices)
            matrices = tuple(((d, d), r) for d, r, _ in swept_problems(given, {k: axes[k] for k in ("sizes", "ranks") if k in axes}))
        return replace(s, matrices=matrices, depths=axes.get("depths", s.depths), seeds=axes.get("seeds", s.seeds))
    settings = {
        "quick": FlattestGrid(matrices=(((8, 8), 2),), depths=(2, 3, 4),
                              budget=FlattestSettings(steps=600, polish_steps=100)),
        "default": FlattestGrid(),
        "full": FlattestGrid(matrices=(((8, 8), 2), ((10, 6), 3), ((12, 12), 4)), seeds=(0, 1),
                             budget=FlattestSettings(steps=3000, polish_steps=300)),
    }
    fields = dict(COMMON_FIELDS, rel_error=(type(None),), shape=(list,), rank=INT, fit_error=NUMBER, nuclear_norm=NUMBER,
                  trace=NUMBER, trace_isotropic=NUMBER, lower_bound=NUMBER, ratio=NUMBER)

    def tasks(self, s: FlattestGrid) -> list[FlattestTask]:
        return [FlattestTask(self.name, tuple(shape), rank, depth, seed)
                for shape, rank in s.matrices for depth in s.depths for seed in s.seeds]

    def methods(self, task: FlattestTask) -> tuple[str, ...]:
        return METHODS

    def run(self, task: FlattestTask, s: FlattestGrid, backend: str) -> list[dict]:
        return run_flattest(task.shape, task.rank, task.depth, task.seed, s.budget, backend)

    def cost(self, task: FlattestTask, s: FlattestGrid) -> float:
        # measured: 0.9 s at L = 2 and 1.5 s at L = 3 with the quick budget (600 steps)
        b = s.budget
        steps = b.steps * max(1, task.depth - 2) + b.steps // 2 + 2 * b.polish_steps
        return 4e-4 * task.depth * steps * (task.shape[0] * task.shape[1] / 64)

    def table(self, records: list[dict]) -> dict:
        """``{depth: {method: mean ratio over matrices and seeds}}``."""
        ratios = defaultdict(list)
        for r in records:
            ratios[(r["depth"], r["method"])].append(r["ratio"])
        table = defaultdict(dict)
        for (depth, method), values in ratios.items():
            table[depth][method] = mean(values)
        return dict(sorted(table.items()))

    def summary_section(self, records: list[dict]) -> list[str]:
        flat = self.table(records)
        methods = [m for m in METHODS if any(m in row for row in flat.values())]
        problems = len({(tuple(r["shape"]), r["rank"], r["seed"]) for r in records})
        lines = [
            "## flattest: trace of the Hessian over the theorem's minimum",
            "",
            "`ratio = tr ∇²L / (2 L (d_0 d_L)^{1/L} ‖E‖_*^{2-2/L})` for an `Isotropic` loss; 1 is the flattest",
            "factorization. `flattest_solution` solves for it (least trace subject to `E = M`); `flatness` trains",
            "toward it with `FlatnessRegularized`."
            + (f" Mean over {problems} random matrices." if problems > 1 else " One random matrix."),
            "",
            "| depth | " + " | ".join(methods) + " |",
            "|---|" + "---|" * len(methods),
        ]
        for depth, row in flat.items():
            lines.append(f"| {depth} | " + " | ".join(fmt(row.get(m, math.nan)) for m in methods) + " |")
        lines.append("")
        return lines

    def figure(self, records: list[dict]):
        """``trace / lower bound`` against depth, per method (1 = the flattest factorization)."""
        plt = pyplot()
        table = self.table(records)
        depths = sorted(table)
        fig, ax = plt.subplots(figsize=(6.0, 4.4))
        for method in METHODS:
            ys = [table[d].get(method, math.nan) for d in depths]
            if not all(math.isnan(y) for y in ys):
                ax.plot(depths, ys, label=method, **STYLE[method])
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_xticks(depths)
        ax.set_xlabel("depth L")
        ax.set_ylabel(r"$\mathrm{tr}\,\nabla^2 L \;/\; 2L(d_0 d_L)^{1/L}\Vert E\Vert_*^{2-2/L}$")
        problems = len({(tuple(r["shape"]), r["rank"], r["seed"]) for r in records})
        ax.set_title(fit("Factorizations of a fixed M: trace of the Hessian over the theorem's minimum (1 = flattest)"
                         + (f"; mean over {problems} matrices" if problems > 1 else ""), 5.4, 11), fontsize=11)
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        return fig


FLATTEST = Flattest()
