"""The flatness-regularized objective ``L(W) + lam · tr ∇²L(W)`` from one pass over the chain.

The loss needs ``E = W_L Q_L`` and the trace needs every prefix product
``Q_j`` (and suffix ``P_j``): computing them once serves both, and one
``backward()`` of the sum gives the regularized gradient.
"""

from __future__ import annotations

import torch

from . import ops, reference
from ._checks import check_reduction, check_weights
from .measurements import Measurements

__all__ = ["objective"]


def objective(
    weights,
    measurements: Measurements,
    targets: torch.Tensor,
    *,
    lam: float,
    reduction: str = "mean",
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The regularized loss ``mse_loss + lam · hessian_trace`` and the trace, from one pass.

        loss  = L(W) + lam · tr ∇²L(W)
        L(W)  = (1/n) Σ_i (<A_i, E> - b_i)²                 ("sum" drops 1/n)
        tr    = (2/n) Σ_i Σ_j ‖P_jᵀ A_i Q_jᵀ‖_F²            ("sum" drops 1/n)

    ``loss.backward()`` is the one backward of the regularized objective; the
    data loss alone is ``loss - lam * trace``.  On CPU with ``backend="auto"``
    the C++ kernel ``layer_terms_and_end_to_end`` computes ``E`` and the trace
    in one call when it is built; otherwise plain torch forms the chain
    products once and derives both from them.

    Args:
        weights: ``[W_1, ..., W_L]``, ``W_j`` of shape ``(..., d_j, d_{j-1})``.
        measurements: a measurement family (``Isotropic``, ``Entries``, ``RankOne``, ``Dense``, ``Inputs``).
        targets: as in ``flatkern.mse_loss``: ``(..., n)``; ``(..., N, d_L)`` for ``Inputs``;
            ``(..., d_L, d_0)`` for ``Isotropic``.
        lam: regularization strength (a number, or a tensor broadcasting against ``(...)``).
        reduction: ``"mean"`` or ``"sum"``, as in ``nn.MSELoss``; applies to both terms.
        backend: ``"auto"``, ``"torch"``, ``"cpp"`` or ``"triton"``.

    Returns:
        ``(loss, trace)``, each of shape ``(...)`` and differentiable with respect to the weights.
    """
    weights = check_weights(weights)
    check_reduction(reduction)
    if isinstance(lam, bool) or not isinstance(lam, (int, float, torch.Tensor)):
        raise TypeError(f"lam must be a number or a tensor, got {type(lam).__name__}")
    d_L, d_0 = ops._check_measurements(measurements, weights)
    ops._check_targets(targets, measurements, d_L, d_0)
    # trace = scale · Σ_j c_j: "mean" 2, "sum" 2n (raises early if n is unknown)
    scale = 2.0 * (measurements.num_measurements(reduction, d_L) if reduction == "sum" else 1)
    # the backend applies the scale and the sum over layers (the C++ kernel inside its one op)
    fused = ops._resolve(backend, "layer_terms_and_end_to_end", weights[0].device)
    trace, E = fused(weights, measurements, scale=scale, sum_layers=True)
    data = reference.mse_loss_ref(E, measurements, targets.to(E.dtype), reduction)
    # one add: small problems are dispatch-bound
    loss = data + lam * trace if isinstance(lam, torch.Tensor) else torch.add(data, trace, alpha=lam)
    return loss, trace
