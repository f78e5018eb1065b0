"""The reproduction behind ``flatkern reproduce``: the theorem's predictions, measured.

- ``flattest``: ``flattest_solution`` reaches the theorem's minimum for a fixed
  matrix (``trace / flatness_lower_bound = 1``), training comes close, and the
  balanced / weight-decay factorizations are not flattest for depth >= 3.
- ``sensing`` / ``completion``: the flattest zero-loss solution has the convex
  program's nuclear norm at every ``n`` (an equality), and flatness
  regularization recovers a low-rank matrix from few measurements where plain
  gradient descent does not.
- ``trajectory``: the exact trace along training (gd, label noise, SAM,
  flatness) over the flattest solution's, and what tracking it costs.

``run_grid(GRIDS[name], out=...)`` runs the tasks (journaled in ``out`` as they
finish, resumable) and returns the records; ``write_results`` writes
``results.json``, ``summary.md``, ``timings.json`` and the figures, each atomically.
"""

from .grid import GRIDS, Grid, run_task, tasks_of
from .journal import JournalError, check_out
from .report import FIGURES, summary_markdown, write_results
from .runner import Run, distributed_rank, run_grid

__all__ = ["GRIDS", "Grid", "run_grid", "run_task", "tasks_of", "Run", "distributed_rank", "JournalError", "check_out",
           "FIGURES", "summary_markdown", "write_results"]
