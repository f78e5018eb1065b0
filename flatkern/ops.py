"""flatkern's public ops and their backend dispatch.

Every op takes ``backend=``:

- ``"auto"``: the best backend available for the tensors' device (C++ on CPU,
  Triton on CUDA), falling back quietly to plain torch (said once);
- ``"torch"``: the plain-torch reference (``flatkern.reference``), always there;
- ``"cpp"`` / ``"triton"``: that backend, or an error saying why it cannot run.
"""

from __future__ import annotations

import importlib
import warnings

import torch

from . import reference
from ._checks import check_backend, check_reduction, check_weights
from .measurements import Isotropic, Measurements

__all__ = ["end_to_end", "mse_loss", "hessian_trace", "available_backends"]

# backend name -> module in flatkern.kernels implementing its ops
_KERNEL_MODULES = {"cpp": "flatkern.kernels.cpp", "triton": "flatkern.kernels.triton_chain"}
_AUTO_BY_DEVICE = {"cpu": "cpp", "cuda": "triton"}
# ops whose plain-torch form already is the floor (one BLAS call per layer):
# a compiled kernel only adds dispatch overhead, so "auto" keeps them in torch
_AUTO_TORCH_OPS = {"end_to_end"}
_warned_fallback: set[str] = set()
# (backend, op, device) -> the module whose ``op`` serves it: resolving costs
# more than a small problem's kernel, and the answer never changes in a process
_resolved: dict = {}


def _kernel_module(backend: str):
    try:
        return importlib.import_module(_KERNEL_MODULES[backend]), None
    except ImportError as exc:  # e.g. triton not installed
        return None, f"the {backend} backend cannot be imported ({exc})"


def _unavailable(backend: str, op: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run ``op`` on ``device`` (``None`` if it can)."""
    module, reason = _kernel_module(backend)
    if module is None:
        return reason
    reason = module.unavailable_reason(device)
    if reason is None and not hasattr(module, op):
        reason = f"the {backend} backend has no kernel for {op}"
    return reason


def _resolve(backend: str, op: str, device: torch.device):
    """The function implementing ``op`` for ``backend`` on ``device``."""
    module = _resolved.get((backend, op, device)) if isinstance(backend, str) else None
    if module is None:
        module = _resolve_module(backend, op, device)
        _resolved[(backend, op, device)] = module
    # looked up per call, so that a patched or reloaded module takes effect
    return getattr(module, f"{op}_ref" if module is reference else op)


def _resolve_module(backend: str, op: str, device: torch.device):
    check_backend(backend)
    if backend == "torch" or (backend == "auto" and op in _AUTO_TORCH_OPS):
        return reference
    if backend == "auto":
        preferred = _AUTO_BY_DEVICE.get(device.type)
        reason = _unavailable(preferred, op, device) if preferred else f"no compiled backend for {device.type}"
        if reason is None:
            return _kernel_module(preferred)[0]
        if preferred is not None and preferred not in _warned_fallback:
            _warned_fallback.add(preferred)
            warnings.warn(f"flatkern: using the plain-torch backend on {device.type}: {reason}", RuntimeWarning, stacklevel=4)
        return reference
    reason = _unavailable(backend, op, device)
    if reason is not None:
        raise RuntimeError(f'flatkern: backend="{backend}" is not available for {op}: {reason}')
    return _kernel_module(backend)[0]


def available_backends(device: str | torch.device = "cpu", op: str = "layer_terms") -> list[str]:
    """Backends that can run ``op`` (default: the trace) on ``device``."""
    device = torch.device(device)
    return ["torch"] + [b for b in _KERNEL_MODULES if _unavailable(b, op, device) is None]


def end_to_end(weights, *, backend: str = "auto") -> torch.Tensor:
    """The end-to-end matrix ``E = W_L ⋯ W_1`` of a deep linear network.

    Args:
        weights: sequence ``[W_1, ..., W_L]``, ``W_j`` of shape ``(..., d_j, d_{j-1})``;
            leading dims are independent problems.
        backend: ``"auto"``, ``"torch"``, ``"cpp"`` or ``"triton"``.

    Returns:
        ``E`` of shape ``(..., d_L, d_0)``, differentiable with respect to the weights.
    """
    weights = check_weights(weights)
    return _resolve(backend, "end_to_end", weights[0].device)(weights)


def _check_measurements(measurements, weights) -> tuple[int, int]:
    if not isinstance(measurements, Measurements):
        raise TypeError(
            "measurements must be a flatkern measurement family (Isotropic, Entries, RankOne, Dense, Inputs), "
            f"got {type(measurements).__name__}"
        )
    d_L, d_0 = weights[-1].shape[-2], weights[0].shape[-1]
    measurements.check(d_L, d_0, weights[0])
    return d_L, d_0


def _check_targets(targets, measurements: Measurements, d_L: int, d_0: int) -> None:
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a tensor, got {type(targets).__name__}")
    expected = measurements.target_shape(d_L, d_0)
    if targets.dim() < len(expected) or tuple(targets.shape[targets.dim() - len(expected):]) != expected:
        raise ValueError(
            f"targets has shape {tuple(targets.shape)} but {measurements!r} on E of shape ({d_L}, {d_0}) "
            f"needs (..., {', '.join(map(str, expected))})"
        )


def mse_loss(weights, measurements: Measurements, targets: torch.Tensor, reduction: str = "mean", *, backend: str = "auto") -> torch.Tensor:
    """``nn.MSELoss`` of the measurements of ``E = W_L ⋯ W_1`` against ``targets``.

    ``reduction="mean"``: ``(1/n) Σ_i (<A_i, E> - b_i)²``; ``"sum"``: ``Σ_i (...)²``.
    For ``Isotropic`` the mean loss is ``‖E - M‖_F²`` (``targets = M``).

    Args:
        weights: ``[W_1, ..., W_L]``, ``W_j`` of shape ``(..., d_j, d_{j-1})``.
        measurements: a measurement family.
        targets: ``(..., n)``; ``(..., N, d_L)`` for ``Inputs``; ``(..., d_L, d_0)`` for ``Isotropic``.
            Leading dims broadcast against the weights' batch dims.

    Returns:
        The loss, shape ``(...)``.
    """
    weights = check_weights(weights)
    check_reduction(reduction)
    d_L, d_0 = _check_measurements(measurements, weights)
    _check_targets(targets, measurements, d_L, d_0)
    if reduction == "sum" and isinstance(measurements, Isotropic):
        measurements.num_measurements(reduction, d_L)  # raises if n is unknown
    E = end_to_end(weights, backend=backend)
    return reference.mse_loss_ref(E, measurements, targets.to(E.dtype), reduction)


def hessian_trace(weights, measurements: Measurements, *, reduction: str = "mean", per_layer: bool = False, backend: str = "auto") -> torch.Tensor:
    """Exact trace of the Hessian of ``mse_loss(weights, measurements, ·, reduction)``.

        tr ∇²L(W) = (2/n) Σ_i Σ_j ‖P_jᵀ A_i Q_jᵀ‖_F²     (reduction="mean"; "sum" drops 1/n)

    with ``P_j = W_L ⋯ W_{j+1}`` and ``Q_j = W_{j-1} ⋯ W_1``.  The Hessian is
    taken with respect to all layer weights; the trace does not depend on the
    targets (MATH.md).

    Args:
        weights: ``[W_1, ..., W_L]``, ``W_j`` of shape ``(..., d_j, d_{j-1})``.
        measurements: ``Isotropic()``, ``Entries``, ``RankOne``, ``Dense`` or ``Inputs``.
        reduction: ``"mean"`` or ``"sum"``, as in ``nn.MSELoss``.
        per_layer: return the trace of each diagonal block ``∇²_{W_j} L`` separately.
        backend: ``"auto"``, ``"torch"``, ``"cpp"`` or ``"triton"``.

    Returns:
        Shape ``(...)``, or ``(..., L)`` with ``per_layer=True``; differentiable
        with respect to the weights.
    """
    weights = check_weights(weights)
    check_reduction(reduction)
    d_L, _ = _check_measurements(measurements, weights)
    scale = 2.0 if reduction == "mean" else 2.0 * measurements.num_measurements(reduction, d_L)
    # the backend applies the scale and the sum: the C++ kernel folds both into its one op
    layer_terms = _resolve(backend, "layer_terms", weights[0].device)
    return layer_terms(weights, measurements, scale=scale, sum_layers=not per_layer)
