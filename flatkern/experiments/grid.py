"""The grids of ``flatkern reproduce`` and their tasks (``runner.py`` runs them).

A grid is a list of ``(experiment, settings)`` parts; each part's experiment
(``base.Experiment``) turns its settings into tasks, and each task is one
problem that returns a list of records (``results.json``).  Every task draws its
random numbers from generators seeded by its own key, and runs on one thread,
so a record does not depend on which process ran it: ``torchrun
--nproc_per_node=K`` gives the same ``results.json`` as one process.

``GRIDS`` holds ``quick``, ``default`` and ``full``, each from the settings the
registered experiments give for that name (``experiments.REGISTRY``);
``custom_grid`` is one of them with the command line's experiments and axes
(``flatkern reproduce --sizes ... --experiments ...`` or ``--grid-file``).
"""

from __future__ import annotations

from dataclasses import dataclass

from . import experiments
from .base import Experiment

__all__ = ["Grid", "GRIDS", "GRID_NAMES", "grid_of", "custom_grid", "tasks_of", "run_task", "task_cost"]

GRID_NAMES = ("quick", "default", "full")


@dataclass(frozen=True)
class Grid:
    """What one ``flatkern reproduce`` run covers: ``parts`` = ``((experiment, its settings), ...)``, in results order.

    Its ``repr`` (every setting of every part) is what the journal's fingerprint digests.
    """

    name: str
    parts: tuple

    def __post_init__(self):
        if not all(isinstance(part, tuple) and len(part) == 2 and isinstance(part[0], Experiment) for part in self.parts):
            raise ValueError(f"Grid.parts must be (Experiment, settings) pairs, got {self.parts!r}")
        names = [e.name for e, _ in self.parts]
        if len(set(names)) != len(names):
            raise ValueError(f"Grid.parts must name distinct experiments, got {names}")

    def part(self, name: str) -> tuple:
        """``(experiment, settings)`` of the experiment called ``name``."""
        for experiment, settings in self.parts:
            if experiment.name == name:
                return experiment, settings
        raise KeyError(f"grid '{self.name}' has no experiment {name!r} (it has {[e.name for e, _ in self.parts]})")


def grid_of(name: str, **overrides) -> Grid:
    """The grid ``name`` from every registered experiment's ``settings[name]``; ``overrides``: ``experiment=settings``
    replaces one part's settings, ``experiment=None`` leaves it out."""
    unknown = set(overrides) - set(experiments())
    if unknown:
        raise ValueError(f"no registered experiment {sorted(unknown)} (registered: {list(experiments())})")
    parts = []
    for experiment in experiments().values():
        settings = overrides.get(experiment.name, experiment.settings.get(name))
        if settings is not None:
            parts.append((experiment, settings))
    return Grid(name, tuple(parts))


GRIDS = {name: grid_of(name) for name in GRID_NAMES}


def custom_grid(base: Grid, *, experiments_: list[str] | None = None, axes: dict | None = None,
                per_experiment: dict | None = None, name: str | None = None) -> Grid:
    """``base`` (a preset) with only ``experiments_`` (names, in registry order; ``None``: all of ``base``'s), each
    part's settings swept to ``axes`` (``{axis: tuple of ints}``, ``base.AXES``) updated by ``per_experiment[name]``.

    ``ValueError`` naming the experiment and the axis when a part cannot take a value (``Experiment.sweep``), or
    naming an experiment ``base`` does not have.
    """
    axes, per_experiment = dict(axes or {}), dict(per_experiment or {})
    names = [e.name for e, _ in base.parts]
    wanted = names if experiments_ is None else list(experiments_)
    missing = [n for n in wanted if n not in names] + [n for n in per_experiment if n not in wanted]
    if missing:
        raise ValueError(f"experiments: grid '{base.name}' runs {names}; {missing} not among the experiments chosen "
                         f"({wanted})")
    parts = []
    for experiment, settings in base.parts:
        if experiment.name not in wanted:
            continue
        mine = dict(axes, **per_experiment.get(experiment.name, {}))
        if mine:
            try:
                settings = experiment.sweep(settings, mine)
            except ValueError as exc:
                raise ValueError(f"experiment {experiment.name}: {exc}") from None
        if not experiment.tasks(settings):
            raise ValueError(f"experiment {experiment.name}: these axes leave it no task "
                             f"(all left out as unaffordable?); leave it out with --experiments")
        parts.append((experiment, settings))
    return Grid(name or base.name, tuple(parts))


def tasks_of(grid: Grid) -> list:
    """Every task of ``grid`` (typed keys, ``task.experiment`` first), in results order."""
    return [task for experiment, settings in grid.parts for task in experiment.tasks(settings)]


def run_task(task, grid: Grid, backend: str = "auto") -> list[dict]:
    """The records of one task."""
    experiment, settings = grid.part(task.experiment)
    return experiment.run(task, settings, backend)


def task_cost(task, grid: Grid) -> float:
    """The task's expected seconds on one idle thread: the longest go first, and progress advances by it."""
    experiment, settings = grid.part(task.experiment)
    return experiment.cost(task, settings)
