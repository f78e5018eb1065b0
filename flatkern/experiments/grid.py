"""The grids of ``flatkern reproduce`` and their tasks (``runner.py`` runs them).

A grid is a list of tasks; each task is one problem and returns a list of
records (``results.json``).  Every task draws its random numbers from
generators seeded by its own key, and runs on one thread, so a record does not
depend on which process ran it: ``torchrun --nproc_per_node=K`` gives the same
``results.json`` as one process.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .flattest import FlattestSettings, run_flattest
from .recovery import RecoverySettings, run_flattest_solution, run_networks, run_nuclear_norm
from .trajectory import TrajectorySettings, run_trajectory

__all__ = ["Grid", "GRIDS", "tasks_of", "run_task", "task_cost"]


@dataclass(frozen=True)
class Grid:
    """What one ``flatkern reproduce`` run covers."""

    name: str
    flattest_matrices: tuple = (((8, 8), 2), ((10, 6), 3))   # (shape (d_L, d_0), rank)
    flattest_depths: tuple = (2, 3, 4, 5)
    flattest_seeds: tuple = (0,)
    experiments: tuple = ("sensing", "completion", "trajectory")
    depths: tuple = (2, 3, 4)
    ns: tuple = (80, 120, 160, 200)      # r (d_0 + d_L) = 80 up to d_0 d_L / 2 = 200
    seeds: tuple = (0, 1)
    completion_ns: tuple | None = None     # None: the same as ns
    completion_seeds: tuple | None = None  # None: the same as seeds
    recovery: RecoverySettings = field(default_factory=RecoverySettings)
    flattest: FlattestSettings = field(default_factory=lambda: FlattestSettings(steps=1500, polish_steps=200))
    trajectory_depths: tuple = (2, 3, 4)
    trajectory_seeds: tuple = (0,)
    trajectory: TrajectorySettings = field(default_factory=TrajectorySettings)


GRIDS = {
    "quick": Grid(
        "quick",
        flattest_matrices=(((8, 8), 2),),
        flattest_depths=(2, 3, 4),
        depths=(2, 3),
        ns=(200,),
        seeds=(0,),
        recovery=RecoverySettings(steps=600, polish_steps=200),
        flattest=FlattestSettings(steps=600, polish_steps=100),
        trajectory_depths=(2, 3),
        trajectory=TrajectorySettings(steps=1000, points=24),
    ),
    # one seed per problem (the second is in --full), so that flattest_solution and the
    # trajectories fit: measured wall time in docs/figures/summary.md
    "default": Grid("default", seeds=(0,), completion_ns=(120, 200)),
    # before flattest_solution and trajectory: 696 records, 13 min wall on 2 shared cores; now
    # about twice that (not re-measured): spread it with torchrun
    "full": Grid(
        "full",
        flattest_matrices=(((8, 8), 2), ((10, 6), 3), ((12, 12), 4)),
        flattest_seeds=(0, 1),
        ns=(60, 80, 100, 120, 140, 160, 180, 200),
        seeds=(0, 1, 2),
        recovery=RecoverySettings(steps=2000, polish_steps=500),
        flattest=FlattestSettings(steps=3000, polish_steps=300),
        trajectory_seeds=(0, 1),
        trajectory=TrajectorySettings(steps=10000, points=40),
    ),
}


def tasks_of(grid: Grid) -> list[tuple]:
    """Every task of ``grid``, as a hashable tuple, in a fixed order."""
    tasks = []
    for shape, rank in grid.flattest_matrices:
        for depth in grid.flattest_depths:
            for seed in grid.flattest_seeds:
                tasks.append(("flattest", shape, rank, depth, seed))
    for experiment in grid.experiments:
        if experiment == "trajectory":
            tasks += [("trajectory", depth, seed) for depth in grid.trajectory_depths for seed in grid.trajectory_seeds]
            continue
        completion = experiment == "completion"
        ns = grid.completion_ns if completion and grid.completion_ns is not None else grid.ns
        seeds = grid.completion_seeds if completion and grid.completion_seeds is not None else grid.seeds
        for n in ns:
            for seed in seeds:
                tasks.append((experiment, "nuclear_norm", n, seed))
                for depth in grid.depths:
                    tasks.append((experiment, "networks", depth, n, seed))
                    tasks.append((experiment, "flattest_solution", depth, n, seed))
    return tasks


def run_task(task: tuple, grid: Grid, backend: str = "auto") -> list[dict]:
    """The records of one task."""
    if task[0] == "flattest":
        _, shape, rank, depth, seed = task
        return run_flattest(shape, rank, depth, seed, grid.flattest, backend)
    if task[0] == "trajectory":
        _, depth, seed = task
        return run_trajectory(depth, seed, grid.trajectory, grid.recovery, backend)
    experiment, kind = task[0], task[1]
    if kind == "nuclear_norm":
        _, _, n, seed = task
        return run_nuclear_norm(experiment, n, seed, grid.recovery)
    _, _, depth, n, seed = task
    if kind == "flattest_solution":
        return run_flattest_solution(experiment, depth, n, seed, grid.recovery, backend)
    return run_networks(experiment, depth, n, seed, grid.recovery, backend)


def task_cost(task: tuple) -> float:
    """Rough relative cost, to hand out the longest tasks first."""
    if task[0] == "flattest":
        return 3.0 * (1 + max(1, task[3] - 2))
    if task[0] == "trajectory":
        return 25.0 + 5 * task[1]
    if task[1] == "nuclear_norm":
        return 1.0
    if task[1] == "flattest_solution":
        return 3.0 * task[2]
    return 3.0 + task[2]
