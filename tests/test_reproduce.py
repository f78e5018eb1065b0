"""`flatkern reproduce`: the pieces are right, the --quick run shows what the theory says, and no work is lost.

The science claims (issues 6, 14) are checked on the records of one `--quick` run:
training finds the flattest factorization, and on Gaussian sensing flatness
regularization recovers the low-rank matrix where gradient descent does not.
The run's robustness (issue 11 §4: journal, Ctrl-C, --resume, atomic writes,
torchrun) is checked on a tiny grid that takes seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from helpers import child_pids, pid_alive

import flatkern as fk
from flatkern.experiments import GRIDS, run_task, tasks_of
from flatkern.experiments.baselines import balanced_factorization, nuclear_norm_solution
from flatkern.experiments.recovery import RecoverySettings, make_problem
from flatkern.experiments.journal import LOCK_NAME, Journal, read_journals
from flatkern.experiments.report import FIGURES, results_of, without_timings
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
    task = next(t for t in tasks_of(grid) if t.experiment == "flattest" and t.depth == 2)
    # (the wall times differ, and stay out of results.json)
    assert without_timings(run_task(task, grid, "torch")) == without_timings(run_task(task, grid, "torch"))


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
    assert {r["experiment"] for r in records} == {"flattest", "sensing", "completion", "trajectory", "digits",
                                                  "training_trace"}
    for r in records:
        if r["experiment"] in ("digits", "training_trace"):  # their own contracts: tests/test_digits.py, ...
            assert {"experiment", "method", "depth", "n", "seed"} <= set(r), r
            continue
        assert REQUIRED_KEYS <= set(r), r
        if r["experiment"] == "flattest":
            assert r["n"] is None and r["rel_error"] is None and r["ratio"] >= 1 - 1e-6
        else:
            assert isinstance(r["n"], int) and r["rel_error"] >= 0
    methods = {(r["experiment"], r["method"]) for r in records}
    for m in ("flattest_solution", "flatness", "balanced", "weight_decay"):
        assert ("flattest", m) in methods
    for m in ("gd", "gd_small_init", "flatness", "flattest_solution", "nuclear_norm", "label_noise"):
        assert ("sensing", m) in methods and ("completion", m) in methods
    for m in ("gd", "label_noise_sgd", "sam", "one_sam", "flatness"):
        assert ("trajectory", m) in methods
    for r in records:
        if r["method"] == "flattest_solution":
            assert r["nuclear_norm"] > 0 and r["feasibility"] >= 0 and r["iterations"] > 0, r


def test_quick_trajectories_have_at_least_twenty_log_spaced_ratios(quick_run):
    out, records, _ = quick_run
    runs = [r for r in records if r["experiment"] == "trajectory"]
    assert len({r["depth"] for r in runs}) >= 2
    for r in runs:
        steps, ratios = r["steps"], r["ratios"]
        assert len(steps) == len(ratios) >= 20 and steps == sorted(set(steps)) and steps[0] >= 1
        assert steps[-1] / steps[0] >= 100 and steps[len(steps) // 2] < steps[-1] / 5  # log-spaced, not linear
        assert all(x > 0 for x in ratios)
        assert r["ratio"] == ratios[-1] and r["reference_trace"] > 0
    # the wall times live beside results.json, which holds only what the tasks compute
    timings = [t for t in json.loads((out / "timings.json").read_text()) if t["experiment"] == "trajectory"]
    assert len(timings) == len(runs) and all(t["step_seconds"] > 0 and t["trace_seconds"] > 0 for t in timings)
    assert not any("step_seconds" in r or "solve_seconds" in r for r in records)


def test_flattest_solution_reaches_the_theorem_s_minimum_for_a_fixed_matrix(quick_run):
    _, records, _ = quick_run
    solved = [r for r in records if r["experiment"] == "flattest" and r["method"] == "flattest_solution"]
    assert {r["depth"] for r in solved} >= {2, 3, 4}
    for r in solved:
        assert r["fit_error"] <= 1e-6 and 1 - 1e-9 <= r["ratio"] <= 1.001, r


@pytest.mark.parametrize("experiment", ["sensing", "completion"])
def test_flattest_solution_has_the_convex_program_s_nuclear_norm(quick_run, experiment):
    _, records, _ = quick_run
    convex = {(r["n"], r["seed"]): r["nuclear_norm"] for r in records
              if r["experiment"] == experiment and r["method"] == "nuclear_norm"}
    solved = [r for r in records if r["experiment"] == experiment and r["method"] == "flattest_solution"]
    assert solved
    for r in solved:
        assert abs(r["nuclear_norm"] / convex[(r["n"], r["seed"])] - 1) <= 2e-3, r
        assert r["feasibility"] <= 1e-6, r


def test_quick_summary_shows_the_equality_and_the_cost_of_tracking_the_trace(quick_run):
    out, _, _ = quick_run
    summary = (out / "summary.md").read_text()
    assert "`flattest_solution`'s nuclear norm against the convex program's optimum at every n" in summary
    assert "## trajectory" in summary and "What tracking the exact trace cost" in summary
    assert "trajectory.png" in summary


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


@pytest.mark.slow  # the tiny-grid torchrun test below checks the same in the default run
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
    assert "on 2 worker processes" in (tmp_path / "summary.md").read_text()


# a grid of one's own (issue 20 §2): two sizes of the recovery experiments, two seeds (trained as one batch: issue
# 21 §4), and the new trajectory methods
CUSTOM_GRID = """preset = "quick"
experiments = ["sensing", "completion", "trajectory"]
sizes = [5, 6]
ranks = [1]
ns = [24]
depths = [2]
seeds = [0, 1]
[trajectory]
sizes = [5]
seeds = [0]
"""


@pytest.mark.slow  # two runs of ~30 s each on a loaded 2-core machine
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not installed")
def test_a_grid_file_run_is_the_same_on_one_process_and_under_torchrun(tmp_path):
    grid = tmp_path / "grid.toml"
    grid.write_text(CUSTOM_GRID)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = ["reproduce", "--grid-file", str(grid), "--no-progress", "--quiet"]
    one = subprocess.run([sys.executable, "-m", "flatkern", *args, "--out", str(tmp_path / "one")], cwd=REPO,
                         capture_output=True, text=True, timeout=600, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(["torchrun", "--standalone", "--nproc_per_node=2", "-m", "flatkern", *args, "--out",
                          str(tmp_path / "two")], cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    records = json.loads((tmp_path / "one" / "results.json").read_text())
    assert json.loads((tmp_path / "two" / "results.json").read_text()) == records
    assert {(r["experiment"], r.get("d")) for r in records} == {("sensing", 5), ("sensing", 6), ("completion", 5),
                                                                ("completion", 6), ("trajectory", 5)}
    assert {r["method"] for r in records if r["experiment"] == "trajectory"} == {
        "gd", "label_noise_sgd", "sam", "one_sam", "flatness"}
    assert {(r["seed"], r["method"]) for r in records if r["experiment"] == "completion" and r["depth"] == 2} == {
        (seed, m) for seed in (0, 1) for m in ("gd", "gd_small_init", "label_noise", "flatness", "flattest_solution")}
    summary = (tmp_path / "one" / "summary.md").read_text()
    assert "grid `quick, custom`" in summary and "### 5 × 5, rank 1" in summary and "### 6 × 6, rank 1" in summary
    # where the time went: every task counted once, whichever rank ran it
    rows = [[line.split("|")[1:3] for line in (tmp_path / run / "summary.md").read_text().splitlines()
             if line.startswith("| ") and line.count("|") == 7 and "%" in line] for run in ("one", "two")]
    assert [r[0].strip() for r in rows[0]] == ["sensing", "completion", "trajectory", "all"] and rows[0] == rows[1]
    assert f"--grid-file {grid}" in summary  # the command that reruns (and resumes) this grid


# ---------------------------------------------------------------- the main job never loses work (issue 11 §4, issue 18 §8)

# 8 tasks of a fraction of a second each, put in place of --quick in a subprocess; with
# FLATKERN_TEST_RELEASE set, also tests/test_experiments.py's `hold` task, which runs first and
# returns only once that file exists: a run interrupted before then is certainly unfinished
TINY_GRID = """
import os, sys
sys.path.insert(0, {tests!r})
from flatkern.experiments import GRIDS
from flatkern.experiments.grid import grid_of
from flatkern.experiments.flattest import FlattestGrid, FlattestSettings
from test_experiments import HOLD, HoldSettings
_release = os.environ.get("FLATKERN_TEST_RELEASE")
GRIDS["quick"] = grid_of(
    "tiny", flattest=FlattestGrid(matrices=(((5, 5), 2),), depths=(2, 3), seeds=(0, 1, 2, 3),
                                  budget=FlattestSettings(steps=150, polish_steps=30)),
)
if _release:
    GRIDS["quick"] = type(GRIDS["quick"])("tiny", GRIDS["quick"].parts + ((HOLD, HoldSettings(_release)),))
""".format(tests=str(Path(__file__).resolve().parent))


def _tiny_grid(release: Path | None = None):
    scope = {}
    old = os.environ.get("FLATKERN_TEST_RELEASE")
    os.environ.pop("FLATKERN_TEST_RELEASE", None)
    if release is not None:
        os.environ["FLATKERN_TEST_RELEASE"] = str(release)
    try:
        exec(TINY_GRID.replace('GRIDS["quick"]', "grid"), scope)
    finally:
        os.environ.pop("FLATKERN_TEST_RELEASE", None)
        if old is not None:
            os.environ["FLATKERN_TEST_RELEASE"] = old
    return scope["grid"]


def _tiny_command(out, *args):
    """`flatkern reproduce --quick --out OUT ARGS` with the tiny grid as --quick, as the program itself (main())."""
    code = TINY_GRID + "import sys\nfrom flatkern.cli import main\nsys.exit(main())\n"
    return [sys.executable, "-c", code, "reproduce", "--quick", "--out", str(out), "--no-progress", "--quiet", *args]


def _held(release: Path) -> dict:
    """The environment of a tiny run whose `hold` task waits for ``release``."""
    return dict(os.environ, OMP_NUM_THREADS="1", FLATKERN_TEST_RELEASE=str(release))


def _finished_tasks(out: Path) -> int:
    try:
        return len(read_journals(out)[1]) if out.exists() else 0
    except Exception:  # a journal being written as we read it
        return 0


@pytest.fixture(scope="module")
def tiny_records(tmp_path_factory):
    """The tiny grid's records with its `hold` task (released), run task by task here (one thread, as the workers do)."""
    release = tmp_path_factory.mktemp("released") / "go"
    release.touch()
    grid = _tiny_grid(release)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [r for task in tasks_of(grid) for r in run_task(task, grid, "auto")]
    finally:
        torch.set_num_threads(threads)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


def _workers_once_tasks_are_saved(proc, out: Path, tasks: int) -> tuple[list[int], list[int]]:
    """``(workers, trackers)``: the run's processes (and multiprocessing's resource trackers) once ``tasks`` are saved."""
    deadline = time.monotonic() + 240
    while _finished_tasks(out) < tasks:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no task finished in 240 s"
        time.sleep(0.02)
    family = child_pids(proc.pid)
    family += [k for c in family for k in child_pids(c)]  # torchrun's ranks' workers
    trackers = [p for p in family if "resource_tracker" in _cmdline(p)]
    family = [p for p in family if p not in trackers]
    assert family, "the run has no worker processes"
    return family, trackers


def _gone_within(pids: list[int], limit: float, start: float) -> float:
    while any(pid_alive(p) for p in pids) and time.monotonic() - start < limit:
        time.sleep(0.01)
    return time.monotonic() - start


def _interrupt_when_tasks_are_saved(proc, out: Path, group: bool = False, tasks: int = 2) -> tuple[float, list[int]]:
    """Send SIGINT once ``tasks`` tasks are in the journal (the run holds its `hold` task, so it is still running).

    Returns the seconds until the command and every worker process it started
    are gone (at most 60: the limit is for a hang, the latency is measured by
    bench/bench_ctrl_c.py), and those still alive then.  multiprocessing's
    resource tracker (a helper that does no work and leaves when its parent
    does) is only required gone within 60 s.
    """
    family, trackers = _workers_once_tasks_are_saved(proc, out, tasks)
    start = time.monotonic()
    if group:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does to torchrun
    else:
        proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    seconds = _gone_within(family, 60, start)
    _gone_within(trackers, 60, start)
    return seconds, [p for p in family + trackers if pid_alive(p)]


def test_ctrl_c_stops_keeps_records_and_resume_ends_with_the_same_results(tmp_path, tiny_records):
    out, release = tmp_path / "out", tmp_path / "release"
    proc = subprocess.Popen(_tiny_command(out, "--workers", "2"), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_held(release))
    seconds, alive = _interrupt_when_tasks_are_saved(proc, out)
    stderr = proc.stderr.read()
    assert proc.returncode == 130, stderr[-3000:]
    # 10x and more the latency bench/bench_ctrl_c.py measures: this catches a hang, not a slow machine
    assert seconds <= 15.0 and not alive, (seconds, alive)  # the workers included
    saved = _finished_tasks(out)
    assert 2 <= saved < len(tasks_of(_tiny_grid(release))), saved
    assert f"flatkern reproduce --quick --out {out} --resume" in stderr
    assert not (out / "results.json").exists()

    release.touch()
    resumed = subprocess.run(_tiny_command(out, "--resume", "--workers", "2"), cwd=REPO, capture_output=True, text=True,
                             timeout=300, env=_held(release))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((out / "results.json").read_text()) == results_of(tiny_records)
    summary = (out / "summary.md").read_text()
    assert "on 2 worker processes" in summary and f"resumed: {saved} tasks came" in summary
    assert not list(out.glob("records*.jsonl"))  # the journal is gone once results.json holds everything


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not installed")
def test_torchrun_ctrl_c_keeps_every_rank_s_records_and_resume_ends_with_the_same_results(tmp_path, tiny_records):
    out, release = tmp_path / "out", tmp_path / "release"
    env = _held(release)
    code = _tiny_command(out)[2]
    torchrun = ["torchrun", "--standalone", "--nproc_per_node=2", "--no-python", sys.executable, "-c", code,
                "reproduce", "--quick", "--out", str(out), "--no-progress", "--quiet"]
    proc = subprocess.Popen(torchrun, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    seconds, alive = _interrupt_when_tasks_are_saved(proc, out, group=True, tasks=3)
    stderr = proc.stderr.read()
    assert proc.returncode != 0 and not alive, (proc.returncode, alive)
    # the launcher's own shutdown comes on top of the ranks': a limit for a hang (bench/bench_ctrl_c.py measures it)
    assert seconds <= 40.0, seconds
    assert f"--out {out} --resume" in stderr, stderr[-3000:]
    assert (out / "records.jsonl").exists() and (out / "records.rank1.jsonl").exists()
    assert not (out / "results.json").exists()

    release.touch()
    resumed = subprocess.run([*torchrun, "--resume"], cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((out / "results.json").read_text()) == results_of(tiny_records)
    assert "on 2 worker processes" in (out / "summary.md").read_text()  # one per rank
    assert not list(out.glob("records*.jsonl"))


def test_workers_exit_when_the_coordinator_is_killed_and_the_next_run_takes_over_its_lock(tmp_path, tiny_records):
    out, release = tmp_path / "out", tmp_path / "release"
    proc = subprocess.Popen(_tiny_command(out, "--workers", "2"), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_held(release))
    # one worker holds the `hold` task until `release` exists: without a watch on its parent it would wait forever
    family, trackers = _workers_once_tasks_are_saved(proc, out, 1)
    start = time.monotonic()
    proc.kill()  # kill -9: no handler, no cleanup
    proc.wait(timeout=60)
    seconds = _gone_within(family, 60, start)
    assert not [p for p in family if pid_alive(p)], f"workers still running {seconds:.0f} s after the coordinator died"
    assert (out / LOCK_NAME).exists()  # left behind by the killed run, with its dead pid

    release.touch()
    resumed = subprocess.run(_tiny_command(out, "--resume", "--workers", "2"), cwd=REPO, capture_output=True, text=True,
                             timeout=300, env=_held(release))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((out / "results.json").read_text()) == results_of(tiny_records)
    assert not (out / LOCK_NAME).exists()


@pytest.mark.skipif(not fk.available_backends("cpu") or "cpp" not in fk.available_backends("cpu"),
                    reason="the C++ kernels are not built here: auto is torch")
def test_backend_torch_and_auto_write_the_same_results(tmp_path):
    runs = {}
    for backend in ("torch", "auto"):
        out = tmp_path / backend
        proc = subprocess.run(_tiny_command(out, "--backend", backend, "--workers", "2"), cwd=REPO, capture_output=True,
                              text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[backend] = (out / "results.json").read_bytes()
    assert runs["torch"] == runs["auto"]


def _journal_with_one_task(out: Path, grid, backend="auto", command="flatkern reproduce --quick", records=None):
    out.mkdir(parents=True, exist_ok=True)
    tasks = tasks_of(grid)
    journal = Journal(out, 0, grid, tasks, backend, command)
    journal.append(0, tasks[0], [{"experiment": "flattest", "value": 0.1}] if records is None else records, 1.0)
    journal.close()
    return out / "records.jsonl"


def _reproduce_error(capsys, argv) -> str:
    from flatkern import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_resume_refuses_the_records_of_another_grid(tmp_path, capsys):
    journal = _journal_with_one_task(tmp_path / "out", GRIDS["quick"])
    before = journal.read_text()
    err = _reproduce_error(capsys, ["reproduce", "--out", str(tmp_path / "out"), "--resume"])  # the default grid
    assert "cannot resume" in err and "grid 'quick'" in err and "grid 'default'" in err
    assert "flatkern reproduce --quick --out" in err  # the command that does resume it
    assert journal.read_text() == before


def test_resume_refuses_another_backend(tmp_path, capsys):
    _journal_with_one_task(tmp_path / "out", GRIDS["quick"], backend="torch", command="flatkern reproduce --quick --backend torch")
    err = _reproduce_error(capsys, ["reproduce", "--quick", "--out", str(tmp_path / "out"), "--resume"])
    assert "cannot resume" in err and "backend 'torch'" in err and "--backend torch --out" in err


def test_a_fresh_run_does_not_overwrite_an_unfinished_run(tmp_path, capsys):
    journal = _journal_with_one_task(tmp_path / "out", GRIDS["quick"])
    before = journal.read_text()
    err = _reproduce_error(capsys, ["reproduce", "--quick", "--out", str(tmp_path / "out")])
    assert "unfinished run (1 of" in err and "--resume" in err
    assert journal.read_text() == before


def test_resume_with_nothing_to_resume_says_so(tmp_path, capsys):
    err = _reproduce_error(capsys, ["reproduce", "--quick", "--out", str(tmp_path / "empty"), "--resume"])
    assert "nothing to resume" in err


def test_a_journal_line_cut_short_by_a_kill_is_skipped_and_cut_before_the_next_append(tmp_path):
    grid = GRIDS["quick"]
    journal = _journal_with_one_task(tmp_path, grid)
    with open(journal, "a") as f:
        f.write('{"index": 1, "task": ["flattest", [8, 8], 2, 3, 0], "seconds": 1.0, "reco')
    headers, entries = read_journals(tmp_path)
    assert len(headers) == 1 and list(entries) == [0]
    # a resumed run appends: the torn tail is cut first, so the next record is a line of its own
    tasks = tasks_of(grid)
    again = Journal(tmp_path, 0, grid, tasks, "auto", "flatkern reproduce --quick")
    again.append(2, tasks[2], [{"experiment": "flattest", "value": 0.2}], 1.0)
    again.close()
    headers, entries = read_journals(tmp_path)
    assert sorted(entries) == [0, 2] and journal.read_text().count("\n") == 3


@pytest.fixture(scope="module")
def tiny_journal_lines(tmp_path_factory) -> list[str]:
    """The lines of a journal of the tiny grid's first two tasks, with their real records."""
    grid = _tiny_grid()
    tasks = tasks_of(grid)
    out = tmp_path_factory.mktemp("journal")
    journal = Journal(out, 0, grid, tasks, "auto", "flatkern reproduce --quick")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i in (0, 1):
            journal.append(i, tasks[i], run_task(tasks[i], grid, "auto"), 600.0)  # far above any task's own seconds
    finally:
        torch.set_num_threads(threads)
    journal.close()
    return (out / "records.jsonl").read_text().splitlines(keepends=True)


def _resume_error(out: Path, capsys, monkeypatch) -> str:
    """What ``flatkern reproduce --quick --out OUT --resume`` says, the tiny grid as --quick (in this process)."""
    import flatkern.experiments

    monkeypatch.setitem(flatkern.experiments.GRIDS, "quick", _tiny_grid())
    err = _reproduce_error(capsys, ["reproduce", "--quick", "--out", str(out), "--resume", "--no-progress"])
    assert "Traceback" not in err, err
    return err


def _resigned(line: str, change) -> str:
    """``line`` with ``change`` applied to its content and a checksum that matches again (what a forger would write)."""
    from flatkern.experiments.journal import checksum

    obj = json.loads(line)
    obj.pop("sha256")
    change(obj)
    return json.dumps(dict(obj, sha256=checksum(obj))) + "\n"


def _edited_value(line: str) -> str:
    obj = json.loads(line)
    obj["records"][0]["ratio"] = 0.5  # the checksum no longer matches
    return json.dumps(obj) + "\n"


@pytest.mark.parametrize("edit, expected", [
    (lambda line: "123\n", "line 3: not a journal line (a JSON int"),
    (lambda line: '{"foo": 1}\n', "line 3: not a journal line (no checksum)"),
    (lambda line: "not json at all\n", "line 3: not JSON"),
    (_edited_value, "line 3: its checksum does not match its content"),
    (lambda line: _resigned(line, lambda o: o.update(records=[])), "line 3: its records have methods [], the task writes"),
    (lambda line: _resigned(line, lambda o: o["records"][0].pop("ratio")), "line 3: a 'flattest_solution' record has no field 'ratio'"),
    (lambda line: _resigned(line, lambda o: o["records"][1].update(ratio="1.0")), "line 3: the 'flatness' record's field 'ratio' is '1.0'"),
    (lambda line: _resigned(line, lambda o: o["records"][0].update(seed=7)), "line 3: the 'flattest_solution' record's seed is 7, its task's is 1"),
    (lambda line: _resigned(line, lambda o: o.update(task=["flattest", [5, 5], 2, 2, 9])), "line 3: task 1 is"),
], ids=["a-number", "a-foreign-object", "not-json", "an-edited-value", "emptied-records", "a-missing-field", "a-wrong-type",
        "another-task-s-record", "another-task"])
def test_resume_refuses_a_journal_line_it_did_not_write_naming_the_line_and_the_way_out(tmp_path, edit, expected,
                                                                                        tiny_journal_lines, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    lines = list(tiny_journal_lines)
    lines[2] = edit(lines[2])
    path = out / "records.jsonl"
    path.write_text("".join(lines))
    err = _resume_error(out, capsys, monkeypatch)
    assert f"{path}, {expected}" in err, err
    assert "delete that line" in err and "choose another --out" in err
    assert path.read_text() == "".join(lines)  # refused before anything was written


def test_an_untouched_journal_resumes(tmp_path, tiny_journal_lines):
    out = tmp_path / "out"
    out.mkdir()
    (out / "records.jsonl").write_text("".join(tiny_journal_lines))
    proc = subprocess.run(_tiny_command(out, "--resume"), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    assert "resumed: 2 tasks came" in summary
    # where the time went counts the resumed tasks at the seconds their journal lines hold
    journal_seconds = sum(json.loads(line)["seconds"] for line in tiny_journal_lines if '"index"' in line)
    flattest = next(line for line in summary.splitlines() if line.startswith("| flattest |"))
    assert journal_seconds == 1200.0 and float(flattest.split("|")[3]) >= journal_seconds


def test_a_second_run_on_the_same_out_is_refused_while_the_first_holds_it(tmp_path, capsys):
    from flatkern.experiments.journal import OutLock

    out = tmp_path / "out"
    journal = _journal_with_one_task(out, GRIDS["quick"])
    before = journal.read_text()
    with OutLock(out):
        err = _reproduce_error(capsys, ["reproduce", "--quick", "--out", str(out), "--resume"])
    assert f"{out} is in use by another flatkern reproduce run (pid {os.getpid()})" in err
    assert journal.read_text() == before


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    from flatkern.experiments.journal import OutLock

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    (tmp_path / LOCK_NAME).write_text(f"{dead}\n")
    with OutLock(tmp_path) as lock:
        assert (tmp_path / LOCK_NAME).read_text() == f"{os.getpid()}\n"
    assert not (tmp_path / LOCK_NAME).exists() and lock._fd is None


def test_results_summary_and_figures_are_replaced_whole_or_not_at_all(tmp_path, tiny_records, monkeypatch):
    from flatkern.experiments import report

    tiny_records = [r for r in tiny_records if r["experiment"] == "flattest"]
    report.write_results(tiny_records, tmp_path, grid="tiny", seconds=1.0, command="first", processes=1)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert {"results.json", "summary.md", FIGURES["flattest"]} <= set(before)

    real = report._save

    def interrupted(fig, path):  # Ctrl-C while the last figure is being written
        real(fig, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "_save", interrupted)
    changed = [dict(r, seed=99) for r in tiny_records]
    with pytest.raises(KeyboardInterrupt):
        report.write_results(changed, tmp_path, grid="tiny", seconds=2.0, command="second", processes=1)
    # no temporary file left behind, and results.json and summary.md are still the first run's
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)
    assert (tmp_path / "results.json").read_bytes() == before["results.json"]
    assert (tmp_path / "summary.md").read_bytes() == before["summary.md"]


# ---------------------------------------------------------------- figures and summary (issue 22 §5)


def _synthetic_records(depths, ns=(80, 200), seeds=(0,), smallest=0.5):
    records = []
    for depth in depths:
        for seed in seeds:
            records.append(dict(experiment="flattest", method="flattest_solution", depth=depth, seed=seed, shape=[8, 8], rank=2, ratio=1.0))
            records.append(dict(experiment="flattest", method="balanced", depth=depth, seed=seed, shape=[8, 8], rank=2, ratio=1.2))
        for experiment in ("sensing", "completion"):
            for n in ns:
                for seed in seeds:
                    for method in ("gd", "gd_small_init", "label_noise", "flatness", "flattest_solution"):
                        error = smallest if (method == "flattest_solution" and n == max(ns)) else 0.5
                        records.append(dict(experiment=experiment, method=method, depth=depth, n=n, seed=seed, d=20, rank=2,
                                            rel_error=error, nuclear_norm=10.0))
        for method in ("gd", "label_noise_sgd", "sam", "one_sam", "flatness"):
            chains = 2 if method in ("label_noise_sgd", "one_sam") else None
            records.append(dict(experiment="trajectory", method=method, depth=depth, n=200, seed=0, d=20, rank=2,
                                steps=[1, 10, 100, 1000], ratios=[3.0, 2.0, 1.5, 1.2], nuclear_ratios=[2.0, 1.5, 1.2, 1.1],
                                errors=[0.9, 0.5, 0.2, 0.1], losses=[1.0, 0.1, 1e-3, 1e-9], train_loss=1e-9, rel_error=0.1,
                                main_steps=900, ratio=1.2, ratio_spread=0.0, nuclear_ratio=1.1, chains=chains,
                                batch_size=10 if chains else None, reference_nuclear_ratio=1.0))
    for experiment in ("sensing", "completion"):
        for n in ns:
            for seed in seeds:
                records.append(dict(experiment=experiment, method="nuclear_norm", depth=None, n=n, seed=seed, d=20, rank=2,
                                    rel_error=0.4, nuclear_norm=9.9))
    return records


def _figures(records):
    from flatkern.experiments import experiments

    # the experiments these synthetic records cover (digits and training_trace check their own figures
    # from tiny real runs: tests/test_digits.py, tests/test_training_trace.py)
    present = {r["experiment"] for r in records}
    return {name: e.figure([r for r in records if r["experiment"] == name]) for name, e in experiments().items()
            if name in present}


@pytest.mark.parametrize("depths", [(2,), (2, 3), (2, 3, 4)], ids=["1-depth", "2-depths", "3-depths"])
def test_every_figure_text_fits_inside_its_figure_with_one_legend(depths):
    import matplotlib.pyplot as plt
    import matplotlib.text

    for name, fig in _figures(_synthetic_records(depths)).items():
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        box = fig.bbox
        # what is drawn: the suptitle, each panel with its title, labels, tick labels, and the legend
        parts = [(fig._suptitle.get_text(), fig._suptitle.get_window_extent(renderer))] if fig._suptitle else []
        parts += [(ax.get_title(), ax.get_tightbbox(renderer)) for ax in fig.axes]
        legends = fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
        assert len(legends) == 1, (name, len(legends))  # one legend, which names every method shown
        if len(fig.axes) > 1:  # below the panels, for all of them: not inside one (issue 22 §5)
            assert fig.legends and not any(ax.get_legend() for ax in fig.axes), name
        parts += [("legend", legend.get_window_extent(renderer)) for legend in legends]
        shown = {line.get_label() for ax in fig.axes for line in ax.get_lines() if not line.get_label().startswith("_")}
        assert shown == {t.get_text() for t in legends[0].get_texts()}, name
        for text in fig.findobj(matplotlib.text.Text):  # a line break inside $...$ would print raw mathtext
            assert all(line.count("$") % 2 == 0 for line in text.get_text().split("\n")), text.get_text()
        for part, ext in parts:
            assert box.x0 - 1 <= ext.x0 and ext.x1 <= box.x1 + 1 and box.y0 - 1 <= ext.y0 and ext.y1 <= box.y1 + 1, (name, part, ext, box)
        plt.close(fig)


def test_the_recovery_figure_shows_the_smallest_error_in_the_data():
    import matplotlib.pyplot as plt

    figures = _figures(_synthetic_records((2, 3), smallest=3e-9))
    for name in ("sensing", "completion"):
        fig = figures[name]
        for ax in fig.axes:
            low, high = ax.get_ylim()
            assert low <= 3e-9 and high >= 0.5, (name, low, high)
            ys = [y for line in ax.get_lines() for y in line.get_ydata()]
            assert min(ys) == pytest.approx(3e-9)  # drawn as it is, not floored
    for fig in figures.values():
        plt.close(fig)


def test_the_trajectory_figure_says_the_ratio_means_something_only_at_zero_loss():
    import matplotlib.pyplot as plt

    fig = _figures(_synthetic_records((2, 3)))["trajectory"]
    assert "only at zero loss" in fig._suptitle.get_text().replace("\n", " ")
    plt.close(fig)


@pytest.mark.parametrize("seeds", [(0,), (0, 1, 2)])
def test_the_summary_says_how_many_seeds_a_mean_is_over(seeds):
    from flatkern.experiments.report import summary_markdown

    records = _synthetic_records((2,), seeds=seeds)
    summary = summary_markdown(records, grid="g", seconds=1.0, command="c", processes=1)
    section = summary[summary.index("## sensing"):summary.index("## completion")]
    if len(seeds) == 1:
        assert "mean" not in section.lower(), section
    else:
        assert "Mean over 3 seeds." in section and "mean over seeds" not in section.lower(), section
    assert "only at zero loss" in summary
