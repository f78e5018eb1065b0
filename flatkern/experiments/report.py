"""``results.json``, ``summary.md``, ``timings.json`` and the figures of ``flatkern reproduce``.

Generic: each experiment of the run writes its own summary section and figure
(``base.Experiment``); this module orders them, adds what the run as a whole
says (records, wall time, solves that did not converge) and writes the files.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from . import experiments as registered
from .base import pyplot
from .journal import atomic_write

__all__ = ["write_results", "without_timings", "results_of", "rounded", "DIGITS", "is_timing", "summary_markdown", "FIGURES",
           "figure_of"]

# significant digits of every float in results.json: the digits every backend agrees on.  Measured
# on the quick grid, --backend torch against auto (the C++ kernels): every trained record agreed
# to 1e-9 relative or better (most to 1e-15), and flattest_solution runs on the reference backend
# (solution.py); 6 digits leave a margin of 1000 over the worst of them.
DIGITS = 6
# below this magnitude a float is at the rounding floor of the float64 arithmetic that made it (a
# training loss of 1e-23, a recovery error of 1e-12): its digits after the first few are noise that
# differs between kernels (measured on the default grid: 4.59157e-23 against 4.59168e-23), so it
# keeps TINY_DIGITS significant digits
TINY = 1e-8
TINY_DIGITS = 3

# {experiment: its figure's file name}
FIGURES = {e.name: e.figure_name for e in registered().values() if e.figure_name}


def is_timing(key: str) -> bool:
    """A wall time measured inside a task (``*_seconds``): in the summary and timings.json, never in results.json,
    which holds only what a task computes (the same on every run, machine load or resume)."""
    return key.endswith("_seconds")


def without_timings(records: list[dict]) -> list[dict]:
    """The records as ``results.json`` holds them: without the wall times (``is_timing``)."""
    return [{k: v for k, v in r.items() if not is_timing(k)} for r in records]


def rounded(value):
    """``value`` with every float (inside lists and dicts too) rounded to ``DIGITS`` significant digits
    (``TINY_DIGITS`` below ``TINY`` in magnitude)."""
    if isinstance(value, float):
        digits = TINY_DIGITS if abs(value) < TINY else DIGITS
        return float(f"{value:.{digits}g}")  # nan and inf stay what they are
    if isinstance(value, list):
        return [rounded(v) for v in value]
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    return value


def results_of(records: list[dict]) -> list[dict]:
    """The records as ``results.json`` holds them: without wall times, every float to ``DIGITS`` significant digits."""
    return rounded(without_timings(records))


def _timings(records: list[dict]) -> list[dict]:
    keys = ("experiment", "method", "depth", "n", "seed")
    return [dict({k: r.get(k) for k in keys}, **{k: v for k, v in r.items() if is_timing(k)})
            for r in records if any(is_timing(k) for k in r)]


def _by_experiment(records: list[dict], among=None) -> list[tuple]:
    """``[(experiment, its records)]`` for the experiments that have records, in the order of ``among``
    (the grid's experiments; default: the registry's)."""
    among = list(registered().values()) if among is None else list(among)
    unknown = sorted({r["experiment"] for r in records} - {e.name for e in among})
    if unknown:
        raise ValueError(f"records of experiments {unknown} that are not among {[e.name for e in among]}")
    groups = [(e, [r for r in records if r["experiment"] == e.name]) for e in among]
    return [(e, rs) for e, rs in groups if rs]


def solve_lines(records: list[dict]) -> list[str]:
    """The summary's lines on the solves: how many flattest solves ran and which missed their convergence test,
    which training runs diverged and ran again with a smaller step (``training.retry_diverged``), and which convex
    solves stopped short of their optimality test."""
    lines: list[str] = []
    # every record of a flattest solve carries `converged` (flatkern.flattest_solution's report); the convex
    # program's carry `solver_status` ("optimal": cvxpy's, or ADMM's gap certified within its tolerance)
    solves = [r for r in records if "converged" in r and r.get("method") != "nuclear_norm"]
    short = [r for r in records if r.get("method") == "nuclear_norm" and r.get("solver_status", "optimal") != "optimal"]
    if solves:
        failed = [r for r in solves if not r["converged"]]
        lines += [
            f"`flattest_solution` ran {len(solves)} solves in {sum(r.get('solve_seconds', 0.0) for r in solves):.0f} s "
            f"(median {statistics.median(r.get('solve_seconds', 0.0) for r in solves):.1f} s); "
            + (f"**{len(failed)} did not meet its convergence test** (`converged: false` in `results.json`: "
               + ", ".join(sorted({f"{r['experiment']} L={r['depth']}" + (f" n={r['n']}" if r.get("n") else "") for r in failed}))
               + ")." if failed else "every one met its convergence test."),
            "",
        ]
    retried = [r for r in records if r.get("step_halvings")]
    if retried:
        still = [r for r in retried if r.get("diverged")]

        def run(r: dict) -> str:
            return f"{r['experiment']} {r.get('d', '?')}×{r.get('d', '?')} L={r['depth']} n={r.get('n')} seed {r['seed']} {r['method']}"

        lines += [f"**{len(retried)} training runs diverged and ran again with a smaller step size** (`step_halvings` "
                  "and `eta` in `results.json`; the step-size rule bounds the Gauss-Newton curvature, not the residual's, "
                  "`retry_diverged`): " + ", ".join(f"{run(r)} (eta {r['eta']:g})" for r in retried)
                  + (f". **{len(still)} of them diverged at every step size tried** (`diverged: true`): "
                     + ", ".join(run(r) for r in still) + "; their numbers in the tables are a diverged run's." if still else "."),
                  ""]
    if short:
        lines += [f"**{len(short)} convex solves stopped short of their optimality test** (`solver_status` "
                  "`optimal_inaccurate`: cvxpy's, or ADMM at its iteration cap before its certified gap reached 1e-7): "
                  + ", ".join(sorted({f"{r['experiment']} {r.get('d', '?')}×{r.get('d', '?')} n={r.get('n')} seed {r['seed']}"
                                      for r in short})) + ".", ""]
    return lines


def summary_markdown(records: list[dict], *, grid: str, seconds: float, command: str, processes: int, resumed: int = 0,
                     task_seconds: float | None = None, experiments=None, settings: dict | None = None,
                     by_experiment: dict | None = None) -> str:
    """The tables of the run, in markdown.

    ``experiments``: the ``Experiment`` objects of the run's grid, in order (default: the registry's).
    ``settings``: ``{experiment name: its settings in the grid}``; each experiment's ``budget_note`` (the tasks
    the grid left out as unaffordable) follows its section.
    ``processes``: the worker processes that ran tasks (over every rank);
    ``resumed``: tasks whose records an earlier, interrupted run computed;
    ``task_seconds``: the tasks' own wall time, summed over the workers;
    ``by_experiment``: ``{experiment: (tasks, their seconds, the cost model's estimate)}`` (``Run.by_experiment``),
    the table of where the time went.
    """
    plural = "es" if processes != 1 else ""
    lines = [
        "# flatkern reproduce",
        "",
        f"`{command}`: grid `{grid}`, {len(records)} records, {seconds:.0f} s wall on {processes} worker process{plural}"
        + (f" ({task_seconds:.0f} s in tasks, summed over the workers)" if task_seconds is not None else "")
        + (f"; resumed: {resumed} tasks came from the interrupted run's journal." if resumed else "."),
        "",
    ]
    lines += solve_lines(records)
    settings = settings or {}
    with_records = {e.name for e, _ in _by_experiment(records, experiments)}
    for experiment in (list(registered().values()) if experiments is None else list(experiments)):
        mine = [r for r in records if r["experiment"] == experiment.name]
        note = experiment.budget_note(settings[experiment.name]) if experiment.name in settings else []
        if experiment.name in with_records:
            lines += experiment.summary_section(mine) + note
        elif note:  # every task of it left out: say so rather than say nothing
            lines += [f"## {experiment.name}: not run", ""] + note
    lines += _where_the_time_went(by_experiment or {})
    lines += [
        f"Every record (per seed and method, with every quantity measured) is in `results.json`, each number to "
        f"{DIGITS} significant digits ({TINY_DIGITS} below {TINY:g}; the digits every backend agrees on); the tables "
        "above are from full precision, "
        "the wall times are in `timings.json`.",
        "",
    ]
    return "\n".join(lines)


def _where_the_time_went(by_experiment: dict) -> list[str]:
    """The summary's table of task seconds per experiment against the cost model's estimates (``Experiment.cost``:
    seconds on one idle thread), which order the tasks and drive the progress bar."""
    if not by_experiment:
        return []
    total = sum(seconds for _, seconds, _ in by_experiment.values())
    lines = ["## Where the time went", "",
             "Task seconds (each task on one thread, summed over the workers; a resumed task with the seconds its "
             "journal holds) per experiment, against the cost model's estimate (`Experiment.cost`, one idle thread):",
             "", "| experiment | tasks | task seconds | share | estimated | measured / estimated |", "|---|---|---|---|---|---|"]
    for name, (count, seconds, estimate) in by_experiment.items():
        lines.append(f"| {name} | {count} | {seconds:.0f} | {seconds / total if total else 0.0:.0%} | {estimate:.0f} | "
                     f"{seconds / estimate if estimate else math.nan:.2f} |")
    estimate = sum(e for _, _, e in by_experiment.values())
    lines += [f"| all | {sum(c for c, _, _ in by_experiment.values())} | {total:.0f} | 100% | {estimate:.0f} | "
              f"{total / estimate if estimate else math.nan:.2f} |", ""]
    return lines


def figure_of(records: list[dict], experiment: str):
    """The figure of ``experiment`` from the run's records (``None`` if it draws none)."""
    return registered()[experiment].figure([r for r in records if r["experiment"] == experiment])


def _save(fig, path: Path) -> None:
    plt = pyplot()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def write_results(records: list[dict], out: Path, *, grid: str, seconds: float, command: str, processes: int, resumed: int = 0,
                  task_seconds: float | None = None, experiments=None, settings: dict | None = None,
                  by_experiment: dict | None = None) -> str:
    """Write the figures, ``summary.md``, ``timings.json`` and, last, ``results.json`` into ``out``; return the summary.

    Each file is written to a temporary name and renamed over the old one, and
    ``results.json`` goes last: a stop part-way leaves each file whole, and never
    a new ``results.json`` beside an old summary or figure.  ``results.json``
    holds the records without wall times and with ``DIGITS`` significant digits
    (``results_of``), so it is the same on every run of a grid, on every backend;
    the wall times go to ``timings.json``, and the summary and figures are drawn
    from the records at full precision.
    ``experiments``: the grid's ``Experiment`` objects, in order (default: the registry's); ``settings`` and
    ``by_experiment``: as ``summary_markdown``'s.
    """
    out.mkdir(parents=True, exist_ok=True)
    summary = summary_markdown(records, grid=grid, seconds=seconds, command=command, processes=processes, resumed=resumed,
                               task_seconds=task_seconds, experiments=experiments, settings=settings,
                               by_experiment=by_experiment)
    figures = []
    for experiment, mine in _by_experiment(records, experiments):
        fig = experiment.figure(mine) if experiment.figure_name else None
        if fig is not None:
            _save(fig, out / experiment.figure_name)
            figures.append(experiment.figure_name)
    if figures:
        summary += "Figures: " + ", ".join(f"`{f}`" for f in figures) + "\n"
    atomic_write(out / "summary.md", lambda tmp: tmp.write_text(summary))
    timings = _timings(records)
    if timings:
        atomic_write(out / "timings.json", lambda tmp: tmp.write_text(json.dumps(timings, indent=1) + "\n"))
    atomic_write(out / "results.json", lambda tmp: tmp.write_text(json.dumps(results_of(records), indent=1) + "\n"))
    return summary
