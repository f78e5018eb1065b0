"""A measurement object is a value (issue 11 §1): what the caller does to its tensors afterwards
changes nothing, on any backend; and its integer arguments are checked like every other argument."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import TOL, make_weights, measurement_sources, measurements_from

import flatkern as fk

D_L, D_0 = 2, 3  # E: (2, 3), so d_0 d_L = 6


def _sources(family: str) -> dict:
    """The caller's tensors for one measurement object of ``family`` (Dense: n = 4 <= d_0 d_L = 6, the
    per-measurement contraction; dense_kernel: n = 7 > 6, the precomputed kernel K)."""
    return measurement_sources(family, D_L, D_0, n=4 if family == "dense" else 5, seed=3)[0]


def _tensors(src: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in src.items() if isinstance(v, torch.Tensor)}


def _copy(src: dict) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in src.items()}


def _mutate(t: torch.Tensor, how: str, value: torch.Tensor) -> None:
    """Overwrite ``t`` with ``value`` the way a caller might: in place, through ``.data``, through ``.numpy()``."""
    if how == "in_place":
        t.copy_(value)
    elif how == "data":
        t.data.copy_(value)
    elif how == "numpy":
        t.numpy()[...] = value.numpy()
    else:
        raise ValueError(how)


def _edited(name: str, t: torch.Tensor, index_edit: str) -> torch.Tensor:
    if t.is_floating_point():
        return 2 * t + 1
    if index_edit == "minus_one":  # out of range: must not wrap around to the last row/column
        out = t.clone()
        out[0] = -1
        return out
    size = D_L if name == "rows" else D_0  # a valid but different index: a stale answer would show
    return (t + 1) % size


def _answers(W, meas, backend):
    """Everything the library computes from ``meas``: the trace (summed, per layer, both reductions where
    ``n`` is known), its gradient, the value-and-grad call, the loss and the regularized objective."""
    targets = torch.linspace(-1, 1, torch.Size(meas.target_shape(D_L, D_0)).numel(), dtype=W[0].dtype)
    targets = targets.reshape(meas.target_shape(D_L, D_0))
    Wg = [w.detach().requires_grad_() for w in W]
    trace = fk.hessian_trace(Wg, meas, per_layer=True, backend=backend)
    out = {"per_layer": trace.detach(), "grads": torch.autograd.grad(trace.sum(), Wg)}
    out["sum"] = fk.hessian_trace(W, meas, reduction="sum", backend=backend)
    value, grads = fk.hessian_trace_and_grad(W, meas, backend=backend)
    out.update(value=value, value_grads=grads)
    out["loss"] = fk.mse_loss(W, meas, targets, backend=backend)
    out["objective"] = fk.objective(W, meas, targets, lam=0.5, backend=backend)
    return out


def _assert_same(got, want, dtype=torch.float64):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


MUTABLE = ["dense", "dense_kernel", "rankone", "inputs", "entries"]


@pytest.mark.parametrize("when", ["before_first_use", "after_first_use"])
@pytest.mark.parametrize("how", ["in_place", "data", "numpy"])
@pytest.mark.parametrize("family, index_edit", [(f, "shift") for f in MUTABLE] + [("entries", "minus_one")])
def test_editing_the_callers_tensors_changes_no_answer(backend, family, how, when, index_edit):
    W = make_weights([D_0, 4, D_L], batch=(2,), seed=4)
    src = _sources(family)
    meas = measurements_from(family, src)
    pristine = measurements_from(family, _copy(src))
    want = _answers(W, pristine, backend)
    if when == "after_first_use":
        _answers(W, meas, backend)  # builds every cache a backend keeps (operands, Dense's K, ...)
    edits = {name: _edited(name, t, index_edit) for name, t in _tensors(src).items()}
    for name, t in _tensors(src).items():
        _mutate(t, how, edits[name])
    # the edit reached the caller's tensors
    assert all(torch.equal(t, edits[name]) for name, t in _tensors(src).items())
    if index_edit == "shift" or family != "entries":
        # and a measurement built from the edited tensors answers differently: the check can fail
        fresh = _answers(W, measurements_from(family, _copy(src)), "torch")
        assert not torch.allclose(fresh["per_layer"], want["per_layer"])
    got = _answers(W, meas, backend)
    for key in want:
        _assert_same(got[key], want[key])


@pytest.mark.parametrize("how", ["in_place", "data", "numpy"])
@pytest.mark.parametrize("family", ["dense", "dense_kernel"])
def test_dense_kernel_is_computed_from_the_private_copy(family, how):
    src = _sources(family)
    A0 = src["A"].clone()
    meas = fk.Dense(src["A"])
    expected = torch.einsum("iab,icd->abcd", A0, A0) / A0.shape[0]
    _mutate(src["A"], how, 2 * src["A"] + 1)  # before the kernel is first computed
    torch.testing.assert_close(meas.kernel(), expected, atol=1e-12, rtol=1e-12)
    _mutate(src["A"], how, 3 * src["A"])  # after
    torch.testing.assert_close(meas.kernel(), expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(meas.A, A0, atol=0, rtol=0)


@pytest.mark.parametrize("how", ["in_place", "data", "numpy"])
def test_entries_index_edited_to_minus_one_does_not_wrap_around(backend, how):
    rows, cols = torch.tensor([0, 0, 1]), torch.tensor([0, 2, 1])
    meas = fk.Entries(rows, cols, (D_L, D_0))
    W = make_weights([D_0, 5, D_L], seed=6)
    b = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    trace, loss = fk.hessian_trace(W, meas, backend=backend), fk.mse_loss(W, meas, b, backend=backend)
    _mutate(rows, how, torch.tensor([-1, 0, 1]))
    _mutate(cols, how, torch.tensor([0, -1, 1]))
    _assert_same(fk.hessian_trace(W, meas, backend=backend), trace)
    _assert_same(fk.mse_loss(W, meas, b, backend=backend), loss)
    E = fk.end_to_end(W, backend="torch")
    _assert_same(loss, (E[[0, 0, 1], [0, 2, 1]] - b).square().mean())


def test_measurements_built_from_numpy_indices_keep_their_own_copy():
    rows, cols = np.array([0, 1, 1]), np.array([2, 0, 1])
    meas = fk.Entries(rows, cols, (D_L, D_0))
    rows[0], cols[0] = -1, 7
    assert meas.rows.tolist() == [0, 1, 1] and meas.cols.tolist() == [2, 0, 1]


def test_numpy_integers_are_accepted_where_ints_are():
    iso = fk.Isotropic(n=np.int64(5))
    assert iso.n == 5 and type(iso.n) is int
    W = make_weights([3, 4, 2])
    torch.testing.assert_close(fk.hessian_trace(W, iso, reduction="sum"),
                               fk.hessian_trace(W, fk.Isotropic(n=5), reduction="sum"))
    meas = fk.Entries(torch.tensor([0, 1]), torch.tensor([2, 0]), (np.int64(2), np.int32(3)))
    assert meas.shape == (2, 3) and all(type(s) is int for s in meas.shape)


@pytest.mark.parametrize("n", [True, False, 2.0, 2.5, "3"])
def test_isotropic_n_must_be_an_integer(n):
    with pytest.raises(TypeError, match=r"Isotropic\(n=\.\.\.\) must be an integer"):
        fk.Isotropic(n=n)


@pytest.mark.parametrize("n", [0, -3, np.int64(0)])
def test_isotropic_n_must_be_positive(n):
    with pytest.raises(ValueError, match=r"Isotropic\(n=\.\.\.\) must be >= 1"):
        fk.Isotropic(n=n)


@pytest.mark.parametrize("shape, name", [((2.7, 3), r"shape\[0\]"), ((2, 3.0), r"shape\[1\]"),
                                         ((True, 3), r"shape\[0\]")])
def test_entries_shape_must_be_integers_not_truncated(shape, name):
    with pytest.raises(TypeError, match=f"Entries {name}.*must be an integer"):
        fk.Entries(torch.tensor([0, 1]), torch.tensor([0, 1]), shape)


@pytest.mark.parametrize("build", [
    lambda a: fk.Dense(a),
    lambda a: fk.RankOne(a[:, 0], a[:, 1]),
    lambda a: fk.Inputs(a[0]),
], ids=["Dense", "RankOne", "Inputs"])
def test_numpy_arrays_are_refused_naming_the_type(build):
    with pytest.raises(TypeError, match=r"must be a torch\.Tensor, got numpy\.ndarray"):
        build(np.ones((4, 2, 3)))


@pytest.mark.parametrize("edit", ["mul_", "zero_", "numpy"])
@pytest.mark.parametrize("family", ["dense", "dense_kernel"])
def test_editing_what_dense_kernel_returns_changes_no_answer(backend, family, edit):
    # kernel() hands out a copy: the cached K is what the kernels read (issue 18 item 4)
    src = _sources(family)
    meas, pristine = fk.Dense(src["A"]), fk.Dense(src["A"].clone())
    W = make_weights([D_0, 4, D_L], batch=(2,), seed=4)
    want = _answers(W, pristine, backend)
    _answers(W, meas, backend)  # builds the caches first
    K = meas.kernel()
    expected = K.clone()
    if edit == "numpy":
        K.numpy()[...] = 0.0
    else:
        getattr(K, edit)(*([2.0] if edit == "mul_" else []))
    assert not torch.equal(K, expected)  # the edit happened
    got = _answers(W, meas, backend)
    for key in want:
        _assert_same(got[key], want[key])
    torch.testing.assert_close(meas.kernel(), expected, atol=0, rtol=0)


@pytest.mark.parametrize("n, exc, match", [
    (-1, ValueError, r"Entries.uniform n \(the number of entries\) must be >= 1, got -1"),
    (0, ValueError, r"Entries.uniform n .* must be >= 1, got 0"),
    (2.5, TypeError, r"Entries.uniform n .* must be an integer, got 2.5"),
    (6.0, TypeError, r"Entries.uniform n .* must be an integer, got 6.0"),
    (True, TypeError, r"Entries.uniform n .* must be an integer, got the bool True"),
])
def test_entries_uniform_n_must_be_a_positive_integer(n, exc, match):
    with pytest.raises(exc, match=match):
        fk.Entries.uniform(n, (D_L, D_0))


def test_entries_uniform_checks_shape_and_the_number_of_distinct_entries():
    with pytest.raises(TypeError, match=r"Entries.uniform shape\[1\] \(d_0\) must be an integer, got 3.5"):
        fk.Entries.uniform(2, (D_L, 3.5))
    with pytest.raises(ValueError, match=r"cannot draw n=7 distinct entries from a \(2, 3\) matrix \(6 entries\); .*replace=True"):
        fk.Entries.uniform(7, (D_L, D_0))
    assert fk.Entries.uniform(7, (D_L, D_0), replace=True).n == 7
    assert fk.Entries.uniform(np.int64(6), (np.int64(D_L), D_0)).n == 6  # every entry once


@pytest.mark.parametrize("einsum_max", [0, 10**9], ids=["per-row products", "einsum"])
@pytest.mark.parametrize("shape_A, shape_E", [
    ((7, 4, 5), (4, 5)), ((7, 4, 5), (3, 2, 4, 5)), ((7, 4, 5), (0, 4, 5)), ((1, 1, 3), (2, 1, 3)),
    ((3, 7, 4, 5), (3, 4, 5)), ((2, 3, 7, 4, 5), (2, 3, 4, 5)),
])
def test_dense_predict_both_ways_is_the_definition_and_its_gradient(monkeypatch, einsum_max, shape_A, shape_E):
    # Dense.predict reads its private (d_L, n, d_0) copy by per-row products above _DENSE_EINSUM_MAX entries and
    # einsums over the view below it: both are <A_i, E>, in value and gradient
    from flatkern import measurements

    monkeypatch.setattr(measurements, "_DENSE_EINSUM_MAX", einsum_max)
    g = torch.Generator().manual_seed(0)
    A = torch.randn(*shape_A, generator=g, dtype=torch.float64)
    E = torch.randn(*shape_E, generator=g, dtype=torch.float64, requires_grad=True)
    expected = (A * E.unsqueeze(-3)).sum((-2, -1))  # <A_i, E>, broadcast over the batches
    got = fk.Dense(A).predict(E)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-13)
    if E.numel():
        w = torch.randn(expected.shape, generator=g, dtype=torch.float64)
        (grad,) = torch.autograd.grad((got * w).sum(), E)
        (want,) = torch.autograd.grad((expected * w).sum(), E)
        torch.testing.assert_close(grad, want, rtol=1e-13, atol=1e-13)
