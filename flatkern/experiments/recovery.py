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
- ``nuclear_norm``: the convex program ``min ‖X‖_* s.t. A(X) = b`` (cvxpy up to
  50 × 50, ADMM with a certified duality gap beyond: ``baselines.nuclear_norm_solution``);
  it has no depth (``depth`` is null in its record).

The four network methods of a problem size, ``n`` and depth run as one task for
every seed of the grid: the seeds' problems, each with its own measurements,
step sizes and random numbers, stacked into one batch (``run_networks``), which
gives each seed's records up to float rounding (``tests/test_experiments.py``),
2.0-2.2x faster for three seeds of 20 × 20 completion, 1.0-1.25x at 100 × 100,
and no reliable gain for 20 × 20 sensing (0.9-1.4x; ``bench/bench_sweeps.py``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch

from ..measurements import Dense, Entries, Isotropic, Measurements
from ..ops import end_to_end, hessian_trace
from ..theory import flatness_lower_bound
from .base import (COMMON_FIELDS, INT, NUMBER, OPTIONAL_NUMBER, STYLE, Experiment, budget_lines, figure_legend, fmt, gap,
                   mean, pyplot, seeds_phrase, suptitle, swept_problems, within_budget)
from .baselines import convex_cost, convex_memory_gb, convex_solver, nuclear_norm_solution
from .training import kernel_norm, retry_diverged, retry_fields, standard_init, train_flatness, train_gd

__all__ = ["RecoverySettings", "RecoveryGrid", "RecoveryTask", "SENSING", "COMPLETION", "make_problem", "run_networks",
           "batches_seeds", "BATCH_MAX_DENSE",
           "run_flattest_solution", "run_nuclear_norm", "NETWORK_METHODS", "METHODS",
           "LITERATURE", "FULL_TASK_SECONDS", "FULL_TASK_MEMORY_GB"]

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


# a network run fits its measurements when its training loss is at most this fraction of the targets' mean square
FIT_TOLERANCE = 1e-6


def _target_mean_square(experiment: str, d: int) -> float:
    """``E[b_i²]`` of ``make_problem``'s targets: ``‖M*‖_F² = d`` for standard Gaussian ``A_i`` (sensing),
    ``‖M*‖_F² / d² = 1 / d`` for uniformly drawn entries (completion)."""
    return float(d) if experiment == "sensing" else 1.0 / d


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


def _per_problem(values: list, repeat: int):
    """``values`` (tensors or numbers, one per seed) for a batch of ``len(values) * repeat`` problems: stacked, each
    ``repeat`` times in order, or the one value itself when there is one (shared by the batch: no copy)."""
    if len(values) == 1:
        return values[0]
    stacked = torch.stack(values) if isinstance(values[0], torch.Tensor) else torch.tensor(values, dtype=torch.float64)
    return stacked.repeat_interleave(repeat, 0)


def _stacked(sets: list[Measurements], repeat: int) -> Measurements:
    """One measurement set per problem of a batch of ``len(sets) * repeat`` problems (``_per_problem``), or the one
    set itself when there is one."""
    if len(sets) == 1:
        return sets[0]
    if isinstance(sets[0], Dense):
        return Dense(_per_problem([m.A for m in sets], repeat))
    if isinstance(sets[0], Entries):
        rows, cols = (_per_problem([getattr(m, f) for m in sets], repeat) for f in ("rows", "cols"))
        return Entries(rows, cols, sets[0].shape)
    raise TypeError(f"_stacked supports Dense and Entries, got {type(sets[0]).__name__}")


# the largest Dense set (n d_L d_0 entries) whose seeds run batched: below it a step costs its Python and dispatch
# (~2.5 ms, about the same for 3 problems or 9); above it the step reads the n matrices of every problem and a
# batch saves nothing (and holds a copy of them per problem: 3 x 400 MB at 100 x 100, n = 5000)
BATCH_MAX_DENSE = 10**6


def batches_seeds(experiment: str, d: int, n: int) -> bool:
    """Whether ``run_networks`` trains a problem's seeds as one batch (``completion``: always; ``sensing``: when its
    ``Dense`` set is small, ``BATCH_MAX_DENSE``)."""
    return experiment == "completion" or n * d * d <= BATCH_MAX_DENSE


def run_networks(experiment: str, depth: int, n: int, seeds, settings: RecoverySettings, backend: str = "auto") -> list[dict]:
    """Train the four network methods on the problems ``(experiment, n, seed)`` of ``seeds`` (an int or a tuple of
    them); one record per seed and method, seed by seed.

    The seeds run as one batch of problems, each with its own measurements, step sizes and random numbers
    (``batches_seeds``); a record is its separate run's up to float rounding (``tests/test_experiments.py``).
    A run that diverges is trained again with its step size halved (``retry_diverged``); its record says so
    (``retry_fields``).
    """
    seeds = (seeds,) if isinstance(seeds, int) else tuple(seeds)
    if len(seeds) > 1 and not batches_seeds(experiment, settings.d, n):
        return [r for seed in seeds for r in run_networks(experiment, depth, n, seed, settings, backend)]
    problems = [make_problem(experiment, n, seed, settings) for seed in seeds]
    S, d, s = len(seeds), settings.d, settings
    widths = [d] * (depth + 1)
    sets, targets = [meas for _, meas, _ in problems], [b for _, _, b in problems]
    kappas = [kernel_norm(meas) for meas in sets]
    # gd, gd_small_init and label_noise share the loop: a batch of three problems per seed
    gens = [_generator("init", experiment, depth, n, seed) for seed in seeds]
    scales = torch.tensor([1.0, s.init_scale ** (1.0 / depth), 1.0], dtype=torch.float64)
    inits = [standard_init(widths, scale=scales, batch=(3,), generator=g) for g in gens]
    after_init = [g.get_state() for g in gens]  # the label noise draws from here, in every run of retry_diverged
    W = [torch.cat([w[j].detach() for w in inits]) for j in range(depth)]
    meas, b, kappa = _stacked(sets, 3), _per_problem(targets, 3), _per_problem(kappas, 3)
    noise = torch.tensor([0.0, 0.0, s.label_noise], dtype=torch.float64).repeat(S)

    def descend(W, eta):
        for g, state in zip(gens, after_init):  # a retry draws what the first run drew
            g.set_state(state)
        train_gd(W, meas, b, steps=s.steps, eta=eta, label_noise=noise, generator=gens, kappa=kappa, backend=backend)
        train_gd(W, meas, b, steps=s.polish_steps, eta=eta, kappa=kappa, backend=backend)

    W, halvings, diverged = retry_diverged(descend, W, meas, b, eta=s.eta, backend=backend)
    records = [[] for _ in seeds]
    for i, (M, meas_i, b_i) in enumerate(problems):
        for k, method in enumerate(("gd", "gd_small_init", "label_noise")):
            Wi = [w[3 * i + k].detach() for w in W]
            E = end_to_end(Wi, backend=backend)
            records[i].append(dict(method=method, **metrics(Wi, E, M, meas_i, b_i, depth, backend),
                                   **retry_fields(halvings[3 * i + k], diverged[3 * i + k], s.eta)))

    inits = [standard_init(widths, generator=_generator("init", experiment, depth, n, seed, "flatness")) for seed in seeds]
    W = [_per_problem([w[j].detach() for w in inits], 1) for j in range(depth)]
    meas, b, kappa = _stacked(sets, 1), _per_problem(targets, 1), _per_problem(kappas, 1)
    if experiment == "sensing" and s.sensing_regularizer == "isotropic":
        reg = Isotropic()
    elif experiment == "completion" or s.sensing_regularizer == "train":
        reg = meas
    else:
        raise ValueError(f"sensing_regularizer must be 'isotropic' or 'train', got {s.sensing_regularizer!r}")

    def regularize(W, eta):
        train_flatness(W, meas, b, steps=s.steps, lam_start=s.lam_start, lam_end=s.lam_end, polish_steps=s.polish_steps,
                       eta=eta, regularizer=reg, kappa=kappa, backend=backend)

    W, halvings, diverged = retry_diverged(regularize, W, meas, b, eta=s.eta, backend=backend)
    for i, (M, meas_i, b_i) in enumerate(problems):
        j = i if S > 1 else ...
        Wf = [w[j].detach() for w in W]
        records[i].append(dict(method="flatness", regularizer="isotropic" if reg is not meas else "train",
                               **metrics(Wf, end_to_end(Wf, backend=backend), M, meas_i, b_i, depth, backend),
                               **retry_fields(halvings[j], diverged[j], s.eta)))
    return [dict(experiment=experiment, depth=depth, n=n, seed=seed, d=d, rank=s.rank, **r)
            for seed, mine in zip(seeds, records) for r in mine]


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
                 solver=convex_solver(tuple(M.shape)), solver_status=status,
                 **metrics(None, X, M, meas, b, None, "torch"))]


# ---------------------------------------------------------------- the experiments (base.py's protocol)


class RecoveryTask(NamedTuple):
    experiment: str     # "sensing" or "completion"
    kind: str           # "nuclear_norm" (no depth), "networks" or "flattest_solution"
    d: int              # M* is d × d
    rank: int
    depth: int | None
    n: int
    seeds: tuple        # networks: every seed of the grid point (trained as one batch, run_networks); else one


@dataclass(frozen=True)
class RecoveryGrid:
    """The sweep (problem sizes, depths, measurement counts, seeds) and the budget of one grid's recovery experiment.

    ``problems``: ``((d, rank, ns), ...)``, each a rank-``rank`` ``d × d`` ``M*`` at every ``n`` of ``ns``; empty
    means the one problem ``(problem.d, problem.rank, ns)``.  ``problem`` holds the training budget (its ``d`` and
    ``rank`` are replaced by each task's).  ``max_task_seconds`` / ``max_task_memory_gb``: a task whose estimated
    cost (``cost``, one idle thread) or memory (``memory_gb``) is above it is left out of the grid, and the
    summary says which and why (``None``: no limit).  A problem whose convex baseline is left out still runs its
    networks and flattest solution (their recovery errors need only ``M*``).
    """

    depths: tuple = (2, 3, 4)
    ns: tuple = (80, 120, 160, 200)      # r (d_0 + d_L) = 80 up to d_0 d_L / 2 = 200
    seeds: tuple = (0,)
    problem: RecoverySettings = field(default_factory=RecoverySettings)
    problems: tuple = ()
    max_task_seconds: float | None = None
    max_task_memory_gb: float | None = None

    def sizes(self) -> tuple:
        """``((d, rank, ns), ...)``: the problems this grid sweeps."""
        return self.problems or ((self.problem.d, self.problem.rank, tuple(self.ns)),)


_QUICK = RecoverySettings(steps=600, polish_steps=200)
_FULL = RecoverySettings(steps=2000, polish_steps=500)
_FULL_NS = (60, 80, 100, 120, 140, 160, 180, 200)


# the literature's size (Arora et al. 2019): 100 × 100, rank 5, n = 2,000 to 5,000 observations
LITERATURE = (100, 5, (2000, 3000, 4000, 5000))
# the largest estimated cost (one idle thread) and memory of a task --full runs: the rest are left out, and the
# summary says so (a task's memory times the processes of a run must fit the machine's)
FULL_TASK_SECONDS = 3600.0
FULL_TASK_MEMORY_GB = 8.0


class Recovery(Experiment):
    """Recovery error of every method against ``n``, and the equality of nuclear norms (``flattest_solution`` = convex)."""

    Task = RecoveryTask
    fields = dict(COMMON_FIELDS, n=INT, d=INT, rank=INT, rel_error=NUMBER, nuclear_norm=NUMBER, train_loss=NUMBER,
                  trace=OPTIONAL_NUMBER, trace_isotropic=OPTIONAL_NUMBER, ratio=OPTIONAL_NUMBER)
    axes = ("sizes", "ranks", "depths", "ns", "seeds")

    def __init__(self, name: str, title: str, settings: dict):
        self.name, self.title, self.settings = name, title, settings
        self.figure_name = f"recovery_{name}.png"

    def all_tasks(self, s: RecoveryGrid) -> list[RecoveryTask]:
        """Every task of the sweep, affordable or not: per ``(d, rank, n)``, the networks at each depth (every seed in
        one task where ``run_networks`` batches them, ``batches_seeds``), then per seed the convex program and the
        flattest solutions."""
        tasks = []
        for d, rank, ns in s.sizes():
            for n in ns:
                # the seeds as one batch where that saves time; else one task each (spread over the workers)
                batches = [tuple(s.seeds)] if batches_seeds(self.name, d, n) else [(seed,) for seed in s.seeds]
                for depth in s.depths:
                    tasks += [RecoveryTask(self.name, "networks", d, rank, depth, n, seeds) for seeds in batches]
                for seed in s.seeds:
                    tasks.append(RecoveryTask(self.name, "nuclear_norm", d, rank, None, n, (seed,)))
                    for depth in s.depths:
                        tasks.append(RecoveryTask(self.name, "flattest_solution", d, rank, depth, n, (seed,)))
        return tasks

    def tasks(self, s: RecoveryGrid) -> list[RecoveryTask]:
        return within_budget(self, s, self.all_tasks(s), s.max_task_seconds, s.max_task_memory_gb)[0]

    def budget_note(self, s: RecoveryGrid) -> list[str]:
        return budget_lines(self, s, self.all_tasks(s), s.max_task_seconds, s.max_task_memory_gb)

    def memory_gb(self, task: RecoveryTask, s: RecoveryGrid) -> float:
        if task.kind == "nuclear_norm":
            return convex_memory_gb(self.name == "sensing", task.d, task.n)
        return 8e-9 * task.n * task.d**2 * (3 if self.name == "sensing" else 0) + 0.3  # Dense A and its copies

    def sweep(self, s: RecoveryGrid, axes: dict) -> RecoveryGrid:
        if any(axis in axes for axis in ("sizes", "ranks", "ns")):
            sizes = swept_problems(s.sizes(), axes)
            s = replace(s, problems=sizes, ns=sizes[0][2])
        return replace(s, depths=axes.get("depths", s.depths), seeds=axes.get("seeds", s.seeds))

    def methods(self, task: RecoveryTask) -> tuple[str, ...]:
        return NETWORK_METHODS * len(task.seeds) if task.kind == "networks" else (task.kind,)

    def run(self, task: RecoveryTask, s: RecoveryGrid, backend: str) -> list[dict]:
        problem = replace(s.problem, d=task.d, rank=task.rank)
        if task.kind == "nuclear_norm":
            return run_nuclear_norm(task.experiment, task.n, task.seeds[0], problem)
        if task.kind == "flattest_solution":
            return run_flattest_solution(task.experiment, task.depth, task.n, task.seeds[0], problem, backend)
        if task.kind == "networks":
            return run_networks(task.experiment, task.depth, task.n, task.seeds, problem, backend)
        raise ValueError(f"task.kind must be 'nuclear_norm', 'networks' or 'flattest_solution', got {task.kind!r}")

    def cost(self, task: RecoveryTask, s: RecoveryGrid) -> float:
        # measured, one thread: at d = 20 (the quick budget, 800 steps) cvxpy 3-4 s, the four networks 1.3-3 s per
        # seed (three seeds batched: 1.2-2.3x one seed), a sensing solve 0.5-1 s, a completion solve (to its
        # iteration cap) 7-10 s.  At 100 × 100: completion, a step of the four networks 2-4.5 ms (the small-d cost
        # is overhead, not flops), a solve's inner iteration 3.2 ms × L; Gaussian sensing, a step of the four
        # networks 37 ms at n = 2000, L = 2 and 158 ms at n = 5000, L = 4 over 30 steps; whole tasks (2500 steps,
        # one seed) 171 s at n = 2000, L = 2 and 429 s at n = 5000, L = 4: the products with the Dense A, ~3e-9 s
        # per n d² whatever the depth, after 5-24 s for the n × n Gram of kernel_norm and the records' traces;
        # a solve's inner iteration 21 ms at n = 2000, L = 2 and 52 ms at n = 5000, L = 4, and a solve runs to its
        # iteration cap (4742 iterations, 117 s at n = 2000, L = 2)
        p, d, n = s.problem, task.d, task.n
        dense = self.name == "sensing"
        if task.kind == "nuclear_norm":
            return convex_cost(dense, d, n)
        steps = p.steps + p.polish_steps
        chain = 1 + (task.depth - 2) / 4
        if task.kind == "networks":
            # a step's Python and dispatch (the first term) is shared by a batch of seeds; its products are not
            # (bench/bench_sweeps.py: three seeds batched 2.0-2.2x faster for completion at 20 × 20, 1.0-1.25x at
            # 100 × 100, 0.9-1.4x for sensing, whose batch reads each seed's own Dense set)
            seeds = len(task.seeds)
            overhead = 2.5e-3 * (1 + task.depth / 4)
            work = overhead * (max(1.0, d / 60) - 1) + (3e-9 * n * d * d if dense else 0.0)
            fixed = 8e-11 * n * n * d * d + 2e-10 * n * d**3 * task.depth if dense else 0.0
            shared = 1 + 0.4 * (seeds - 1) if batches_seeds(self.name, d, n) and not dense else seeds
            return (overhead * shared + work * seeds) * steps + fixed * seeds
        iterations = p.solution_max_outer * p.solution_max_inner
        if dense:
            return (6.7e-5 * task.depth + 0.9e-9 * n * d * d * chain) * iterations
        return 5.8e-4 * task.depth * max(1.0, d / 20) * iterations

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
        """The error table and the equality, one block per problem size (``### d × d, rank r`` when there are several)."""
        groups = _by_size(records)
        lines = self._size_section(next(iter(groups.values())))
        if len(groups) == 1:
            return lines
        lines = lines[:4]  # the heading and the paragraph that says what the methods are, once
        for (d, rank), mine in groups.items():
            lines += [f"### {d} × {d}, rank {rank}", ""] + self._size_section(mine)[4:]
        return lines

    def _size_section(self, records: list[dict]) -> list[str]:
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
            "(cvxpy + Clarabel; beyond 50 × 50, ADMM with its duality gap certified to 1e-7); it has no depth. `flattest_solution` is the factorization of least `Isotropic` "
            "trace that fits the measurements exactly (`flatkern.flattest_solution`). `flatness` trains with "
            + regularizer,
            "",
            "| depth | n | " + " | ".join(methods) + " |",
            "|---|---|" + "---|" * len(methods),
        ]
        for (depth, n), row in table.items():
            lines.append(f"| {depth} | {n} | " + " | ".join(fmt(row.get(m, math.nan)) for m in methods) + " |")
        lines.append("")
        lines += self._unfit_lines(records)
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

    def _unfit_lines(self, records: list[dict]) -> list[str]:
        """The network runs that end above zero loss (``FIT_TOLERANCE``), by method and depth: their error is a run's
        still fitting the measurements, not an interpolator's."""
        runs = [r for r in records if r["method"] in NETWORK_METHODS and "train_loss" in r and isinstance(r.get("d"), int)]
        unfit = [r for r in runs if not r["train_loss"] <= FIT_TOLERANCE * _target_mean_square(self.name, r["d"])]
        if not unfit:
            return []
        groups = defaultdict(list)
        for r in unfit:
            groups[(NETWORK_METHODS.index(r["method"]), r["depth"])].append(r)
        parts = [f"`{NETWORK_METHODS[m]}` L={depth}: {len(rs)} (n = {', '.join(str(n) for n in sorted({r['n'] for r in rs}))})"
                 for (m, depth), rs in sorted(groups.items())]
        return [f"**{len(unfit)} of {len(runs)} network runs end above zero loss** (training loss above "
                f"{FIT_TOLERANCE:g} of the targets' mean square; their error is that of a run still fitting the "
                "measurements at the end of its steps, not an interpolator's): " + "; ".join(parts) + ".", ""]

    def figure(self, records: list[dict]):
        """Relative recovery error against ``n``: one row of panels per problem size, one panel per depth, one line per
        method (log scale), one legend."""
        plt = pyplot()
        groups = _by_size(records)
        depths = sorted({r["depth"] for r in records if r["depth"] is not None})
        fig, axes = plt.subplots(len(groups), len(depths), figsize=(max(4.6 * len(depths), 6.4), 0.9 + 3.9 * len(groups)),
                                 sharey="row", squeeze=False)
        for row_axes, ((d, rank), mine) in zip(axes, groups.items()):
            table = self.table(mine)
            shown = []
            for ax, depth in zip(row_axes, depths):
                ns = sorted(n for L, n in table if L == depth)
                for method in METHODS:
                    ys = [table[(depth, n)].get(method, math.nan) for n in ns]
                    if all(math.isnan(y) for y in ys):
                        continue
                    shown += [y for y in ys if y > 0]
                    ax.plot(ns, ys, label=method, **STYLE[method])
                ax.set_yscale("log")
                ax.set_title(f"depth L = {depth}" + (f", {d}×{d} rank {rank}" if len(groups) > 1 else ""))
                ax.set_xlabel("number of measurements n")
                ax.grid(True, which="both", alpha=0.3)
            if shown:
                # down to the smallest error in the data (exact recoveries reach 1e-8 and below), a decade of margin
                low, high = min(shown), max(shown)
                row_axes[0].set_ylim(10 ** math.floor(math.log10(low)), 10 ** math.ceil(math.log10(max(high, 1.0)) + 0.01))
            row_axes[0].set_ylabel(r"relative error $\Vert E - M^*\Vert_F \,/\, \Vert M^*\Vert_F$")
        seeds = len({r["seed"] for r in records})
        what = {"sensing": "Gaussian sensing", "completion": "matrix completion"}.get(self.name, self.name)
        sizes = " and ".join(f"rank-{r} {d}×{d}" for d, r in groups)
        suptitle(fig, f"{what}: recovering a {sizes} matrix M* from n measurements "
                      f"({f'mean over {seeds} seeds; ' if seeds > 1 else ''}lower is better)")
        figure_legend(fig, axes.ravel())  # and the layout
        return fig


def _by_size(records: list[dict]) -> dict:
    """``{(d, rank): records}``, sizes in increasing order (records without a size: ``("?", "?")``)."""
    groups = defaultdict(list)
    for r in records:
        groups[(r.get("d", "?"), r.get("rank", "?"))].append(r)
    return dict(sorted(groups.items(), key=lambda item: str(item[0]) if "?" in item[0] else f"{item[0][0]:09d}{item[0][1]:09d}"))


# --full: the 20 × 20 sweep, and the literature's 100 × 100 rank-5 problems at n = 2,000-5,000, three seeds each, as
# far as each task's estimated cost and memory stay within FULL_TASK_SECONDS and FULL_TASK_MEMORY_GB (the summary
# says what is left out)
_FULL_PROBLEMS = ((20, 2, _FULL_NS), LITERATURE)
SENSING = Recovery("sensing", "Gaussian sensing", {
    "quick": RecoveryGrid(depths=(2, 3), ns=(200,), problem=_QUICK),
    "default": RecoveryGrid(),
    "full": RecoveryGrid(seeds=(0, 1, 2), problem=_FULL, problems=_FULL_PROBLEMS, max_task_seconds=FULL_TASK_SECONDS,
                         max_task_memory_gb=FULL_TASK_MEMORY_GB),
})
COMPLETION = Recovery("completion", "matrix completion (uniform entries)", {
    "quick": RecoveryGrid(depths=(2, 3), ns=(200,), problem=_QUICK),
    "default": RecoveryGrid(ns=(120, 200)),
    "full": RecoveryGrid(seeds=(0, 1, 2), problem=_FULL, problems=_FULL_PROBLEMS, max_task_seconds=FULL_TASK_SECONDS,
                         max_task_memory_gb=FULL_TASK_MEMORY_GB),
})
