"""The ``digits`` experiment (issue 19 item 5): ReLU MLPs on scikit-learn's digits, on a tiny budget.

The records have the declared fields (the journal's own check), the recorded end
trace is ``hessian_trace_of`` of the trained network and the trace of its autograd
Hessian, and a task's records depend only on its key: the same on a rerun and on
either backend.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("sklearn", reason="the digits experiment needs scikit-learn (the reproduce extra)")

from flatkern import hessian_trace_of  # noqa: E402
from flatkern.experiments import experiments  # noqa: E402
from flatkern.experiments.digits import (BASE_METHODS, DIGITS, DigitsSettings, load_split, make_model,  # noqa: E402
                                         method_name, run_digits, train_digits)
from flatkern.experiments.journal import _problem  # noqa: E402
from flatkern.experiments.report import results_of, without_timings  # noqa: E402

TINY = DigitsSettings(seeds=(0, 1), lams=(1e-2,), widths=(64, 8, 10), batch=32, steps=30, points=5)


@pytest.fixture(scope="module")
def tiny_records():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {task: DIGITS.run(task, TINY, "auto") for task in DIGITS.tasks(TINY)}
    finally:
        torch.set_num_threads(threads)


def test_digits_is_registered_and_lists_every_method_per_seed():
    assert experiments()["digits"] is DIGITS
    tasks = DIGITS.tasks(TINY)
    assert [(t.method, t.lam, t.seed) for t in tasks] == [
        (m, lam, seed) for seed in (0, 1) for m, lam in (("sgd", None), ("label_noise", None), ("sam", None),
                                                          ("flatness(lam=0.01)", 0.01))]
    assert method_name("flatness", 1e-3) == "flatness(lam=0.001)" and method_name("sam", None) == "sam"
    # the default grid: every base method, several seeds and lams
    default = DIGITS.settings["default"]
    assert len(default.seeds) >= 3 and len(default.lams) >= 3
    assert {t.method.split("(")[0] for t in DIGITS.tasks(default)} == set(BASE_METHODS)


def test_tiny_run_gives_records_with_the_declared_fields(tiny_records):
    for task, records in tiny_records.items():
        # exactly the check the journal applies to a record set (methods, fields, types, the task's key)
        assert _problem({"records": json.loads(json.dumps(records))}, task, DIGITS) is None, task
        (r,) = records
        assert set(r) == set(DIGITS.fields) | {"step_seconds", "trace_seconds"}
        assert r["steps"][0] == 1 and r["steps"][-1] == TINY.steps and len(r["steps"]) == len(r["traces"]) == len(r["losses"])
        assert r["trace"] == r["traces"][-1] and r["train_loss"] == r["losses"][-1]
        assert r["n"] + r["n_test"] == 1797 and r["depth"] == 2 and r["lam"] == task.lam
        assert all(t > 0 and t == t for t in r["traces"]) and 0 < r["test_accuracy"] <= 1
        assert r["step_seconds"] > 0 and r["trace_seconds"] > 0
    # 30 steps already learn the digits far above chance (10%)
    assert all(rs[0]["test_accuracy"] > 0.5 for rs in tiny_records.values())


def test_every_method_of_a_seed_starts_from_the_same_network(tiny_records):
    for seed in TINY.seeds:
        starts = {rs[0]["init_trace"] for t, rs in tiny_records.items() if t.seed == seed}
        assert len(starts) == 1, starts
        first = [rs[0]["traces"][0] for t, rs in tiny_records.items() if t.seed == seed]
        assert len(set(first)) == len(first)  # and the methods differ from the first step on
    a, b = make_model(TINY.widths, 0), make_model(TINY.widths, 0)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a[0].weight, make_model(TINY.widths, 1)[0].weight)


def test_recorded_end_trace_is_hessian_trace_of_the_trained_network(one_thread):
    X, y, X_test, y_test = load_split(TINY.test_fraction)
    for method, lam in (("flatness", 1e-2), ("label_noise", None)):
        model, r = train_digits(method, lam, 0, TINY, "auto")
        with torch.no_grad():
            # the experiment's traces are the plain-torch formula's on every backend (digits.relu_backend)
            assert r["trace"] == float(hessian_trace_of(model, X, loss="cross_entropy", backend="torch"))
            assert r["test_accuracy"] == float((model(X_test).argmax(1) == y_test).double().mean())
            assert r["train_loss"] == float(F.cross_entropy(model(X), y))
        # and that is the trace of the Hessian of the training loss over every parameter (autograd, float64)
        model = model.double()
        names = [name for name, _ in model.named_parameters()]
        params = tuple(p.detach() for p in model.parameters())
        X64 = X.double()

        def loss(*ps):
            out = torch.func.functional_call(model, dict(zip(names, ps)), (X64,))
            return F.cross_entropy(out, y)

        blocks = torch.func.hessian(loss, argnums=tuple(range(len(params))))(*params)
        exact = sum(float(torch.diagonal(blocks[k][k].reshape(p.numel(), p.numel())).sum()) for k, p in enumerate(params))
        assert r["trace"] == pytest.approx(exact, rel=1e-5), method


def test_rerun_and_either_backend_give_identical_records(tiny_records, one_thread):
    for task in DIGITS.tasks(TINY)[:4]:  # seed 0, every method
        again = DIGITS.run(task, TINY, "auto")
        assert without_timings(again) == without_timings(tiny_records[task]), task
        torch_only = DIGITS.run(task, TINY, "torch")
        assert results_of(torch_only) == results_of(tiny_records[task]), task
    # every backend's records are plain torch's here (digits.relu_backend)
    from flatkern.ops import available_backends

    for kernel in set(available_backends("cpu")) - {"auto", "torch"}:
        task = DIGITS.tasks(TINY)[3]  # flatness: the backend reaches the optimizer too
        assert results_of(DIGITS.run(task, TINY, kernel)) == results_of(tiny_records[task]), kernel
    # and the seed matters
    by_seed = {t.seed: rs[0]["traces"] for t, rs in tiny_records.items() if t.method == "sgd"}
    assert by_seed[0] != by_seed[1]


def test_the_split_is_fixed_disjoint_and_standardized_on_the_training_set():
    X, y, X_test, y_test = load_split(0.25)
    assert X.shape == (1348, 64) and X_test.shape == (449, 64) and X.dtype == torch.float32
    assert y.dtype == torch.int64 and set(y.tolist()) == set(range(10)) == set(y_test.tolist())
    assert torch.allclose(X.mean(0), torch.zeros(64), atol=1e-5)
    spread = X.double().std(0)
    assert torch.all(((spread - 1).abs() < 1e-4) | (spread == 0))  # a pixel constant on the training set stays 0
    # no test image is also a training image (the digits set has no exact duplicates across the split)
    assert not (torch.cdist(X_test.double(), X.double()).min(1).values == 0).any()
    load_split.cache_clear()
    X2, *_ = load_split(0.25)
    assert torch.equal(X, X2)


def test_bad_arguments_raise_naming_them():
    with pytest.raises(ValueError, match="method must be one of"):
        run_digits("adam", None, 0, TINY)
    with pytest.raises(ValueError, match="lam is flatness's strength"):
        run_digits("sgd", 1e-2, 0, TINY)
    with pytest.raises(ValueError, match="lam is flatness's strength"):
        run_digits("flatness", None, 0, TINY)
    with pytest.raises(ValueError, match="widths must start at 64"):
        run_digits("sgd", None, 0, DigitsSettings(widths=(32, 10)))
    with pytest.raises(ValueError, match="test_fraction"):
        load_split(1.5)


def test_without_sklearn_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import fails as if scikit-learn were absent
    load_split.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"scikit-learn.*flatkern\[reproduce\]"):
            load_split(0.3)
    finally:
        load_split.cache_clear()


def test_summary_and_figure_from_records_with_and_without_wall_times(tiny_records):
    records = [r for rs in tiny_records.values() for r in rs]
    for rs in (records, results_of(records)):  # results.json holds no wall times
        lines = DIGITS.summary_section(rs)
        text = "\n".join(lines)
        assert lines[0].startswith("## digits")
        for method in ("sgd", "label_noise", "sam", "flatness(lam=0.01)"):
            assert f"| {method} |" in text, method
        fig = DIGITS.figure(rs)
        assert fig is not None
        labels = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
        assert labels[:4] == ["sgd", "label_noise", "sam", "flatness(lam=0.01)"] and "sgd's ratio" in labels[4]
        assert len(fig.axes) == 3 and all(ax.get_xlabel() and ax.get_ylabel() for ax in fig.axes)
        import matplotlib.pyplot as plt

        plt.close(fig)
