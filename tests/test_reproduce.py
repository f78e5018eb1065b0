"""`flatkern reproduce`: the pieces are right, and the --quick run shows what the theory says.

The science claims (issue 6) are checked on the records of one `--quick` run:
training finds the flattest factorization, and on Gaussian sensing flatness
regularization recovers the low-rank matrix where gradient descent does not.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

import flatkern as fk
from flatkern.experiments import GRIDS, run_task, tasks_of
from flatkern.experiments.baselines import balanced_factorization, nuclear_norm_solution
from flatkern.experiments.recovery import RecoverySettings, make_problem
from flatkern.experiments.report import FIGURES
from flatkern.experiments.training import curvature_bound, kernel_norm, standard_init

REPO = Path(__file__).resolve().parents[1]
REQUIRED_KEYS = {"experiment", "method", "depth", "n", "seed", "rel_error", "ratio"}


def _low_rank(d_L, d_0, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d_L, r, generator=g, dtype=torch.float64) @ torch.randn(r, d_0, generator=g, dtype=torch.float64)


# ---------------------------------------------------------------- the pieces


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_balanced_factorization_reproduces_m_with_equal_layer_spectra(depth):
    M = _low_rank(6, 5, 2)
    widths = [5] + [4] * (depth - 1) + [6]
    W = balanced_factorization(M, widths)
    torch.testing.assert_close(fk.end_to_end(W, backend="torch"), M)
    S = torch.linalg.svdvals(M)[:2]
    for w in W:  # every layer carries Σ^{1/L}: the balanced (and weight-decay-optimal) point
        torch.testing.assert_close(torch.linalg.svdvals(w)[:2], S ** (1 / depth))


def test_balanced_factorization_is_not_the_flattest_at_depth_three():
    M = _low_rank(6, 6, 2)
    W = balanced_factorization(M, [6, 6, 6, 6])
    ratio = fk.hessian_trace(W, fk.Isotropic(), backend="torch") / fk.flatness_lower_bound(M, 3)
    assert ratio > 1.05


@pytest.mark.parametrize("family", ["dense", "entries"])
def test_kernel_norm_is_the_top_eigenvalue_of_the_measurement_kernel(family):
    d, n = 4, 9
    g = torch.Generator().manual_seed(0)
    if family == "dense":
        meas = fk.Dense.gaussian(n, (d, d), generator=g, dtype=torch.float64)
        A = meas.A.reshape(n, -1)
    else:
        meas = fk.Entries(torch.tensor([0, 1, 1, 3, 1]), torch.tensor([2, 0, 0, 3, 0]), (d, d))
        A = torch.zeros(meas.n, d * d, dtype=torch.float64)
        A[torch.arange(meas.n), meas.rows * d + meas.cols] = 1.0
    K = A.T @ A / meas.n
    assert kernel_norm(meas) == pytest.approx(float(torch.linalg.eigvalsh(K)[-1]), rel=1e-10)


@pytest.mark.parametrize("depth", [2, 3])
def test_curvature_bound_is_above_the_gauss_newton_sharpness(depth):
    d, n = 4, 7
    g = torch.Generator().manual_seed(depth)
    meas = fk.Dense.gaussian(n, (d, d), generator=g, dtype=torch.float64)
    W = [w.detach() for w in standard_init([d] * (depth + 1), generator=g)]

    def predictions(*ws):
        return meas.predict(fk.end_to_end(list(ws), backend="torch"))

    J = torch.cat([j.reshape(n, -1) for j in torch.autograd.functional.jacobian(predictions, tuple(W))], dim=1)
    sharpness = float(torch.linalg.eigvalsh(2 * J.T @ J / n)[-1])  # Hessian of the mean MSE at zero loss
    bound = float(curvature_bound(W, kernel_norm(meas)))
    assert sharpness <= bound
    assert bound < 50 * sharpness  # and not uselessly loose


@pytest.mark.parametrize("family", ["sensing", "completion"])
def test_nuclear_norm_solution_interpolates_and_beats_the_truth(family):
    settings = RecoverySettings(d=8, rank=1)
    M, meas, b = make_problem(family, 30, 0, settings)
    X = nuclear_norm_solution(meas, b, tuple(M.shape))
    torch.testing.assert_close(meas.predict(X), b, atol=1e-6, rtol=1e-6)
    # M* is feasible, so the minimizer's nuclear norm cannot exceed it
    assert torch.linalg.matrix_norm(X, ord="nuc") <= torch.linalg.matrix_norm(M, ord="nuc") * (1 + 1e-6)


def test_nuclear_norm_solution_is_exact_when_every_entry_is_observed():
    M = _low_rank(5, 4, 2)
    rows, cols = torch.meshgrid(torch.arange(5), torch.arange(4), indexing="ij")
    meas = fk.Entries(rows.reshape(-1), cols.reshape(-1), (5, 4))
    torch.testing.assert_close(nuclear_norm_solution(meas, meas.predict(M), (5, 4)), M, atol=1e-6, rtol=1e-6)


def test_problem_is_shared_by_depths_and_methods_and_differs_across_seeds():
    settings = RecoverySettings(d=6, rank=1)
    M0, meas0, _ = make_problem("sensing", 10, 0, settings)
    M0b, meas0b, _ = make_problem("sensing", 10, 0, settings)
    M1, _, _ = make_problem("sensing", 10, 1, settings)
    assert torch.equal(M0, M0b) and torch.equal(meas0.A, meas0b.A)
    assert not torch.equal(M0, M1)
    assert M0.norm() == pytest.approx(6**0.5)
    assert int((torch.linalg.svdvals(M0) > 1e-10).sum()) == 1


def test_a_task_gives_the_same_records_when_run_twice():
    grid = GRIDS["quick"]
    task = next(t for t in tasks_of(grid) if t[0] == "flattest" and t[3] == 2)
    assert run_task(task, grid, "torch") == run_task(task, grid, "torch")


# ---------------------------------------------------------------- the --quick run


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick")
    proc = subprocess.run(
        [sys.executable, "-m", "flatkern", "reproduce", "--quick", "--out", str(out), "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text()), proc.stdout


def test_quick_run_writes_results_summary_and_figures(quick_run):
    out, records, stdout = quick_run
    for name in ["results.json", "summary.md", *FIGURES.values()]:
        assert (out / name).stat().st_size > 0, name
    assert (out / "summary.md").read_text().strip() in stdout  # the summary is also printed
    assert (out / FIGURES["sensing"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_records_follow_the_results_contract(quick_run):
    _, records, _ = quick_run
    assert {r["experiment"] for r in records} == {"flattest", "sensing", "completion"}
    for r in records:
        assert REQUIRED_KEYS <= set(r), r
        if r["experiment"] == "flattest":
            assert r["n"] is None and r["rel_error"] is None and r["ratio"] >= 1 - 1e-6
        else:
            assert isinstance(r["n"], int) and r["rel_error"] >= 0
    methods = {(r["experiment"], r["method"]) for r in records}
    for m in ("flatness", "balanced", "weight_decay"):
        assert ("flattest", m) in methods
    for m in ("gd", "gd_small_init", "flatness", "nuclear_norm", "label_noise"):
        assert ("sensing", m) in methods and ("completion", m) in methods


def test_training_finds_the_flattest_factorization(quick_run):
    _, records, _ = quick_run
    flat = [r for r in records if r["experiment"] == "flattest" and r["method"] == "flatness"]
    assert flat
    for r in flat:
        assert abs(r["ratio"] - 1) <= 0.05, r
    # and the balanced factorization is measurably not the flattest for depth >= 3
    for r in records:
        if r["experiment"] == "flattest" and r["method"] == "balanced" and r["depth"] >= 3:
            assert r["ratio"] > 1.05, r


def _mean_errors(records, experiment):
    errors = defaultdict(list)
    for r in records:
        if r["experiment"] == experiment:
            errors[(r["method"], r["depth"], r["n"])].append(r["rel_error"])
    return {k: sum(v) / len(v) for k, v in errors.items()}


def test_flatness_recovers_where_gradient_descent_does_not(quick_run):
    _, records, _ = quick_run
    errors = _mean_errors(records, "sensing")
    n = max(r["n"] for r in records if r["experiment"] == "sensing")
    depths = sorted({k[1] for k in errors if k[0] == "flatness"})
    assert depths
    for depth in depths:
        assert errors[("flatness", depth, n)] <= 0.5 * errors[("gd", depth, n)], depth


def test_flatness_matches_nuclear_norm_where_the_convex_program_recovers(quick_run):
    _, records, _ = quick_run
    errors = _mean_errors(records, "sensing")
    checked = 0
    for (method, depth, n), err in errors.items():
        if method == "flatness" and errors[("nuclear_norm", None, n)] < 0.01:
            assert err <= 0.05, (depth, n, err)
            checked += 1
    assert checked > 0  # the quick grid must contain a point where nuclear norm recovers


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not installed")
def test_torchrun_two_processes_write_the_same_results(quick_run, tmp_path):
    out, records, _ = quick_run
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        ["torchrun", "--standalone", "--nproc_per_node=2", "-m", "flatkern", "reproduce", "--quick",
         "--out", str(tmp_path), "--no-progress", "--quiet"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in out.iterdir())
    assert json.loads((tmp_path / "results.json").read_text()) == records
    assert "on 2 process(es)" in (tmp_path / "summary.md").read_text()
