"""The fused kernels of the ReLU-network trace, ``flatkern::mlp_hessian_trace`` (issue 19 item 2).

Every backend (``backend`` fixture: "torch", "cpp", "triton" under ``TRITON_INTERPRET=1``, "auto")
against the plain-torch reference (``flatkern.reference.piecewise_layer_terms_ref``, autograd for
its gradients) in float64 to 1e-10, over random networks in the style of
``tests/test_properties.py`` (hypothesis: depths 1-5, ReLU and LeakyReLU slopes 0 / 0.01 / 0.3,
stacked activations, biases or none, MSE and cross-entropy, both reductions, batch 1 and 7, per
layer or summed; values and the gradients in every parameter and in x); and against
``torch.func.hessian`` on a grid.  Then the op itself: ``torch.library.opcheck``, its fake kernel's
shapes, ``torch.compile(fullgraph=True)``, bad input, a second derivative's clear error, the
extension missing, deep linear networks.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from test_piecewise import RTOL, SLOPES, Net, _flat_grads, _settings, assert_rel, autograd_trace, nets
from test_piecewise import profile  # noqa: F401  (the fixture: default examples, and a slow-marked twin with 8x)
from torch import nn

from flatkern import piecewise
from flatkern.kernels import routing, schemas
from flatkern.nn import hessian_trace_and_grad_of, hessian_trace_of
from flatkern.reference import piecewise_layer_terms_ref

ROOT = Path(__file__).resolve().parents[1]


def reference(model, x, loss, reduction):
    """``(terms (L,), [∂ Σ terms / ∂p for p in model.parameters()], ∂ Σ terms / ∂x)`` from the formula, by autograd."""
    net = piecewise.walk(model)
    params = list(model.parameters())
    xx = x.detach().clone().requires_grad_()
    slopes = [[act.slope for act in layer.acts] for layer in net.layers]
    terms = piecewise_layer_terms_ref([la.weight for la in net.layers], [la.bias for la in net.layers], slopes, xx,
                                      loss, reduction)
    grads = torch.autograd.grad(terms.sum(), params + [xx], allow_unused=True, materialize_grads=True)
    return terms.detach(), list(grads[:-1]), grads[-1]


def check_backend(net: Net, backend: str, rtol: float = RTOL):
    """``hessian_trace_of`` (value, per layer, autograd gradients in every parameter and x) and
    ``hessian_trace_and_grad_of`` on ``backend`` against the reference."""
    model = net.model()
    x, _ = net.data()
    want, want_grads, want_x = reference(model, x, net.loss, net.reduction)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    xx = x.clone().requires_grad_()
    got = hessian_trace_of(model, xx, loss=net.loss, reduction=net.reduction, per_layer=True, backend=backend)
    assert got.shape == (len(want),)
    assert_rel(got.detach(), want, rtol, what=f"{backend} per-layer terms of {net}")
    grads = torch.autograd.grad(got.sum(), params + [xx], allow_unused=True, materialize_grads=True)
    assert_rel(_flat_grads(grads[:-1]), _flat_grads(want_grads), rtol, what=f"{backend} gradient of {net}")
    assert_rel(grads[-1], want_x, rtol, what=f"{backend} gradient in x of {net}")
    total = hessian_trace_of(model, x, loss=net.loss, reduction=net.reduction, backend=backend)
    assert total.dim() == 0
    assert_rel(total.detach(), want.sum(), rtol, what=f"{backend} summed trace of {net}")
    value, hand = hessian_trace_and_grad_of(model, x, loss=net.loss, reduction=net.reduction, backend=backend)
    assert not value.requires_grad and not any(g.requires_grad for g in hand)
    assert_rel(value, want.sum(), rtol, what=f"{backend} value-and-grad value of {net}")
    assert_rel(_flat_grads(hand), _flat_grads(want_grads), rtol, what=f"{backend} value-and-grad gradient of {net}")
    # no kernel writes into the model (the Triton sweep once overwrote W_L through a view of it)
    assert all(torch.equal(p, q) for p, q in zip(params, before)), f"{backend} changed the parameters of {net}"


def _small_nets():
    # tiny under the Triton interpreter (every program runs in Python)
    return nets(max_depth=5, max_width=5)


def test_every_backend_matches_the_reference_on_random_networks(backend, profile):
    @_settings(profile)
    @given(net=_small_nets())
    def check(net):
        check_backend(net, backend)

    check()


GRID = [  # every loss x bias x depth 1-5, slopes and batches cycling; the truth is torch.func.hessian
    pytest.param(loss, bias, depth, SLOPES[i % 4], (1, 7)[i % 2], id=f"{loss}-bias{int(bias)}-L{depth}-{SLOPES[i % 4]}")
    for i, (loss, bias, depth) in enumerate(
        (loss, bias, depth) for loss in ("mse", "cross_entropy") for bias in (False, True) for depth in range(1, 6))
]


@pytest.mark.parametrize("loss, bias, depth, slope, batch", GRID)
def test_every_backend_matches_the_autograd_hessian_on_a_grid(backend, loss, bias, depth, slope, batch):
    widths = (3, 4, 2, 5, 3, 4)[:depth + 1]
    widths = widths if loss == "mse" or widths[-1] > 1 else widths[:-1] + (3,)
    acts = tuple((slope,) for _ in range(depth - 1)) + ((),)
    net = Net(widths, bias, acts, loss, "mean", batch, False, 7 * depth + batch)
    model = net.model()
    x, y = net.data()
    want, want_grad, want_x = autograd_trace(model, x, y, loss, "mean")
    xx = x.clone().requires_grad_()
    got = hessian_trace_of(model, xx, loss=loss, backend=backend)
    grads = torch.autograd.grad(got, list(model.parameters()) + [xx], allow_unused=True, materialize_grads=True)
    assert_rel(got.detach(), want, what=f"{backend} trace")
    assert_rel(_flat_grads(grads[:-1]), want_grad, what=f"{backend} gradient")
    assert_rel(grads[-1], want_x, what=f"{backend} gradient in x")
    value, hand = hessian_trace_and_grad_of(model, x, loss=loss, backend=backend)
    assert_rel(value, want, what=f"{backend} value-and-grad value")
    assert_rel(_flat_grads(hand), want_grad, what=f"{backend} value-and-grad gradient")


def test_float32_kernels_stay_within_twice_plain_torchs_error(backend):
    # STYLE.md's rule for low precision: the kernel's error against float64 at most twice plain torch's
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(9, 13), nn.ReLU(), nn.Linear(13, 11), nn.LeakyReLU(0.01), nn.Linear(11, 4))
    x = torch.randn(6, 9)
    want = hessian_trace_of(model.double(), x.double(), loss="cross_entropy", backend="torch")
    model.float()
    plain = hessian_trace_of(model, x, loss="cross_entropy", backend="torch")
    got = hessian_trace_of(model, x, loss="cross_entropy", backend=backend)
    err = abs(got.double() - want).item() / want.item()
    assert err <= max(2 * abs(plain.double() - want).item() / want.item(), 1e-6)


# ------------------------------------------------------------------ the op


def _op_args(depth=3, bias=True, loss=0, mean=True, dtype=torch.float64, M=5, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    widths = [4, 6, 5, 3, 4, 3][:depth + 1]
    W = [torch.randn(widths[l + 1], widths[l], dtype=dtype, generator=g).requires_grad_(requires_grad)
         for l in range(depth)]
    b = [(torch.randn(widths[l + 1], dtype=dtype, generator=g) if bias else torch.empty(0, dtype=dtype))
         .requires_grad_(requires_grad and bias) for l in range(depth)]
    x = torch.randn(M, widths[0], dtype=dtype, generator=g).requires_grad_(requires_grad)
    slopes = [0.0, 0.3, 0.01][:depth - 1]
    num_acts = [1] * (depth - 1) + [0]
    return x, W, b, slopes, num_acts, loss, mean


@pytest.mark.skipif(schemas.CPP_ERROR is not None, reason="the C++ extension is not built")
@pytest.mark.parametrize("loss", [0, 1])
def test_opcheck_passes_for_the_mlp_ops(loss):
    x, W, b, slopes, num_acts, loss, mean = _op_args(loss=loss, requires_grad=True)
    torch.library.opcheck(schemas.mlp_hessian_trace, (x, W, b, slopes, num_acts, loss, mean, False))
    torch.library.opcheck(schemas.mlp_hessian_trace, (x, W, b, slopes, num_acts, loss, mean, True))
    detached = (x.detach(), [w.detach() for w in W], [t.detach() for t in b], slopes, num_acts, loss, mean, False)
    torch.library.opcheck(schemas.mlp_hessian_trace_and_grad, detached)


@pytest.mark.parametrize("sum_layers", [False, True])
def test_the_fake_kernels_give_the_kernels_shapes(sum_layers):
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = _op_args(bias=False)
    terms, saved = schemas.mlp_hessian_trace(*args, sum_layers)
    terms2, grads = schemas.mlp_hessian_trace_and_grad(*args, sum_layers)
    back = schemas.mlp_hessian_trace_backward(*args, sum_layers, saved, torch.ones_like(terms))
    with FakeTensorMode() as mode:
        fargs = (mode.from_tensor(args[0]), [mode.from_tensor(w) for w in args[1]],
                 [mode.from_tensor(t) for t in args[2]], *args[3:])
        fterms, fsaved = schemas.mlp_hessian_trace(*fargs, sum_layers)
        fterms2, fgrads = schemas.mlp_hessian_trace_and_grad(*fargs, sum_layers)
        fback = schemas.mlp_hessian_trace_backward(*fargs, sum_layers, fsaved, torch.ones_like(fterms))
    assert fterms.shape == terms.shape == fterms2.shape == terms2.shape == (() if sum_layers else (3,))
    assert [t.shape for t in fsaved] == [t.shape for t in saved] == [(5, 6), (5, 5), (5, 3)]
    # the backward's gradients: x, the weights, the biases ((0,) where none); and_grad's: the same without x
    assert [t.shape for t in fback] == [t.shape for t in back] == [(5, 4), (6, 4), (5, 6), (3, 5), (0,), (0,), (0,)]
    assert [t.shape for t in fgrads] == [t.shape for t in grads] == [t.shape for t in back[1:]]


def test_torch_compile_fullgraph_gives_the_eager_value_and_gradients():
    x, W, b, slopes, num_acts, loss, mean = _op_args(loss=1, requires_grad=True)

    def trace(x, W, b):
        return schemas.mlp_hessian_trace(x, W, b, slopes, num_acts, loss, mean, True)[0]

    eager = trace(x, W, b)
    g_eager = torch.autograd.grad(eager, [x, *W, *b])
    torch._dynamo.reset()
    compiled = torch.compile(trace, fullgraph=True, backend="aot_eager")
    got = compiled(x, W, b)
    g_got = torch.autograd.grad(got, [x, *W, *b])
    torch.testing.assert_close(got, eager, rtol=1e-12, atol=0)
    for a, e in zip(g_got, g_eager):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-15)


def test_a_second_derivative_raises_naming_the_backend():
    x, W, b, slopes, num_acts, loss, mean = _op_args(requires_grad=True)
    terms, _ = schemas.mlp_hessian_trace(x, W, b, slopes, num_acts, loss, mean, True)
    (gx,) = torch.autograd.grad(terms, [x], create_graph=True)
    # the first derivative is right under create_graph ...
    x2 = x.detach().clone().requires_grad_()
    want = torch.autograd.grad(piecewise.kernel_layer_terms(piecewise.network_of(W, b, slopes, num_acts), x2,
                                                            "mse", "mean", backend="torch", sum_layers=True), [x2])[0]
    torch.testing.assert_close(gx, want, rtol=1e-12, atol=1e-15)
    # ... and a second one is a clear error, not a wrong number
    with pytest.raises(RuntimeError, match="first derivatives of the trace only.*backend=\"torch\""):
        torch.autograd.grad(gx.sum(), W)


@pytest.mark.skipif(schemas.CPP_ERROR is not None, reason="the C++ extension is not built")
def test_the_cpu_kernel_checks_its_arguments_and_names_them():
    x, W, b, slopes, num_acts, loss, mean = _op_args()
    op = schemas.mlp_hessian_trace
    with pytest.raises(RuntimeError, match=r"weights\[0\] has shape \(6, 4\) but its input has 3 features"):
        op(x[:, :3], W, b, slopes, num_acts, loss, mean)
    with pytest.raises(RuntimeError, match=r"weights\[1\] has shape \(5, 6\) but its input has 5"):
        op(x, [W[0][:5], W[1], W[2]], [b[0][:5], b[1], b[2]], slopes, num_acts, loss, mean)
    with pytest.raises(RuntimeError, match="x must be float32 or float64, got Long"):
        op(x.long(), W, b, slopes, num_acts, loss, mean)
    with pytest.raises(RuntimeError, match=r"x has no samples.*mean over no samples"):
        op(x[:0], W, b, slopes, num_acts, loss, mean)
    with pytest.raises(RuntimeError, match=r"biases\[1\] has shape \(4,\), need \(5,\)"):
        op(x, W, [b[0], b[1][:4], b[2]], slopes, num_acts, loss, mean)
    with pytest.raises(RuntimeError, match="num_acts sums to 1 but 2 slopes"):
        op(x, W, b, slopes, [1, 0, 0], loss, mean)
    with pytest.raises(RuntimeError, match="num_acts has 2 entries but weights has 3"):
        op(x, W, b, slopes, [1, 1], loss, mean)
    with pytest.raises(RuntimeError, match="loss must be 0 .mse. or 1"):
        op(x, W, b, slopes, num_acts, 2, mean)
    with pytest.raises(RuntimeError, match=r"slopes\[1\] = nan is not finite"):
        op(x, W, b, [0.0, math.nan], num_acts, loss, mean)
    with pytest.raises(RuntimeError, match=r"saved has 2 tensors, need the forward's 3"):
        schemas.mlp_hessian_trace_backward(x, W, b, slopes, num_acts, loss, mean, False, [x, x], torch.ones(3))
    with pytest.raises(RuntimeError, match=r"saved\[0\] has shape \(5, 4\), need \(5, 6\)"):
        schemas.mlp_hessian_trace_backward(x, W, b, slopes, num_acts, loss, mean, False, [x, x, x], torch.ones(3))


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_bad_inputs_on_every_backend_give_an_error_or_plain_torchs_answer(backend, loss):
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    with pytest.raises(ValueError, match=r"inputs has shape \(5, 4\) but the first layer model\[0\] takes d_0=3"):
        hessian_trace_of(model, torch.randn(5, 4, dtype=torch.float64), loss=loss, backend=backend)
    with pytest.raises(TypeError, match="inputs must be a floating tensor.*int64"):
        hessian_trace_of(model, torch.ones(5, 3, dtype=torch.int64), loss=loss, backend=backend)
    with pytest.raises(ValueError, match="no samples"):
        hessian_trace_of(model, torch.empty(0, 3, dtype=torch.float64), loss=loss, backend=backend)
    empty = torch.empty(0, 3, dtype=torch.float64)
    assert hessian_trace_of(model, empty, loss=loss, reduction="sum", backend=backend).item() == 0.0
    value, grads = hessian_trace_and_grad_of(model, empty, loss=loss, reduction="sum", backend=backend)
    assert value.item() == 0.0 and all((g == 0).all() for g in grads)
    x = torch.randn(5, 3, dtype=torch.float64)
    x[2, 1] = math.nan
    assert torch.isnan(hessian_trace_of(model, x, loss=loss, backend=backend))
    assert torch.isnan(hessian_trace_of(model, x, loss=loss, backend="torch"))  # plain torch's answer too


def test_deep_linear_networks_on_the_fused_kernel_match_todays_answer(backend):
    # "auto" keeps today's formulas bit for bit (test_piecewise); a named kernel runs the fused op
    torch.manual_seed(5)
    for loss in ("mse", "cross_entropy"):
        model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3), nn.Identity(), nn.Linear(3, 3)).double()
        x = torch.randn(7, 4, dtype=torch.float64)
        want = hessian_trace_of(model, x, loss=loss, per_layer=True, backend="auto")
        got = hessian_trace_of(model, x, loss=loss, per_layer=True, backend=backend)
        assert_rel(got, want, what=f"{backend} on a deep linear network ({loss})")
        _, want_g = hessian_trace_and_grad_of(model, x, loss=loss, backend="auto")
        _, got_g = hessian_trace_and_grad_of(model, x, loss=loss, backend=backend)
        assert_rel(_flat_grads(got_g), _flat_grads(want_g), what=f"{backend} gradient on a deep linear network")


def test_the_routing_records_of_the_mlp_op_are_complete_and_read():
    for kernel in (routing.MLP_CPP, routing.MLP_TRITON, routing.MLP_TORCH_OP):
        assert kernel.backend in ("cpp", "triton", "torch") and kernel.devices and kernel.dtypes
        assert kernel.derivatives == 1 and kernel.forward_mode is False
        for device in ("cpu", "meta"):
            reason = kernel.unavailable(device)
            assert reason is None or isinstance(reason, str)
    x = torch.randn(3, 4, dtype=torch.float64)
    W = [torch.randn(2, 4, dtype=torch.float64)]
    assert routing.resolve_mlp("torch", x, W) == "ref"
    assert routing.resolve_mlp("auto", x.half(), [w.half() for w in W]) == "ref"  # no kernel takes fp16
    if schemas.CPP_ERROR is None:
        assert routing.resolve_mlp("auto", x, W) == "op" and routing.resolve_mlp("cpp", x, W) == "op"
        with pytest.raises(RuntimeError, match='backend="cpp" cannot run here: its kernel does not take torch.float16'):
            routing.resolve_mlp("cpp", x.half(), [w.half() for w in W])
    # forward-mode derivatives need plain torch: "auto" takes it
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        assert routing.resolve_mlp("auto", x, W) == "ref"


@pytest.mark.parametrize("activations", [(nn.ReLU(), nn.ReLU()), (nn.LeakyReLU(-0.5), nn.ReLU()),
                                         (nn.LeakyReLU(0.3), nn.LeakyReLU(-2.0))])
def test_stacked_and_negative_slope_activations_match_the_reference(backend, activations):
    # each stage's mask at its own input: a negative slope sends z < 0 above zero for the next stage
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(3, 6), *activations, nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    x = torch.randn(7, 3, dtype=torch.float64)
    for loss in ("mse", "cross_entropy"):
        want, want_grads, _ = reference(model, x, loss, "mean")
        got = hessian_trace_of(model, x, loss=loss, per_layer=True, backend=backend)
        assert_rel(got, want, what=f"{backend} {activations}")
        _, hand = hessian_trace_and_grad_of(model, x, loss=loss, backend=backend)
        assert_rel(_flat_grads(hand), _flat_grads(want_grads), what=f"{backend} gradient {activations}")


def test_without_the_extension_the_op_runs_on_plain_torch():
    # the extension hidden as tests/test_routing.py does: "auto" runs the op's plain-torch kernel,
    # "cpp" says why it cannot run, and the values are the reference's
    code = (
        "import sys, warnings; sys.modules['flatkern._C'] = None\n"
        "warnings.simplefilter('ignore')\n"
        "import torch\n"
        "from torch import nn\n"
        "from flatkern.nn import hessian_trace_of, hessian_trace_and_grad_of\n"
        "from flatkern.kernels import routing, schemas\n"
        "assert schemas.CPP_ERROR is not None\n"
        "torch.manual_seed(0)\n"
        "model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3), nn.LeakyReLU(0.1), nn.Linear(3, 3)).double()\n"
        "x = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)\n"
        "assert routing.resolve_mlp('auto', x, [m.weight for m in model if isinstance(m, nn.Linear)]) == 'op'\n"
        "for loss in ('mse', 'cross_entropy'):\n"
        "    want = hessian_trace_of(model, x, loss=loss, backend='torch')\n"
        "    wg = torch.autograd.grad(want, [x, *model.parameters()], allow_unused=True, materialize_grads=True)\n"
        "    got = hessian_trace_of(model, x, loss=loss)\n"
        "    gg = torch.autograd.grad(got, [x, *model.parameters()], allow_unused=True, materialize_grads=True)\n"
        "    assert abs(got - want) <= 1e-12 * abs(want), (got, want)\n"
        "    assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-14) for a, b in zip(gg, wg))\n"
        "    v, hg = hessian_trace_and_grad_of(model, x, loss=loss)\n"
        "    assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-14) for a, b in zip(hg, wg[1:]))\n"
        "try:\n"
        "    hessian_trace_of(model, x, backend='cpp')\n"
        "except RuntimeError as e:\n"
        "    assert 'backend=\"cpp\" cannot run here' in str(e) and 'flatkern._C' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('backend=cpp ran without the extension')\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


@pytest.mark.skipif(schemas.CPP_ERROR is not None, reason="the C++ extension is not built")
def test_the_cpu_kernel_on_wide_batches_matches_plain_torch_in_float64():
    # several of the kernel's sample blocks (256 rows of G each) and threads, and a batch that is no
    # multiple of a block
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(20, 33), nn.ReLU(), nn.Linear(33, 17), nn.LeakyReLU(0.01), nn.Linear(17, 29),
                          nn.ReLU(), nn.Linear(29, 7)).double()
    x = torch.randn(301, 20, dtype=torch.float64)
    for loss in ("mse", "cross_entropy"):
        want, want_grads = piecewise.layer_terms_and_grad(piecewise.walk(model), x, loss, "mean")
        got, grads = piecewise.kernel_layer_terms_and_grad(piecewise.walk(model), x, loss, "mean", backend="cpp")
        assert_rel(got, want, rtol=1e-12, what="terms")
        for (gw, gb), (ww, wb) in zip(grads, want_grads):
            assert_rel(gw, ww, rtol=1e-11, what="weight gradient")
            assert_rel(gb, wb, rtol=1e-11, what="bias gradient")



def test_flatness_regularized_mlp_steps_the_same_on_every_backend(backend):
    from flatkern.optim import FlatnessRegularizedMLP

    def run(bk):
        torch.manual_seed(4)
        model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 4), nn.LeakyReLU(0.3), nn.Linear(4, 3)).double()
        opt = FlatnessRegularizedMLP(model, torch.optim.SGD, lam=0.1, loss="cross_entropy", lr=0.05, backend=bk)
        g = torch.Generator().manual_seed(9)
        traces = []
        for _ in range(3):
            x = torch.randn(7, 5, dtype=torch.float64, generator=g)
            y = torch.randint(3, (7,), generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step(inputs=x)
            traces.append(opt.last_trace)
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), torch.stack(traces)

    want_params, want_traces = run("torch")
    got_params, got_traces = run(backend)
    assert_rel(got_traces, want_traces, what=f"{backend} last_trace")
    assert_rel(got_params, want_params, what=f"{backend} parameters after three steps")


def test_the_mlp_modules_leave_the_kernel_choice_to_the_routing_table():
    from test_one_place import _branches_on_device

    paths = [ROOT / "flatkern/piecewise.py", ROOT / "flatkern/kernels/triton/mlp_hessian_trace.py"]
    assert [line for p in paths for line in _branches_on_device(p)] == []


def _triton_or_skip():
    reason = routing.MLP_TRITON.unavailable("cuda" if torch.cuda.is_available() else "cpu")
    if reason is not None:
        pytest.skip(f'backend="triton" cannot run here: {reason}')
    from flatkern.kernels.triton import mlp_hessian_trace
    return mlp_hessian_trace


@pytest.mark.triton
@pytest.mark.parametrize("with_add", [False, True])
def test_the_triton_masked_gemm_matches_its_formula_over_several_tiles(with_add):
    # several row, column and K tiles of the interpreter's 16-wide blocks; B strided (a transposed view)
    launchers = _triton_or_skip()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(1)
    C, M, K, N = 3, 13, 37, 21
    A = torch.randn(M * C, K, dtype=torch.float64, generator=g).to(device)
    B = torch.randn(N, K, dtype=torch.float64, generator=g).to(device).t()
    mask = (torch.rand(M, N, generator=g) > 0.4).double().to(device) * 0.7
    add = torch.randn(M * C, N, dtype=torch.float64, generator=g).to(device)
    coef = torch.randn(M, dtype=torch.float64, generator=g).to(device)
    want = (A @ B + (coef.repeat_interleave(C)[:, None] * add if with_add else 0)) * mask.repeat_interleave(C, 0)
    out, rows = launchers.masked_gemm(A, B, C, mask, out=add.clone() if with_add else None,
                                      add=add if with_add else None, coef=coef if with_add else None)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rows, want.square().sum(-1), rtol=1e-12, atol=1e-12)


@pytest.mark.triton
def test_the_triton_kernels_on_widths_of_several_tiles_match_the_reference():
    _triton_or_skip()
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(5, 37), nn.ReLU(), nn.Linear(37, 20), nn.LeakyReLU(0.01), nn.Linear(20, 33),
                          nn.ReLU(), nn.Linear(33, 4)).double()
    x = torch.randn(7, 5, dtype=torch.float64)
    for loss in ("mse", "cross_entropy"):
        want, want_grads, want_x = reference(model, x, loss, "mean")
        xx = x.clone().requires_grad_()
        got = hessian_trace_of(model, xx, loss=loss, per_layer=True, backend="triton")
        assert_rel(got.detach(), want, what=f"triton terms ({loss})")
        grads = torch.autograd.grad(got.sum(), list(model.parameters()) + [xx])
        assert_rel(_flat_grads(grads[:-1]), _flat_grads(want_grads), what=f"triton gradient ({loss})")
        assert_rel(grads[-1], want_x, what=f"triton gradient in x ({loss})")
        _, hand = hessian_trace_and_grad_of(model, x, loss=loss, backend="triton")
        assert_rel(_flat_grads(hand), _flat_grads(want_grads), what=f"triton value-and-grad ({loss})")


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_hessian_trace_of_compiles_with_fullgraph_and_matches_eager(loss):
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 6), nn.LeakyReLU(0.3), nn.Linear(6, 3)).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    params = list(model.parameters())
    eager = hessian_trace_of(model, x, loss=loss)
    g_eager = torch.autograd.grad(eager, params, allow_unused=True, materialize_grads=True)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: hessian_trace_of(model, x, loss=loss), fullgraph=True, backend="aot_eager")
    got = compiled(x)
    g_got = torch.autograd.grad(got, params, allow_unused=True, materialize_grads=True)
    torch.testing.assert_close(got, eager, rtol=1e-12, atol=0)
    for a, e in zip(g_got, g_eager):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-15)
    both = torch.compile(lambda x: hessian_trace_and_grad_of(model, x, loss=loss), fullgraph=True, backend="aot_eager")
    value, grads = both(x)
    torch.testing.assert_close(value, eager.detach(), rtol=1e-12, atol=0)
    for a, e in zip(grads, g_eager):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-15)


def test_torch_func_transforms_get_plain_torchs_derivatives_or_a_clear_error():
    # no kernel gives forward mode or functorch's batching: "auto" answers with plain torch, a named kernel says why
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    xx = x.clone().requires_grad_()
    want = torch.autograd.grad(hessian_trace_of(model, xx, backend="torch"), [xx])[0]
    got = torch.func.grad(lambda t: hessian_trace_of(model, t))(x)
    assert_rel(got, want, what="torch.func.grad through backend='auto'")
    if schemas.CPP_ERROR is None:
        with pytest.raises(RuntimeError, match='backend="cpp" cannot run here: a torch.func transform'):
            torch.func.grad(lambda t: hessian_trace_of(model, t, backend="cpp"))(x)


@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_the_python_kernels_check_their_arguments_and_name_them(kernel):
    if kernel == "triton":
        launchers = _triton_or_skip()
        op = launchers.mlp_hessian_trace_triton
    else:
        op = piecewise.mlp_hessian_trace_torch
    x, W, b, slopes, num_acts, loss, mean = _op_args()
    with pytest.raises(ValueError, match=r"x is torch.float64 of shape \(5, 3\), need a floating \(M, 4\)"):
        op(x[:, :3], W, b, slopes, num_acts, loss, mean)
    with pytest.raises(ValueError, match=r"x is torch.int64"):
        op(x.long(), W, b, slopes, num_acts, loss, mean)
    with pytest.raises(ValueError, match=r"weights\[1\] has shape \(5, 6\) but its input has 5 features"):
        op(x, [W[0][:5], W[1], W[2]], [b[0][:5], b[1], b[2]], slopes, num_acts, loss, mean)
    with pytest.raises(ValueError, match=r"biases\[1\] has shape \(4,\), need \(5,\)"):
        op(x, W, [b[0], b[1][:4], b[2]], slopes, num_acts, loss, mean)
    with pytest.raises(ValueError, match="num_acts must sum to the 2 slopes"):
        op(x, W, b, slopes, [1, 0, 0], loss, mean)
    with pytest.raises(ValueError, match="x has no samples"):
        op(x[:0], W, b, slopes, num_acts, loss, mean)
    with pytest.raises(ValueError, match="must be finite"):
        op(x, W, b, [0.0, math.inf], num_acts, loss, mean)
    with pytest.raises(ValueError, match="loss must be 0"):
        op(x, W, b, slopes, num_acts, 3, mean)


def test_the_op_takes_strided_inputs_and_any_thread_count():
    # transposed weights, a strided x: the kernels read strides (or copy), never assume them
    x, W, b, slopes, num_acts, loss, mean = _op_args(loss=1, M=41)
    want_terms, _ = schemas.mlp_hessian_trace(x, W, b, slopes, num_acts, loss, mean, False)
    want_value, want_grads = schemas.mlp_hessian_trace_and_grad(x, W, b, slopes, num_acts, loss, mean, False)
    xs = torch.stack([x, -x], 2).reshape(x.shape[0], -1)[:, ::2]  # every other column of a wider tensor: x, strided
    assert torch.equal(xs, x) and not xs.is_contiguous()
    Ws = [w.t().contiguous().t() for w in W]  # column-major copies
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            terms, _ = schemas.mlp_hessian_trace(xs, Ws, b, slopes, num_acts, loss, mean, False)
            value, grads = schemas.mlp_hessian_trace_and_grad(xs, Ws, b, slopes, num_acts, loss, mean, False)
            torch.testing.assert_close(terms, want_terms, rtol=1e-12, atol=0)
            torch.testing.assert_close(value, want_value, rtol=1e-12, atol=0)
            for g, w in zip(grads, want_grads):
                torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-14)
    finally:
        torch.set_num_threads(threads)
