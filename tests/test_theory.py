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


# issue 20 §1: a lower estimate of the rank-one RIP constant δ, and the theorem's factor built from it


def _f(A, U, V, scale=1.0):
    """``f(u, v) = (scale/n) Σ_i (uᵀ A_i v)²`` for rows of ``U`` ``(k, d_L)`` and ``V`` ``(k, d_0)``: shape ``(k,)``."""
    return scale * torch.einsum("ka,iab,kb->ki", U, A, V).square().mean(-1)


def _unit(k, d, g):
    x = torch.randn(k, d, generator=g, dtype=torch.float64)
    return x / x.norm(dim=1, keepdim=True)


def _exact_delta_all_matrices(A, scale=1.0):
    """δ when every matrix is rank-one (d_L = 1 or d_0 = 1): extreme eigenvalues of (scale/n) Σ vec(A_i) vec(A_i)ᵀ."""
    a = A.reshape(A.shape[0], -1)
    ev = torch.linalg.eigvalsh(scale * a.T @ a / A.shape[0])
    return max(float(ev[-1]) - 1, 1 - float(ev[0]))


@pytest.mark.parametrize("shape,n", [((3, 4), 30), ((6, 5), 40), ((8, 8), 200), ((5, 9), 500)])
def test_rip_estimate_beats_the_worst_of_1000_random_rank_one_matrices(shape, n):
    g = torch.Generator().manual_seed(n)
    m = fk.Dense.gaussian(n, shape, generator=g, dtype=torch.float64)
    f = _f(m.A, _unit(1000, shape[0], g), _unit(1000, shape[1], g))
    sampled = float((f - 1).abs().max())
    delta, u, v = fk.theory.rip_constant_lower_estimate(m, generator=torch.Generator().manual_seed(0), return_witness=True)
    assert delta >= sampled
    # the witness is what it claims: unit vectors at which |f - 1| is the returned δ
    assert u.shape == (shape[0],) and v.shape == (shape[1],) and u.dtype == v.dtype == torch.float64
    torch.testing.assert_close(u.norm(), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(v.norm(), torch.tensor(1.0, dtype=torch.float64))
    assert abs(abs(float(_f(m.A, u[None], v[None])) - 1) - delta) <= 1e-12


@pytest.mark.parametrize("shape,n", [((1, 6), 40), ((1, 6), 4), ((7, 1), 60), ((5, 1), 3), ((1, 1), 5)])
def test_rip_estimate_is_exact_when_every_matrix_is_rank_one(shape, n):
    # d_L = 1 or d_0 = 1: the rank-one matrices are all matrices, δ is an eigenvalue problem (n < d: δ >= 1)
    m = fk.Dense.gaussian(n, shape, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    exact = _exact_delta_all_matrices(m.A)
    delta = fk.theory.rip_constant_lower_estimate(m, generator=torch.Generator().manual_seed(1))
    assert delta <= exact + 1e-12
    assert delta >= exact - 1e-6


def _exact_delta_2x2(A, points=200_001):
    """δ of 2 x 2 measurements: for v = (cos β, sin β) the best u is an eigenvector of the 2 x 2 matrix
    M(v) = (1/n) Σ (A_i v)(A_i v)ᵀ, so δ = max over β of max(λ_max(M) - 1, 1 - λ_min(M)), a smooth
    function of one angle on [0, π): a grid of h = π/2e5 is within O(h²) ~ 1e-10 of it."""
    beta = torch.linspace(0, torch.pi, points, dtype=torch.float64)
    V = torch.stack([beta.cos(), beta.sin()], 1)
    B = torch.einsum("iab,kb->kia", A, V)
    ev = torch.linalg.eigvalsh(B.transpose(-1, -2) @ B / A.shape[0])
    return max(float(ev[:, -1].max()) - 1, 1 - float(ev[:, 0].min()))


@pytest.mark.parametrize("n", [3, 8, 40, 400])
def test_rip_estimate_reaches_the_exact_delta_on_2x2_measurements(n):
    m = fk.Dense.gaussian(n, (2, 2), generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    exact = _exact_delta_2x2(m.A)
    delta = fk.theory.rip_constant_lower_estimate(m, restarts=8, generator=torch.Generator().manual_seed(2))
    assert delta <= exact + 1e-8  # the grid's own error bound
    assert delta >= exact - 1e-6


def test_rip_estimate_of_rank_one_measurements_matches_the_dense_matrices_they_stand_for():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(50, 4, generator=g, dtype=torch.float64), torch.randn(50, 3, generator=g, dtype=torch.float64)
    dense = fk.Dense(a[:, :, None] * b[:, None, :])
    args = dict(restarts=3, iterations=500)
    d_rank_one = fk.theory.rip_constant_lower_estimate(fk.RankOne(a, b), generator=torch.Generator().manual_seed(4), **args)
    d_dense = fk.theory.rip_constant_lower_estimate(dense, generator=torch.Generator().manual_seed(4), **args)
    assert abs(d_rank_one - d_dense) <= 1e-9
    # and exact at d_L = 1 (a_i scalars): δ from the eigenvalues of (1/n) Σ a_i² b_i b_iᵀ
    ra = fk.RankOne(a[:, :1], b)
    exact = _exact_delta_all_matrices(a[:, :1, None] * b[:, None, :])
    delta = fk.theory.rip_constant_lower_estimate(ra, generator=torch.Generator().manual_seed(0))
    assert exact - 1e-6 <= delta <= exact + 1e-12


def test_rip_of_entries_is_exact_with_the_completion_normalization():
    # f(u, v) = (d_0 d_L / n) Σ_i u_{a_i}² v_{b_i}²: extremes at the most and least observed entry
    rows = torch.tensor([0, 0, 1, 2, 2, 2, 1, 0, 1, 2, 0, 1])
    cols = torch.tensor([0, 1, 1, 2, 2, 0, 0, 2, 2, 1, 0, 1])  # (2, 2) twice, (0, 0) twice, (1, 1) twice
    e = fk.Entries(rows, cols, (3, 3))
    delta, u, v = fk.theory.rip_constant_lower_estimate(e, return_witness=True)
    assert delta == pytest.approx(9 / 12 * 2 - 1, abs=1e-15)  # every entry observed, the most twice
    A = torch.zeros(12, 3, 3, dtype=torch.float64)
    A[torch.arange(12), rows, cols] = 1.0
    assert abs(float(_f(A, u[None], v[None], scale=9.0)) - 1) == pytest.approx(delta, abs=1e-15)
    # the same matrices as Dense (scaled by √(d_0 d_L)): the search never exceeds the exact value and reaches it
    dense = fk.Dense(3.0 * A)
    d_dense = fk.theory.rip_constant_lower_estimate(dense, restarts=8, generator=torch.Generator().manual_seed(0))
    assert delta - 1e-6 <= d_dense <= delta + 1e-12
    # an unobserved entry: f = 0 there, δ = 1 unless some entry is observed more than 2n/(d_0 d_L) times
    sparse = fk.Entries(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 1]), (2, 3))
    delta, u, v = fk.theory.rip_constant_lower_estimate(sparse, return_witness=True)
    assert delta == pytest.approx(6 / 3 * 2 - 1)
    one = fk.Entries(torch.tensor([0, 1]), torch.tensor([0, 1]), (2, 3))
    delta, u, v = fk.theory.rip_constant_lower_estimate(one, return_witness=True)
    assert delta == 2.0  # (6/2)·1 - 1 = 2 above, beats 1 below
    # a single row: every matrix is rank-one, so the eigenvalue formula is exact here too
    e = fk.Entries.uniform(5, (1, 4), replace=True, generator=torch.Generator().manual_seed(5))
    A = torch.zeros(5, 1, 4, dtype=torch.float64)
    A[torch.arange(5), e.rows, e.cols] = 1.0
    assert fk.theory.rip_constant_lower_estimate(e) == pytest.approx(_exact_delta_all_matrices(A, scale=4.0), abs=1e-12)


def test_rip_of_isotropic_is_zero():
    assert fk.theory.rip_constant_lower_estimate(fk.Isotropic()) == 0.0
    delta, u, v = fk.theory.rip_constant_lower_estimate(fk.Isotropic(), (3, 2), return_witness=True)
    assert delta == 0.0 and u.shape == (3,) and v.shape == (2,) and u.norm() == v.norm() == 1


def test_rip_estimate_is_deterministic_and_more_restarts_never_lower_it():
    m = fk.Dense.gaussian(60, (6, 6), generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    est = fk.theory.rip_constant_lower_estimate
    runs = [est(m, restarts=r, generator=torch.Generator().manual_seed(9)) for r in (1, 3, 3, 12)]
    assert runs[1] == runs[2]
    assert runs[0] <= runs[1] + 1e-12 <= runs[3] + 2e-12
    # a float32 set is estimated in float64, the same number as its float64 copy
    m32 = fk.Dense(m.A.float())
    torch.testing.assert_close(est(m32, generator=torch.Generator().manual_seed(9)),
                               est(fk.Dense(m32.A.double()), generator=torch.Generator().manual_seed(9)),
                               rtol=0, atol=1e-12)


def test_rip_estimate_of_large_sets_searches_in_float32_and_reports_f_in_float64(monkeypatch):
    # from n d_L d_0 = 10⁶ on the search runs in float32; lowered here so that a small set takes that path
    m = fk.Dense.gaussian(400, (6, 5), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    est = fk.theory.rip_constant_lower_estimate
    d64 = est(m, restarts=4, generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(fk.theory, "_RIP_FLOAT32_FROM", 1)
    d32, u, v = est(m, restarts=4, generator=torch.Generator().manual_seed(3), return_witness=True)
    assert u.dtype == v.dtype == torch.float64
    assert abs(abs(float(_f(m.A, u[None], v[None])) - 1) - d32) <= 1e-13  # the value is f at the witness, in float64
    assert abs(d32 - d64) <= 1e-5  # the same optimum, found in float32
    g = torch.Generator().manual_seed(8)
    assert d32 >= float((_f(m.A, _unit(1000, 6, g), _unit(1000, 5, g)) - 1).abs().max())


def test_rip_estimate_of_gaussian_sets_shrinks_as_n_grows():
    # δ ~ √((d_0 + d_L)/n) up to constants: a loose monotone claim, averaged over seeds
    def mean_delta(n):
        return np.mean([fk.theory.rip_constant_lower_estimate(
            fk.Dense.gaussian(n, (10, 10), generator=torch.Generator().manual_seed(s), dtype=torch.float64),
            generator=torch.Generator().manual_seed(s)) for s in range(3)])

    d100, d500, d2000 = mean_delta(100), mean_delta(500), mean_delta(2000)
    assert d100 > d500 > d2000
    assert d2000 < 0.5 * d100  # √(100/2000) ≈ 0.22


def test_rip_estimate_refuses_what_it_cannot_estimate():
    est = fk.theory.rip_constant_lower_estimate
    m = fk.Dense.gaussian(10, (3, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with pytest.raises(TypeError, match=r"measurements .*Dense\(A\)"):
        est(m.A)
    with pytest.raises(TypeError, match="Inputs"):
        est(fk.Inputs(torch.randn(5, 3, dtype=torch.float64)))

    class Custom(fk.Measurements):
        n = 1

    with pytest.raises(TypeError, match="Custom"):
        est(Custom())
    bad = m.A.clone()
    bad[3, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="Dense A .* non-finite"):
        est(fk.Dense(bad))
    with pytest.raises(ValueError, match="RankOne v .* non-finite"):
        est(fk.RankOne(torch.ones(4, 2, dtype=torch.float64), torch.full((4, 3), float("inf"), dtype=torch.float64)))
    with pytest.raises(ValueError, match=r"Dense A has shape \(10, 3, 2\)"):
        est(m, (2, 3))
    with pytest.raises(ValueError, match="shape"):
        est(m, (3,))
    with pytest.raises(ValueError, match="needs shape"):
        est(fk.Isotropic(), return_witness=True)
    with pytest.raises(ValueError, match="restarts"):
        est(m, restarts=0)
    with pytest.raises(TypeError, match="iterations"):
        est(m, iterations=2.5)
    with pytest.raises(ValueError, match="tol"):
        est(m, tol=-1.0)
    with pytest.raises(TypeError, match="generator"):
        est(m, generator=0)
    with pytest.raises(TypeError, match="return_witness"):
        est(m, return_witness=1)


@pytest.mark.parametrize("delta,depth,expected", [(0.0, 2, 1.0), (0.5, 2, 3.0), (0.5, 3, 3.0 ** 0.75), (0.2, 4, 1.5 ** (4 / 6))])
def test_rip_nuclear_norm_factor_is_the_theorem_s(delta, depth, expected):
    assert fk.theory.rip_nuclear_norm_factor(delta, depth) == pytest.approx(expected, rel=1e-15)


def test_rip_nuclear_norm_factor_refuses_delta_at_least_one_and_depth_one():
    factor = fk.theory.rip_nuclear_norm_factor
    with pytest.raises(ValueError, match="delta must be < 1"):
        factor(1.0, 3)
    with pytest.raises(ValueError, match="delta"):
        factor(-0.1, 3)
    with pytest.raises(ValueError, match="delta"):
        factor(float("nan"), 3)
    with pytest.raises(ValueError, match="depth must be >= 2"):
        factor(0.1, 1)
    with pytest.raises(TypeError, match="depth"):
        factor(0.1, 2.0)
