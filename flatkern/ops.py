"""flatkern's public ops.

Every op takes ``backend=``:

- ``"auto"``: the compiled op ``flatkern::hessian_trace`` (``flatkern/kernels/op.py``), whose
  kernel the dispatcher picks by the tensors' device (C++ on CPU, Triton on CUDA).  Inputs a
  kernel does not take go to the plain-torch reference: half precision on CPU, a zero width,
  widths of 2^20 or more.  Without a kernel for the device (the extension not built, triton
  not installed) "auto" uses the reference too, and says so once.
- ``"torch"``: the plain-torch reference (``flatkern.reference``), always there, and the only
  backend with derivatives of every order.
- ``"cpp"`` / ``"triton"``: that kernel, or an error saying why it cannot run.  ``"triton"``
  also runs on CPU tensors under ``TRITON_INTERPRET=1`` (the Triton interpreter: slow; for tests).

The formulas are in ``docs/MATH.md``.
"""

from __future__ import annotations

import warnings

import torch

from . import reference
from ._checks import check_backend, check_reduction, check_weights
from .kernels import op as _op
from .measurements import Isotropic, Measurements

__all__ = ["end_to_end", "mse_loss", "hessian_trace", "hessian_trace_and_grad", "available_backends"]

_KERNEL_DTYPES = {"cpu": (torch.float32, torch.float64),
                  "cuda": (torch.float16, torch.bfloat16, torch.float32, torch.float64)}
_MAX_WIDTH = 1 << 20  # the C++ kernels index with 32-bit BLAS dimensions
_warned_fallback: set[str] = set()
# the overload's own C++ entry: OpOverload.__call__ is a Python frame around it, a
# measurable part of a d = 30 call (torch.compile gets the overload itself)
_hessian_trace_fast = getattr(_op.hessian_trace, "_op", _op.hessian_trace)
_hessian_trace_and_grad_fast = getattr(_op.hessian_trace_and_grad, "_op", _op.hessian_trace_and_grad)


def _unavailable(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` ("cpp" or "triton") cannot run on ``device`` (``None`` if it can)."""
    if backend == "cpp":
        if _op.CPP_ERROR is not None:
            return _op.CPP_ERROR
        return None if device.type == "cpu" else f"the C++ backend runs on CPU tensors only, got tensors on {device}"
    if _op.TRITON_ERROR is not None:
        return _op.TRITON_ERROR
    return _op._triton.unavailable_reason(device)


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """Backends that can run the trace on ``device``: always ``"torch"``, then ``"cpp"``/``"triton"``."""
    device = torch.device(device)
    return ["torch"] + [b for b in ("cpp", "triton") if _unavailable(b, device) is None]


def _widths_in_range(weights) -> bool:
    if not 0 < weights[0].shape[-1] < _MAX_WIDTH:
        return False
    for w in weights:
        if not 0 < w.shape[-2] < _MAX_WIDTH:
            return False
    return True


# (backend, device type, dtype) -> route, for the part of the choice that depends on nothing else:
# it runs on every call, and a d = 30 problem's whole kernel takes ~20 µs
_routes: dict = {}


def _route(backend: str, weights) -> str:
    """``"ref"``, ``"op"`` (the dispatcher's kernel for the device) or ``"triton"`` (the Triton
    package's eager entry: CPU tensors in the interpreter)."""
    first = weights[0]
    key = (backend, first.device.type, first.dtype)
    route = None if torch.compiler.is_compiling() else _routes.get(key)
    if route is None:
        route = _route_by_device(backend, first)  # raises for a backend that cannot run here
        if not torch.compiler.is_compiling():
            _routes[key] = route
    if route == "ref" or _widths_in_range(weights):
        return route
    if backend == "auto":
        return "ref"
    raise RuntimeError(f'flatkern: backend="{backend}" cannot run here: its kernel does not take a width of 0 '
                       f'or >= 2^20 (widths {[weights[0].shape[-1]] + [w.shape[-2] for w in weights]}); '
                       'backend="torch" can')


def _route_by_device(backend: str, first: torch.Tensor) -> str:
    device = first.device
    if backend == "auto":
        if device.type == "cpu":
            # the op's CPU kernel is the C++ one, or the reference when the extension is missing
            if _op.CPP_ERROR is not None:
                _warn_fallback("cpu", _op.CPP_ERROR)
            return "op" if first.dtype in _KERNEL_DTYPES["cpu"] else "ref"
        reason = _unavailable("triton", device) if device.type == "cuda" else f"no compiled kernel for {device.type}"
        if reason is None:
            return "op" if first.dtype in _KERNEL_DTYPES["cuda"] else "ref"
        _warn_fallback(device.type, reason)
        return "ref"
    if backend == "torch":
        return "ref"
    check_backend(backend)
    reason = _unavailable(backend, device)
    if reason is None and first.dtype not in _KERNEL_DTYPES.get(device.type, ()) and (
            device.type != "cpu" or backend == "cpp"):
        reason = f"its kernel does not take {first.dtype} on {device.type}"
    if reason is not None:
        raise RuntimeError(f'flatkern: backend="{backend}" cannot run here: {reason}; backend="torch" can')
    return "triton" if backend == "triton" and device.type == "cpu" else "op"


def _warn_fallback(device_type: str, reason: str) -> None:
    """Say once per device type that "auto" runs on plain torch, and why."""
    if device_type not in _warned_fallback and not torch.compiler.is_compiling():
        _warned_fallback.add(device_type)
        warnings.warn(f"flatkern: using the plain-torch backend on {device_type}: {reason}", RuntimeWarning,
                      stacklevel=5)


def _contiguous(weights):
    return [w if w.is_contiguous() else w.contiguous() for w in weights]


def _layer_terms(weights, measurements: Measurements, backend: str, *, scale: float, sum_layers: bool,
                 with_end_to_end: bool = False):
    """``(terms, E or None)``: ``scale · c_j`` (``(..., L)``), or ``scale · Σ_j c_j`` (``(...)``) with
    ``sum_layers``, and ``E`` when asked, on the backend ``backend`` resolves to.  Inputs already checked."""
    route = _route(backend, weights)
    if route == "op":
        call = _op.hessian_trace if torch.compiler.is_compiling() else _hessian_trace_fast
        terms, E, _ = call(_contiguous(weights), measurements.family, list(measurements.operands),
                           with_end_to_end, scale, sum_layers)
        return terms, (E if with_end_to_end else None)
    if route == "triton":
        return _op._triton.layer_terms(weights, measurements.family, list(measurements.operands), scale=scale,
                                       sum_layers=sum_layers, with_end_to_end=with_end_to_end)
    if with_end_to_end:
        return reference.layer_terms_and_end_to_end_ref(weights, measurements, scale=scale, sum_layers=sum_layers)
    return reference.layer_terms_ref(weights, measurements, scale=scale, sum_layers=sum_layers), None


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
    # "auto" keeps E in plain torch: one BLAS call per layer already is the floor, and a compiled
    # op would only add dispatch overhead (measured 2x slower at d = 30)
    if backend == "cpp" and _route(backend, weights) == "op":
        return _op.end_to_end(_contiguous(weights))
    if backend not in ("auto", "torch", "triton"):
        check_backend(backend)
    if backend == "triton":
        _route(backend, weights)  # the error if Triton cannot run here; E itself is the cuBLAS chain
    return reference.end_to_end_ref(weights)


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
    targets (docs/MATH.md §The exact trace).

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
    scale = _trace_scale(weights, measurements, reduction)
    # the op applies the scale and the sum: a small problem cannot afford more autograd nodes
    return _layer_terms(weights, measurements, backend, scale=scale, sum_layers=not per_layer)[0]


def _trace_scale(weights, measurements: Measurements, reduction: str) -> float:
    """``ℓ'' = 2`` for the mean, ``2 n`` for the sum (after checking the inputs)."""
    check_reduction(reduction)
    d_L, _ = _check_measurements(measurements, weights)
    return 2.0 if reduction == "mean" else 2.0 * measurements.num_measurements(reduction, d_L)


def hessian_trace_and_grad(weights, measurements: Measurements, *, reduction: str = "mean", per_layer: bool = False,
                           backend: str = "auto"):
    """The trace of the Hessian and its gradient with respect to every weight, in one call.

    The value is ``hessian_trace(weights, measurements, reduction=..., per_layer=...)``; the
    gradients are those of its sum (of the per-layer traces with ``per_layer=True``; summed over
    the batch, so each problem gets its own gradient).  No autograd graph is built: the outputs
    never require grad, and the call works under ``torch.no_grad()`` and
    ``torch.inference_mode()``.  On CPU one fused C++ call (forward and backward back to back); on
    CUDA the Triton forward and backward; with ``backend="torch"``, the reference through autograd.

    Args:
        weights: ``[W_1, ..., W_L]``, ``W_j`` of shape ``(..., d_j, d_{j-1})``.
        measurements, reduction, per_layer, backend: as in ``hessian_trace``.

    Returns:
        ``(trace, grads)``: ``trace`` of shape ``(...)`` (``(..., L)`` with ``per_layer``), and
        ``grads[j]`` shaped like ``weights[j]``.
    """
    weights = check_weights(weights)
    scale = _trace_scale(weights, measurements, reduction)
    route = _route(backend, weights)
    if route == "op":
        call = _op.hessian_trace_and_grad if torch.compiler.is_compiling() else _hessian_trace_and_grad_fast
        trace, grads = call(_contiguous(weights), measurements.family, list(measurements.operands), scale,
                            not per_layer)
        return trace, list(grads)
    if route == "triton":
        trace, grads = _op._triton.hessian_trace_and_grad_eager(weights, measurements.family,
                                                                list(measurements.operands), scale, not per_layer)
        return trace, list(grads)
    return reference.layer_terms_and_grad_ref(weights, measurements, scale=scale, sum_layers=not per_layer)
