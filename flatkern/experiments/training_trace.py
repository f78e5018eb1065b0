"""Experiment 5: the paper's theorem on the TRAINING loss (``training_trace``; issue 20 §1).

``sensing`` shows an equality for a stand-in: the flattest solution under the
population (``Isotropic``) trace, which the closed form makes the
minimum-nuclear-norm interpolator.  The paper's statement is about the trace of
the training loss on the ``n`` measurements observed, and it holds up to their
(1, δ)-RIP constant (docs/MATH.md, "The training-loss trace and the RIP constant"):
with ``x*`` the zero-loss factorization of least training trace and ``X`` the
convex optimum ``argmin ‖X‖_* s.t. A(X) = b``,

    ‖E(x*)‖_* / ‖X‖_*  ≤  factor(δ, L) = ((1 + δ) / (1 - δ))^{L / (2L - 2)}      (δ < 1).

On Gaussian sensing of a rank-``r`` ``d × d`` matrix (``recovery.make_problem``:
the ``sensing`` experiment's measurements for the same ``d``, ``r``, ``n``, seed),
at every ``(n, depth)``, one record per method:

- ``training_trace``: ``flattest_solution(Dense(A), b, widths, trace_of=Dense(A))``.
- ``isotropic_trace``: the same with ``trace_of=None`` (the ``Isotropic`` trace).
- ``nuclear_norm``: the convex program (cvxpy + Clarabel; ADMM with a certified gap beyond 50 × 50); it has no depth.

Each record carries ``nuclear_norm``, ``rel_error = ‖E − M*‖_F / ‖M*‖_F``,
``feasibility = ‖A(E) − b‖ / ‖b‖`` and ``converged`` (``flattest_solution``'s
report; for the convex program, cvxpy's status ``"optimal"``); the network
records also the training trace ``trace``, the population trace
``trace_isotropic`` and ``ratio = trace_isotropic / flatness_lower_bound(E, L)``
(1 at the isotropic-flattest factorization of ``E``).  The two solution records
carry the problem's

- ``delta``: ``flatkern.theory.rip_constant_lower_estimate(Dense(A))``, a LOWER
  estimate of δ (the true δ is at least this; certifying δ is NP-hard);
- ``factor``: ``rip_nuclear_norm_factor(delta, L)``, or ``None`` where
  ``delta >= 1``: then the true δ is ``>= 1`` too and the theorem says nothing.
  Since ``delta`` is a lower estimate, ``factor`` is at most the theorem's
  factor with the true δ: a ratio within ``factor`` is within the theorem's.

and the ``training_trace`` record the **instance factor**, what the theorem's
proof gives with the RIP inequality used only at the two solutions found.  With
``ρ(W) = tr_train(W) / tr_iso(W)`` (in ``[1 − δ, 1 + δ]`` for every ``W``),
``W_iso`` the isotropic-flattest solution (``tr_iso(W_iso) = c ‖X‖_*^{2−2/L}``,
the closed form) and ``tr_train(x*) <= tr_train(W_iso)`` (``x*`` is the flattest
in the training trace):

    c ‖E(x*)‖_*^{2−2/L} <= tr_iso(x*) = tr_train(x*) / ρ(x*) <= tr_train(W_iso) / ρ(x*)
                         = (ρ(W_iso) / ρ(x*)) · c ‖X‖_*^{2−2/L},

so ``‖E(x*)‖_* / ‖X‖_* <= instance_factor = (ρ(W_iso) / ρ(x*))^{L/(2L−2)} <= factor(δ, L)``,
finite at every ``n``.  It holds as stated only where both solves reached their
optima (``tr_train(x*) <= tr_train(W_iso)`` and the isotropic record's ``ratio`` at 1):
the summary says where the records show otherwise.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch

from ..ops import end_to_end
from ..theory import rip_constant_lower_estimate, rip_nuclear_norm_factor
from .base import (COMMON_FIELDS, INT, NUMBER, OPTIONAL_NUMBER, Experiment, budget_lines, figure_legend, fmt, mean, pyplot,
                   seeds_phrase, suptitle, swept_problems, within_budget)
from .baselines import nuclear_norm_solution
from .baselines import convex_cost, convex_memory_gb
from .recovery import FULL_TASK_MEMORY_GB, FULL_TASK_SECONDS, LITERATURE, RecoverySettings, _generator, make_problem, metrics
from .solution import solve_flattest

__all__ = ["TrainingTraceSettings", "TrainingTraceGrid", "TrainingTraceTask", "TRAINING_TRACE", "METHODS",
           "run_convex", "run_solutions", "instance_factor"]

SOLUTION_METHODS = ("isotropic_trace", "training_trace")
METHODS = ("training_trace", "isotropic_trace", "nuclear_norm")


@dataclass(frozen=True)
class TrainingTraceSettings:
    """The solves' budget, the same for every problem.

    ``flattest_solution``'s tolerances and caps as in ``recovery.RecoverySettings`` (its
    defaults cost minutes per depth-4 solve for digits no table shows); measured at d = 20,
    n = 80-200, depths 2-4: every solve converged, feasibility below 1e-8.
    """

    solution_tol: float = 1e-8
    solution_max_outer: int = 30
    solution_max_inner: int = 200
    rip_restarts: int | None = None     # rip_constant_lower_estimate's default
    rip_iterations: int = 100


@dataclass(frozen=True)
class TrainingTraceGrid:
    """The sweep: ``problems`` is a tuple of ``(d, rank, ns)`` (a rank-``rank`` ``d × d`` ``M*``, each ``n`` of ``ns``)."""

    problems: tuple = ((20, 2, (80, 120, 160, 200)),)
    depths: tuple = (2, 3, 4)
    seeds: tuple = (0,)
    budget: TrainingTraceSettings = field(default_factory=TrainingTraceSettings)
    # a task whose estimated cost (`cost`, one idle thread) or memory (`memory_gb`) is above these is left out, with
    # every other task of its problem, and the summary says so
    max_task_seconds: float | None = None
    max_task_memory_gb: float | None = None


class TrainingTraceTask(NamedTuple):
    experiment: str
    kind: str            # "nuclear_norm" (no depth) or "solutions" (both flattest solutions at one depth)
    d: int
    rank: int
    depth: int | None
    n: int
    seed: int


def _problem(d: int, rank: int, n: int, seed: int):
    """``(M*, Dense(A), b)``: the ``sensing`` experiment's problem for these ``d``, ``rank``, ``n``, seed."""
    return make_problem("sensing", n, seed, RecoverySettings(d=d, rank=rank))


def _span(low: float, high: float, spec: str, sep: str = " to ") -> str:
    """``"low to high"``, or one number where they print the same."""
    a, b = format(low, spec), format(high, spec)
    return a if a == b else f"{a}{sep}{b}"


def _feasibility(meas, E: torch.Tensor, b: torch.Tensor) -> float:
    return float((meas.predict(E) - b).norm() / b.norm())


def instance_factor(training: dict, isotropic: dict, depth: int) -> float:
    """``(ρ(W_iso) / ρ(x*))^{L/(2L-2)}``, ``ρ = trace / trace_isotropic`` of each record (module docstring)."""
    rho_iso = isotropic["trace"] / isotropic["trace_isotropic"]
    rho_train = training["trace"] / training["trace_isotropic"]
    return (rho_iso / rho_train) ** (depth / (2 * depth - 2))


def run_convex(d: int, rank: int, n: int, seed: int) -> list[dict]:
    """The convex optimum ``argmin ‖X‖_* s.t. A(X) = b`` on one problem; one record (no depth)."""
    M, meas, b = _problem(d, rank, n, seed)
    X, status = nuclear_norm_solution(meas, b, tuple(M.shape), return_status=True)
    return [dict(experiment="training_trace", method="nuclear_norm", depth=None, n=n, seed=seed, d=d, rank=rank,
                 solver_status=status, converged=status == "optimal", feasibility=_feasibility(meas, X, b),
                 delta=None, factor=None, instance_factor=None, **metrics(None, X, M, meas, b, None, "torch"))]


def run_solutions(d: int, rank: int, depth: int, n: int, seed: int, s: TrainingTraceSettings,
                  backend: str = "auto") -> list[dict]:
    """The isotropic- and the training-trace-flattest solutions at one depth, with δ's estimate; two records."""
    M, meas, b = _problem(d, rank, n, seed)
    # deterministic given the generator (theory.rip_constant_lower_estimate), hence the same at every depth
    delta = rip_constant_lower_estimate(meas, restarts=s.rip_restarts, iterations=s.rip_iterations,
                                        generator=_generator("rip", d, rank, n, seed))
    # at delta >= 1 the true δ (>= the estimate) is >= 1 too: the bound is vacuous, recorded as None
    factor = rip_nuclear_norm_factor(delta, depth) if delta < 1 else None
    records = {}
    for method, trace_of in (("isotropic_trace", None), ("training_trace", meas)):
        W, report = solve_flattest(meas, b, [d] * (depth + 1), trace_of=trace_of, tol=s.solution_tol,
                                   max_outer=s.solution_max_outer, max_inner=s.solution_max_inner)
        records[method] = dict(method=method, delta=delta, factor=factor if method == "training_trace" else None,
                               **metrics(W, end_to_end(W, backend=backend), M, meas, b, depth, backend), **report)
    records["isotropic_trace"]["instance_factor"] = None
    records["training_trace"]["instance_factor"] = instance_factor(records["training_trace"],
                                                                   records["isotropic_trace"], depth)
    return [dict(experiment="training_trace", depth=depth, n=n, seed=seed, d=d, rank=rank, **records[m])
            for m in SOLUTION_METHODS]


# ---------------------------------------------------------------- the experiment (base.py's protocol)


class TrainingTrace(Experiment):
    """The training-trace-flattest solution's nuclear norm over the convex optimum, against the theorem's factor."""

    name = "training_trace"
    figure_name = "training_trace.png"
    Task = TrainingTraceTask
    fields = dict(COMMON_FIELDS, n=INT, d=INT, rank=INT, rel_error=NUMBER, nuclear_norm=NUMBER, train_loss=NUMBER,
                  feasibility=NUMBER, converged=(bool,), trace=OPTIONAL_NUMBER, trace_isotropic=OPTIONAL_NUMBER,
                  ratio=OPTIONAL_NUMBER, delta=OPTIONAL_NUMBER, factor=OPTIONAL_NUMBER, instance_factor=OPTIONAL_NUMBER)
    settings = {
        "quick": TrainingTraceGrid(problems=((8, 1, (24,)),), depths=(2, 3)),
        "default": TrainingTraceGrid(),
        # 40 × 40: δ's estimate is 0.73 at n = 1200 < d_0 d_L (seed 0), so the factor is finite where the
        # measurements do not yet determine E (though above the recovery threshold, as far as a CPU reaches)
        # and the literature's 100 × 100 rank 5, n = 2,000-5,000, as far as the cost model affords (FULL_TASK_SECONDS)
        "full": TrainingTraceGrid(problems=((20, 2, (60, 80, 100, 120, 140, 160, 180, 200)),
                                            (40, 2, (400, 800, 1200)), LITERATURE),
                                  seeds=(0, 1, 2), max_task_seconds=FULL_TASK_SECONDS,
                                  max_task_memory_gb=FULL_TASK_MEMORY_GB),
    }

    axes = ("sizes", "ranks", "depths", "ns", "seeds")

    def tasks(self, s: TrainingTraceGrid) -> list[TrainingTraceTask]:
        # every row of the table compares a problem's solutions with its convex optimum: whole problems or none
        return within_budget(self, s, self.all_tasks(s), s.max_task_seconds, s.max_task_memory_gb,
                             whole_problems=True)[0]

    def budget_note(self, s: TrainingTraceGrid) -> list[str]:
        return budget_lines(self, s, self.all_tasks(s), s.max_task_seconds, s.max_task_memory_gb, whole_problems=True)

    def memory_gb(self, task: TrainingTraceTask, s: TrainingTraceGrid) -> float:
        return convex_memory_gb(True, task.d, task.n) if task.kind == "nuclear_norm" else 2.4e-8 * task.n * task.d**2 + 0.3

    def sweep(self, s: TrainingTraceGrid, axes: dict) -> TrainingTraceGrid:
        return replace(s, problems=swept_problems(s.problems, axes), depths=axes.get("depths", s.depths),
                       seeds=axes.get("seeds", s.seeds))

    def all_tasks(self, s: TrainingTraceGrid) -> list[TrainingTraceTask]:
        """Every task of the sweep, affordable or not."""
        tasks = []
        for d, rank, ns in s.problems:
            for n in ns:
                for seed in s.seeds:
                    tasks.append(TrainingTraceTask(self.name, "nuclear_norm", d, rank, None, n, seed))
                    for depth in s.depths:
                        tasks.append(TrainingTraceTask(self.name, "solutions", d, rank, depth, n, seed))
        return tasks

    def methods(self, task: TrainingTraceTask) -> tuple[str, ...]:
        return SOLUTION_METHODS if task.kind == "solutions" else ("nuclear_norm",)

    def run(self, task: TrainingTraceTask, s: TrainingTraceGrid, backend: str) -> list[dict]:
        if task.kind == "nuclear_norm":
            return run_convex(task.d, task.rank, task.n, task.seed)
        if task.kind == "solutions":
            return run_solutions(task.d, task.rank, task.depth, task.n, task.seed, s.budget, backend)
        raise ValueError(f"task.kind must be 'nuclear_norm' or 'solutions', got {task.kind!r}")

    def cost(self, task: TrainingTraceTask, s: TrainingTraceGrid) -> float:
        # measured (one thread, d = 20, n = 80-200): cvxpy 0.6-1.1 s, 17 s at d = 40, n = 1200; the two solves
        # 0.5 s at L = 2, 1-2 s at L = 3, 2.8-3 s at L = 4, the training-trace solve 8 s / 36 s at d = 40, n = 1200,
        # L = 2 / 3.  The training trace costs O(n d^3) per evaluation: measured 3.1 s (L = 2) and 6.9 s (L = 4)
        # for the trace and its gradient at 100 × 100, n = 2000, 7 s at n = 5000, so a solve of a few hundred
        # evaluations takes an hour there.  cvxpy as in `recovery` (`baselines.convex_cost`).
        d, n = task.d, task.n
        if task.kind == "nuclear_norm":
            return max(0.8 * (d / 20) ** 3 * n / (7 * d), convex_cost(True, d, n))
        per_evaluation = 1.4e-9 * n * d**3
        return (task.depth - 1) ** 1.5 * max(0.5 * (d / 20) ** 3 * n / 140, 300 * per_evaluation)

    # ------------------------------------------------------------ the report

    def table(self, records: list[dict]) -> dict:
        """``{(d, rank, depth, n): row}``, means over seeds of the ratios to the convex optimum and the errors.

        ``row``: ``convex`` (‖X‖_*), ``training_trace`` / ``isotropic_trace`` (‖E‖_* / ‖X‖_*), ``error_<method>``,
        ``delta``, ``factor`` (``None`` if any seed's is: vacuous), ``instance_factor``, ``problems`` (seeds),
        ``within`` / ``within_instance`` (seeds whose ratio is at most the factor / the instance factor).
        """
        convex = {(r["d"], r["rank"], r["n"], r["seed"]): r for r in records if r["method"] == "nuclear_norm"}
        groups = defaultdict(lambda: defaultdict(list))
        for r in records:
            if r["method"] == "nuclear_norm":
                continue
            X = convex.get((r["d"], r["rank"], r["n"], r["seed"]))
            if X is None:
                continue
            g = groups[(r["d"], r["rank"], r["depth"], r["n"])]
            g[r["method"]].append(r["nuclear_norm"] / X["nuclear_norm"])
            g[f"error_{r['method']}"].append(r["rel_error"])
            if r["method"] == "training_trace":
                g["convex"].append(X["nuclear_norm"])
                g["error_nuclear_norm"].append(X["rel_error"])
                g["delta"].append(r["delta"])
                g["factor"].append(r["factor"])
                g["instance_factor"].append(r["instance_factor"])
                ratio = r["nuclear_norm"] / X["nuclear_norm"]
                g["within"].append(r["factor"] is not None and ratio <= r["factor"])
                g["within_instance"].append(ratio <= r["instance_factor"])
        table = {}
        for key, g in sorted(groups.items()):
            row = {k: mean(v) for k, v in g.items() if k not in ("factor", "within", "within_instance")}
            row["factor"] = None if not g["factor"] or None in g["factor"] else mean(g["factor"])
            row["problems"] = len(g["within"])
            row["within"], row["within_instance"] = sum(g["within"]), sum(g["within_instance"])
            table[key] = row
        return table

    def summary_section(self, records: list[dict]) -> list[str]:
        table = self.table(records)
        over = seeds_phrase(len({r["seed"] for r in records}))
        lines = [
            "## training_trace: the paper's theorem on the training loss (Gaussian sensing)",
            "",
            f"{over}On the `sensing` experiment's problems, `training_trace` is the zero-loss factorization of least "
            "trace of the **training** loss's Hessian on the n measurements observed "
            "(`flattest_solution(Dense(A), b, widths, trace_of=Dense(A))`), `isotropic_trace` the one of least "
            "population (`Isotropic`) trace, both over `‖X‖_*`, the convex optimum `min ‖X‖_* s.t. A(X) = b` "
            "(cvxpy + Clarabel; ADMM with a certified gap beyond 50 × 50). δ̂ is `rip_constant_lower_estimate(Dense(A))`, a **lower** estimate of the (1, δ)-RIP "
            "constant (the true δ is at least δ̂); the theorem's factor `((1 + δ)/(1 − δ))^{L/(2L−2)}` computed from "
            "it is at most the theorem's own, and where δ̂ ≥ 1 the true δ is ≥ 1 too and the bound is vacuous (—). "
            "The instance factor `(ρ(W_iso)/ρ(x*))^{L/(2L−2)}`, `ρ = tr_train / tr_iso` at the two solutions found, "
            "is what the theorem's proof gives with the RIP inequality used only there (finite at every n).",
            "",
            "| d × d, rank | depth | n | δ̂ | factor(δ̂) | instance factor | ‖E‖_*/‖X‖_* training | ‖E‖_*/‖X‖_* isotropic "
            "| error convex | error training | error isotropic |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for (d, rank, depth, n), row in table.items():
            factor = "—" if row["factor"] is None else f"{row['factor']:.3f}"
            lines.append(f"| {d} × {d}, {rank} | {depth} | {n} | {row['delta']:.3f} | {factor} | "
                         f"{row['instance_factor']:.4f} | {row['training_trace']:.6f} | {row['isotropic_trace']:.6f} | "
                         f"{fmt(row['error_nuclear_norm'])} | {fmt(row['error_training_trace'])} | "
                         f"{fmt(row['error_isotropic_trace'])} |")
        lines.append("")
        if not table:
            return lines
        solved = [r for r in records if r["method"] in SOLUTION_METHODS]
        iso_gap = max(abs(r["nuclear_norm"] / X - 1) for r, X in self._paired(records, "isotropic_trace"))
        train = self._paired(records, "training_trace")
        finite = [(r, X) for r, X in train if r["factor"] is not None]
        vacuous = sorted({(r["d"], r["n"]) for r, _ in train if r["factor"] is None})
        worst = max(r["nuclear_norm"] / X for r, X in train)
        not_converged = [r for r in solved if not r["converged"]]
        lines.append(f"**Isotropic trace: equal.** The closed form makes the isotropic-flattest solution the "
                     f"minimum-nuclear-norm one; measured: largest |‖E‖_*/‖X‖_* − 1| = {iso_gap:.1e} (solver "
                     f"tolerance), at every n, depth and problem.")
        lines.append("")
        if finite:
            held = sum(r["nuclear_norm"] / X <= r["factor"] for r, X in finite)
            worst_finite = max(finite, key=lambda p: p[0]["nuclear_norm"] / p[1])
            lines.append(
                f"**Training trace: within the theorem's factor** where δ̂ < 1: {held} of {len(finite)} problems "
                f"(largest ratio {worst_finite[0]['nuclear_norm'] / worst_finite[1]:.6f} against factor(δ̂) = "
                f"{worst_finite[0]['factor']:.3f}, δ̂ = {worst_finite[0]['delta']:.3f}, L = {worst_finite[0]['depth']}, "
                f"n = {worst_finite[0]['n']}).")
        else:
            worst_record, worst_convex = max(train, key=lambda p: p[0]["nuclear_norm"] / p[1])
            lines.append(
                f"**Training trace: within the theorem's factor, vacuously** (measured ratio up to "
                f"{worst_record['nuclear_norm'] / worst_convex:.6f}, at L = {worst_record['depth']}, n = "
                f"{worst_record['n']}; the estimated factor is infinite at every size here: δ̂ ≥ 1, so the theorem "
                "bounds nothing, and the instance factor below is the telling comparison).")
        if vacuous:
            sizes = defaultdict(list)
            for d, n in vacuous:
                sizes[d].append(n)
            where = "; ".join(f"{d} × {d} at n = {', '.join(map(str, ns))}" for d, ns in sorted(sizes.items()))
            deltas = [r["delta"] for r, _ in train if r["factor"] is None]
            # δ ~ C √((d_0 + d_L)/n) for Gaussian A: the C's of these estimates, and the n where δ̂ would reach 1
            Cs = [r["delta"] * math.sqrt(r["n"] / (2 * r["d"])) for r, _ in train]
            lines.append(
                f"δ̂ ≥ 1 ({_span(min(deltas), max(deltas), '.2f')}), so the bound says nothing, for {where}. "
                f"Here δ̂ √(n / (d_0 + d_L)) = {_span(min(Cs), max(Cs), '.1f')} (δ ~ C √((d_0 + d_L)/n) for Gaussian A), "
                f"so δ̂ < 1 needs n ≳ {_span(min(Cs) ** 2, max(Cs) ** 2, '.0f', '-')} (d_0 + d_L): for a d × d matrix "
                f"that is below d² (from d² on, A(E) = b has the one solution M*) only for "
                f"d ≳ {_span(2 * min(Cs) ** 2, 2 * max(Cs) ** 2, '.0f', '-')}.")
        held_instance = sum(r["nuclear_norm"] / X <= r["instance_factor"] * (1 + 1e-6) for r, X in train)
        above = [(r, X) for r, X in train if r["nuclear_norm"] / X > 1 + 1e-4]
        lines.append(
            f"Measured ‖E‖_*/‖X‖_* of the training-trace solution: largest {worst:.6f}; within the instance factor "
            f"in {held_instance} of {len(train)} problems (to 1e-6, the solves' tolerance)."
            + (f" Above 1 + 1e-4 in {len(above)} problems, at n = "
               f"{', '.join(str(n) for n in sorted({r['n'] for r, _ in above}))}: there the training trace's "
               "flattest solution is not the minimum-nuclear-norm interpolator." if above else
               " It meets the convex optimum (to 1e-4) in every problem."))
        lines.append("")
        lines.append(
            f"Every solve converged ({len(solved)} solves)." if not not_converged else
            f"{len(not_converged)} of {len(solved)} solves stopped at an iteration cap (`converged: false`): "
            + ", ".join(f"{r['method']} L = {r['depth']} n = {r['n']} (feasibility {r['feasibility']:.1e})"
                        for r in not_converged) + ".")
        feas = max(r["feasibility"] for r in solved)
        lines += [f"Largest relative residual ‖A(E) − b‖ / ‖b‖ of a solve: {feas:.1e}.", ""]
        return lines

    @staticmethod
    def _paired(records: list[dict], method: str) -> list[tuple[dict, float]]:
        """``[(record, ‖X‖_*)]``: each ``method`` record with its problem's convex optimum."""
        convex = {(r["d"], r["rank"], r["n"], r["seed"]): r["nuclear_norm"] for r in records if r["method"] == "nuclear_norm"}
        return [(r, convex[(r["d"], r["rank"], r["n"], r["seed"])]) for r in records
                if r["method"] == method and (r["d"], r["rank"], r["n"], r["seed"]) in convex]

    def figure(self, records: list[dict]):
        """Per problem size (rows): the nuclear-norm ratios against ``n`` with the factor bands (left), the
        recovery errors against ``n`` (log-log) with δ̂ on a second axis (right)."""
        plt = pyplot()
        table = self.table(records)
        sizes = sorted({(d, rank) for d, rank, _, _ in table})
        depths = sorted({depth for _, _, depth, _ in table})
        colors = {depth: color for depth, color in zip(depths, ("tab:blue", "tab:orange", "tab:green", "tab:purple",
                                                                 "tab:brown", "tab:pink"))}
        fig, axes = plt.subplots(len(sizes), 2, figsize=(12.0, 1.4 + 4.4 * len(sizes)), squeeze=False)
        legend_axes = []
        for row_axes, (d, rank) in zip(axes, sizes):
            top, bottom = row_axes
            rows = {key[2:]: row for key, row in table.items() if key[:2] == (d, rank)}
            ns = sorted({n for _, n in rows})
            vacuous = [n for n in ns if any(rows[(L, n)]["factor"] is None for L in depths if (L, n) in rows)]
            ratios = []
            for depth in depths:
                xs = [n for n in ns if (depth, n) in rows]
                train = [rows[(depth, n)]["training_trace"] for n in xs]
                iso = [rows[(depth, n)]["isotropic_trace"] for n in xs]
                ratios += train + iso
                c = colors[depth]
                top.plot(xs, train, color=c, marker="o", label=f"training trace L={depth}")
                top.plot(xs, iso, color=c, marker="x", linestyle=":", label=f"isotropic trace L={depth}")
                inst = [rows[(depth, n)]["instance_factor"] for n in xs]
                top.plot(xs, inst, color=c, linestyle="--", linewidth=1.0, label=f"instance factor L={depth}")
                finite = [(n, rows[(depth, n)]["factor"]) for n in xs if rows[(depth, n)]["factor"] is not None]
                if finite:
                    top.fill_between([n for n, _ in finite], 1.0, [f for _, f in finite], color=c, alpha=0.12,
                                     label=f"factor(δ̂) L={depth}")
                bottom.plot(xs, [rows[(depth, n)]["error_training_trace"] for n in xs], color=c, marker="o",
                            label=f"training trace L={depth}")
                bottom.plot(xs, [rows[(depth, n)]["error_isotropic_trace"] for n in xs], color=c, marker="x",
                            linestyle=":", label=f"isotropic trace L={depth}")
            if vacuous:
                # the factor is infinite there: shade the n's instead of drawing an unbounded band
                half = (0.5 * min(b - a for a, b in zip(ns, ns[1:]))) if len(ns) > 1 else 0.05 * ns[0]
                top.axvspan(min(vacuous) - half, max(vacuous) + half, color="0.9", zorder=0,
                            label="δ̂ ≥ 1: factor infinite")
                top.text(0.98, 0.97, f"shaded: δ̂ ≥ 1 at n = {', '.join(map(str, vacuous))},\nthe theorem's factor is "
                         "infinite there (no band)", transform=top.transAxes, ha="right", va="top", fontsize=8)
            bands = [(L, [rows[(L, n)]["factor"] for n in ns if (L, n) in rows and rows[(L, n)]["factor"] is not None])
                     for L in depths]
            bands = [f"L={L}: {min(f):.3g} to {max(f):.3g}" for L, f in bands if f]
            if bands:
                # a finite factor is usually far above the ratios: say where its band ends
                top.text(0.98, 0.80 if vacuous else 0.97, "bands from 1 to factor(δ̂), up to\n" + "\n".join(bands),
                         transform=top.transAxes, ha="right", va="top", fontsize=8)
            top.axhline(1.0, color="black", linewidth=0.8)
            # the ratios' scale (the bands of a finite factor may reach beyond it, as they should)
            high = max(max(ratios), *(rows[k]["instance_factor"] for k in rows))
            top.set_ylim(1 - 0.05 * (high - 1) - 1e-4, 1 + 1.15 * (high - 1) + 1e-4)
            top.set_xlim(ns[0] - (half if vacuous else 0.05 * ns[0]), ns[-1] + (half if vacuous else 0.05 * ns[-1]))
            top.set_title(f"{d}×{d}, rank {rank}: nuclear norm over the convex optimum's")
            top.set_xlabel("number of measurements n")
            top.set_ylabel(r"$\Vert E\Vert_* \,/\, \Vert X\Vert_*$ (convex optimum $X$)")
            top.grid(True, alpha=0.3)
            errors = [rows[key]["error_nuclear_norm"] for key in sorted(rows) if key[0] == depths[0]]
            bottom.plot(ns, errors, color="black", marker="x", linestyle="--", label="convex optimum")
            bottom.set_xscale("log")
            bottom.set_yscale("log")
            bottom.set_xlabel("number of measurements n (log scale)")
            bottom.set_ylabel(r"relative error $\Vert E - M^*\Vert_F \,/\, \Vert M^*\Vert_F$")
            bottom.set_title(f"{d}×{d}, rank {rank}: recovery error, and δ̂(n) (right axis)")
            bottom.grid(True, which="both", alpha=0.3)
            twin = bottom.twinx()
            twin.plot(ns, [rows[(depths[0], n)]["delta"] for n in ns], color="gray", marker="s", linestyle="-.",
                      label="δ̂ (right axis)")
            twin.axhline(1.0, color="gray", linewidth=0.8, linestyle=":")
            twin.set_ylabel("δ̂, RIP constant (lower estimate)")
            twin.set_ylim(0, max(1.1, 1.1 * max(rows[(depths[0], n)]["delta"] for n in ns)))
            # the n's of the grid as the ticks (a log axis over less than a decade would label none)
            bottom.set_xticks(ns, [str(n) for n in ns])
            bottom.xaxis.set_minor_formatter(plt.NullFormatter())
            legend_axes += [top, bottom, twin]
        seeds = len({r["seed"] for r in records})
        suptitle(fig, "The theorem on the training loss, Gaussian sensing: the zero-loss factorization of least "
                      "training-loss trace against the convex optimum (the theorem: ratio at most factor(δ)), and "
                      "recovery errors" + (f" (mean over {seeds} seeds)" if seeds > 1 else ""))
        figure_legend(fig, legend_axes)  # and the layout
        return fig


TRAINING_TRACE = TrainingTrace()
