"""The inductive bias of flatness for deep linear networks (docs/MATH.md, the theorem).

For a target ``M`` of shape ``(d_L, d_0)`` and hidden widths ``>= rank M``:

    min_{W : E(W) = M} Σ_j ‖P_j‖_F² ‖Q_j‖_F² = L (d_0 d_L)^{1/L} ‖M‖_*^{2(L-1)/L}

so the minimum trace of the ``Isotropic`` Hessian (MSE, mean) is twice that,
and the flattest interpolator is the minimum-nuclear-norm one for every depth.
"""

from __future__ import annotations

import torch

from ._checks import check_int
from ._checks import check_widths as _check_widths  # the one rule for widths (flattest_solution imports it from here)

__all__ = ["flatness_lower_bound", "flattest_factorization"]


def _check_matrix(M, name="M") -> None:
    if not isinstance(M, torch.Tensor) or not M.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor of shape (..., d_L, d_0), got {type(M).__name__}"
                        + (f" of dtype {M.dtype}" if isinstance(M, torch.Tensor) else ""))
    if M.dim() < 2:
        raise ValueError(f"{name} must have shape (..., d_L, d_0), got {tuple(M.shape)}")


def flatness_lower_bound(M: torch.Tensor, depth: int) -> torch.Tensor:
    """Minimum of the ``Isotropic`` trace of the Hessian over depth-``depth`` factorizations of ``M``.

        2 L (d_0 d_L)^{1/L} ‖M‖_*^{2 - 2/L}        (MSE, reduction="mean")

    Args:
        M: ``(..., d_L, d_0)``.
        depth: number of layers ``L >= 1`` (an int or numpy integer).

    Returns:
        Shape ``(...)``.  Attained by ``flattest_factorization`` when the hidden
        widths are at least ``rank M``.
    """
    _check_matrix(M)
    depth = check_int(depth, "depth", minimum=1)
    d_L, d_0 = M.shape[-2], M.shape[-1]
    nuc = torch.linalg.matrix_norm(M, ord="nuc")
    return 2 * depth * (d_0 * d_L) ** (1 / depth) * nuc ** (2 - 2 / depth)


def flattest_factorization(M: torch.Tensor, widths, *, rtol: float | None = None) -> list[torch.Tensor]:
    """Weights ``[W_1, ..., W_L]`` with ``W_L ⋯ W_1 = M`` whose ``Isotropic`` trace is ``flatness_lower_bound``.

    With ``M = U Σ Vᵀ`` (rank ``r``) and ``β = (‖M‖_* / √(d_0 d_L))^{1/L}`` (docs/MATH.md):
    ``W_1 = (d_0/d_L)^{1/4} β^{1-L/2} [Σ^{1/2} Vᵀ; 0]``, ``W_j = β diag(I_r, 0)``,
    ``W_L = (d_L/d_0)^{1/4} β^{1-L/2} [U Σ^{1/2}, 0]``.

    Args:
        M: ``(d_L, d_0)`` (unbatched).
        widths: all layer widths ``[d_0, d_1, ..., d_L]``, ints (``d_0``, ``d_L`` must match ``M``);
            hidden widths must be at least ``rank M``.
        rtol: singular values below ``rtol * σ_max`` count as zero (default: dtype eps × max(d)).

    Returns:
        List of ``L = len(widths) - 1`` tensors, ``W_j`` of shape ``(d_j, d_{j-1})``.
    """
    _check_matrix(M)
    if M.dim() != 2:
        raise ValueError(f"flattest_factorization takes one matrix M of shape (d_L, d_0), got {tuple(M.shape)}")
    widths = _check_widths(widths)
    d_L, d_0 = M.shape
    if widths[0] != d_0 or widths[-1] != d_L:
        raise ValueError(f"widths {widths} must start with d_0={d_0} and end with d_L={d_L} for M of shape {tuple(M.shape)}")
    L = len(widths) - 1
    if L == 1:
        return [M.clone()]
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    tol = (rtol if rtol is not None else torch.finfo(M.dtype).eps * max(d_0, d_L)) * (S[0] if S.numel() else 0)
    r = int((S > tol).sum())
    hidden = widths[1:-1]
    if r > min(hidden):
        raise ValueError(f"hidden widths {hidden} must be at least rank M = {r}")
    zeros = [torch.zeros(widths[j + 1], widths[j], dtype=M.dtype, device=M.device) for j in range(L)]
    if r == 0:
        return zeros
    U, S, Vh = U[:, :r], S[:r], Vh[:r]
    beta = (S.sum() / (d_0 * d_L) ** 0.5) ** (1 / L)
    end = beta ** (1 - L / 2)
    W = zeros
    W[0][:r] = (d_0 / d_L) ** 0.25 * end * S.sqrt()[:, None] * Vh
    W[-1][:, :r] = (d_L / d_0) ** 0.25 * end * U * S.sqrt()
    for j in range(1, L - 1):
        W[j][:r, :r] = beta * torch.eye(r, dtype=M.dtype, device=M.device)
    return W
