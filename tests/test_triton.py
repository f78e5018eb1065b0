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

from helpers import (  # noqa: E402
    ALL_FAMILIES, DIMS, FAMILIES, autograd_hessian_trace, make_measurements, make_weights, measurements_from,
    per_problem_sources, terms_and_grads,
)

import flatkern as fk  # noqa: E402
from flatkern.kernels import families  # noqa: E402
from flatkern.kernels import routing  # noqa: E402
from flatkern.kernels.triton import hessian_trace as tt  # noqa: E402  (the launchers)
from flatkern.kernels.triton import hessian_trace as ht  # noqa: E402
from flatkern.kernels.triton import large, small  # noqa: E402
from flatkern.reference import end_to_end_ref, layer_terms_and_end_to_end_ref, layer_terms_ref  # noqa: E402

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
# deeper than the 12 layers the small path once took (widths passed as a tensor now)
DEEP_DIMS = [3, 4, 2, 5, 3, 4, 2, 3, 5, 2, 4, 3, 2, 4, 3, 2]
# (atol, rtol) against a float64 reference
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-4, 1e-4)}
# RankOne with more measurements than one 16-row block of the kernel's loop
N_MEAS = {"rankone": 37}
DOUBLE_BACKWARD = r'"triton" backend computes first derivatives of the trace only.*backend="torch"'


def _problem(family, dims, batch=(), dtype=torch.float64, seed=0, n=None):
    W = make_weights(dims, batch=batch, dtype=dtype, seed=seed, requires_grad=True)
    W = [w.detach().to(DEVICE).requires_grad_() for w in W]
    n = n or N_MEAS.get(family, 7)
    meas, targets = make_measurements(family, dims[-1], dims[0], n=n, dtype=dtype, seed=seed + 1)
    return W, meas.to(DEVICE), targets.to(DEVICE)


def _terms(W, meas, **kw):
    """The Triton eager entry on a measurement object's encoding: the terms only."""
    return tt.layer_terms(W, meas.family, list(meas.operands), **kw)[0]


def _assert_matches_reference(W, meas, dtype=torch.float64, **kw):
    ref_W = [w.detach().double().requires_grad_() for w in W]
    ref_meas = meas.to(torch.float64)
    expected, expected_grads = terms_and_grads(layer_terms_ref, ref_W, ref_meas)
    got, grads = terms_and_grads(lambda w, m: _terms(w, m, **kw), W, meas)
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
    assert ht._plan(W, "auto") == "small"
    _assert_matches_reference(W, meas, path="auto")


@pytest.mark.parametrize("family", ["isotropic", "entries", "dense"])
def test_small_path_deeper_than_twelve_layers_matches_reference(family):
    W, meas, _ = _problem(family, DEEP_DIMS, batch=(2,))
    assert len(W) == 15 and ht._plan(W, "auto") == "small"
    _assert_matches_reference(W, meas, path="small")


def test_auto_takes_the_small_path_up_to_its_width_at_any_depth():
    def plan(dims, batch=()):
        return ht._plan([torch.empty(*batch, dims[j + 1], dims[j], device=DEVICE) for j in range(len(dims) - 1)])

    assert tt.SMALL_MAX_WIDTH == 128
    assert plan([128, 5, 128]) == "small" and plan([3] * 14) == "small" and plan([3] * 60) == "small"
    assert plan([129, 5, 3]) == "large"
    # what the kernels do not take is decided by the routing table, once: a zero width goes to
    # the reference under "auto" and is refused by name under "triton"
    zero = [torch.zeros(0, 3, device=DEVICE), torch.zeros(4, 0, device=DEVICE)]
    assert routing.resolve("auto", zero, families.ISOTROPIC) == "ref"
    with pytest.raises(RuntimeError, match=r'backend="triton" cannot run here: .*width of 0'):
        routing.resolve("triton", zero, families.ISOTROPIC)


@pytest.mark.parametrize("dims", LARGE_DIMS, ids=lambda d: f"L{len(d) - 1}")
@pytest.mark.parametrize("family", FAMILIES)
def test_large_path_terms_and_gradients_match_reference_over_several_tiles(family, dims):
    W, meas, _ = _problem(family, dims, batch=(2,))
    _assert_matches_reference(W, meas, path="large", block=16)


@pytest.mark.parametrize("path", ["small", "large"])
def test_both_dense_encodings_match_reference(path):
    # n <= d_0 d_L: DENSE; n > d_0 d_L: DENSE_KERNEL, whose Kp Triton ignores (it reads Ap)
    for n, code in ((5, families.DENSE), (3 * 4 + 1, families.DENSE_KERNEL)):
        W, meas, _ = _problem("dense", [3, 5, 4], batch=(2,), n=n)
        assert meas.family == code
        _assert_matches_reference(W, meas, path=path, block=16)


def test_kernel_family_codes_are_flatkern_kernels_families():
    names = ("ISOTROPIC", "ENTRIES", "RANK_ONE", "DENSE", "INPUTS")
    assert [getattr(small, name).value for name in names] == [getattr(families, name) for name in names]
    assert ht._kernel_family(families.DENSE_KERNEL) == families.DENSE
    assert [ht._kernel_family(getattr(families, name)) for name in names] == [getattr(families, name) for name in names]
    with pytest.raises(ValueError, match="unknown measurement family code 9"):
        ht._kernel_family(9)


@pytest.mark.parametrize("rows,cols,store", [(True, True, True), (True, False, False), (False, True, True)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_gemm_epilogue_norms_match_torch(rows, cols, store, dtype):
    # several 16-tiles in M, N and K, a shared (2-D) left factor and a transposed right one
    g = torch.Generator().manual_seed(0)
    a = torch.randn(37, 45, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    b = torch.randn(3, 50, 45, generator=g, dtype=torch.float64).to(DEVICE, dtype).transpose(-1, -2)
    c, r, s = large.TritonReductions(16).mm(a, b, rows=rows, cols=cols, store=store)
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
    got, grads = terms_and_grads(_terms, W, meas)
    assert got.dtype == dtype and all(g.dtype == dtype for g in grads)

    def err(a, b):
        return (a.double() - b).abs().max().item()

    assert err(got, exact) <= 2 * err(torch_bf16, exact)
    for g, t, e in zip(grads, torch_grads, exact_grads):
        assert err(g, e) <= 2 * err(t, e)


@pytest.mark.parametrize("dims", [[5, 3], [3, 5, 2, 4]], ids=["L1", "L3"])
@pytest.mark.parametrize("path", ["small", "large"])
@pytest.mark.parametrize("family", ["isotropic", "rankone", "dense"])
def test_end_to_end_and_its_gradient_match_reference(family, path, dims):
    # E from the same chain; grad_E enters the reverse accumulation as P_jᵀ G Q_jᵀ
    W, meas, _ = _problem(family, dims, batch=(2,))
    terms, E = tt.layer_terms(W, meas.family, list(meas.operands), scale=2.0, with_end_to_end=True, path=path,
                              block=16)
    ref_terms, ref_E = layer_terms_and_end_to_end_ref(W, meas, scale=2.0)
    torch.testing.assert_close(E, end_to_end_ref(W))
    torch.testing.assert_close(terms, ref_terms)
    g = torch.Generator().manual_seed(5)
    gt, gE = (torch.randn(t.shape, generator=g, dtype=t.dtype).to(DEVICE) for t in (ref_terms, ref_E))
    for with_terms in (True, False):
        got = torch.autograd.grad((E * gE).sum() + with_terms * (terms * gt).sum(), W, retain_graph=True)
        want = torch.autograd.grad((ref_E * gE).sum() + with_terms * (ref_terms * gt).sum(), W, retain_graph=True)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    assert tt.layer_terms(W, meas.family, list(meas.operands), path=path)[1] is None


@pytest.mark.parametrize("sum_layers", [False, True])
@pytest.mark.parametrize("path", ["auto", "large"])
def test_hessian_trace_and_grad_eager_matches_reference_without_a_graph(path, sum_layers, monkeypatch):
    if path == "large":  # the eager value-and-grad takes the op's plan: force the large one
        monkeypatch.setattr(ht, "SMALL_MAX_WIDTH", 4)
    W, meas, _ = _problem("entries", [3, 6, 5, 4], batch=(2,))
    assert ht._plan(W) == ("small" if path == "auto" else "large")
    ref = layer_terms_ref(W, meas, scale=2.0, sum_layers=sum_layers)
    ref_grads = torch.autograd.grad(ref.sum(), W)
    with torch.inference_mode():
        terms, grads = tt.hessian_trace_and_grad_interpret(W, meas.family, list(meas.operands), 2.0, sum_layers)
    assert not terms.requires_grad and not any(g.requires_grad for g in grads)
    torch.testing.assert_close(terms, ref.detach())
    for a, b in zip(grads, ref_grads):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b)


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


@pytest.mark.parametrize("path", ["small", "large"])
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_per_problem_measurements_match_reference_on_both_paths(family, path):
    """Issue 21: one measurement set per problem (a (2, 2) batch), on the one-program path and on the
    large path over several 16-wide tiles: terms, E and gradients against the reference."""
    dims = [17, 6, 5] if path == "large" else [4, 6, 3]
    W = make_weights(dims, batch=(2, 2), seed=3, requires_grad=True)
    W = [w.detach().to(DEVICE).requires_grad_() for w in W]
    n = max(N_MEAS.get(family, 7), dims[0] * dims[-1] + 1) if family == "dense_kernel" else N_MEAS.get(family, 7)
    tensors, _, _ = per_problem_sources(family, dims[-1], dims[0], (2, 2), n=n)
    meas = measurements_from(family, tensors).to(DEVICE)
    assert meas.batch_shape == (() if family == "isotropic" else (2, 2))
    _assert_matches_reference(W, meas, path=path, block=16 if path == "large" else None)
    ref_terms, ref_E = layer_terms_and_end_to_end_ref([w.detach() for w in W], meas)
    terms, E = tt.layer_terms(W, meas.family, list(meas.operands), with_end_to_end=True, path=path,
                              block=16 if path == "large" else None)
    torch.testing.assert_close(terms.detach(), ref_terms, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(E.detach(), ref_E, atol=1e-10, rtol=1e-10)
    value, grads = fk.hessian_trace_and_grad(W, meas, per_layer=True, backend="triton")
    ref_value, ref_grads = fk.hessian_trace_and_grad(W, meas, per_layer=True, backend="torch")
    torch.testing.assert_close(value, ref_value, atol=1e-10, rtol=1e-10)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("family,dtype", [("inputs", torch.float64), ("entries", torch.float32)])
def test_operands_changed_in_place_are_read_again(family, dtype):
    # what the kernels derive from an operand (M = xᵀx / (N d_L); Entries' density, from rows and
    # cols) is kept between calls; an operand changed in place must not leave a stale copy behind
    W, meas, _ = _problem(family, [3, 5, 4], dtype=dtype)
    operands = [o.clone() for o in meas.operands]
    first = tt.layer_terms(W, meas.family, operands)[0]
    torch.testing.assert_close(tt.layer_terms(W, meas.family, operands)[0], first)
    if family == "inputs":
        operands[-1].mul_(3.0)
    else:  # every entry moved to the first column: the last of the two index tensors changed
        operands[-1].zero_()
    decoded = families.get(meas.family).decode(operands)
    expected = layer_terms_ref([w.detach() for w in W], decoded)
    torch.testing.assert_close(tt.layer_terms(W, meas.family, operands)[0], expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected, first)


@pytest.mark.parametrize("family", ["rankone", "dense", "entries"])
@pytest.mark.parametrize("path", ["auto", "small", "large"])
def test_empty_batch_answers_like_plain_torch(path, family):
    # issue 18 item 10: Dense with an empty batch failed to reshape
    W, meas, _ = _problem(family, [3, 5, 4], batch=(0, 2))
    terms, E = tt.layer_terms(W, meas.family, list(meas.operands), with_end_to_end=True, path=path)
    ref_terms, ref_E = layer_terms_and_end_to_end_ref(W, meas)
    assert terms.shape == ref_terms.shape == (0, 2, 2) and E.shape == ref_E.shape == (0, 2, 4, 3)
    grads = torch.autograd.grad(terms.sum() + E.sum(), W)
    assert [g.shape for g in grads] == [w.shape for w in W]
    value, grads = tt.hessian_trace_and_grad_interpret(W, meas.family, list(meas.operands), 2.0, True)
    assert value.shape == (0, 2) and [g.shape for g in grads] == [w.shape for w in W]
    assert fk.hessian_trace(W, meas, backend="triton").shape == (0, 2)


def test_depth_one_trace_is_constant_with_zero_gradient():
    W, meas, _ = _problem("dense", [5, 3])
    terms, (grad,) = terms_and_grads(_terms, W, meas)
    torch.testing.assert_close(terms, layer_terms_ref(W, meas).detach())
    assert torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("path", ["small", "large"])
@pytest.mark.parametrize("family", ["entries", "rankone", "dense"])
def test_gradcheck_float64(family, path):
    W, meas, _ = _problem(family, [3, 4, 2, 3])
    assert torch.autograd.gradcheck(lambda *w: _terms(list(w), meas, path=path, block=16), tuple(W), fast_mode=True)


@pytest.mark.parametrize("dims", [[3, 4, 2, 3], [2, 3] * 7], ids=["L3", "L13"])
@pytest.mark.parametrize("path", ["small", "large"])
def test_double_backward_raises_and_points_to_the_torch_backend(path, dims):
    # today's failure: silently wrong second derivatives (large) or an obscure error (small)
    W, meas, _ = _problem("isotropic", dims)
    terms, E = tt.layer_terms(W, meas.family, list(meas.operands), with_end_to_end=True, path=path, block=16)
    first = torch.autograd.grad(terms.sum() + E.sum(), W, create_graph=True)
    assert all(g.requires_grad for g in first)
    # the first derivatives are still right under create_graph
    expected = torch.autograd.grad(sum(t.sum() for t in layer_terms_and_end_to_end_ref(W, meas)), W)
    for a, b in zip(first, expected):
        torch.testing.assert_close(a.detach(), b)
    with pytest.raises(RuntimeError, match=DOUBLE_BACKWARD):
        torch.autograd.grad(sum(g.square().sum() for g in first), W)


def test_double_backward_through_the_public_api_raises_and_torch_answers():
    W, meas, _ = _problem("entries", [3, 4, 2, 3])
    trace = fk.hessian_trace(W, meas, backend="triton")
    (g,) = torch.autograd.grad(trace, W[:1], create_graph=True)
    with pytest.raises(RuntimeError, match=DOUBLE_BACKWARD):
        torch.autograd.grad(g.sum(), W)
    (g,) = torch.autograd.grad(fk.hessian_trace(W, meas, backend="torch"), W[:1], create_graph=True)
    assert all(h is not None for h in torch.autograd.grad(g.sum(), W))


@pytest.mark.parametrize("plan", ["small", "large"])
@pytest.mark.parametrize("family", FAMILIES)
def test_saved_specs_describe_what_the_forward_saves(family, plan, monkeypatch):
    if plan == "large":
        monkeypatch.setattr(ht, "SMALL_MAX_WIDTH", 4)
    W, meas, _ = _problem(family, [3, 5, 2, 4], batch=(2, 1))
    assert ht._plan(W) == plan
    _, _, saved = tt.hessian_trace_triton(W, meas.family, list(meas.operands))
    specs = tt.saved_specs(W, meas.family, list(meas.operands))
    assert [(tuple(s.shape), s.dtype) for s in saved] == [(tuple(shape), dtype) for shape, dtype in specs]
    assert saved


# ---- the op-level functions behind a registered op
#
# On CPU the dispatcher gives flatkern::hessian_trace the C++ kernel, so the Triton functions are
# registered here, under the same schemas, as the CPU kernels of a scratch namespace, with the
# fake kernel and autograd formula op.py gives the real op.  On a GPU the real op is checked too.

_NS = "flatkern_triton_test"
_OPS = ("hessian_trace", "hessian_trace_backward", "hessian_trace_and_grad")


def _scratch_ops():
    if hasattr(torch.ops, _NS) and hasattr(getattr(torch.ops, _NS), "hessian_trace"):
        return getattr(torch.ops, _NS)
    lib = torch.library.Library(_NS, "DEF")
    _scratch_ops.lib = lib  # kept alive with the module
    for name in _OPS:
        schema = str(getattr(torch.ops.flatkern, name).default._schema)
        lib.define(schema.replace("flatkern::", ""))
    lib.impl("hessian_trace", tt.hessian_trace_triton, "CPU")
    lib.impl("hessian_trace_backward", tt.hessian_trace_backward_triton, "CPU")
    lib.impl("hessian_trace_and_grad", tt.hessian_trace_and_grad_triton, "CPU")
    ops = getattr(torch.ops, _NS)

    @torch.library.register_fake(f"{_NS}::hessian_trace", lib=lib)
    def _(weights, family, operands, with_end_to_end=False, scale=1.0, sum_layers=False):
        like, batch = weights[0], weights[0].shape[:-2]
        terms = like.new_empty(batch if sum_layers else (*batch, len(weights)))
        E = like.new_empty((*batch, weights[-1].shape[-2], like.shape[-1]) if with_end_to_end else (0,))
        return terms, E, [like.new_empty(s, dtype=d) for s, d in tt.saved_specs(weights, family, operands)]

    @torch.library.register_fake(f"{_NS}::hessian_trace_backward", lib=lib)
    def _(weights, family, operands, saved, grad_terms, grad_E, scale=1.0, sum_layers=False):
        return [torch.empty_like(w) for w in weights]

    @torch.library.register_fake(f"{_NS}::hessian_trace_and_grad", lib=lib)
    def _(weights, family, operands, scale=1.0, sum_layers=False):
        batch = weights[0].shape[:-2]
        terms = weights[0].new_empty(batch if sum_layers else (*batch, len(weights)))
        return terms, [torch.empty_like(w) for w in weights]

    def setup_context(ctx, inputs, output):
        weights, family, operands, with_end_to_end, scale, sum_layers = inputs
        ctx.args = (len(weights), len(operands), family, with_end_to_end, scale, sum_layers)
        ctx.save_for_backward(*weights, *operands, *output[2])
        ctx.mark_non_differentiable(*output[2])

    def backward(ctx, grad_terms, grad_E, grad_saved):
        L, k, family, with_end_to_end, scale, sum_layers = ctx.args
        saved = ctx.saved_tensors
        weights, operands, products = list(saved[:L]), list(saved[L:L + k]), list(saved[L + k:])
        if grad_terms is None:
            shape = weights[0].shape[:-2] if sum_layers else (*weights[0].shape[:-2], L)
            grad_terms = weights[0].new_zeros(shape)
        grad_E = grad_E if with_end_to_end and grad_E is not None and grad_E.numel() else None
        grads = ops.hessian_trace_backward(weights, family, operands, products, grad_terms, grad_E, scale, sum_layers)
        # the dispatcher drops trailing arguments equal to their defaults, and torch's Tensor[]
        # wrapper then expects no gradient for them: as many entries as arguments were passed
        return (list(grads), None, [None] * k, None, None, None)[:len(ctx.needs_input_grad)]

    torch.library.register_autograd(f"{_NS}::hessian_trace", backward, setup_context=setup_context, lib=lib)
    return ops


def _op_args(path, monkeypatch, batch=(2,)):
    if path == "large":  # the registered kernels take the "auto" plan: force the large one
        monkeypatch.setattr(ht, "SMALL_MAX_WIDTH", 4)
    W, meas, _ = _problem("entries", [3, 5, 4, 3], batch=batch)
    assert ht._plan(W) == path
    return W, meas.family, list(meas.operands), meas


def test_cuda_kernels_are_registered_for_the_op():
    for name in _OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"flatkern::{name}", "CUDA")


@pytest.mark.parametrize("path", ["small", "large"])
def test_registered_op_passes_opcheck(path, monkeypatch):
    W, family, operands, _ = _op_args(path, monkeypatch)
    checks = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    ops = [_scratch_ops()]
    if DEVICE.type == "cpu":
        # the interpreter reads the data pointers of the fake tensors AOT dispatch traces with
        checks = checks[:-1]
    else:
        ops.append(torch.ops.flatkern)
    for op in ops:
        for with_e, sum_layers in ((False, False), (True, True)):
            torch.library.opcheck(op.hessian_trace.default, (W, family, operands, with_e, 2.0, sum_layers),
                                  test_utils=checks)
        torch.library.opcheck(op.hessian_trace_and_grad.default, (W, family, operands, 2.0, False),
                              test_utils=checks[:1] + checks[2:])


@pytest.mark.parametrize("path", ["small", "large"])
def test_registered_op_autograd_matches_reference(path, monkeypatch):
    # compiled graphs call the registered op and its registered autograd, not the eager Function
    W, family, operands, meas = _op_args(path, monkeypatch)
    op = (torch.ops.flatkern if DEVICE.type == "cuda" else _scratch_ops()).hessian_trace
    ref_terms, ref_E = layer_terms_and_end_to_end_ref(W, meas, scale=2.0)
    terms, E, _ = op(W, family, operands, True, 2.0, False)
    torch.testing.assert_close(terms, ref_terms, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(E, ref_E, atol=1e-12, rtol=1e-12)
    got = torch.autograd.grad(terms.square().sum() + (E * E.detach()).sum(), W)
    want = torch.autograd.grad(ref_terms.square().sum() + (ref_E * ref_E.detach()).sum(), W)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_cpu_without_interpreter_is_refused_by_the_routing_table(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    routing.reset()
    W = [w.cpu().detach().requires_grad_() for w in make_weights([3, 5, 4, 2])]
    meas, _ = make_measurements("rankone", 2, 3)
    assert routing.unavailable("triton", "cpu") is not None
    with pytest.raises(RuntimeError, match=r'backend="triton" cannot run here: .*TRITON_INTERPRET=1'):
        fk.hessian_trace(W, meas, backend="triton")
    routing.reset()


def test_unavailable_reason_follows_the_backend_contract(monkeypatch):
    assert routing.unavailable("triton", "cuda") is None
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert routing.unavailable("triton", "cpu") is None
    assert "triton" in fk.available_backends("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in routing.unavailable("triton", "cpu")
    assert "meta" in routing.unavailable("triton", "meta")


def test_torch_compile_traces_the_op_with_its_autograd():
    W, meas, _ = _problem("entries", [3, 6, 5, 4], batch=(2,))

    def trace(*w):
        return fk.hessian_trace(list(w), meas, backend="triton").sum()

    expected, expected_grads = terms_and_grads(lambda w, m: trace(*w), W, meas)
    # AOT tracing runs the interpreter on fake tensors, so on CPU only dynamo's capture is checked;
    # on a GPU inductor compiles the graph around the op
    compiled = torch.compile(trace, backend="inductor" if DEVICE.type == "cuda" else "eager")
    got, grads = terms_and_grads(lambda w, m: compiled(*w), W, meas)
    torch.testing.assert_close(got, expected)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b)


def test_bad_path_and_block_are_rejected_with_their_values():
    W, meas, _ = _problem("isotropic", [3, 4])
    with pytest.raises(ValueError, match="path must be one of .*'tiny'"):
        _terms(W, meas, path="tiny")
    with pytest.raises(ValueError, match="block must be a power of two >= 16, got 24"):
        _terms(W, meas, block=24)
    wide, meas, _ = _problem("isotropic", [3, 129])
    with pytest.raises(ValueError, match=r"path=\"small\" needs every width <= 128.*\[3, 129\]"):
        _terms(wide, meas, path="small")


_SM90_COMPILE = r"""
import inspect
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from flatkern.kernels import families
from flatkern.kernels.triton import large, small


def compile_h200(fn, constexprs, num_warps=4, types=None):
    # every pointer fp32 (WIDTHS int32), every other run-time argument an integer (i64: strides and offsets)
    types = {"WIDTHS": "*i32", **(types or {})}
    sig = {k: types.get(k, "*fp32" if k[0].isupper() else "i64") for k in inspect.signature(fn.fn).parameters
           if k not in constexprs}
    src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in constexprs}}, constexprs=constexprs)
    assert triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}).asm["cubin"]


ints = {k: "i32" for k in small._RUNTIME_INTS}
codes = [families.ISOTROPIC, families.ENTRIES, families.RANK_ONE, families.DENSE, families.INPUTS]
# every family at the smallest tile; the widest (D = 128, the K-chunked products) for Isotropic
for D, kinds in ((16, codes), (128, [families.ISOTROPIC])):
    for family in kinds:
        consts = dict(D=D, FAMILY=family, BN=16, BK=small.SMALL_BK, PREC="ieee")
        for kernel in (small._chain_small_fwd_kernel, small._chain_small_bwd_kernel):
            compile_h200(kernel, consts, small._num_warps(D), ints)
cfg = large.gemm_config(None, large.torch.float32)
warps = cfg.pop("num_warps")
cfg.pop("num_stages")
compile_h200(large._mm_norms_kernel, dict(cfg, STORE_C=True, ROWS=True, COLS=True, PREC="ieee"), warps,
             {k: "i32" for k in ("M", "N", "K")})
blocks = dict(BLOCK_M=64, BLOCK_N=64)
compile_h200(large._rowsq_kernel, blocks, types={"M": "i32", "N": "i32"})
compile_h200(large._scale_kernel, blocks, types={"M": "i32", "N": "i32"})
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
