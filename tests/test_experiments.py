"""The experiment registry and protocol (issue 17 §6): every row complete, the generic runner equal to the experiments.

Also home of ``Hold``, a test experiment whose one task waits until a file
exists: a run that contains it cannot finish before the test lets it, so the
Ctrl-C and kill tests of ``tests/test_reproduce.py`` interrupt a run that is
certainly still running (no race with a fast machine).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from flatkern import experiments as registry
from flatkern.experiments import GRIDS, REGISTRY, experiments, run_task, tasks_of
from flatkern.experiments.base import COMMON_FIELDS, Experiment
from flatkern.experiments.grid import GRID_NAMES, Grid, grid_of, task_cost

# ---------------------------------------------------------------- Hold: a task that waits for the test


class HoldTask(NamedTuple):
    experiment: str
    seed: int


@dataclass(frozen=True)
class HoldSettings:
    release: str          # the task returns once this path exists
    seeds: tuple = (0,)


class Hold(Experiment):
    name = "hold"
    Task = HoldTask
    fields = COMMON_FIELDS

    def tasks(self, s):
        return [HoldTask(self.name, seed) for seed in s.seeds]

    def methods(self, task):
        return ("wait",)

    def run(self, task, s, backend):
        while not Path(s.release).exists():
            time.sleep(0.02)
        return [dict(experiment=self.name, method="wait", depth=None, n=None, seed=task.seed)]

    def cost(self, task, s):
        return 1e6  # first, so that a worker holds it from the start

    def table(self, records):
        return {}

    def summary_section(self, records):
        return [f"## hold: {len(records)} records", ""]


HOLD = Hold()


# ---------------------------------------------------------------- the registry


def test_every_registry_row_is_a_complete_experiment():
    found = experiments()
    assert len(found) == len(REGISTRY) >= 4
    for name, e in found.items():
        assert isinstance(e, Experiment) and e.name == name, name
        # every protocol method is the experiment's own, not the base class's NotImplementedError
        for method in ("tasks", "methods", "run", "cost", "table", "summary_section", "sweep"):
            assert getattr(type(e), method) is not getattr(Experiment, method), (name, method)
        if e.figure_name is not None:
            assert e.figure_name.endswith(".png") and type(e).figure is not Experiment.figure, name
        assert set(e.settings) <= set(GRID_NAMES) and "default" in e.settings, (name, set(e.settings))
        assert set(COMMON_FIELDS) <= set(e.fields), name
        assert all(isinstance(t, tuple) and all(isinstance(x, type) for x in t) for t in e.fields.values()), name
        for grid_name, settings in e.settings.items():
            hash(settings)  # frozen: part of the grid's fingerprint
            tasks = e.tasks(settings)
            assert tasks and len(set(tasks)) == len(tasks), (name, grid_name)
            for task in tasks:
                assert isinstance(task, e.Task) and hasattr(task, "_fields") and task._fields[0] == "experiment", task
                assert task.experiment == name
                assert json.loads(json.dumps(task)) == json.loads(json.dumps(list(task)))  # what the journal stores
                assert e.cost(task, settings) > 0 and e.methods(task), task


def test_grids_are_made_of_the_registered_experiments_in_registry_order():
    for name in GRID_NAMES:
        assert [e.name for e, _ in GRIDS[name].parts] == [e.name for e in experiments().values() if name in e.settings]
    tiny = grid_of("tiny", flattest=experiments()["flattest"].settings["quick"])
    assert [e.name for e, _ in tiny.parts] == ["flattest"]
    with pytest.raises(ValueError, match="no registered experiment"):
        grid_of("quick", flatest=None)


def test_the_registry_imports_no_experiment_until_asked():
    import subprocess
    import sys

    code = ("import sys, importlib.util, types, pathlib\n"
            "root = pathlib.Path(importlib.util.find_spec('flatkern').origin).parent\n"
            "pkg = types.ModuleType('flatkern'); pkg.__path__ = [str(root)]; sys.modules['flatkern'] = pkg\n"
            "import flatkern.experiments, flatkern.experiments.journal\n"
            "print('torch' in sys.modules, 'flatkern.experiments.flattest' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# ---------------------------------------------------------------- the generic runner is the experiments' own functions


def test_generic_tasks_and_records_are_the_experiment_functions_own():
    from flatkern.experiments.flattest import FlattestGrid, FlattestSettings, run_flattest
    from flatkern.experiments.recovery import (RecoveryGrid, RecoverySettings, run_flattest_solution, run_networks,
                                               run_nuclear_norm)
    from flatkern.experiments.report import without_timings

    problem = RecoverySettings(d=6, rank=1, steps=20, polish_steps=5, solution_max_outer=3, solution_max_inner=20)
    grid = grid_of("tiny", flattest=FlattestGrid(matrices=(((4, 3), 1),), depths=(2,), budget=FlattestSettings(steps=20, polish_steps=5)),
                   sensing=RecoveryGrid(depths=(2,), ns=(12,), problem=problem))
    tasks = tasks_of(grid)
    assert [tuple(t) for t in tasks] == [("flattest", (4, 3), 1, 2, 0), ("sensing", "networks", 6, 1, 2, 12, (0,)),
                                         ("sensing", "nuclear_norm", 6, 1, None, 12, (0,)),
                                         ("sensing", "flattest_solution", 6, 1, 2, 12, (0,))]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        by_hand = [run_flattest((4, 3), 1, 2, 0, FlattestSettings(steps=20, polish_steps=5), "torch"),
                   run_networks("sensing", 2, 12, 0, problem, "torch"),
                   run_nuclear_norm("sensing", 12, 0, problem),
                   run_flattest_solution("sensing", 2, 12, 0, problem, "torch")]
        for task, expected in zip(tasks, by_hand, strict=True):
            assert without_timings(run_task(task, grid, "torch")) == without_timings(expected), task
    finally:
        torch.set_num_threads(threads)
    assert task_cost(tasks[0], grid) > 0


def test_a_grid_refuses_parts_that_are_not_experiments():
    with pytest.raises(ValueError, match="Grid.parts"):
        Grid("x", (("flattest", None),))
    with pytest.raises(ValueError, match="distinct"):
        Grid("x", ((HOLD, HoldSettings("a")), (HOLD, HoldSettings("b"))))


def test_the_registry_module_names_every_line():
    assert registry.REGISTRY == REGISTRY
    for line in REGISTRY:
        module, attribute = line.split(":")
        assert (Path(registry.__file__).parent / f"{module}.py").exists() and attribute.isupper(), line
    # the command line reads the names from the lines, before it imports an experiment (and torch)
    from flatkern.cli import _experiment_names

    assert _experiment_names() == tuple(experiments())
    assert all(set(e.axes) <= {"sizes", "ranks", "depths", "ns", "seeds"} and e.axes for e in experiments().values())


# ---------------------------------------------------------------- seeds as one batch of problems (issue 21 §4)


def _float_fields_agree(separate: list[dict], batched: list[dict]) -> None:
    """Equal records up to float rounding: every number to 1e-12 relative (a loss near 1e-18 to 1e-24 absolute:
    the residual of a zero-loss fit is rounding itself)."""
    assert len(separate) == len(batched)
    for a, b in zip(separate, batched, strict=True):
        assert a.keys() == b.keys() and {k: a[k] for k in a if not isinstance(a[k], float)} == \
            {k: b[k] for k in b if not isinstance(b[k], float)}, (a, b)
        for k, x in a.items():
            if isinstance(x, float):
                assert abs(x - b[k]) <= 1e-12 * abs(x) + 1e-24, (a["seed"], a["method"], k, x, b[k])


@pytest.mark.parametrize("experiment, n", [("sensing", 14), ("completion", 16)])
def test_run_networks_trains_seeds_as_one_batch_equal_to_separate_runs(experiment, n):
    from flatkern.experiments.recovery import RecoverySettings, batches_seeds, run_networks

    s = RecoverySettings(d=6, rank=1, steps=40, polish_steps=10)
    assert batches_seeds(experiment, s.d, n)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for depth in (2, 3):
            separate = [r for seed in (0, 1, 2) for r in run_networks(experiment, depth, n, seed, s, "torch")]
            batched = run_networks(experiment, depth, n, (0, 1, 2), s, "torch")
            assert [(r["seed"], r["method"]) for r in batched] == [(seed, m) for seed in (0, 1, 2)
                                                                   for m in ("gd", "gd_small_init", "label_noise", "flatness")]
            _float_fields_agree(separate, batched)
    finally:
        torch.set_num_threads(threads)


def test_run_networks_runs_seeds_one_by_one_where_a_batch_saves_nothing(monkeypatch):
    # a large Dense set: each problem reads its own n matrices per step, and a batch would copy them per problem
    from flatkern.experiments import recovery

    s = recovery.RecoverySettings(d=5, rank=1, steps=10, polish_steps=5)
    monkeypatch.setattr(recovery, "BATCH_MAX_DENSE", 5 * 5 * 12 - 1)
    assert not recovery.batches_seeds("sensing", 5, 12) and recovery.batches_seeds("completion", 5, 12)
    separate = [r for seed in (3, 4) for r in recovery.run_networks("sensing", 2, 12, seed, s, "torch")]
    assert recovery.run_networks("sensing", 2, 12, (3, 4), s, "torch") == separate


def test_heavy_ball_is_sgd_with_momentum_and_steps_each_problem_with_its_own_step_size():
    from flatkern.experiments.training import HeavyBall

    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    grads = [torch.randn(3, 4, 5, generator=g, dtype=torch.float64) for _ in range(4)]
    lrs = torch.tensor([0.1, 0.02, 0.3], dtype=torch.float64)
    mine, theirs = w0.clone().requires_grad_(), [w0[i].clone().requires_grad_() for i in range(3)]
    heavy = HeavyBall([mine], lr=lrs, momentum=0.9)
    sgds = [torch.optim.SGD([theirs[i]], lr=float(lrs[i]), momentum=0.9) for i in range(3)]
    for grad in grads:
        mine.grad = grad.clone()
        heavy.step()
        for i, opt in enumerate(sgds):
            theirs[i].grad = grad[i].clone()
            opt.step()
    torch.testing.assert_close(mine.detach(), torch.stack([t.detach() for t in theirs]), rtol=1e-14, atol=1e-15)


def test_the_journal_refuses_a_batched_task_s_records_in_another_seed_order():
    from flatkern.experiments.journal import _problem
    from flatkern.experiments.recovery import SENSING, RecoveryTask, RecoverySettings, run_networks

    task = RecoveryTask("sensing", "networks", 5, 1, 2, 12, (0, 1))
    records = run_networks("sensing", 2, 12, (0, 1), RecoverySettings(d=5, rank=1, steps=5, polish_steps=2), "torch")
    entry = json.loads(json.dumps({"records": records}))
    assert _problem(entry, task, SENSING) is None
    entry["records"] = entry["records"][4:] + entry["records"][:4]
    assert "its records have seeds [1, 1, 1, 1, 0, 0, 0, 0], the task writes [0, 0, 0, 0, 1, 1, 1, 1]" in \
        _problem(entry, task, SENSING)


def test_the_summary_says_where_the_time_went_against_the_cost_model():
    from flatkern.experiments.report import summary_markdown

    text = summary_markdown([], grid="g", seconds=3.0, command="flatkern reproduce", processes=1, experiments=[],
                            by_experiment={"sensing": (4, 30.0, 60.0), "digits": (2, 10.0, 5.0)})
    assert "## Where the time went" in text
    assert "| sensing | 4 | 30 | 75% | 60 | 0.50 |" in text and "| digits | 2 | 10 | 25% | 5 | 2.00 |" in text
    assert "| all | 6 | 40 | 100% | 65 | 0.62 |" in text
    assert "Where the time went" not in summary_markdown([], grid="g", seconds=3.0, command="c", processes=1, experiments=[])


def test_the_summary_names_a_convex_solve_that_stopped_short_and_counts_only_flattest_solves():
    from flatkern.experiments.report import solve_lines

    records = [dict(experiment="sensing", method="nuclear_norm", d=100, n=2000, seed=1, solver_status="optimal_inaccurate"),
               dict(experiment="sensing", method="nuclear_norm", d=100, n=3000, seed=0, solver_status="optimal"),
               dict(experiment="training_trace", method="nuclear_norm", d=20, n=80, seed=0, solver_status="optimal",
                    converged=True),
               dict(experiment="sensing", method="flattest_solution", d=100, n=2000, seed=0, converged=True,
                    solve_seconds=2.0)]
    text = "\n".join(solve_lines(records))
    assert "**1 convex solves stopped short of their optimality test**" in text and "sensing 100×100 n=2000 seed 1" in text
    assert "`flattest_solution` ran 1 solves" in text
    records[0]["solver_status"] = "optimal"
    assert "stopped short" not in "\n".join(solve_lines(records))


def test_nuclear_norm_solution_says_when_admm_stopped_at_its_cap(monkeypatch):
    from flatkern.experiments import baselines
    from flatkern.experiments.recovery import RecoverySettings, make_problem

    M, meas, b = make_problem("completion", 30, 0, RecoverySettings(d=8, rank=1))
    monkeypatch.setattr(baselines, "CVXPY_MAX_SIZE", 7)
    first_order = baselines.nuclear_norm_first_order
    monkeypatch.setattr(baselines, "nuclear_norm_first_order",
                        lambda *args, **kw: first_order(*args, **{**kw, "max_iterations": 3}))
    X, status = baselines.nuclear_norm_solution(meas, b, (8, 8), return_status=True)
    assert status == "optimal_inaccurate" and X.shape == (8, 8)


def test_train_gd_refuses_generators_that_do_not_split_the_batch():
    from flatkern.experiments.training import standard_init, train_gd
    from flatkern.measurements import Entries

    meas = Entries.uniform(10, (4, 4), generator=torch.Generator().manual_seed(0))
    W = standard_init([4, 4, 4], batch=(4,))
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    with pytest.raises(ValueError, match="3 generators must split the noisy targets' leading dimension evenly"):
        train_gd(W, meas, torch.zeros(10, dtype=torch.float64), steps=1, label_noise=torch.ones(4, dtype=torch.float64),
                 generator=gens, backend="torch")


@pytest.mark.parametrize("backend, regularizer", [("auto", "isotropic"), ("torch", "train")])
def test_batched_seeds_equal_separate_runs_on_the_compiled_kernels_and_with_the_training_trace(backend, regularizer):
    # what reproduce runs (backend auto: the C++ kernels with per-problem measurements), and the regularizer that is
    # the stacked per-problem Dense set itself
    from dataclasses import replace

    from flatkern.experiments.recovery import RecoverySettings, run_networks

    s = replace(RecoverySettings(d=5, rank=1, steps=30, polish_steps=10), sensing_regularizer=regularizer)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        separate = [r for seed in (0, 1) for r in run_networks("sensing", 2, 12, seed, s, backend)]
        _float_fields_agree(separate, run_networks("sensing", 2, 12, (0, 1), s, backend))
    finally:
        torch.set_num_threads(threads)


def _retry_problem():
    # one 1×1 "matrix" per problem, its one entry observed with target 1: the loss is (w − 1)² at w = [[w]]
    from flatkern.measurements import Entries

    return Entries(torch.tensor([0]), torch.tensor([0]), (1, 1)), torch.tensor([1.0], dtype=torch.float64)


def test_retry_diverged_halves_only_the_diverged_problems_step_and_keeps_the_others_runs():
    from flatkern.experiments.training import MAX_HALVINGS, retry_diverged

    meas, b = _retry_problem()
    # problem i ends at w = 1 (zero loss) when its step size is below threshold[i], else at w = 101 (diverged):
    # problem 0 never diverges, problem 1 needs three halvings (0.5 -> 0.0625), problem 2 always diverges
    threshold = torch.tensor([1.0, 0.1, 0.0], dtype=torch.float64)
    calls = []

    def train(W, eta):
        eta = torch.as_tensor(eta, dtype=torch.float64).expand(3)
        calls.append(eta.clone())
        with torch.no_grad():
            W[0].copy_((1.0 + 100.0 * (eta >= threshold).double() + 1e-3 * len(calls)).reshape(3, 1, 1))

    start = torch.zeros(3, 1, 1, dtype=torch.float64)
    W, halvings, diverged = retry_diverged(train, [start], meas, b, eta=0.5, backend="torch")
    assert len(calls) == MAX_HALVINGS + 1 and float(calls[0][0]) == 0.5 and not isinstance(calls[0], float)
    assert halvings.tolist() == [0, 3, MAX_HALVINGS] and diverged.tolist() == [False, False, True]
    assert [float(c[1]) for c in calls] == [0.5, 0.25, 0.125, 0.0625, 0.0625]
    assert [float(c[0]) for c in calls] == [0.5] * (MAX_HALVINGS + 1)  # never halved
    w = W[0].detach().flatten().tolist()
    assert w[0] == 1.001  # its first run, kept
    assert w[1] == 1.0 + 1e-3 * 4  # the run at 0.0625 (the fourth call), not the fifth call's
    assert w[2] == 101.0 + 1e-3 * 5  # the last try's, still diverged
    assert start.eq(0).all() and W[0].requires_grad


def test_retry_diverged_on_one_unbatched_problem():
    from flatkern.experiments.training import retry_diverged

    meas, b = _retry_problem()

    def train(W, eta):
        with torch.no_grad():
            W[0].fill_(1.0 if float(eta) < 0.2 else 50.0)

    W, halvings, diverged = retry_diverged(train, [torch.zeros(1, 1, dtype=torch.float64)], meas, b, eta=0.5,
                                           backend="torch")
    assert W[0].shape == (1, 1) and float(W[0].detach()) == 1.0 and int(halvings) == 2 and not bool(diverged)


def test_a_run_that_diverges_trains_again_with_a_smaller_step_its_record_says_so_and_the_others_are_unchanged():
    # 12×12 completion at depth 4 from the small initialization, 72 of 144 entries observed: with the step size
    # 0.5 / S(W) its loss went from 0.08 to 170 in 35 steps (S bounds the Gauss-Newton curvature only)
    from dataclasses import replace

    from flatkern.experiments.recovery import RecoverySettings, run_networks
    from flatkern.experiments.report import solve_lines

    s = RecoverySettings(d=12, rank=1, steps=30, polish_steps=5)
    records = {r["method"]: r for r in run_networks("completion", 4, 72, 1, s, "torch")}
    small = records["gd_small_init"]
    assert small["step_halvings"] >= 1 and small["eta"] == s.eta * 0.5 ** small["step_halvings"]
    assert "diverged" not in small and small["train_loss"] < 0.08
    for method in ("gd", "label_noise", "flatness"):
        assert "step_halvings" not in records[method] and "eta" not in records[method], method
    # the retried problem is its run at the smaller step size; the problems beside it ran once, as before
    again = {r["method"]: r for r in run_networks("completion", 4, 72, 1, replace(s, eta=small["eta"]), "torch")}
    _float_fields_agree([again["gd_small_init"]], [{k: v for k, v in small.items() if k not in ("eta", "step_halvings")}])
    text = "\n".join(solve_lines(list(records.values())))
    assert "**1 training runs diverged and ran again with a smaller step size**" in text
    assert f"completion 12×12 L=4 n=72 seed 1 gd_small_init (eta {small['eta']:g})" in text
    assert "at every step size tried" not in text


def test_the_summary_names_network_runs_that_end_above_zero_loss():
    from flatkern.experiments.recovery import COMPLETION, FIT_TOLERANCE, SENSING

    def record(experiment, method, depth, n, loss, seed=0):
        return dict(experiment=experiment, method=method, depth=depth, n=n, seed=seed, d=20, rank=2, rel_error=0.5,
                    nuclear_norm=1.0, train_loss=loss, trace=None, trace_isotropic=None, ratio=None)

    # the targets' mean square: d = 20 for Gaussian sensing, 1/d for completion
    fit, unfit = 0.5 * FIT_TOLERANCE, 2 * FIT_TOLERANCE
    sensing = [record("sensing", "gd", 2, 80, 20 * fit), record("sensing", "flatness", 4, 80, 20 * unfit),
               record("sensing", "flatness", 4, 120, float("nan")), record("sensing", "gd_small_init", 3, 80, 20 * unfit)]
    text = "\n".join(SENSING.summary_section(sensing))
    assert ("**3 of 4 network runs end above zero loss**" in text
            and "`gd_small_init` L=3: 1 (n = 80); `flatness` L=4: 2 (n = 80, 120)." in text), text
    # the same losses are above zero loss for completion's smaller targets
    completion = [dict(r, experiment="completion", train_loss=unfit / 20) for r in sensing[:1]]
    assert "**1 of 1 network runs end above zero loss**" in "\n".join(COMPLETION.summary_section(completion))
    completion[0]["train_loss"] = fit / 20
    assert "zero loss" not in "\n".join(COMPLETION.summary_section(completion))


def test_retry_diverged_halves_each_problem_until_its_own_threshold_property():
    # any batch shape and thresholds: a problem diverges while its step size is at least its threshold; it is
    # halved the fewest times that bring it below (capped at MAX_HALVINGS, then reported diverged), and a problem
    # that never diverged keeps its first run
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from flatkern.experiments.training import MAX_HALVINGS, retry_diverged

    meas, b = _retry_problem()

    @settings(max_examples=40, deadline=None)
    @given(st.lists(st.sampled_from([1.0, 0.4, 0.3, 0.2, 0.1, 0.05, 0.03, 0.01, 0.0]), min_size=1, max_size=6),
           st.booleans())
    def check(thresholds, unbatched):
        threshold = torch.tensor(thresholds, dtype=torch.float64)
        shape = () if unbatched else threshold.shape
        threshold = threshold[0] if unbatched else threshold
        calls = []

        def train(W, eta):
            eta = torch.as_tensor(eta, dtype=torch.float64).expand(shape)
            calls.append(1)
            with torch.no_grad():
                W[0].copy_((1.0 + 100.0 * (eta >= threshold).double() + 1e-3 * len(calls)).reshape(*shape, 1, 1))

        W, halvings, diverged = retry_diverged(train, [torch.zeros(*shape, 1, 1, dtype=torch.float64)], meas, b,
                                               eta=0.5, backend="torch")
        for i in (range(len(thresholds)) if not unbatched else [...]):
            t = float(threshold[i])
            want = next((k for k in range(MAX_HALVINGS + 1) if 0.5 * 0.5**k < t), MAX_HALVINGS)
            assert int(halvings[i]) == want and bool(diverged[i]) == (0.5 * 0.5**want >= t), (thresholds, i)
            # the run it keeps: the first for a problem that never diverged, else the call at its last step size
            call = 1 if want == 0 else 1 + want
            if bool(diverged[i]):
                call = len(calls)
            assert float(W[0].detach()[i].flatten()[0]) == 1.0 + 100.0 * bool(diverged[i]) + 1e-3 * call

    check()
