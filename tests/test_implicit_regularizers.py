"""Issue 20 §3: the implicit regularizers as the theory defines them (``training.train_sgd``) and the trajectory
experiment that measures them; §2: the grid's axes (``Experiment.sweep``, ``custom_grid``) and the budget that
leaves unaffordable problems out.

The trainers are checked against plain autograd on the formulas of their docstrings, in float64: one 1-SAM step
is the mean of the per-example gradients at the per-example ascent points, one label-noise SGD step is the
gradient of the noisy minibatch loss.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flatkern.experiments import GRIDS, custom_grid, experiments
from flatkern.experiments.base import budget_lines, swept_problems, within_budget
from flatkern.experiments.recovery import LITERATURE, SENSING, RecoveryGrid, RecoverySettings
from flatkern.experiments.trajectory import (METHODS, TRAJECTORY, TrajectorySettings, run_trajectory,
                                             still_moving)
from flatkern.experiments.training import (StepSize, curvature_bound, kernel_norm, minibatch_kernel_norm, predict_at,
                                           standard_init, train_sgd)
from flatkern.measurements import Dense, Entries

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _problem(family: str, n: int, d_L: int, d_0: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if family == "dense":
        meas = Dense(torch.randn(n, d_L, d_0, generator=g, dtype=torch.float64))
    else:
        meas = Entries(torch.randint(d_L, (n,), generator=g), torch.randint(d_0, (n,), generator=g), (d_L, d_0))
    M = torch.randn(d_L, 1, generator=g, dtype=torch.float64) @ torch.randn(1, d_0, generator=g, dtype=torch.float64)
    return meas, meas.predict(M)


def _chain(weights):
    E = weights[0]
    for w in weights[1:]:
        E = w @ E
    return E


@settings(max_examples=20, deadline=None)
@given(family=st.sampled_from(["dense", "entries"]), n=st.integers(1, 9), d_L=st.integers(1, 5), d_0=st.integers(1, 5),
       chains=st.integers(1, 3), batch=st.integers(1, 4), shared=st.booleans())
def test_predict_at_is_predict_on_the_indexed_measurements(family, n, d_L, d_0, chains, batch, shared):
    meas, _ = _problem(family, n, d_L, d_0)
    g = torch.Generator().manual_seed(1)
    index = torch.randint(n, (chains, batch), generator=g)
    E = torch.randn(chains, *(() if shared else (batch,)), d_L, d_0, generator=g, dtype=torch.float64)
    got = predict_at(meas, E, index)
    for c in range(chains):
        for k in range(batch):
            full = meas.predict(E[c] if shared else E[c, k])
            assert got[c, k] == pytest.approx(float(full[index[c, k]]), rel=1e-12, abs=1e-12)


def _one_step(weights, meas, b, *, label_noise=0.0, one_sam=0.0, batch=3, eta=0.7, kappa_batch=5.0, seed=0):
    W = [w.clone().requires_grad_() for w in weights]
    train_sgd(W, meas, b, steps=1, batch_size=batch, eta=eta, kappa_batch=kappa_batch, label_noise=label_noise,
              one_sam=one_sam, generator=torch.Generator().manual_seed(seed), backend="torch")
    return [w.detach() for w in W]


def _expected_step(weights, meas, b, draw, *, eta, kappa_batch):
    """``W − (eta / S_B(W)) g`` for the ``g`` that ``draw(W, index, generator)`` computes, with train_sgd's draws."""
    g = torch.Generator().manual_seed(0)
    lr = StepSize(kappa_batch, torch.tensor(eta, dtype=torch.float64))(weights)
    grads = draw(weights, g)
    return [w - lr[:, None, None] * x for w, x in zip(weights, grads)]


@pytest.mark.parametrize("family", ["dense", "entries"])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_one_sam_step_is_the_mean_per_example_gradient_at_its_own_ascent_point(family, depth):
    meas, b = _problem(family, 7, 3, 4)
    widths = [4] + [3] * depth
    W0 = standard_init(widths, batch=(2,), generator=torch.Generator().manual_seed(2))
    W0 = [w.detach() for w in W0]
    rho, batch = 0.3, 3

    def draw(weights, g):
        index = torch.randint(meas.n, (2, batch), generator=g)
        total = [torch.zeros_like(w) for w in weights]
        for c in range(2):
            for k in range(batch):
                i = int(index[c, k])

                def loss(ws):
                    return (predict_at(meas, _chain(ws)[None], torch.tensor([i]))[0] - b[i]) ** 2

                ws = [w[c].clone().requires_grad_() for w in weights]
                gi = torch.autograd.grad(loss(ws), ws)
                norm = math.sqrt(sum(float(x.square().sum()) for x in gi))
                up = [(w + rho * x / norm).detach().requires_grad_() for w, x in zip(ws, gi)]
                for t, x in zip(total, torch.autograd.grad(loss(up), up)):
                    t[c] += x / batch
        return total

    expected = _expected_step(W0, meas, b, draw, eta=0.7, kappa_batch=5.0)
    got = _one_step(W0, meas, b, one_sam=rho, batch=batch)
    for x, y in zip(got, expected):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("family", ["dense", "entries"])
def test_label_noise_sgd_step_is_the_gradient_of_the_noisy_minibatch_loss(family):
    meas, b = _problem(family, 9, 4, 3)
    W0 = [w.detach() for w in standard_init([3, 5, 4], batch=(2,), generator=torch.Generator().manual_seed(3))]
    sigma, batch = 0.5, 4

    def draw(weights, g):
        index = torch.randint(meas.n, (2, batch), generator=g)
        noisy = b[index] + sigma * torch.randn((2, batch), generator=g, dtype=torch.float64)
        ws = [w.clone().requires_grad_() for w in weights]
        residual = predict_at(meas, _chain(ws), index) - noisy
        return torch.autograd.grad(residual.square().mean(-1).sum(), ws)

    expected = _expected_step(W0, meas, b, draw, eta=0.7, kappa_batch=5.0)
    got = _one_step(W0, meas, b, label_noise=sigma, batch=batch)
    for x, y in zip(got, expected):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def test_train_sgd_refuses_neither_or_both_regularizers_and_unbatched_weights():
    meas, b = _problem("dense", 6, 3, 3)
    W = standard_init([3, 3, 3], batch=(1,))
    with pytest.raises(ValueError, match="exactly one of label_noise=0.0 and one_sam=0.0"):
        train_sgd(W, meas, b, steps=1, batch_size=2, eta=1.0, kappa_batch=1.0)
    with pytest.raises(ValueError, match="exactly one"):
        train_sgd(W, meas, b, steps=1, batch_size=2, eta=1.0, kappa_batch=1.0, label_noise=1.0, one_sam=0.1)
    with pytest.raises(ValueError, match=r"one leading chain dimension, got W_1 of shape \(3, 3\)"):
        train_sgd(standard_init([3, 3, 3]), meas, b, steps=1, batch_size=2, eta=1.0, kappa_batch=1.0, label_noise=1.0)


def test_minibatch_kernel_norm_is_at_least_the_full_one_and_at_most_n_over_b_times_it():
    meas, _ = _problem("dense", 40, 4, 4)
    full = kernel_norm(meas)
    kb = minibatch_kernel_norm(meas, 5, generator=torch.Generator().manual_seed(0))
    # a minibatch's kernel (1/B) Σ_{i in I} a_i a_iᵀ is at most (n/B) times the full one (with repeats, n/B · 2)
    assert full * 0.999 <= kb <= 2 * (40 / 5) * full
    assert minibatch_kernel_norm(meas, 40) == full


def test_curvature_bound_with_a_minibatch_s_kappa_bounds_that_minibatch_s_sharpness():
    # what train_sgd's step size rests on: S(W) with κ of the minibatch bounds the Gauss-Newton sharpness of its loss
    meas, _ = _problem("dense", 30, 3, 3)
    g = torch.Generator().manual_seed(4)
    W = [w.detach() for w in standard_init([3, 3, 3], generator=g)]
    for _ in range(5):
        index = torch.randint(30, (4,), generator=g)
        sub = Dense(meas.A[index])
        J = torch.func.jacrev(lambda *ws: sub.predict(_chain(list(ws))), argnums=(0, 1))(*W)
        J = torch.cat([j.reshape(4, -1) for j in J], 1)
        sharp = float(torch.linalg.eigvalsh(2 * J.T @ J / 4)[-1])
        assert 0 < sharp <= float(curvature_bound(W, kernel_norm(sub))) * (1 + 1e-9)


# ---------------------------------------------------------------- the trajectory experiment on a tiny problem

TINY = TrajectorySettings(n=24, steps=60, sgd_steps=80, points=20, batch_size=3, chains=2, timing_steps=5)
TINY_PROBLEM = RecoverySettings(d=4, rank=1, solution_max_outer=10, solution_max_inner=100)


@pytest.fixture(scope="module")
def tiny_trajectory():
    pytest.importorskip("cvxpy")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_trajectory(2, 0, TINY, TINY_PROBLEM, "auto")
    finally:
        torch.set_num_threads(threads)


def test_trajectory_records_every_method_with_three_curves_against_steps(tiny_trajectory):
    assert [r["method"] for r in tiny_trajectory] == list(METHODS)
    for r in tiny_trajectory:
        total = TINY.sgd_steps if r["chains"] else TINY.steps
        assert r["steps"][-1] == total and r["main_steps"] == total - round(total * TINY.polish)
        assert len(r["steps"]) == len(r["ratios"]) == len(r["nuclear_ratios"]) == len(r["errors"]) == len(r["losses"]) >= 20
        assert r["ratio"] == r["ratios"][-1] and r["nuclear_ratio"] == r["nuclear_ratios"][-1]
        assert r["rel_error"] == r["errors"][-1] and r["ratio_spread"] >= 0
        assert all(x > 0 and math.isfinite(x) for x in r["ratios"] + r["nuclear_ratios"] + r["errors"])
        # the flattest solution's nuclear norm is at least the convex optimum's (every interpolator's is)
        assert r["reference_nuclear_ratio"] >= 1 - 1e-6
        assert (r["chains"] == TINY.chains) == (r["method"] in ("label_noise_sgd", "one_sam"))
        assert set(TRAJECTORY.fields) <= set(r)


def test_trajectory_says_whether_a_run_is_still_moving(tiny_trajectory):
    r = dict(tiny_trajectory[0], steps=[1, 2, 4, 8, 16, 32, 64], ratios=[3.0, 3.0, 2.0, 2.0, 1.5, 1.2, 1.2], main_steps=32)
    assert still_moving(r) == pytest.approx(1.2 / 1.5 - 1)  # r(32) / r(16): the main phase's last doubling
    assert still_moving(dict(r, steps=[1, 2, 64], ratios=[1.0, 1.0, 1.0])) is None
    lines = TRAJECTORY.summary_section(tiny_trajectory)
    text = "\n".join(lines)
    for method in METHODS:
        assert f"| 2 | {method} |" in text
    assert "still moving" in text and "steps/s" in text.lower()


# ---------------------------------------------------------------- the grid's axes (issue 20 §2)


def test_swept_problems_take_the_product_of_sizes_and_ranks_at_every_n():
    base = ((20, 2, (80, 200)),)
    assert swept_problems(base, {}) == base
    assert swept_problems(base, {"ns": (50,)}) == ((20, 2, (50,)),)
    assert swept_problems(base, {"sizes": (10, 30)}) == ((10, 2, (80, 200)), (30, 2, (80, 200)))
    assert swept_problems(base, {"sizes": (10,), "ranks": (1, 3), "ns": (40,)}) == ((10, 1, (40,)), (10, 3, (40,)))
    with pytest.raises(ValueError, match="rank 3 with size 2"):
        swept_problems(base, {"sizes": (2,), "ranks": (3,)})


def test_every_experiment_sweeps_the_axes_it_reads_and_ignores_the_others():
    axes = {"sizes": (6,), "ranks": (1,), "depths": (2,), "ns": (30,), "seeds": (4,)}
    for name, e in experiments().items():
        s = e.sweep(e.settings["quick"], axes)
        tasks = e.tasks(s)
        assert tasks, name
        for t in tasks:
            assert getattr(t, "seed", 4) == 4, (name, t)
            if "depths" in e.axes:
                assert getattr(t, "depth", None) in (2, None), (name, t)
            if "ns" in e.axes and hasattr(t, "n"):
                assert t.n == 30, (name, t)
        assert e.sweep(e.settings["quick"], {}) == e.settings["quick"], name


def test_the_trajectory_refuses_several_problems_naming_the_axis():
    with pytest.raises(ValueError, match=r"sizes: the trajectory experiment trains on one problem, got \[20, 30\]"):
        TRAJECTORY.sweep(TRAJECTORY.settings["quick"], {"sizes": (20, 30)})


def test_custom_grid_keeps_the_chosen_experiments_in_registry_order_with_their_axes():
    grid = custom_grid(GRIDS["quick"], experiments_=["training_trace", "sensing"], axes={"depths": (2,)},
                       per_experiment={"sensing": {"ns": (50, 60)}}, name="quick, custom")
    assert [e.name for e, _ in grid.parts] == ["sensing", "training_trace"]
    sensing = grid.part("sensing")[1]
    assert sensing.depths == (2,) and sensing.sizes()[0][2] == (50, 60)
    assert grid.part("training_trace")[1].depths == (2,)
    with pytest.raises(ValueError, match="experiment trajectory: ranks"):
        custom_grid(GRIDS["quick"], axes={"sizes": (3,), "ranks": (4,)}, experiments_=["trajectory"])
    with pytest.raises(ValueError, match="not among the experiments chosen"):
        custom_grid(GRIDS["quick"], experiments_=["sensing"], per_experiment={"completion": {"ns": (5,)}})


def test_the_budget_leaves_out_what_is_over_it_and_the_summary_says_which_and_why():
    s = RecoveryGrid(problems=((20, 2, (80,)), LITERATURE), max_task_seconds=150.0, max_task_memory_gb=8.0)
    kept, left = within_budget(SENSING, s, SENSING.all_tasks(s), s.max_task_seconds, s.max_task_memory_gb)
    assert kept == SENSING.tasks(s) and kept and left and len(kept) + len(left) == len(SENSING.all_tasks(s))
    assert all(SENSING.cost(t, s) <= 150 and SENSING.memory_gb(t, s) <= 8 for t in kept)
    assert all(SENSING.cost(t, s) > 150 or SENSING.memory_gb(t, s) > 8 for t in left)
    # at 100 × 100: the convex program by ADMM (cvxpy's SDP would need over 20 GB) at every n, the Dense networks
    # (1300 steps: 66 ms a step at n = 2000, 160 ms at n = 5000) only up to 150 s; nothing is left out at 20 × 20
    assert {("nuclear_norm", 100, n) for n in LITERATURE[2]} <= {(t.kind, t.d, t.n) for t in kept}
    assert {t.d for t in left} == {100}
    assert ("networks", 100, 2000) in {(t.kind, t.d, t.n) for t in kept}
    assert ("networks", 100, 5000) in {(t.kind, t.d, t.n) for t in left}
    note = "\n".join(SENSING.budget_note(s))
    assert "Where this grid stops, and why" in note and "100 × 100 rank 5, `networks`" in note and "150 s" in note
    assert budget_lines(SENSING, RecoveryGrid(), SENSING.all_tasks(RecoveryGrid()), None) == []


def test_a_whole_problem_budget_leaves_out_every_task_of_a_problem_one_task_of_which_is_over_it():
    from flatkern.experiments.training_trace import TRAINING_TRACE, TrainingTraceGrid

    s = TrainingTraceGrid(problems=((20, 2, (80,)), LITERATURE), max_task_seconds=3600.0)
    kept, left = within_budget(TRAINING_TRACE, s, TRAINING_TRACE.all_tasks(s), 3600.0, whole_problems=True)
    problem = lambda t: (t.d, t.rank, t.n, t.seed)  # noqa: E731
    assert kept == TRAINING_TRACE.tasks(s) and {t.d for t in kept} == {20} and {t.d for t in left} == {100}
    assert not {problem(t) for t in kept} & {problem(t) for t in left}
    assert all(any(TRAINING_TRACE.cost(u, s) > 3600 for u in left if problem(u) == problem(t)) for t in left)


def test_full_runs_completion_at_the_literature_size_and_sensing_as_far_as_the_cost_model_affords():
    full = GRIDS["full"]
    completion = {(t.kind, t.d, t.n) for t in experiments()["completion"].tasks(full.part("completion")[1])}
    assert {("networks", 100, n) for n in LITERATURE[2]} <= completion
    assert {("flattest_solution", 100, n) for n in LITERATURE[2]} <= completion
    assert {("nuclear_norm", 100, n) for n in LITERATURE[2]} <= completion  # by ADMM: cvxpy's SDP needs > 20 GB
    sensing = {(t.kind, t.d, t.n) for t in experiments()["sensing"].tasks(full.part("sensing")[1])}
    assert {(kind, 100, n) for kind in ("networks", "flattest_solution", "nuclear_norm") for n in LITERATURE[2]} <= sensing
    # the training-trace solves at 100 × 100 (an evaluation of the Dense trace and its gradient: 3-7 s) are what
    # --full's budget stops, and its summary says so
    note = "\n".join(experiments()["training_trace"].budget_note(full.part("training_trace")[1]))
    assert "Where this grid stops" in note and "100 × 100 rank 5, `solutions`" in note


def test_a_custom_grid_has_the_same_fingerprint_each_time_it_is_built_and_another_than_its_preset():
    # --resume rebuilds the grid from the same options: the journal must recognize it, and not the preset's journal
    from flatkern.experiments.journal import fingerprint

    def build():
        return custom_grid(GRIDS["quick"], experiments_=["sensing", "trajectory"], axes={"sizes": (5,), "ranks": (1,)},
                           name="quick, custom")

    assert fingerprint(build(), "auto") == fingerprint(build(), "auto") != fingerprint(GRIDS["quick"], "auto")


def test_the_summary_says_where_a_grid_stopped_even_when_nothing_of_an_experiment_ran():
    from flatkern.experiments.report import summary_markdown

    s = RecoveryGrid(problems=(LITERATURE,), max_task_seconds=1.0)
    assert SENSING.tasks(s) == []
    summary = summary_markdown([], grid="g", seconds=1.0, command="c", processes=1, experiments=[SENSING],
                               settings={"sensing": s})
    assert "## sensing: not run" in summary and "Where this grid stops, and why" in summary and "1 s" in summary
