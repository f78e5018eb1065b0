"""The grids of ``flatkern reproduce`` and the loop that runs them, on one process or spread over ranks.

A grid is a list of tasks; each task is one problem and returns a list of
records (``results.json``).  Every task draws its random numbers from
generators seeded by its own key, and runs on one thread, so a record does not
depend on which process ran it: ``torchrun --nproc_per_node=K`` gives the same
``results.json`` as one process.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .flattest import FlattestSettings, run_flattest
from .recovery import RecoverySettings, run_networks, run_nuclear_norm

__all__ = ["Grid", "GRIDS", "tasks_of", "run_task", "run_grid"]


@dataclass(frozen=True)
class Grid:
    """What one ``flatkern reproduce`` run covers."""

    name: str
    flattest_matrices: tuple = (((8, 8), 2), ((10, 6), 3))   # (shape (d_L, d_0), rank)
    flattest_depths: tuple = (2, 3, 4, 5)
    flattest_seeds: tuple = (0,)
    experiments: tuple = ("sensing", "completion")
    depths: tuple = (2, 3, 4)
    ns: tuple = (80, 120, 160, 200)      # r (d_0 + d_L) = 80 up to d_0 d_L / 2 = 200
    seeds: tuple = (0, 1)
    completion_ns: tuple | None = None     # None: the same as ns
    completion_seeds: tuple | None = None  # None: the same as seeds
    recovery: RecoverySettings = field(default_factory=RecoverySettings)
    flattest: FlattestSettings = field(default_factory=lambda: FlattestSettings(steps=1500, polish_steps=200))


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
    ),
    # about 220 CPU-seconds: 3 minutes wall on the 2 shared cores it was measured on
    "default": Grid("default", completion_ns=(120, 200), completion_seeds=(0,)),
    # measured end to end: 696 records, 13 min wall / 24 CPU-minutes on 2 shared cores; spread it with torchrun
    "full": Grid(
        "full",
        flattest_matrices=(((8, 8), 2), ((10, 6), 3), ((12, 12), 4)),
        flattest_seeds=(0, 1),
        ns=(60, 80, 100, 120, 140, 160, 180, 200),
        seeds=(0, 1, 2),
        recovery=RecoverySettings(steps=2000, polish_steps=500),
        flattest=FlattestSettings(steps=3000, polish_steps=300),
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
        completion = experiment == "completion"
        ns = grid.completion_ns if completion and grid.completion_ns is not None else grid.ns
        seeds = grid.completion_seeds if completion and grid.completion_seeds is not None else grid.seeds
        for n in ns:
            for seed in seeds:
                tasks.append((experiment, "nuclear_norm", n, seed))
                for depth in grid.depths:
                    tasks.append((experiment, "networks", depth, n, seed))
    return tasks


def run_task(task: tuple, grid: Grid, backend: str = "auto") -> list[dict]:
    """The records of one task."""
    if task[0] == "flattest":
        _, shape, rank, depth, seed = task
        return run_flattest(shape, rank, depth, seed, grid.flattest, backend)
    experiment, kind = task[0], task[1]
    if kind == "nuclear_norm":
        _, _, n, seed = task
        return run_nuclear_norm(experiment, n, seed, grid.recovery)
    _, _, depth, n, seed = task
    return run_networks(experiment, depth, n, seed, grid.recovery, backend)


def _distributed() -> tuple[int, int]:
    """``(rank, world_size)``, initializing ``torch.distributed`` when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _run_indexed(item: tuple[int, tuple, Grid, str]) -> tuple[int, list[dict]]:
    index, task, grid, backend = item
    torch.set_num_threads(1)
    return index, run_task(task, grid, backend)


def _cost(task: tuple) -> float:
    """Rough relative cost, to hand out the longest tasks first."""
    if task[0] == "flattest":
        return 1.5 * (1 + max(1, task[3] - 2))
    if task[1] == "nuclear_norm":
        return 3.0
    return 3.0 + task[2]


def run_grid(grid: Grid, *, backend: str = "auto", workers: int | None = None, progress: bool = True) -> tuple[list[dict] | None, float]:
    """Run ``grid``, on ``workers`` local processes, or spread over torchrun's ranks.

    Under torchrun each rank runs every ``world``-th task (one process per rank)
    and rank 0 gathers; otherwise ``workers`` processes (default: one per CPU)
    share the tasks.  Returns ``(records, seconds)`` on rank 0, records in task
    order, and ``(None, seconds)`` on the other ranks.
    """
    from tqdm import tqdm

    rank, world = _distributed()
    if workers is None:
        workers = 1 if world > 1 else (os.cpu_count() or 1)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    threads = torch.get_num_threads()
    # one thread per task: the problems are far too small to gain from more, and a fixed
    # thread count keeps every floating-point reduction, hence every record, identical
    torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        tasks = tasks_of(grid)
        mine = list(enumerate(tasks))[rank::world]
        mine.sort(key=lambda item: -_cost(item[1]))
        items = [(index, task, grid, backend) for index, task in mine]
        label = f"flatkern reproduce ({grid.name}" + (f", rank 0 of {world})" if world > 1 else ")")
        bar = tqdm(total=len(items), desc=label, unit="task", disable=not progress or rank != 0)
        done = []
        if workers == 1 or len(items) <= 1:
            for item in items:
                done.append(_run_indexed(item))
                bar.update()
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            # spawn, not fork: a forked child of a process that already ran OpenMP code can hang
            with ProcessPoolExecutor(min(workers, len(items)), mp_context=multiprocessing.get_context("spawn")) as pool:
                for future in as_completed([pool.submit(_run_indexed, item) for item in items]):
                    done.append(future.result())
                    bar.update()
        bar.close()
        if world > 1:
            gathered = [None] * world if rank == 0 else None
            dist.gather_object(done, gathered, dst=0)
            if rank != 0:
                return None, time.perf_counter() - start
            done = [item for part in gathered for item in part]
        records = [r for _, recs in sorted(done, key=lambda item: item[0]) for r in recs]
        return records, time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
