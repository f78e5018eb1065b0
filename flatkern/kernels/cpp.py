"""Python side of the C++ extension ``flatkern._C``: loading and autograd.

The ops themselves are declared in ``csrc/flatkern.cpp`` and their CPU
kernels live in ``csrc/cpu/<op>_cpu.cpp``; importing ``flatkern._C`` registers
them as ``torch.ops.flatkern.<op>``.  This module registers their fake
(shape) kernels and the autograd formula of ``end_to_end`` (the trace ops
register theirs in C++), encodes the measurement families for the kernels,
and says why the extension is unavailable when it is.
"""

from __future__ import annotations

import torch

from ..measurements import Dense, Entries, Inputs, Isotropic, Measurements, RankOne

try:
    from .. import _C  # noqa: F401  (registers torch.ops.flatkern.*)

    _LOAD_ERROR: str | None = None
except ImportError as exc:  # not built, or built against another torch
    _LOAD_ERROR = (
        f"the C++ extension flatkern._C is not importable ({exc}); reinstall with "
        "`pip install --no-build-isolation .` against the installed torch"
    )


def unavailable_reason(device: torch.device) -> str | None:
    """``None`` if the C++ backend can run on ``device``, else why not."""
    if _LOAD_ERROR is not None:
        return _LOAD_ERROR
    if device.type != "cpu":
        return f"the C++ backend runs on CPU tensors only, got tensors on {device}"
    return None


# ---------------------------------------------------------------- end_to_end


def end_to_end(weights: list[torch.Tensor]) -> torch.Tensor:
    """``E = W_L ⋯ W_1`` by the C++ kernel, differentiable.  ``weights``: ``(..., d_j, d_{j-1})``."""
    return torch.ops.flatkern.end_to_end(weights)


def _end_to_end_setup_context(ctx, inputs, output):
    (weights,) = inputs
    ctx.save_for_backward(*weights)


def _end_to_end_backward(ctx, grad_E):
    # dE/dW_j contracted with G: P_jᵀ G Q_jᵀ, by reverse accumulation along
    # the suffix chain (G_j = P_jᵀ G) and the stored prefix products Q_j.
    weights = ctx.saved_tensors
    L = len(weights)
    Q = [None] * L
    for j in range(1, L):
        Q[j] = weights[j - 1] if Q[j - 1] is None else weights[j - 1] @ Q[j - 1]
    grads = [None] * L
    G = grad_E
    for j in range(L - 1, -1, -1):
        grads[j] = G if Q[j] is None else G @ Q[j].transpose(-1, -2)
        if j > 0:
            G = weights[j].transpose(-1, -2) @ G
    return (grads,)


if _LOAD_ERROR is None:
    torch.library.register_autograd(
        "flatkern::end_to_end", _end_to_end_backward, setup_context=_end_to_end_setup_context
    )

    @torch.library.register_fake("flatkern::end_to_end")
    def _end_to_end_fake(weights):
        return weights[0].new_empty((*weights[0].shape[:-2], weights[-1].shape[-2], weights[0].shape[-1]))


# ------------------------------------------------------- hessian_layer_terms
#
# One fused C++ call per direction: flatkern::hessian_layer_terms forms both
# chains and the per-layer contractions (and E on request) and returns a
# buffer of what its backward needs; flatkern::hessian_layer_terms_backward
# accumulates the gradients back along both chains.  The measurement family is
# passed as an int and at most two tensors (csrc/cpu/hessian_trace_cpu.cpp).

_ISOTROPIC, _ENTRIES, _RANK_ONE, _DENSE, _DENSE_KERNEL, _INPUTS = range(6)


def _cached(measurements: Measurements, name: str, source: torch.Tensor, make):
    """``make()`` cached on the measurements object until ``source`` changes (in place or rebound)."""
    key = (source.data_ptr(), source._version, source.dtype)
    hit = getattr(measurements, name, None)
    if hit is not None and hit[0] == key:
        return hit[1]
    value = make()
    setattr(measurements, name, (key, value))
    return value


def _encode(measurements: Measurements, d_L: int, d_0: int):
    """``(family, a, b)``: the measurement family as the C++ op takes it."""
    if isinstance(measurements, Isotropic):
        return _ISOTROPIC, None, None
    if isinstance(measurements, Entries):
        return _ENTRIES, measurements.rows.contiguous(), measurements.cols.contiguous()
    if isinstance(measurements, RankOne):
        return _RANK_ONE, measurements.u.contiguous(), measurements.v.contiguous()
    if isinstance(measurements, Dense):
        A = measurements.A
        if measurements.n > d_0 * d_L:
            # MATH.md cost model: through K = (1/n) Σ vec(A_i) vec(A_i)ᵀ, O((d_0 d_L)²) per layer
            # instead of O(n d_0 d_L (d_0 + d_L)); Dense caches K in the (a,c,b,d) layout in
            # which each contraction with a Gram is one matrix-vector product
            return _DENSE_KERNEL, measurements._kernel_pairs(), None
        # (d_L, n, d_0): Σ_i A_i G A_iᵀ and Σ_i A_iᵀ G A_i become two plain matrix products each
        Ap = _cached(measurements, "_flatkern_cpp_Ap", A, lambda: A.permute(1, 0, 2).contiguous())
        return _DENSE, Ap, None
    if isinstance(measurements, Inputs):
        return _INPUTS, measurements.x.contiguous(), None
    raise TypeError(
        "the C++ backend supports the measurement families Isotropic, Entries, RankOne, Dense and Inputs, "
        f"got {type(measurements).__name__}"
    )


def _saved_size(widths: list, family: int, a) -> int:
    """Per-problem length of the saved buffer; mirrors ``Layout`` in hessian_trace_cpu.cpp."""
    L = len(widths) - 1
    d_0, d_L = widths[0], widths[L]
    size = sum(widths[j - 1] * d_0 for j in range(3, L + 1)) + sum(d_L * widths[j] for j in range(1, L - 1))
    if family in (_ISOTROPIC, _INPUTS):
        stat = 2
    elif family == _ENTRIES:
        stat = d_L + d_0
    elif family == _RANK_ONE:
        stat = 2 * a.shape[0]
    else:
        stat = 2 * d_L * d_L
    return size + L * stat


if _LOAD_ERROR is None:
    _hessian_layer_terms_overload = torch.ops.flatkern.hessian_layer_terms.default
    # the overload's own C++ entry: OpOverload.__call__ is a Python frame around it,
    # a measurable part of a d = 30 call (torch.compile gets the overload itself)
    _hessian_layer_terms = getattr(_hessian_layer_terms_overload, "_op", _hessian_layer_terms_overload)


def _forward(weights, measurements: Measurements, with_end_to_end: bool, scale: float, sum_layers: bool):
    weights = [w if w.is_contiguous() else w.contiguous() for w in weights]
    family, a, b = _encode(measurements, weights[-1].shape[-2], weights[0].shape[-1])
    op = _hessian_layer_terms_overload if torch.compiler.is_compiling() else _hessian_layer_terms
    terms, E, _ = op(weights, family, a, b, with_end_to_end, scale, sum_layers)
    return terms, E


def layer_terms(weights: list[torch.Tensor], measurements: Measurements, *, scale: float = 1.0,
                sum_layers: bool = False) -> torch.Tensor:
    """``scale · c_j``, ``c_j = (1/n) Σ_i ‖P_jᵀ A_i Q_jᵀ‖_F²``, by the fused C++ kernels, shape ``(..., L)``.

    Same contract as ``flatkern.reference.layer_terms_ref``: ``weights`` are
    ``[W_1, ..., W_L]`` with ``W_j`` of shape ``(..., d_j, d_{j-1})``; with
    ``sum_layers`` the result is ``scale · Σ_j c_j``, shape ``(...)``, from the
    same single op (no further autograd node).  Differentiable with respect to
    the weights (first derivatives only).
    """
    return _forward(weights, measurements, False, scale, sum_layers)[0]


def layer_terms_and_end_to_end(weights: list[torch.Tensor], measurements: Measurements, *, scale: float = 1.0,
                               sum_layers: bool = False):
    """``(layer_terms(weights, measurements, ...), E)`` from one pass over the chain.

    ``E = W_L ⋯ W_1`` (``(..., d_L, d_0)``) costs one more matrix product on top
    of the trace; both outputs are differentiable with respect to the weights.
    """
    return _forward(weights, measurements, True, scale, sum_layers)


# The autograd formulas of both ops are registered in C++ (hessian_trace_cpu.cpp,
# Autograd key): a Python autograd wrapper would cost more than a small problem.
if _LOAD_ERROR is None:

    @torch.library.register_fake("flatkern::hessian_layer_terms")
    def _hessian_layer_terms_fake(weights, family, a, b, with_end_to_end, scale=1.0, sum_layers=False):
        batch = weights[0].shape[:-2]
        widths = [weights[0].shape[-1]] + [w.shape[-2] for w in weights]
        terms = weights[0].new_empty(batch if sum_layers else (*batch, len(weights)))
        E = weights[0].new_empty((*batch, widths[-1], widths[0]) if with_end_to_end else (0,))
        saved = weights[0].new_empty((*batch, _saved_size(widths, family, a)))
        return terms, E, saved

    @torch.library.register_fake("flatkern::hessian_layer_terms_backward")
    def _hessian_layer_terms_backward_fake(weights, family, a, b, saved, grad_terms, grad_E, scale=1.0,
                                           sum_layers=False):
        return [torch.empty_like(w) for w in weights]
