"""The Triton backend against the plain-torch reference (forward and gradients).

Without a GPU the kernels run in Triton's interpreter on CPU tensors, which
must be switched on before the process starts; with one they run on CUDA.
Every test is marked ``triton``: the default run skips them, run them with
``TRITON_INTERPRET=1 python -m pytest -m triton``.  Shapes are small because the
interpreter executes every program in Python.
"""

import os

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    # @triton.jit picks the interpreter when a kernel is decorated, so the variable must be
    # set before the process imports triton; setting it here would leak into other test modules
    pytest.skip(
        "Triton kernels need CUDA, or the interpreter on CPU: TRITON_INTERPRET=1 python -m pytest -m triton",
        allow_module_level=True,
    )

triton = pytest.importorskip("triton")

from helpers import DIMS, FAMILIES, autograd_hessian_trace, make_measurements, make_weights, terms_and_grads  # noqa: E402

import flatkern as fk  # noqa: E402
from flatkern.kernels import triton_chain as tc  # noqa: E402
from flatkern.reference import layer_terms_ref  # noqa: E402

pytestmark = pytest.mark.triton

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

SMALL_DIMS = DIMS  # the small path pads these widths to 16
# wider than 32 and no power of two: padded to 64, products over several K-chunks of the kernels
WIDE_SMALL_DIMS = [37, 40, 33, 38]
# wider than one 16-wide tile so the large path's kernels run several tiles per matrix
LARGE_DIMS = [
    [37, 20],
    [37, 20, 45, 18],
]
# (atol, rtol) against a float64 reference
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-4, 1e-4)}
# RankOne with more measurements than one 16-row block of the kernel's loop
N_MEAS = {"rankone": 37}


def _problem(family, dims, batch=(), dtype=torch.float64, seed=0):
    W = make_weights(dims, batch=batch, dtype=dtype, seed=seed, requires_grad=True)
    W = [w.detach().to(DEVICE).requires_grad_() for w in W]
    meas, targets = make_measurements(family, dims[-1], dims[0], n=N_MEAS.get(family, 7), dtype=dtype, seed=seed + 1)
    return W, meas.to(DEVICE), targets.to(DEVICE)


def _assert_matches_reference(W, meas, dtype=torch.float64, **kw):
    ref_W = [w.detach().double().requires_grad_() for w in W]
    ref_meas = meas.to(torch.float64)
    expected, expected_grads = terms_and_grads(layer_terms_ref, ref_W, ref_meas)
    got, grads = terms_and_grads(lambda w, m: tc.layer_terms(w, m, **kw), W, meas)
    atol, rtol = TOL[dtype]
    assert got.dtype == dtype and got.shape == expected.shape
    torch.testing.assert_close(got.double(), expected, atol=atol, rtol=rtol)
    for j, (a, b) in enumerate(zip(grads, expected_grads)):
        assert a.shape == W[j].shape and a.dtype == dtype
        torch.testing.assert_close(a.double(), b, atol=atol, rtol=rtol, msg=lambda m: f"grad of W_{j + 1}: {m}")


@pytest.mark.parametrize("dims", SMALL_DIMS, ids=lambda d: f"L{len(d) - 1}")
@pytest.mark.parametrize("family", FAMILIES)
def test_small_path_terms_and_gradients_match_reference(family, dims):
    W, meas, _ = _problem(family, dims, batch=(2,))
    _assert_matches_reference(W, meas, path="small")


@pytest.mark.parametrize("family", FAMILIES)
def test_small_path_beyond_width_32_matches_reference(family):
    W, meas, _ = _problem(family, WIDE_SMALL_DIMS, batch=(2,))
    assert tc._plan(W, tc._PATHS["auto"]) == "small"
    _assert_matches_reference(W, meas, path="auto")


def test_auto_takes_the_small_path_up_to_its_width_and_depth():
    def plan(dims):
        return tc._plan([torch.empty(dims[j + 1], dims[j], device=DEVICE) for j in range(len(dims) - 1)], 0)

    assert tc.SMALL_MAX_WIDTH == 128
    assert plan([128, 5, 128]) == "small" and plan([3] * (tc.MAX_SMALL_DEPTH + 1)) == "small"
    assert plan([129, 5, 3]) == "large" and plan([3] * (tc.MAX_SMALL_DEPTH + 2)) == "large"


@pytest.mark.parametrize("dims", LARGE_DIMS, ids=lambda d: f"L{len(d) - 1}")
@pytest.mark.parametrize("family", FAMILIES)
def test_large_path_terms_and_gradients_match_reference_over_several_tiles(family, dims):
    W, meas, _ = _problem(family, dims, batch=(2,))
    _assert_matches_reference(W, meas, path="large", block=16)


@pytest.mark.parametrize("rows,cols,store", [(True, True, True), (True, False, False), (False, True, True)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_gemm_epilogue_norms_match_torch(rows, cols, store, dtype):
    # several 16-tiles in M, N and K, a shared (2-D) left factor and a transposed right one
    g = torch.Generator().manual_seed(0)
    a = torch.randn(37, 45, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    b = torch.randn(3, 50, 45, generator=g, dtype=torch.float64).to(DEVICE, dtype).transpose(-1, -2)
    c, r, s = tc._TritonReductions(16).mm(a, b, rows=rows, cols=cols, store=store)
    expected = a.double() @ b.double()
    atol, rtol = TOL[dtype]
    for got, want, asked in ((c, expected, store), (r, expected.square().sum(-1), rows),
                             (s, expected.square().sum(-2), cols)):
        if asked:
            assert got.dtype == dtype
            torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol)
        else:
            assert got is None


@pytest.mark.parametrize("path", ["small", "large"])
@pytest.mark.parametrize("family", FAMILIES)
def test_float32_terms_and_gradients_match_float64_reference(family, path):
    W, meas, _ = _problem(family, [6, 19, 17, 5], dtype=torch.float32)
    _assert_matches_reference(W, meas, dtype=torch.float32, path=path, block=16)


@pytest.mark.parametrize("dtype,family", [(torch.bfloat16, "isotropic"), (torch.bfloat16, "entries"),
                                          (torch.bfloat16, "rankone"), (torch.float16, "isotropic")])
def test_low_precision_error_is_at_most_twice_the_plain_torch_error(dtype, family):
    # the kernels accumulate in fp32; plain torch rounds every product to the low precision
    W, meas, _ = _problem(family, [6, 9, 7, 5], dtype=dtype, seed=3)
    exact, exact_grads = terms_and_grads(layer_terms_ref, [w.detach().double().requires_grad_() for w in W],
                                          meas.to(torch.float64))
    torch_bf16, torch_grads = terms_and_grads(layer_terms_ref, W, meas)
    got, grads = terms_and_grads(tc.layer_terms, W, meas)
    assert got.dtype == dtype and all(g.dtype == dtype for g in grads)

    def err(a, b):
        return (a.double() - b).abs().max().item()

    assert err(got, exact) <= 2 * err(torch_bf16, exact)
    for g, t, e in zip(grads, torch_grads, exact_grads):
        assert err(g, e) <= 2 * err(t, e)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("family", FAMILIES)
def test_hessian_trace_with_triton_backend_matches_autograd_hessian(family, reduction):
    dims = [3, 5, 2, 4]
    W, meas, targets = _problem(family, dims)
    if reduction == "sum" and family == "isotropic":
        meas = fk.Isotropic(n=7)
    got = fk.hessian_trace(W, meas, reduction=reduction, per_layer=True, backend="triton")
    expected = autograd_hessian_trace([w.cpu() for w in W], meas.to("cpu"), targets.cpu(), reduction, per_layer=True)
    torch.testing.assert_close(got.cpu(), expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_trace_matches_reference_per_problem(family):
    W, meas, _ = _problem(family, [3, 6, 2, 5], batch=(2, 3))
    got = fk.hessian_trace(W, meas, backend="triton")
    assert got.shape == (2, 3)
    for idx in [(0, 0), (1, 2), (0, 1)]:
        expected = fk.hessian_trace([w[idx] for w in W], meas, backend="torch")
        torch.testing.assert_close(got[idx], expected, atol=1e-10, rtol=1e-10)


def test_depth_one_trace_is_constant_with_zero_gradient():
    W, meas, _ = _problem("dense", [5, 3])
    terms, (grad,) = terms_and_grads(tc.layer_terms, W, meas)
    torch.testing.assert_close(terms, layer_terms_ref(W, meas).detach())
    assert torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("path", ["small", "large"])
@pytest.mark.parametrize("family", ["entries", "rankone", "dense"])
def test_gradcheck_float64(family, path):
    W, meas, _ = _problem(family, [3, 4, 2, 3])
    assert torch.autograd.gradcheck(lambda *w: tc.layer_terms(list(w), meas, path=path, block=16), tuple(W), fast_mode=True)


def test_registered_op_passes_opcheck():
    W, meas, _ = _problem("entries", [3, 4, 2, 3], batch=(2,))
    family, data = tc._family_data(meas, 3, 3, W[0])
    checks = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if DEVICE.type == "cpu":
        # the interpreter reads the data pointers of the fake tensors AOT dispatch traces with
        checks = checks[:-1]
    for path in (1, 2):
        torch.library.opcheck(torch.ops.flatkern.triton_layer_terms.default, (W, family, data, path, 16), test_utils=checks)


@pytest.mark.parametrize("path", [1, 2], ids=["small", "large"])
def test_registered_op_autograd_matches_reference(path):
    # compiled graphs call the registered op and its registered autograd, not the eager Function
    W, meas, _ = _problem("rankone", [3, 5, 4, 2], batch=(2,))
    family, data = tc._family_data(meas, 2, 3, W[0])
    expected, expected_grads = terms_and_grads(layer_terms_ref, W, meas)
    got, grads = terms_and_grads(lambda w, m: torch.ops.flatkern.triton_layer_terms(w, family, data, path, 16)[0],
                                  W, meas)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_cpu_registration_without_interpreter_runs_the_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    W = [w.cpu().detach().requires_grad_() for w in make_weights([3, 5, 4, 2])]
    meas, _ = make_measurements("rankone", 2, 3)
    assert tc.unavailable_reason(torch.device("cpu")) is not None
    expected, expected_grads = terms_and_grads(layer_terms_ref, W, meas)
    got, grads = terms_and_grads(tc.layer_terms, W, meas)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_unavailable_reason_follows_the_backend_contract(monkeypatch):
    assert tc.unavailable_reason(torch.device("cuda")) is None
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tc.unavailable_reason(torch.device("cpu")) is None
    assert "triton" in fk.available_backends("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in tc.unavailable_reason(torch.device("cpu"))
    assert "meta" in tc.unavailable_reason(torch.device("meta"))


def test_torch_compile_traces_the_op_with_its_autograd():
    W, meas, _ = _problem("entries", [3, 6, 5, 4], batch=(2,))

    def trace(*w):
        return fk.hessian_trace(list(w), meas, backend="triton").sum()

    expected, expected_grads = terms_and_grads(lambda w, m: trace(*w), W, meas)
    # AOT tracing runs the interpreter on fake tensors, so on CPU only dynamo's capture is checked;
    # on a GPU inductor traces into the Triton kernels
    compiled = torch.compile(trace, backend="inductor" if DEVICE.type == "cuda" else "eager")
    got, grads = terms_and_grads(lambda w, m: compiled(*w), W, meas)
    torch.testing.assert_close(got, expected)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b)


def test_bad_path_and_block_are_rejected_with_their_values():
    W, meas, _ = _problem("isotropic", [3, 4])
    with pytest.raises(ValueError, match="path must be one of .*'tiny'"):
        tc.layer_terms(W, meas, path="tiny")
    with pytest.raises(ValueError, match="block must be a power of two >= 16, got 24"):
        tc.layer_terms(W, meas, block=24)
    wide, meas, _ = _problem("isotropic", [3, 129])
    with pytest.raises(ValueError, match=r"path=\"small\" needs every width <= 128.*\[3, 129\]"):
        tc.layer_terms(wide, meas, path="small")


_SM90_COMPILE = r"""
import inspect
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from flatkern.kernels import triton_chain as tc


def compile_h200(fn, constexprs, num_warps=4, types=None):
    # every pointer fp32, every other run-time argument an integer (i64: strides and offsets)
    types = types or {}
    sig = {k: types.get(k, "*fp32" if k[0].isupper() else "i64") for k in inspect.signature(fn.fn).parameters
           if k not in constexprs}
    src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in constexprs}}, constexprs=constexprs)
    assert triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}).asm["cubin"]


ints = {k: "i32" for k in tc._RUNTIME_INTS}
# every family at the smallest tile; the widest (D = 128, the K-chunked products) for Isotropic
for D, families in ((16, range(5)), (128, [0])):
    for family in families:
        consts = dict(D=D, FAMILY=family, BN=16, BK=tc.SMALL_BK, PREC="ieee")
        for kernel in (tc._chain_small_fwd_kernel, tc._chain_small_bwd_kernel):
            compile_h200(kernel, consts, tc._num_warps(D), ints)
cfg = tc._gemm_config(None, tc.torch.float32)
warps = cfg.pop("num_warps")
cfg.pop("num_stages")
compile_h200(tc._mm_norms_kernel, dict(cfg, STORE_C=True, ROWS=True, COLS=True, PREC="ieee"), warps,
             {k: "i32" for k in ("M", "N", "K")})
blocks = dict(BLOCK_M=64, BLOCK_N=64)
compile_h200(tc._rowsq_kernel, blocks, types={"M": "i32", "N": "i32"})
compile_h200(tc._scale_kernel, blocks, types={"M": "i32", "N": "i32"})
print("compiled for sm_90")
"""


@pytest.mark.skipif(DEVICE.type == "cuda", reason="on a GPU every other test compiles the kernels for real")
def test_kernels_compile_for_sm90_without_a_gpu():
    # The interpreter never lowers the kernels, so this is what catches code only the GPU compiler
    # rejects.  It runs in a fresh process: with TRITON_INTERPRET=1 the kernels here are interpreted.
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", _SM90_COMPILE], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "compiled for sm_90" in done.stdout, done.stderr[-3000:]
