"""flatkern's public ops.

Every op takes ``backend=``:

- ``"auto"``: the compiled op ``flatkern::hessian_trace`` (``flatkern/kernels/schemas.py``), whose
  kernel the dispatcher picks by the tensors' device (C++ on CPU, Triton on CUDA).  Inputs a
  kernel does not take go to the plain-torch reference (the kernels' records in
  ``flatkern/kernels/routing.py`` say which: half precision on CPU, a zero width, an empty
  batch, forward-mode derivatives, ``torch.func`` transforms).  Without a kernel for the device
  (the extension not built, triton not installed) "auto" uses the reference too, and says so once.
- ``"torch"``: the plain-torch reference (``flatkern.reference``), always there, and the only
  backend with derivatives of every order and forward-mode derivatives.
- ``"cpp"`` / ``"triton"``: that kernel, or an error saying why it cannot run.  ``"triton"``
  also runs on CPU tensors under ``TRITON_INTERPRET=1`` (the Triton interpreter: slow; for tests).

The formulas are in ``docs/MATH.md``.
"""

from __future__ import annotations

import torch

from . import reference
from ._checks import check_backend, check_reduction, check_weights
from .kernels import families, routing, schemas
from .measurements import Isotropic, Measurements

__all__ = ["end_to_end", "mse_loss", "hessian_trace", "hessian_trace_and_grad", "available_backends",
           "trace_scale", "TraceProblem"]


available_backends = routing.available_backends
trace_scale = reference.trace_scale


def _contiguous(weights):
    return [w if w.is_contiguous() else w.contiguous() for w in weights]


def _layer_terms(weights, measurements: Measurements, backend: str, *, scale: float, sum_layers: bool,
                 with_end_to_end: bool = False):
    """``(terms, E or None)``: ``scale · c_j`` (``(..., L)``), or ``scale · Σ_j c_j`` (``(...)``) with
    ``sum_layers``, and ``E`` when asked, on the route ``backend`` resolves to.  Inputs already checked."""
    route = routing.resolve(backend, weights, measurements.family)
    if route == "op":
        # eager calls skip boxing the arguments; a torch.compile trace must see the op object
        call = schemas.hessian_trace if torch.compiler.is_compiling() else schemas.call_hessian_trace
        terms, E, _ = call(_contiguous(weights), measurements.family, list(measurements.operands),
                           with_end_to_end, scale, sum_layers)
        return terms, (E if with_end_to_end else None)
    if route == "interpret":
        from .kernels.triton import hessian_trace as launchers
        return launchers.layer_terms(weights, measurements.family, list(measurements.operands), scale=scale,
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
    check_backend(backend)
    # "auto" keeps E in plain torch: one BLAS call per layer already is the floor, and a compiled
    # op would only add dispatch overhead (measured 2x slower at d = 30)
    if backend in ("auto", "torch"):
        return reference.end_to_end_ref(weights)
    # the error if the kernel cannot run here (the C++ E has no forward-mode rule; Triton's E is the
    # cuBLAS chain in plain torch, which has every derivative)
    route = routing.resolve(backend, weights, families.ISOTROPIC, transforms=backend == "cpp")
    if backend == "cpp" and route == "op":
        return schemas.end_to_end(_contiguous(weights))
    return reference.end_to_end_ref(weights)


def _check_measurements(measurements, weights) -> tuple[int, int]:
    if not isinstance(measurements, Measurements):
        raise TypeError(f"measurements must be a flatkern measurement family ({families.families_message()}), "
                        f"got {type(measurements).__name__}")
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
    targets (docs/MATH.md §The exact trace).  The layers must be distinct
    parameters: a tensor (or memory) used at two positions is a ValueError, since
    tied layers add cross terms this formula does not have.

    Args:
        weights: ``[W_1, ..., W_L]``, ``W_j`` of shape ``(..., d_j, d_{j-1})``.
        measurements: ``Isotropic()``, ``Entries``, ``RankOne``, ``Dense`` or ``Inputs``.
        reduction: ``"mean"`` or ``"sum"``, as in ``nn.MSELoss``.
        per_layer: return the trace of each diagonal block ``∇²_{W_j} L`` separately.
        backend: ``"auto"``, ``"torch"``, ``"cpp"`` or ``"triton"``.

    Returns:
        Shape ``(...)``, or ``(..., L)`` with ``per_layer=True``; differentiable
        with respect to the weights (first order on the kernels; every order, and
        forward mode, on the reference, which "auto" uses under ``torch.func`` transforms).
    """
    weights = check_weights(weights)
    scale = _checked_scale(weights, measurements, reduction)
    # the op applies the scale and the sum: a small problem cannot afford more autograd nodes
    return _layer_terms(weights, measurements, backend, scale=scale, sum_layers=not per_layer)[0]


def _checked_scale(weights, measurements: Measurements, reduction: str) -> float:
    check_reduction(reduction)
    d_L, _ = _check_measurements(measurements, weights)
    return reference.trace_scale(measurements, reduction, d_L)


def _trace_and_grad(weights, measurements: Measurements, route: str, scale: float, sum_layers: bool):
    if route == "op":
        call = schemas.hessian_trace_and_grad if torch.compiler.is_compiling() else schemas.call_hessian_trace_and_grad
        trace, grads = call(_contiguous(weights), measurements.family, list(measurements.operands), scale,
                            sum_layers)
        return trace, list(grads)
    if route == "interpret":
        from .kernels.triton import hessian_trace as launchers
        return launchers.hessian_trace_and_grad_interpret(weights, measurements.family,
                                                          list(measurements.operands), scale, sum_layers)
    return reference.layer_terms_and_grad_ref(weights, measurements, scale=scale, sum_layers=sum_layers)


def hessian_trace_and_grad(weights, measurements: Measurements, *, reduction: str = "mean", per_layer: bool = False,
                           backend: str = "auto"):
    """The trace of the Hessian and its gradient with respect to every weight, in one call.

    The value is ``hessian_trace(weights, measurements, reduction=..., per_layer=...)``; the
    gradients are those of its sum (of the per-layer traces with ``per_layer=True``; summed over
    the batch, so each problem gets its own gradient).  No autograd graph is built: the outputs
    never require grad, and the call works under ``torch.no_grad()`` and
    ``torch.inference_mode()``.  On CPU one fused C++ call (forward and backward back to back); on
    CUDA the Triton forward and backward; with ``backend="torch"``, the reference through autograd.
    A caller that asks every step for the same problem can check it once: ``TraceProblem``.

    Args:
        weights: ``[W_1, ..., W_L]``, ``W_j`` of shape ``(..., d_j, d_{j-1})``.
        measurements, reduction, per_layer, backend: as in ``hessian_trace``.

    Returns:
        ``(trace, grads)``: ``trace`` of shape ``(...)`` (``(..., L)`` with ``per_layer``), and
        ``grads[j]`` shaped like ``weights[j]``.
    """
    weights = check_weights(weights)
    scale = _checked_scale(weights, measurements, reduction)
    route = routing.resolve(backend, weights, measurements.family)
    return _trace_and_grad(weights, measurements, route, scale, not per_layer)


class TraceProblem:
    """A validated problem for repeated ``hessian_trace_and_grad`` calls (an optimizer's every step).

    Built once from the weights, the measurements, ``reduction``, ``per_layer`` and ``backend``: the
    weights (chain, dtypes, devices, distinct parameters), the measurements against them, the scale
    and the route are checked here, once.  Each call then re-checks only what can change between
    steps: the weights' shapes, dtype and device (a tuple comparison); anything else about them is
    what it was (same list, same tensors).  A change of shape, dtype or device re-validates in full.

        problem = TraceProblem(weights, measurements)
        trace, grads = problem(weights)          # == hessian_trace_and_grad(weights, measurements)

    Args:
        weights: ``[W_1, ..., W_L]``, ``W_j`` of shape ``(..., d_j, d_{j-1})``.
        measurements, reduction, per_layer, backend: as in ``hessian_trace``.
    """

    def __init__(self, weights, measurements: Measurements, *, reduction: str = "mean", per_layer: bool = False,
                 backend: str = "auto"):
        check_backend(backend)
        self.measurements, self.reduction, self.per_layer, self.backend = measurements, reduction, per_layer, backend
        self._validate(weights)

    def _validate(self, weights) -> None:
        weights = check_weights(weights)
        self.scale = _checked_scale(weights, self.measurements, self.reduction)
        self._key = self._signature(weights)
        self._ids = [id(w) for w in weights]
        self._shapes = [w.shape for w in weights]
        # the route's static part (device, dtype, family) is fixed with the key; shapes are in the key
        self.route = routing.resolve(self.backend, weights, self.measurements.family)
        self._operands = list(self.measurements.operands)  # derived once by the measurements themselves

    @staticmethod
    def _signature(weights):
        first = weights[0]
        return (first.dtype, first.device, [w.shape for w in weights])  # a list: no generator frame per call

    def _route(self, weights) -> str:
        if (type(weights) is not list or [id(w) for w in weights] != self._ids
                or self._signature(weights) != self._key):
            self._validate(weights)
        route = self.route
        if route != "op" or torch.compiler.is_compiling() or routing.transform_active() is not None:
            # what the validation cannot fix for later calls: a transform or a graph around this one
            route = routing.resolve(self.backend, weights, self.measurements.family)
        return route

    def __call__(self, weights):
        """``(trace, grads)`` at ``weights`` (the same tensors, or ones of the same shapes, dtype and device)."""
        route = self._route(weights)
        return _trace_and_grad(weights, self.measurements, route, self.scale, not self.per_layer)

    def accumulate(self, weights, into, alpha: float) -> torch.Tensor:
        """``into[j] += alpha · ∂ tr/∂W_j`` for every layer, in place; returns the trace.

        What an optimizer does with the gradient (``p.grad += lam · ∂ tr/∂p``), without the
        gradient tensors: on CPU the C++ kernel adds into ``into`` itself (one call, no dispatcher,
        no ``_foreach_add_``).  ``into[j]`` must have ``weights[j]``'s shape, dtype and device and
        must not require grad (a ``RuntimeError`` naming it otherwise, before anything changes);
        its version counter is bumped, as by ``add_``.

        Args:
            weights: as for ``__call__``.
            into: ``[G_1, ..., G_L]``, ``G_j`` shaped like ``weights[j]``.
            alpha: the factor (a Python float).

        Returns:
            The trace, shape ``(...)`` (``(..., L)`` with ``per_layer``).
        """
        call = schemas.call_hessian_trace_and_grad_into
        if (call is not None and self.route == "op" and type(weights) is list
                and [id(w) for w in weights] == self._ids and [w.shape for w in weights] == self._shapes
                and not torch.compiler.is_compiling()):
            # every optimizer step: the validated tensors themselves (not a torch.func wrapper or a dual),
            # of the validated shapes (the scale's d_L), on the op's route; the op and the add into `into`
            # in one C++ call, which goes through the dispatcher whenever a transform, mode, other
            # device or dtype needs it (and makes non-contiguous weights contiguous itself)
            return call(weights, self.measurements.family, self._operands, self.scale, not self.per_layer, into,
                        alpha)[0]
        route = self._route(weights)
        trace, grads = _trace_and_grad(weights, self.measurements, route, self.scale, not self.per_layer)
        if len(into) != len(grads):
            raise RuntimeError(f"flatkern: into has {len(into)} tensors but weights has {len(grads)} layers")
        for j, (g, t) in enumerate(zip(into, grads)):
            if not isinstance(g, torch.Tensor) or g.shape != t.shape or g.dtype != t.dtype or g.device != t.device \
                    or g.requires_grad:
                raise RuntimeError(f"flatkern: into[{j}] must match weights[{j}] (shape {tuple(t.shape)}, {t.dtype}, "
                                   f"{t.device}) and not require grad, got "
                                   + (f"{tuple(g.shape)}, {g.dtype}, {g.device}, requires_grad={g.requires_grad}"
                                      if isinstance(g, torch.Tensor) else type(g).__name__))
        with torch.no_grad():
            torch._foreach_add_(list(into), grads, alpha=alpha)
        return trace
