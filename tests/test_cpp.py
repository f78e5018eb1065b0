"""The C++ CPU kernels of the flatkern ops (csrc/ops/) against the plain-torch reference.

The ops are called as the dispatcher sees them, ``torch.ops.flatkern.<op>(weights, m.family,
list(m.operands), ...)``; with ``flatkern._C`` built, their CPU kernels are the C++ ones (checked
below), so every comparison here is C++ against ``flatkern.reference``.
"""

import random

import pytest
import torch

try:
    import flatkern._C as _C
except ImportError as exc:  # pragma: no cover - depends on the build
    pytest.skip(f"the C++ extension flatkern._C is not built ({exc})", allow_module_level=True)

from helpers import DIMS, FAMILIES, autograd_hessian_trace, make_measurements, make_weights

import flatkern as fk
from flatkern.kernels import families, schemas  # noqa: F401  (schemas defines the ops and loads _C)
from flatkern.reference import end_to_end_ref, layer_terms_ref

# "dense_kernel": enough measurements (n > d_0 d_L) that Dense reads its kernel K
KINDS = (*FAMILIES, "dense_kernel")
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float64: dict(rtol=1e-11, atol=1e-11)}
ops = torch.ops.flatkern


def measurements_for(kind, d_L, d_0, dtype=torch.float64, seed=1, n=7):
    if kind == "dense_kernel":
        return make_measurements("dense", d_L, d_0, n=d_L * d_0 + 3, dtype=dtype, seed=seed)[0]
    return make_measurements(kind, d_L, d_0, n=n, dtype=dtype, seed=seed)[0]


def cpp_terms(weights, meas, *, scale=1.0, sum_layers=False):
    """``scale · c_j`` (or their sum) by the op's C++ kernel, differentiable through the C++ autograd formula."""
    return ops.hessian_trace(weights, meas.family, list(meas.operands), False, scale, sum_layers)[0]


def cpp_terms_and_end_to_end(weights, meas):
    terms, E, _ = ops.hessian_trace(weights, meas.family, list(meas.operands), True)
    return terms, E


def reference_and_cpp(W, meas):
    """(terms, grads) of the reference and of the C++ kernels for the same random upstream gradient."""
    g = torch.Generator().manual_seed(7)
    out = []
    for fn in (layer_terms_ref, cpp_terms):
        ws = [w.detach().clone().requires_grad_(True) for w in W]
        terms = fn(ws, meas)
        up = torch.randn(terms.shape, generator=g.manual_seed(7), dtype=torch.float64).to(terms.dtype)
        grads = torch.autograd.grad((terms * up).sum(), ws)
        out.append((terms.detach(), grads))
    return out


@pytest.mark.parametrize("name", ["end_to_end", "hessian_trace", "hessian_trace_backward", "hessian_trace_and_grad"])
def test_cpu_kernels_of_every_op_are_the_cpp_ones(name):
    # the dispatcher, not Python, picks the kernel: with _C built, CPU means csrc/ops/cpu
    dump = torch._C._dispatch_dump(f"flatkern::{name}")
    cpu = next(line for line in dump.splitlines() if line.startswith("CPU:"))
    assert "csrc/ops/cpu/" in cpu, dump
    if name != "end_to_end":
        autograd = next(line for line in dump.splitlines() if line.startswith("Autograd[alias]:"))
        assert "csrc/ops/autograd/hessian_trace.cpp" in autograd, dump


def test_compiled_family_codes_are_the_python_ones():
    assert _C.FAMILIES == {name: getattr(families, name)
                           for name in ("ISOTROPIC", "ENTRIES", "RANK_ONE", "DENSE", "DENSE_KERNEL", "INPUTS")}


@pytest.mark.parametrize(
    "batch, dtype",
    [((), torch.float64), ((2, 3), torch.float64), ((2, 3), torch.float32)],
    ids=["single-f64", "batch2x3-f64", "batch2x3-f32"],
)
@pytest.mark.parametrize("dims", DIMS, ids=lambda d: f"L{len(d) - 1}")
@pytest.mark.parametrize("kind", KINDS)
def test_cpp_layer_terms_and_gradients_match_reference(kind, dims, batch, dtype):
    W = make_weights(dims, batch=batch, dtype=dtype)
    meas = measurements_for(kind, dims[-1], dims[0], dtype)
    (ref, ref_grads), (got, got_grads) = reference_and_cpp(W, meas)
    assert got.shape == (*batch, len(dims) - 1)
    torch.testing.assert_close(got, ref, **TOL[dtype])
    for gr, gc in zip(ref_grads, got_grads):
        torch.testing.assert_close(gc, gr, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", KINDS)
def test_wide_layers_take_the_blas_path_and_match_reference(kind, dtype):
    # a width above 128 sends the chain products to BLAS instead of the in-cache kernel
    dims = [5, 131, 7, 4]
    W = make_weights(dims, batch=(2,), dtype=dtype)
    meas = measurements_for(kind, dims[-1], dims[0], dtype)
    (ref, ref_grads), (got, got_grads) = reference_and_cpp(W, meas)
    torch.testing.assert_close(got, ref, **TOL[dtype])
    for gr, gc in zip(ref_grads, got_grads):
        torch.testing.assert_close(gc, gr, **TOL[dtype])


def test_dense_reads_the_kernel_exactly_when_n_exceeds_d0_dL():
    few = measurements_for("dense", 3, 4, n=12)
    many = measurements_for("dense", 3, 4, n=13)
    assert few.family == families.DENSE and [tuple(o.shape) for o in few.operands] == [(3, 12, 4)]
    assert many.family == families.DENSE_KERNEL
    Ap, Kp = many.operands
    assert Ap.shape == (3, 13, 4) and Kp.shape == (3, 3, 4, 4) and Kp.is_contiguous()
    # both regimes are exact (the kernel K is not an approximation)
    W = make_weights([4, 5, 3])
    for meas in (few, many):
        torch.testing.assert_close(cpp_terms(W, meas), layer_terms_ref(W, meas), rtol=1e-12, atol=1e-12)


def test_dense_kernel_operand_is_K_and_kernel_returns_a_copy_the_caller_cannot_corrupt():
    meas = measurements_for("dense", 3, 4, n=13)
    # K[a, b, c, d] = (1/n) Σ_i A_i[a, b] A_i[c, d], written as a sum of outer products
    expected = sum(torch.outer(Ai.flatten(), Ai.flatten()) for Ai in meas.A).reshape(3, 4, 3, 4) / 13
    K = meas.kernel()
    torch.testing.assert_close(K, expected, rtol=1e-12, atol=1e-12)
    Kp = meas.operands[1]  # the one cached copy the kernel reads, in its (a, c, b, d) layout
    assert Kp.is_contiguous()
    torch.testing.assert_close(Kp.permute(0, 2, 1, 3), expected, rtol=1e-12, atol=1e-12)
    K.mul_(2)  # issue 18 item 4: the caller's copy, not the cache
    torch.testing.assert_close(meas.operands[1].permute(0, 2, 1, 3), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", KINDS)
def test_hessian_trace_backend_cpp_matches_autograd_hessian(kind, reduction):
    dims = [3, 5, 2, 4]
    W = make_weights(dims)
    meas, targets = make_measurements("dense" if kind == "dense_kernel" else kind, dims[-1], dims[0],
                                      n=dims[0] * dims[-1] + 1 if kind == "dense_kernel" else 7)
    expected = autograd_hessian_trace(W, meas, targets, reduction, per_layer=True)
    for backend in ("cpp", "auto"):
        got = fk.hessian_trace(W, meas, reduction=reduction, per_layer=True, backend=backend)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_layer_terms_and_end_to_end_match_reference_with_both_gradients(kind):
    dims, batch = [4, 3, 5, 2], (2,)
    W = make_weights(dims, batch=batch)
    meas = measurements_for(kind, dims[-1], dims[0])
    g = torch.Generator().manual_seed(3)
    up_t = torch.randn(*batch, 3, generator=g, dtype=torch.float64)
    up_E = torch.randn(*batch, 2, 4, generator=g, dtype=torch.float64)
    results = []
    for fn in (lambda ws: (layer_terms_ref(ws, meas), end_to_end_ref(ws)),
               lambda ws: cpp_terms_and_end_to_end(ws, meas)):
        ws = [w.clone().requires_grad_(True) for w in W]
        terms, E = fn(ws)
        grads = torch.autograd.grad((terms * up_t).sum() + (E * up_E).sum(), ws)
        results.append((terms, E, grads))
    (rt, rE, rg), (ct, cE, cg) = results
    torch.testing.assert_close(ct, rt, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(cE, rE, rtol=1e-11, atol=1e-11)
    for a, b in zip(cg, rg):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_end_to_end_gradient_alone_matches_reference():
    # only E is used: the terms' gradient is absent and must count as zero
    W = make_weights([3, 4, 5], batch=(2,), requires_grad=True)
    meas = measurements_for("rankone", 5, 3)
    _, E = cpp_terms_and_end_to_end(W, meas)
    got = torch.autograd.grad(E.square().sum(), W)
    expected = torch.autograd.grad(end_to_end_ref(W).square().sum(), W)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_end_to_end_op_matches_reference():
    W = make_weights([3, 4, 5, 2], batch=(2,))
    torch.testing.assert_close(ops.end_to_end(W), end_to_end_ref(W), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_float64(kind):
    W = make_weights([3, 4, 2, 5], batch=(2,), requires_grad=True)
    meas = measurements_for(kind, 5, 3)
    assert torch.autograd.gradcheck(lambda *ws: cpp_terms(list(ws), meas), W)
    assert torch.autograd.gradcheck(lambda *ws: cpp_terms(list(ws), meas, scale=0.5, sum_layers=True), W)
    assert torch.autograd.gradcheck(lambda *ws: cpp_terms_and_end_to_end(list(ws), meas), W)


@pytest.mark.parametrize(
    "kind, dims",
    [(k, [3, 4, 2, 5]) for k in KINDS] + [("isotropic", [3, 4]), ("entries", [3, 4]), ("rankone", [4, 3])],
    ids=lambda v: f"L{len(v) - 1}" if isinstance(v, list) else v,
)
def test_opcheck_registered_ops(kind, dims):
    W = make_weights(dims, batch=(2,), requires_grad=True)
    meas = measurements_for(kind, dims[-1], dims[0])
    family, operands = meas.family, list(meas.operands)
    for with_E in (False, True):
        torch.library.opcheck(ops.hessian_trace.default, (W, family, operands, with_E))
    torch.library.opcheck(ops.hessian_trace_and_grad.default, (W, family, operands, 2.0, True))
    Wd = [w.detach() for w in W]
    _, _, saved = ops.hessian_trace(Wd, family, operands, True)
    grad_terms = torch.randn(2, len(W), dtype=torch.float64)
    grad_E = torch.randn(2, dims[-1], dims[0], dtype=torch.float64)
    torch.library.opcheck(ops.hessian_trace_backward.default, (Wd, family, operands, saved, grad_terms, grad_E))


def test_second_derivative_raises_a_clear_error_naming_the_backend():
    W = make_weights([3, 4, 2], requires_grad=True)
    trace = fk.hessian_trace(W, fk.Isotropic(), backend="cpp")
    grads = torch.autograd.grad(trace, W, create_graph=True)
    with pytest.raises(RuntimeError, match='"cpp" backend computes first derivatives of the trace only.*'
                                           'backend="torch" supports second derivatives'):
        torch.autograd.grad(grads[0].sum(), W)


def test_torch_compile_traces_the_op_without_graph_breaks():
    W = make_weights([3, 4, 2, 5], batch=(2,), requires_grad=True)
    meas = measurements_for("entries", 5, 3)
    compiled = torch.compile(lambda ws: cpp_terms(ws, meas).sum(), backend="eager", fullgraph=True)
    got = torch.autograd.grad(compiled(W), W)
    expected = torch.autograd.grad(layer_terms_ref(W, meas).sum(), W)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dims", [[16, 32, 17, 48, 8], [33, 64, 40], [128, 30, 128, 96], [7, 100, 8, 5, 120, 3]],
                         ids=str)
@pytest.mark.parametrize("kind", ["isotropic", "entries", "rankone", "inputs"])
def test_float32_in_cache_kernel_matches_reference_across_tile_edges(kind, dims):
    # the float32 in-cache product reads op(B) in place when its width is a multiple of
    # 16, transposes 8 x 8 blocks when it is transposed, and pads the rest; products at
    # most 8 wide take an 8 x 8 tile (many rows at once: 100, 120): widths on and off
    # those edges, up to the in-cache limit of 128
    # against the float64 reference, to float32 rounding relative to each tensor's
    # largest entry (sums of 128 products: entry-wise relative error is not defined
    # for the entries that cancel to near zero)
    W = make_weights(dims, batch=(2,))
    meas = measurements_for(kind, dims[-1], dims[0], torch.float64)
    (ref, ref_grads), _ = reference_and_cpp(W, meas)
    _, (got, got_grads) = reference_and_cpp([w.float() for w in W], meas.to(torch.float32))
    for r, c in zip((ref, *ref_grads), (got, *got_grads)):
        assert c.dtype == torch.float32
        torch.testing.assert_close(c.double(), r, rtol=1e-5, atol=1e-5 * r.abs().max().item())


def test_seeded_sweep_over_shapes_families_and_batches_matches_reference():
    rng = random.Random(2024)
    for trial in range(30):
        L = rng.randint(1, 5)
        dims = [rng.randint(1, 9) for _ in range(L + 1)]
        batch = rng.choice([(), (1,), (3,), (2, 2)])
        dtype = rng.choice([torch.float32, torch.float64])
        kind = rng.choice(KINDS)
        W = make_weights(dims, batch=batch, dtype=dtype, seed=trial)
        meas = measurements_for(kind, dims[-1], dims[0], dtype, seed=trial, n=rng.randint(1, 12))
        (ref, ref_grads), (got, got_grads) = reference_and_cpp(W, meas)
        msg = f"trial {trial}: {kind} dims={dims} batch={batch} {dtype}"
        torch.testing.assert_close(got, ref, **TOL[dtype], msg=msg)
        for gr, gc in zip(ref_grads, got_grads):
            torch.testing.assert_close(gc, gr, **TOL[dtype], msg=msg)


def test_batch_of_problems_runs_in_parallel_and_matches_each_problem_alone():
    # large enough batch that at::parallel_for splits it across threads
    W = make_weights([6, 8, 7, 5], batch=(64,), dtype=torch.float32)
    meas = measurements_for("entries", 5, 6, torch.float32, n=20)
    batched = cpp_terms(W, meas)
    for p in (0, 31, 63):
        torch.testing.assert_close(batched[p], cpp_terms([w[p] for w in W], meas), rtol=0, atol=0)


# ------------------------------------------------------------ hessian_trace_and_grad


@pytest.mark.parametrize("sum_layers", [False, True], ids=["per-layer", "summed"])
@pytest.mark.parametrize("batch, dtype", [((), torch.float64), ((2, 3), torch.float64), ((5,), torch.float32)],
                         ids=["single-f64", "batch2x3-f64", "batch5-f32"])
@pytest.mark.parametrize("kind", KINDS)
def test_hessian_trace_and_grad_equals_forward_then_backward(kind, batch, dtype, sum_layers):
    # the fused kernel runs the same arithmetic back to back: equal to the last bit
    for dims in ([4, 3], [4, 6, 3], [3, 5, 2, 7, 4], [5, 131, 7, 4]):
        W = make_weights(dims, batch=batch, dtype=dtype)
        meas = measurements_for(kind, dims[-1], dims[0], dtype)
        terms, grads = ops.hessian_trace_and_grad(W, meas.family, list(meas.operands), 2.0, sum_layers)
        ws = [w.clone().requires_grad_(True) for w in W]
        expected = cpp_terms(ws, meas, scale=2.0, sum_layers=sum_layers)
        expected_grads = torch.autograd.grad(expected.sum(), ws)
        assert terms.shape == expected.shape and [g.shape for g in grads] == [w.shape for w in W]
        torch.testing.assert_close(terms, expected.detach(), rtol=0, atol=0)
        for g, e in zip(grads, expected_grads):
            torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_hessian_trace_and_grad_matches_reference_value_and_gradient(kind):
    for dims in DIMS:
        W = make_weights(dims, batch=(3,))
        meas = measurements_for(kind, dims[-1], dims[0])
        terms, grads = ops.hessian_trace_and_grad(W, meas.family, list(meas.operands), 2.0, False)
        ws = [w.clone().requires_grad_(True) for w in W]
        ref = layer_terms_ref(ws, meas, scale=2.0)
        ref_grads = torch.autograd.grad(ref.sum(), ws)
        torch.testing.assert_close(terms, ref.detach(), **TOL[torch.float64])
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, **TOL[torch.float64])


@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference_mode"])
def test_hessian_trace_and_grad_outputs_never_require_grad(mode):
    meas = measurements_for("entries", 2, 3)
    context = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[mode]
    with context():
        W = make_weights([3, 4, 2], batch=(2,), requires_grad=mode != "inference_mode")
        terms, grads = ops.hessian_trace_and_grad(W, meas.family, list(meas.operands))
    assert not terms.requires_grad and terms.grad_fn is None
    assert all(not g.requires_grad for g in grads)
    with torch.enable_grad():
        leaves = [w.detach().clone().requires_grad_() for w in W]
        expected = torch.autograd.grad(layer_terms_ref(leaves, meas).sum(), leaves)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------ saved size


@pytest.mark.parametrize("kind", KINDS)
def test_saved_tensor_has_the_size_hessian_trace_saved_size_reports(kind):
    for dims in DIMS + [[5, 131, 7, 4]]:
        W = make_weights(dims, batch=(2,))
        meas = measurements_for(kind, dims[-1], dims[0], n=11)
        _, _, saved = ops.hessian_trace(W, meas.family, list(meas.operands))
        size = _C.hessian_trace_saved_size(dims, meas.family, [list(o.shape) for o in meas.operands])
        assert len(saved) == 1 and saved[0].shape == (2, size), (dims, saved[0].shape, size)


@pytest.mark.parametrize(
    "args, match",
    [
        (([3], families.ISOTROPIC, []), "L >= 1"),
        (([3, 0], families.ISOTROPIC, []), "widths must lie in"),
        (([3, 4], 7, []), "unknown measurement family 7"),
        (([3, 4], families.RANK_ONE, [[5, 4]]), "RankOne takes 2 operands"),
        (([3, 4], families.ENTRIES, [[], [5]]), "Entries operand rows must have 1 dimensions"),
    ],
)
def test_saved_size_rejects_what_the_kernel_rejects(args, match):
    with pytest.raises(RuntimeError, match=match):
        _C.hessian_trace_saved_size(*args)


# ------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "case, match",
    [
        ("entries_row_out_of_range", "Entries operand rows\\[1\\] = 2 is out of range"),
        ("entries_col_negative", "Entries operand cols\\[0\\] = -1 is out of range"),
        ("entries_int32_indices", "Entries operand rows must have dtype Long"),
        ("entries_missing_operand", "Entries takes 2 operands \\(rows, cols\\), got 1"),
        ("noncontiguous_weight", "weights\\[1\\] must be contiguous"),
        ("noncontiguous_operand", "RankOne operand u must be contiguous"),
        ("operand_wrong_dtype", "Inputs operand x must have dtype Double"),
        ("operand_wrong_shape", "RankOne operand v must have shape"),
        ("operand_wrong_rank", "Dense operand Ap must have 3 dimensions"),
        ("unknown_family", "unknown measurement family 9"),
        ("integer_weights", "float32 or float64"),
        ("weights_do_not_chain", "do not chain"),
        ("dense_kernel_wrong_shape", "Dense \\(kernel K\\) operand Kp must have shape"),
        ("isotropic_with_operand", "Isotropic takes no operands"),
        ("empty_inputs", "Inputs operand x has shape \\[0, 3\\]"),
    ],
)
@pytest.mark.parametrize("op_name", ["hessian_trace", "hessian_trace_and_grad"])
def test_direct_calls_with_bad_input_raise_instead_of_crashing(op_name, case, match):
    W = make_weights([3, 4, 2])  # d_0 = 3, d_L = 2
    f64 = dict(dtype=torch.float64)
    rows, cols = torch.tensor([0, 1]), torch.tensor([0, 2])
    family, operands = families.ISOTROPIC, []
    if case == "entries_row_out_of_range":
        family, operands = families.ENTRIES, [torch.tensor([0, 2]), cols]
    elif case == "entries_col_negative":
        family, operands = families.ENTRIES, [rows, torch.tensor([-1, 0])]
    elif case == "entries_int32_indices":
        family, operands = families.ENTRIES, [rows.int(), cols.int()]
    elif case == "entries_missing_operand":
        family, operands = families.ENTRIES, [rows]
    elif case == "noncontiguous_weight":
        W[1] = torch.randn(4, 2, **f64).t()
    elif case == "noncontiguous_operand":
        family, operands = families.RANK_ONE, [torch.randn(5, 4, **f64)[:, ::2], torch.randn(5, 3, **f64)]
    elif case == "operand_wrong_dtype":
        family, operands = families.INPUTS, [torch.randn(5, 3, dtype=torch.float32)]
    elif case == "operand_wrong_shape":
        family, operands = families.RANK_ONE, [torch.randn(5, 2, **f64), torch.randn(5, 4, **f64)]
    elif case == "operand_wrong_rank":
        family, operands = families.DENSE, [torch.randn(2, 5 * 3, **f64)]
    elif case == "unknown_family":
        family = 9
    elif case == "integer_weights":
        W = [torch.ones(4, 3, dtype=torch.int64), torch.ones(2, 4, dtype=torch.int64)]
    elif case == "weights_do_not_chain":
        W = [torch.randn(4, 3, **f64), torch.randn(2, 5, **f64)]
    elif case == "dense_kernel_wrong_shape":
        family, operands = families.DENSE_KERNEL, [torch.randn(2, 7, 3, **f64), torch.randn(2, 2, 3, 2, **f64)]
    elif case == "isotropic_with_operand":
        operands = [torch.randn(3)]
    elif case == "empty_inputs":
        family, operands = families.INPUTS, [torch.randn(0, 3, **f64)]
    with pytest.raises(RuntimeError, match=match):
        getattr(ops, op_name)(W, family, operands)


@pytest.mark.parametrize("case", ["saved_too_short", "grad_terms_wrong_shape", "grad_E_wrong_shape",
                                  "saved_wrong_dtype", "saved_two_tensors"])
def test_direct_backward_calls_with_bad_input_raise_instead_of_crashing(case):
    W = make_weights([3, 4, 2])
    operands = [torch.tensor([0, 1]), torch.tensor([0, 2])]
    _, _, saved = ops.hessian_trace(W, families.ENTRIES, operands)
    grad_terms, grad_E = torch.ones(2, dtype=torch.float64), None
    match = "must have (shape|dtype)"
    if case == "saved_too_short":
        saved = [saved[0][:-1]]
    elif case == "grad_terms_wrong_shape":
        grad_terms = torch.ones(3, dtype=torch.float64)
    elif case == "grad_E_wrong_shape":
        grad_E = torch.ones(3, 2, dtype=torch.float64)
    elif case == "saved_wrong_dtype":
        saved = [saved[0].float()]
    elif case == "saved_two_tensors":
        saved, match = [saved[0], saved[0]], "saved = \\[one tensor\\]"
    with pytest.raises(RuntimeError, match=match):
        ops.hessian_trace_backward(W, families.ENTRIES, operands, saved, grad_terms, grad_E)


@pytest.mark.parametrize("family", ["entries", "inputs", "isotropic"])
def test_float32_sums_over_many_terms_are_as_accurate_as_plain_torch(family):
    # sums over 2e5 measurements or d^2 entries: float32 accumulation would lose ~1e-5
    d = 160
    W = make_weights([d, d, d], seed=4)
    meas, _ = make_measurements(family, d, d, n=200_000 if family == "entries" else 2000, seed=5)
    ref = fk.hessian_trace(W, meas, backend="torch")
    W32, meas32 = [w.float() for w in W], meas.to(torch.float32)
    err = {b: ((fk.hessian_trace(W32, meas32, backend=b).double() - ref) / ref).abs().item() for b in ("torch", "cpp")}
    assert err["cpp"] <= max(2 * err["torch"], 1e-6), err
