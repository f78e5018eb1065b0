"""The flatness-regularized objective ``L(W) + lam · tr ∇²L(W)`` from one pass over the chain.

The loss needs ``E = W_L Q_L`` and the trace needs every prefix product
``Q_j`` (and suffix ``P_j``): computing them once serves both, and one
``backward()`` of the sum gives the regularized gradient.
"""

from __future__ import annotations

import torch

from . import ops, reference
from ._checks import check_backend, check_reduction, check_weights
from .measurements import Measurements

__all__ = ["objective", "layer_terms_and_end_to_end_ref"]

_FUSED = "layer_terms_and_end_to_end"


def layer_terms_and_end_to_end_ref(weights: list[torch.Tensor], measurements: Measurements):
    """``(layer_terms_ref(weights, measurements), E)`` in plain torch with the chain products formed once.

    ``terms``: ``(..., L)``, ``c_j = (1/n) Σ_i ‖P_jᵀ A_i Q_jᵀ‖_F²``; ``E = W_L Q_L``: ``(..., d_L, d_0)``.
    """
    d_L, d_0 = weights[-1].shape[-2], weights[0].shape[-1]
    batch = weights[0].shape[:-2]
    P, Q = reference.chain_products_ref(weights)
    # E from the prefix chain already formed: one more product instead of L - 1
    E = weights[0] if Q[-1] is None else weights[-1] @ Q[-1]
    terms = []
    for Pj, Qj in zip(P, Q):
        c = measurements.contract(Pj, Qj, d_L, d_0)
        if Pj is None and Qj is None:  # depth 1: a constant, kept attached to W_1 (as layer_terms_ref does)
            c = torch.as_tensor(c, dtype=E.dtype, device=E.device) + (weights[0] * 0).sum((-2, -1))
        terms.append(c.expand(batch) if c.dim() == 0 else c)
    return torch.stack(terms, dim=-1), E


_auto_modules: dict = {}


def _fused(backend: str, device: torch.device):
    """The function computing ``(terms, E)`` for ``backend`` on ``device``."""
    if backend == "auto":
        # which kernel module serves a device does not change while the process runs: look it up once
        if device not in _auto_modules:
            preferred = ops._AUTO_BY_DEVICE.get(device.type)
            ok = preferred is not None and ops._unavailable(preferred, _FUSED, device) is None
            _auto_modules[device] = ops._kernel_module(preferred)[0] if ok else None
        module = _auto_modules[device]
        # plain torch sharing the chain: the right thing, not a degraded fallback, when no fused kernel exists
        return layer_terms_and_end_to_end_ref if module is None else getattr(module, _FUSED)
    check_backend(backend)
    if backend == "torch":
        return layer_terms_and_end_to_end_ref
    reason = ops._unavailable(backend, _FUSED, device)
    if reason is None:
        return getattr(ops._kernel_module(backend)[0], _FUSED)
    if ops._unavailable(backend, "layer_terms", device) is None and ops._unavailable(backend, "end_to_end", device) is None:
        # the named backend without a fused kernel: its two ops, each forming the prefix chain
        module = ops._kernel_module(backend)[0]
        return lambda weights, measurements: (module.layer_terms(weights, measurements), module.end_to_end(weights))
    raise RuntimeError(f'flatkern: backend="{backend}" is not available for objective: {reason}')


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
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a tensor, got {type(targets).__name__}")
    expected = measurements.target_shape(d_L, d_0)
    if targets.dim() < len(expected) or tuple(targets.shape[targets.dim() - len(expected):]) != expected:
        raise ValueError(
            f"targets has shape {tuple(targets.shape)} but {measurements!r} on E of shape ({d_L}, {d_0}) "
            f"needs (..., {', '.join(map(str, expected))})"
        )
    # trace = scale · Σ_j c_j: "mean" 2, "sum" 2n (raises early if n is unknown)
    scale = 2.0 * (measurements.num_measurements(reduction, d_L) if reduction == "sum" else 1)
    terms, E = _fused(backend, weights[0].device)(weights, measurements)
    total = terms.sum(-1)
    data = reference.mse_loss_ref(E, measurements, targets.to(E.dtype), reduction)
    # the scale folded into one add: small problems are dispatch-bound, and backward
    # never visits the (separate) op that forms the returned trace
    loss = data + (lam * scale) * total if isinstance(lam, torch.Tensor) else torch.add(data, total, alpha=lam * scale)
    return loss, total * scale
