"""The benchmark's providers compute the right number, and `flatkern bench` runs.

Exact providers must equal the float64 reference; estimators must be
unbiased, checked against the exact trace within 5 standard errors (a
correct estimator fails such a check with probability below 1e-6 when the
standard error is known, below 1e-4 when it is estimated from 20 draws).
The seeds are fixed, so each check is deterministic.
"""

import ast
import importlib
import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

import flatkern
import flatkern.benchmarks as B
from flatkern.benchmarks import cpu_kernels as bck
from flatkern.benchmarks import floors, peers, timing
from flatkern.kernels import families as fk_families
from flatkern.benchmarks import training as bt

TINY = {r.name: r for r in B.TEST_REGIMES}
EXACT_TOL = dict(rtol=1e-10, atol=1e-10)  # float64 against the float64 reference


def _problem(name="tiny", dtype=torch.float64):
    return B.make_problem(TINY[name], dtype=dtype)


def _provider(name_part, device="cpu"):
    (p,) = [p for p in B.providers_for(device) if name_part in p.name]
    return p


def _explicit_hessian(problem):
    loss, theta = B.flat_loss(problem)
    return torch.func.hessian(loss)(theta)


def test_exact_value_is_the_trace_of_the_explicit_hessian():
    # the number every row is judged against is the trace of the full autograd Hessian
    for name in ("tiny", "tiny-regression"):
        problem = _problem(name)
        torch.testing.assert_close(problem.exact, _explicit_hessian(problem).trace(), **EXACT_TOL)


@pytest.mark.parametrize("backend", flatkern.available_backends("cpu"))
@pytest.mark.parametrize("name", ["tiny", "tiny-regression", "tiny-batched"])
def test_flatkern_rows_equal_the_reference(backend, name):
    problem = _problem(name)
    got = _provider(f"flatkern[{backend}]").trace(problem)
    torch.testing.assert_close(got, problem.exact, **EXACT_TOL)


@pytest.mark.parametrize("name", ["tiny", "tiny-regression"])
@pytest.mark.parametrize("provider", ["autograd Hessian", "autograd HVP loop"])
def test_autograd_exact_rows_equal_the_reference(provider, name):
    problem = _problem(name)
    torch.testing.assert_close(_provider(provider).trace(problem), problem.exact, **EXACT_TOL)


def test_hvp_loop_is_exact_across_chunk_boundaries():
    # 42 parameters in chunks of 5: the last chunk is partial
    problem = _problem("tiny")
    torch.testing.assert_close(B.hvp_loop_trace(problem, chunk=5), problem.exact, **EXACT_TOL)


@pytest.mark.slow
def test_compiled_reference_equals_the_reference():
    problem = _problem("tiny")
    torch.testing.assert_close(_provider("torch.compile").trace(problem), problem.exact, **EXACT_TOL)


def test_backpack_diag_ggn_sums_to_the_exact_trace():
    pytest.importorskip("backpack")
    problem = _problem("tiny-regression")
    torch.testing.assert_close(B.backpack_trace(problem), problem.exact, **EXACT_TOL)


def _rademacher_std(problem, num_probes):
    # Var(vᵀHv) = 2 Σ_{i≠j} H_ij² for Rademacher v; the mean of m probes has std sqrt(Var / m)
    H = _explicit_hessian(problem)
    var = 2 * (H.square().sum() - H.diagonal().square().sum())
    assert var > 0  # otherwise the check below could not fail
    return (var / num_probes).sqrt()


@pytest.mark.parametrize("estimator", [B.hutchinson_loop, B.hutchinson_vmap], ids=["loop", "vmap"])
def test_hutchinson_is_unbiased_within_five_standard_errors(estimator):
    problem = _problem("tiny")
    m = 400
    std = _rademacher_std(problem, m)
    for seed in (0, 1):
        est = estimator(problem, num_probes=m, seed=seed)
        assert abs(est - problem.exact) < 5 * std, (est, problem.exact, std)


def test_hutchinson_error_shrinks_like_one_over_sqrt_probes():
    # the standard error of 100 probes, the benchmark's setting, is what the error column reports
    problem = _problem("tiny")
    errs = torch.stack([B.hutchinson_vmap(problem, num_probes=100, seed=s) - problem.exact for s in range(40)])
    rms, std = errs.square().mean().sqrt(), _rademacher_std(problem, 100)
    # 40 draws: rms² / std² ~ χ²_40 / 40, inside (0.36, 1.96) with probability > 0.999
    assert 0.6 * std < rms < 1.4 * std, (rms, std)


def test_curvlinops_hutchpp_is_unbiased_within_five_standard_errors():
    pytest.importorskip("curvlinops")
    problem = _problem("tiny")
    draws = torch.stack([B.curvlinops_hutchpp(problem, num_matvecs=12, seed=s) for s in range(20)])
    se = draws.std() / len(draws) ** 0.5  # Student t with 19 degrees of freedom: |t| > 5 has probability < 1e-4
    assert se > 0
    assert abs(draws.mean() - problem.exact) < 5 * se, (draws.mean(), problem.exact, se)


@pytest.mark.parametrize("provider", ["autograd Hessian", "Hutchinson-100 (PyHessian", "BackPACK", "curvlinops"])
def test_peers_without_a_batched_mode_skip_batched_problems_with_a_reason(provider):
    row = B.measure(_provider(provider), _problem("tiny-batched"), min_time=0.0, max_repeat=1)
    assert row["fwd_s"] is None and row["note"].startswith("skipped:")


def test_peak_memory_sees_a_known_allocation():
    nbytes = 64 * 2**20

    def allocate():
        return torch.ones(nbytes // 4).sum()  # touches every page of a 64 MiB tensor

    _, _, peak = B.peak_memory(allocate, "cpu")
    if peak is None:
        pytest.skip("peak resident memory is measured on Linux only")
    assert 0.9 * nbytes < peak < 1.5 * nbytes, peak / 2**20


def test_too_slow_provider_is_extrapolated_and_marked(monkeypatch):
    monkeypatch.setattr(peers, "HVP_MAX_PARAMS", 10)
    monkeypatch.setattr(peers, "HVP_CHUNK", 4)
    row = B.measure(_provider("autograd HVP loop"), _problem("tiny"), min_time=0.0, max_repeat=1)
    assert row["extrapolated"] and row["fwd_s"] > 0 and row["value"] is None
    assert "extrapolated" in row["note"]


def test_run_on_tiny_regimes_prints_and_writes_the_table(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = B.main(["--regimes", "tiny", "tiny-regression", "--min-time", "0", "--providers", "Hessian (", "BackPACK",
                 "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "time / flatkern" in printed and "autograd Hessian" in printed
    results = json.loads(out.read_text())
    rows = results["regimes"]["tiny"]["rows"]
    names = [r["provider"] for r in rows]
    assert "flatkern[torch]" in names and "autograd Hessian (torch.func.hessian)" in names
    for r in rows:  # every row that ran is exact to float32 precision; the flatkern row is the unit
        if r["fwd_s"] is not None:
            assert r["rel_err"] < 1e-5, r
    assert next(r for r in rows if r["provider"] == results["flatkern_row"])["slowdown_vs_flatkern"] == 1
    backpack_rows = [r for r in results["regimes"]["tiny-regression"]["rows"] if r["provider"].startswith("BackPACK")]
    assert backpack_rows and (backpack_rows[0]["rel_err"] is not None or "not installed" in backpack_rows[0]["note"])
    md = tmp_path / "bench.md"
    assert B.main(["--regimes", "tiny", "--min-time", "0", "--providers", "Hessian (", "--out", str(md)]) == 0
    assert "| flatkern[torch] | exact |" in md.read_text()


# ------------------------------------------------------------------ the timing harness


def test_interleave_runs_blocks_round_robin_after_warm_up_and_sizing():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    t = timing.interleave(fns, rounds=3, number=2, warmup=1)
    # warm-up and one sizing call per function, then blocks of 2 in turn, 3 rounds
    assert calls == ["a", "a", "b", "b"] + ["a", "a", "b", "b"] * 3
    assert list(t) == ["a", "b"]
    for timing_ in t.values():
        assert timing_.number == 2 and len(timing_.wall) == len(timing_.cpu) == 3 and timing_.calls == 6
        assert timing_.median > 0 and timing_.once > 0


def test_interleave_sizes_blocks_and_rounds_from_the_time_asked():
    import time

    sleep = lambda: time.sleep(2e-3)  # noqa: E731
    t = timing.interleave({"s": sleep}, min_block_s=0.02, warmup=0)["s"]
    assert 1 <= t.number <= 10  # at least 2 ms per call: at most 10 calls fill 20 ms
    assert len(t.wall) == 3  # no min_time: 3 rounds
    t = timing.interleave({"s": sleep}, min_time=1.0, max_rounds=7, warmup=0)["s"]
    assert len(t.wall) == 7  # 1 s of 2 ms calls would be 500 rounds: capped
    t = timing.interleave({"s": sleep}, min_time=1e-4, warmup=0)["s"]
    assert len(t.wall) == 3  # never fewer than 3 rounds


def test_interleave_synchronizes_cuda_around_every_timed_region(monkeypatch):
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("sync"))
    timing.interleave({"f": lambda: events.append("call")}, rounds=2, number=3, warmup=0, device="cuda")
    block = ["sync", "call", "call", "call", "sync"]
    assert events == ["sync", "call", "sync"] + block * 2  # the sizing call, then two rounds
    events.clear()
    timing.interleave({"f": lambda: events.append("call")}, rounds=1, number=1, warmup=0, device="cpu")
    assert "sync" not in events


def test_ratio_is_the_median_of_per_round_ratios():
    # a load spike in round 2 slowed both: per round 2, 2, 10, median 2; the ratio of medians would say 10
    a = timing.Timing(wall=[2.0, 20.0, 10.0])
    b = timing.Timing(wall=[1.0, 10.0, 1.0])
    assert timing.ratio(a, b) == 2.0
    assert timing.ratio(b, a) == 0.5


def test_measure_times_through_the_harness_with_cpu_time():
    row = B.measure(_provider("flatkern[torch]"), _problem("tiny"), min_time=0.0, max_repeat=5, memory=False)
    assert row["repeats"] == 3 and row["fwd_s"] > 0 and row["fwd_bwd_s"] > 0
    assert row["fwd_cpu_s"] > 0 and row["fwd_bwd_cpu_s"] > 0


def test_single_shot_provider_is_timed_by_its_first_call():
    row = B.measure(_provider("flatkern[torch]"), _problem("tiny"), min_time=0.0, single_shot=0.0, memory=False)
    assert row["repeats"] == 1 and row["fwd_s"] == row["first_s"] and "one timed call" in row["note"]


def test_auto_row_is_a_backend_that_is_available():
    assert B.flatkern_auto_backend("cpu") in flatkern.available_backends("cpu")


@pytest.mark.parametrize("floor", list(floors.PRODUCTS), ids=lambda f: f.__name__)
def test_bare_product_floors_do_the_products_they_count(floor):
    from torch.overrides import TorchFunctionMode

    class CountMM(TorchFunctionMode):
        count = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.mm:
                CountMM.count += 1
            return func(*args, **(kwargs or {}))

    ws = [torch.randn(5, 5, requires_grad=True) for _ in range(4)]
    with CountMM():
        floor(ws)
    assert CountMM.count == floors.PRODUCTS[floor]


# ------------------------------------------------------------------ cpu_kernels.py, training.py: their rows, not their speed


def test_bench_cpu_kernels_rows_return_the_reference_gradients():
    for title, ws, meas, compile_ref, floor in bck.cases():
        if title.startswith(("large", "batched")):
            continue  # the same code as the small cases, only slower
        if title.startswith("per-problem"):  # issue 21: one measurement set per problem, and a floor
            assert floor is not None and meas.batch_shape in ((), tuple(ws[0].shape[:-2]))
        providers = bck.providers_for(title, ws, meas, compile_ref, floor, quick=True)
        assert "torch eager" in providers and len(providers) >= 2
        bck.check_agreement(providers, rtol=1e-3)


def test_bench_training_steps_and_gradients_agree():
    title, ws, meas, b, small = next(bt.cases())  # d=30, L=3, Entries n=300
    providers = {
        "unregularized, plain torch": bt.unregularized(meas, b, "torch"),
        "unregularized, torch.optim.SGD": bt.unregularized_torch_optim(meas, b),
        "regularized, objective": bt.regularized_objective(meas, b, "auto"),
        "regularized, FlatnessRegularized": bt.regularized_optimizer(meas, b),
        "regularized, torch reference (unshared)": bt.regularized_reference(meas, b),
    }
    bt.check_agreement(providers, ws, rtol=1e-3)
    for title, ws, meas in bt.grad_cases():
        ref = bt.reference_grad(meas, ws, "torch")()
        rows = [bt.reference_grad(meas, ws, "auto")]
        if hasattr(flatkern, "hessian_trace_and_grad"):
            rows.append(bt.one_call_grad(meas, ws))
        for fn in rows:
            for a, r in zip(fn(), ref):
                torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4 * r.abs().max().item())


# ------------------------------------------------------------------ one home: the package; bench/ runs it


ROOT = Path(__file__).resolve().parents[1]
# bench/<script> -> the package module whose main() it runs, and the options it keeps
SCRIPTS = {
    "bench_cpu_kernels.py": ("cpu_kernels", ["--quick", "--rounds", "--threads", "--only"]),
    "bench_training.py": ("training", ["--quick", "--rounds", "--threads", "--only"]),
    "gpu_check.py": ("gpu_check", ["--device", "--tiny", "--budget", "--sections", "--out"]),
}


# scripts that drive the checkout's test fixtures, so cannot live in the installed package
CHECKOUT_ONLY = {"bench_ctrl_c.py"}  # runs tests/test_experiments.py's hold task under `flatkern reproduce`


def _entry_module(path):
    """The ``flatkern.benchmarks`` module whose ``main`` a thin script in bench/ runs (an AssertionError if it is more)."""
    tree = ast.parse(path.read_text())
    defined = [n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    assert not defined, f"bench/{path.name} defines {defined}: benchmark code belongs in flatkern/benchmarks/"
    assert len(tree.body) <= 8, f"bench/{path.name} is more than an entry script"
    mains = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
             and (n.module or "").startswith("flatkern.benchmarks.") and [a.name for a in n.names] == ["main"]]
    assert len(mains) == 1, f"bench/{path.name} does not run one flatkern.benchmarks module's main"
    return mains[0]


def test_benchmark_code_lives_in_the_package_and_bench_holds_thin_entry_scripts():
    for name, (module, _) in SCRIPTS.items():
        assert _entry_module(ROOT / "bench" / name) == f"flatkern.benchmarks.{module}"
    # and every other script in bench/ (but pytest's files) is as thin, running a module that exists
    for path in (ROOT / "bench").glob("*.py"):
        if path.name in {"conftest.py", *CHECKOUT_ONLY} | set(SCRIPTS) or path.name.startswith("test_"):
            continue
        assert hasattr(importlib.import_module(_entry_module(path)), "main"), path.name


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_bench_script_runs_the_package_module_with_the_same_options(name, monkeypatch, capsys):
    module, options = SCRIPTS[name]
    monkeypatch.setattr(sys, "path", list(sys.path))  # gpu_check.py puts the checkout first
    monkeypatch.setattr(sys, "argv", [str(ROOT / "bench" / name), "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / "bench" / name), run_name="__main__")
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"usage: {name}"), printed[:200]
    for option in options:
        assert option in printed, (option, printed)
    # the help is the package module's own: its docstring is the description
    doc = importlib.import_module(f"flatkern.benchmarks.{module}").__doc__
    assert " ".join(doc.split("\n")[0].split()) in " ".join(printed.split())  # (argparse rewraps it)


def test_gpu_check_parses_nothing_at_import_and_says_why_it_cannot_run(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["pytest", "--an-option-of-pytest"])  # import must not read these
    gpu_check = importlib.import_module("flatkern.benchmarks.gpu_check")
    with pytest.raises(SystemExit, match="only with --tiny"):
        gpu_check.main(["--device", "cpu"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device here"):
            gpu_check.main([])


def test_gpu_check_sections_are_checked_and_each_has_a_correctness_and_a_speed_step(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["pytest"])
    gpu_check = importlib.import_module("flatkern.benchmarks.gpu_check")
    assert gpu_check._parse([]).sections == list(gpu_check.SECTIONS)
    assert gpu_check._parse(["--sections", "per-problem, mlp"]).sections == ["per-problem", "mlp"]
    for bad in ("mlp,relu", "", ","):
        with pytest.raises(SystemExit):
            gpu_check._parse(["--sections", bad])
    # every correctness step runs before any speed step, and the shares of the budget add up to it
    names = [(section, step.__name__) for section, step, _ in gpu_check.STEPS]
    assert sorted(s for s, _ in names) == sorted(list(gpu_check.SECTIONS) * 2)
    kinds = ["speed" if "speed" in name else "correctness" for _, name in names]
    assert kinds == sorted(kinds), names
    assert sum(share for *_, share in gpu_check.STEPS) == pytest.approx(1.0)


def test_skipped_peers_suggest_the_readme_install_command(monkeypatch):
    # the README's command installs the peers with --no-deps (their dependencies replace a CPU torch);
    # a skip that suggested a bare `pip install backpack-for-pytorch` would undo that
    readme = (ROOT / "README.md").read_text()
    assert B.PEER_INSTALL.startswith("pip install --no-deps ") and B.PEER_INSTALL in readme
    monkeypatch.setitem(sys.modules, "backpack", None)  # `import backpack` now raises ImportError
    monkeypatch.setitem(sys.modules, "curvlinops", None)
    for name, family in (("BackPACK", "tiny-regression"), ("curvlinops", "tiny")):
        reason = _provider(name).skip(_problem(family))
        assert reason and "not installed" in reason and B.PEER_INSTALL in reason, reason


@pytest.mark.parametrize("L", [2, 3, 4])
@pytest.mark.parametrize("family", ["isotropic", "entries", "rankone", "dense", "inputs"])
@pytest.mark.parametrize("per_problem", [False, True], ids=["shared", "per_problem"])
def test_batched_family_floors_do_the_products_they_count(family, L, per_problem):
    """Issue 21 §3: ``floors.family_products`` does ``family_product_count`` products, for shared and
    per-problem measurement sets, and the L = 4 chain alone is trace_products' 12 (as torch.bmm)."""
    from helpers import make_weights, measurements_from, per_problem_sources
    from torch.overrides import TorchFunctionMode

    class CountMatmul(TorchFunctionMode):
        count = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (torch.matmul, torch.mm, torch.bmm):
                CountMatmul.count += 1
            return func(*args, **(kwargs or {}))

    dims = [5, 6, 4, 7, 3][: L + 1]
    ws = make_weights(dims, batch=(3,))
    tensors, _, _ = per_problem_sources(family, dims[-1], dims[0], (3,) if per_problem else (1,), n=4)
    if not per_problem:  # one shared set: drop the batch of one
        tensors = {k: v[0] if isinstance(v, torch.Tensor) else v for k, v in tensors.items()}
    meas = measurements_from(family, tensors)
    with CountMatmul():
        floors.family_products(ws, meas)
    assert CountMatmul.count == floors.family_product_count(meas.family, L)
    if L == 4:
        CountMatmul.count = 0
        with CountMatmul():
            floors.trace_products(ws)
        assert CountMatmul.count == 12 == floors.family_product_count(fk_families.ISOTROPIC, 4)


def test_the_sweeps_benchmark_compares_equal_records_and_equal_predictions():
    from flatkern.benchmarks import sweeps
    from flatkern.experiments.recovery import RecoverySettings

    r = sweeps.compare(("completion", 6, 1, 14, 2), (0, 1), RecoverySettings(steps=8, polish_steps=2), rounds=1)
    assert r["separate"] > 0 and r["batched"] > 0 and r["difference"] < 1e-12
    for per_problem in (False, True):
        r = sweeps.dense_predict(9, 4, 2, per_problem, rounds=1)
        assert r["flatkern"] > 0 and r["per-row"] > 0 and r["einsum"] > 0 and r["difference"] < 1e-14
    r = sweeps.convex("completion", 6, 1, 20)
    assert r["cvxpy"] > 0 and r["admm"] > 0 and r["gap"] <= 1e-7 and r["difference"] < 1e-6
