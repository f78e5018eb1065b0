"""The theorem: the flattest factorization of M has trace flatness_lower_bound(M, L), for every depth."""

import numpy as np
import pytest
import torch

import flatkern as fk


def _low_rank(d_L, d_0, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d_L, r, generator=g, dtype=torch.float64) @ torch.randn(r, d_0, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("shape,rank", [((6, 5), 2), ((4, 7), 4), ((5, 5), 1)])
def test_flattest_factorization_reproduces_m_and_attains_the_bound(depth, shape, rank):
    M = _low_rank(*shape, rank)
    widths = [shape[1]] + [rank + j for j in range(depth - 1)] + [shape[0]]
    W = fk.flattest_factorization(M, widths)
    assert [tuple(w.shape) for w in W] == [(widths[j + 1], widths[j]) for j in range(depth)]
    torch.testing.assert_close(fk.end_to_end(W), M)
    torch.testing.assert_close(fk.hessian_trace(W, fk.Isotropic()), fk.flatness_lower_bound(M, depth))


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_random_factorizations_never_go_below_the_bound(depth):
    # every factorization of M is W_j -> G_j W_j G_{j-1}^{-1} of the flattest one
    M = _low_rank(6, 5, 2, seed=1)
    widths = [5] + [4] * (depth - 1) + [6]
    base = fk.flattest_factorization(M, widths)
    bound = fk.flatness_lower_bound(M, depth)
    g = torch.Generator().manual_seed(2)
    for _ in range(50):
        G = [torch.eye(4, dtype=torch.float64) + 0.5 * torch.randn(4, 4, generator=g, dtype=torch.float64) for _ in range(depth - 1)]
        W = [w.clone() for w in base]
        for j, Gj in enumerate(G):  # insert Gj between layers j and j+1
            W[j] = Gj @ W[j]
            W[j + 1] = W[j + 1] @ torch.linalg.inv(Gj)
        torch.testing.assert_close(fk.end_to_end(W), M)
        assert fk.hessian_trace(W, fk.Isotropic()) >= bound * (1 - 1e-12)


def test_balanced_factorization_is_not_the_flattest_at_depth_3():
    # docs/MATH.md: for L >= 3 the balanced factorization (each layer Σ^{1/L}) is not flattest
    M = torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64))
    balanced = [M.pow(1 / 3).clone() for _ in range(3)]  # three layers with equal values, not one tied weight
    assert fk.hessian_trace(balanced, fk.Isotropic()) > fk.flatness_lower_bound(M, 3) * 1.01


def test_lower_bound_is_batched_and_checks_its_arguments():
    M = torch.stack([_low_rank(3, 4, 1, seed=s) for s in range(3)])
    assert fk.flatness_lower_bound(M, 3).shape == (3,)
    torch.testing.assert_close(fk.flatness_lower_bound(M, 3)[1], fk.flatness_lower_bound(M[1], 3))
    with pytest.raises(ValueError, match="depth"):
        fk.flatness_lower_bound(M, 0)
    with pytest.raises(ValueError, match="hidden widths"):
        fk.flattest_factorization(_low_rank(5, 5, 3), [5, 2, 5])
    with pytest.raises(ValueError, match="must start with d_0=4"):
        fk.flattest_factorization(M[0], [3, 2, 3])


# issue 11 §3: an integer argument accepts what is genuinely an integer and refuses the rest


@pytest.mark.parametrize("depth", [np.int64(3), np.int32(3), np.uint8(3), torch.tensor(3)])
def test_lower_bound_takes_numpy_and_tensor_integer_depths(depth):
    M = _low_rank(4, 3, 2)
    torch.testing.assert_close(fk.flatness_lower_bound(M, depth), fk.flatness_lower_bound(M, 3))


@pytest.mark.parametrize("depth", [True, np.bool_(True), 3.0, 2.5, "3", None])
def test_lower_bound_refuses_bool_float_and_non_integer_depths(depth):
    with pytest.raises(TypeError, match="depth"):
        fk.flatness_lower_bound(_low_rank(4, 3, 2), depth)


def test_flattest_factorization_takes_numpy_integer_widths():
    M = _low_rank(6, 5, 2)
    W = fk.flattest_factorization(M, np.array([5, 3, 4, 6]))
    assert [tuple(w.shape) for w in W] == [(3, 5), (4, 3), (6, 4)]
    W_int = fk.flattest_factorization(M, [np.int64(5), 3, np.int32(4), 6])
    for a, b in zip(W, W_int):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("bad,index", [([5, 5.9, 6], 1), ([5.0, 3, 6], 0), ([5, True, 6], 1), ([5, "3", 6], 1)])
def test_flattest_factorization_refuses_non_integer_widths_instead_of_truncating(bad, index):
    # int(5.9) == 5 used to pass silently
    with pytest.raises(TypeError, match=rf"widths\[{index}\]"):
        fk.flattest_factorization(_low_rank(6, 5, 2), bad)


def test_flattest_factorization_refuses_negative_widths_and_a_bare_number():
    with pytest.raises(ValueError, match=r"widths\[1\]"):
        fk.flattest_factorization(_low_rank(6, 5, 2), [5, -3, 6])
    with pytest.raises(TypeError, match="widths"):
        fk.flattest_factorization(_low_rank(6, 5, 2), 5)
