"""Bad input gets a clear error naming the argument and the shapes: never a crash or a silent NaN."""

import pytest
import torch
from helpers import ALL_FAMILIES, make_measurements, make_weights

import flatkern as fk

OPS = {
    "hessian_trace": lambda W, m=fk.Isotropic(): fk.hessian_trace(W, m),
    "hessian_trace_and_grad": lambda W, m=fk.Isotropic(): fk.hessian_trace_and_grad(W, m),
    "end_to_end": lambda W, m=None: fk.end_to_end(W),
    # weights are checked first
    "mse_loss": lambda W, m=fk.Isotropic(): fk.mse_loss(W, m, torch.zeros(2, 2)),
    "objective": lambda W, m=fk.Isotropic(): fk.objective(W, m, torch.zeros(2, 2), lam=0.1),
}


@pytest.mark.parametrize("op", OPS)
def test_layers_that_do_not_chain_name_the_layer(op):
    W = [torch.randn(4, 3), torch.randn(5, 4), torch.randn(2, 6)]
    with pytest.raises(ValueError, match=r"do not chain at layer 3: W_3 has shape \(2, 6\).*W_2 has shape \(5, 4\)"):
        OPS[op](W)


@pytest.mark.parametrize("op", OPS)
def test_empty_weight_list_is_an_error(op):
    with pytest.raises(ValueError, match="weights is empty"):
        OPS[op]([])


@pytest.mark.parametrize("op", OPS)
def test_non_floating_and_mixed_dtypes_are_errors(op):
    with pytest.raises(TypeError, match=r"W_1\) must be floating point, got dtype torch.int64"):
        OPS[op]([torch.ones(3, 2, dtype=torch.long)])
    with pytest.raises(TypeError, match="mix dtypes: W_1 is torch.float32 but W_2 is torch.float64"):
        OPS[op]([torch.randn(3, 2), torch.randn(4, 3, dtype=torch.float64)])


@pytest.mark.parametrize("op", OPS)
def test_weights_on_different_devices_are_an_error(op):
    with pytest.raises(ValueError, match="different devices: W_1 is on cpu but W_2 is on meta"):
        OPS[op]([torch.randn(3, 2), torch.randn(4, 3, device="meta")])


def test_a_single_tensor_or_a_vector_is_not_a_layer_chain():
    with pytest.raises(TypeError, match="wrap it in a list"):
        fk.hessian_trace(torch.randn(3, 2), fk.Isotropic())
    with pytest.raises(ValueError, match=r"W_1\) must have shape \(\.\.\., d_1, d_0\), got shape \(3,\)"):
        fk.hessian_trace([torch.randn(3)], fk.Isotropic())
    with pytest.raises(ValueError, match=r"leading \(batch\) shape"):
        fk.hessian_trace([torch.randn(2, 3, 2), torch.randn(3, 4, 3)], fk.Isotropic())


@pytest.mark.parametrize("family", [f for f in ALL_FAMILIES if f != "isotropic"])
def test_measurements_that_do_not_match_e_name_both_shapes(family):
    W = make_weights([3, 4, 5], dtype=torch.float32)  # E: (5, 3)
    meas, _ = make_measurements(family, 6, 2, dtype=torch.float32)  # built for (6, 2)
    with pytest.raises(ValueError, match=r"\(5, 3\)"):
        fk.hessian_trace(W, meas)


def test_entries_indices_must_be_integers_in_range():
    with pytest.raises(TypeError, match="rows must be an integer tensor, got dtype torch.float32"):
        fk.Entries(torch.tensor([0.0, 1.0]), torch.tensor([0, 1]), (3, 3))
    with pytest.raises(ValueError, match=r"cols must lie in \[0, 3\) for shape \(3, 3\), found values in \[0, 3\]"):
        fk.Entries(torch.tensor([0, 1]), torch.tensor([0, 3]), (3, 3))
    with pytest.raises(ValueError, match=r"rows must lie in \[0, 3\).*\[-1, 1\]"):
        fk.Entries(torch.tensor([-1, 1]), torch.tensor([0, 1]), (3, 3))
    with pytest.raises(ValueError, match=r"rows \(2,\) and cols \(3,\)"):
        fk.Entries(torch.tensor([0, 1]), torch.tensor([0, 1, 2]), (3, 3))


@pytest.mark.parametrize(
    "build",
    [
        lambda: fk.Entries(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), (3, 3)),
        lambda: fk.RankOne(torch.randn(0, 3), torch.randn(0, 3)),
        lambda: fk.Dense(torch.randn(0, 3, 3)),
        lambda: fk.Inputs(torch.randn(0, 3)),
    ],
    ids=["entries", "rankone", "dense", "inputs"],
)
def test_zero_measurements_are_an_error(build):
    with pytest.raises(ValueError, match="zero measurements"):
        build()


def test_measurement_dtype_or_device_mismatch_is_an_error():
    W = make_weights([3, 4, 5], dtype=torch.float32)
    meas, _ = make_measurements("dense", 5, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="Dense.A has dtype torch.float64 but the weights are torch.float32"):
        fk.hessian_trace(W, meas)
    with pytest.raises(TypeError, match="measurements must be a flatkern measurement family"):
        fk.hessian_trace(W, torch.randn(4, 5, 3))


def test_bad_targets_reduction_and_isotropic_sum_without_n():
    W = make_weights([3, 4, 5], dtype=torch.float32)
    meas, targets = make_measurements("dense", 5, 3, n=7, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"targets has shape \(6,\).*needs \(\.\.\., 7\)"):
        fk.mse_loss(W, meas, targets[:6])
    with pytest.raises(ValueError, match="reduction must be one of"):
        fk.hessian_trace(W, meas, reduction="none")
    with pytest.raises(ValueError, match=r"Isotropic\(n=\.\.\.\)"):
        fk.hessian_trace(W, fk.Isotropic(), reduction="sum")


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_zero_weights_give_a_finite_trace_not_nan(backend, family):
    W = [torch.zeros(4, 3), torch.zeros(5, 4)]
    meas, _ = make_measurements(family, 5, 3, dtype=torch.float32)
    t = fk.hessian_trace(W, meas, backend=backend)
    assert torch.isfinite(t) and t == 0
