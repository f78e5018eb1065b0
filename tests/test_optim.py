"""flatkern.optim.FlatnessRegularized: equal to a hand-written step on loss + lam * trace."""

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

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


def test_closure_is_evaluated_and_its_loss_returned():
    weights, meas, b = _problem(seed=5)
    ws, ref = _leaves(weights), _leaves(weights)
    opt = FlatnessRegularized(ws, torch.optim.SGD, lam=0.1, measurements=meas, lr=0.05)

    def closure():
        opt.zero_grad()
        loss = flatkern.mse_loss(ws, meas, b)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == pytest.approx(flatkern.mse_loss(weights, meas, b).item())
    _hand_step(ref, torch.optim.SGD(ref, lr=0.05), meas, b, 0.1)
    for w, r in zip(ws, ref):
        torch.testing.assert_close(w, r, **F64)


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


def test_bad_arguments_raise_clear_errors():
    weights, meas, _ = _problem()
    with pytest.raises(ValueError, match="lam must be a number >= 0"):
        FlatnessRegularized(_leaves(weights), lam=-1.0, measurements=meas, lr=0.1)
    with pytest.raises(TypeError, match="Conv1d"):
        FlatnessRegularized(nn.Conv1d(1, 1, 1), lam=0.1, measurements=meas, lr=0.1)
    with pytest.raises(ValueError, match="do not chain"):
        FlatnessRegularized(_leaves(weights[::-1]), lam=0.1, measurements=meas, lr=0.1)
    with pytest.raises(ValueError, match="Entries were built"):
        FlatnessRegularized(_leaves(weights[:2]), lam=0.1, measurements=meas, lr=0.1)
    with pytest.raises(TypeError, match="measurement family"):
        FlatnessRegularized(_leaves(weights), lam=0.1, measurements=torch.zeros(3), lr=0.1)


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
        torch.save([w.detach() for w in model.weights], os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_apply_the_same_regularizer_and_match_a_single_process_run(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    w0, w1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for a, c in zip(w0, w1):
        assert torch.equal(a, c)

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
        (data + _LAM * flatkern.hessian_trace(ws, full)).backward()
        base.step()
    for a, w in zip(w0, ws):
        torch.testing.assert_close(a, w.detach(), atol=1e-12, rtol=1e-12)


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
