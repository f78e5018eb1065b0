"""hessian_trace_of for networks piecewise linear in each weight (Linear + ReLU / LeakyReLU), issue 19.

Ground truth: ``torch.func.hessian`` of the whole loss over every parameter, float64, on tiny
networks; the gradient of the trace is ``torch.func.grad`` of that Hessian's trace.  Autograd's
Hessian uses the masks torch's backward uses (``σ'(0) = 0`` for ReLU, the slope for LeakyReLU),
so the two agree everywhere, kinks included.  The random networks (hypothesis, profiles in
``tests/conftest.py``: few examples by default, eight times as many under ``-m slow``) cover
depths 1-5, LeakyReLU slopes 0, 0.01 and 0.3 and ReLU, biases or none, both losses and
reductions, batches of 1 and 7, nested containers and identity-like modules.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, hessian

from flatkern import piecewise
from flatkern.nn import DeepLinear, hessian_trace_and_grad_of, hessian_trace_of
from flatkern.reference import piecewise_layer_terms_and_grad_ref, piecewise_layer_terms_ref

PROFILES = [pytest.param("default", id="default"), pytest.param("flatkern-slow", id="long", marks=pytest.mark.slow)]
RTOL = 1e-10  # float64 against the autograd Hessian: the bar
SLOPES = ("relu", 0.0, 0.01, 0.3)  # "relu" is nn.ReLU; a number, nn.LeakyReLU(number)


@pytest.fixture(params=PROFILES)
def profile(request):
    return request.param


def _settings(profile: str) -> settings:
    return settings() if profile == "default" else settings.get_profile(profile)


# ------------------------------------------------------------------ ground truth


def _flat(model):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def unflatten(v):
        out, i = {}, 0
        for n, s in zip(names, shapes):
            out[n] = v[i:i + s.numel()].view(s)
            i += s.numel()
        return out

    return theta, unflatten, names, shapes


def _loss_fn(loss, reduction):
    return nn.MSELoss(reduction=reduction) if loss == "mse" else nn.CrossEntropyLoss(reduction=reduction)


def autograd_trace(model, x, y, loss, reduction):
    """``(tr ∇²_θ L, ∇_θ tr ∇²_θ L, ∇_x tr ∇²_θ L)`` by ``torch.func`` (θ: every parameter, flattened)."""
    theta, unflatten, _, _ = _flat(model)
    loss_fn = _loss_fn(loss, reduction)

    def trace(th, xx):
        return hessian(lambda t: loss_fn(functional_call(model, unflatten(t), (xx,)), y))(th).diagonal().sum()

    g_theta, g_x = torch.func.grad(trace, argnums=(0, 1))(theta, x)
    return trace(theta, x), g_theta, g_x


def autograd_blocks(model, x, y, loss, reduction):
    """The trace of each ``nn.Linear``'s diagonal block of the Hessian (weight and bias), in order."""
    theta, unflatten, names, shapes = _flat(model)
    loss_fn = _loss_fn(loss, reduction)
    d = hessian(lambda t: loss_fn(functional_call(model, unflatten(t), (x,)), y))(theta).diagonal()
    per_module: dict[str, torch.Tensor] = {}
    i = 0
    for n, s in zip(names, shapes):
        per_module[n.rsplit(".", 1)[0]] = per_module.get(n.rsplit(".", 1)[0], 0) + d[i:i + s.numel()].sum()
        i += s.numel()
    return torch.stack(list(per_module.values()))


def _targets(loss, shape, C, g):
    if loss == "mse":
        return torch.randn(*shape, C, dtype=torch.float64, generator=g)
    return torch.randint(C, shape, generator=g)


def _flat_grads(grads):
    return torch.cat([g.reshape(-1) for g in grads])


def assert_rel(got, want, rtol=RTOL, what=""):
    """``‖got - want‖ <= rtol ‖want‖`` (plus a hair for an exact zero)."""
    err, size = (got - want).norm().item(), want.norm().item()
    assert err <= rtol * size + 1e-13, f"{what}: error {err:.3g} against norm {size:.3g} (rtol {rtol})"


# ------------------------------------------------------------------ random networks


@dataclasses.dataclass(frozen=True)
class Net:
    widths: tuple[int, ...]
    bias: bool
    acts: tuple[tuple, ...]  # after each layer (the last: output activations), entries of SLOPES
    loss: str
    reduction: str
    batch: int
    nest: bool
    seed: int

    def model(self) -> nn.Module:
        torch.manual_seed(self.seed)
        mods: list[nn.Module] = []
        for j, (a, b) in enumerate(zip(self.widths, self.widths[1:])):
            block: list[nn.Module] = [nn.Linear(a, b, bias=self.bias)]
            for s in self.acts[j]:
                block.append(nn.ReLU() if s == "relu" else nn.LeakyReLU(s))
            if self.nest and j % 2 == 0:
                mods.append(nn.Sequential(*block, nn.Identity()))  # a nested container, an identity
            else:
                mods.extend(block)
        if self.nest:
            mods.append(nn.Dropout(0.5))  # in eval mode below: the identity
        return nn.Sequential(*mods).double().eval()

    def data(self):
        g = torch.Generator().manual_seed(self.seed + 1)
        x = torch.randn(self.batch, self.widths[0], dtype=torch.float64, generator=g)
        return x, _targets(self.loss, (self.batch,), self.widths[-1], g)


@st.composite
def nets(draw, max_depth=5, max_width=5):
    depth = draw(st.integers(1, max_depth))
    widths = tuple(draw(st.integers(1, max_width)) for _ in range(depth + 1))
    hidden = st.lists(st.sampled_from(SLOPES), min_size=0, max_size=2).map(tuple)
    acts = [draw(hidden) for _ in range(depth - 1)]
    acts.append(draw(st.sampled_from([(), (), ("relu",), (0.3,)])))  # mostly no output activation
    loss = draw(st.sampled_from(["mse", "cross_entropy"]))
    if loss == "cross_entropy" and widths[-1] == 1:
        widths = widths[:-1] + (draw(st.integers(2, max_width)),)  # one class: a constant loss, trace 0
    return Net(widths, draw(st.booleans()), tuple(acts), loss, draw(st.sampled_from(["mean", "sum"])),
               draw(st.sampled_from([1, 7])), draw(st.booleans()), draw(st.integers(0, 2**16)))


def _check_against_autograd(net: Net, x_grad: bool = True):
    model = net.model()
    x, y = net.data()
    want, want_grad, want_x_grad = autograd_trace(model, x, y, net.loss, net.reduction)

    xx = x.clone().requires_grad_(x_grad)
    got = hessian_trace_of(model, xx, loss=net.loss, reduction=net.reduction)
    params = list(model.parameters())
    grads = torch.autograd.grad(got, params + ([xx] if x_grad else []), allow_unused=True, materialize_grads=True)
    assert_rel(got.detach(), want, what=f"trace of {net}")
    assert_rel(_flat_grads(grads[:len(params)]), want_grad, what=f"gradient of the trace of {net}")
    if x_grad:
        assert_rel(grads[-1], want_x_grad, what=f"gradient in x of the trace of {net}")

    # the hand-derived value and gradient, against autograd of the value and against the truth
    value, hand = hessian_trace_and_grad_of(model, x, loss=net.loss, reduction=net.reduction)
    assert not value.requires_grad and not any(g.requires_grad for g in hand)
    assert [g.shape for g in hand] == [p.shape for p in params]
    assert_rel(value, got.detach(), rtol=1e-12, what="hessian_trace_and_grad_of value")
    assert_rel(_flat_grads(hand), _flat_grads(grads[:len(params)]), what="hand-derived gradient vs autograd")
    assert_rel(_flat_grads(hand), want_grad, what="hand-derived gradient vs autograd Hessian")

    # the reference formula (reference.py)
    layers = piecewise.walk(model).layers
    slopes = [[0.0 if s == "relu" else s for s in a] for a in net.acts]
    ref = piecewise_layer_terms_ref([la.weight for la in layers], [la.bias for la in layers], slopes, x,
                                    net.loss, net.reduction)
    assert_rel(ref.sum().detach(), want, what="piecewise_layer_terms_ref")
    return model, x, y


def test_random_relu_networks_match_the_autograd_hessian_trace_and_its_gradient(profile):
    @_settings(profile)
    @given(net=nets())
    def check(net):
        _check_against_autograd(net)

    check()


GRID = [  # every loss x bias x depth 1-5; the slopes and batch sizes cycle through all values
    pytest.param(loss, bias, depth, SLOPES[i % 4], (1, 7)[i % 2], id=f"{loss}-bias{int(bias)}-L{depth}-{SLOPES[i % 4]}")
    for i, (loss, bias, depth) in enumerate(
        (loss, bias, depth) for loss in ("mse", "cross_entropy") for bias in (False, True) for depth in range(1, 6))
]


@pytest.mark.parametrize("loss, bias, depth, slope, batch", GRID)
def test_relu_networks_on_a_grid_match_the_autograd_hessian(loss, bias, depth, slope, batch):
    widths = tuple([3, 4, 2, 5, 3, 4][: depth] + [3])
    acts = tuple((slope,) for _ in range(depth - 1)) + ((),)
    for reduction in ("mean", "sum"):
        _check_against_autograd(Net(widths, bias, acts, loss, reduction, batch, nest=depth % 2 == 0, seed=depth))


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("slope", SLOPES)
def test_per_layer_traces_are_the_linear_layers_hessian_blocks(loss, slope):
    act = nn.ReLU() if slope == "relu" else nn.LeakyReLU(slope)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), copy.deepcopy(act), nn.Linear(6, 5, bias=False), copy.deepcopy(act),
                          nn.Sequential(nn.Linear(5, 3))).double()
    x = torch.randn(7, 4, dtype=torch.float64)
    y = _targets(loss, (7,), 3, torch.Generator().manual_seed(0))
    got = hessian_trace_of(model, x, loss=loss, per_layer=True)
    assert got.shape == (3,)
    torch.testing.assert_close(got, autograd_blocks(model, x, y, loss, "mean"), rtol=RTOL, atol=1e-13)
    value, _ = hessian_trace_and_grad_of(model, x, loss=loss, per_layer=True)
    torch.testing.assert_close(value, got.detach(), rtol=1e-12, atol=1e-14)


def test_the_hand_derived_gradient_matches_the_reference_on_wide_batches():
    # a batch larger than every width, cross-entropy with 10 classes: the shapes of the benchmark, small
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 8), nn.LeakyReLU(0.01), nn.Linear(8, 10)).double()
    x = torch.randn(40, 12, dtype=torch.float64)
    for loss in ("mse", "cross_entropy"):
        value, grads = hessian_trace_and_grad_of(model, x, loss=loss)
        layers = piecewise.walk(model).layers
        ref, ref_grads = piecewise_layer_terms_and_grad_ref(
            [la.weight for la in layers], [la.bias for la in layers], [[0.0], [0.01], []], x, loss)
        torch.testing.assert_close(value, ref.sum(), rtol=1e-12, atol=0)
        want = [g for pair in ref_grads for g in pair if g is not None]
        assert_rel(_flat_grads(grads), _flat_grads(want), rtol=1e-12, what=loss)


def test_value_and_gradient_works_without_a_graph():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    x = torch.randn(6, 3)
    with torch.no_grad():
        v1, g1 = hessian_trace_and_grad_of(model, x, loss="cross_entropy")
    with torch.inference_mode():
        v2, g2 = hessian_trace_and_grad_of(model, x, loss="cross_entropy")
    assert torch.equal(v1, v2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    want = torch.autograd.grad(hessian_trace_of(model, x, loss="cross_entropy"), list(model.parameters()))
    for g, w in zip(g1, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ kinks, shapes, identity-like modules


@pytest.mark.parametrize("slope", SLOPES)
def test_at_a_kink_the_mask_is_torchs_one_sided_derivative(slope):
    # z_1[0] = 0 exactly for the zero sample: relu uses σ'(0) = 0, leaky_relu σ'(0) = slope, and so does
    # autograd's Hessian; the unit's outgoing weights are nonzero, so the convention changes the trace
    act = nn.ReLU() if slope == "relu" else nn.LeakyReLU(slope)
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), act, nn.Linear(4, 2)).double()
    with torch.no_grad():
        model[0].bias[0] = 0.0
    x = torch.cat([torch.zeros(1, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)])
    for loss in ("mse", "cross_entropy"):
        y = _targets(loss, (3,), 2, torch.Generator().manual_seed(5))
        want, want_grad, _ = autograd_trace(model, x, y, loss, "mean")
        got = hessian_trace_of(model, x, loss=loss)
        assert_rel(got.detach(), want, what="trace at a kink")
        assert_rel(_flat_grads(hessian_trace_and_grad_of(model, x, loss=loss)[1]), want_grad, what="gradient at a kink")


def test_flatten_before_the_first_layer_and_leading_sample_dims_for_mse():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 3), nn.Flatten()).double()
    x = torch.randn(7, 3, 4, dtype=torch.float64)
    for loss in ("mse", "cross_entropy"):
        y = _targets(loss, (7,), 3, torch.Generator().manual_seed(7))
        want, _, want_x = autograd_trace(model, x, y, loss, "mean")
        xx = x.clone().requires_grad_()
        got = hessian_trace_of(model, xx, loss=loss)
        assert_rel(got.detach(), want, what="flatten")
        assert_rel(torch.autograd.grad(got, xx)[0], want_x, what="flatten, gradient in x")
    # MSE: leading dimensions are samples, as in nn.MSELoss over (..., C)
    model = nn.Sequential(nn.Linear(4, 5), nn.LeakyReLU(0.1), nn.Linear(5, 2)).double()
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    y = torch.randn(2, 3, 2, dtype=torch.float64)
    assert_rel(hessian_trace_of(model, x).detach(), autograd_trace(model, x, y, "mse", "mean")[0], what="(..., d_0)")


def test_relu_inside_deeplinear_containers_and_nested_sequentials():
    torch.manual_seed(8)
    model = nn.Sequential(DeepLinear([3, 4], bias=True), nn.ReLU(), nn.Sequential(nn.Sequential(DeepLinear([4, 5, 2]))))
    model = model.double()
    x = torch.randn(7, 3, dtype=torch.float64)
    y = torch.randint(2, (7,))
    want = autograd_trace(model, x, y, "cross_entropy", "sum")[0]
    assert_rel(hessian_trace_of(model, x, loss="cross_entropy", reduction="sum").detach(), want, what="DeepLinear")


def test_networks_without_activations_give_the_deep_linear_answer_bit_for_bit():
    torch.manual_seed(9)
    a, b, c = nn.Linear(4, 6), nn.Linear(6, 5), nn.Linear(5, 3, bias=False)
    plain = nn.Sequential(a, b, c)
    dressed = nn.Sequential(nn.Flatten(), a, nn.Identity(), nn.Dropout(0.3), nn.Sequential(b, nn.LeakyReLU(1.0)), c,
                            nn.Flatten()).eval()
    x = torch.randn(9, 4)
    for loss in ("mse", "cross_entropy"):
        for per_layer in (False, True):
            want = hessian_trace_of(plain, x, loss=loss, per_layer=per_layer)
            got = hessian_trace_of(dressed, x, loss=loss, per_layer=per_layer)
            assert torch.equal(got, want)
            # the general sweep (shared G above the last mask) agrees with the linear formula
            net = piecewise.walk(plain)
            torch.testing.assert_close(piecewise.layer_terms(net, x, loss), hessian_trace_of(plain, x, loss=loss,
                                       per_layer=True), rtol=1e-6, atol=1e-7)


def test_bias_free_linear_stack_mse_equals_the_inputs_family_exactly():
    # the fast path of today: flatkern.hessian_trace with Inputs(x) (issue 19: deep linear answers unchanged)
    import flatkern as fk

    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(4, 6, bias=False), nn.Identity(), nn.Linear(6, 3, bias=False))
    x = torch.randn(10, 4)
    want = fk.hessian_trace([model[0].weight, model[2].weight], fk.Inputs(x), per_layer=True)
    assert torch.equal(hessian_trace_of(model, x, per_layer=True), want)


def test_nan_in_the_inputs_gives_nan_like_plain_torch():
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    x[2, 1] = float("nan")
    for loss in ("mse", "cross_entropy"):
        y = _targets(loss, (5,), 2, torch.Generator().manual_seed(0))
        assert torch.isnan(autograd_trace(model, x, y, loss, "mean")[0])
        assert torch.isnan(hessian_trace_of(model, x, loss=loss))
        assert torch.isnan(hessian_trace_of(model, x, loss=loss, per_layer=True)).all()
        assert torch.isnan(hessian_trace_and_grad_of(model, x, loss=loss)[0])


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_empty_batch_sum_is_zero_and_mean_raises(loss):
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    x = torch.zeros(0, 3, dtype=torch.float64)
    y = _targets(loss, (0,), 2, torch.Generator().manual_seed(0))
    want = autograd_trace(model, x, y, loss, "sum")[0]
    got = hessian_trace_of(model, x, loss=loss, reduction="sum")
    assert want.item() == 0.0 and got.item() == 0.0 and got.requires_grad
    value, grads = hessian_trace_and_grad_of(model, x, loss=loss, reduction="sum")
    assert value.item() == 0.0 and all((g == 0).all() for g in grads)
    with pytest.raises(ValueError, match=r"inputs has shape \(0, 3\): no samples"):
        hessian_trace_of(model, x, loss=loss)
    with pytest.raises(ValueError, match=r"inputs has shape \(0, 3\): no samples"):
        hessian_trace_and_grad_of(model, x, loss=loss)


# ------------------------------------------------------------------ what does not fit: a clear error


@pytest.mark.parametrize("act", [nn.Tanh(), nn.GELU(), nn.Sigmoid(), nn.SiLU(), nn.Softplus()])
def test_smooth_activations_raise_naming_the_module_and_why(act):
    model = nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.Identity(), act), nn.Linear(4, 2))
    with pytest.raises(TypeError, match=rf"model\[1\]\[1\] is {type(act).__name__}.*piecewise linear in each weight"):
        hessian_trace_of(model, torch.randn(5, 3))
    with pytest.raises(TypeError, match="piecewise linear in each weight"):
        hessian_trace_and_grad_of(model, torch.randn(5, 3))


def test_batchnorm_train_mode_dropout_and_other_modules_raise_naming_them():
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(TypeError, match=r"model\[1\] is BatchNorm1d.*train mode.*piecewise linear"):
        hessian_trace_of(bn, torch.randn(5, 3))
    with pytest.raises(TypeError, match=r"model\[1\] is BatchNorm1d"):
        hessian_trace_of(bn.eval(), torch.randn(5, 3))
    drop = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Dropout(0.2), nn.Linear(4, 2))
    with pytest.raises(TypeError, match=r"model\[2\] is Dropout.*train mode.*model\.eval\(\)"):
        hessian_trace_of(drop, torch.randn(5, 3))
    hessian_trace_of(drop.eval(), torch.randn(5, 3))  # eval mode: the identity
    with pytest.raises(TypeError, match=r"does not support Conv1d \(model\[1\]"):
        hessian_trace_of(nn.Sequential(nn.Linear(3, 4), nn.Conv1d(1, 1, 1)), torch.randn(5, 3))


def test_subclasses_with_their_own_forward_raise():
    class Shifted(nn.ReLU):
        def forward(self, x):
            return torch.relu(x - 1)

    class MyLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    class Residual(nn.Sequential):
        def forward(self, x):
            return x + super().forward(x)

    for bad in (Shifted(), MyLinear(4, 4), Residual(nn.Linear(4, 4))):
        with pytest.raises(TypeError, match=type(bad).__name__):
            hessian_trace_of(nn.Sequential(nn.Linear(3, 4), bad, nn.Linear(4, 2)), torch.randn(5, 3))

    class Keeps(nn.LeakyReLU):  # the forward of nn.LeakyReLU: accepted
        pass

    torch.manual_seed(13)
    same = nn.Sequential(nn.Linear(3, 4), nn.LeakyReLU(0.2), nn.Linear(4, 2))
    sub = nn.Sequential(same[0], Keeps(0.2), same[2])
    x = torch.randn(5, 3)
    assert torch.equal(hessian_trace_of(sub, x), hessian_trace_of(same, x))


def test_a_layer_used_twice_raises_naming_both_positions():
    lin = nn.Linear(3, 3, bias=False)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    with pytest.raises(ValueError, match=r"same nn.Linear object is used at model\[0\] and at model\[2\]"):
        hessian_trace_of(model, torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"model\[0\] and at model\[2\]"):
        hessian_trace_and_grad_of(model, torch.randn(5, 3))
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    b.weight = a.weight  # a tied weight in two modules
    with pytest.raises(ValueError, match=r"model\[0\]\.weight and model\[2\]\.weight are the same tensor or share memory"):
        hessian_trace_of(nn.Sequential(a, nn.ReLU(), b), torch.randn(5, 3))
    c = nn.Linear(3, 3)
    with torch.no_grad():  # an aliased view of another layer's weight
        c.weight = nn.Parameter(a.weight.data.view(3, 3))
    with pytest.raises(ValueError, match="share memory"):
        hessian_trace_of(nn.Sequential(a, c), torch.randn(5, 3))


def test_forward_hooks_raise():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    handle = model[1].register_forward_hook(lambda m, i, o: o * 2)
    with pytest.raises(TypeError, match=r"model\[1\] \(ReLU\) has forward hooks"):
        hessian_trace_of(model, torch.randn(5, 3))
    handle.remove()
    hessian_trace_of(model, torch.randn(5, 3))


def test_bad_inputs_raise_clear_errors():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"inputs has shape \(5, 4\) but the first layer model\[0\] takes d_0=3"):
        hessian_trace_of(model, torch.randn(5, 4))
    with pytest.raises(TypeError, match="inputs must be a floating tensor.*int64"):
        hessian_trace_of(model, torch.ones(5, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="inputs are torch.float64 on cpu but the model is torch.float32"):
        hessian_trace_of(model, torch.randn(5, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"cross_entropy' needs inputs of shape \(N, d_0\)"):
        hessian_trace_of(model, torch.randn(2, 5, 3), loss="cross_entropy")
    if os.environ.get("TRITON_INTERPRET") != "1":  # a named kernel that cannot run says why (issue 19 item 2)
        with pytest.raises(RuntimeError, match='backend="triton" cannot run here: Triton kernels need CUDA'):
            hessian_trace_of(model, torch.randn(5, 3), backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        hessian_trace_of(model, torch.randn(5, 3), backend="gpu")
    flat = nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"inputs has shape \(5, 3, 5\) \(\(5, 15\) after model\[0\]\)"):
        hessian_trace_of(flat, torch.randn(5, 3, 5))
    late = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"model\[2\].*after the first nn.Linear would reshape"):
        hessian_trace_of(late, torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="no nn.Linear layer"):
        hessian_trace_of(nn.Sequential(nn.ReLU()), torch.randn(5, 3))


# ------------------------------------------------------------------ the optional peer: BackPACK


def test_the_trace_equals_the_sum_of_backpacks_diag_hessian():
    backpack = pytest.importorskip("backpack", reason="BackPACK is an optional peer (pip install backpack-for-pytorch)")
    from backpack.extensions import DiagHessian

    torch.manual_seed(14)
    for loss in ("mse", "cross_entropy"):
        for bias in (False, True):
            model = nn.Sequential(nn.Linear(4, 6, bias=bias), nn.ReLU(), nn.Linear(6, 5, bias=bias),
                                  nn.LeakyReLU(0.3), nn.Linear(5, 3, bias=bias)).double()
            x = torch.randn(7, 4, dtype=torch.float64)
            y = _targets(loss, (7,), 3, torch.Generator().manual_seed(15))
            ext = backpack.extend(copy.deepcopy(model))
            lossfunc = backpack.extend(_loss_fn(loss, "mean"))
            with backpack.backpack(DiagHessian()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                lossfunc(ext(x), y).backward()
            want = sum(p.diag_h.sum() for p in ext.parameters())
            assert_rel(hessian_trace_of(model, x, loss=loss).detach(), want.detach(), what=f"BackPACK {loss}")


def test_the_benchmarks_per_sample_jacobian_peer_gives_the_same_trace():
    # bench/bench_relu.py times torch.func's vmap(jacrev) GGN trace as an exact peer: it must be exact
    from flatkern.benchmarks import piecewise as bench

    model = bench.mlp((6, 5, 4, 3), dtype=torch.float64)
    x = torch.randn(7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(16))
    want = hessian_trace_of(model, x, loss="cross_entropy").detach()
    assert_rel(bench.vmap_ggn_trace(model, x), want, rtol=1e-12, what="vmap(jacrev)")
    assert_rel(bench.vmap_ggn_trace(model, x, chunk=3), want, rtol=1e-12, what="vmap(jacrev) in chunks")


def test_float32_keeps_its_accuracy_on_confident_predictions():
    # 1 - p_k for the predicted class is tiny and other p_k underflow to 0: S's diagonal and the top step
    # must not cancel, and √p's derivative must not turn 0 · inf into NaN (it did through p.sqrt())
    torch.manual_seed(17)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.LeakyReLU(0.1), nn.Linear(16, 5))
    with torch.no_grad():
        model[4].weight.mul_(360.0)
        model[4].bias.zero_()
        model[4].bias[2] = 12.0
    x = torch.randn(64, 8)
    p = torch.softmax(model(x), -1)
    assert (1 - p.max(-1).values).median() < 1e-3 and (p == 0).any()
    params = list(model.parameters())
    model64 = copy.deepcopy(model).double()
    want = hessian_trace_of(model64, x.double(), loss="cross_entropy")
    want_grads = torch.autograd.grad(want, list(model64.parameters()))

    # plain torch's own float32 error: the reference formula in float32 (STYLE.md: at most twice that)
    layers = piecewise.walk(model).layers
    ref = piecewise_layer_terms_ref([la.weight for la in layers], [la.bias for la in layers], [[0.0], [0.1], []], x,
                                    "cross_entropy").sum()
    ref_grads = torch.autograd.grad(ref, [t for la in layers for t in (la.weight, la.bias)])

    def err(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    got = hessian_trace_of(model, x, loss="cross_entropy")
    value, hand = hessian_trace_and_grad_of(model, x, loss="cross_entropy")
    auto = torch.autograd.grad(got, params)
    assert err(got.detach(), want.detach()) <= max(2 * err(ref.detach(), want.detach()), 1e-6)
    assert err(value, want.detach()) <= max(2 * err(ref.detach(), want.detach()), 1e-6)
    for k, w in enumerate(want_grads):
        bound = 2 * err(ref_grads[k], w)
        assert torch.isfinite(auto[k]).all() and torch.isfinite(hand[k]).all()
        assert err(auto[k], w) <= bound and err(hand[k], w) <= bound, (k, err(auto[k], w), err(hand[k], w), bound)
