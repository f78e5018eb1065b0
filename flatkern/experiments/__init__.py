"""The reproduction behind ``flatkern reproduce``: the theorem's predictions, measured.

- ``flattest``: training finds the flattest factorization of a matrix
  (``trace / flatness_lower_bound -> 1``), which the balanced / weight-decay
  factorizations are not for depth >= 3.
- ``sensing`` / ``completion``: flatness regularization recovers a low-rank
  matrix from few measurements, like nuclear-norm minimization, where plain
  gradient descent does not.

``run_grid(GRIDS[name], out=...)`` runs the tasks (journaled in ``out`` as they
finish, resumable) and returns the records; ``write_results`` writes
``results.json``, ``summary.md`` and the figures, each atomically.
"""

from .grid import GRIDS, Grid, run_task, tasks_of
from .journal import JournalError, check_out
from .report import FIGURES, summary_markdown, write_results
from .runner import Run, distributed_rank, run_grid

__all__ = ["GRIDS", "Grid", "run_grid", "run_task", "tasks_of", "Run", "distributed_rank", "JournalError", "check_out",
           "FIGURES", "summary_markdown", "write_results"]
