"""The ``training_trace`` experiment (issue 20 §1): the theorem on the training loss, against cvxpy.

With ``x*`` the zero-loss factorization of least training-loss trace and ``X`` the
convex optimum, ``‖E(x*)‖_* ≤ ((1 + δ)/(1 − δ))^{L/(2L−2)} ‖X‖_*`` under (1, δ)-RIP
(docs/MATH.md).  δ is estimated from below (``rip_constant_lower_estimate``), so a
ratio within the factor of the estimate is within the theorem's.

Gaussian measurements reach δ < 1 only once ``n`` is several times ``d_0 + d_L``,
which at sizes a test can afford is above ``d_0 d_L``: there ``A(E) = b`` has one
solution, and the ratio is 1 if and only if the solve is feasible and found it.
Below that (δ̂ ≥ 1, the factor infinite) the test holds the solution to the
instance factor of the module docstring, the theorem's chain of inequalities
with the RIP inequality used only at the two solutions found.
"""

from __future__ import annotations

import math

import pytest
import torch

from flatkern.experiments.base import COMMON_FIELDS
from flatkern.experiments.training_trace import (METHODS, TRAINING_TRACE, TrainingTraceGrid, TrainingTraceSettings,
                                                 run_convex, run_solutions)
from flatkern.theory import rip_nuclear_norm_factor

pytest.importorskip("cvxpy")

SETTINGS = TrainingTraceSettings()
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _solve(d: int, rank: int, depth: int, n: int) -> tuple[dict, dict, dict]:
    """``(training_trace record, isotropic_trace record, nuclear_norm record)`` of one problem, seed 0."""
    (convex,) = run_convex(d, rank, n, 0)
    isotropic, training = run_solutions(d, rank, depth, n, 0, SETTINGS, "torch")
    assert (isotropic["method"], training["method"]) == ("isotropic_trace", "training_trace")
    assert convex["converged"] and convex["feasibility"] < 1e-6, convex
    return training, isotropic, convex


@pytest.mark.parametrize("n, depth, delta_below", [(100, 2, 1.0), (150, 3, 1.0), (800, 2, 0.3), (800, 4, 0.3)])
def test_training_trace_solution_is_within_the_theorems_factor_of_the_convex_optimum(n, depth, delta_below):
    """3 × 3, rank 1: δ̂ < 1 (finite factor) from n ≈ 100, δ̂ < 0.3 at n = 800; the ratio within factor(δ̂),
    and within 0.2% where δ̂ < 0.3."""
    training, _, convex = _solve(3, 1, depth, n)
    delta = training["delta"]
    assert delta < delta_below, f"δ̂ = {delta} at n = {n}: the case no longer tests what it says"
    factor = rip_nuclear_norm_factor(delta, depth)
    assert training["factor"] == pytest.approx(factor, rel=1e-12)
    assert training["feasibility"] <= 1e-6, training
    ratio = training["nuclear_norm"] / convex["nuclear_norm"]
    # the convex optimum is the least nuclear norm of any interpolator: the ratio is >= 1 up to the solves' residuals
    assert 1 - 1e-6 <= ratio <= factor, (ratio, factor, delta)
    if delta < 0.3:
        assert ratio <= 1.002, (ratio, delta)


@pytest.mark.parametrize("depth", [2, 3])
def test_below_the_recovery_threshold_the_factor_is_vacuous_and_the_instance_factor_holds(depth):
    """8 × 8, rank 1, n = 24 (below exact recovery): δ̂ ≥ 1, so ``factor`` is None; the training-trace solution is
    feasible, no flatter in the training trace than the isotropic one, and within the instance factor."""
    training, isotropic, convex = _solve(8, 1, depth, 24)
    assert training["delta"] >= 1 and training["factor"] is None and isotropic["factor"] is None
    with pytest.raises(ValueError, match="delta"):
        rip_nuclear_norm_factor(training["delta"], depth)
    assert training["feasibility"] <= 1e-6 and isotropic["feasibility"] <= 1e-6
    assert convex["rel_error"] > 0.05  # below the threshold: the instance is not the trivial one
    # x* is the flattest in the training trace; W_iso is the flattest in the isotropic one, at ‖X‖_*
    assert training["trace"] <= isotropic["trace"] * (1 + 1e-6)
    assert isotropic["ratio"] == pytest.approx(1.0, abs=1e-5)
    assert isotropic["nuclear_norm"] == pytest.approx(convex["nuclear_norm"], rel=1e-5)
    ratio = training["nuclear_norm"] / convex["nuclear_norm"]
    rho_iso = isotropic["trace"] / isotropic["trace_isotropic"]
    rho_train = training["trace"] / training["trace_isotropic"]
    expected = (rho_iso / rho_train) ** (depth / (2 * depth - 2))
    assert training["instance_factor"] == pytest.approx(expected, rel=1e-12)
    assert 1 - 1e-6 <= ratio <= training["instance_factor"] * (1 + 1e-6), (ratio, training["instance_factor"])


def test_the_experiment_on_a_tiny_grid_writes_its_declared_records_and_report():
    grid = TrainingTraceGrid(problems=((4, 1, (12,)),), depths=(2,), budget=TrainingTraceSettings(solution_max_outer=20))
    tasks = TRAINING_TRACE.tasks(grid)
    assert [tuple(t) for t in tasks] == [("training_trace", "nuclear_norm", 4, 1, None, 12, 0),
                                         ("training_trace", "solutions", 4, 1, 2, 12, 0)]
    records = []
    for task in tasks:
        out = TRAINING_TRACE.run(task, grid, "torch")
        assert [r["method"] for r in out] == list(TRAINING_TRACE.methods(task))
        for r in out:
            for name, types in TRAINING_TRACE.fields.items():
                assert name in r and isinstance(r[name], types), (r["method"], name, r.get(name))
            key = task._asdict()
            assert all(r[k] == key[k] for k in ("experiment", "depth", "n", "seed", "d", "rank"))
        records += out
    assert set(COMMON_FIELDS) <= set(TRAINING_TRACE.fields)
    assert {r["method"] for r in records} == set(METHODS)
    by = {r["method"]: r for r in records}
    assert by["nuclear_norm"]["depth"] is None and by["nuclear_norm"]["delta"] is None
    assert by["training_trace"]["delta"] == by["isotropic_trace"]["delta"] > 0
    assert (by["training_trace"]["factor"] is None) == (by["training_trace"]["delta"] >= 1)
    assert math.isfinite(by["training_trace"]["instance_factor"]) and by["isotropic_trace"]["instance_factor"] is None
    row = TRAINING_TRACE.table(records)[(4, 1, 2, 12)]
    assert row["training_trace"] == pytest.approx(by["training_trace"]["nuclear_norm"] / by["nuclear_norm"]["nuclear_norm"])
    summary = "\n".join(TRAINING_TRACE.summary_section(records))
    assert "| 4 × 4, 1 | 2 | 12 |" in summary and "Isotropic trace: equal" in summary
