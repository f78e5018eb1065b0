"""Baselines that are not trained networks: the convex program (cvxpy's interior point, and a first-order ADMM
with a certified gap for the sizes an SDP cannot hold) and the balanced factorization."""

from __future__ import annotations

import math

import numpy as np
import torch

from .._checks import check_int, check_real
from ..measurements import Dense, Entries, Measurements

__all__ = ["nuclear_norm_solution", "nuclear_norm_first_order", "convex_solver", "convex_cost", "convex_memory_gb",
           "CVXPY_MAX_SIZE", "balanced_factorization"]

# the largest max(d_L, d_0) solved by cvxpy: its SDP factors a dense block of (d (2d + 1))² entries, 1.3 GB at 50 × 50
# and over 20 GB at 100 × 100 (measured: OOM-killed on a 23 GB machine); beyond it, ADMM (nuclear_norm_first_order)
CVXPY_MAX_SIZE = 50


def convex_solver(shape: tuple[int, int]) -> str:
    """``"cvxpy"`` (Clarabel's interior point) for ``X`` up to ``CVXPY_MAX_SIZE`` on a side, else ``"admm"``."""
    return "cvxpy" if max(shape) <= CVXPY_MAX_SIZE else "admm"


def convex_cost(dense: bool, d: int, n: int) -> float:
    """Estimated seconds (one thread) of ``nuclear_norm_solution`` for a ``d × d`` ``X`` and ``n`` measurements.

    Clarabel's SDP (``convex_solver``: up to 50 × 50), measured on one thread of a loaded machine:
    3-4 s at d = 20 (n <= 200); Gaussian sensing 76 s at d = 50, n = 500 and 209 s at n = 1000 (``(n d²)^1.46``);
    completion 34 s at d = 40, n = 320 and 218 s at d = 60, n = 720 (``d^4.6``; its n matters little).  ADMM
    (beyond), at 100 × 100 rank 5: completion 1.1 ms an iteration, sensing the n × n Gram and its inverse
    (1.1 s at n = 2000, 8.1 s at n = 5000) then 17-42 ms an iteration (~8.5e-10 s per n d²); 50-1500
    iterations (the most near the recovery threshold), 2000 assumed.
    """
    if convex_solver((d, d)) == "admm":
        iterations = 2000
        if dense:
            return 2.8e-11 * n * n * d * d + 8.5e-10 * n * d * d * iterations
        return 1.1e-3 * (d / 100) ** 2 * iterations
    if dense:
        return max(3.5, 209.0 * (n * d * d / 2.5e6) ** 1.46)
    return max(3.5, 218.0 * (d / 60) ** 4.6)


def convex_memory_gb(dense: bool, d: int, n: int) -> float:
    """Estimated peak memory (GB) of ``nuclear_norm_solution`` for a ``d × d`` ``X`` and ``n`` measurements.

    cvxpy: Clarabel factors a dense block of the ``2d × 2d`` PSD cone's ``m = d(2d + 1)`` entries, ``m²`` of
    them (measured: completion at d = 100, n = 2000 passed 20 GB and was killed by the kernel's OOM killer on a
    23 GB machine; 50 bytes per ``m²``).  ADMM: a copy of the ``n`` sensing matrices and the ``n × n`` Gram's
    inverse, ``8 (n d² + 2 n²)`` bytes (measured 1.0 GB at n = 5000), plus torch's 0.3 GB.
    """
    if convex_solver((d, d)) == "admm":
        return (8e-9 * (n * d * d + 2 * n * n) if dense else 0.0) + 0.3
    return 50e-9 * (d * (2 * d + 1)) ** 2


def nuclear_norm_solution(measurements: Measurements, targets: torch.Tensor, shape: tuple[int, int], *, return_status: bool = False):
    """``argmin ‖X‖_*  s.t.  <A_i, X> = b_i`` for all ``i``: by cvxpy (Clarabel, an interior-point SDP solver) up to
    ``CVXPY_MAX_SIZE`` on a side, by ``nuclear_norm_first_order`` (ADMM, its duality gap certified to 1e-7) beyond
    (``convex_solver``).

    Args:
        measurements: ``Dense`` (Gaussian sensing) or ``Entries`` (completion).
        targets: ``(n,)`` measured values ``b``.
        shape: ``(d_L, d_0)`` of ``X``.

    Returns:
        ``X`` of shape ``(d_L, d_0)``, float64; with ``return_status``, ``(X, status)``
        where ``status`` is cvxpy's (``"optimal"`` or ``"optimal_inaccurate"``), or for ADMM ``"optimal"`` when
        its certified relative gap is within its tolerance and ``"optimal_inaccurate"`` when it stopped at its
        iteration cap before.
    """
    if convex_solver(shape) == "admm":
        X, report = nuclear_norm_first_order(measurements, targets, shape)
        status = "optimal" if report["converged"] else "optimal_inaccurate"
        return (X, status) if return_status else X
    try:
        import cvxpy as cp
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError("the nuclear_norm baseline needs cvxpy: pip install cvxpy") from exc
    X = cp.Variable(shape)
    b = targets.detach().cpu().double().numpy()
    if isinstance(measurements, Dense):
        A = measurements.A.detach().cpu().double().numpy().reshape(measurements.n, -1)
        # row-major vec(X) matches A_i.reshape(-1)
        constraints = [A @ cp.vec(X, order="C") == b]
    elif isinstance(measurements, Entries):
        constraints = [X[measurements.rows.cpu().numpy(), measurements.cols.cpu().numpy()] == b]
    else:
        raise TypeError(f"nuclear_norm_solution supports Dense and Entries measurements, got {type(measurements).__name__}")
    problem = cp.Problem(cp.Minimize(cp.normNuc(X)), constraints)
    import warnings

    with warnings.catch_warnings():
        # "Solution may be inaccurate": reported in the record's solver_status instead
        warnings.simplefilter("ignore", UserWarning)
        problem.solve(solver=cp.CLARABEL)
    if problem.status not in ("optimal", "optimal_inaccurate"):
        raise RuntimeError(f"cvxpy could not solve the nuclear-norm program: status {problem.status}")
    X = torch.from_numpy(np.asarray(X.value, dtype=np.float64))
    return (X, problem.status) if return_status else X


# feasibility ‖A(X) − b‖ / ‖b‖ that `converged` requires of the returned X
FEASIBILITY_TOL = 1e-8
# residual balancing keeps ρ ‖Z_0‖₂ (Z_0 = Π(0)) within [1 / RHO_RANGE, RHO_RANGE] (see _admm)
RHO_RANGE = 1e4


class _Affine:
    """The constraint set ``{Z : A(Z) = b}`` of one ``Dense`` or ``Entries`` problem, in float64 on the CPU.

    ``project(V)`` returns ``(Z, w)`` with ``Z`` the Euclidean projection of ``V`` (``(d_L, d_0)``) and
    ``V − Z = A*(w)`` (``w``: ``(n,)``), so the ADMM's scaled dual stays in ``range(A*)`` by construction;
    ``adjoint(y) = A*(y) = Σ_i y_i A_i`` and ``forward(Z) = A(Z) = (<A_i, Z>)_i``.
    """

    def __init__(self, measurements: Measurements, targets: torch.Tensor, shape: tuple[int, int]):
        self.shape, self.n = shape, measurements.n
        self.b = targets.detach().to("cpu", torch.float64).clone()
        if isinstance(measurements, Dense):
            D = shape[0] * shape[1]
            if self.n > D:
                raise ValueError(f"nuclear_norm_first_order: Dense measurements with n = {self.n} > d_L d_0 = {D} "
                                 f"(shape {shape}) are linearly dependent, so their n × n Gram A Aᵀ is singular; the "
                                 "affine projection needs n <= d_L d_0: keep a linearly independent subset of them")
            # row-major vec(X) matches A_i.reshape(-1), as in nuclear_norm_solution
            self.A = measurements.A.detach().to("cpu", torch.float64).reshape(self.n, D).contiguous()
            chol, info = torch.linalg.cholesky_ex(_gram(self.A))
            if int(info) != 0:
                raise ValueError(f"nuclear_norm_first_order: the Gram A Aᵀ ({self.n} × {self.n}) of the Dense "
                                 f"measurements (A: {tuple(measurements.A.shape)}) is singular (Cholesky failed at "
                                 f"pivot {int(info)}): the A_i are linearly dependent, so the constraints are "
                                 "redundant or inconsistent; drop the dependent measurements")
            # the explicit inverse, once (~n³ flops, 2.3 s at n = 5000): the Cholesky solve per iteration (two
            # triangular solves on n² entries) took 90 ms at n = 5000, against 8 ms for a product with the inverse
            # and 29 ms for the iteration's two passes over A (one thread)
            self.gram_inverse = torch.cholesky_inverse(chol)
            self.index = None
        else:
            rows, cols = measurements.rows.cpu(), measurements.cols.cpu()
            flat = rows * shape[1] + cols
            # a duplicated entry is one constraint if its values agree exactly, and an empty feasible set if not
            self.index, inverse = torch.unique(flat, return_inverse=True)
            first = torch.full((self.index.numel(),), self.n, dtype=torch.long).scatter_reduce(
                0, inverse, torch.arange(self.n), reduce="amin")
            self.first = first  # the first occurrence of each distinct entry: where the dual y puts its weight
            self.values = self.b[first]
            clash = self.values[inverse] != self.b
            if bool(clash.any()):
                i = int(clash.nonzero()[0])
                j = int(first[inverse[i]])
                raise ValueError(f"nuclear_norm_first_order: Entries observe entry ({int(rows[i])}, {int(cols[i])}) "
                                 f"twice with different targets (b[{j}] = {float(self.b[j])!r}, b[{i}] = "
                                 f"{float(self.b[i])!r}): no X meets both, so the program is infeasible")

    def forward(self, Z: torch.Tensor) -> torch.Tensor:
        if self.index is None:
            return self.A @ Z.reshape(-1)
        return Z.reshape(-1)[self.index]

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``A*(y)`` for ``y`` in this object's coordinates (``(n,)`` for Dense, one per distinct entry for Entries)."""
        if self.index is None:
            return (self.A.T @ y).reshape(self.shape)
        out = torch.zeros(self.shape[0] * self.shape[1], dtype=torch.float64)
        out[self.index] = y
        return out.reshape(self.shape)

    def targets(self) -> torch.Tensor:
        return self.b if self.index is None else self.values

    def project(self, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.index is None:
            # Z = V − A*((A A*)⁻¹ (A(V) − b)) with (A A*)⁻¹ computed once
            w = self.gram_inverse @ (self.A @ V.reshape(-1) - self.b)
            return V - self.adjoint(w), w
        Z = V.clone().reshape(-1)
        w = Z[self.index] - self.values
        Z[self.index] = self.values
        return Z.reshape(self.shape), w

    def dual_to_measurements(self, y: torch.Tensor) -> torch.Tensor:
        """``y`` in the caller's coordinates ``(n,)``: a duplicated entry's weight sits on its first occurrence."""
        if self.index is None:
            return y
        return torch.zeros(self.n, dtype=torch.float64).index_copy_(0, self.first, y)


def _gram(A: torch.Tensor, block: int = 512) -> torch.Tensor:
    """``A Aᵀ`` (``(n, n)`` for ``A``: ``(n, D)``) from its lower block triangle: half the flops of one
    ``A @ A.T`` (4.6 s against 8.3 s at n = 5000, D = 10⁴, one thread)."""
    n = A.shape[0]
    G = torch.empty(n, n, dtype=A.dtype)
    for i in range(0, n, block):
        G[i:i + block, :i + block] = A[i:i + block] @ A[:i + block].T
        G[:i, i:i + block] = G[i:i + block, :i].T  # the mirror block: no n × n temporaries
        diagonal = G[i:i + block, i:i + block]  # a product's rounding need not be symmetric: make it exactly so
        diagonal.copy_(diagonal.tril() + diagonal.tril(-1).T)
    return G


def _positive(value, name: str) -> float:
    """``value`` as a finite float ``> 0``, else an error naming ``name``."""
    out = check_real(value, name)
    if out <= 0:
        raise ValueError(f"{name} must be > 0, got {out}")
    return out


def _svt(M: torch.Tensor, threshold: float) -> torch.Tensor:
    """Singular-value thresholding ``U max(Σ − threshold, 0) Vᵀ``: the proximal map of ``threshold ‖·‖_*``."""
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    S = (S - threshold).clamp_min(0)
    k = int((S > 0).sum())
    return (U[:, :k] * S[:k]) @ Vh[:k]


def nuclear_norm_first_order(measurements: Measurements, targets: torch.Tensor, shape: tuple[int, int], *,
                             tol: float = 1e-7, max_iterations: int = 20000, rho: float | None = None,
                             check_every: int = 10, relaxation: float = 1.6):
    """``argmin ‖X‖_*  s.t.  A(X) = b`` by ADMM, with a certified duality gap; float64 on the CPU, plain torch.

    The convex baseline of ``nuclear_norm_solution`` without an interior-point SDP: memory
    ``O(d_L d_0 + n d_L d_0 + n²)`` (Dense) or ``O(d_L d_0 + n)`` (Entries) instead of Clarabel's
    ``O(d⁴)`` (see ``convex_memory_gb``).

    Algorithm (scaled ADMM on ``min ‖X‖_* + 1{A(Z) = b}`` s.t. ``X = Z``; Boyd et al. 2011, §3), all
    iterates ``(d_L, d_0)``, starting from ``Z = Π(0)``, ``U = 0``::

        X ← SVT_{1/ρ}(Z − U)                      singular-value thresholding: P max(Σ − 1/ρ, 0) Qᵀ
        V ← α X + (1 − α) Z + U                   over-relaxation α = relaxation (§3.4.3)
        Z ← Π(V)                                  the projection onto {A(Z) = b}
        U ← V − Z

    ``Π`` for ``Entries``: set the observed entries to ``b`` (a duplicated entry must carry the same
    value each time, else a ValueError: the program would be infeasible).  ``Π`` for ``Dense``:
    ``Z − A*((A A*)⁻¹ (A(Z) − b))`` with the ``n × n`` Gram ``A A*`` factored (Cholesky) and inverted
    once (needs ``n <= d_L d_0`` and linearly independent ``A_i``: a failed Cholesky is a ValueError).
    ``ρ`` follows residual balancing (Boyd et al. §3.4.1, μ = 10, τ = 2): ``ρ ← 2ρ`` (``U ← U/2``) when
    the primal residual ``‖X − Z‖_F`` exceeds 10 times the dual one ``ρ ‖Z − Z_prev‖_F``,
    ``ρ ← ρ/2`` (``U ← 2U``) in the opposite case, while ``ρ ‖Z_0‖₂`` stays in ``[1e-4, 1e4]`` (beyond, rounding swamps ``U``).
    The default initial ``ρ`` is ``1 / ‖Z_0‖₂`` with ``Z_0 = Π(0)`` the least-norm interpolant: the
    first threshold is then at the scale of its top singular value.

    Certificate: ``U = V − Π(V) = A*(w)`` with ``w = (A A*)⁻¹ (A(V) − b)`` (Dense) or
    ``w = V[rows, cols] − b`` (Entries): the projection's residual lies in ``range(A*)``, and at the
    optimum ``−ρU ∈ ∂‖X‖_*``.  So ``y = −w`` gives ``W = A*(y)``, and for every feasible ``X``,
    ``<b, y> = <X, W> <= ‖X‖_* ‖W‖₂``::

        bound = <b, y> / ‖A*(y)‖₂ <= min {‖X‖_* : A(X) = b}

    (weak duality for the dual ``max <b, y> s.t. ‖A*(y)‖₂ <= 1``).  Every ``check_every``
    iterations the relative gap ``(‖Z‖_* − bound) / bound`` of the feasible iterate ``Z`` is
    computed; the loop stops once it is ``<= tol`` (and ``Z`` is feasible to ``1e-8``).

    Args:
        measurements: ``Dense`` (``A``: ``(n, d_L, d_0)``) or ``Entries`` (``rows, cols``: ``(n,)``),
            without a batch shape.
        targets: ``(n,)`` measured values ``b`` (cast to float64).
        shape: ``(d_L, d_0)`` of ``X``.
        tol: the relative gap to stop at (> 0).
        max_iterations: ADMM iterations at most (>= 1).
        rho: the initial penalty ``ρ`` (> 0); None picks ``1 / ‖Π(0)‖₂``.
        check_every: iterations between certificates (each costs two ``d_L × d_0`` singular-value
            computations, about one iteration).
        relaxation: the over-relaxation ``α`` in ``(0, 2)``; 1 is plain ADMM.  1.6 took 30-40% fewer
            iterations than 1 on the 100 × 100 rank-5 problems (completion and Gaussian sensing, n = 2000).

    Returns:
        ``(X, report)``: ``X`` of shape ``(d_L, d_0)``, float64: the feasible iterate ``Z`` of the certificate
        with the smallest gap (the last one when it converged), re-projected where needed so that
        ``‖A(X) − b‖ / ‖b‖`` is at rounding level.  ``report``: a dict with
        ``nuclear_norm`` (``‖X‖_*``), ``lower_bound`` (``<b, y>``), ``dual`` (``y``, ``(n,)``, scaled to
        ``‖A*(y)‖₂ = 1``: ``lower_bound = <b, y>``; a duplicated entry's weight on its first occurrence),
        ``gap`` (``(‖X‖_* − bound) / bound``; ``inf`` while ``bound <= 0``), ``feasibility``
        (``‖A(X) − b‖ / ‖b‖``), ``iterations``, ``rho`` (the final ``ρ``) and ``converged``
        (``gap <= tol`` and ``feasibility <= 1e-8``).  ``b = 0`` returns ``X = 0`` with bound 0, gap 0, ``y = 0``
        and ``rho`` as passed, after 0 iterations.
    """
    if not isinstance(measurements, (Dense, Entries)):
        raise TypeError("nuclear_norm_first_order supports Dense and Entries measurements, got "
                        f"{type(measurements).__name__}")
    if measurements.batch_shape:
        raise ValueError(f"nuclear_norm_first_order solves one problem: {measurements!r} has a batch shape "
                         f"{measurements.batch_shape}; pass the measurements of one problem")
    if not hasattr(shape, "__len__") or len(shape) != 2:
        raise ValueError(f"nuclear_norm_first_order shape must be (d_L, d_0), got {shape!r}")
    shape = (check_int(shape[0], "nuclear_norm_first_order shape[0] (d_L)", minimum=1),
             check_int(shape[1], "nuclear_norm_first_order shape[1] (d_0)", minimum=1))
    have = tuple(measurements.A.shape[-2:]) if isinstance(measurements, Dense) else measurements.shape
    if have != shape:
        raise ValueError(f"nuclear_norm_first_order: {measurements!r} is for a matrix of shape {have}, "
                         f"but shape = {shape}")
    if not isinstance(targets, torch.Tensor) or not targets.is_floating_point():
        got = f"a tensor of dtype {targets.dtype}" if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise TypeError(f"nuclear_norm_first_order targets must be a floating tensor of shape ({measurements.n},), "
                        f"got {got}")
    if tuple(targets.shape) != (measurements.n,):
        raise ValueError(f"nuclear_norm_first_order targets must have shape ({measurements.n},) for {measurements!r}, "
                         f"got {tuple(targets.shape)}")
    if not bool(torch.isfinite(targets).all()):
        raise ValueError("nuclear_norm_first_order targets must be finite, got nan or inf")
    tol = _positive(tol, "nuclear_norm_first_order tol")
    max_iterations = check_int(max_iterations, "nuclear_norm_first_order max_iterations", minimum=1)
    check_every = check_int(check_every, "nuclear_norm_first_order check_every", minimum=1)
    if rho is not None:
        rho = _positive(rho, "nuclear_norm_first_order rho")
    relaxation = check_real(relaxation, "nuclear_norm_first_order relaxation")
    if not 0 < relaxation < 2:
        raise ValueError(f"nuclear_norm_first_order relaxation must lie in (0, 2) (ADMM converges there), "
                         f"got {relaxation}")

    with torch.no_grad():
        return _admm(_Affine(measurements, targets, shape), tol, max_iterations, rho, check_every, relaxation)


def _rank(report: dict) -> tuple:
    """How a certificate compares: feasible (to ``FEASIBILITY_TOL``) first, then by its gap."""
    return (report["feasibility"] > FEASIBILITY_TOL, report["gap"])


def _admm(con: _Affine, tol: float, max_iterations: int, rho: float | None, check_every: int, relaxation: float):
    b = con.targets()
    b_norm = float(con.b.norm())
    zero = torch.zeros(con.shape, dtype=torch.float64)
    if b_norm == 0:  # X = 0 is feasible and ‖X‖_* >= 0: optimal, with y = 0 as its certificate
        return zero, dict(nuclear_norm=0.0, lower_bound=0.0, dual=torch.zeros(con.n, dtype=torch.float64), gap=0.0,
                          feasibility=0.0, iterations=0, rho=rho, converged=True)
    Z, _ = con.project(zero)
    scale = float(torch.linalg.matrix_norm(Z, ord=2))
    if rho is None:
        rho = 1.0 / scale
    U = zero
    mu, tau = 10.0, 2.0

    def certificate(Z, w):
        """(Z, report) of the feasible iterate Z and the dual w: ‖Z‖_*, bound, y scaled to ‖A*(y)‖₂ = 1, gap,
        feasibility."""
        feasibility = float((con.forward(Z) - b).norm()) / b_norm
        # Dense: one Cholesky solve leaves A(Z) − b at ~cond(A A*) ε; re-projecting (iterative refinement, at most
        # twice) takes it to rounding.  Entries are set exactly.
        for _ in range(2):
            if feasibility <= 1e-14:
                break
            Z = con.project(Z)[0]
            feasibility = float((con.forward(Z) - b).norm()) / b_norm
        value = float(torch.linalg.svdvals(Z).sum())
        y = -w
        spectral = float(torch.linalg.svdvals(con.adjoint(y))[0])
        y = y / spectral if spectral > 0 else y
        bound = float(b @ y) if spectral > 0 else -math.inf
        gap = (value - bound) / bound if bound > 0 else math.inf
        return Z, dict(nuclear_norm=value, lower_bound=bound, dual=con.dual_to_measurements(y), gap=gap,
                       feasibility=feasibility)

    best = None
    iterations = 0
    for iterations in range(1, max_iterations + 1):
        X = _svt(Z - U, 1.0 / rho)
        # over-relaxation (Boyd et al. §3.4.3): V − Π(V) is still A*(w), so the certificate is unchanged
        V = relaxation * X + (1 - relaxation) * Z + U
        Z_prev = Z
        Z, w = con.project(V)
        U = V - Z  # = A*(w) up to rounding: the scaled dual stays in range(A*)
        if iterations % check_every == 0 or iterations == max_iterations:
            # w belongs to this U (before any rescaling below); the bound is invariant to w's scale
            Zc, report = certificate(Z, w)
            # the best so far: a feasible iterate before an infeasible one, then the smaller gap (a certificate that
            # meets both tests is the best: every earlier feasible one had a gap above tol, or the loop had stopped)
            if best is None or _rank(report) < _rank(best[1]):
                best = (Zc, report)
            if report["gap"] <= tol and report["feasibility"] <= FEASIBILITY_TOL:
                break
        primal = float((X - Z).norm())
        dual = rho * float((Z - Z_prev).norm())
        # ρ stays within [1e-4, 1e4] / ‖Z_0‖₂ (RHO_RANGE): U = W / ρ with ‖W‖₂ ≈ 1 sits beside Z ~ ‖Z_0‖₂, and
        # outside that band rounding in Z − U (or in X + U) would swamp the dual W.  Balancing alone can push ρ
        # without bound: with every entry observed Z never moves, the dual residual is 0 and ρ would double
        # forever (the gap then stalls at ~1e-7 from rounding).
        if primal > mu * dual and rho * scale < RHO_RANGE:
            rho, U = rho * tau, U / tau
        elif dual > mu * primal and rho * scale > 1 / RHO_RANGE:
            rho, U = rho / tau, U * tau
    X, report = best
    report.update(iterations=iterations, rho=rho,
                  converged=report["gap"] <= tol and report["feasibility"] <= FEASIBILITY_TOL)
    return X, report


def balanced_factorization(M: torch.Tensor, widths: list[int]) -> list[torch.Tensor]:
    """The balanced factorization of ``M = U Σ Vᵀ``: every layer has singular values ``Σ^{1/L}``.

    ``W_1 = [Σ^{1/L} Vᵀ; 0]``, ``W_j = diag(Σ^{1/L}, 0)``, ``W_L = [U Σ^{1/L}, 0]``
    (``W_{j+1}ᵀ W_{j+1} = W_j W_jᵀ``).  It is also the minimizer of weight decay
    ``Σ_j ‖W_j‖_F²`` over factorizations of ``M``; for depth ``L >= 3`` it is not
    the flattest unless all nonzero singular values are equal (docs/MATH.md).

    Args:
        M: ``(d_L, d_0)``;  widths: ``[d_0, ..., d_L]`` with hidden widths ``>= rank M``.
    """
    L = len(widths) - 1
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    r = int((S > S[0] * torch.finfo(M.dtype).eps * max(M.shape)).sum())
    if r > min(widths[1:-1], default=r):
        raise ValueError(f"hidden widths {widths[1:-1]} must be at least rank M = {r}")
    root = S[:r] ** (1.0 / L)
    if L == 1:
        return [M.clone()]
    W = [torch.zeros(widths[j + 1], widths[j], dtype=M.dtype) for j in range(L)]
    W[0][:r] = root[:, None] * Vh[:r]
    W[-1][:, :r] = U[:, :r] * root
    for j in range(1, L - 1):
        W[j][:r, :r] = torch.diag(root)
    return W
