"""The reproduction behind ``flatkern reproduce``: the theorem's predictions, measured.

- ``flattest``: ``flattest_solution`` reaches the theorem's minimum for a fixed
  matrix (``trace / flatness_lower_bound = 1``), training comes close, and the
  balanced / weight-decay factorizations are not flattest for depth >= 3.
- ``sensing`` / ``completion``: the flattest zero-loss solution has the convex
  program's nuclear norm at every ``n`` (an equality), and flatness
  regularization recovers a low-rank matrix from few measurements where plain
  gradient descent does not.
- ``trajectory``: implicit regularizers as the theory defines them (gd,
  minibatch label-noise SGD, full-batch SAM, 1-SAM, flatness regularization)
  along training: the exact trace over the flattest solution's, the nuclear
  norm over the convex optimum's and the recovery error, against steps; and
  what tracking the trace costs.
- ``digits``: ReLU MLPs on scikit-learn's digits (sgd, label noise, SAM,
  ``FlatnessRegularizedMLP``): test accuracy against the exact trace of the
  training-loss Hessian, along training and at the end, and the cost per step.
- ``training_trace``: the paper's theorem on the training loss: the flattest
  solution under the training-loss trace against the convex optimum, with the
  estimated RIP constant and the theorem's factor.

Each experiment is one module following ``base.Experiment`` (settings per grid,
typed task keys, run, cost, table, figure, summary section) and one line in
``REGISTRY`` below; the grids (``grid.py``), the runner, the journal and the
report are generic.  To add an experiment: write ``<name>.py`` with an
``Experiment`` subclass instance, add its line here, and run
``python -m pytest tests/test_experiments.py``.

``custom_grid(GRIDS[name], experiments_=..., axes=...)`` is a preset with the
command line's experiments and axes (``Experiment.sweep``; docs/ARCHITECTURE.md).
``run_grid(GRIDS[name], out=...)`` runs the tasks (journaled in ``out`` as they
finish, resumable) and returns the records; ``write_results`` writes
``results.json``, ``summary.md``, ``timings.json`` and the figures, each atomically.

Nothing here imports torch until an experiment or the runner is used: the
command line checks its options and ``--out`` (``journal.check_out``) first.
"""

from __future__ import annotations

import importlib

# The registry: one line per experiment, "module:instance", in the order of results.json.
REGISTRY = (
    "flattest:FLATTEST",
    "recovery:SENSING",
    "recovery:COMPLETION",
    "trajectory:TRAJECTORY",
    "digits:DIGITS",
    "training_trace:TRAINING_TRACE",
)

# what each public name is imported from, when first used (PEP 562)
_LAZY = {
    "GRIDS": "grid", "Grid": "grid", "custom_grid": "grid", "run_task": "grid", "tasks_of": "grid", "task_cost": "grid",
    "FIGURES": "report", "summary_markdown": "report", "write_results": "report",
    "Run": "runner", "distributed_rank": "runner", "run_grid": "runner",
    "JournalError": "journal", "check_out": "journal", "OutLock": "journal",
    "Experiment": "base",
}

__all__ = ["REGISTRY", "experiments", *_LAZY]

_experiments: dict | None = None


def experiments() -> dict:
    """``{name: Experiment}`` of every registry line, in registry order (imports the experiment modules)."""
    global _experiments
    if _experiments is None:
        found = {}
        for line in REGISTRY:
            module, attribute = line.split(":")
            experiment = getattr(importlib.import_module(f"{__name__}.{module}"), attribute)
            found[experiment.name] = experiment
        _experiments = found
    return _experiments


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
