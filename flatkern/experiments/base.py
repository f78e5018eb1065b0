"""The protocol every experiment of ``flatkern reproduce`` follows, and what their reports share.

An experiment is one module with one ``Experiment`` subclass instance, and one
line in the registry (``flatkern/experiments/__init__.py``).  The grid, the
runner, the journal and the report read only this protocol:

- ``name``: the registry key, the ``experiment`` field of every record.
- ``settings``: ``{grid name: settings}``; a grid (``"quick"``, ``"default"``,
  ``"full"``) runs the experiment with those settings (a frozen dataclass: what
  ``tasks`` and ``run`` read, the sweep and the budget).  An experiment missing
  from a grid's name is not part of that grid.
- ``Task``: a ``NamedTuple`` whose first field is ``experiment`` (the name);
  ``tasks(settings)`` lists them in the order their records appear in
  ``results.json``.  The journal stores a task as its JSON list.
- ``methods(task)``: the ``method`` of each record ``run`` returns, in order,
  and ``fields``: ``{field: allowed types}`` every record has.  Together they
  let the journal refuse a record that this grid cannot have produced.
- ``run(task, settings, backend)``: the records of one task.  It draws its
  random numbers from generators seeded by the task's key and runs on the
  calling thread, so a record does not depend on the process that ran it.
  Fields whose name ends in ``_seconds`` are wall times: they go to
  ``timings.json`` and the summary, never to ``results.json``.
- ``cost(task, settings)``: the task's expected wall time in seconds on one
  idle thread (a rough model): the longest go first, and the progress bar
  advances by cost, so its estimate of the time left is cost-weighted.
- ``table(records)``, ``summary_section(records)`` (markdown lines) and
  ``figure(records)`` (a matplotlib figure, or ``None``; saved as
  ``figure_name``): the report, from this experiment's records only.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping
from typing import Any, NamedTuple

__all__ = ["Experiment", "NUMBER", "INT", "OPTIONAL_NUMBER", "OPTIONAL_INT", "mean", "fmt", "gap", "seconds",
           "seeds_phrase", "pyplot", "fit", "suptitle", "figure_legend", "STYLE", "COMMON_FIELDS"]

NUMBER = (float, int)
INT = (int,)
OPTIONAL_NUMBER = (float, int, type(None))
OPTIONAL_INT = (int, type(None))

# the key of every record: which experiment, method and problem it belongs to
COMMON_FIELDS = {"experiment": (str,), "method": (str,), "depth": OPTIONAL_INT, "n": OPTIONAL_INT, "seed": INT}


class Experiment:
    """One experiment (see the module docstring for the protocol); subclasses set the attributes and the methods."""

    name: str = ""
    figure_name: str | None = None
    Task: type = NamedTuple
    settings: Mapping[str, Any] = {}
    fields: Mapping[str, tuple] = {}

    def tasks(self, settings) -> list:
        raise NotImplementedError

    def methods(self, task) -> tuple[str, ...]:
        raise NotImplementedError

    def run(self, task, settings, backend: str) -> list[dict]:
        raise NotImplementedError

    def cost(self, task, settings) -> float:
        raise NotImplementedError

    def table(self, records: list[dict]) -> dict:
        raise NotImplementedError

    def summary_section(self, records: list[dict]) -> list[str]:
        raise NotImplementedError

    def figure(self, records: list[dict]):
        return None

    def __repr__(self) -> str:
        # what a grid's repr (hence the journal's fingerprint) says of it: the settings carry the rest
        return f"<experiment {self.name}>"


# ---------------------------------------------------------------- numbers and words


def mean(values) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else math.nan


def fmt(x: float) -> str:
    return "—" if x is None or math.isnan(x) else (f"{x:.3f}" if abs(x) >= 0.01 else f"{x:.1e}")


def gap(x: float) -> str:
    return "—" if x is None or math.isnan(x) else f"{x:+.1e}"


def seconds(x: float) -> str:
    return f"{x * 1e3:.2f} ms" if x < 1 else f"{x:.2f} s"


def seeds_phrase(count: int, what: str = "seeds") -> str:
    """``"Mean over 3 seeds. "``, or ``""`` for one: a table of one seed shows values, not means."""
    return f"Mean over {count} {what}. " if count > 1 else ""


# ---------------------------------------------------------------- figures

STYLE = {
    "gd": dict(color="tab:red", marker="o"),
    "gd_small_init": dict(color="tab:orange", marker="s"),
    "label_noise": dict(color="tab:purple", marker="^"),
    "sam": dict(color="tab:brown", marker="v"),
    "flatness": dict(color="tab:blue", marker="D"),
    # wide and pale under nuclear_norm's dashed line, which it meets wherever the theorem holds
    "flattest_solution": dict(color="tab:cyan", marker="o", markersize=11, linewidth=5, alpha=0.5),
    "nuclear_norm": dict(color="black", marker="x", linestyle="--"),
    "balanced": dict(color="tab:green", marker="s"),
    "weight_decay": dict(color="tab:orange", marker="^", linestyle=":"),
}


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fit(text: str, width_inches: float, fontsize: float) -> str:
    """``text`` wrapped to lines that fit ``width_inches`` at ``fontsize`` (an average glyph is ~0.55 em wide); no mathtext."""
    return textwrap.fill(text, width=max(20, int(width_inches * 72 / (0.55 * fontsize))))


def suptitle(fig, text: str, fontsize: float = 11) -> None:
    fig.suptitle(fit(text, fig.get_figwidth() * 0.95, fontsize), fontsize=fontsize)


def figure_legend(fig, axes, fontsize: float = 8) -> None:
    """Lay out ``fig`` and give it one legend, below the panels, with every method any panel shows (once each).

    A legend in one panel names only that panel's lines and hides part of its
    data; below the panels it covers nothing.  The legend takes as many rows as
    the figure's width needs (a ``flattest_solution`` entry is ~1.6 inches wide at 8 pt).
    """
    handles, labels = {}, []
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in handles:
                handles[label] = handle
                labels.append(label)
    columns = max(1, min(len(labels), int(fig.get_figwidth() / 1.6)))
    rows = -(-len(labels) // columns)
    bottom = (0.1 + 0.22 * rows) / fig.get_figheight() if labels else 0.0  # inches -> figure fraction
    fig.tight_layout(rect=(0, bottom, 1, 1))
    if labels:
        fig.legend([handles[label] for label in labels], labels, loc="lower center", ncol=columns,
                   fontsize=fontsize, frameon=False)
