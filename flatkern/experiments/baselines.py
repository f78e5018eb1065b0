"""Baselines that are not trained networks: the convex program and the balanced factorization."""

from __future__ import annotations

import numpy as np
import torch

from ..measurements import Dense, Entries, Measurements

__all__ = ["nuclear_norm_solution", "balanced_factorization"]


def nuclear_norm_solution(measurements: Measurements, targets: torch.Tensor, shape: tuple[int, int], *, return_status: bool = False):
    """``argmin ‖X‖_*  s.t.  <A_i, X> = b_i`` for all ``i``, solved by cvxpy (Clarabel, an interior-point SDP solver).

    Args:
        measurements: ``Dense`` (Gaussian sensing) or ``Entries`` (completion).
        targets: ``(n,)`` measured values ``b``.
        shape: ``(d_L, d_0)`` of ``X``.

    Returns:
        ``X`` of shape ``(d_L, d_0)``, float64; with ``return_status``, ``(X, status)``
        where ``status`` is cvxpy's (``"optimal"`` or ``"optimal_inaccurate"``).
    """
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
