"""flatkern.nn: DeepLinear and hessian_trace_of against torch.func.hessian (float64)."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

import flatkern
from flatkern.nn import DeepLinear, hessian_trace_of

pytestmark = pytest.mark.filterwarnings("ignore:flatkern. using the plain-torch backend")


def _autograd_trace(model, x, y, loss, reduction, per_layer=False):
    """Trace of torch.func.hessian of the torch loss over every parameter (per layer: per module)."""
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    loss_fn = nn.MSELoss(reduction=reduction) if loss == "mse" else nn.CrossEntropyLoss(reduction=reduction)

    def f(p):
        return loss_fn(functional_call(model, p, (x,)), y)

    H = hessian(f)(params)
    diag = {n: H[n][n].reshape(params[n].numel(), params[n].numel()).diagonal().sum() for n in names}
    if not per_layer:
        return sum(diag.values())
    # group weight and bias by their module (the name before the last dot)
    modules = list(dict.fromkeys(n.rsplit(".", 1)[0] for n in names))
    return torch.stack([sum(v for n, v in diag.items() if n.rsplit(".", 1)[0] == m) for m in modules])


def _targets(loss, x, d_L, g):
    if loss == "mse":
        return torch.randn(x.shape[0], d_L, dtype=torch.float64, generator=g)
    return torch.randint(d_L, (x.shape[0],), generator=g)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dims", [[3, 4], [5, 3, 4], [4, 7, 2, 3], [2, 5, 3, 6, 3]])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_deeplinear_trace_matches_autograd_hessian(loss, bias, dims, reduction):
    g = torch.Generator().manual_seed(sum(dims) + 10 * bias)
    torch.manual_seed(sum(dims))
    model = DeepLinear(dims, bias=bias, dtype=torch.float64)
    x = torch.randn(7, dims[0], dtype=torch.float64, generator=g)
    y = _targets(loss, x, dims[-1], g)
    got = hessian_trace_of(model, x, loss=loss, reduction=reduction)
    want = _autograd_trace(model, x, y, loss, reduction)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_sequential_per_layer_trace_matches_autograd_hessian_blocks(loss):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 5, bias=False), nn.Sequential(nn.Linear(5, 3))).double()
    x = torch.randn(9, 4, dtype=torch.float64)
    y = _targets(loss, x, 3, torch.Generator().manual_seed(1))
    got = hessian_trace_of(model, x, loss=loss, per_layer=True)
    want = _autograd_trace(model, x, y, loss, "mean", per_layer=True)
    assert got.shape == (3,)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_trace_holds_for_batch_larger_than_widths_and_single_sample():
    torch.manual_seed(3)
    model = DeepLinear([3, 2, 3], bias=True, dtype=torch.float64)
    for N in (1, 200):
        x = torch.randn(N, 3, dtype=torch.float64)
        y = torch.randint(3, (N,))
        torch.testing.assert_close(
            hessian_trace_of(model, x, loss="cross_entropy"), _autograd_trace(model, x, y, "cross_entropy", "mean"),
            atol=1e-10, rtol=1e-10,
        )


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_trace_gradient_matches_gradient_of_autograd_hessian_trace(loss):
    torch.manual_seed(4)
    model = DeepLinear([3, 4, 2], bias=True, dtype=torch.float64)
    x = torch.randn(5, 3, dtype=torch.float64)
    y = _targets(loss, x, 2, torch.Generator().manual_seed(2))
    params = dict(model.named_parameters())
    # the last bias does not enter the MSE trace: its gradient is a materialized zero
    got = torch.autograd.grad(hessian_trace_of(model, x, loss=loss), list(params.values()), materialize_grads=True)

    loss_fn = nn.MSELoss() if loss == "mse" else nn.CrossEntropyLoss()
    flat = torch.cat([p.detach().reshape(-1) for p in params.values()]).requires_grad_()

    def f(v):
        chunks, i = {}, 0
        for n, p in params.items():
            chunks[n] = v[i:i + p.numel()].view_as(p)
            i += p.numel()
        return loss_fn(functional_call(model, chunks, (x,)), y)

    H = torch.autograd.functional.hessian(f, flat, create_graph=True)
    want = torch.autograd.grad(H.diagonal().sum(), flat)[0]
    torch.testing.assert_close(torch.cat([g.reshape(-1) for g in got]), want, atol=1e-10, rtol=1e-10)


def test_mse_trace_without_bias_equals_inputs_hessian_trace():
    torch.manual_seed(5)
    model = DeepLinear([4, 6, 3])
    x = torch.randn(10, 4)
    torch.testing.assert_close(
        hessian_trace_of(model, x), flatkern.hessian_trace(model.weights, flatkern.Inputs(x), backend="torch")
    )


def test_deeplinear_forward_is_x_times_end_to_end_transposed():
    torch.manual_seed(6)
    model = DeepLinear([5, 7, 4, 3], dtype=torch.float64)
    x = torch.randn(8, 5, dtype=torch.float64)
    E = model.end_to_end(backend="torch")
    assert E.shape == (3, 5)
    torch.testing.assert_close(model(x), x @ E.T)
    assert [tuple(w.shape) for w in model.weights] == [(7, 5), (4, 7), (3, 4)]
    assert all(w is layer.weight for w, layer in zip(model.weights, model.layers))


def test_deeplinear_with_bias_applies_affine_layers():
    torch.manual_seed(7)
    model = DeepLinear([3, 4, 2], bias=True, dtype=torch.float64)
    x = torch.randn(6, 3, dtype=torch.float64)
    W1, W2 = model.weights
    c1, c2 = model.biases
    torch.testing.assert_close(model(x), (x @ W1.T + c1) @ W2.T + c2)


@pytest.mark.parametrize("bad", [nn.Tanh(), nn.LayerNorm(4), nn.Conv1d(1, 1, 1)])
def test_unsupported_module_raises_naming_it(bad):
    model = nn.Sequential(nn.Linear(3, 4), bad, nn.Linear(4, 2))
    with pytest.raises(TypeError, match=type(bad).__name__):
        hessian_trace_of(model, torch.randn(5, 3))


def test_bad_arguments_raise_clear_errors():
    model = DeepLinear([3, 4, 2])
    with pytest.raises(ValueError, match="d_0=3"):
        hessian_trace_of(model, torch.randn(5, 4))
    with pytest.raises(ValueError, match="loss must be one of"):
        hessian_trace_of(model, torch.randn(5, 3), loss="l1")
    with pytest.raises(TypeError, match="LSTM"):
        hessian_trace_of(nn.LSTM(3, 2), torch.randn(5, 3))
    with pytest.raises(ValueError, match="widths must list at least two"):
        DeepLinear([3])


def test_deeplinear_of_a_single_int_says_widths_must_be_a_sequence():
    with pytest.raises(TypeError, match=r"widths must be a sequence of ints \[d_0, d_1, \.\.\., d_L\].*got 20 \(int\)"):
        DeepLinear(20)


@pytest.mark.parametrize("widths", [np.array([3, 4, 2]), [np.int64(3), np.int32(4), 2], (3, np.int16(4), np.int64(2))])
def test_deeplinear_takes_numpy_integers_as_widths(widths):
    model = DeepLinear(widths)
    assert model.widths == [3, 4, 2] and all(type(d) is int for d in model.widths)
    assert [tuple(w.shape) for w in model.weights] == [(4, 3), (2, 4)]
    assert "widths=[3, 4, 2]" in repr(model)


@pytest.mark.parametrize("bad, exc, match", [
    ([3, True, 2], TypeError, r"widths\[1\] must be an integer, got the bool True"),
    ([3, np.True_, 2], TypeError, r"widths\[1\] must be an integer, got the bool"),
    ([3, 4.5, 2], TypeError, r"widths\[1\] must be an integer, got 4\.5"),
    ([3, 4.0, 2], TypeError, r"widths\[1\] must be an integer, got 4\.0"),
    ([3, 0, 2], ValueError, r"widths\[1\] must be >= 1, got 0"),
    ("34", TypeError, "widths must be a sequence of ints"),
])
def test_deeplinear_refuses_bools_floats_and_zero_widths_naming_the_entry(bad, exc, match):
    with pytest.raises(exc, match=match):
        DeepLinear(bad)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("bias", [False, True])
def test_no_samples_mean_raises_naming_the_inputs_shape(loss, bias):
    # plain torch's mean loss over no samples is NaN: there is no trace to give
    model = DeepLinear([3, 4, 2], bias=bias, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"inputs has shape \(0, 3\): no samples"):
        hessian_trace_of(model, torch.zeros(0, 3, dtype=torch.float64), loss=loss)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("bias", [False, True])
def test_no_samples_sum_is_zero_like_plain_torch(loss, bias):
    # plain torch's summed loss over no samples is identically 0, and so is its Hessian
    torch.manual_seed(9)
    model = DeepLinear([3, 4, 2], bias=bias, dtype=torch.float64)
    x = torch.zeros(0, 3, dtype=torch.float64)
    y = _targets(loss, x, 2, torch.Generator().manual_seed(0))
    want = _autograd_trace(model, x, y, loss, "sum")
    got = hessian_trace_of(model, x, loss=loss, reduction="sum")
    assert want.item() == 0.0 and got.item() == 0.0 and got.requires_grad
    torch.testing.assert_close(hessian_trace_of(model, x, loss=loss, reduction="sum", per_layer=True),
                               torch.zeros(2, dtype=torch.float64))


def _mse_hessian_trace_in_inputs(model, y):
    """``x ↦ tr ∇²_θ MSELoss(model(x), y)`` from ``torch.func.hessian`` (θ: every parameter, flattened)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    names = list(params)
    flat = torch.cat([params[n].reshape(-1) for n in names])

    def trace(xx):
        def f(v):
            chunks, i = {}, 0
            for n in names:
                chunks[n] = v[i:i + params[n].numel()].view_as(params[n])
                i += params[n].numel()
            return nn.MSELoss()(functional_call(model, chunks, (xx,)), y)

        return hessian(f)(flat).diagonal().sum()

    return trace


def test_bias_free_mse_stack_keeps_the_gradient_with_respect_to_the_inputs():
    # issue 18 item 3: the fast path (Inputs measurement) keeps a private copy of x, so x.grad stayed None
    torch.manual_seed(15)
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Linear(4, 2, bias=False)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    trace = _mse_hessian_trace_in_inputs(model, torch.randn(5, 2, dtype=torch.float64))
    want = torch.func.grad(trace)(x)
    assert want.norm() > 0.1
    xx = x.clone().requires_grad_()
    got = hessian_trace_of(model, xx)
    got.backward()
    assert xx.grad is not None
    torch.testing.assert_close(xx.grad, want, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(got.detach(), trace(x), atol=1e-12, rtol=1e-12)
    # the value is the fast path's when no gradient in x is asked for
    torch.testing.assert_close(hessian_trace_of(model, x), got.detach(), atol=0, rtol=1e-13)


def test_forward_mode_derivatives_in_the_inputs_match_the_autograd_hessian():
    # the fast path's op keeps a private copy of x: under jvp / forward_ad its tangent was lost
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(16)
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Linear(4, 2, bias=False)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    v = torch.randn(5, 3, dtype=torch.float64)
    want = torch.func.jvp(_mse_hessian_trace_in_inputs(model, torch.randn(5, 2, dtype=torch.float64)), (x,), (v,))[1]
    assert want.abs() > 1e-3
    got = torch.func.jvp(lambda xx: hessian_trace_of(model, xx), (x,), (v,))[1]
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    with fwAD.dual_level(), torch.no_grad():
        tangent = fwAD.unpack_dual(hessian_trace_of(model, fwAD.make_dual(x, v))).tangent
    torch.testing.assert_close(tangent, want, atol=1e-12, rtol=1e-10)


def test_a_model_reusing_a_layer_raises_naming_both_positions():
    # issue 18 item 2: the trace of a tied weight depends on the targets; today it was the untied answer
    lin = nn.Linear(3, 3, bias=False)
    with pytest.raises(ValueError, match=r"same nn.Linear object is used at model\[0\] and at model\[1\]"):
        hessian_trace_of(nn.Sequential(lin, lin), torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"model\[0\] and at model\[1\]\.layers\[0\]"):
        hessian_trace_of(nn.Sequential(lin, _deep(lin)), torch.randn(4, 3))


def _deep(lin):
    """A DeepLinear whose only layer is ``lin``."""
    d = DeepLinear([3, 3])
    d.layers[0] = lin
    return d

