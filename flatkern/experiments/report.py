"""``results.json``, ``summary.md`` and the figures of ``flatkern reproduce``."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

__all__ = ["write_results", "summary_markdown", "plot_recovery", "plot_flattest", "FIGURES"]

RECOVERY_METHODS = ("gd", "gd_small_init", "label_noise", "flatness", "nuclear_norm")
FLATTEST_METHODS = ("flatness", "balanced", "weight_decay")
FIGURES = {"sensing": "recovery_sensing.png", "completion": "recovery_completion.png", "flattest": "flattest_ratio.png"}
_STYLE = {
    "gd": dict(color="tab:red", marker="o"),
    "gd_small_init": dict(color="tab:orange", marker="s"),
    "label_noise": dict(color="tab:purple", marker="^"),
    "flatness": dict(color="tab:blue", marker="D"),
    "nuclear_norm": dict(color="black", marker="x", linestyle="--"),
    "balanced": dict(color="tab:green", marker="s"),
    "weight_decay": dict(color="tab:orange", marker="^", linestyle=":"),
}


def _mean(values) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else math.nan


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


def _fmt(x: float) -> str:
    return "—" if x is None or math.isnan(x) else (f"{x:.3f}" if x >= 0.01 else f"{x:.1e}")


def summary_markdown(records: list[dict], *, grid: str, seconds: float, command: str, processes: int) -> str:
    """The tables of the run, in markdown."""
    lines = [
        "# flatkern reproduce",
        "",
        f"`{command}`: grid `{grid}`, {len(records)} records, {seconds:.0f} s on {processes} process(es).",
        "",
    ]
    flat = flattest_table(records)
    if flat:
        lines += [
            "## flattest: trace of the Hessian over the theorem's minimum",
            "",
            "`ratio = tr ∇²L / (2 L (d_0 d_L)^{1/L} ‖E‖_*^{2-2/L})` for an `Isotropic` loss; 1 is the flattest",
            "factorization. Mean over the random matrices.",
            "",
            "| depth | " + " | ".join(FLATTEST_METHODS) + " |",
            "|---|" + "---|" * len(FLATTEST_METHODS),
        ]
        for depth, row in flat.items():
            lines.append(f"| {depth} | " + " | ".join(_fmt(row.get(m, math.nan)) for m in FLATTEST_METHODS) + " |")
        lines.append("")
    for experiment, title in (("sensing", "Gaussian sensing"), ("completion", "matrix completion (uniform entries)")):
        table = recovery_table(records, experiment)
        if not table:
            continue
        lines += [
            f"## {experiment}: {title}, relative recovery error ‖E − M*‖_F / ‖M*‖_F",
            "",
            "Mean over seeds. `nuclear_norm` is the convex program `min ‖X‖_* s.t. A(X) = b` "
            "(cvxpy + Clarabel); it has no depth. `flatness` regularizes "
            + ("the `Isotropic` trace (the expectation of the training-loss trace over Gaussian `A`)."
               if experiment == "sensing" and any(r.get("regularizer") == "isotropic" for r in records)
               else "the trace of the training-loss Hessian."),
            "",
            "| depth | n | " + " | ".join(RECOVERY_METHODS) + " |",
            "|---|---|" + "---|" * len(RECOVERY_METHODS),
        ]
        for (depth, n), row in table.items():
            lines.append(f"| {depth} | {n} | " + " | ".join(_fmt(row.get(m, math.nan)) for m in RECOVERY_METHODS) + " |")
        lines.append("")
    lines += [
        "Every record (per seed, with nuclear norm, train loss, the trace of the training-loss Hessian,",
        "the `Isotropic` trace and its ratio to the lower bound) is in `results.json`.",
        "",
    ]
    return "\n".join(lines)


def _problem_size(records: list[dict], experiment: str) -> tuple:
    for r in records:
        if r["experiment"] == experiment and "d" in r:
            return r["d"], r["rank"]
    return "?", "?"


def plot_recovery(records: list[dict], experiment: str, path: Path) -> None:
    """Relative recovery error against ``n``, one panel per depth, one line per method (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = recovery_table(records, experiment)
    depths = sorted({depth for depth, _ in table})
    fig, axes = plt.subplots(1, len(depths), figsize=(4.2 * len(depths), 3.8), sharey=True, squeeze=False)
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
    fig.suptitle(f"{title}: recovering a rank-{r} {d}×{d} matrix $M^*$ from n measurements (mean over seeds; lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_flattest(records: list[dict], path: Path) -> None:
    """``trace / lower bound`` against depth, per method (1 = the flattest factorization)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = flattest_table(records)
    depths = sorted(table)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for method in FLATTEST_METHODS:
        ax.plot(depths, [table[d].get(method, math.nan) for d in depths], label=method, **_STYLE[method])
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xticks(depths)
    ax.set_xlabel("depth L")
    ax.set_ylabel(r"$\mathrm{tr}\,\nabla^2 L \;/\; 2L(d_0 d_L)^{1/L}\Vert E\Vert_*^{2-2/L}$")
    ax.set_title("Factorizations of a fixed M: trace of the Hessian\nover the theorem's minimum (1 = flattest)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(records: list[dict], out: Path, *, grid: str, seconds: float, command: str, processes: int) -> str:
    """Write ``results.json``, ``summary.md`` and the figures into ``out``; return the summary."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(records, indent=1) + "\n")
    summary = summary_markdown(records, grid=grid, seconds=seconds, command=command, processes=processes)
    experiments = {r["experiment"] for r in records}
    figures = []
    for experiment in ("sensing", "completion"):
        if experiment in experiments:
            plot_recovery(records, experiment, out / FIGURES[experiment])
            figures.append(FIGURES[experiment])
    if "flattest" in experiments:
        plot_flattest(records, out / FIGURES["flattest"])
        figures.append(FIGURES["flattest"])
    summary += "Figures: " + ", ".join(f"`{f}`" for f in figures) + "\n"
    (out / "summary.md").write_text(summary)
    return summary
