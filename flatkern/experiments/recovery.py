"""Experiments 2 and 3: recovering a low-rank ``M*`` from ``n`` measurements (``sensing``, ``completion``).

Every method fits the same measurements ``b = A(M*)`` to (near) zero loss; the
question is which interpolator it picks.  Gaussian sensing (``Dense``) has the
restricted isometry property, so the flattest interpolator is close to the
minimum-nuclear-norm one (docs/MATH.md); uniformly observed entries (``Entries``)
do not, and are reported as they come out.

Methods (one record each):

- ``gd``: gradient descent from LeCun-normal weights (``W_j ~ N(0, 1/d_{j-1})``).
- ``gd_small_init``: the same from weights scaled so that ``‖E‖`` starts ``init_scale``
  times smaller (the implicit-bias-of-small-initialization baseline).
- ``label_noise``: gradient descent with fresh Gaussian noise on the targets at
  every step (an implicit trace-of-Hessian regularizer), then noise-free steps.
- ``flatness``: ``flatkern.optim.FlatnessRegularized`` on ``loss + lam · tr``
  with ``lam`` decaying to ``lam_end``, then ``lam = 0`` to reach zero loss.
  ``tr`` is the trace of the training-loss Hessian for ``completion``; for
  ``sensing`` it is by default its expectation over Gaussian ``A`` (the
  ``Isotropic`` trace, docs/MATH.md), about three times cheaper per step than the
  exact ``Dense`` trace and, in our trials, as good (``sensing_regularizer="train"``
  regularizes the exact one).  The record's ``regularizer`` says which.
- ``flattest_solution``: ``flatkern.flattest_solution``, the factorization of least
  ``Isotropic`` trace among those that fit the measurements exactly (a constrained
  solve, not training).  For any measurements that problem *is* the convex program
  lifted (docs/MATH.md), so its nuclear norm equals ``nuclear_norm``'s at every ``n``.
- ``nuclear_norm``: the convex program ``min ‖X‖_* s.t. A(X) = b`` (cvxpy);
  it has no depth (``depth`` is null in its record).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ..measurements import Dense, Entries, Isotropic, Measurements
from ..ops import end_to_end, hessian_trace
from ..theory import flatness_lower_bound
from .base import (COMMON_FIELDS, INT, NUMBER, OPTIONAL_NUMBER, STYLE, Experiment, figure_legend, fmt, gap, mean, pyplot,
                   seeds_phrase, suptitle)
from .baselines import nuclear_norm_solution
from .training import kernel_norm, standard_init, train_flatness, train_gd

__all__ = ["RecoverySettings", "RecoveryGrid", "RecoveryTask", "SENSING", "COMPLETION", "make_problem", "run_networks",
           "run_flattest_solution", "run_nuclear_norm", "NETWORK_METHODS", "METHODS"]

NETWORK_METHODS = ("gd", "gd_small_init", "label_noise", "flatness")
METHODS = ("gd", "gd_small_init", "label_noise", "flatness", "flattest_solution", "nuclear_norm")


@dataclass(frozen=True)
class RecoverySettings:
    """Sizes and optimization budget of a recovery run (one ``(depth, n, seed)`` problem)."""

    d: int = 20            # d_0 = d_L = every hidden width
    rank: int = 2
    steps: int = 1000      # main phase (noise or regularization on)
    polish_steps: int = 300  # noise-free / lam = 0 phase reaching zero loss
    eta: float = 0.5       # step size as a fraction of 1 / sharpness bound
    init_scale: float = 1e-3   # gd_small_init: ‖E_0‖ shrinks by this factor
    label_noise: float = 1.0   # std of the label noise (targets have std ≈ ‖M*‖_F = √d)
    lam_start: float = 1e-1
    lam_end: float = 1e-6
    # the trace regularized by `flatness` on sensing: "isotropic" (its expectation over
    # Gaussian A, docs/MATH.md; the cheap one) or "train" (the exact trace on the n measurements)
    sensing_regularizer: str = "isotropic"
    # flattest_solution's feasibility tolerance and iteration caps.  Its defaults (1e-10, 100
    # outer, 1000 inner) cost up to 190 s per depth-4 solve here, for digits no table shows;
    # with these the nuclear norms still agree with the convex program's to 1e-4 or better,
    # and feasibility stays below 1e-6 (measured at d = 20, depths 2-4).  A solve that stops
    # at a cap says so in its record (converged: false) and in the summary.
    solution_tol: float = 1e-8
    solution_max_outer: int = 30
    solution_max_inner: int = 200


def _generator(*key) -> torch.Generator:
    """A generator seeded by ``key``: the same stream whichever order (or rank) runs the task."""
    seed = 1469598103934665603
    for byte in repr(key).encode():  # FNV-1a, since Python's hash() of a str is salted per process
        seed = ((seed ^ byte) * 1099511628211) % 2**64
    return torch.Generator().manual_seed(seed % 2**63)


def make_problem(experiment: str, n: int, seed: int, settings: RecoverySettings):
    """``(M*, measurements, b)`` for one ``(experiment, n, seed)``; the same for every depth and method.

    ``M* = X Yᵀ`` with Gaussian ``X, Y`` of shape ``(d, r)``, scaled to ``‖M*‖_F = √d``:
    the scale of ``E`` at a LeCun-normal initialization, so ``gd`` starts at a
    fair distance.
    """
    d, r = settings.d, settings.rank
    g = _generator("problem", experiment, n, seed)
    X = torch.randn(d, r, generator=g, dtype=torch.float64)
    Y = torch.randn(d, r, generator=g, dtype=torch.float64)
    M = X @ Y.T
    M = M * (d**0.5 / M.norm())
    if experiment == "sensing":
        meas = Dense.gaussian(n, (d, d), generator=g, dtype=torch.float64)
    elif experiment == "completion":
        meas = Entries.uniform(n, (d, d), generator=g)
    else:
        raise ValueError(f"experiment must be 'sensing' or 'completion', got {experiment!r}")
    return M, meas, meas.predict(M)


def metrics(weights, E: torch.Tensor, M: torch.Tensor, meas: Measurements, b: torch.Tensor, depth: int | None, backend: str) -> dict:
    """Recovery error, nuclear norm, train loss, and (for networks) the traces and ``ratio``.

    ``trace``: the trace of the Hessian of the training loss (on ``meas``).
    ``trace_isotropic`` / ``ratio``: the ``Isotropic`` (population) trace, and
    it over ``flatness_lower_bound(E, depth)``, which bounds it from below.
    """
    with torch.no_grad():
        out = {
            "rel_error": float((E - M).norm() / M.norm()),
            "nuclear_norm": float(torch.linalg.matrix_norm(E, ord="nuc")),
            "train_loss": float((meas.predict(E) - b).square().mean()),
            "trace": None, "trace_isotropic": None, "ratio": None,
        }
        if weights is not None:
            iso = float(hessian_trace(weights, Isotropic(), backend=backend))
            out["trace"] = float(hessian_trace(weights, meas, backend=backend))
            out["trace_isotropic"] = iso
            out["ratio"] = iso / float(flatness_lower_bound(E, depth))
    return out


def run_networks(experiment: str, depth: int, n: int, seed: int, settings: RecoverySettings, backend: str = "auto") -> list[dict]:
    """Train the four network methods on one problem; one record per method."""
    M, meas, b = make_problem(experiment, n, seed, settings)
    d, s = settings.d, settings
    widths = [d] * (depth + 1)
    kappa = kernel_norm(meas)
    # gd, gd_small_init and label_noise share the loop: one batch of three problems
    g = _generator("init", experiment, depth, n, seed)
    scales = torch.tensor([1.0, s.init_scale ** (1.0 / depth), 1.0], dtype=torch.float64)
    W = standard_init(widths, scale=scales, batch=(3,), generator=g)
    noise = torch.tensor([0.0, 0.0, s.label_noise], dtype=torch.float64)
    train_gd(W, meas, b, steps=s.steps, eta=s.eta, label_noise=noise, generator=g, kappa=kappa, backend=backend)
    train_gd(W, meas, b, steps=s.polish_steps, eta=s.eta, kappa=kappa, backend=backend)
    records = []
    for i, method in enumerate(("gd", "gd_small_init", "label_noise")):
        Wi = [w[i].detach() for w in W]
        E = end_to_end(Wi, backend=backend)
        records.append(dict(method=method, **metrics(Wi, E, M, meas, b, depth, backend)))

    g = _generator("init", experiment, depth, n, seed, "flatness")
    W = standard_init(widths, generator=g)
    if experiment == "sensing" and s.sensing_regularizer == "isotropic":
        reg = Isotropic()
    elif experiment == "completion" or s.sensing_regularizer == "train":
        reg = meas
    else:
        raise ValueError(f"sensing_regularizer must be 'isotropic' or 'train', got {s.sensing_regularizer!r}")
    train_flatness(W, meas, b, steps=s.steps, lam_start=s.lam_start, lam_end=s.lam_end, polish_steps=s.polish_steps,
                   eta=s.eta, regularizer=reg, kappa=kappa, backend=backend)
    Wf = [w.detach() for w in W]
    records.append(dict(method="flatness", regularizer="isotropic" if reg is not meas else "train",
                        **metrics(Wf, end_to_end(Wf, backend=backend), M, meas, b, depth, backend)))
    return [dict(experiment=experiment, depth=depth, n=n, seed=seed, d=d, rank=s.rank, **r) for r in records]


def run_flattest_solution(experiment: str, depth: int, n: int, seed: int, settings: RecoverySettings, backend: str = "auto") -> list[dict]:
    """``flattest_solution`` (least ``Isotropic`` trace subject to ``A(E) = b``) on one problem; one record."""
    from .solution import solve_flattest

    M, meas, b = make_problem(experiment, n, seed, settings)
    # the solve on the reference backend (solution.py says why); what is measured of its weights, on `backend`
    W, report = solve_flattest(meas, b, [settings.d] * (depth + 1),
                               tol=settings.solution_tol, max_outer=settings.solution_max_outer,
                               max_inner=settings.solution_max_inner)
    record = dict(method="flattest_solution", regularizer="isotropic",
                  **metrics(W, end_to_end(W, backend=backend), M, meas, b, depth, backend), **report)
    return [dict(experiment=experiment, depth=depth, n=n, seed=seed, d=settings.d, rank=settings.rank, **record)]


def run_nuclear_norm(experiment: str, n: int, seed: int, settings: RecoverySettings) -> list[dict]:
    """The convex baseline on one problem (no depth)."""
    M, meas, b = make_problem(experiment, n, seed, settings)
    X, status = nuclear_norm_solution(meas, b, tuple(M.shape), return_status=True)
    return [dict(experiment=experiment, method="nuclear_norm", depth=None, n=n, seed=seed, d=settings.d, rank=settings.rank,
                 solver_status=status,
                 **metrics(None, X, M, meas, b, None, "torch"))]


# ---------------------------------------------------------------- the experiments (base.py's protocol)


class RecoveryTask(NamedTuple):
    experiment: str     # "sensing" or "completion"
    kind: str           # "nuclear_norm" (no depth), "networks" or "flattest_solution"
    depth: int | None
    n: int
    seed: int


@dataclass(frozen=True)
class RecoveryGrid:
    """The sweep (depths, measurement counts, seeds) and the problem and budget of one grid's recovery experiment."""

    depths: tuple = (2, 3, 4)
    ns: tuple = (80, 120, 160, 200)      # r (d_0 + d_L) = 80 up to d_0 d_L / 2 = 200
    seeds: tuple = (0,)
    problem: RecoverySettings = field(default_factory=RecoverySettings)


_QUICK = RecoverySettings(steps=600, polish_steps=200)
_FULL = RecoverySettings(steps=2000, polish_steps=500)
_FULL_NS = (60, 80, 100, 120, 140, 160, 180, 200)


class Recovery(Experiment):
    """Recovery error of every method against ``n``, and the equality of nuclear norms (``flattest_solution`` = convex)."""

    Task = RecoveryTask
    fields = dict(COMMON_FIELDS, n=INT, d=INT, rank=INT, rel_error=NUMBER, nuclear_norm=NUMBER, train_loss=NUMBER,
                  trace=OPTIONAL_NUMBER, trace_isotropic=OPTIONAL_NUMBER, ratio=OPTIONAL_NUMBER)

    def __init__(self, name: str, title: str, settings: dict):
        self.name, self.title, self.settings = name, title, settings
        self.figure_name = f"recovery_{name}.png"

    def tasks(self, s: RecoveryGrid) -> list[RecoveryTask]:
        tasks = []
        for n in s.ns:
            for seed in s.seeds:
                tasks.append(RecoveryTask(self.name, "nuclear_norm", None, n, seed))
                for depth in s.depths:
                    tasks.append(RecoveryTask(self.name, "networks", depth, n, seed))
                    tasks.append(RecoveryTask(self.name, "flattest_solution", depth, n, seed))
        return tasks

    def methods(self, task: RecoveryTask) -> tuple[str, ...]:
        return NETWORK_METHODS if task.kind == "networks" else (task.kind,)

    def run(self, task: RecoveryTask, s: RecoveryGrid, backend: str) -> list[dict]:
        if task.kind == "nuclear_norm":
            return run_nuclear_norm(task.experiment, task.n, task.seed, s.problem)
        if task.kind == "flattest_solution":
            return run_flattest_solution(task.experiment, task.depth, task.n, task.seed, s.problem, backend)
        if task.kind == "networks":
            return run_networks(task.experiment, task.depth, task.n, task.seed, s.problem, backend)
        raise ValueError(f"task.kind must be 'nuclear_norm', 'networks' or 'flattest_solution', got {task.kind!r}")

    def cost(self, task: RecoveryTask, s: RecoveryGrid) -> float:
        # measured with the quick budget (d = 20, 800 steps): cvxpy 3-4 s; the four networks 1.3-3 s;
        # a sensing solve 0.5-1 s, a completion solve (which runs to its iteration cap) 7-10 s
        p = s.problem
        scale = (p.d / 20) ** 3
        if task.kind == "nuclear_norm":
            return 3.5 * scale
        if task.kind == "networks":
            return 2.5e-3 * (p.steps + p.polish_steps) * (1 + task.depth / 4) * scale
        per_depth = 3.5 if self.name == "completion" else 0.4
        return per_depth * task.depth * (p.solution_max_outer * p.solution_max_inner) / 6000 * scale

    def table(self, records: list[dict]) -> dict:
        """``{(depth, n): {method: mean rel_error over seeds}}``; ``nuclear_norm`` (depth-free) is copied into every depth."""
        errors = defaultdict(list)
        depths = sorted({r["depth"] for r in records if r["depth"] is not None})
        for r in records:
            for depth in ([r["depth"]] if r["depth"] is not None else depths):
                errors[(depth, r["n"], r["method"])].append(r["rel_error"])
        table = defaultdict(dict)
        for (depth, n, method), values in errors.items():
            table[(depth, n)][method] = mean(values)
        return dict(sorted(table.items()))

    def nuclear_norm_gaps(self, records: list[dict]) -> dict:
        """``{n: {"convex": mean ‖X‖_*, depth: mean (‖E‖_* - ‖X‖_*) / ‖X‖_*}}`` of ``flattest_solution`` against the convex program, per seed."""
        convex = {(r["n"], r["seed"]): r["nuclear_norm"] for r in records if r["method"] == "nuclear_norm"}
        gaps, norms = defaultdict(list), defaultdict(list)
        for (n, _), value in convex.items():
            norms[n].append(value)
        for r in records:
            key = (r["n"], r["seed"]) if r["method"] == "flattest_solution" else None
            if key in convex:
                gaps[(r["n"], r["depth"])].append((r["nuclear_norm"] - convex[key]) / convex[key])
        table = {n: {"convex": mean(values)} for n, values in sorted(norms.items())}
        for (n, depth), values in sorted(gaps.items()):
            table[n][depth] = mean(values)
        return table

    def summary_section(self, records: list[dict]) -> list[str]:
        table = self.table(records)
        methods = [m for m in METHODS if any(m in row for row in table.values())]
        over = seeds_phrase(len({r["seed"] for r in records}))
        regularizer = ("the `Isotropic` trace (the expectation of the training-loss trace over Gaussian `A`) as regularizer."
                       if any(r.get("regularizer") == "isotropic" and r["method"] == "flatness" for r in records)
                       else "the trace of the training-loss Hessian as regularizer.")
        lines = [
            f"## {self.name}: {self.title}, relative recovery error ‖E − M*‖_F / ‖M*‖_F",
            "",
            f"{over}`nuclear_norm` is the convex program `min ‖X‖_* s.t. A(X) = b` "
            "(cvxpy + Clarabel); it has no depth. `flattest_solution` is the factorization of least `Isotropic` "
            "trace that fits the measurements exactly (`flatkern.flattest_solution`). `flatness` trains with "
            + regularizer,
            "",
            "| depth | n | " + " | ".join(methods) + " |",
            "|---|---|" + "---|" * len(methods),
        ]
        for (depth, n), row in table.items():
            lines.append(f"| {depth} | {n} | " + " | ".join(fmt(row.get(m, math.nan)) for m in methods) + " |")
        lines.append("")
        gaps = self.nuclear_norm_gaps(records)
        depths = sorted({k for row in gaps.values() for k in row if k != "convex"})
        if depths:
            solved = [r for r in records if r["method"] == "flattest_solution"]
            worst = max(abs(g) for row in gaps.values() for k, g in row.items() if k != "convex")
            feasibility = max((r.get("feasibility") or 0.0) for r in solved)
            lines += [
                f"**The equality.** `flattest_solution`'s nuclear norm against the convex program's optimum at every n: "
                f"`(‖E‖_* − ‖X‖_*) / ‖X‖_*`{', ' + over.rstrip('. ').lower() if over else ''} "
                "(the theorem: 0, above and below the recovery threshold). "
                f"Largest |gap| {worst:.1e}; largest relative residual ‖A(E) − b‖ / ‖b‖ {feasibility:.1e}.",
                "",
                "| n | ‖X‖_* (convex) | " + " | ".join(f"depth {d}" for d in depths) + " |",
                "|---|---|" + "---|" * len(depths),
            ]
            for n, row in gaps.items():
                lines.append(f"| {n} | {row['convex']:.4f} | " + " | ".join(gap(row.get(d, math.nan)) for d in depths) + " |")
            lines.append("")
        return lines

    def figure(self, records: list[dict]):
        """Relative recovery error against ``n``, one panel per depth, one line per method (log scale), one legend."""
        plt = pyplot()
        table = self.table(records)
        depths = sorted({depth for depth, _ in table})
        fig, axes = plt.subplots(1, len(depths), figsize=(max(4.6 * len(depths), 6.4), 4.6), sharey=True, squeeze=False)
        shown = []
        for ax, depth in zip(axes[0], depths):
            ns = sorted(n for d, n in table if d == depth)
            for method in METHODS:
                ys = [table[(depth, n)].get(method, math.nan) for n in ns]
                if all(math.isnan(y) for y in ys):
                    continue
                shown += [y for y in ys if y > 0]
                ax.plot(ns, ys, label=method, **STYLE[method])
            ax.set_yscale("log")
            ax.set_title(f"depth L = {depth}")
            ax.set_xlabel("number of measurements n")
            ax.grid(True, which="both", alpha=0.3)
        if shown:
            # down to the smallest error in the data (exact recoveries reach 1e-8 and below), a decade of margin
            low, high = min(shown), max(shown)
            axes[0][0].set_ylim(10 ** math.floor(math.log10(low)), 10 ** math.ceil(math.log10(max(high, 1.0)) + 0.01))
        axes[0][0].set_ylabel(r"relative error $\Vert E - M^*\Vert_F \,/\, \Vert M^*\Vert_F$")
        d, r = next(((r["d"], r["rank"]) for r in records if "d" in r), ("?", "?"))
        seeds = len({r["seed"] for r in records})
        what = {"sensing": "Gaussian sensing", "completion": "matrix completion"}.get(self.name, self.name)
        suptitle(fig, f"{what}: recovering a rank-{r} {d}×{d} matrix M* from n measurements "
                      f"({f'mean over {seeds} seeds; ' if seeds > 1 else ''}lower is better)")
        figure_legend(fig, axes[0])  # and the layout
        return fig


SENSING = Recovery("sensing", "Gaussian sensing", {
    "quick": RecoveryGrid(depths=(2, 3), ns=(200,), problem=_QUICK),
    "default": RecoveryGrid(),
    "full": RecoveryGrid(ns=_FULL_NS, seeds=(0, 1, 2), problem=_FULL),
})
COMPLETION = Recovery("completion", "matrix completion (uniform entries)", {
    "quick": RecoveryGrid(depths=(2, 3), ns=(200,), problem=_QUICK),
    "default": RecoveryGrid(ns=(120, 200)),
    "full": RecoveryGrid(ns=_FULL_NS, seeds=(0, 1, 2), problem=_FULL),
})
