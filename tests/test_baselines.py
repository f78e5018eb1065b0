"""``nuclear_norm_first_order`` (issue 20): the ADMM nuclear-norm solver and its duality certificate.

Ground truth: cvxpy's interior-point solve (``nuclear_norm_solution``) on small problems, closed forms
where there is one (a ``1 × d`` X, whose nuclear norm is the Euclidean norm), and weak duality checked
from the returned dual ``y`` with ``A*`` computed independently of the solver.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flatkern.experiments.baselines import _gram, nuclear_norm_first_order, nuclear_norm_solution
from flatkern.experiments.recovery import RecoverySettings, make_problem
from flatkern.measurements import Dense, Entries, Isotropic, RankOne

TOL = 1e-7


def nuclear(X: torch.Tensor) -> float:
    return float(torch.linalg.svdvals(X).sum())


def adjoint(meas, y: torch.Tensor, shape) -> torch.Tensor:
    """``A*(y) = Σ_i y_i A_i``, written from the measurement's definition (not the solver's code)."""
    if isinstance(meas, Dense):
        return torch.einsum("i,iab->ab", y, meas.A.double())
    return torch.zeros(shape, dtype=torch.float64).index_put_((meas.rows, meas.cols), y, accumulate=True)


def assert_certificate(meas, b: torch.Tensor, X: torch.Tensor, report: dict, shape) -> None:
    """The report's claims, recomputed: X feasible, ``‖A*(y)‖₂ = 1``, ``bound = <b, y> <= ‖X‖_*``, the gap."""
    b = b.double()
    assert X.shape == shape and X.dtype == torch.float64
    feasibility = float((meas.predict(X) - b).norm() / b.norm())
    assert feasibility <= 1e-9, feasibility
    assert report["feasibility"] == pytest.approx(feasibility, abs=1e-15)
    y = report["dual"]
    assert y.shape == (meas.n,)
    assert float(torch.linalg.matrix_norm(adjoint(meas, y, shape), ord=2)) == pytest.approx(1.0, rel=1e-12)
    assert report["lower_bound"] == pytest.approx(float(b @ y), rel=1e-12, abs=1e-14)
    value = nuclear(X)
    assert report["nuclear_norm"] == pytest.approx(value, rel=1e-12)
    # weak duality: <b, y> = <X, A*(y)> <= ‖X‖_* ‖A*(y)‖₂ for the feasible X, up to rounding
    assert report["lower_bound"] <= value * (1 + 1e-12)
    if report["lower_bound"] > 0:
        assert report["gap"] == pytest.approx((value - report["lower_bound"]) / report["lower_bound"], rel=1e-9,
                                              abs=1e-15)
    else:  # no positive bound yet: no finite relative gap
        assert report["gap"] == float("inf") and not report["converged"]


# (experiment, d, rank, n, recovered): n below and above the recovery threshold (above: X = M*, the unique optimum)
CASES = [
    ("sensing", 6, 1, 12, False), ("sensing", 6, 1, 30, True),
    ("sensing", 10, 2, 40, False), ("sensing", 10, 2, 80, True),
    ("completion", 10, 1, 40, False), ("completion", 10, 1, 70, True),
    ("completion", 12, 2, 90, False), ("completion", 12, 2, 130, True),
]


@pytest.mark.parametrize("experiment,d,rank,n,recovered", CASES, ids=[f"{c[0]}-d{c[1]}-r{c[2]}-n{c[3]}" for c in CASES])
def test_first_order_matches_cvxpy_and_certifies_its_gap(experiment, d, rank, n, recovered):
    M, meas, b = make_problem(experiment, n, 0, RecoverySettings(d=d, rank=rank))
    X, report = nuclear_norm_first_order(meas, b, (d, d), tol=TOL)
    X_cvx = nuclear_norm_solution(meas, b, (d, d))
    optimum = nuclear(X_cvx)
    assert report["converged"] and report["gap"] <= TOL and report["feasibility"] <= 1e-8
    assert_certificate(meas, b, X, report, (d, d))
    assert report["nuclear_norm"] == pytest.approx(optimum, rel=1e-6)
    # the certified bound cannot exceed the optimum (cvxpy's value is itself accurate to ~1e-8 relative)
    assert report["lower_bound"] <= optimum * (1 + TOL)
    if recovered:  # the optimum is unique (it is M*): the minimizers agree, not only the values
        assert float((X - M).norm() / M.norm()) <= 1e-6
        assert float((X - X_cvx).norm() / X_cvx.norm()) <= 1e-6


@pytest.mark.parametrize("family", ["dense", "entries"])
def test_first_order_on_a_row_vector_is_the_least_norm_solution(family):
    # for X of shape (1, d) the nuclear norm is ‖x‖₂, so the optimum is the least-norm solution A⁺ b
    g = torch.Generator().manual_seed(3)
    d = 9
    if family == "dense":
        meas = Dense(torch.randn(5, 1, d, generator=g, dtype=torch.float64))
        least_norm = torch.linalg.pinv(meas.A.reshape(5, d)) @ torch.randn(5, generator=g, dtype=torch.float64)
    else:
        meas = Entries(torch.zeros(4, dtype=torch.long), torch.tensor([7, 0, 3, 5]), (1, d))
        values = torch.randn(4, generator=g, dtype=torch.float64)
        least_norm = torch.zeros(d, dtype=torch.float64).index_put_((meas.cols,), values)
    b = meas.predict(least_norm.reshape(1, d))
    X, report = nuclear_norm_first_order(meas, b, (1, d), tol=1e-10)
    assert report["converged"]
    assert_certificate(meas, b, X, report, (1, d))
    torch.testing.assert_close(X, least_norm.reshape(1, d), rtol=1e-8, atol=1e-8)


def test_first_order_recovers_a_fully_observed_matrix_exactly():
    M = torch.randn(5, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    flat = torch.arange(20)
    meas = Entries(flat // 4, flat % 4, (5, 4))
    X, report = nuclear_norm_first_order(meas, meas.predict(M), (5, 4))
    assert torch.equal(X, M)  # every entry is set by the projection
    assert report["converged"] and report["gap"] <= TOL


@pytest.mark.parametrize("n", [1, 3, 4, 9])
def test_blocked_gram_is_symmetric_and_matches_a_times_a_transpose(n):
    A = torch.randn(n, 7, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    G = _gram(A, block=4)  # blocks of 4 rows: one partial block, one exact, and several
    assert torch.equal(G, G.T)
    torch.testing.assert_close(G, A @ A.T, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("rho", [1e-4, 1e4])
def test_residual_balancing_recovers_from_a_bad_initial_rho(rho):
    M, meas, b = make_problem("completion", 70, 0, RecoverySettings(d=10, rank=1))
    X, report = nuclear_norm_first_order(meas, b, (10, 10), rho=rho)
    assert report["converged"], report
    assert 1e-2 < report["rho"] < 1e2  # moved by powers of 2 towards the balanced penalty (about 1 here)
    torch.testing.assert_close(X, M, rtol=1e-6, atol=1e-6)


def test_first_order_reports_no_convergence_when_stopped_early():
    M, meas, b = make_problem("completion", 90, 0, RecoverySettings(d=12, rank=2))
    X, report = nuclear_norm_first_order(meas, b, (12, 12), max_iterations=3)
    assert report["iterations"] == 3 and not report["converged"] and report["gap"] > TOL
    assert_certificate(meas, b, X, report, (12, 12))  # still feasible, and the bound still holds


def test_duplicate_entries_that_agree_are_one_constraint():
    M, meas, b = make_problem("completion", 40, 0, RecoverySettings(d=10, rank=1))
    dup = torch.tensor([0, 5, 5, 17])
    twice = Entries(torch.cat([meas.rows, meas.rows[dup]]), torch.cat([meas.cols, meas.cols[dup]]), (10, 10))
    X1, r1 = nuclear_norm_first_order(meas, b, (10, 10))
    X2, r2 = nuclear_norm_first_order(twice, twice.predict(M), (10, 10))
    torch.testing.assert_close(X2, X1, rtol=0, atol=0)
    assert r2["lower_bound"] == r1["lower_bound"]
    assert_certificate(twice, twice.predict(M), X2, r2, (10, 10))


def test_duplicate_entries_that_disagree_are_refused():
    meas = Entries(torch.tensor([0, 1, 0]), torch.tensor([2, 1, 2]), (3, 3))
    with pytest.raises(ValueError, match=r"entry \(0, 2\) twice with different targets.*infeasible"):
        nuclear_norm_first_order(meas, torch.tensor([1.0, 2.0, 1.0 + 1e-15], dtype=torch.float64), (3, 3))


def test_zero_targets_give_the_zero_matrix():
    meas = Dense.gaussian(4, (3, 3), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    X, report = nuclear_norm_first_order(meas, torch.zeros(4, dtype=torch.float64), (3, 3))
    assert torch.equal(X, torch.zeros(3, 3, dtype=torch.float64))
    assert report["converged"] and report["nuclear_norm"] == 0.0 and report["lower_bound"] == 0.0


def _dense(n, shape=(3, 4)):
    return Dense.gaussian(n, shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("call,error,match", [
    (lambda: nuclear_norm_first_order(_dense(5), torch.zeros(4, dtype=torch.float64), (3, 4)), ValueError,
     r"targets must have shape \(5,\).*got \(4,\)"),
    (lambda: nuclear_norm_first_order(_dense(5), torch.zeros(5, 1, dtype=torch.float64), (3, 4)), ValueError,
     r"targets must have shape \(5,\).*got \(5, 1\)"),
    (lambda: nuclear_norm_first_order(_dense(5), torch.zeros(5, dtype=torch.long), (3, 4)), TypeError,
     "targets must be a floating tensor"),
    (lambda: nuclear_norm_first_order(_dense(2), torch.tensor([1.0, float("nan")]), (3, 4)), ValueError,
     "targets must be finite"),
    (lambda: nuclear_norm_first_order(_dense(5), torch.ones(5), (4, 3)), ValueError,
     r"for a matrix of shape \(3, 4\), but shape = \(4, 3\)"),
    (lambda: nuclear_norm_first_order(_dense(5), torch.ones(5), (3, 4, 1)), ValueError, r"shape must be \(d_L, d_0\)"),
    (lambda: nuclear_norm_first_order(_dense(13), torch.ones(13), (3, 4)), ValueError,
     r"n = 13 > d_L d_0 = 12 .*linearly dependent.*singular"),
    (lambda: nuclear_norm_first_order(Dense(_dense(3).A[[0, 1, 0]]), torch.ones(3), (3, 4)), ValueError,
     "Gram .* is singular"),
    (lambda: nuclear_norm_first_order(Dense(torch.randn(2, 5, 3, 4)), torch.ones(5), (3, 4)), ValueError,
     "batch shape"),
    (lambda: nuclear_norm_first_order(RankOne(torch.randn(5, 3), torch.randn(5, 4)), torch.ones(5), (3, 4)), TypeError,
     "supports Dense and Entries measurements, got RankOne"),
    (lambda: nuclear_norm_first_order(Isotropic(), torch.ones(5), (3, 4)), TypeError,
     "supports Dense and Entries measurements, got Isotropic"),
    (lambda: nuclear_norm_first_order(_dense(5), torch.ones(5), (3, 4), tol=0), ValueError, "tol must be > 0"),
    (lambda: nuclear_norm_first_order(_dense(5), torch.ones(5), (3, 4), rho=-1.0), ValueError,
     "rho must be > 0, got -1.0"),
    (lambda: nuclear_norm_first_order(_dense(5), torch.ones(5), (3, 4), max_iterations=0), ValueError,
     "max_iterations must be >= 1"),
    (lambda: nuclear_norm_first_order(_dense(5), torch.ones(5), (3, 4), relaxation=2.0), ValueError,
     r"relaxation must lie in \(0, 2\)"),
    (lambda: nuclear_norm_first_order(_dense(5), torch.ones(5), (3, 4), check_every=0), ValueError,
     "check_every must be >= 1"),
])
def test_first_order_refuses_bad_input_naming_it(call, error, match):
    with pytest.raises(error, match=match):
        call()


@given(d_L=st.integers(1, 6), d_0=st.integers(1, 6), family=st.sampled_from(["dense", "entries"]),
       fraction=st.floats(0.05, 1.0), rank=st.integers(1, 3), seed=st.integers(0, 2**31 - 1),
       relaxation=st.sampled_from([1.0, 1.6]), check_every=st.sampled_from([1, 10]))
def test_first_order_bound_holds_and_solution_is_feasible_on_random_problems(d_L, d_0, family, fraction, rank, seed,
                                                                             relaxation, check_every):
    g = torch.Generator().manual_seed(seed)
    n = max(1, round(fraction * d_L * d_0))
    r = min(rank, d_L, d_0)
    M = torch.randn(d_L, r, generator=g, dtype=torch.float64) @ torch.randn(r, d_0, generator=g, dtype=torch.float64)
    if family == "dense":
        meas = Dense.gaussian(n, (d_L, d_0), generator=g, dtype=torch.float64)
    else:
        meas = Entries.uniform(n, (d_L, d_0), generator=g)
    b = meas.predict(M)
    X, report = nuclear_norm_first_order(meas, b, (d_L, d_0), relaxation=relaxation, check_every=check_every)
    assert_certificate(meas, b, X, report, (d_L, d_0))
    assert report["converged"], report
    # the planted M is feasible, so the optimum, and with it the certified bound, is at most ‖M‖_*
    assert report["lower_bound"] <= nuclear(M) * (1 + 1e-12)
    assert report["nuclear_norm"] <= nuclear(M) * (1 + 2 * TOL)


def test_the_convex_baseline_is_cvxpy_up_to_its_size_and_admm_beyond_with_the_same_optimum(monkeypatch):
    from flatkern.experiments import baselines
    from flatkern.experiments.recovery import RecoverySettings, make_problem, run_nuclear_norm

    settings = RecoverySettings(d=8, rank=1)
    M, meas, b = make_problem("completion", 40, 0, settings)
    assert baselines.convex_solver((50, 50)) == "cvxpy" and baselines.convex_solver((51, 20)) == "admm"
    X_cvxpy, status = baselines.nuclear_norm_solution(meas, b, (8, 8), return_status=True)
    monkeypatch.setattr(baselines, "CVXPY_MAX_SIZE", 7)
    X_admm, status_admm = baselines.nuclear_norm_solution(meas, b, (8, 8), return_status=True)
    assert status_admm == "optimal"
    nuc = lambda X: float(torch.linalg.matrix_norm(X, ord="nuc"))  # noqa: E731
    assert abs(nuc(X_admm) - nuc(X_cvxpy)) <= 1e-6 * nuc(X_cvxpy)
    (record,) = run_nuclear_norm("completion", 40, 0, settings)
    assert record["solver"] == "admm" and record["solver_status"] == "optimal"
