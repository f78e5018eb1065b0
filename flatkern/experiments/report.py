"""``results.json``, ``summary.md`` and the figures of ``flatkern reproduce``."""

from __future__ import annotations

import json
import math
import statistics
import textwrap
from collections import defaultdict
from pathlib import Path

from .journal import atomic_write

__all__ = [
    "write_results", "without_timings", "TIMING_KEYS", "summary_markdown", "recovery_figure", "flattest_figure", "trajectory_figure", "FIGURES",
    "recovery_table", "flattest_table", "nuclear_norm_gaps", "trajectory_table",
]

RECOVERY_METHODS = ("gd", "gd_small_init", "label_noise", "flatness", "flattest_solution", "nuclear_norm")
FLATTEST_METHODS = ("flattest_solution", "flatness", "balanced", "weight_decay")
TRAJECTORY_METHODS = ("gd", "label_noise", "sam", "flatness")
FIGURES = {
    "sensing": "recovery_sensing.png",
    "completion": "recovery_completion.png",
    "flattest": "flattest_ratio.png",
    "trajectory": "trajectory.png",
}
_STYLE = {
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


# wall times measured inside tasks: in the summary and timings.json, never in results.json,
# which holds only what a task computes (the same on every run, machine load or resume)
TIMING_KEYS = ("solve_seconds", "step_seconds", "trace_seconds", "tracked_step_seconds", "reference_solve_seconds")


def without_timings(records: list[dict]) -> list[dict]:
    """The records as ``results.json`` holds them: without the wall times (``TIMING_KEYS``)."""
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def _timings(records: list[dict]) -> list[dict]:
    keys = ("experiment", "method", "depth", "n", "seed")
    return [dict({k: r.get(k) for k in keys}, **{k: r[k] for k in TIMING_KEYS if k in r})
            for r in records if any(k in r for k in TIMING_KEYS)]


def _mean(values) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else math.nan


# ---------------------------------------------------------------- tables


def recovery_table(records: list[dict], experiment: str) -> dict:
    """``{(depth, n): {method: mean rel_error over seeds}}``; ``nuclear_norm`` (depth-free) is copied into every depth."""
    errors = defaultdict(list)
    depths = sorted({r["depth"] for r in records if r["experiment"] == experiment and r["depth"] is not None})
    for r in records:
        if r["experiment"] != experiment:
            continue
        for depth in ([r["depth"]] if r["depth"] is not None else depths):
            errors[(depth, r["n"], r["method"])].append(r["rel_error"])
    table = defaultdict(dict)
    for (depth, n, method), values in errors.items():
        table[(depth, n)][method] = _mean(values)
    return dict(sorted(table.items()))


def nuclear_norm_gaps(records: list[dict], experiment: str) -> dict:
    """``{n: {"convex": mean ‖X‖_*, depth: mean (‖E‖_* - ‖X‖_*) / ‖X‖_*}}`` of ``flattest_solution`` against the convex program, per seed."""
    convex = {(r["n"], r["seed"]): r["nuclear_norm"] for r in records
              if r["experiment"] == experiment and r["method"] == "nuclear_norm"}
    gaps, norms = defaultdict(list), defaultdict(list)
    for (n, _), value in convex.items():
        norms[n].append(value)
    for r in records:
        key = (r["n"], r["seed"]) if r["experiment"] == experiment and r["method"] == "flattest_solution" else None
        if key in convex:
            gaps[(r["n"], r["depth"])].append((r["nuclear_norm"] - convex[key]) / convex[key])
    table = {n: {"convex": _mean(values)} for n, values in sorted(norms.items())}
    for (n, depth), values in sorted(gaps.items()):
        table[n][depth] = _mean(values)
    return table


def flattest_table(records: list[dict]) -> dict:
    """``{depth: {method: mean ratio over matrices and seeds}}``."""
    ratios = defaultdict(list)
    for r in records:
        if r["experiment"] == "flattest":
            ratios[(r["depth"], r["method"])].append(r["ratio"])
    table = defaultdict(dict)
    for (depth, method), values in ratios.items():
        table[depth][method] = _mean(values)
    return dict(sorted(table.items()))


def trajectory_table(records: list[dict]) -> dict:
    """``{depth: {method: record}}`` of the ``trajectory`` experiment (the first seed)."""
    table = defaultdict(dict)
    for r in records:
        if r["experiment"] == "trajectory":
            table[r["depth"]].setdefault(r["method"], r)
    return dict(sorted(table.items()))


def _at_step(record: dict, step: int) -> float:
    """The ratio at the recorded step nearest to ``step`` (log scale)."""
    i = min(range(len(record["steps"])), key=lambda k: abs(math.log(record["steps"][k] / step)))
    return record["ratios"][i]


def _fmt(x: float) -> str:
    return "—" if x is None or math.isnan(x) else (f"{x:.3f}" if abs(x) >= 0.01 else f"{x:.1e}")


def _gap(x: float) -> str:
    return "—" if x is None or math.isnan(x) else f"{x:+.1e}"


def _seconds(x: float) -> str:
    return f"{x * 1e3:.2f} ms" if x < 1 else f"{x:.2f} s"


# ---------------------------------------------------------------- summary.md


def summary_markdown(records: list[dict], *, grid: str, seconds: float, command: str, processes: int, resumed: int = 0,
                     task_seconds: float | None = None) -> str:
    """The tables of the run, in markdown.

    ``processes``: the worker processes that ran tasks (over every rank);
    ``resumed``: tasks whose records an earlier, interrupted run computed;
    ``task_seconds``: the tasks' own wall time, summed over the workers.
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
    solves = [r for r in records if r["method"] == "flattest_solution"]
    if solves:
        failed = [r for r in solves if not r.get("converged", True)]
        lines += [
            f"`flattest_solution` ran {len(solves)} solves in {sum(r.get('solve_seconds', 0.0) for r in solves):.0f} s "
            f"(median {statistics.median(r.get('solve_seconds', 0.0) for r in solves):.1f} s); "
            + (f"**{len(failed)} did not meet its convergence test** (`converged: false` in `results.json`: "
               + ", ".join(sorted({f"{r['experiment']} L={r['depth']}" + (f" n={r['n']}" if r.get("n") else "") for r in failed}))
               + ")." if failed else "every one met its convergence test."),
            "",
        ]
    flat = flattest_table(records)
    if flat:
        methods = [m for m in FLATTEST_METHODS if any(m in row for row in flat.values())]
        lines += [
            "## flattest: trace of the Hessian over the theorem's minimum",
            "",
            "`ratio = tr ∇²L / (2 L (d_0 d_L)^{1/L} ‖E‖_*^{2-2/L})` for an `Isotropic` loss; 1 is the flattest",
            "factorization. `flattest_solution` solves for it (least trace subject to `E = M`); `flatness` trains",
            "toward it with `FlatnessRegularized`. Mean over the random matrices.",
            "",
            "| depth | " + " | ".join(methods) + " |",
            "|---|" + "---|" * len(methods),
        ]
        for depth, row in flat.items():
            lines.append(f"| {depth} | " + " | ".join(_fmt(row.get(m, math.nan)) for m in methods) + " |")
        lines.append("")
    for experiment, title in (("sensing", "Gaussian sensing"), ("completion", "matrix completion (uniform entries)")):
        table = recovery_table(records, experiment)
        if not table:
            continue
        methods = [m for m in RECOVERY_METHODS if any(m in row for row in table.values())]
        lines += [
            f"## {experiment}: {title}, relative recovery error ‖E − M*‖_F / ‖M*‖_F",
            "",
            "Mean over seeds. `nuclear_norm` is the convex program `min ‖X‖_* s.t. A(X) = b` "
            "(cvxpy + Clarabel); it has no depth. `flattest_solution` is the factorization of least `Isotropic` "
            "trace that fits the measurements exactly (`flatkern.flattest_solution`). `flatness` trains with "
            + ("the `Isotropic` trace (the expectation of the training-loss trace over Gaussian `A`) as regularizer."
               if experiment == "sensing" and any(r.get("regularizer") == "isotropic" and r["method"] == "flatness" for r in records)
               else "the trace of the training-loss Hessian as regularizer."),
            "",
            "| depth | n | " + " | ".join(methods) + " |",
            "|---|---|" + "---|" * len(methods),
        ]
        for (depth, n), row in table.items():
            lines.append(f"| {depth} | {n} | " + " | ".join(_fmt(row.get(m, math.nan)) for m in methods) + " |")
        lines.append("")
        gaps = nuclear_norm_gaps(records, experiment)
        depths = sorted({k for row in gaps.values() for k in row if k != "convex"})
        if depths:
            solved = [r for r in records if r["experiment"] == experiment and r["method"] == "flattest_solution"]
            worst = max(abs(g) for row in gaps.values() for k, g in row.items() if k != "convex")
            feasibility = max((r.get("feasibility") or 0.0) for r in solved)
            lines += [
                f"**The equality.** `flattest_solution`'s nuclear norm against the convex program's optimum at every n: "
                "`(‖E‖_* − ‖X‖_*) / ‖X‖_*`, mean over seeds (the theorem: 0, above and below the recovery threshold). "
                f"Largest |gap| {worst:.1e}; largest relative residual ‖A(E) − b‖ / ‖b‖ {feasibility:.1e}.",
                "",
                "| n | ‖X‖_* (convex) | " + " | ".join(f"depth {d}" for d in depths) + " |",
                "|---|---|" + "---|" * len(depths),
            ]
            for n, row in gaps.items():
                lines.append(f"| {n} | {row['convex']:.4f} | " + " | ".join(_gap(row.get(d, math.nan)) for d in depths) + " |")
            lines.append("")
    traj = trajectory_table(records)
    if traj:
        lines += _trajectory_section(traj)
    lines += [
        "Every record (per seed, with nuclear norm, train loss, the trace of the training-loss Hessian,",
        "the `Isotropic` trace and its ratio to the lower bound; for `trajectory` the steps and ratios) is in `results.json`.",
        "",
    ]
    return "\n".join(lines)


def _trajectory_section(traj: dict) -> list[str]:
    any_record = next(iter(next(iter(traj.values())).values()))
    last = max(any_record["steps"])
    marks = [s for s in (10, 100, 1000, 10000) if s < last] + [last]
    lines = [
        "## trajectory: the exact trace along training, over the flattest solution's",
        "",
        f"Gaussian sensing (n = {any_record['n']}, rank-{any_record['rank']} {any_record['d']}×{any_record['d']} `M*`), "
        "every method from the same start. `ratio = tr ∇²L(W_t) / tr ∇²L(W_flattest)`, both the exact trace of "
        "the training loss, `W_flattest` = `flattest_solution` for the same measurements (least training-loss trace "
        f"at zero loss): at zero loss 1 is the flattest. {len(any_record['steps'])} log-spaced steps per run "
        "(`trajectory.png`); the last 10% of the steps are noise-free / unregularized.",
        "",
        "| depth | method | " + " | ".join(f"step {s}" for s in marks) + " | final loss | ‖E − M*‖/‖M*‖ |",
        "|---|---|" + "---|" * (len(marks) + 2),
    ]
    for depth, row in traj.items():
        for method in TRAJECTORY_METHODS:
            if method in row:
                r = row[method]
                lines.append(f"| {depth} | {method} | " + " | ".join(_fmt(_at_step(r, s)) for s in marks)
                             + f" | {r['train_loss']:.1e} | {_fmt(r['rel_error'])} |")
    lines += [
        "",
        "**What tracking the exact trace cost** (one thread, medians). The exact trace (the training loss's, `Dense` "
        "measurements) was evaluated after each of 100 `gd` steps, interleaved so that both see the same load on the "
        "machine; the last column is what evaluating it at every step would add, in `gd` steps. Each method's own "
        "step, median over its run, for scale.",
        "",
        "| depth | exact trace, per evaluation | gd step (interleaved) | trace / gd step | "
        + " | ".join(f"{m} step" for m in TRAJECTORY_METHODS) + " |",
        "|---|---|---|---|" + "---|" * len(TRAJECTORY_METHODS),
    ]
    for depth, row in traj.items():
        first = next(iter(row.values()))
        if "trace_seconds" not in first:
            continue  # records without their wall times (read back from results.json)
        steps = [_seconds(row[m]["step_seconds"]) if m in row else "—" for m in TRAJECTORY_METHODS]
        lines.append(f"| {depth} | {_seconds(first['trace_seconds'])} | {_seconds(first['tracked_step_seconds'])} | "
                     f"{first['trace_seconds'] / first['tracked_step_seconds']:.2f}× | " + " | ".join(steps) + " |")
    lines.append("")
    return lines


# ---------------------------------------------------------------- figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fit(text: str, width_inches: float, fontsize: float) -> str:
    """``text`` wrapped to lines that fit ``width_inches`` at ``fontsize`` (an average glyph is ~0.55 em wide); no mathtext."""
    return textwrap.fill(text, width=max(20, int(width_inches * 72 / (0.55 * fontsize))))


def _suptitle(fig, text: str, fontsize: float = 11) -> None:
    fig.suptitle(_fit(text, fig.get_figwidth() * 0.95, fontsize), fontsize=fontsize)


def _save(fig, path: Path) -> None:
    plt = _pyplot()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def recovery_figure(records: list[dict], experiment: str):
    """Relative recovery error against ``n``, one panel per depth, one line per method (log scale)."""
    plt = _pyplot()
    table = recovery_table(records, experiment)
    depths = sorted({depth for depth, _ in table})
    fig, axes = plt.subplots(1, len(depths), figsize=(max(4.6 * len(depths), 6.4), 4.2), sharey=True, squeeze=False)
    title = {"sensing": "Gaussian sensing", "completion": "matrix completion"}[experiment]
    for ax, depth in zip(axes[0], depths):
        ns = sorted(n for d, n in table if d == depth)
        for method in RECOVERY_METHODS:
            ys = [table[(depth, n)].get(method, math.nan) for n in ns]
            if all(math.isnan(y) for y in ys):
                continue
            # floor at 1e-6: exact recoveries (errors ~1e-9) would otherwise stretch the axis
            ax.plot(ns, [max(y, 1e-6) for y in ys], label=method, **_STYLE[method])
        ax.set_yscale("log")
        ax.set_title(f"depth L = {depth}")
        ax.set_xlabel("number of measurements n")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel(r"relative error $\Vert E - M^*\Vert_F \,/\, \Vert M^*\Vert_F$ (floor $10^{-6}$)")
    axes[0][-1].legend(fontsize=8)
    d, r = _problem_size(records, experiment)
    _suptitle(fig, f"{title}: recovering a rank-{r} {d}×{d} matrix M* from n measurements (mean over seeds; lower is better)")
    fig.tight_layout()
    return fig


def flattest_figure(records: list[dict]):
    """``trace / lower bound`` against depth, per method (1 = the flattest factorization)."""
    plt = _pyplot()
    table = flattest_table(records)
    depths = sorted(table)
    fig, ax = plt.subplots(figsize=(6.0, 4.4))
    for method in FLATTEST_METHODS:
        ys = [table[d].get(method, math.nan) for d in depths]
        if not all(math.isnan(y) for y in ys):
            ax.plot(depths, ys, label=method, **_STYLE[method])
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xticks(depths)
    ax.set_xlabel("depth L")
    ax.set_ylabel(r"$\mathrm{tr}\,\nabla^2 L \;/\; 2L(d_0 d_L)^{1/L}\Vert E\Vert_*^{2-2/L}$")
    ax.set_title(_fit("Factorizations of a fixed M: trace of the Hessian over the theorem's minimum (1 = flattest)", 5.4, 11),
                 fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def trajectory_figure(records: list[dict]):
    """The trace ratio along training, log-scale steps, one panel per depth (a line at 1: the flattest solution)."""
    plt = _pyplot()
    table = trajectory_table(records)
    depths = sorted(table)
    fig, axes = plt.subplots(1, len(depths), figsize=(max(4.6 * len(depths), 6.4), 4.2), sharey=True, squeeze=False)
    for ax, depth in zip(axes[0], depths):
        for method in TRAJECTORY_METHODS:
            if method in table[depth]:
                r = table[depth][method]
                style = dict(_STYLE[method], markersize=3)
                ax.plot(r["steps"], r["ratios"], label=method, **style)
        ax.axhline(1.0, color="gray", linewidth=1.0, linestyle="--")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"depth L = {depth}")
        ax.set_xlabel("training step")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel(r"$\mathrm{tr}\,\nabla^2 L(W_t) \;/\; \mathrm{tr}\,\nabla^2 L(W_\mathrm{flattest})$")
    axes[0][-1].legend(fontsize=8)
    any_record = next(iter(next(iter(table.values())).values()))
    _suptitle(fig, f"Exact trace of the Hessian along training, over that of the flattest zero-loss solution "
                   f"(Gaussian sensing, n={any_record['n']}; 1 = flattest)")
    fig.tight_layout()
    return fig


def _problem_size(records: list[dict], experiment: str) -> tuple:
    for r in records:
        if r["experiment"] == experiment and "d" in r:
            return r["d"], r["rank"]
    return "?", "?"


def write_results(records: list[dict], out: Path, *, grid: str, seconds: float, command: str, processes: int, resumed: int = 0,
                  task_seconds: float | None = None) -> str:
    """Write the figures, ``summary.md``, ``timings.json`` and, last, ``results.json`` into ``out``; return the summary.

    Each file is written to a temporary name and renamed over the old one, and
    ``results.json`` goes last: a stop part-way leaves each file whole, and never
    a new ``results.json`` beside an old summary or figure.  ``results.json``
    holds the records without wall times (``without_timings``), so it is the same
    on every run of a grid; the wall times go to ``timings.json`` and the summary.
    """
    out.mkdir(parents=True, exist_ok=True)
    summary = summary_markdown(records, grid=grid, seconds=seconds, command=command, processes=processes, resumed=resumed,
                               task_seconds=task_seconds)
    experiments = {r["experiment"] for r in records}
    figures = []
    for experiment in ("sensing", "completion", "flattest", "trajectory"):
        if experiment not in experiments:
            continue
        if experiment == "flattest":
            fig = flattest_figure(records)
        elif experiment == "trajectory":
            fig = trajectory_figure(records)
        else:
            fig = recovery_figure(records, experiment)
        _save(fig, out / FIGURES[experiment])
        figures.append(FIGURES[experiment])
    summary += "Figures: " + ", ".join(f"`{f}`" for f in figures) + "\n"
    atomic_write(out / "summary.md", lambda tmp: tmp.write_text(summary))
    timings = _timings(records)
    if timings:
        atomic_write(out / "timings.json", lambda tmp: tmp.write_text(json.dumps(timings, indent=1) + "\n"))
    atomic_write(out / "results.json", lambda tmp: tmp.write_text(json.dumps(without_timings(records), indent=1) + "\n"))
    return summary
