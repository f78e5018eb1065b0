"""Per-problem measurements (issue 21 §1): each problem of a batch of weights measured by its own set.

The property suite (``tests/test_properties.py``) checks every family, backend, reduction and
``per_layer`` against the reference problem by problem.  Here: that a shared set and the same set
given to every problem answer alike (bit for bit on the C++ kernel, which runs the same arithmetic
on either), the ground truth of ``torch.func.hessian``, every public op, and the errors (Python and
C++) for batches that do not match and for indices out of range in one problem.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    ALL_FAMILIES, autograd_hessian_trace, make_weights, measurement_sources, measurements_from, per_problem_sources,
)

import flatkern as fk
from flatkern.kernels import families, schemas

HAS_CPP = schemas._C is not None
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="the C++ extension is not built")


def _n(family):
    # Dense's kernel regime needs n > d_0 d_L (= 12 for the widths below)
    return 30 if family == "dense_kernel" else 7


def _per_problem(family, dims, batch, dtype=torch.float64, seed=1):
    """``(measurements, targets, sets)`` as ``per_problem_sources`` gives them, built into objects."""
    tensors, targets, sets = per_problem_sources(family, dims[-1], dims[0], batch, n=_n(family), dtype=dtype,
                                                 seed=seed)
    return measurements_from(family, tensors), targets, [(measurements_from(family, t), b) for t, b in sets]


def _replicated(family, dims, batch, dtype=torch.float64):
    """One shared set, and the same set stacked once per problem: ``(shared, per_problem, targets)``."""
    tensors, targets = measurement_sources(family, dims[-1], dims[0], n=_n(family), dtype=dtype)
    stacked = {k: (v.expand(*batch, *v.shape).contiguous() if isinstance(v, torch.Tensor) else v)
               for k, v in tensors.items()}
    return measurements_from(family, tensors), measurements_from(family, stacked), targets


@pytest.mark.parametrize("family", [f for f in ALL_FAMILIES if f != "isotropic"])
def test_per_problem_objects_carry_their_batch_and_decode_to_it(family):
    meas, _, _ = _per_problem(family, [4, 5, 3], (2, 3))
    assert meas.batch_shape == (2, 3)
    assert f"batch={(2, 3)}" in repr(meas)
    row = families.get(meas.family)
    shapes = [t.shape for t in meas.operands]
    assert row.batch_shape(shapes) == (2, 3)
    decoded = row.decode(meas.operands)
    assert decoded.batch_shape == (2, 3) and decoded.n == meas.n
    W = make_weights([4, 5, 3], batch=(2, 3))
    torch.testing.assert_close(fk.reference.layer_terms_ref(W, decoded), fk.reference.layer_terms_ref(W, meas),
                               rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=needs_cpp)])
@pytest.mark.parametrize("family", [f for f in ALL_FAMILIES if f != "isotropic"])
def test_a_shared_set_given_to_every_problem_answers_as_the_shared_set(family, backend):
    """The per-problem path, fed the shared set once per problem, gives the shared answers: bit for
    bit on the C++ kernel (the same arithmetic at another address), to rounding on plain torch (its
    batched products may block the sums differently) and for Dense's kernel ``K`` (a batched einsum
    forms each problem's ``K``, the same values to rounding)."""
    dims, batch = [4, 6, 5, 3], (3,)
    W = make_weights(dims, batch=batch, seed=4)
    shared, per_problem, targets = _replicated(family, dims, batch)
    stacked_targets = targets.expand(*batch, *targets.shape)
    bitwise = backend == "cpp" and family != "dense_kernel"
    tol = dict(rtol=0, atol=0) if bitwise else dict(rtol=1e-13, atol=1e-13)
    for per_layer in (False, True):
        a = fk.hessian_trace_and_grad(W, shared, per_layer=per_layer, backend=backend)
        b = fk.hessian_trace_and_grad(W, per_problem, per_layer=per_layer, backend=backend)
        for x, y in zip([a[0], *a[1]], [b[0], *b[1]]):
            torch.testing.assert_close(y, x, **tol)
    loss_a, trace_a = fk.objective(W, shared, targets, lam=0.5, backend=backend)
    loss_b, trace_b = fk.objective(W, per_problem, stacked_targets, lam=0.5, backend=backend)
    torch.testing.assert_close(trace_b, trace_a, **tol)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-13, atol=1e-13)  # the loss is plain torch on both


@pytest.mark.parametrize("family", ["entries", "rankone", "dense", "inputs"])
def test_per_problem_trace_matches_autograd_hessian_of_each_problem(family):
    dims, batch = [3, 4, 2], (3,)
    W = make_weights(dims, batch=batch, seed=5)
    meas, _, sets = _per_problem(family, dims, batch)
    for backend in ("torch", "cpp") if HAS_CPP else ("torch",):
        got = fk.hessian_trace(W, meas, per_layer=True, backend=backend)
        for b, (m_b, t_b) in enumerate(sets):
            expected = autograd_hessian_trace([w[b] for w in W], m_b, t_b, per_layer=True)
            torch.testing.assert_close(got[b], expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "auto", pytest.param("cpp", marks=needs_cpp)])
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_every_op_takes_per_problem_measurements(family, backend):
    """hessian_trace, hessian_trace_and_grad, TraceProblem, mse_loss, objective (with one lam per
    problem) and end_to_end on a batch of (2, 2) problems, each against the problem run alone."""
    dims, batch = [4, 5, 3], (2, 2)
    W = make_weights(dims, batch=batch, seed=6, requires_grad=True)
    meas, targets, sets = _per_problem(family, dims, batch)
    lam = torch.tensor([[0.0, 0.5], [1.0, 2.0]], dtype=torch.float64)
    trace = fk.hessian_trace(W, meas, backend=backend)
    value, grads = fk.hessian_trace_and_grad(W, meas, backend=backend)
    problem = fk.TraceProblem(W, meas, backend=backend)
    p_value, p_grads = problem(W)
    loss = fk.mse_loss(W, meas, targets, backend=backend)
    reg, reg_trace = fk.objective(W, meas, targets, lam=lam, backend=backend)
    reg_grads = torch.autograd.grad(reg.sum(), W)
    E = fk.end_to_end(W, backend=backend)
    for b, (m_b, t_b) in enumerate(sets):
        i = divmod(b, 2)
        W_b = [w.detach()[i].clone().requires_grad_() for w in W]
        ref = fk.hessian_trace(W_b, m_b, backend="torch")
        ref_grads = torch.autograd.grad(ref, W_b)
        ref_reg = fk.mse_loss(W_b, m_b, t_b, backend="torch") + lam[i] * fk.hessian_trace(W_b, m_b, backend="torch")
        ref_reg_grads = torch.autograd.grad(ref_reg, W_b)
        close = dict(rtol=1e-11, atol=1e-12)
        for got in (trace[i], value[i], p_value[i], reg_trace[i]):
            torch.testing.assert_close(got, ref.detach(), **close)
        torch.testing.assert_close(loss[i], fk.mse_loss(W_b, m_b, t_b, backend="torch").detach(), **close)
        torch.testing.assert_close(reg[i], ref_reg.detach(), **close)
        torch.testing.assert_close(E[i], fk.end_to_end(W_b, backend="torch").detach(), **close)
        for j in range(len(W)):
            torch.testing.assert_close(grads[j][i], ref_grads[j], **close)
            torch.testing.assert_close(p_grads[j][i], ref_grads[j], **close)
            torch.testing.assert_close(reg_grads[j][i], ref_reg_grads[j], **close)


@pytest.mark.parametrize("family", [f for f in ALL_FAMILIES if f != "isotropic"])
@pytest.mark.parametrize("weights_batch, meas_batch", [((3,), (2,)), ((), (2,)), ((2, 2), (4,)), ((4,), (2, 2))])
def test_a_per_problem_batch_unlike_the_weights_batch_is_an_error_naming_both(family, weights_batch, meas_batch):
    dims = [4, 5, 3]
    W = make_weights(dims, batch=weights_batch)
    meas, targets, _ = _per_problem(family, dims, meas_batch)
    pattern = rf"batch of shape \({', '.join(map(str, meas_batch))},?\).*weights have batch shape"
    for call in (lambda: fk.hessian_trace(W, meas), lambda: fk.hessian_trace_and_grad(W, meas),
                 lambda: fk.mse_loss(W, meas, targets), lambda: fk.objective(W, meas, targets, lam=0.1),
                 lambda: fk.TraceProblem(W, meas)):
        with pytest.raises(ValueError, match=pattern):
            call()


def test_per_problem_constructors_reject_sets_that_do_not_agree():
    with pytest.raises(ValueError, match=r"RankOne u \(2, 5, 3\) and v \(3, 5, 4\) must have the same batch shape"):
        fk.RankOne(torch.randn(2, 5, 3), torch.randn(3, 5, 4))
    with pytest.raises(ValueError, match=r"Entries rows \(2, 5\) and cols \(3, 5\) must have the same shape"):
        fk.Entries(torch.zeros(2, 5, dtype=torch.long), torch.zeros(3, 5, dtype=torch.long), (3, 4))
    with pytest.raises(ValueError, match=r"Entries cols must lie in \[0, 4\).*found values in \[0, 4\]"):
        fk.Entries(torch.zeros(2, 5, dtype=torch.long), torch.tensor([[0] * 5, [0, 0, 4, 0, 0]]), (3, 4))
    for bad, cls, name in ((torch.randn(2, 0, 3, 4), fk.Dense, "Dense A"),
                           (torch.randn(2, 0, 4), fk.Inputs, "Inputs x")):
        with pytest.raises(ValueError, match=f"{name} holds zero measurements"):
            cls(bad)


# ------------------------------------------------------------------ the C++ kernel's own checks


def _op_calls(W, family, operands):
    """Each C++ entry that takes operands, called directly (below the Python checks)."""
    L = len(W)
    saved = [W[0].new_zeros((*W[0].shape[:-2], 1))]
    grad_terms = W[0].new_ones(W[0].shape[:-2])
    return {
        "hessian_trace": lambda: schemas.hessian_trace(W, family, operands, False, 1.0, True),
        "hessian_trace_and_grad": lambda: schemas.hessian_trace_and_grad(W, family, operands, 1.0, True),
        "hessian_trace_backward": lambda: schemas.hessian_trace_backward(W, family, operands, saved, grad_terms,
                                                                         None, 1.0, True),
        "L": L,
    }


@needs_cpp
@pytest.mark.parametrize("family", [f for f in ALL_FAMILIES if f != "isotropic"])
def test_cpp_kernel_refuses_operands_whose_batch_is_not_the_weights_batch(family):
    dims = [4, 5, 3]
    W = make_weights(dims, batch=(3,))
    meas, _, _ = _per_problem(family, dims, (2,))
    calls = _op_calls(W, meas.family, list(meas.operands))
    for name in ("hessian_trace", "hessian_trace_and_grad", "hessian_trace_backward"):
        with pytest.raises(RuntimeError, match=r"per-problem batch \[2\] must equal the weights' batch shape \[3\]"):
            calls[name]()


@needs_cpp
def test_cpp_kernel_checks_every_problems_indices():
    """An out-of-range index in the second problem's set is an error naming the problem, on every entry
    (the Entries constructor checks too: the operands here are built by hand, below it)."""
    W = make_weights([4, 5, 3], batch=(2,))
    rows = torch.tensor([[0, 1, 2], [0, 3, 1]])  # d_L = 3: row 3 of problem 1 is out of range
    cols = torch.tensor([[0, 1, 3], [2, 2, 0]])
    calls = _op_calls(W, families.ENTRIES, [rows, cols])
    for name in ("hessian_trace", "hessian_trace_and_grad", "hessian_trace_backward"):
        with pytest.raises(RuntimeError, match=r"Entries operand rows of problem 1\[1\] = 3 is out of range"):
            calls[name]()
    cols_bad = torch.tensor([[0, 1, 3], [2, -1, 0]])
    with pytest.raises(RuntimeError, match=r"Entries operand cols of problem 1\[1\] = -1 is out of range"):
        _op_calls(W, families.ENTRIES, [torch.zeros(2, 3, dtype=torch.long), cols_bad])["hessian_trace"]()
    # a second operand whose batch disagrees with the first's
    with pytest.raises(RuntimeError, match=r"Entries operand cols must have shape \[2, 3\]"):
        _op_calls(W, families.ENTRIES, [rows.clamp(max=2), cols[:1]])["hessian_trace"]()


@needs_cpp
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_saved_size_and_fake_kernel_take_per_problem_operands(family):
    """The saved buffer per problem does not depend on whether the set is shared; opcheck (the fake
    kernel, sized by hessian_trace_saved_size, against the C++ kernel) passes with per-problem operands."""
    dims = [4, 6, 5, 3]
    W = make_weights(dims, batch=(2,))
    shared, per_problem, _ = _replicated(family, dims, (2,))
    size = schemas._C.hessian_trace_saved_size
    assert size(dims, per_problem.family, [list(t.shape) for t in per_problem.operands]) == \
        size(dims, shared.family, [list(t.shape) for t in shared.operands])
    args = (W, per_problem.family, list(per_problem.operands))
    torch.library.opcheck(schemas.hessian_trace, (*args, True, 2.0, False))
    torch.library.opcheck(schemas.hessian_trace_and_grad, (*args, 2.0, True))


# ------------------------------------------------------------------ training B problems at once (issue 21 §2)


def _train(model, meas, targets, lam, steps, base, backend, **base_kwargs):
    """``steps`` steps of FlatnessRegularized on ``mse_loss`` (summed over a batch of problems)."""
    from flatkern.optim import FlatnessRegularized

    opt = FlatnessRegularized(model, base, lam=lam, measurements=meas, backend=backend, **base_kwargs)
    traces = []
    for _ in range(steps):
        opt.zero_grad()
        fk.mse_loss(model.weights, meas, targets, backend=backend).sum().backward()
        opt.step()
        traces.append(opt.last_trace)
    return traces


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=needs_cpp)])
@pytest.mark.parametrize("base, base_kwargs", [(torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
                                               (torch.optim.Adam, dict(lr=0.01))], ids=["sgd", "adam"])
@pytest.mark.parametrize("family", ["entries", "rankone", "dense", "inputs", "isotropic"])
def test_one_optimizer_trains_b_problems_as_b_separate_runs(family, base, base_kwargs, backend):
    """A batched DeepLinear, one measurement set and one lam per problem, stepped by one
    FlatnessRegularized: every problem's weights and traces equal those of its own run, to 1e-12."""
    from flatkern.nn import DeepLinear

    widths, B, steps = [4, 6, 5, 3], 3, 6
    torch.manual_seed(0)
    model = DeepLinear(widths, batch=(B,), dtype=torch.float64)
    meas, targets, sets = _per_problem(family, widths, (B,))
    lam = torch.tensor([0.0, 0.3, 1.5], dtype=torch.float64)
    batched_traces = _train(model, meas, targets, lam, steps, base, backend, **base_kwargs)
    for b, (m_b, t_b) in enumerate(sets):
        alone = DeepLinear(widths, dtype=torch.float64)
        # the problem's starting point: the batched model's initial weights, re-drawn with the same seed
        torch.manual_seed(0)
        start = DeepLinear(widths, batch=(B,), dtype=torch.float64)
        with torch.no_grad():
            for layer, s in zip(alone.layers, start.layers):
                layer.weight.copy_(s.weight[b])
        traces = _train(alone, m_b, t_b, float(lam[b]), steps, base, backend, **base_kwargs)
        for w_alone, w_batched in zip(alone.weights, model.weights):
            torch.testing.assert_close(w_batched.detach()[b], w_alone.detach(), rtol=1e-12, atol=1e-12)
        if lam[b] > 0:
            for t_batched, t_alone in zip(batched_traces, traces):
                torch.testing.assert_close(t_batched[b], t_alone, rtol=1e-12, atol=1e-12)


def test_batched_deep_linear_draws_each_problem_as_nn_linear_and_runs_each_problem():
    from flatkern.nn import DeepLinear

    model = DeepLinear([4, 6, 3], batch=(2, 5), bias=True, dtype=torch.float64)
    assert [tuple(w.shape) for w in model.weights] == [(2, 5, 6, 4), (2, 5, 3, 6)]
    assert [tuple(c.shape) for c in model.biases] == [(2, 5, 6), (2, 5, 3)]
    for w, fan_in in zip(model.weights, (4, 6)):  # nn.Linear's U(-1/√fan_in, 1/√fan_in)
        assert w.abs().max() <= fan_in ** -0.5
    x = torch.randn(2, 5, 7, 4, dtype=torch.float64)
    y = model(x)
    for i in range(2):
        for k in range(5):
            h = x[i, k]
            for layer in model.layers:
                h = h @ layer.weight[i, k].T + layer.bias[i, k]
            torch.testing.assert_close(y[i, k], h, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(model.end_to_end(), model.weights[1] @ model.weights[0])
    with pytest.raises(ValueError, match=r"BatchedLinear of batch \(2, 5\) takes x of shape"):
        model(torch.randn(5, 2, 7, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="DeepLinear batch must be a tuple of ints >= 1"):
        DeepLinear([4, 3], batch=(2, 0))


def test_per_problem_lam_must_have_the_weights_batch_shape_and_be_valid():
    from flatkern.nn import DeepLinear
    from flatkern.optim import FlatnessRegularized

    model = DeepLinear([4, 3], batch=(3,), dtype=torch.float64)
    meas = fk.Isotropic()
    with pytest.raises(ValueError, match=r"lam has shape \(2,\), but one lam per problem needs the weights' batch "
                                         r"shape \(3,\)"):
        FlatnessRegularized(model, torch.optim.SGD, lam=torch.ones(2), measurements=meas, lr=0.1)
    with pytest.raises(ValueError, match="lam must be finite and >= 0 for every problem"):
        FlatnessRegularized(model, torch.optim.SGD, lam=torch.tensor([1.0, -1.0, 0.0]), measurements=meas, lr=0.1)
    with pytest.raises(TypeError, match="lam must be a number or a real tensor"):
        FlatnessRegularized(model, torch.optim.SGD, lam=torch.ones(3, dtype=torch.bool), measurements=meas, lr=0.1)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=needs_cpp)])
def test_step_with_closure_returns_the_loss_plus_each_problems_lam_times_its_trace(backend):
    from flatkern.nn import DeepLinear
    from flatkern.optim import FlatnessRegularized

    widths = [4, 5, 3]
    model = DeepLinear(widths, batch=(3,), dtype=torch.float64)
    meas, targets, _ = _per_problem("rankone", widths, (3,))
    lam = torch.tensor([0.0, 0.25, 2.0], dtype=torch.float64)
    opt = FlatnessRegularized(model, torch.optim.SGD, lam=lam, measurements=meas, backend=backend, lr=0.01)

    def closure():
        opt.zero_grad()
        loss = fk.mse_loss(model.weights, meas, targets, backend="torch").sum()
        loss.backward()
        return loss

    with torch.no_grad():
        loss = fk.mse_loss(model.weights, meas, targets, backend="torch").sum()
        trace = fk.hessian_trace(model.weights, meas, backend="torch")
    value = opt.step(closure)
    torch.testing.assert_close(value, loss + (lam * trace).sum(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(opt.last_trace, trace, rtol=1e-12, atol=1e-12)
    assert "0.25" in repr(opt)


def test_a_per_problem_lam_survives_state_dict():
    torch.manual_seed(3)
    W = [torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True), torch.randn(2, 2, 4, dtype=torch.float64,
                                                                                    requires_grad=True)]
    meas = fk.Isotropic()
    a = fk.optim.FlatnessRegularized(W, torch.optim.SGD, lam=torch.tensor([0.1, 0.2]), measurements=meas, lr=0.1)
    b = fk.optim.FlatnessRegularized(W, torch.optim.SGD, lam=torch.tensor([1.0, 1.0]), measurements=meas, lr=0.1)
    state = a.state_dict()
    b.load_state_dict(state)
    torch.testing.assert_close(b.problem_lam, torch.tensor([0.1, 0.2], dtype=torch.float64))
    plain = torch.optim.SGD(W, lr=0.1).state_dict()  # no problem_lam: b keeps its own
    b.load_state_dict(plain)
    torch.testing.assert_close(b.problem_lam, torch.tensor([0.1, 0.2], dtype=torch.float64))
    with pytest.raises(ValueError, match="batch shape"):
        b.load_state_dict({**state, "problem_lam": torch.ones(3)})
    torch.testing.assert_close(b.problem_lam, torch.tensor([0.1, 0.2], dtype=torch.float64))
