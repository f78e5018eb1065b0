"""The plain-torch trace (the ground truth of every kernel) against torch.func.hessian in float64."""

import pytest
import torch
from helpers import (
    ALL_FAMILIES, DIMS, FAMILIES, TOL, autograd_hessian_trace, backend_unavailable, make_measurements, make_weights,
)
from torch.utils._python_dispatch import TorchDispatchMode

import flatkern as fk

F64 = dict(zip(("atol", "rtol"), TOL[torch.float64]))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dims", DIMS, ids=lambda d: f"L{len(d) - 1}")
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_trace_matches_autograd_hessian(family, dims, reduction):
    W = make_weights(dims)
    meas, targets = make_measurements(family, dims[-1], dims[0])
    expected = autograd_hessian_trace(W, meas, targets, reduction, per_layer=True)
    got = fk.hessian_trace(W, meas, reduction=reduction, per_layer=True, backend="torch")
    torch.testing.assert_close(got, expected, **F64)
    torch.testing.assert_close(fk.hessian_trace(W, meas, reduction=reduction, backend="torch"), expected.sum())


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_trace_matches_autograd_hessian_per_problem(family):
    dims, batch = [3, 5, 2, 4], (2, 3)
    W = make_weights(dims, batch=batch)
    meas, targets = make_measurements(family, dims[-1], dims[0])
    got = fk.hessian_trace(W, meas, per_layer=True, backend="torch")
    assert got.shape == (*batch, 3)
    for idx in [(0, 0), (1, 2), (0, 1)]:
        expected = autograd_hessian_trace([w[idx] for w in W], meas, targets, per_layer=True)
        torch.testing.assert_close(got[idx], expected, **F64)


def test_isotropic_trace_is_the_gaussian_sensing_expectation():
    # E over A_i ~ N(0, I) of the finite-sample trace equals the Isotropic trace; with
    # 40000 measurements the sample mean is within ~1% (relative std of the mean < 0.3%)
    dims = [4, 6, 5, 3]
    W = make_weights(dims, seed=3)
    iso = fk.hessian_trace(W, fk.Isotropic(), backend="torch")
    gauss = fk.Dense.gaussian(40000, (3, 4), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sample = fk.hessian_trace(W, gauss, backend="torch")
    assert abs(sample / iso - 1) < 0.02


def test_isotropic_trace_has_the_closed_form_of_math_md():
    # tr = 2 Σ_j ‖P_j‖² ‖Q_j‖², end terms d_0 ‖P_1‖² and d_L ‖Q_L‖²
    W = make_weights([4, 6, 5, 3], seed=5)
    P1 = W[2] @ W[1]
    Q3 = W[1] @ W[0]
    middle = W[2].square().sum() * W[0].square().sum()
    expected = 2 * (4 * P1.square().sum() + middle + 3 * Q3.square().sum())
    torch.testing.assert_close(fk.hessian_trace(W, fk.Isotropic(), backend="torch"), expected)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_trace_gradcheck(backend, family):
    W = make_weights([3, 4, 2, 5], requires_grad=True)
    meas, _ = make_measurements(family, 5, 3)
    assert torch.autograd.gradcheck(lambda *ws: fk.hessian_trace(list(ws), meas, per_layer=True, backend=backend), W)


def test_trace_double_backward_on_torch_backend():
    W = make_weights([3, 4, 5], requires_grad=True)
    meas, _ = make_measurements("entries", 5, 3)
    assert torch.autograd.gradgradcheck(lambda *ws: fk.hessian_trace(list(ws), meas, backend="torch"), W)


def test_trace_does_not_depend_on_targets_or_loss_value():
    W = make_weights([3, 4, 5], seed=2)
    meas, t1 = make_measurements("dense", 5, 3, seed=1)
    t2 = t1 + 10.0
    torch.testing.assert_close(autograd_hessian_trace(W, meas, t1), autograd_hessian_trace(W, meas, t2))


def test_end_to_end_is_the_chain_product_on_every_backend(backend):
    W = make_weights([3, 5, 2, 4], batch=(2,))
    expected = torch.stack([W[2][b] @ W[1][b] @ W[0][b] for b in range(2)])
    torch.testing.assert_close(fk.end_to_end(W, backend=backend), expected)


def test_end_to_end_gradcheck_on_every_backend(backend):
    W = make_weights([3, 5, 2, 4], batch=(2,), requires_grad=True)
    assert torch.autograd.gradcheck(lambda *ws: fk.end_to_end(list(ws), backend=backend), W)


def test_end_to_end_op_passes_opcheck():
    # the op exists in every build: its CPU kernel is the C++ one, or the reference without the extension
    for dims in ([4, 3], [3, 5, 2, 4]):
        W = make_weights(dims, batch=(2,), requires_grad=True)
        torch.library.opcheck(torch.ops.flatkern.end_to_end.default, (W,))


def test_mse_loss_follows_nn_mseloss_conventions():
    W = make_weights([3, 4, 5])
    E = W[1] @ W[0]
    meas, targets = make_measurements("dense", 5, 3)
    pred = torch.einsum("ab,nab->n", E, meas.A)
    for reduction in ("mean", "sum"):
        expected = torch.nn.MSELoss(reduction=reduction)(pred, targets)
        torch.testing.assert_close(fk.mse_loss(W, meas, targets, reduction), expected)
    x_meas, Y = make_measurements("inputs", 5, 3)
    torch.testing.assert_close(fk.mse_loss(W, x_meas, Y), torch.nn.MSELoss()(x_meas.x @ E.T, Y))
    M = torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(fk.mse_loss(W, fk.Isotropic(), M), (E - M).square().sum())


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _ops_for(family, n, batch):
    W = make_weights([3, 4, 5], batch=batch, requires_grad=True)
    meas, _ = make_measurements(family, 5, 3, n=n)
    with _OpCounter() as counter:
        fk.hessian_trace(W, meas, backend="torch").sum().backward()
    return counter.count


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_is_vectorized_over_measurements_and_batch(family):
    # the number of torch ops (forward + backward) must not grow with n or the batch size
    base = _ops_for(family, n=3, batch=())
    assert _ops_for(family, n=40, batch=()) == base
    assert _ops_for(family, n=3, batch=(6,)) == _ops_for(family, n=40, batch=(6,))
    assert _ops_for(family, n=3, batch=(2,)) == _ops_for(family, n=3, batch=(9,))


def test_auto_backend_works_and_unknown_or_unavailable_backends_raise():
    W = make_weights([3, 4, 5])
    meas, _ = make_measurements("entries", 5, 3)
    torch.testing.assert_close(fk.hessian_trace(W, meas), fk.hessian_trace(W, meas, backend="torch"))
    with pytest.raises(ValueError, match="backend must be one of"):
        fk.hessian_trace(W, meas, backend="cuda")
    W32 = [w.float() for w in W]
    for name in ("cpp", "triton"):
        if backend_unavailable(name) is not None:
            with pytest.raises(RuntimeError, match=f'backend="{name}" cannot run here: .*; backend="torch" can'):
                fk.hessian_trace(W32, meas, backend=name)


def test_without_the_extension_auto_falls_back_to_torch_and_says_so_once():
    import subprocess
    import sys

    code = (
        "import sys, warnings; sys.modules['flatkern._C'] = None\n"
        "import torch, flatkern as fk\n"
        "W = [torch.randn(4, 3), torch.randn(5, 4)]; m = fk.Entries.uniform(6, (5, 3))\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    a = fk.hessian_trace(W, m); b = fk.hessian_trace(W, m)\n"
        "assert torch.equal(a, fk.hessian_trace(W, m, backend='torch')) and torch.equal(a, b)\n"
        "assert fk.available_backends() == ['torch'], fk.available_backends()\n"
        "print(sum('C++ extension flatkern._C is not importable' in str(x.message) for x in w))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "1"
