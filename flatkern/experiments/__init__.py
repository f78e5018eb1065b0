"""The reproduction behind ``flatkern reproduce``: the theorem's predictions, measured.

- ``flattest``: training finds the flattest factorization of a matrix
  (``trace / flatness_lower_bound -> 1``), which the balanced / weight-decay
  factorizations are not for depth >= 3.
- ``sensing`` / ``completion``: flatness regularization recovers a low-rank
  matrix from few measurements, like nuclear-norm minimization, where plain
  gradient descent does not.

``run_grid(GRIDS[name])`` returns the records; ``write_results`` writes
``results.json``, ``summary.md`` and the figures.
"""

from .grid import GRIDS, Grid, run_grid, run_task, tasks_of
from .report import FIGURES, summary_markdown, write_results

__all__ = ["GRIDS", "Grid", "run_grid", "run_task", "tasks_of", "FIGURES", "summary_markdown", "write_results"]
