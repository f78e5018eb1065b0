"""flatkern.objective: (mse_loss + lam * hessian_trace, hessian_trace) from one shared pass."""

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import flatkern
from flatkern.objective import objective
from flatkern.reference import layer_terms_and_end_to_end_ref

pytestmark = pytest.mark.filterwarnings("ignore:flatkern. using the plain-torch backend")

CPP = "cpp" in flatkern.available_backends("cpu")
needs_cpp = pytest.mark.skipif(not CPP, reason="the C++ extension flatkern._C is not built")
TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=1e-4, rtol=1e-4)}


def _family(name, d_L, d_0, g, dtype):
    if name == "isotropic":
        return flatkern.Isotropic(n=7)
    if name == "entries":
        return flatkern.Entries.uniform(min(9, d_L * d_0), (d_L, d_0), generator=g)
    if name == "rank_one":
        return flatkern.RankOne(torch.randn(6, d_L, dtype=dtype, generator=g), torch.randn(6, d_0, dtype=dtype, generator=g))
    if name == "dense":
        return flatkern.Dense(torch.randn(5, d_L, d_0, dtype=dtype, generator=g))
    return flatkern.Inputs(torch.randn(4, d_0, dtype=dtype, generator=g))


def _case(dims, family, batch=(), dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    ws = [(torch.randn(*batch, dims[j + 1], dims[j], dtype=dtype, generator=g) / dims[j] ** 0.5).requires_grad_()
          for j in range(len(dims) - 1)]
    meas = _family(family, dims[-1], dims[0], g, dtype)
    shape = meas.target_shape(dims[-1], dims[0])
    targets = torch.randn(*batch, *shape, dtype=dtype, generator=g)
    return ws, meas, targets


def _check_against_separate_ops(ws, meas, targets, lam, reduction, backend, tol):
    loss, trace = objective(ws, meas, targets, lam=lam, reduction=reduction, backend=backend)
    got = torch.autograd.grad(loss.sum(), ws)
    ref_ws = [w.detach().clone().requires_grad_() for w in ws]
    ref_trace = flatkern.hessian_trace(ref_ws, meas, reduction=reduction, backend="torch")
    ref_loss = flatkern.mse_loss(ref_ws, meas, targets, reduction, backend="torch") + lam * ref_trace
    want = torch.autograd.grad(ref_loss.sum(), ref_ws)
    torch.testing.assert_close(trace, ref_trace, **tol)
    torch.testing.assert_close(loss, ref_loss, **tol)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tol)


FAMILIES = ["isotropic", "entries", "rank_one", "dense", "inputs"]
SHAPES = [([5, 3], ()), ([4, 7, 3], ()), ([5, 7, 2, 3], ()), ([3, 11, 5, 4, 2], ()), ([4, 6, 5, 3], (2,))]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dims, batch", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_torch_path_equals_mse_loss_plus_lam_hessian_trace(family, dims, batch, reduction):
    ws, meas, targets = _case(dims, family, batch)
    _check_against_separate_ops(ws, meas, targets, 0.37, reduction, "torch", TOL[torch.float64])


@needs_cpp
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dims, batch", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpp_fused_path_equals_mse_loss_plus_lam_hessian_trace(family, dims, batch, dtype):
    ws, meas, targets = _case(dims, family, batch, dtype=dtype)
    _check_against_separate_ops(ws, meas, targets, 0.37, "mean", "cpp", TOL[dtype])


class _CountOps(TorchDispatchMode):
    """Counts the calls of each op below autograd (``flatkern::hessian_trace`` included)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@needs_cpp
def test_auto_forms_e_and_the_trace_in_one_call_of_the_op_on_cpu():
    ws, meas, targets = _case([5, 7, 4], "entries")
    with _CountOps() as counter:
        objective(ws, meas, targets, lam=0.1)
    assert counter.calls.count("flatkern.hessian_trace") == 1
    assert not any(c in ("aten.mm", "aten.bmm", "aten.matmul") for c in counter.calls)  # E came from the op


class _CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.bmm, torch.ops.aten.addmm):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("depth", [2, 3, 5])
def test_torch_path_forms_each_chain_product_once(depth):
    # prefix Q_3..Q_L (L-2), E = W_L Q_L (1), suffix P_{L-2}..P_1 (L-2): 2L-3 products,
    # where mse_loss + hessian_trace separately need (L-1) + (2L-4)
    ws, meas, targets = _case([4] * (depth + 1), "isotropic")
    with torch.no_grad(), _CountMatmuls() as counter:
        objective(ws, meas, targets, lam=0.5, backend="torch")
    assert counter.count == 2 * depth - 3


def test_layer_terms_and_end_to_end_ref_matches_the_reference_pieces():
    ws, meas, _ = _case([5, 6, 4, 3], "rank_one")
    terms, E = layer_terms_and_end_to_end_ref(ws, meas)
    torch.testing.assert_close(terms, flatkern.reference.layer_terms_ref(ws, meas))
    torch.testing.assert_close(E, flatkern.reference.end_to_end_ref(ws))


def test_lam_zero_gives_the_plain_loss_and_a_tensor_lam_broadcasts_over_the_batch():
    ws, meas, targets = _case([4, 6, 3], "entries", batch=(3,))
    loss, trace = objective(ws, meas, targets, lam=0.0, backend="torch")
    torch.testing.assert_close(loss, flatkern.mse_loss(ws, meas, targets, backend="torch"))
    lams = torch.tensor([0.0, 0.5, 2.0], dtype=torch.float64)
    loss, trace = objective(ws, meas, targets, lam=lams, backend="torch")
    torch.testing.assert_close(loss, flatkern.mse_loss(ws, meas, targets, backend="torch") + lams * trace)


def test_bad_arguments_raise_clear_errors():
    ws, meas, targets = _case([4, 6, 3], "entries")
    with pytest.raises(ValueError, match=r"targets has shape \(4,\)"):
        objective(ws, meas, targets[:4], lam=0.1)
    with pytest.raises(ValueError, match="reduction must be one of"):
        objective(ws, meas, targets, lam=0.1, reduction="max")
    with pytest.raises(ValueError, match="backend must be one of"):
        objective(ws, meas, targets, lam=0.1, backend="cuda")
    with pytest.raises(TypeError, match="lam must be a number"):
        objective(ws, meas, targets, lam="0.1")
    with pytest.raises(TypeError, match="lam must be a number"):
        objective(ws, meas, targets, lam=True)
    with pytest.raises(ValueError, match="needs the number of measurements"):
        objective(ws, flatkern.Isotropic(), torch.zeros(3, 4, dtype=torch.float64), lam=0.1, reduction="sum")


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=needs_cpp)])
@pytest.mark.parametrize("family", ["entries", "inputs"])
def test_objective_passes_gradcheck(backend, family):
    ws, meas, targets = _case([3, 5, 4, 2], family)

    def f(*ws):
        loss, trace = objective(list(ws), meas, targets, lam=0.3, backend=backend)
        return loss, trace

    assert torch.autograd.gradcheck(f, tuple(w.detach().requires_grad_() for w in ws))


@pytest.mark.parametrize("lam", [-1.0, -1, math.nan, math.inf, -math.inf])
def test_a_negative_or_non_finite_lam_raises(lam):
    ws, meas, targets = _case([4, 6, 3], "entries")
    with pytest.raises(ValueError, match="lam must be a finite number >= 0"):
        objective(ws, meas, targets, lam=lam)


@pytest.mark.parametrize("lam", [[0.5, -0.1, 1.0], [0.5, math.nan, 1.0], [math.inf, 0.0, 0.0]])
def test_a_tensor_lam_with_a_negative_or_non_finite_entry_raises(lam):
    ws, meas, targets = _case([4, 6, 3], "entries", batch=(3,))
    with pytest.raises(ValueError, match="lam must be finite and >= 0 everywhere"):
        objective(ws, meas, targets, lam=torch.tensor(lam, dtype=torch.float64))


def test_numpy_lams_are_numbers():
    ws, meas, targets = _case([4, 6, 3], "entries")
    want, _ = objective(ws, meas, targets, lam=0.25, backend="torch")
    for lam in (np.float32(0.25), np.float64(0.25)):
        got, _ = objective(ws, meas, targets, lam=lam, backend="torch")
        torch.testing.assert_close(got, want, atol=0, rtol=0)


_COMPILED_LAM_SCRIPT = textwrap.dedent(
    r"""
    import json, math, warnings
    import torch, flatkern as fk
    warnings.simplefilter("ignore")  # the plain-torch fallback notice, when the extension is absent
    torch.manual_seed(0)
    W = [torch.randn(6, 4, dtype=torch.float64, requires_grad=True), torch.randn(3, 6, dtype=torch.float64, requires_grad=True)]
    m = fk.Entries.uniform(7, (3, 4))
    b = torch.randn(7, dtype=torch.float64)
    fn = torch.compile(lambda lam, *ws: fk.objective(list(ws), m, b, lam=lam)[0], fullgraph=True)
    good = torch.tensor(0.3, dtype=torch.float64)
    value, eager = fn(good, *W), fk.objective(W, m, b, lam=0.3)[0]
    grads, eager_grads = torch.autograd.grad(value, W), torch.autograd.grad(eager, W)
    out = {"error": max([float((value - eager).abs())] + [float((g - e).abs().max()) for g, e in zip(grads, eager_grads)])}
    for bad in (-1.0, math.nan, math.inf):
        try:
            out[repr(bad)] = "returned " + repr(float(fn(torch.tensor(bad, dtype=torch.float64), *W)))
        except ValueError as exc:
            out[repr(bad)] = "ValueError: " + str(exc)
    print("RESULT " + json.dumps(out))
    """
)


def test_a_bad_tensor_lam_raises_under_torch_compile_fullgraph(tmp_path):
    # compiled, a tensor lam's values are only known when the graph runs: they are checked there,
    # not skipped (issue 18 item 6: the compiled objective returned data - trace for lam = -1)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", _COMPILED_LAM_SCRIPT], capture_output=True, text=True,
                          timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])
    assert out.pop("error") < 1e-12  # a good lam: the compiled value and gradients are eager's
    for bad, what in out.items():
        assert what.startswith("ValueError: lam must be finite and >= 0 everywhere"), (bad, what)
