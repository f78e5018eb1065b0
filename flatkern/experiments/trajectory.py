"""Experiment 4: implicit regularizers along training, measured against the theory (``trajectory``).

On one Gaussian sensing problem (the ``sensing`` experiment's measurements at
``n``), five methods train a depth-``L`` network from the same LeCun-normal
start.  At log-spaced steps three exact quantities are recorded, each over what
the theory says the method should reach:

- ``ratios``: the exact trace of the training-loss Hessian over that of
  ``flattest_solution`` for the same measurements (the least training trace over
  zero-loss factorizations, docs/MATH.md): at zero loss ``>= 1``, 1 only there;
- ``nuclear_ratios``: ``‖E_t‖_* / ‖X‖_*``, ``X`` the convex optimum
  ``argmin ‖X‖_* s.t. A(X) = b`` (cvxpy); the flattest solution's own is within the
  theorem's factor of 1 (``training_trace``), recorded as ``reference_nuclear_ratio``;
- ``errors``: the recovery error ``‖E_t − M*‖_F / ‖M*‖_F``; and ``losses``.

The methods:

- ``gd``: full-batch gradient descent (heavy ball, ``training.train_gd``).
- ``label_noise_sgd``: minibatch SGD with fresh Gaussian noise ``σ`` on the targets of
  the minibatch at every step (``training.train_sgd``: batch size, ``σ`` and step size
  are settings); its implicit regularizer near the zero-loss manifold is
  ``η σ² tr ∇²L``, acting on a time scale ``~ 1/(η² σ²)`` steps: a long horizon.
- ``sam``: full-batch sharpness-aware minimization, ``w ← w − η ∇L(w + ρ g/‖g‖)``,
  ``g = ∇L(w)``, which targets the largest eigenvalue rather than the trace (docs/MATH.md).
- ``one_sam``: 1-SAM, the ascent step taken per example (``training.train_sgd``),
  whose implicit regularizer is the trace.
- ``flatness``: ``FlatnessRegularized`` on ``loss + lam · tr ∇²L`` with the exact
  training-loss trace, ``lam`` decaying, then ``lam = 0`` steps.

Label noise and SAM keep the loss off zero, so every method's last ``polish``
fraction of steps is noise-free full-batch descent (``lam = 0`` for ``flatness``),
and the ratios at its end are zero-loss comparisons.  The two stochastic methods
run ``chains`` independent draws at once, as one batch of weights
``(chains, d_j, d_{j-1})`` over the shared measurements (every op takes a leading
batch dimension): their records hold the means over the chains, and
``ratio_spread`` the spread of the final ratio between them.

Each record also carries what it cost (one thread): the median wall time of a
step of its method (all chains together), and of an exact trace evaluation and
a ``gd`` step timed interleaved (``timing_steps`` of each).
"""

from __future__ import annotations

import math
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch

from ..ops import end_to_end, hessian_trace, mse_loss
from .base import (COMMON_FIELDS, INT, NUMBER, OPTIONAL_INT, STYLE, Experiment, figure_legend, fmt, pyplot, seconds,
                   suptitle)
from .baselines import nuclear_norm_solution
from .recovery import RecoverySettings, _generator, make_problem
from .solution import solve_flattest
from .training import (kernel_norm, minibatch_kernel_norm, standard_init, train_flatness, train_gd, train_sgd)

__all__ = ["TrajectorySettings", "TrajectoryGrid", "TrajectoryTask", "TRAJECTORY", "METHODS", "STOCHASTIC", "log_steps",
           "run_trajectory", "still_moving"]

METHODS = ("gd", "label_noise_sgd", "sam", "one_sam", "flatness")
STOCHASTIC = ("label_noise_sgd", "one_sam")  # minibatch methods: `sgd_steps`, `chains` batched chains


@dataclass(frozen=True)
class TrajectorySettings:
    """One trajectory run: the problem (``sensing`` at ``n``) and each method's budget."""

    n: int = 200
    steps: int = 3000          # gd, sam, flatness: total steps
    sgd_steps: int = 30000     # label_noise_sgd, one_sam: total steps (their regularization is slow: long horizons)
    points: int = 30           # log-spaced evaluations (at least 20 distinct steps)
    polish: float = 0.1        # the last fraction of every method's steps: full batch, no noise, lam = 0
    eta: float = 0.5           # full-batch step size as a fraction of 1 / sharpness bound (training.py)
    sam_rho: float = 0.05      # SAM radius, in the weights' units (‖W_j‖_F ≈ √d at the start)
    lam_start: float = 1e-1
    lam_end: float = 1e-6
    batch_size: int = 10       # minibatch of label_noise_sgd and one_sam
    sgd_eta: float = 1.5       # their step size, as a fraction of 1 / S_B (the minibatch curvature bound; plain SGD)
    # σ of label_noise_sgd (the targets have std ≈ ‖M*‖_F = √d ≈ 4.5), and the per-example ascent radius of one_sam.
    # From a 10,000-step sweep at L = 2 and 4 (σ in 3, 6, 10; ρ in 0.05, 0.1, 0.2, 0.4; sgd_eta 1 and 1.5): the
    # trace falls faster with σ and ρ; ρ = 0.4 diverged at L = 4, ρ = 0.2 did not
    label_noise: float = 8.0
    one_sam_rho: float = 0.15
    chains: int = 2            # independent minibatch draws per stochastic method, batched
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
    """The training callback: the exact trace, ``‖E‖_*``, the error and the loss at the chosen steps (means over the
    chains of batched weights), and what each step and trace evaluation took.

    It is called after every step, so the time between two calls is one training
    step; the medians of those and of the trace evaluations are robust to a
    machine busy with other work.
    """

    def __init__(self, steps: list[int], measurements, targets, backend: str, M=None, offset: int = 0):
        self.at, self.meas, self.targets, self.backend, self.M = set(steps), measurements, targets, backend, M
        self.offset = offset
        self.steps, self.traces, self.losses, self.nuclear, self.errors = [], [], [], [], []
        self.last_traces = None
        self.step_times, self.trace_times = [], []
        self.last = time.perf_counter()

    def __call__(self, t: int, weights) -> None:
        now = time.perf_counter()
        self.step_times.append(now - self.last)
        t += self.offset
        if t in self.at:
            with torch.no_grad():
                trace = hessian_trace(weights, self.meas, backend=self.backend)
                self.trace_times.append(time.perf_counter() - now)
                loss = mse_loss(weights, self.meas, self.targets, backend=self.backend)
                self.steps.append(t)
                self.traces.append(float(trace.mean()))
                self.last_traces = trace.reshape(-1).tolist()
                self.losses.append(float(loss.mean()))
                if self.M is not None:
                    E = end_to_end(weights, backend=self.backend)
                    self.nuclear.append(float(torch.linalg.matrix_norm(E, ord="nuc").mean()))
                    self.errors.append(float(((E - self.M).norm(dim=(-2, -1)) / self.M.norm()).mean()))
        self.last = time.perf_counter()


def _main_steps(method: str, s: TrajectorySettings) -> tuple[int, int]:
    """``(total, main)``: the method's steps, and those before its noise-free / unregularized polish."""
    total = s.sgd_steps if method in STOCHASTIC else s.steps
    return total, total - round(total * s.polish)


def _train(method: str, weights, meas, b, tracker: _Tracker, s: TrajectorySettings, kappa: float, kappa_batch: float,
           generator, backend: str) -> None:
    total, main = _main_steps(method, s)
    if method == "gd":
        train_gd(weights, meas, b, steps=total, eta=s.eta, kappa=kappa, backend=backend, callback=tracker)
        return
    if method == "flatness":
        train_flatness(weights, meas, b, steps=main, lam_start=s.lam_start, lam_end=s.lam_end, polish_steps=total - main,
                       eta=s.eta, kappa=kappa, backend=backend, callback=tracker)
        return
    if method == "sam":
        train_gd(weights, meas, b, steps=main, eta=s.eta, kappa=kappa, backend=backend, callback=tracker, sam=s.sam_rho)
    elif method in STOCHASTIC:
        extra = dict(label_noise=s.label_noise) if method == "label_noise_sgd" else dict(one_sam=s.one_sam_rho)
        train_sgd(weights, meas, b, steps=main, batch_size=s.batch_size, eta=s.sgd_eta, kappa_batch=kappa_batch,
                  generator=generator, backend=backend, callback=tracker, **extra)
    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    # the ascent step and the noise keep the loss off zero: noise-free full-batch steps end them
    tracker.offset = main
    train_gd(weights, meas, b, steps=total - main, eta=s.eta, kappa=kappa, backend=backend, callback=tracker)


def run_trajectory(depth: int, seed: int, settings: TrajectorySettings, recovery: RecoverySettings, backend: str = "auto") -> list[dict]:
    """The five methods along training on one ``(depth, seed)``; one record per method."""
    s = settings
    M, meas, b = make_problem("sensing", s.n, seed, recovery)
    d = recovery.d
    widths = [d] * (depth + 1)
    kappa = kernel_norm(meas)
    kappa_batch = minibatch_kernel_norm(meas, s.batch_size, generator=_generator("trajectory-batches", s.n, seed))
    flattest, report = solve_flattest(meas, b, widths, trace_of=meas,  # on the reference backend: solution.py says why
                                      tol=recovery.solution_tol, max_outer=recovery.solution_max_outer,
                                      max_inner=recovery.solution_max_inner)
    X = nuclear_norm_solution(meas, b, (d, d))
    convex = float(torch.linalg.matrix_norm(X, ord="nuc"))
    with torch.no_grad():
        reference = float(hessian_trace(flattest, meas, backend=backend))
        reference_nuclear = float(torch.linalg.matrix_norm(end_to_end(flattest, backend=backend), ord="nuc"))
    runs = []
    for method in METHODS:
        g = _generator("trajectory", depth, seed)  # the same start for every method
        W = standard_init(widths, generator=g)
        chains = s.chains if method in STOCHASTIC else None
        if chains is not None:
            W = [w.detach().expand(chains, *w.shape).clone().requires_grad_() for w in W]
            g = _generator("trajectory", depth, seed, method)  # each method its own draws
        total, main = _main_steps(method, s)
        tracker = _Tracker(log_steps(total, s.points), meas, b, backend, M=M)
        _train(method, W, meas, b, tracker, s, kappa, kappa_batch, g, backend)
        runs.append((method, chains, main, tracker))
    # the cost of tracking: exact evaluations interleaved with gd steps, so that both see the
    # same load on the machine (the log-spaced evaluations above crowd into the first steps)
    bench = _Tracker(list(range(1, s.timing_steps + 1)), meas, b, backend)
    train_gd(standard_init(widths, generator=_generator("trajectory", depth, seed)), meas, b, steps=s.timing_steps,
             eta=s.eta, kappa=kappa, backend=backend, callback=bench)
    records = []
    for method, chains, main, tracker in runs:
        finals = [t / reference for t in tracker.last_traces]
        records.append(dict(
            experiment="trajectory", method=method, depth=depth, n=s.n, seed=seed, d=d, rank=recovery.rank,
            chains=chains, batch_size=s.batch_size if chains is not None else None, main_steps=main,
            steps=tracker.steps, ratios=[t / reference for t in tracker.traces], losses=tracker.losses,
            nuclear_ratios=[x / convex for x in tracker.nuclear], errors=tracker.errors,
            ratio=tracker.traces[-1] / reference, ratio_spread=max(finals) - min(finals),
            nuclear_ratio=tracker.nuclear[-1] / convex, nuclear_norm=tracker.nuclear[-1], rel_error=tracker.errors[-1],
            train_loss=tracker.losses[-1], reference_trace=reference, convex_nuclear_norm=convex,
            reference_nuclear_ratio=reference_nuclear / convex,
            reference_converged=report["converged"], reference_feasibility=report["feasibility"],
            # wall times (report.is_timing: in timings.json and the summary, not results.json)
            step_seconds=statistics.median(tracker.step_times[1:]),
            trace_seconds=statistics.median(bench.trace_times),
            tracked_step_seconds=statistics.median(bench.step_times[1:]),
            reference_solve_seconds=report["solve_seconds"],
        ))
    return records


def still_moving(record: dict, threshold: float = 0.02) -> float | None:
    """The relative change of the trace ratio over the last doubling of the main phase, ``r(T) / r(T/2) − 1``
    (``T`` = ``main_steps``: before the polish), or ``None`` if the run is too short to tell."""
    main = record["main_steps"]
    before = [(t, r) for t, r in zip(record["steps"], record["ratios"]) if t <= main]
    if len(before) < 4:
        return None
    end = before[-1][1]
    half = min(before, key=lambda p: abs(math.log(p[0] / (main / 2))))[1]
    return end / half - 1


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


def _at_step(record: dict, step: int, key: str = "ratios") -> float:
    """``record[key]`` at the recorded step nearest to ``step`` (log scale)."""
    i = min(range(len(record["steps"])), key=lambda k: abs(math.log(record["steps"][k] / step)))
    return record[key][i]


# the ratio compares flatness only among zero-loss points: off zero loss a smaller trace is not flatter
_ZERO_LOSS_NOTE = ("the ratio compares flatness only at zero loss: early in training, far from zero loss, "
                   "it can sit below 1")
_MOVING = 0.02  # a ratio that changed more than this (relative) over the last doubling of steps is still moving
# why a method can end above the flattest solution (docs/MATH.md; the module docstring)
_WHY = {
    "gd": "gradient descent has no trace regularizer, and stops at the zero-loss point its path meets",
    "sam": "full-batch SAM's implicit regularizer is the largest eigenvalue of the Hessian, not its trace",
    "label_noise_sgd": "its drift along the zero-loss manifold, ~ η σ² ∇ tr per unit of time, is slow, and slower "
                       "with depth (the trace is a polynomial of degree 2(L − 1) in the weights)",
    "one_sam": "its drift toward the least trace, ~ ρ² per step, is slow, and slower with depth",
    "flatness": "lam decays to lam_end and then to 0 before the end, so its last steps only fit the data",
}


class Trajectory(Experiment):
    """Implicit regularizers along training: the exact trace over the flattest solution's, ``‖E‖_*`` over the convex
    optimum's and the recovery error, against steps; and what tracking the trace costs."""

    name = "trajectory"
    figure_name = "trajectory.png"
    Task = TrajectoryTask
    settings = {
        "quick": TrajectoryGrid(depths=(2, 3), run=TrajectorySettings(steps=1000, sgd_steps=1000, points=24),
                                problem=RecoverySettings(steps=600, polish_steps=200)),
        "default": TrajectoryGrid(),
        "full": TrajectoryGrid(seeds=(0, 1), run=TrajectorySettings(steps=10000, sgd_steps=200000, points=40, chains=4),
                               problem=RecoverySettings(steps=2000, polish_steps=500)),
    }
    fields = dict(COMMON_FIELDS, depth=INT, n=INT, d=INT, rank=INT, chains=OPTIONAL_INT, batch_size=OPTIONAL_INT,
                  main_steps=INT, steps=(list,), ratios=(list,), losses=(list,), nuclear_ratios=(list,), errors=(list,),
                  ratio=NUMBER, ratio_spread=NUMBER, nuclear_ratio=NUMBER, reference_trace=NUMBER, rel_error=NUMBER,
                  nuclear_norm=NUMBER, train_loss=NUMBER, convex_nuclear_norm=NUMBER, reference_nuclear_ratio=NUMBER,
                  reference_converged=(bool,), reference_feasibility=NUMBER)

    axes = ("sizes", "ranks", "depths", "ns", "seeds")

    def sweep(self, s: TrajectoryGrid, axes: dict) -> TrajectoryGrid:
        # one problem per run (the table and the figure compare methods on it): one size, rank and n
        for axis in ("sizes", "ranks", "ns"):
            if len(axes.get(axis, ())) > 1:
                raise ValueError(f"{axis}: the trajectory experiment trains on one problem, got {list(axes[axis])}; "
                                 "give one value, or leave trajectory out (--experiments)")
        problem = replace(s.problem, d=axes.get("sizes", (s.problem.d,))[0], rank=axes.get("ranks", (s.problem.rank,))[0])
        if problem.rank > problem.d:
            raise ValueError(f"ranks: a rank-r d × d matrix needs r <= d, got rank {problem.rank} with size {problem.d}")
        return replace(s, problem=problem, run=replace(s.run, n=axes.get("ns", (s.run.n,))[0]),
                       depths=axes.get("depths", s.depths), seeds=axes.get("seeds", s.seeds))

    def tasks(self, s: TrajectoryGrid) -> list[TrajectoryTask]:
        return [TrajectoryTask(self.name, depth, seed) for depth in s.depths for seed in s.seeds]

    def methods(self, task: TrajectoryTask) -> tuple[str, ...]:
        return METHODS

    def run(self, task: TrajectoryTask, s: TrajectoryGrid, backend: str) -> list[dict]:
        return run_trajectory(task.depth, task.seed, s.run, s.problem, backend)

    def cost(self, task: TrajectoryTask, s: TrajectoryGrid) -> float:
        # measured (one thread, d = 20, n = 200): gd, sam and flatness 2-4 ms per step of the three at L = 2-3;
        # the two minibatch methods together ~1.9 ms a step at 4 chains of 10 examples, L = 3-4 (--full's tasks:
        # 480-565 s for 200,000 steps; chains are batched, so a chain adds a quarter of one); the flattest
        # solve and cvxpy 1-3 s
        r = s.run
        scale = (s.problem.d / 20) ** 2
        full_batch = (0.0025 + 0.0015 * (task.depth - 2)) * (r.steps + r.timing_steps)
        chains = 1 + 0.25 * (r.chains - 1)
        stochastic = 1.1e-3 * (1 + 0.14 * (task.depth - 2)) * chains * (r.batch_size / 10) * r.sgd_steps
        return (full_batch + stochastic) * scale + 2.0 * (task.depth - 1)

    def table(self, records: list[dict]) -> dict:
        """``{depth: {method: record}}`` (the first seed)."""
        table = defaultdict(dict)
        for r in records:
            table[r["depth"]].setdefault(r["method"], r)
        return dict(sorted(table.items()))

    def summary_section(self, records: list[dict]) -> list[str]:
        traj = self.table(records)
        any_record = next(iter(next(iter(traj.values())).values()))
        seeds = sorted({r["seed"] for r in records})
        by_method = {r["method"]: r for row in traj.values() for r in row.values()}
        sgd = by_method.get("label_noise_sgd") or by_method.get("one_sam")
        full = next((r for m, r in by_method.items() if m not in STOCHASTIC), any_record)
        lines = [
            "## trajectory: implicit regularizers along training, against the flattest solution and the convex optimum",
            "",
            f"Gaussian sensing (n = {any_record['n']}, rank-{any_record['rank']} {any_record['d']}×{any_record['d']} `M*`), "
            "every method from the same start. `tr ratio = tr ∇²L(W_t) / tr ∇²L(W_flattest)`, both the exact trace of "
            "the training loss, `W_flattest` = `flattest_solution` for the same measurements (least training-loss trace "
            f"at zero loss): at zero loss 1 is the flattest, and {_ZERO_LOSS_NOTE}. `‖E‖_*/‖X‖_*`: the nuclear norm over "
            "the convex optimum's (`W_flattest`'s own is in the last column: the theorem puts it within its factor of 1, "
            "see `training_trace`). "
            f"`gd`, `sam` (full batch) and `flatness`: {full['steps'][-1]} steps; "
            + (f"`label_noise_sgd` and `one_sam` (plain minibatch SGD, batch {sgd['batch_size']}, {sgd['chains']} chains "
               f"batched, means over them): {sgd['steps'][-1]} steps. " if sgd else "")
            + "The last 10% of every method's steps are full-batch, noise-free and unregularized (the ratios at the end "
            "are zero-loss comparisons). *Moving*: the change of the trace ratio over the last doubling of steps before "
            f"that polish (more than {_MOVING:.0%}: still moving). Figure: `trajectory.png`."
            + (f" The table shows seed {seeds[0]} of {len(seeds)}." if len(seeds) > 1 else ""),
            "",
            "| depth | method | steps | tr ratio, end of main phase | moving | tr ratio, final | ‖E‖_*/‖X‖_* | "
            "‖E − M*‖/‖M*‖ | final loss | steps/s | flattest's ‖E‖_*/‖X‖_* |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for depth, row in traj.items():
            for method in METHODS:
                if method not in row:
                    continue
                r = row[method]
                change = still_moving(r)
                moving = "—" if change is None else (f"yes ({change:+.1%})" if abs(change) > _MOVING else f"no ({change:+.1%})")
                rate = f"{1 / r['step_seconds']:.0f}" if "step_seconds" in r else "—"
                spread = f" ± {r['ratio_spread'] / 2:.3f}" if r.get("chains") else ""
                lines.append(f"| {depth} | {method} | {r['steps'][-1]} | {fmt(_at_step(r, r['main_steps']))} | {moving} | "
                             f"{fmt(r['ratio'])}{spread} | {r['nuclear_ratio']:.4f} | {fmt(r['rel_error'])} | "
                             f"{r['train_loss']:.1e} | {rate} | {r['reference_nuclear_ratio']:.4f} |")
        lines += [
            "",
            "Steps per second on one thread (a stochastic method's step advances all its chains at once). "
            "± half the spread of the final ratio over the chains.",
            "",
            "**Where each method ends, and why it stops short of the flattest solution** (final trace ratio per depth):",
            "",
        ]
        for method in METHODS:
            ends = [(depth, row[method]) for depth, row in traj.items() if method in row]
            if not ends:
                continue
            moving = [depth for depth, r in ends if (still_moving(r) or 0.0) < -_MOVING]
            short = [depth for depth, r in ends if r["ratio"] > 1.02]
            text = (f"- `{method}`: " + ", ".join(f"{fmt(r['ratio'])} (L = {depth})" for depth, r in ends)
                    + (f"; still descending at L = {', '.join(map(str, moving))} when its horizon ends"
                       if moving else "; settled"))
            if short:
                text += f". Above 1.02 at L = {', '.join(map(str, short))}: {_WHY[method]}"
            lines.append(text + ".")
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
        """Against steps (log scale), one column per depth: the trace ratio (a line at 1: the flattest solution), the
        nuclear norm over the convex optimum's (a line at the flattest solution's), and the recovery error."""
        plt = pyplot()
        table = self.table(records)
        depths = sorted(table)
        rows = (("ratios", r"$\mathrm{tr}\,\nabla^2 L(W_t) \;/\; \mathrm{tr}\,\nabla^2 L(W_\mathrm{flattest})$"),
                ("nuclear_ratios", r"$\Vert E_t\Vert_* \,/\, \Vert X\Vert_*$ (convex optimum $X$)"),
                ("errors", r"$\Vert E_t - M^*\Vert_F \,/\, \Vert M^*\Vert_F$"))
        fig, axes = plt.subplots(len(rows), len(depths), figsize=(max(4.6 * len(depths), 6.4), 11.5), sharey="row",
                                 squeeze=False)
        for column, depth in enumerate(depths):
            for (key, label), ax in zip(rows, axes[:, column]):
                for method in METHODS:
                    r = table[depth].get(method)
                    if r is not None and r.get(key):
                        ax.plot(r["steps"], r[key], label=method, **dict(STYLE[method], markersize=3))
                if key == "ratios":
                    ax.axhline(1.0, color="gray", linewidth=1.0, linestyle="--")
                    ax.set_title(f"depth L = {depth}")
                elif key == "nuclear_ratios":
                    ref = next(iter(table[depth].values())).get("reference_nuclear_ratio")
                    if ref is not None:
                        ax.axhline(ref, color="gray", linewidth=1.0, linestyle="--")
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.grid(True, which="both", alpha=0.3)
                if column == 0:
                    ax.set_ylabel(label)
            axes[-1][column].set_xlabel("training step")
        any_record = next(iter(next(iter(table.values())).values()))
        suptitle(fig, f"Implicit regularizers along training (Gaussian sensing, n={any_record['n']}): the exact trace over "
                      "the flattest zero-loss solution's (dashed: 1), the nuclear norm over the convex optimum's (dashed: "
                      f"the flattest solution's), the recovery error; {_ZERO_LOSS_NOTE}")
        figure_legend(fig, axes.ravel())  # and the layout
        return fig


TRAJECTORY = Trajectory()
