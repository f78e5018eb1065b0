"""The GPU check (``bench/gpu_check.py``) runs, tiny, in the Triton interpreter, and flags wrong answers.

Its ReLU-network section (the op ``flatkern::mlp_hessian_trace``, issue 19) and its per-problem
section (issue 21) have not run on CUDA yet: the dry run here is the proof that the script a GPU
session will run does every step, checks every case the brief lists and writes the table.  The
check's own numbers are not asserted on (times measure nothing in the interpreter); what is
asserted is that each case ran, passed its bound, and that a wrong answer would not pass.

Marked ``triton``: ``TRITON_INTERPRET=1 python -m pytest -m triton tests/test_gpu_check.py``.
"""

import itertools
import json
import os
import sys

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    # as tests/test_triton.py: the interpreter must be chosen before the kernels are decorated
    pytest.skip("the GPU check's dry run needs the Triton interpreter on CPU: TRITON_INTERPRET=1 python -m pytest "
                "-m triton", allow_module_level=True)

pytest.importorskip("triton")

import flatkern as fk  # noqa: E402
from flatkern.benchmarks import gpu_check  # noqa: E402
from flatkern.benchmarks.floors import family_product_count  # noqa: E402
from flatkern.kernels import families, routing  # noqa: E402

pytestmark = pytest.mark.triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TINY = ["--device", DEVICE, "--tiny"] if DEVICE == "cpu" else ["--tiny"]
PER_PROBLEM = {"Entries", "RankOne", "Dense", "Dense (kernel K)", "Inputs"}  # every family with operands


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """``(exit code, results JSON, table)`` of the tiny run of the two new sections."""
    out = tmp_path_factory.mktemp("gpu_check")
    argv = [*TINY, "--sections", "mlp,per-problem", "--out", str(out)]
    saved_argv = sys.argv
    try:
        rc = gpu_check.main(argv)
    finally:
        sys.argv = saved_argv
    suffix = "" if DEVICE == "cuda" else "_cpu_tiny"
    return rc, json.loads((out / f"gpu_check{suffix}.json").read_text()), (out / f"gpu_check{suffix}.md").read_text()


def test_dry_run_passes_and_skips_nothing(dry_run):
    rc, results, md = dry_run
    assert results["errors"] == [] and results["skipped"] == [], (results["errors"], results["skipped"])
    assert rc == 0
    assert results["sections"] == ["mlp", "per-problem"]
    for header in ("## ReLU-network op: correctness", "## ReLU-network op: time", "## Correctness",
                   "## Forward + backward time", "## Issue criteria"):
        assert header in md, header


def test_dry_run_checks_the_relu_op_in_every_dtype_loss_bias_and_activation(dry_run):
    _, results, _ = dry_run
    rows = results["mlp_correctness"]
    seen = {(r["dtype"], r["loss"], r["bias"], r["acts"]) for r in rows}
    for dtype, loss, bias, acts in itertools.product(("float32", "float64"), ("mse", "cross_entropy"), (True, False),
                                                     ("relu", "leaky 0.1 / relu")):
        assert (dtype, loss, bias, acts) in seen
    for r in rows:
        assert r["ok"], r
        if r["dtype"] in ("float32", "float64"):
            tol = 1e-4 if r["dtype"] == "float32" else 1e-10
            assert max(r["rel_err_terms"], r["rel_err_grads"], r["rel_err_value_and_grad"]) < tol, r
    # the low-precision dtypes: checked against the reference where the kernel takes them, else refused by name
    for dtype in (torch.float16, torch.bfloat16):
        name = str(dtype).replace("torch.", "")
        (row,) = [r for r in rows if r["dtype"] == name]
        if dtype in routing.MLP_TRITON.dtypes:
            assert row["rel_err_terms"] is not None
        else:
            assert row["bound"].startswith(f"refused, naming {name}") and "does not take" in row["bound"], row


def test_dry_run_times_the_relu_op_against_eager_compile_and_the_floors(dry_run):
    _, results, _ = dry_run
    providers = {t["provider"] for t in results["mlp_timings"]}
    assert providers == {f"{who} {kind}" for who in ("triton", "torch eager")
                         for kind in ("value", "value+autograd", "value-and-grad")} | {
        "torch.compile value+autograd", "floor: value GEMMs", "floor: value+grad GEMMs"}
    for t in results["mlp_timings"]:
        assert t["ms"] > 0
        if not t["provider"].startswith("floor"):
            assert t["vs_eager"] > 0 and t["vs_floor"] > 0, t
    criteria = {c["criterion"] for c in results["criteria"] if c["regime"].startswith("mlp")}
    assert "triton value / value GEMM floor <= 1.2" in criteria
    assert "triton value+autograd faster than torch.compile" in criteria


def test_dry_run_checks_and_times_per_problem_sets_of_every_family(dry_run):
    _, results, _ = dry_run
    rows = [r for r in results["correctness"] if r["case"].startswith("per-problem")]
    for family, dtype, path in itertools.product(PER_PROBLEM, ("float32", "float64"),
                                                 ("hessian_trace + autograd", "hessian_trace_and_grad")):
        (row,) = [r for r in rows if (r["family"], r["dtype"], r["path"]) == (family, dtype, path)]
        assert row["ok"] and row["batch"] == [2], row
    timed = {}
    for t in results["timings"]:
        timed.setdefault(t["regime"], set()).add(t["provider"])
    assert len(timed) == len(PER_PROBLEM) - 1  # Dense's kernel regime is checked, not timed
    codes = {"Entries": families.ENTRIES, "RankOne": families.RANK_ONE, "Dense": families.DENSE,
             "Inputs": families.INPUTS}
    for name, code in codes.items():
        (regime,) = [r for r in timed if f" {name} n=" in r]
        floor = f"floor: family_products ({family_product_count(code, 4)} batched)"
        assert timed[regime] == {"triton", "triton hessian_trace_and_grad", "torch eager", floor}, timed[regime]


def test_a_wrong_triton_answer_fails_the_check(monkeypatch):
    """The bounds bite: the triton routes made 1e-3 off (value, or the gradient only) give rows marked NO."""
    gpu_check.start([*TINY, "--sections", "mlp,per-problem"])
    real_of, real_vg = fk.hessian_trace_of, fk.hessian_trace_and_grad

    def off_of(*args, backend="auto", **kwargs):
        out = real_of(*args, backend=backend, **kwargs)
        return out * (1 + 1e-3) if backend == "triton" else out

    def off_grads(*args, backend="auto", **kwargs):
        value, grads = real_vg(*args, backend=backend, **kwargs)
        return value, ([g * (1 + 1e-3) for g in grads] if backend == "triton" else grads)

    monkeypatch.setattr(fk, "hessian_trace_of", off_of)
    monkeypatch.setattr(fk, "hessian_trace_and_grad", off_grads)
    for dtype in (torch.float32, torch.float64):
        gpu_check.mlp_case([4, 6, 3], 3, "cross_entropy", True, 0.0, dtype)
        gpu_check.per_problem_case("Entries", "entries", [4, 5, 3], (2,), 6, dtype)
    mlp = gpu_check.RESULTS["mlp_correctness"]
    assert len(mlp) == 2 and not any(r["ok"] for r in mlp), mlp
    per_problem = {(r["dtype"], r["path"]): r["ok"] for r in gpu_check.RESULTS["correctness"]}
    assert per_problem == {(d, p): p == "hessian_trace + autograd" for d in ("float32", "float64")
                           for p in ("hessian_trace + autograd", "hessian_trace_and_grad")}, per_problem


def test_a_budget_that_skips_every_check_is_no_pass(tmp_path):
    rc = gpu_check.main([*TINY, "--sections", "mlp,per-problem", "--budget", "0", "--out", str(tmp_path)])
    results = json.loads(next(tmp_path.glob("gpu_check*.json")).read_text())
    assert results["mlp_correctness"] == [] and results["correctness"] == [] and results["skipped"]
    assert rc == 1
