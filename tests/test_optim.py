"""flatkern.optim.FlatnessRegularized: equal to a hand-written step on loss + lam * trace."""

import copy
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

import flatkern
from flatkern.nn import DeepLinear
from flatkern.optim import FlatnessRegularized

pytestmark = pytest.mark.filterwarnings("ignore:flatkern. using the plain-torch backend")

F64 = dict(atol=1e-12, rtol=1e-12)


def _problem(dims=(5, 7, 6, 4), n=15, seed=0):
    """Float64 weights in chain order, Entries measurements and targets."""
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(dims[j + 1], dims[j], dtype=torch.float64, generator=g) / dims[j] ** 0.5 for j in range(len(dims) - 1)]
    meas = flatkern.Entries.uniform(n, (dims[-1], dims[0]), generator=g)
    targets = torch.randn(n, dtype=torch.float64, generator=g)
    return weights, meas, targets


def _leaves(weights):
    return [w.clone().requires_grad_() for w in weights]


def _hand_step(ws, base, meas, targets, lam, reduction="mean"):
    base.zero_grad()
    total = flatkern.mse_loss(ws, meas, targets, reduction) + lam * flatkern.hessian_trace(ws, meas, reduction=reduction)
    total.backward()
    base.step()


@pytest.mark.parametrize(
    "base_cls, kwargs",
    [(torch.optim.SGD, dict(lr=0.05)), (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)), (torch.optim.Adam, dict(lr=0.01))],
)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_step_equals_hand_written_step_on_loss_plus_lam_trace(base_cls, kwargs, reduction):
    weights, meas, b = _problem()
    lam = 0.3
    ws, ref = _leaves(weights), _leaves(weights)
    opt = FlatnessRegularized(ws, base_cls, lam=lam, measurements=meas, reduction=reduction, **kwargs)
    base = base_cls(ref, **kwargs)
    for _ in range(5):
        opt.zero_grad()
        flatkern.mse_loss(ws, meas, b, reduction).backward()
        opt.step()
        _hand_step(ref, base, meas, b, lam, reduction)
    for w, r in zip(ws, ref):
        torch.testing.assert_close(w, r, **F64)
    # the regularizer really moved the weights: the unregularized run ends elsewhere
    plain = _leaves(weights)
    base_plain = base_cls(plain, **kwargs)
    for _ in range(5):
        _hand_step(plain, base_plain, meas, b, 0.0, reduction)
    assert not torch.allclose(plain[0], ws[0])


def test_param_groups_are_shared_with_base_and_hold_lam():
    weights, meas, _ = _problem()
    opt = FlatnessRegularized(_leaves(weights), torch.optim.SGD, lam=0.2, measurements=meas, lr=0.1, momentum=0.5)
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert opt.state is opt.base_optimizer.state
    assert opt.param_groups[0]["lam"] == 0.2 and opt.param_groups[0]["momentum"] == 0.5
    assert opt.defaults["lam"] == 0.2 and opt.defaults["lr"] == 0.1


def test_lr_scheduler_and_scheduled_lam_change_the_step_like_the_hand_written_one():
    weights, meas, b = _problem(seed=1)
    ws, ref = _leaves(weights), _leaves(weights)
    opt = FlatnessRegularized(ws, torch.optim.SGD, lam=0.5, measurements=meas, lr=0.1)
    base = torch.optim.SGD(ref, lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.3)
    sched_ref = torch.optim.lr_scheduler.StepLR(base, step_size=2, gamma=0.3)
    for k in range(6):
        lam = 0.5 * 0.5**k
        opt.param_groups[0]["lam"] = lam
        opt.zero_grad()
        flatkern.mse_loss(ws, meas, b).backward()
        opt.step()
        sched.step()
        _hand_step(ref, base, meas, b, lam)
        sched_ref.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.3**3)
    for w, r in zip(ws, ref):
        torch.testing.assert_close(w, r, **F64)


def test_lam_per_param_group_regularizes_only_where_nonzero():
    weights, meas, _ = _problem(seed=2)
    ws = _leaves(weights)
    opt = FlatnessRegularized([{"params": ws[:2]}, {"params": ws[2:], "lam": 0.0}], torch.optim.SGD, lam=1.0, measurements=meas, lr=1.0)
    opt.zero_grad()
    opt.step()  # no data loss: the step is the regularizer alone
    ref = _leaves(weights)
    grads = torch.autograd.grad(flatkern.hessian_trace(ref, meas), ref)
    for j in range(3):
        want = weights[j] - grads[j] if j < 2 else weights[j]
        torch.testing.assert_close(ws[j].detach(), want, **F64)


def test_state_dict_round_trip_resumes_the_same_trajectory():
    weights, meas, b = _problem(seed=3)

    def run(ws, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            flatkern.mse_loss(ws, meas, b).backward()
            opt.step()

    ws = _leaves(weights)
    opt = FlatnessRegularized(ws, torch.optim.Adam, lam=0.4, measurements=meas, lr=0.01)
    run(ws, opt, 3)
    opt.param_groups[0]["lam"] = 0.25
    saved = copy.deepcopy(opt.state_dict())  # state_dict() holds references to the live buffers
    saved_ws = [w.detach().clone() for w in ws]
    run(ws, opt, 3)

    resumed = [w.clone().requires_grad_() for w in saved_ws]
    opt2 = FlatnessRegularized(resumed, torch.optim.Adam, lam=9.0, measurements=meas, lr=0.5)
    opt2.load_state_dict(saved)
    assert opt2.param_groups is opt2.base_optimizer.param_groups and opt2.state is opt2.base_optimizer.state
    assert opt2.param_groups[0]["lam"] == 0.25 and opt2.param_groups[0]["lr"] == 0.01
    assert opt2.state[resumed[0]]["exp_avg"].shape == resumed[0].shape
    run(resumed, opt2, 3)
    for w, r in zip(ws, resumed):
        torch.testing.assert_close(w, r, **F64)


def test_gradient_accumulation_adds_the_regularizer_once_per_step():
    weights, meas, b = _problem(n=16, seed=4)
    halves = [flatkern.Entries(meas.rows[i::2], meas.cols[i::2], meas.shape) for i in range(2)]
    ws, ref = _leaves(weights), _leaves(weights)
    opt = FlatnessRegularized(ws, torch.optim.SGD, lam=0.7, measurements=meas, lr=0.05)
    base = torch.optim.SGD(ref, lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        for i, half in enumerate(halves):  # two micro-batches, each half of the mean loss
            (0.5 * flatkern.mse_loss(ws, half, b[i::2])).backward()
        opt.step()
        _hand_step(ref, base, meas, b, 0.7)
    for w, r in zip(ws, ref):
        torch.testing.assert_close(w, r, **F64)


def test_closure_is_evaluated_and_the_regularized_objective_returned():
    weights, meas, b = _problem(seed=5)
    ws, ref = _leaves(weights), _leaves(weights)
    opt = FlatnessRegularized(ws, torch.optim.SGD, lam=0.1, measurements=meas, lr=0.05)

    def closure():
        opt.zero_grad()
        loss = flatkern.mse_loss(ws, meas, b)
        loss.backward()
        return loss

    loss = opt.step(closure)
    trace0 = flatkern.hessian_trace(weights, meas, backend="torch")
    torch.testing.assert_close(loss, flatkern.mse_loss(weights, meas, b) + 0.1 * trace0, **F64)
    torch.testing.assert_close(opt.last_trace, trace0, **F64)
    _hand_step(ref, torch.optim.SGD(ref, lr=0.05), meas, b, 0.1)
    for w, r in zip(ws, ref):
        torch.testing.assert_close(w, r, **F64)


def _isotropic_fit_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(6, 2, dtype=torch.float64, generator=g) @ torch.randn(2, 5, dtype=torch.float64, generator=g) / 2
    weights = [0.5 * torch.randn(4, 5, dtype=torch.float64, generator=g), 0.5 * torch.randn(4, 4, dtype=torch.float64, generator=g),
               0.5 * torch.randn(6, 4, dtype=torch.float64, generator=g)]
    return weights, flatkern.Isotropic(), M


_LBFGS = dict(lr=1.0, max_iter=10, line_search_fn="strong_wolfe", tolerance_grad=1e-14, tolerance_change=1e-16)


def test_lbfgs_step_with_closure_equals_lbfgs_on_loss_plus_lam_trace():
    # every evaluation of the line search sees loss + lam * trace and its gradient: the same
    # iterates as torch's LBFGS on a closure that writes the regularized objective by hand
    weights, meas, M = _isotropic_fit_problem()
    lam = 0.05
    ws, ref = _leaves(weights), _leaves(weights)
    opt = FlatnessRegularized(ws, torch.optim.LBFGS, lam=lam, measurements=meas, **_LBFGS)
    base = torch.optim.LBFGS(ref, **_LBFGS)
    values, ref_values = [], []

    def closure():
        opt.zero_grad()
        loss = flatkern.mse_loss(ws, meas, M)
        loss.backward()
        return loss

    def ref_closure():
        base.zero_grad()
        total = flatkern.mse_loss(ref, meas, M) + lam * flatkern.hessian_trace(ref, meas, backend="torch")
        total.backward()
        ref_values.append(total.item())
        return total

    for _ in range(2):
        values.append(opt.step(closure).item())
        base.step(ref_closure)
    assert values[0] == pytest.approx(ref_values[0], rel=1e-12, abs=0)
    assert values[1] < values[0]
    for w, r in zip(ws, ref):
        torch.testing.assert_close(w, r, atol=1e-9, rtol=1e-9)


def test_lbfgs_without_a_closure_raises_before_touching_the_gradients():
    weights, meas, M = _isotropic_fit_problem()
    ws = _leaves(weights)
    opt = FlatnessRegularized(ws, torch.optim.LBFGS, lam=0.05, measurements=meas, **_LBFGS)
    flatkern.mse_loss(ws, meas, M).backward()
    grads = [w.grad.clone() for w in ws]
    with pytest.raises(TypeError, match=r"LBFGS\.step needs a closure.*opt\.step\(closure\)"):
        opt.step()
    assert all(torch.equal(w.grad, g) for w, g in zip(ws, grads))


def test_lbfgs_with_closure_converges_to_a_stationary_point_of_loss_plus_lam_trace():
    weights, meas, M = _isotropic_fit_problem(seed=1)
    lam = 0.05
    ws = _leaves(weights)
    opt = FlatnessRegularized(ws, torch.optim.LBFGS, lam=lam, measurements=meas, **{**_LBFGS, "max_iter": 100})

    def closure():
        opt.zero_grad()
        loss = flatkern.mse_loss(ws, meas, M)
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    ref = _leaves([w.detach() for w in ws])
    data = flatkern.mse_loss(ref, meas, M)
    trace = flatkern.hessian_trace(ref, meas, backend="torch")
    g_total = torch.autograd.grad(data + lam * trace, ref, retain_graph=True)
    g_data = torch.autograd.grad(data, ref)
    assert max(g.abs().max().item() for g in g_total) < 1e-7
    # the trace is in the objective: the data loss alone is far from stationary there
    assert max(g.abs().max().item() for g in g_data) > 1e-2


def test_closure_with_different_lams_per_layer_raises():
    weights, meas, b = _problem()
    ws = _leaves(weights)
    opt = FlatnessRegularized([{"params": ws[:1], "lam": 0.1}, {"params": ws[1:], "lam": 0.2}], torch.optim.SGD,
                              lam=0.1, measurements=meas, lr=0.1)
    with pytest.raises(ValueError, match=r"one lam for every layer weight W_1, \.\.\., W_L, got the lams \[0\.1, 0\.2, 0\.2\]"):
        opt.step(lambda: flatkern.mse_loss(ws, meas, b))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -0.5])
@pytest.mark.parametrize("with_closure", [False, True])
def test_bad_lam_set_after_construction_raises_naming_the_group_before_any_change(bad, with_closure):
    weights, meas, b = _problem(seed=9)
    ws = _leaves(weights)
    opt = FlatnessRegularized([{"params": ws[:1]}, {"params": ws[1:]}], torch.optim.SGD, lam=0.1, measurements=meas,
                              lr=0.1, momentum=0.9)
    flatkern.mse_loss(ws, meas, b).backward()
    opt.step()
    before = [w.detach().clone() for w in ws]
    grads = [w.grad.clone() for w in ws]
    opt.param_groups[1]["lam"] = bad
    calls = []
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['lam'\] must be a finite number >= 0"):
        opt.step((lambda: calls.append(1) or flatkern.mse_loss(ws, meas, b)) if with_closure else None)
    assert not calls
    for w, w0, g, g0 in zip(ws, before, (w.grad for w in ws), grads):
        assert torch.equal(w.detach(), w0) and torch.equal(g, g0)


@pytest.mark.parametrize("lam", [np.float32(0.25), np.float64(0.25), np.int64(1), 1])
def test_numpy_and_int_lams_are_accepted_as_numbers(lam):
    weights, meas, b = _problem(seed=10)
    ws, ref = _leaves(weights), _leaves(weights)
    opt = FlatnessRegularized(ws, torch.optim.SGD, lam=0.1, measurements=meas, lr=0.05)
    opt.param_groups[0]["lam"] = lam
    flatkern.mse_loss(ws, meas, b).backward()
    opt.step()
    _hand_step(ref, torch.optim.SGD(ref, lr=0.05), meas, b, float(lam))
    for w, r in zip(ws, ref):
        torch.testing.assert_close(w, r, **F64)


@pytest.mark.parametrize("bad, exc", [(True, TypeError), ("0.1", TypeError), (torch.tensor(0.1), TypeError)])
def test_a_lam_that_is_not_a_number_raises_naming_the_group(bad, exc):
    weights, meas, _ = _problem()
    opt = FlatnessRegularized(_leaves(weights), torch.optim.SGD, lam=0.1, measurements=meas, lr=0.05)
    opt.param_groups[0]["lam"] = bad
    with pytest.raises(exc, match=r"param_groups\[0\]\['lam'\] must be a number"):
        opt.step()


@pytest.mark.parametrize("batch", [(), (3,)])
def test_last_trace_is_the_trace_at_the_weights_before_the_step(batch):
    g = torch.Generator().manual_seed(12)
    weights = [torch.randn(*batch, 6, 5, dtype=torch.float64, generator=g) / 3, torch.randn(*batch, 4, 6, dtype=torch.float64, generator=g) / 3]
    meas = flatkern.RankOne(torch.randn(7, 4, dtype=torch.float64, generator=g), torch.randn(7, 5, dtype=torch.float64, generator=g))
    ws = _leaves(weights)
    opt = FlatnessRegularized(ws, torch.optim.Adam, lam=0.3, measurements=meas, reduction="sum", lr=0.01)
    assert opt.last_trace is None
    for _ in range(3):
        before = [w.detach().clone() for w in ws]
        opt.zero_grad()
        opt.step()
        want = flatkern.hessian_trace(before, meas, reduction="sum", backend="torch")
        assert opt.last_trace.shape == batch and not opt.last_trace.requires_grad
        torch.testing.assert_close(opt.last_trace, want, **F64)
    opt.param_groups[0]["lam"] = 0.0  # nothing computed, nothing stale
    opt.step()
    assert opt.last_trace is None


def test_batched_weights_step_equals_hand_written_step_per_problem():
    g = torch.Generator().manual_seed(13)
    weights = [torch.randn(2, 5, 4, dtype=torch.float64, generator=g) / 2, torch.randn(2, 3, 5, dtype=torch.float64, generator=g) / 2]
    meas = flatkern.Entries.uniform(9, (3, 4), generator=g)
    b = torch.randn(2, 9, dtype=torch.float64, generator=g)
    ws, ref = _leaves(weights), _leaves(weights)
    opt = FlatnessRegularized(ws, torch.optim.SGD, lam=0.4, measurements=meas, lr=0.1, momentum=0.9, nesterov=True)
    base = torch.optim.SGD(ref, lr=0.1, momentum=0.9, nesterov=True)
    for _ in range(3):
        opt.zero_grad()
        flatkern.mse_loss(ws, meas, b).sum().backward()
        opt.step()
        base.zero_grad()
        (flatkern.mse_loss(ref, meas, b) + 0.4 * flatkern.hessian_trace(ref, meas, backend="torch")).sum().backward()
        base.step()
    for w, r in zip(ws, ref):
        torch.testing.assert_close(w, r, **F64)


def test_step_makes_one_hessian_trace_and_grad_call_and_no_autograd_graph(monkeypatch):
    from flatkern.ops import TraceProblem

    weights, meas, b = _problem(seed=14)
    ws = _leaves(weights)
    opt = FlatnessRegularized(ws, torch.optim.SGD, lam=0.2, measurements=meas, lr=0.05)
    calls = []
    for name in ("__call__", "accumulate"):  # the gradient handed back, or added into .grad by the kernel
        real = getattr(TraceProblem, name)
        monkeypatch.setattr(TraceProblem, name, lambda self, *a, real=real: calls.append(1) or real(self, *a))
    flatkern.mse_loss(ws, meas, b).backward()
    opt.step()
    assert len(calls) == 1
    assert all(w.grad.grad_fn is None and not w.grad.requires_grad for w in ws)


def test_grad_scaler_adds_the_regularizer_after_unscaling():
    weights, meas, b = _problem(seed=6)
    ws, ref = _leaves(weights), _leaves(weights)
    opt = FlatnessRegularized(ws, torch.optim.SGD, lam=0.3, measurements=meas, lr=0.05)
    base = torch.optim.SGD(ref, lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1)
    for _ in range(3):
        opt.zero_grad()
        scaler.scale(flatkern.mse_loss(ws, meas, b)).backward()
        scaler.step(opt)
        scaler.update()
        _hand_step(ref, base, meas, b, 0.3)
    assert scaler.get_scale() > 2.0**12  # no step was skipped
    for w, r in zip(ws, ref):
        torch.testing.assert_close(w, r, **F64)


def test_grad_scaler_skips_the_whole_step_on_inf():
    weights, meas, b = _problem(seed=7)
    ws = _leaves(weights)
    opt = FlatnessRegularized(ws, torch.optim.SGD, lam=0.3, measurements=meas, lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    scaler.scale(flatkern.mse_loss(ws, meas, b)).backward()
    ws[1].grad[0, 0] = float("inf")
    scaler.step(opt)
    for w, w0 in zip(ws, weights):
        torch.testing.assert_close(w.detach(), w0, atol=0, rtol=0)


def test_deeplinear_biases_are_optimized_but_not_regularized():
    torch.manual_seed(8)
    model = DeepLinear([4, 5, 3], bias=True, dtype=torch.float64)
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randn(10, 3, dtype=torch.float64)
    meas = flatkern.Inputs(x)
    before = [p.detach().clone() for p in model.parameters()]
    opt = FlatnessRegularized(model, torch.optim.SGD, lam=0.2, measurements=meas, lr=0.1)
    assert len(opt.param_groups[0]["params"]) == 4
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    data_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    opt.step()
    ref = [w.clone().requires_grad_() for w in (before[0], before[2])]
    reg = torch.autograd.grad(flatkern.hessian_trace(ref, meas), ref)
    torch.testing.assert_close(model.layers[0].weight.detach(), before[0] - 0.1 * (data_grads["layers.0.weight"] + 0.2 * reg[0]), **F64)
    torch.testing.assert_close(model.layers[1].bias.detach(), before[3] - 0.1 * data_grads["layers.1.bias"], **F64)


def test_step_hooks_and_the_profiler_range_still_run():
    weights, meas, b = _problem(seed=15)
    ws = _leaves(weights)
    opt = FlatnessRegularized(ws, torch.optim.SGD, lam=0.2, measurements=meas, lr=0.05)
    calls = []
    handles = [opt.register_step_pre_hook(lambda o, a, k: calls.append("pre")),
               opt.register_step_post_hook(lambda o, a, k: calls.append("post"))]
    opt.step()
    assert calls == ["pre", "post"]
    for h in handles:
        h.remove()
    handle = register_optimizer_step_pre_hook(lambda o, a, k: calls.append(type(o).__name__))
    try:
        opt.step()
    finally:
        handle.remove()
    assert calls[2:] == ["FlatnessRegularized", "SGD"]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    assert "Optimizer.step#FlatnessRegularized.step" in {e.name for e in prof.events()}


def test_an_optimizer_object_as_base_optimizer_says_to_pass_the_class():
    weights, meas, _ = _problem()
    ws = _leaves(weights)
    with pytest.raises(TypeError, match=r"optimizer class or a factory.*already built SGD.*torch\.optim\.SGD"):
        FlatnessRegularized(ws, torch.optim.SGD(ws, lr=0.1), lam=0.1, measurements=meas)
    with pytest.raises(TypeError, match="optimizer class"):
        FlatnessRegularized(ws, "SGD", lam=0.1, measurements=meas)


def test_bad_arguments_raise_clear_errors():
    weights, meas, _ = _problem()
    with pytest.raises(ValueError, match="lam must be a finite number >= 0"):
        FlatnessRegularized(_leaves(weights), lam=-1.0, measurements=meas, lr=0.1)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['lam'\] must be a finite number >= 0"):
        FlatnessRegularized([{"params": weights[:1]}, {"params": weights[1:], "lam": math.nan}], lam=0.1, measurements=meas, lr=0.1)
    with pytest.raises(TypeError, match="Conv1d"):
        FlatnessRegularized(nn.Conv1d(1, 1, 1), lam=0.1, measurements=meas, lr=0.1)
    with pytest.raises(ValueError, match="do not chain"):
        FlatnessRegularized(_leaves(weights[::-1]), lam=0.1, measurements=meas, lr=0.1)
    with pytest.raises(ValueError, match="Entries were built"):
        FlatnessRegularized(_leaves(weights[:2]), lam=0.1, measurements=meas, lr=0.1)
    with pytest.raises(TypeError, match="measurement family"):
        FlatnessRegularized(_leaves(weights), lam=0.1, measurements=torch.zeros(3), lr=0.1)


def _square_chain(depth=3, d=4, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(d, d, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(depth)]


@pytest.mark.parametrize("tie", ["same", "view", "transpose"])
def test_a_weight_at_two_positions_raises_naming_both(tie):
    # a tied layer's Hessian trace is not the per-position one flatkern computes (issue 18 item 2)
    W1, W2, _ = _square_chain()
    # a detached view is a leaf that shares W_2's storage: torch would step that memory twice
    other = {"same": W2, "view": W2.detach().view(4, 4), "transpose": W2.detach().t()}[tie].requires_grad_()
    with pytest.raises(ValueError, match=r"params\[1\] \(layer W_2\) and params\[2\] \(layer W_3\)"):
        FlatnessRegularized([W1, W2, other], lam=0.1, measurements=flatkern.Isotropic(), lr=0.1)
    with pytest.raises(ValueError, match=r"params\[1\] \(layer W_2\) and params\[2\] \(layer W_3\)"):
        FlatnessRegularized([{"params": [W1, W2]}, {"params": [other], "lam": 0.0}], lam=0.1,
                            measurements=flatkern.Isotropic(), lr=0.1)


def test_add_param_group_refuses_a_param_that_is_already_held():
    W1, W2, W3 = _square_chain()
    opt = FlatnessRegularized([W1, W2, W3], lam=0.1, measurements=flatkern.Isotropic(), lr=0.1)
    with pytest.raises(ValueError, match=r"params\[1\] \(layer W_2\) and the added group's params\[0\]"):
        opt.add_param_group({"params": [W2.detach().view(-1).requires_grad_()]})
    bias = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match=r"the added group's params\[0\] and the added group's params\[1\]"):
        opt.add_param_group({"params": [bias, bias]})
    assert len(opt.param_groups) == 1  # nothing was added
    opt.add_param_group({"params": [bias]})  # a separate tensor is fine
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["lam"] == 0.1


@pytest.mark.parametrize("base_cls, kwargs", [(torch.optim.SGD, dict(lr=0.05, momentum=0.9)), (torch.optim.Adam, dict(lr=0.01))])
def test_loading_a_plain_optimizers_state_dict_keeps_lam(base_cls, kwargs):
    # a plain optimizer's groups have no lam: loading them must not switch the regularizer off
    weights, meas, b = _problem(seed=4)
    ws, ref = _leaves(weights), _leaves(weights)
    plain = base_cls(_leaves(weights), **kwargs)
    opt = FlatnessRegularized(ws, base_cls, lam=0.3, measurements=meas, **kwargs)
    opt.load_state_dict(plain.state_dict())
    assert opt.param_groups[0]["lam"] == 0.3
    assert "lam=0.3" in repr(opt)
    base = base_cls(ref, **kwargs)
    for _ in range(3):
        opt.zero_grad()
        flatkern.mse_loss(ws, meas, b).backward()
        opt.step()
        _hand_step(ref, base, meas, b, 0.3)
        assert opt.last_trace is not None
    for w, r in zip(ws, ref):
        torch.testing.assert_close(w, r, **F64)


def test_a_state_dict_with_a_bad_lam_is_refused_before_any_change():
    weights, meas, _ = _problem()
    opt = FlatnessRegularized(_leaves(weights), torch.optim.SGD, lam=0.3, measurements=meas, lr=0.1)
    bad = copy.deepcopy(opt.state_dict())
    bad["param_groups"][0]["lam"], bad["param_groups"][0]["lr"] = -1.0, 7.0
    with pytest.raises(ValueError, match=r"state_dict\['param_groups'\]\[0\]\['lam'\] must be a finite number >= 0"):
        opt.load_state_dict(bad)
    assert opt.param_groups[0]["lam"] == 0.3 and opt.param_groups[0]["lr"] == 0.1


def test_a_group_without_lam_is_named_by_step_and_shown_by_repr():
    weights, meas, _ = _problem()
    ws = _leaves(weights)
    opt = FlatnessRegularized(ws, torch.optim.SGD, lam=0.3, measurements=meas, lr=0.1)
    del opt.param_groups[0]["lam"]
    assert "lam='missing'" in repr(opt)  # repr never raises
    for w in ws:
        w.grad = torch.zeros_like(w)
    with pytest.raises(ValueError, match=r"param_groups\[0\] has no 'lam'"):
        opt.step()
    assert all(float(w.grad.abs().max()) == 0 for w in ws)  # raised before any change


# ------------------------------------------------------------------ DDP, two gloo processes

_DIMS, _SHARDS, _LAM, _LR, _STEPS = [4, 6, 5, 3], (5, 8), 0.3, 0.05, 4


def _ddp_data():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(sum(_SHARDS), _DIMS[0], dtype=torch.float64, generator=g)
    y = torch.randn(sum(_SHARDS), _DIMS[-1], dtype=torch.float64, generator=g)
    return x.split(_SHARDS), y.split(_SHARDS)


def _ddp_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = DeepLinear(_DIMS, dtype=torch.float64)
        ddp = nn.parallel.DistributedDataParallel(model)
        xs, ys = _ddp_data()
        # each rank sees only its (unequal) shard of the inputs: measurements sharded too
        opt = FlatnessRegularized(ddp, torch.optim.SGD, lam=_LAM, measurements=flatkern.Inputs(xs[rank]), lr=_LR, momentum=0.9)
        for _ in range(_STEPS):
            opt.zero_grad()
            nn.functional.mse_loss(ddp(xs[rank]), ys[rank]).backward()
            opt.step()
        torch.save([w.detach() for w in model.weights] + [opt.last_trace], os.path.join(out_dir, f"rank{rank}.pt"))
        # both ranks done with their collectives before either tears gloo down: a rank that exits
        # while the other is still in an all-reduce aborts ("terminate called without an active exception");
        # not in `finally`, where a rank that failed would leave the other waiting here
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_apply_the_same_regularizer_and_match_a_single_process_run(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    (*w0, trace0), (*w1, trace1) = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for a, c in zip(w0, w1):
        assert torch.equal(a, c)
    assert torch.equal(trace0, trace1)  # last_trace: the trace over the union of the shards, on every rank

    # single process: DDP averages the shard losses' gradients; the trace is over all inputs
    torch.manual_seed(0)
    model = DeepLinear(_DIMS, dtype=torch.float64)
    ws = model.weights
    xs, ys = _ddp_data()
    full = flatkern.Inputs(torch.cat(xs))
    base = torch.optim.SGD(ws, lr=_LR, momentum=0.9)
    for _ in range(_STEPS):
        base.zero_grad()
        data = sum(nn.functional.mse_loss(model(x), y) for x, y in zip(xs, ys)) / 2
        trace = flatkern.hessian_trace(ws, full)
        (data + _LAM * trace).backward()
        base.step()
    for a, w in zip(w0, ws):
        torch.testing.assert_close(a, w.detach(), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(trace0, trace.detach(), atol=1e-12, rtol=1e-12)


# ------------------------------------------------------------------ the theorem, found by the optimizer


def _fit_isotropic(M, depth, lam_start, lam_end, steps=600, seed=0):
    """Adam on ‖E - M‖_F² + lam tr ∇² with lam decreasing geometrically; returns the final weights."""
    g = torch.Generator().manual_seed(seed)
    d_L, d_0 = M.shape
    dims = [d_0] + [4] * (depth - 1) + [d_L]
    ws = [(0.5 * torch.randn(dims[j + 1], dims[j], dtype=M.dtype, generator=g)).requires_grad_() for j in range(depth)]
    meas = flatkern.Isotropic()
    opt = FlatnessRegularized(ws, torch.optim.Adam, lam=lam_start, measurements=meas, lr=0.03)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for k in range(steps):
        opt.param_groups[0]["lam"] = lam_start * (lam_end / lam_start) ** (k / (steps - 1))
        opt.zero_grad()
        flatkern.mse_loss(ws, meas, M).backward()
        opt.step()
        sched.step()
    return [w.detach() for w in ws]


def _rank2_target():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 2, dtype=torch.float64, generator=g) @ torch.randn(2, 5, dtype=torch.float64, generator=g) / 2


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_decreasing_lam_reaches_the_flatness_lower_bound(depth):
    M = _rank2_target()
    ws = _fit_isotropic(M, depth, lam_start=0.1, lam_end=1e-3)
    trace = flatkern.hessian_trace(ws, flatkern.Isotropic())
    bound = flatkern.flatness_lower_bound(M, depth)
    assert abs(float(trace / bound) - 1) < 0.05
    assert float(flatkern.mse_loss(ws, flatkern.Isotropic(), M)) < 1e-3 * float(M.square().sum())


def test_without_the_regularizer_the_same_fit_is_not_flattest():
    M = _rank2_target()
    ws = _fit_isotropic(M, 3, lam_start=1e-12, lam_end=1e-12)
    assert float(flatkern.mse_loss(ws, flatkern.Isotropic(), M)) < 1e-3 * float(M.square().sum())
    assert float(flatkern.hessian_trace(ws, flatkern.Isotropic()) / flatkern.flatness_lower_bound(M, 3)) > 1.2


def test_param_groups_given_as_generators_are_stepped():
    # a generator in a group was read up by the input checks, leaving the base optimizer an empty group
    model = DeepLinear([4, 5, 3], dtype=torch.float64)
    opt = FlatnessRegularized([{"params": (w for w in model.weights)}], torch.optim.SGD, lam=0.1,
                              measurements=flatkern.Isotropic(), lr=0.1)
    assert [len(g["params"]) for g in opt.param_groups] == [2]
    before = model.weights[0].detach().clone()
    opt.step()
    assert not torch.equal(before, model.weights[0])
