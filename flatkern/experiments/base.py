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
- ``axes`` and ``sweep(settings, axes)``: the grid axes of the command line
  (``AXES``: ``sizes``, ``ranks``, ``depths``, ``ns``, ``seeds``) that the
  experiment reads, and its settings with those axes replaced (``ValueError``
  naming the axis for a value it cannot take); an axis it does not read is
  ignored.
- ``budget_note(settings)``: summary lines on the tasks the settings leave out
  as unaffordable (``within_budget``), ``[]`` when none.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping
from typing import Any, NamedTuple

__all__ = ["Experiment", "AXES", "swept_problems", "within_budget", "budget_lines", "NUMBER", "INT", "OPTIONAL_NUMBER", "OPTIONAL_INT", "mean", "fmt", "gap", "seconds",
           "seeds_phrase", "pyplot", "fit", "suptitle", "figure_legend", "STYLE", "COMMON_FIELDS"]

NUMBER = (float, int)
INT = (int,)
OPTIONAL_NUMBER = (float, int, type(None))
OPTIONAL_INT = (int, type(None))

# the key of every record: which experiment, method and problem it belongs to
COMMON_FIELDS = {"experiment": (str,), "method": (str,), "depth": OPTIONAL_INT, "n": OPTIONAL_INT, "seed": INT}


# the grid axes the command line sets (flatkern reproduce --sizes ... or a grid file): tuples of positive ints
AXES = ("sizes", "ranks", "depths", "ns", "seeds")


class Experiment:
    """One experiment (see the module docstring for the protocol); subclasses set the attributes and the methods."""

    name: str = ""
    axes: tuple = ()
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

    def sweep(self, settings, axes: dict):
        """``settings`` with the grid axes in ``axes`` (``{axis: tuple of ints}``) that this experiment reads replaced."""
        raise NotImplementedError

    def budget_note(self, settings) -> list[str]:
        return []

    def memory_gb(self, task, settings) -> float:
        """The task's estimated peak memory in GB (what ``within_budget`` compares with a grid's memory budget)."""
        return 0.0

    def __repr__(self) -> str:
        # what a grid's repr (hence the journal's fingerprint) says of it: the settings carry the rest
        return f"<experiment {self.name}>"


# ---------------------------------------------------------------- grid axes and budgets


def swept_problems(problems: tuple, axes: dict) -> tuple:
    """``((d, rank, ns), ...)`` with the ``sizes`` / ``ranks`` / ``ns`` of ``axes`` in place of ``problems``' own.

    Given ``sizes`` or ``ranks``, the problems are every ``(d, rank)`` of their product (an axis not given keeps
    the values ``problems`` has), each at ``ns`` (given, or the first problem's).  A rank above its size is a
    ``ValueError`` naming both.
    """
    if not any(axis in axes for axis in ("sizes", "ranks", "ns")):
        return tuple(problems)
    sizes = axes.get("sizes") or tuple(dict.fromkeys(d for d, _, _ in problems))
    ranks = axes.get("ranks") or tuple(dict.fromkeys(r for _, r, _ in problems))
    if "sizes" not in axes and "ranks" not in axes:
        return tuple((d, r, tuple(axes["ns"])) for d, r, _ in problems)
    ns = tuple(axes.get("ns") or problems[0][2])
    bad = [(d, r) for d in sizes for r in ranks if r > d]
    if bad:
        raise ValueError(f"ranks: a rank-r d × d matrix needs r <= d, got rank {bad[0][1]} with size {bad[0][0]} "
                         f"(sizes {list(sizes)}, ranks {list(ranks)})")
    return tuple((d, r, ns) for d in sizes for r in ranks)


def _over(experiment, settings, task, max_seconds: float | None, max_memory_gb: float | None) -> bool:
    return ((max_seconds is not None and experiment.cost(task, settings) > max_seconds)
            or (max_memory_gb is not None and experiment.memory_gb(task, settings) > max_memory_gb))


def _problem(task) -> tuple:
    return tuple(getattr(task, f, None) for f in ("d", "rank", "n", "seed"))


def within_budget(experiment, settings, tasks: list, max_seconds: float | None, max_memory_gb: float | None = None, *,
                  whole_problems: bool = False) -> tuple[list, list]:
    """``(kept, left_out)``: the tasks whose estimated ``experiment.cost`` (seconds) and ``experiment.memory_gb``
    are within ``max_seconds`` and ``max_memory_gb`` (``None``: no limit), and the others, in order.

    ``whole_problems``: a problem (a task's ``(d, rank, n, seed)``) runs whole or not at all (for an experiment
    whose every comparison needs all of a problem's tasks).
    """
    over = [t for t in tasks if _over(experiment, settings, t, max_seconds, max_memory_gb)]
    if whole_problems:
        problems = {_problem(t) for t in over}
        over = [t for t in tasks if _problem(t) in problems]
    dropped = set(over)
    return [t for t in tasks if t not in dropped], over


def budget_lines(experiment, settings, tasks: list, max_seconds: float | None, max_memory_gb: float | None = None, *,
                 whole_problems: bool = False) -> list[str]:
    """What ``within_budget`` left out, for the summary: per problem size and kind of task, the ``n``'s whose task
    is over the budget, and the estimates."""
    _, left = within_budget(experiment, settings, tasks, max_seconds, max_memory_gb, whole_problems=whole_problems)
    if not left:
        return []
    groups: dict = {}
    for task in left:
        if _over(experiment, settings, task, max_seconds, max_memory_gb):
            key = (getattr(task, "d", 0), getattr(task, "rank", 0), getattr(task, "kind", "task"))
            groups.setdefault(key, []).append((getattr(task, "n", None), experiment.cost(task, settings),
                                               experiment.memory_gb(task, settings)))
    parts = []
    for (d, rank, kind), items in sorted(groups.items()):
        ns = sorted({n for n, _, _ in items if n is not None})
        low, high = min(c for _, c, _ in items), max(c for _, c, _ in items)
        memory = max(m for _, _, m in items)
        parts.append(f"{d} × {d} rank {rank}, `{kind}` at n = {', '.join(map(str, ns))} (estimated {low:.0f}"
                     + (f"-{high:.0f}" if round(high) != round(low) else "") + " s each"
                     + (f", {memory:.0f} GB" if max_memory_gb is not None and memory > max_memory_gb else "") + ")")
    limits = [f"{max_seconds:.0f} s" if max_seconds is not None else None,
              f"{max_memory_gb:g} GB" if max_memory_gb is not None else None]
    limits = " and ".join(x for x in limits if x)
    whole = " a problem (size, n, seed) runs whole or not at all, so" if whole_problems else ""
    return [f"**Where this grid stops, and why.** {len(left)} tasks are left out: the cost model (`{experiment.name}`'s "
            f"`cost` and `memory_gb`: seconds on one idle thread and memory, from measured runs) puts them above this "
            f"grid's budget of {limits} per task;{whole} these were over it: " + "; ".join(parts) + ".", ""]


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
    "label_noise_sgd": dict(color="tab:purple", marker="^"),
    "sam": dict(color="tab:brown", marker="v"),
    "one_sam": dict(color="tab:olive", marker="<"),
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
