"""Each decision in one place (issue 17) and the exactness holes of issue 18 that live in the ops.

- the routing table: one record per kernel, read by ``backend=``, the fake kernels, the messages;
- the family registry: every row complete, C++ and the measurement classes agree with it;
- ``TraceProblem``: checked once, each call re-checks only shapes, dtype and device;
- a lean start: ``import flatkern`` imports neither torch's heavy parts nor triton;
- forward-mode derivatives and ``torch.func`` transforms: the right answer or a clear error;
- tied layers: an error, never the per-position answer;
- matrix completion: memory in the entries and the factors, never in ``d_L x d_0``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ALL_FAMILIES, make_measurements, make_weights

import flatkern as fk
from flatkern.kernels import BACKENDS, families, routing, schemas

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ the routing table


@pytest.mark.parametrize("kernel", [routing.CPP, routing.TRITON, routing.TORCH_OP, routing.REFERENCE],
                         ids=lambda k: k.backend)
def test_every_kernel_record_is_complete(kernel):
    assert kernel.backend in BACKENDS
    assert kernel.devices and kernel.dtypes and kernel.families and kernel.max_width > 1
    assert kernel.families <= set(families.FAMILIES)
    assert kernel.derivatives in (None, 1)
    assert isinstance(kernel.forward_mode, bool) and isinstance(kernel.empty_batch, bool)
    # unavailable() answers for any device without raising
    for device in ("cpu", "meta"):
        reason = kernel.unavailable(device)
        assert reason is None or isinstance(reason, str)


def test_one_list_of_backend_names():
    from flatkern import _checks
    assert _checks.BACKENDS is BACKENDS and routing.BACKENDS is BACKENDS


# device branches that pick no kernel: a precision (tf32 only where matmuls allow it)
_NOT_KERNEL_CHOICES = {("hessian_trace.py", "_dot_precision")}


def _branches_on_device(path: Path) -> list[str]:
    """``file:line: comparison`` for each comparison of a device type (``x.device.type == ...``) in
    ``path``, outside the functions of ``_NOT_KERNEL_CHOICES``."""
    found = []
    tree = ast.parse(path.read_text())
    for func in [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))]:
        if (path.name, getattr(func, "name", None)) in _NOT_KERNEL_CHOICES:
            continue
        body = func.body if isinstance(func, ast.Module) else [func]
        for node in (n for b in body for n in ast.walk(b)):
            if isinstance(node, ast.Compare):
                for side in [node.left, *node.comparators]:
                    if isinstance(side, ast.Attribute) and side.attr == "type" and "device" in ast.unparse(side.value):
                        found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    # a function nested in the module is walked twice: once from the module, once itself
    return sorted(set(line for line in found if not any(
        (path.name, f.name) in _NOT_KERNEL_CHOICES and f.lineno <= int(line.split(":")[1]) <= f.end_lineno
        for f in ast.walk(tree) if isinstance(f, ast.FunctionDef))))


def test_only_the_routing_table_branches_on_the_device_to_pick_a_kernel():
    # the public ops, the optimizer, the objective and the op's own modules ask the routing table
    paths = [ROOT / "flatkern" / name for name in ("ops.py", "objective.py", "optim.py", "nn.py")]
    paths += [ROOT / "flatkern/kernels" / name for name in ("schemas.py", "fake.py", "autograd.py",
                                                            "reference_kernel.py")]
    paths += [ROOT / "flatkern/kernels/triton/hessian_trace.py"]
    offenders = [line for p in paths for line in _branches_on_device(p)]
    assert offenders == [], offenders


def test_the_fake_kernel_sizes_saved_from_the_cpu_kernels_record():
    W = make_weights([4, 6, 5, 3], batch=(2,))
    for family in ALL_FAMILIES:
        meas, _ = make_measurements(family, 3, 4, n=30 if family == "dense_kernel" else 7)
        _, _, saved = schemas.hessian_trace(W, meas.family, list(meas.operands), False, 2.0, True)
        specs = routing.op_kernel("cpu").saved_specs(W, meas.family, list(meas.operands))
        assert [(tuple(s.shape), s.dtype) for s in saved] == [(tuple(shape), dtype) for shape, dtype in specs]


@pytest.mark.skipif(schemas._C is None, reason="the C++ extension is not built")
def test_refusals_name_what_the_record_says():
    W = [w.half() for w in make_weights([3, 4, 2])]
    with pytest.raises(RuntimeError, match=r'backend="cpp" cannot run here: its kernel does not take torch.float16 '
                                           r'\(takes torch.float32, torch.float64\); backend="torch" can'):
        fk.hessian_trace(W, fk.Isotropic(), backend="cpp")
    # "auto" takes the same record's word and answers with the reference
    torch.testing.assert_close(fk.hessian_trace(W, fk.Isotropic()), fk.hessian_trace(W, fk.Isotropic(),
                                                                                      backend="torch"))


def test_routes_follow_the_records():
    W = make_weights([3, 4, 2])
    assert routing.resolve("torch", W, families.ISOTROPIC) == "ref"
    expected = "op"  # the C++ kernel, or the plain-torch kernel registered for the op without it
    assert routing.resolve("auto", W, families.ISOTROPIC) == expected
    zero = [torch.zeros(0, 3, dtype=torch.float64), torch.zeros(2, 0, dtype=torch.float64)]
    assert routing.resolve("auto", zero, families.ISOTROPIC) == "ref"


# ------------------------------------------------------------------ the family registry


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_every_family_row_is_complete_and_decodes_what_it_encodes(family):
    meas, _ = make_measurements(family, 3, 4, n=30 if family == "dense_kernel" else 7)
    row = families.get(meas.family)
    assert row.code == meas.family and row.name and row.cls is type(meas)
    assert row.class_name == type(meas).__name__
    assert len(row.operands) == len(meas.operands)
    for k, t in enumerate(meas.operands):
        assert (t.dtype == torch.int64) == (k < row.index_operands)
    assert isinstance(row.norms, tuple) and len(row.norms) == 2
    assert row.base is None or row.base in families.FAMILIES
    if row.count_from is not None and family != "inputs":  # Inputs' n is N d_L, known with d_L
        assert row.measurement_count([t.shape for t in meas.operands]) == meas.n
    # decoding the encoding gives back the same reference terms
    W = make_weights([4, 5, 3])
    decoded = row.decode(meas.operands)
    torch.testing.assert_close(fk.reference.layer_terms_ref(W, decoded), fk.reference.layer_terms_ref(W, meas),
                               rtol=0, atol=0)


@pytest.mark.skipif(schemas._C is None, reason="the C++ extension is not built")
def test_cpp_extension_compiles_the_registry_codes():
    assert {k: int(v) for k, v in schemas._C.FAMILIES.items()} == {
        name: getattr(families, name) for name in ("ISOTROPIC", "ENTRIES", "RANK_ONE", "DENSE", "DENSE_KERNEL",
                                                   "INPUTS")}


def test_messages_list_the_families_from_the_registry():
    with pytest.raises(TypeError) as info:
        fk.hessian_trace(make_weights([3, 2]), "entries")
    assert families.families_message() in str(info.value)
    assert families.families_message() == "Isotropic, Entries, RankOne, Dense, Inputs"


def _imports(path: Path) -> set[str]:
    """The modules ``path`` imports at run time (imports under ``if TYPE_CHECKING:`` are annotations only)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            node.body = []
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            names.add(base)
            names.update(f"{base}.{a.name}" if base.endswith(".") is False else f"{base}{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_kernels_and_the_reference_never_import_upward():
    upward = ("measurements", "ops", "nn", "optim", "objective", "flattest_solution", "experiments")
    paths = list((ROOT / "flatkern/kernels").glob("*.py")) + list((ROOT / "flatkern/kernels/triton").glob("*.py"))
    paths.append(ROOT / "flatkern/reference.py")
    for path in paths:
        for name in _imports(path):
            parts = name.lstrip(".").split(".")
            assert not any(p in upward for p in parts), f"{path.relative_to(ROOT)} imports {name}"


# ------------------------------------------------------------------ a validated problem


def test_trace_problem_equals_hessian_trace_and_grad_and_checks_once(monkeypatch):
    W = make_weights([5, 7, 6, 4])
    meas, _ = make_measurements("entries", 4, 5, n=9)
    problem = fk.TraceProblem(W, meas)
    want, want_grads = fk.hessian_trace_and_grad(W, meas, backend="torch")
    checks = []
    monkeypatch.setattr(type(meas), "check", lambda self, *a: checks.append(a))
    for _ in range(3):
        trace, grads = problem(W)
        torch.testing.assert_close(trace, want, rtol=1e-12, atol=1e-12)
        for g, e in zip(grads, want_grads):
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    assert checks == []  # the measurements were checked at construction, not per call
    # a new shape is a new problem: checked again, in full
    W2 = make_weights([5, 8, 6, 4])
    problem(W2)
    assert len(checks) == 1


def test_trace_problem_refuses_what_hessian_trace_refuses():
    W = make_weights([3, 4, 2])
    square = torch.randn(3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="share memory"):
        fk.TraceProblem([square, square.view(3, 3)], fk.Isotropic())
    problem = fk.TraceProblem(W, fk.Isotropic())
    with pytest.raises(ValueError, match="do not chain"):
        problem([W[0], torch.randn(2, 5, dtype=torch.float64)])


@pytest.mark.parametrize("kind", ["entries", "isotropic", "dense"])
@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("kernel_adds", [True, False])
def test_trace_problem_accumulate_adds_alpha_times_the_gradient(kind, per_layer, kernel_adds, monkeypatch):
    from flatkern.kernels import schemas

    if not kernel_adds:  # the extension's entry absent: the gradients come back and Python adds them
        monkeypatch.setattr(schemas, "call_hessian_trace_and_grad_into", None)
    W = make_weights([5, 7, 6, 4])
    W[1] = W[1].T.contiguous().T  # a non-contiguous layer: the call makes it contiguous itself
    meas, _ = make_measurements(kind, 4, 5, n=9)
    want, want_grads = fk.hessian_trace_and_grad(W, meas, per_layer=per_layer, backend="torch")
    problem = fk.TraceProblem(W, meas, per_layer=per_layer)
    into = [torch.randn_like(w) for w in W]
    before = [g.clone() for g in into]
    versions = [g._version for g in into]
    trace = problem.accumulate(W, into, -0.375)
    torch.testing.assert_close(trace, want, rtol=1e-12, atol=1e-12)
    for g, g0, e, v in zip(into, before, want_grads, versions):
        torch.testing.assert_close(g, g0 - 0.375 * e, rtol=1e-12, atol=1e-12)
        assert g._version > v  # autograd sees an in-place change, as after add_


def test_trace_problem_accumulate_refuses_a_bad_into_before_changing_anything():
    W = make_weights([5, 7, 4])
    problem = fk.TraceProblem(W, fk.Isotropic())
    good = torch.zeros_like(W[1])
    for bad, match in [([torch.zeros(2, 2, dtype=torch.float64), good], r"into\[0\] must match weights\[0\]"),
                       ([torch.zeros_like(W[0], dtype=torch.float32), good], r"into\[0\]"),
                       ([torch.zeros_like(W[0])], "into has 1 tensors but weights has 2"),
                       ([torch.zeros_like(W[0]).requires_grad_(), good], "requires grad")]:
        with pytest.raises(RuntimeError, match=match):
            problem.accumulate(W, bad, 1.0)
        assert good.abs().sum() == 0


def test_the_fast_call_still_goes_through_the_dispatcher_when_something_must_see_the_op():
    """The unboxed C++ call (flatkern._C.call_hessian_trace_and_grad) runs the CPU kernel itself only
    when the dispatcher would add nothing: a TorchDispatchMode still sees the op, and a negative
    view (a dispatch key the raw kernel would ignore) still gets the right sign."""
    from torch.utils._python_dispatch import TorchDispatchMode

    W = make_weights([5, 7, 4])
    meas, _ = make_measurements("entries", 4, 5, n=9)
    want, want_grads = fk.hessian_trace_and_grad(W, meas, backend="torch")

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Record() as mode:
        trace, _ = fk.hessian_trace_and_grad(W, meas)
    assert "flatkern.hessian_trace_and_grad.default" in mode.ops
    torch.testing.assert_close(trace, want, rtol=1e-12, atol=1e-12)
    negated = [torch._neg_view(-w) for w in W]  # the same values, behind the Negative key
    trace, grads = fk.hessian_trace_and_grad(negated, meas)
    torch.testing.assert_close(trace, want, rtol=1e-12, atol=1e-12)
    for g, e in zip(grads, want_grads):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    into = [torch._neg_view(torch.zeros_like(w)) for w in W]  # added through add_, which honours the key
    fk.TraceProblem(W, meas).accumulate(W, into, 2.0)
    for g, e in zip(into, want_grads):
        torch.testing.assert_close(g, 2.0 * e, rtol=1e-12, atol=1e-12)


def test_the_optimizer_does_not_recheck_the_measurements_every_step(monkeypatch):
    model = fk.nn.DeepLinear([5, 6, 4], dtype=torch.float64)
    meas = fk.Entries.uniform(12, (4, 5), generator=torch.Generator().manual_seed(0))
    opt = fk.optim.FlatnessRegularized(model, torch.optim.SGD, lam=0.1, measurements=meas, lr=0.01)
    checks = []
    monkeypatch.setattr(type(meas), "check", lambda self, *a: checks.append(a))
    for _ in range(3):
        opt.zero_grad()
        fk.mse_loss(model.weights, meas, torch.zeros(12, dtype=torch.float64), backend="torch").backward()
        checks.clear()  # mse_loss checks its own inputs; the question is the optimizer's step
        opt.step()
        assert checks == []


# ------------------------------------------------------------------ lean start


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=ROOT).stdout


def test_import_flatkern_imports_neither_torch_nor_triton_until_used_and_cpu_work_never_imports_triton():
    out = _run("import sys, flatkern\n"
               "print('torch' in sys.modules, 'triton' in sys.modules)\n"
               "import torch\n"
               "W = [torch.randn(4, 3), torch.randn(2, 4)]\n"
               "flatkern.hessian_trace(W, flatkern.Isotropic())\n"
               "flatkern.hessian_trace_and_grad(W, flatkern.Entries.uniform(5, (2, 3)))\n"
               "print('triton' in sys.modules, hasattr(torch.ops.flatkern, 'hessian_trace'))\n")
    assert out.split() == ["False", "False", "False", "True"]


def test_the_function_objective_survives_importing_its_module():
    out = _run("import flatkern, flatkern.objective, flatkern.optim\n"
               "print(callable(flatkern.objective) and not hasattr(flatkern.objective, '__path__') "
               "and flatkern.objective.__name__ == 'objective')\n")
    assert out.strip() == "True"


# ------------------------------------------------------------------ forward mode and torch.func (issue 18.1)


def _fwd_problem():
    W = make_weights([3, 5, 4], seed=3)
    T = make_weights([3, 5, 4], seed=4)
    return W, T


@pytest.mark.parametrize("family", ["isotropic", "entries", "dense"])
def test_jvp_on_auto_equals_the_reference(family):
    W, T = _fwd_problem()
    meas, _ = make_measurements(family, 4, 3, n=6)
    f = {b: (lambda *w, b=b: fk.hessian_trace(list(w), meas, backend=b)) for b in ("auto", "torch")}
    want = torch.func.jvp(f["torch"], tuple(W), tuple(T))[1]
    got = torch.func.jvp(f["auto"], tuple(W), tuple(T))[1]
    assert want.abs() > 0
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # jacfwd agrees with jacrev of the reference
    jf = torch.func.jacfwd(f["auto"], argnums=0)(*W)
    jr = torch.func.jacrev(f["torch"], argnums=0)(*W)
    torch.testing.assert_close(jf, jr, rtol=1e-10, atol=1e-10)


def test_forward_ad_tangents_are_right_for_every_op_on_auto():
    import torch.autograd.forward_ad as fwAD
    W, T = _fwd_problem()
    meas, targets = make_measurements("entries", 4, 3, n=6)

    def tangents(backend):
        with fwAD.dual_level():
            duals = [fwAD.make_dual(w, t) for w, t in zip(W, T)]
            outs = [fk.hessian_trace(duals, meas, backend=backend),
                    *fk.objective(duals, meas, targets, lam=0.5, backend=backend),
                    fk.mse_loss(duals, meas, targets, backend=backend)]
            return [fwAD.unpack_dual(o).tangent for o in outs]

    want, got = tangents("torch"), tangents("auto")
    for g, w in zip(got, want):
        assert g is not None
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(schemas._C is None, reason="the C++ extension is not built")
@pytest.mark.parametrize("op", ["hessian_trace", "hessian_trace_and_grad", "mse_loss", "objective"])
def test_forward_mode_on_cpp_is_a_clear_error(op):
    W, T = _fwd_problem()
    meas, targets = make_measurements("entries", 4, 3, n=6)
    call = {
        "hessian_trace": lambda *w: fk.hessian_trace(list(w), meas, backend="cpp"),
        "hessian_trace_and_grad": lambda *w: fk.hessian_trace_and_grad(list(w), meas, backend="cpp")[0],
        "mse_loss": lambda *w: fk.mse_loss(list(w), meas, targets, backend="cpp"),
        "objective": lambda *w: fk.objective(list(w), meas, targets, lam=0.5, backend="cpp")[0],
    }[op]
    with pytest.raises(RuntimeError, match=r'backend="cpp" cannot run here: .*(forward|torch.func).*backend="torch"'):
        torch.func.jvp(call, tuple(W), tuple(T))


def test_vmap_and_grad_on_auto_equal_the_reference():
    W = make_weights([3, 5, 4], batch=(3,), seed=5)
    meas, _ = make_measurements("rankone", 4, 3, n=6)
    f = {b: (lambda *w, b=b: fk.hessian_trace(list(w), meas, backend=b)) for b in ("auto", "torch")}
    torch.testing.assert_close(torch.func.vmap(f["auto"])(*W), torch.func.vmap(f["torch"])(*W))
    single = [w[0] for w in W]
    for a, b in zip(torch.func.grad(f["auto"], argnums=(0, 1))(*single),
                    torch.func.grad(f["torch"], argnums=(0, 1))(*single)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ tied layers (issue 18.2)


@pytest.mark.parametrize("tie", ["same", "view", "transpose", "overlapping_slices"])
def test_a_weight_at_two_positions_is_an_error(tie):
    base = torch.randn(4, 4, dtype=torch.float64)
    other = {"same": base, "view": base.view(4, 4), "transpose": base.t(),
             "overlapping_slices": None}[tie]
    W = [base, other]
    if tie == "overlapping_slices":
        big = torch.randn(5, 4, dtype=torch.float64)
        W = [big[:4], big[1:]]
    for fn in (lambda: fk.hessian_trace(W, fk.Isotropic()),
               lambda: fk.hessian_trace_and_grad(W, fk.Isotropic()),
               lambda: fk.objective(W, fk.Isotropic(), torch.zeros(4, 4, dtype=torch.float64), lam=1.0)):
        with pytest.raises(ValueError, match=r"weights\[0\] \(layer W_1\) and weights\[1\] \(layer W_2\) are the same tensor or share memory"):
            fn()


def test_distinct_slices_of_one_tensor_are_distinct_layers():
    big = torch.randn(3, 4, 4, dtype=torch.float64)
    interleaved = torch.randn(4, 8, dtype=torch.float64)
    for W in ([big[0], big[1], big[2]], [interleaved[:, 0::2], interleaved[:, 1::2]]):
        torch.testing.assert_close(fk.hessian_trace(W, fk.Isotropic()),
                                   fk.hessian_trace([w.clone() for w in W], fk.Isotropic()))


# ------------------------------------------------------------------ completion at scale (issue 18.7)


def test_entries_operands_cost_memory_in_the_entries_not_in_the_matrix():
    meas = fk.Entries(torch.tensor([0, 99_999, 5]), torch.tensor([3, 0, 99_999]), (100_000, 100_000))
    assert sum(t.numel() for t in meas.operands) == 2 * 3


def test_a_20000_by_20000_completion_trace_and_gradient_match_the_reference():
    d, r, n = 20_000, 10, 1000
    g = torch.Generator().manual_seed(0)
    meas = fk.Entries(torch.randint(d, (n,), generator=g), torch.randint(d, (n,), generator=g), (d, d))
    W = [torch.randn(r, d, generator=g, dtype=torch.float64) / d ** 0.5,
         torch.randn(r, r, generator=g, dtype=torch.float64) / r ** 0.5,
         torch.randn(d, r, generator=g, dtype=torch.float64) / r ** 0.5]
    trace, grads = fk.hessian_trace_and_grad(W, meas)
    want, want_grads = fk.hessian_trace_and_grad(W, meas, backend="torch")
    torch.testing.assert_close(trace, want, rtol=1e-10, atol=0)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
