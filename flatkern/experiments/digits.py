"""Experiment 5: ReLU MLPs on a real dataset, scikit-learn's handwritten digits (``digits``).

``sklearn.datasets.load_digits`` (1,797 8×8 grey-level images, 10 classes, bundled
with scikit-learn: no download) is split once into a fixed training and test set
(a seeded permutation; ``test_fraction`` of the images held out), every pixel
standardized by the training set's mean and standard deviation (a pixel constant
on the training set is only centred).  A ReLU MLP (``widths``, default
64-128-128-10) is trained with minibatch SGD (heavy ball, constant step size) on
the mean cross-entropy, by four methods that share, for each seed, the initial
weights (He-normal, LeCun-normal for the output layer, zero biases) and the
order of the minibatches:

- ``sgd``: plain minibatch SGD.
- ``label_noise``: the same, each label of each minibatch replaced, with
  probability ``label_noise`` and afresh at every step, by a class drawn
  uniformly from the 10 (possibly the same one: the label is wrong with
  probability ``label_noise · 9/10``).  Hard labels, not smoothed ones.
- ``sam``: sharpness-aware minimization (two forward-backward passes per step):
  ``g = ∇L_B(θ)``, then the base step with ``∇L_B(θ + ρ g/‖g‖)``, ``ρ = sam_rho``,
  ``‖g‖`` over every parameter.
- ``flatness(lam=…)``: ``flatkern.optim.FlatnessRegularizedMLP``: the base step on
  ``L_B(θ) + lam · tr ∇²_θ L_B(θ)``, the exact trace on the current minibatch
  ``B``, one value per ``lam`` in ``lams``.

Recorded per run: the test accuracy and loss, the training accuracy and loss (all
of the training set, clean labels), the exact trace of the Hessian of the
full-training-set loss (``flatkern.hessian_trace_of(model, X_train,
loss="cross_entropy")``, over every parameter, biases included) at the start, at
``points`` log-spaced steps and at the end, and the median wall time of a
training step and of one full-training-set trace evaluation (one thread).

For the cross-entropy the output Hessian is ``diag(p) − p pᵀ``, which vanishes as
the predicted probabilities ``p`` become one-hot: a network that fits its
training set more confidently has a smaller trace, so the trace is read beside
the training loss.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .base import (COMMON_FIELDS, INT, NUMBER, OPTIONAL_NUMBER, Experiment, figure_legend, fmt, pyplot, seconds,
                   seeds_phrase, suptitle)
from .recovery import _generator
from .trajectory import log_steps

__all__ = ["DigitsSettings", "DigitsTask", "DIGITS", "BASE_METHODS", "load_split", "make_model", "run_digits",
           "train_digits", "method_name",
           "relu_backend"]

BASE_METHODS = ("sgd", "label_noise", "sam", "flatness")
CLASSES = 10


@dataclass(frozen=True)
class DigitsSettings:
    """One grid's digits runs: the sweep (seeds, lams), the data split, the network and the training budget."""

    seeds: tuple = (0, 1, 2)
    # one flatness run per lam; the trace starts near 150 (init_trace), and at lr = 0.05 lam = 1e-2 diverged
    # (seed 0: NaN after ~500 steps) and lam = 0.1 collapsed the network to a constant output (10% accuracy)
    lams: tuple = (3e-4, 1e-3, 5e-3)
    widths: tuple = (64, 128, 128, 10)
    test_fraction: float = 0.25        # of the 1,797 images, held out (the same split for every seed)
    batch: int = 64
    steps: int = 2000                  # minibatch steps (~95 epochs of the 1,348 training images at batch 64)
    lr: float = 0.05
    momentum: float = 0.9
    label_noise: float = 0.2           # probability that a label is resampled, per sample and step
    sam_rho: float = 0.05
    points: int = 16                   # log-spaced steps at which the full-training-set trace is recorded


def method_name(method: str, lam: float | None) -> str:
    """The record's ``method``: the base method, with its ``lam`` for ``flatness`` (``"flatness(lam=0.01)"``)."""
    return f"flatness(lam={lam:g})" if method == "flatness" else method


@functools.lru_cache(maxsize=4)
def load_split(test_fraction: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(X_train, y_train, X_test, y_test)``: float32 ``(N, 64)`` standardized inputs and int64 ``(N,)`` labels.

    One seeded permutation of the 1,797 images (the same split in every process,
    whatever the seed of the run); the last ``round(test_fraction · 1797)`` are the
    test set.  Each pixel is standardized, ``(x − μ) / σ``, by the training set's
    ``μ`` and ``σ`` (``σ = 1`` for a pixel constant on the training set).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError("the digits experiment needs scikit-learn (sklearn.datasets.load_digits): "
                          "pip install 'flatkern[reproduce]'") from exc
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    images, labels = load_digits(return_X_y=True)
    X = torch.tensor(images, dtype=torch.float64)
    y = torch.tensor(labels, dtype=torch.int64)
    perm = torch.randperm(X.shape[0], generator=_generator("digits", "split"))
    n_test = round(test_fraction * X.shape[0])
    train, test = perm[: X.shape[0] - n_test], perm[X.shape[0] - n_test:]
    mu = X[train].mean(0)
    sigma = X[train].std(0)
    sigma = torch.where(sigma > 0, sigma, torch.ones_like(sigma))  # the border pixels are 0 in almost every image
    X = ((X - mu) / sigma).to(torch.float32)
    return X[train], y[train], X[test], y[test]


def make_model(widths: tuple, seed: int) -> nn.Sequential:
    """``Linear(w_0, w_1), ReLU, ..., Linear(w_{L-1}, w_L)`` in float32, its weights drawn from a generator seeded
    by ``(widths, seed)``: He-normal (std ``√(2/fan_in)``) before a ReLU, LeCun-normal (``√(1/fan_in)``) for the
    output layer, zero biases.  The same network for every method of a seed."""
    g = _generator("digits", "init", tuple(widths), seed)
    modules = []
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        layer = nn.Linear(fan_in, fan_out)
        last = i == len(widths) - 2
        with torch.no_grad():
            layer.weight.copy_(torch.randn(fan_out, fan_in, generator=g) * math.sqrt((1.0 if last else 2.0) / fan_in))
            layer.bias.zero_()
        modules += [layer] if last else [layer, nn.ReLU()]
    return nn.Sequential(*modules)


def _batches(n: int, batch: int, steps: int, generator: torch.Generator):
    """``steps`` index tensors of ``batch`` samples: a fresh permutation each epoch, the last partial batch dropped."""
    per_epoch = n // batch
    done = 0
    while done < steps:
        perm = torch.randperm(n, generator=generator)
        for k in range(min(per_epoch, steps - done)):
            yield perm[k * batch:(k + 1) * batch]
        done += min(per_epoch, steps - done)


def _evaluate(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """``(mean cross-entropy, accuracy)`` of ``model`` on ``(X, y)``."""
    with torch.no_grad():
        logits = model(X)
        return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).double().mean())


def _full_trace(model: nn.Module, X: torch.Tensor, backend: str) -> float:
    """The exact trace of the Hessian of the mean cross-entropy over ``X`` (all parameters, biases included)."""
    from ..nn import hessian_trace_of

    with torch.no_grad():
        return float(hessian_trace_of(model, X, loss="cross_entropy", backend=backend))


def relu_backend(backend: str) -> str:
    """The backend this experiment's traces use: ``"torch"`` (the plain-torch formula), whatever ``backend`` is.

    The records of ``flatkern reproduce`` are the same, byte for byte, on every backend
    (``results.json``; issue 22). Training a network with the trace's gradient amplifies the last
    bits in which the fused ReLU-network kernel (``flatkern::mlp_hessian_trace``) and plain torch
    differ (float32 sums in another order) into the 6th significant digit of the end trace, so this
    experiment keeps to the one formula; the kernel's speed is in ``bench/bench_relu.py`` and its
    agreement with the formula in ``tests/test_mlp_kernels.py``.
    """
    del backend  # every backend gives these records: see above
    return "torch"


def _sam_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, rho: float) -> None:
    """One SAM step: the base optimizer steps with ``∇L(θ + ρ g/‖g‖)``, ``g = ∇L(θ)``, from ``θ``."""
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    scale = rho / (torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) + 1e-12)
    with torch.no_grad():
        ascent = [g * scale for g in grads]
        torch._foreach_add_(params, ascent)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with torch.no_grad():
        torch._foreach_sub_(params, ascent)
    opt.step()


def run_digits(method: str, lam: float | None, seed: int, s: DigitsSettings, backend: str = "auto") -> list[dict]:
    """Train one method from the seed's start; one record (see the module docstring)."""
    return [train_digits(method, lam, seed, s, backend)[1]]


def train_digits(method: str, lam: float | None, seed: int, s: DigitsSettings,
                 backend: str = "auto") -> tuple[nn.Sequential, dict]:
    """``(model, record)``: the network ``method`` trained from the seed's start, and its record.

    ``method``: one of ``BASE_METHODS``; ``lam``: flatness's strength (``None`` for the others).
    ``record["trace"]`` is ``hessian_trace_of(model, X_train, loss="cross_entropy")`` of the returned model.
    """
    from ..optim import FlatnessRegularizedMLP

    backend = relu_backend(backend)
    if method not in BASE_METHODS:
        raise ValueError(f"method must be one of {BASE_METHODS}, got {method!r}")
    if (method == "flatness") != (lam is not None):
        raise ValueError(f"lam is flatness's strength: give it for flatness only, got method={method!r}, lam={lam!r}")
    X, y, X_test, y_test = load_split(s.test_fraction)
    if s.widths[0] != X.shape[1] or s.widths[-1] != CLASSES:
        raise ValueError(f"widths must start at {X.shape[1]} (the pixels) and end at {CLASSES} (the classes), "
                         f"got {s.widths}")
    model = make_model(s.widths, seed)
    if method == "flatness":
        opt = FlatnessRegularizedMLP(model, torch.optim.SGD, lam=lam, loss="cross_entropy", backend=backend,
                                     lr=s.lr, momentum=s.momentum)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=s.lr, momentum=s.momentum)
    order = _generator("digits", "batches", seed)   # the same minibatches for every method of a seed
    noise = _generator("digits", "label_noise", seed)
    at = set(log_steps(s.steps, s.points))
    init_trace = _full_trace(model, X, backend)
    steps, traces, losses, step_times, trace_times = [], [], [], [], []
    for t, idx in enumerate(_batches(X.shape[0], s.batch, s.steps, order), start=1):
        start = time.perf_counter()
        x, labels = X[idx], y[idx]
        if method == "sam":
            _sam_step(model, opt, x, labels, s.sam_rho)
        else:
            if method == "label_noise":
                resample = torch.rand(labels.shape, generator=noise) < s.label_noise
                labels = torch.where(resample, torch.randint(CLASSES, labels.shape, generator=noise), labels)
            opt.zero_grad()
            F.cross_entropy(model(x), labels).backward()
            if method == "flatness":
                opt.step(inputs=x)
            else:
                opt.step()
        step_times.append(time.perf_counter() - start)
        if t in at:
            start = time.perf_counter()
            traces.append(_full_trace(model, X, backend))
            trace_times.append(time.perf_counter() - start)
            steps.append(t)
            losses.append(_evaluate(model, X, y)[0])
    train_loss, train_accuracy = _evaluate(model, X, y)
    test_loss, test_accuracy = _evaluate(model, X_test, y_test)
    return model, dict(
        experiment="digits", method=method_name(method, lam), depth=len(s.widths) - 1, n=X.shape[0], seed=seed,
        lam=lam, widths=list(s.widths), n_test=X_test.shape[0], batch=s.batch,
        steps=steps, traces=traces, losses=losses, init_trace=init_trace, trace=traces[-1],
        train_loss=train_loss, train_accuracy=train_accuracy, test_loss=test_loss, test_accuracy=test_accuracy,
        # wall times (report.is_timing: in timings.json and the summary, not results.json)
        step_seconds=statistics.median(step_times[1:] or step_times),
        trace_seconds=statistics.median(trace_times),
    )


# ---------------------------------------------------------------- the experiment (base.py's protocol)


class DigitsTask(NamedTuple):
    experiment: str        # "digits"
    method: str            # the record's method: "sgd", "label_noise", "sam", "flatness(lam=0.01)"
    lam: float | None      # flatness's lam, None for the others
    seed: int


# every method's colour and marker; flatness darker with larger lam
_STYLE = {"sgd": dict(color="tab:red", marker="o"), "label_noise": dict(color="tab:purple", marker="^"),
          "sam": dict(color="tab:brown", marker="v")}
_BLUES = ("#6baed6", "#3182bd", "#08519c", "#08306b")


def _style(method: str, lam: float | None, lams: list) -> dict:
    if lam is None:
        return _STYLE[method]
    # spread the lams over the blues, the smallest lightest (one lam: the middle blue)
    k = sorted(lams).index(lam)
    return dict(color=_BLUES[round(k * (len(_BLUES) - 1) / (len(lams) - 1)) if len(lams) > 1 else 1], marker="D")


def _g(x: float) -> str:
    """Three significant digits, without an exponent below 1e6 (2010, not 2.01e+03)."""
    return "—" if math.isnan(x) else f"{float(f'{x:.3g}'):g}"


def _log_axis(axis) -> None:
    """A log axis labelled 1, 2, 5, 10, 20, ... in plain numbers: the default minor labels (3×10⁰, 4×10⁰) overlap
    on an axis that spans less than a decade or two."""
    from matplotlib import ticker

    axis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(ticker.NullFormatter())


class Digits(Experiment):
    """ReLU MLPs on scikit-learn's digits: test accuracy and the exact training-loss trace, per method."""

    name = "digits"
    figure_name = "digits.png"
    Task = DigitsTask
    axes = ("seeds",)  # the network and the data are fixed: no size, rank, depth or n to sweep

    def sweep(self, s: DigitsSettings, axes: dict) -> DigitsSettings:
        return replace(s, seeds=axes.get("seeds", s.seeds))

    settings = {
        "quick": DigitsSettings(seeds=(0,), lams=(1e-2,), widths=(64, 32, 10), steps=300, points=8),
        "default": DigitsSettings(),
        "full": DigitsSettings(seeds=(0, 1, 2, 3, 4), lams=(1e-4, 3e-4, 1e-3, 3e-3, 5e-3), steps=6000, points=24),
    }
    fields = dict(COMMON_FIELDS, depth=INT, n=INT, lam=OPTIONAL_NUMBER, widths=(list,), n_test=INT, batch=INT,
                  steps=(list,), traces=(list,), losses=(list,), init_trace=NUMBER, trace=NUMBER, train_loss=NUMBER,
                  train_accuracy=NUMBER, test_loss=NUMBER, test_accuracy=NUMBER)

    def tasks(self, s: DigitsSettings) -> list[DigitsTask]:
        runs = [(m, None) for m in BASE_METHODS if m != "flatness"] + [("flatness", lam) for lam in s.lams]
        return [DigitsTask(self.name, method_name(m, lam), lam, seed) for seed in s.seeds for m, lam in runs]

    def methods(self, task: DigitsTask) -> tuple[str, ...]:
        return (task.method,)

    def run(self, task: DigitsTask, s: DigitsSettings, backend: str) -> list[dict]:
        base = "flatness" if task.lam is not None else task.method
        return run_digits(base, task.lam, task.seed, s, backend)

    def cost(self, task: DigitsTask, s: DigitsSettings) -> float:
        # measured on one thread (default grid, 2 workers on 2 busy cores), 64-128-128-10 at batch 64: a step
        # 0.3 ms (sgd, label_noise), 0.6 ms (sam), 2-3 ms (flatness); a full-training-set trace and loss ~30 ms.
        # Scaled by the weights' count; 60 s for the default grid's 18 tasks.
        size = sum(a * b for a, b in zip(s.widths[:-1], s.widths[1:])) / 25856
        step = {"sgd": 3e-4, "label_noise": 3.2e-4, "sam": 6.4e-4}.get(task.method, 2.4e-3)
        return size * (step * s.steps * s.batch / 64 + 0.03 * (s.points + 1)) + 0.1

    def table(self, records: list[dict]) -> dict:
        """``{method: [record per seed]}``, methods in task order."""
        table = defaultdict(list)
        for r in records:
            table[r["method"]].append(r)
        return dict(table)

    def summary_section(self, records: list[dict]) -> list[str]:
        table = self.table(records)
        first = records[0]
        seeds = sorted({r["seed"] for r in records})
        widths = "-".join(str(w) for w in first["widths"])
        last = max(first["steps"])
        sgd = table.get("sgd")
        lines = [
            "## digits: ReLU MLPs on scikit-learn's handwritten digits",
            "",
            f"`sklearn.datasets.load_digits`: {first['n']} training and {first['n_test']} test images (one fixed "
            f"split), standardized pixels; a {widths} ReLU MLP, {last} steps of minibatch SGD (batch {first['batch']}, "
            "heavy ball, constant step) on the cross-entropy, every method from the same start and minibatches "
            "per seed. `trace` = the exact trace of the Hessian of the full-training-set loss "
            "(`flatkern.hessian_trace_of`, all parameters), at the end; for the cross-entropy it shrinks as the "
            "predictions grow confident (near zero loss each sample's output Hessian is roughly proportional to "
            "its loss), so read it beside the training loss: `trace / train loss` compares flatness at equal fit. "
            f"{seeds_phrase(len(seeds))}`digits.png`: test accuracy against the final trace, and the trace along "
            "training.",
            "",
            "| method | test accuracy | trace (end) | trace / sgd's | train loss | trace / train loss | train accuracy | "
            "test loss | step | step / sgd step |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        mean = lambda rs, k: statistics.fmean(r[k] for r in rs)  # noqa: E731
        timed = all("step_seconds" in r for r in records)  # not when read back from results.json
        for method, rs in table.items():
            ratio = fmt(mean(rs, "trace") / mean(sgd, "trace")) if sgd else "—"
            step = seconds(mean(rs, "step_seconds")) if timed else "—"
            step_ratio = (f"{mean(rs, 'step_seconds') / mean(sgd, 'step_seconds'):.2f}×" if timed and sgd else "—")
            spread = (f" ± {statistics.stdev(r['test_accuracy'] for r in rs):.3f}" if len(rs) > 1 else "")
            lines.append(f"| {method} | {mean(rs, 'test_accuracy'):.3f}{spread} | {fmt(mean(rs, 'trace'))} | {ratio} | "
                         f"{mean(rs, 'train_loss'):.1e} | {_g(mean(rs, 'trace') / mean(rs, 'train_loss'))} | "
                         f"{mean(rs, 'train_accuracy'):.3f} | "
                         f"{mean(rs, 'test_loss'):.3f} | {step} | {step_ratio} |")
        lines.append("")
        lines.append(f"The trace at the start (the same for every method): {fmt(mean(records, 'init_trace'))}."
                     + (f" One exact full-training-set trace ({first['n']} images) took "
                        f"{seconds(statistics.median(r['trace_seconds'] for r in records))} (median, one thread)."
                        if timed else ""))
        lines += ["", *self._findings(table), ""]
        return lines

    def _findings(self, table: dict) -> list[str]:
        """What the table shows, in words, computed from the records (whichever way it falls)."""
        if "sgd" not in table:
            return []
        mean = lambda rs, k: statistics.fmean(r[k] for r in rs)  # noqa: E731
        sgd = table["sgd"]
        base_acc, base_trace = mean(sgd, "test_accuracy"), mean(sgd, "trace")
        words = []
        for method, rs in table.items():
            if method == "sgd":
                continue
            acc, trace = mean(rs, "test_accuracy"), mean(rs, "trace")
            pairs = [(r, b) for r in rs for b in sgd if b["seed"] == r["seed"]]
            side = "lower" if trace < base_trace else "higher"
            agree = sum((r["trace"] < b["trace"]) == (side == "lower") for r, b in pairs)
            per_loss = mean(rs, "trace") / mean(rs, "train_loss") / (base_trace / mean(sgd, "train_loss"))
            step = (f", a step {mean(rs, 'step_seconds') / mean(sgd, 'step_seconds'):.1f}× sgd's"
                    if "step_seconds" in rs[0] and "step_seconds" in sgd[0] else "")
            words.append(f"`{method}`: trace {trace / base_trace:.2f}× sgd's ({side} on {agree} of {len(pairs)} seeds), "
                         f"trace / train loss {per_loss:.2f}× sgd's, test accuracy {acc - base_acc:+.3f}{step}")
        return ["Against `sgd` (means over seeds): " + "; ".join(words) + "."]

    def figure(self, records: list[dict]):
        """Three panels: test accuracy against the final trace (a point per seed); the final trace against the final
        training loss (a point per seed, a dashed line at sgd's ratio); the trace along training (the first seed)."""
        plt = pyplot()
        table = self.table(records)
        lams = sorted({r["lam"] for r in records if r["lam"] is not None})
        fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.8))
        for method, rs in table.items():
            style = _style("flatness" if rs[0]["lam"] is not None else method, rs[0]["lam"], lams)
            points = dict(label=method, s=36, color=style["color"], marker=style["marker"], edgecolors="black",
                          linewidths=0.4)
            left.scatter([r["trace"] for r in rs], [r["test_accuracy"] for r in rs], **points)
            middle.scatter([r["train_loss"] for r in rs], [r["trace"] for r in rs], **points)
            first = min(rs, key=lambda r: r["seed"])
            right.plot(first["steps"], first["traces"], markersize=3, label=method, **style)
        left.set_xscale("log")
        _log_axis(left.xaxis)
        left.set_xlabel("exact trace of the training-loss Hessian, end")
        left.set_ylabel("test accuracy")
        left.set_title("test accuracy vs final trace")
        if "sgd" in table:
            # near zero loss the cross-entropy's trace is roughly proportional to the loss: the line is sgd's ratio
            ratio = statistics.fmean(r["trace"] / r["train_loss"] for r in table["sgd"])
            lo, hi = min(r["train_loss"] for r in records), max(r["train_loss"] for r in records)
            middle.plot([lo, hi], [ratio * lo, ratio * hi], color="gray", linestyle="--", linewidth=1.0,
                        label=f"trace = {_g(ratio)} × train loss (sgd's ratio)")
        middle.set_xscale("log")
        middle.set_yscale("log")
        _log_axis(middle.yaxis)
        middle.set_xlabel("training loss (cross-entropy, all training images), end")
        middle.set_ylabel("exact trace of the training-loss Hessian, end")
        middle.set_title("final trace vs final training loss")
        seed = min(r["seed"] for r in records)
        right.set_xscale("log")
        right.set_yscale("log")
        _log_axis(right.yaxis)
        right.set_xlabel("training step")
        right.set_ylabel("exact trace of the training-loss Hessian")
        right.set_title(f"trace along training (seed {seed})")
        for ax in (left, middle, right):
            ax.grid(True, which="both", alpha=0.3)
        first = records[0]
        seeds = len({r["seed"] for r in records})
        suptitle(fig, f"ReLU MLP {'-'.join(str(w) for w in first['widths'])} on scikit-learn digits "
                      f"({first['n']} training images, {seeds} seed{'s' if seeds > 1 else ''}, a point per seed): "
                      "exact trace of the full-training-set cross-entropy Hessian")
        figure_legend(fig, [left, middle, right])
        return fig


DIGITS = Digits()
