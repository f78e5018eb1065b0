"""Experiment 4: the exact trace of the Hessian along training (``trajectory``).

On one Gaussian sensing problem (the ``sensing`` experiment's measurements at
``n``), four methods train a depth-``L`` network from the same LeCun-normal
start, and the exact trace of the training-loss Hessian is evaluated at
log-spaced steps.  Each value is divided by the trace of ``flattest_solution``
for the same measurements (the minimum of that trace over zero-loss
factorizations, docs/MATH.md), so at zero loss ``ratio >= 1``, with 1 only at the
flattest solution:

- ``gd``: full-batch gradient descent (heavy ball, ``training.train_gd``).
- ``label_noise``: the same with fresh Gaussian noise on the targets at every
  step (label-noise gradient descent, an implicit trace regularizer near the
  zero-loss manifold, on a time scale ``~ 1/(η σ²)``), then noise-free steps.
- ``sam``: sharpness-aware minimization, the two-step update
  ``w ← w - η ∇L(w + ρ g/‖g‖)``, ``g = ∇L(w)`` (full batch, so it targets the
  largest eigenvalue rather than the trace; docs/MATH.md), then plain steps.
- ``flatness``: ``FlatnessRegularized`` on ``loss + lam · tr ∇²L`` with the exact
  training-loss trace, ``lam`` decaying, then ``lam = 0`` steps.

Each record also carries what tracking cost (one thread): the median wall time
of a step of its method, and of an exact trace evaluation and a ``gd`` step
timed interleaved (``timing_steps`` of each).
"""

from __future__ import annotations

import math
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ..ops import end_to_end, hessian_trace, mse_loss
from .base import COMMON_FIELDS, INT, NUMBER, STYLE, Experiment, figure_legend, fmt, pyplot, seconds, suptitle
from .recovery import RecoverySettings, _generator, make_problem
from .solution import solve_flattest
from .training import kernel_norm, standard_init, train_flatness, train_gd

__all__ = ["TrajectorySettings", "TrajectoryGrid", "TrajectoryTask", "TRAJECTORY", "METHODS", "log_steps", "run_trajectory"]

METHODS = ("gd", "label_noise", "sam", "flatness")


@dataclass(frozen=True)
class TrajectorySettings:
    """One trajectory run: the problem (``sensing`` at ``n``) and the budget, the same for every method."""

    n: int = 200
    steps: int = 3000          # every method's total
    points: int = 30           # log-spaced trace evaluations (at least 20 distinct steps)
    polish: float = 0.1        # the last fraction of the steps: no label noise, lam = 0
    eta: float = 0.5           # step size as a fraction of 1 / sharpness bound (training.py)
    label_noise: float = 1.0   # std of the label noise (targets have std ≈ ‖M*‖_F = √d)
    sam_rho: float = 0.05      # SAM radius, in the weights' units (‖W_j‖_F ≈ √d at the start)
    lam_start: float = 1e-1
    lam_end: float = 1e-6
    timing_steps: int = 100    # gd steps, each followed by an exact evaluation, to time the tracking


def log_steps(total: int, points: int) -> list[int]:
    """At least ``min(points, total)`` distinct steps from 1 to ``total``, log-spaced."""
    k = points
    while True:
        steps = sorted({max(1, round(math.exp(i * math.log(total) / (k - 1)))) for i in range(k)})
        if len(steps) >= min(points, total) or k > 10 * points:
            return steps
        k += 1


class _Tracker:
    """The training callback: the exact trace and the loss at the chosen steps, and what each step and evaluation took.

    It is called after every step, so the time between two calls is one training
    step; the medians of those and of the trace evaluations are robust to a
    machine busy with other work.
    """

    def __init__(self, steps: list[int], measurements, targets, backend: str, offset: int = 0):
        self.at, self.meas, self.targets, self.backend = set(steps), measurements, targets, backend
        self.offset = offset
        self.steps, self.traces, self.losses = [], [], []
        self.step_times, self.trace_times = [], []
        self.last = time.perf_counter()

    def __call__(self, t: int, weights) -> None:
        now = time.perf_counter()
        self.step_times.append(now - self.last)
        t += self.offset
        if t in self.at:
            with torch.no_grad():
                trace = float(hessian_trace(weights, self.meas, backend=self.backend))
                self.trace_times.append(time.perf_counter() - now)
                loss = float(mse_loss(weights, self.meas, self.targets, backend=self.backend))
            self.steps.append(t)
            self.traces.append(trace)
            self.losses.append(loss)
        self.last = time.perf_counter()


def _train(method: str, weights, meas, b, tracker: _Tracker, s: TrajectorySettings, kappa: float, generator, backend: str) -> None:
    polish = round(s.steps * s.polish)
    main = s.steps - polish
    if method == "gd":
        train_gd(weights, meas, b, steps=s.steps, eta=s.eta, kappa=kappa, backend=backend, callback=tracker)
    elif method in ("sam", "label_noise"):
        # SAM's ascent step and the label noise keep the loss off zero: plain steps end both
        extra = dict(sam=s.sam_rho) if method == "sam" else dict(label_noise=s.label_noise, generator=generator)
        train_gd(weights, meas, b, steps=main, eta=s.eta, kappa=kappa, backend=backend, callback=tracker, **extra)
        tracker.offset = main
        train_gd(weights, meas, b, steps=polish, eta=s.eta, kappa=kappa, backend=backend, callback=tracker)
    elif method == "flatness":
        train_flatness(weights, meas, b, steps=main, lam_start=s.lam_start, lam_end=s.lam_end, polish_steps=polish,
                       eta=s.eta, kappa=kappa, backend=backend, callback=tracker)
    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def run_trajectory(depth: int, seed: int, settings: TrajectorySettings, recovery: RecoverySettings, backend: str = "auto") -> list[dict]:
    """The four methods' trace ratios along training on one ``(depth, seed)``; one record per method."""
    s = settings
    M, meas, b = make_problem("sensing", s.n, seed, recovery)
    d = recovery.d
    widths = [d] * (depth + 1)
    kappa = kernel_norm(meas)
    flattest, report = solve_flattest(meas, b, widths, trace_of=meas,  # on the reference backend: solution.py says why
                                      tol=recovery.solution_tol, max_outer=recovery.solution_max_outer,
                                      max_inner=recovery.solution_max_inner)
    with torch.no_grad():
        reference = float(hessian_trace(flattest, meas, backend=backend))
    at = log_steps(s.steps, s.points)
    runs = []
    for method in METHODS:
        g = _generator("trajectory", depth, seed)  # the same start for every method
        W = standard_init(widths, generator=g)
        tracker = _Tracker(at, meas, b, backend)
        _train(method, W, meas, b, tracker, s, kappa, g, backend)
        runs.append((method, W, tracker))
    # the cost of tracking: exact evaluations interleaved with gd steps, so that both see the
    # same load on the machine (the log-spaced evaluations above crowd into the first steps)
    bench = _Tracker(list(range(1, s.timing_steps + 1)), meas, b, backend)
    train_gd(standard_init(widths, generator=_generator("trajectory", depth, seed)), meas, b, steps=s.timing_steps,
             eta=s.eta, kappa=kappa, backend=backend, callback=bench)
    records = []
    for method, W, tracker in runs:
        with torch.no_grad():
            E = end_to_end([w.detach() for w in W], backend=backend)
        records.append(dict(
            experiment="trajectory", method=method, depth=depth, n=s.n, seed=seed, d=d, rank=recovery.rank,
            steps=tracker.steps, ratios=[t / reference for t in tracker.traces], losses=tracker.losses,
            ratio=tracker.traces[-1] / reference, reference_trace=reference,
            rel_error=float((E - M).norm() / M.norm()), nuclear_norm=float(torch.linalg.matrix_norm(E, ord="nuc")),
            train_loss=tracker.losses[-1],
            reference_converged=report["converged"], reference_feasibility=report["feasibility"],
            # wall times (report.TIMING_KEYS: in timings.json and the summary, not results.json)
            step_seconds=statistics.median(tracker.step_times[1:]),
            trace_seconds=statistics.median(bench.trace_times),
            tracked_step_seconds=statistics.median(bench.step_times[1:]),
            reference_solve_seconds=report["solve_seconds"],
        ))
    return records


# ---------------------------------------------------------------- the experiment (base.py's protocol)


class TrajectoryTask(NamedTuple):
    experiment: str   # "trajectory"
    depth: int
    seed: int


@dataclass(frozen=True)
class TrajectoryGrid:
    """The sweep (depths, seeds), the run and the problem (``sensing``'s, at ``run.n``) of one grid's trajectories."""

    depths: tuple = (2, 3, 4)
    seeds: tuple = (0,)
    run: TrajectorySettings = field(default_factory=TrajectorySettings)
    problem: RecoverySettings = field(default_factory=RecoverySettings)


def _at_step(record: dict, step: int) -> float:
    """The ratio at the recorded step nearest to ``step`` (log scale)."""
    i = min(range(len(record["steps"])), key=lambda k: abs(math.log(record["steps"][k] / step)))
    return record["ratios"][i]


# the ratio compares flatness only among zero-loss points: off zero loss a smaller trace is not flatter
_ZERO_LOSS_NOTE = ("the ratio compares flatness only at zero loss: early in training, far from zero loss, "
                   "it can sit below 1")


class Trajectory(Experiment):
    """The exact trace along training over the flattest zero-loss solution's, and what tracking it costs."""

    name = "trajectory"
    figure_name = "trajectory.png"
    Task = TrajectoryTask
    settings = {
        "quick": TrajectoryGrid(depths=(2, 3), run=TrajectorySettings(steps=1000, points=24),
                                problem=RecoverySettings(steps=600, polish_steps=200)),
        "default": TrajectoryGrid(),
        "full": TrajectoryGrid(seeds=(0, 1), run=TrajectorySettings(steps=10000, points=40),
                               problem=RecoverySettings(steps=2000, polish_steps=500)),
    }
    fields = dict(COMMON_FIELDS, depth=INT, n=INT, d=INT, rank=INT, steps=(list,), ratios=(list,), losses=(list,),
                  ratio=NUMBER, reference_trace=NUMBER, rel_error=NUMBER, nuclear_norm=NUMBER, train_loss=NUMBER,
                  reference_converged=(bool,), reference_feasibility=NUMBER)

    def tasks(self, s: TrajectoryGrid) -> list[TrajectoryTask]:
        return [TrajectoryTask(self.name, depth, seed) for depth in s.depths for seed in s.seeds]

    def methods(self, task: TrajectoryTask) -> tuple[str, ...]:
        return METHODS

    def run(self, task: TrajectoryTask, s: TrajectoryGrid, backend: str) -> list[dict]:
        return run_trajectory(task.depth, task.seed, s.run, s.problem, backend)

    def cost(self, task: TrajectoryTask, s: TrajectoryGrid) -> float:
        # measured: 11 s at L = 2 and 19 s at L = 3 for 1000 steps of each method (the quick run)
        return (0.011 + 0.008 * (task.depth - 2)) * (s.run.steps + s.run.timing_steps) * (s.problem.d / 20) ** 2

    def table(self, records: list[dict]) -> dict:
        """``{depth: {method: record}}`` (the first seed)."""
        table = defaultdict(dict)
        for r in records:
            table[r["depth"]].setdefault(r["method"], r)
        return dict(sorted(table.items()))

    def summary_section(self, records: list[dict]) -> list[str]:
        traj = self.table(records)
        any_record = next(iter(next(iter(traj.values())).values()))
        last = max(any_record["steps"])
        marks = [s for s in (10, 100, 1000, 10000) if s < last] + [last]
        seeds = sorted({r["seed"] for r in records})
        lines = [
            "## trajectory: the exact trace along training, over the flattest solution's",
            "",
            f"Gaussian sensing (n = {any_record['n']}, rank-{any_record['rank']} {any_record['d']}×{any_record['d']} `M*`), "
            "every method from the same start. `ratio = tr ∇²L(W_t) / tr ∇²L(W_flattest)`, both the exact trace of "
            "the training loss, `W_flattest` = `flattest_solution` for the same measurements (least training-loss trace "
            f"at zero loss): at zero loss 1 is the flattest, and {_ZERO_LOSS_NOTE}. "
            f"{len(any_record['steps'])} log-spaced steps per run "
            "(`trajectory.png`); the last 10% of the steps are noise-free / unregularized."
            + (f" The table shows seed {seeds[0]} of {len(seeds)}." if len(seeds) > 1 else ""),
            "",
            "| depth | method | " + " | ".join(f"step {s}" for s in marks) + " | final loss | ‖E − M*‖/‖M*‖ |",
            "|---|---|" + "---|" * (len(marks) + 2),
        ]
        for depth, row in traj.items():
            for method in METHODS:
                if method in row:
                    r = row[method]
                    lines.append(f"| {depth} | {method} | " + " | ".join(fmt(_at_step(r, s)) for s in marks)
                                 + f" | {r['train_loss']:.1e} | {fmt(r['rel_error'])} |")
        lines += [
            "",
            "**What tracking the exact trace cost** (one thread, medians). The exact trace (the training loss's, `Dense` "
            "measurements) was evaluated after each of 100 `gd` steps, interleaved so that both see the same load on the "
            "machine; the last column is what evaluating it at every step would add, in `gd` steps. Each method's own "
            "step, median over its run, for scale.",
            "",
            "| depth | exact trace, per evaluation | gd step (interleaved) | trace / gd step | "
            + " | ".join(f"{m} step" for m in METHODS) + " |",
            "|---|---|---|---|" + "---|" * len(METHODS),
        ]
        for depth, row in traj.items():
            first = next(iter(row.values()))
            if "trace_seconds" not in first:
                continue  # records without their wall times (read back from results.json)
            steps = [seconds(row[m]["step_seconds"]) if m in row else "—" for m in METHODS]
            lines.append(f"| {depth} | {seconds(first['trace_seconds'])} | {seconds(first['tracked_step_seconds'])} | "
                         f"{first['trace_seconds'] / first['tracked_step_seconds']:.2f}× | " + " | ".join(steps) + " |")
        lines.append("")
        return lines

    def figure(self, records: list[dict]):
        """The trace ratio along training, log-scale steps, one panel per depth (a line at 1: the flattest solution)."""
        plt = pyplot()
        table = self.table(records)
        depths = sorted(table)
        fig, axes = plt.subplots(1, len(depths), figsize=(max(4.6 * len(depths), 6.4), 4.8), sharey=True, squeeze=False)
        for ax, depth in zip(axes[0], depths):
            for method in METHODS:
                if method in table[depth]:
                    r = table[depth][method]
                    style = dict(STYLE[method], markersize=3)
                    ax.plot(r["steps"], r["ratios"], label=method, **style)
            ax.axhline(1.0, color="gray", linewidth=1.0, linestyle="--")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"depth L = {depth}")
            ax.set_xlabel("training step")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][0].set_ylabel(r"$\mathrm{tr}\,\nabla^2 L(W_t) \;/\; \mathrm{tr}\,\nabla^2 L(W_\mathrm{flattest})$")
        any_record = next(iter(next(iter(table.values())).values()))
        suptitle(fig, f"Exact trace of the Hessian along training, over that of the flattest zero-loss solution "
                      f"(Gaussian sensing, n={any_record['n']}; at zero loss 1 = flattest; {_ZERO_LOSS_NOTE})")
        figure_legend(fig, axes[0])  # and the layout
        return fig


TRAJECTORY = Trajectory()
