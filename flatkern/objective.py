"""The flatness-regularized objective ``L(W) + lam · tr ∇²L(W)`` from one pass over the chain.

The loss needs ``E = W_L Q_L`` and the trace needs every prefix product
``Q_j`` (and suffix ``P_j``): computing them once serves both, and one
``backward()`` of the sum gives the regularized gradient.
"""

from __future__ import annotations

import math
import numbers

import torch

from . import ops, reference
from ._checks import check_reduction, check_weights
from .measurements import Measurements

__all__ = ["objective", "check_lam"]


def check_lam(lam, name: str = "lam") -> float:
    """``lam`` as a Python float: a real number (int, float, numpy scalar), finite and ``>= 0``.

    A bool or a non-number is a ``TypeError``; NaN, inf or a negative value a
    ``ValueError``; both name ``name``.
    """
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real):
        raise TypeError(f"{name} must be a number (a finite float >= 0), got {lam!r} ({type(lam).__name__})")
    out = float(lam)
    if not 0.0 <= out < math.inf:  # NaN fails both comparisons
        raise ValueError(f"{name} must be a finite number >= 0, got {out!r}")
    return out


def _raise_unless_valid_lam(lam: torch.Tensor) -> None:
    with torch.no_grad():
        ok = bool(((lam >= 0) & (lam < math.inf)).all())  # NaN fails both comparisons
    if not ok:
        raise ValueError(f"lam must be finite and >= 0 everywhere, got {lam.detach()}")


@torch.library.custom_op("flatkern::checked_lam", mutates_args=())
def _checked_lam(lam: torch.Tensor) -> torch.Tensor:
    """``lam`` itself (a copy), or a ``ValueError`` if an entry is negative, NaN or inf.

    The check reads the values, which a compiled graph cannot do while it is traced: as an
    opaque op it runs when the graph runs, so ``torch.compile(fullgraph=True)`` raises the
    eager error instead of returning ``data + lam · trace`` for a bad ``lam``.
    """
    _raise_unless_valid_lam(lam)
    return lam.clone()


@_checked_lam.register_fake
def _(lam):
    return torch.empty_like(lam)


_checked_lam.register_autograd(lambda ctx, grad: grad)  # the identity, where lam is valid


def _check_lam_tensor(lam: torch.Tensor) -> torch.Tensor:
    """``lam`` (a tensor) once checked: real, and finite and ``>= 0`` in every entry."""
    if lam.dtype == torch.bool or lam.is_complex():
        raise TypeError(f"lam must be a real tensor, got dtype {lam.dtype}")
    if torch.compiler.is_compiling():
        return _checked_lam(lam)
    # eager: one reduction and one read, without the op's dispatch and copy
    _raise_unless_valid_lam(lam)
    return lam


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
    data loss alone is ``loss - lam * trace``.  One call of the op
    ``flatkern::hessian_trace`` (``with_end_to_end=True``) gives ``E`` and the
    trace: the C++ or Triton kernel by device, or plain torch forming the chain
    products once and deriving both from them.

    Args:
        weights: ``[W_1, ..., W_L]``, ``W_j`` of shape ``(..., d_j, d_{j-1})``.
        measurements: a measurement family (``flatkern.measurements``).
        targets: as in ``flatkern.mse_loss``: ``(..., n)``; ``(..., N, d_L)`` for ``Inputs``;
            ``(..., d_L, d_0)`` for ``Isotropic``.
        lam: regularization strength, finite and ``>= 0`` (a number, or a tensor broadcasting
            against ``(...)``); anything else raises, naming ``lam``, in eager and compiled alike
            (compiled, a tensor's values are checked when the graph runs, by the op
            ``flatkern::checked_lam``).
        reduction: ``"mean"`` or ``"sum"``, as in ``nn.MSELoss``; applies to both terms.
        backend: ``"auto"``, ``"torch"``, ``"cpp"`` or ``"triton"``.

    Returns:
        ``(loss, trace)``, each of shape ``(...)`` and differentiable with respect to the weights.
    """
    weights = check_weights(weights)
    check_reduction(reduction)
    if isinstance(lam, torch.Tensor):
        lam = _check_lam_tensor(lam)
    else:
        lam = check_lam(lam)
    d_L, d_0 = ops._check_measurements(measurements, weights)
    ops._check_targets(targets, measurements, d_L, d_0)
    # trace = scale · Σ_j c_j: "mean" 2, "sum" 2n (raises early if n is unknown)
    scale = 2.0 * (measurements.num_measurements(reduction, d_L) if reduction == "sum" else 1)
    # the op applies the scale and the sum over layers and forms E in the same pass
    trace, E = ops._layer_terms(weights, measurements, backend, scale=scale, sum_layers=True, with_end_to_end=True)
    data = reference.mse_loss_ref(E, measurements, targets.to(E.dtype), reduction)
    # one add: small problems are dispatch-bound
    loss = data + lam * trace if isinstance(lam, torch.Tensor) else torch.add(data, trace, alpha=lam)
    return loss, trace
