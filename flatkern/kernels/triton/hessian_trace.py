"""The Triton kernels as ``flatkern::hessian_trace``'s CUDA kernels: the op-level launchers.

One function per schema of ``flatkern/kernels/schemas.py`` (which registers them for
CUDA, importing this module on the first CUDA call):

    hessian_trace_triton(weights, family, operands, with_end_to_end=False, scale=1., sum_layers=False)
        -> (terms, E, saved)
    hessian_trace_backward_triton(weights, family, operands, saved, grad_terms, grad_E, scale=1.,
        sum_layers=False) -> grads
    hessian_trace_and_grad_triton(weights, family, operands, scale=1., sum_layers=False) -> (terms, grads)

and ``saved_specs`` (the shapes and dtypes of ``saved``, for the fake kernel).  On CPU
tensors under ``TRITON_INTERPRET=1`` the dispatcher's CPU kernel is the C++ one, so
``backend="triton"`` reaches these launchers through ``layer_terms`` (the one autograd
formula's Python twin, ``flatkern/kernels/autograd.py``) and
``hessian_trace_and_grad_interpret``; ``layer_terms`` also lets tests force a path and tile size.

What the kernels take (dtypes, widths, empty batches, devices) is decided once, by the
``TRITON`` record of ``flatkern/kernels/routing.py``; these launchers trust it.

Why ``register_kernel`` and not ``triton_op``: the op is declared once, in
``schemas.py``, for every device (C++ on CPU, this package on CUDA), with one
autograd formula in C++; ``triton_op`` would declare a second op of its own.
The price is that inductor sees the op as opaque rather than tracing into the
Triton kernels, which a chain of small GEMMs in one launch does not need.

Plans (``_plan``): ``"small"`` (every width <= ``SMALL_MAX_WIDTH``, any depth:
``small.py``) or ``"large"`` (``large.py``).  Everything is computed in fp32
(fp64 for fp64 weights) and returned in the weights' dtype.
"""

from __future__ import annotations

import math
import weakref

import torch

from .. import autograd, families
from .large import TritonReductions, large_bwd, large_fwd, norms_needed
from .small import SMALL_MAX_WIDTH, chain_small_bwd, chain_small_fwd, small_width

__all__ = [
    "saved_specs", "hessian_trace_triton", "hessian_trace_backward_triton", "hessian_trace_and_grad_triton",
    "layer_terms", "hessian_trace_and_grad_interpret",
]

PATHS = ("auto", "small", "large")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp32 accumulation: products of several fp16/bf16 layers overflow or lose all digits
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dot_precision(device: torch.device, dtype: torch.dtype) -> str:
    # tf32 only when the user allowed it for matmuls; never in the interpreter
    if device.type == "cuda" and dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _widths(weights) -> list[int]:
    return [weights[0].shape[-1]] + [w.shape[-2] for w in weights]


def _plan(weights, path: str = "auto") -> str:
    """``"small"`` or ``"large"`` (see the module docstring)."""
    if path == "auto":
        return "small" if max(_widths(weights)) <= SMALL_MAX_WIDTH else "large"
    return path


def _kernel_family(family: int) -> int:
    """The code the kernels branch on: Dense with the kernel ``K`` is Dense here (no ``K`` path)."""
    return families.base_code(family)


# (id(operand), what) -> (weakref to the operand, its version, the derived tensor)
_derived: dict = {}


def _derive(t: torch.Tensor, what: tuple, make):
    """``make(t)``, computed once per operand tensor and ``what`` while ``t`` is unchanged.

    The forward and the backward of a step, and every step of a training run, read the same
    operands: a small problem cannot afford to convert them (a launch each) on every call.
    """
    if t.is_inference():  # no version counter to tell a changed tensor by
        return make(t)
    key = (id(t), what)
    hit = _derived.get(key)
    if hit is not None and hit[0]() is t and hit[1] == t._version:
        return hit[2]
    if hit is None or hit[0]() is not t:  # first sight of this tensor: forget it when it dies
        weakref.finalize(t, _derived.pop, key, None)
    value = make(t)
    _derived[key] = (weakref.ref(t), t._version, value)
    return value


def _prepare(family: int, operands, cdtype: torch.dtype, d_L: int, d_0: int, plan: str) -> tuple[int, list[torch.Tensor]]:
    """``(kernel family, data)``: what the kernels read, in the compute dtype.

    Entries: on the small plan ``[K = counts / n]`` (d_L, d_0), at most 128 x 128, built on the
    device once per operand set; on the large plan ``[rows, cols]`` as they are (memory O(n), no
    d_L x d_0 matrix); RankOne ``[U, V]``; Dense and Dense (kernel K) ``[Ap]`` (d_L, n, d_0);
    Inputs ``[M = xᵀx / (N d_L)]`` (d_0, d_0); Isotropic ``[]``.  Per-problem operands (a leading
    batch, ``families.Family.batch_shape``) give the same with the batch flattened to one leading
    ``B`` dim: ``K (B, d_L, d_0)``, ``rows (B, n)``, ``U (B, n, d_L)``, ``Ap (B, d_L, n, d_0)``,
    ``M (B, d_0, d_0)``.
    """
    # per-problem sets: flattened after _derive, which keys its cache on the caller's operand tensors
    batched = bool(families.get(family).batch_shape([o.shape for o in operands]))

    def flat(t, rank):
        return t.reshape(-1, *t.shape[t.dim() - rank:]) if batched else t

    family = _kernel_family(family)

    def cast(t):
        if t.dtype == cdtype and t.is_contiguous():
            return t
        return _derive(t, (cdtype,), lambda t: t.to(cdtype).contiguous())

    if family == families.ENTRIES:
        rows, cols = operands[0], operands[1]
        if plan != "small":
            return family, [flat(rows, 1), flat(cols, 1)]

        def density(rows):
            if batched:  # one density per problem: problem b's counts at offset b d_L d_0
                r, c = flat(rows, 1), flat(cols, 1)
                B, n = r.shape
                index = r * d_0 + c + torch.arange(B, device=r.device)[:, None] * (d_L * d_0)
                counts = torch.bincount(index.reshape(-1), minlength=B * d_L * d_0)
                return (counts.to(cdtype) / n).reshape(B, d_L, d_0)
            counts = torch.bincount(rows * d_0 + cols, minlength=d_L * d_0)
            return (counts.to(cdtype) / rows.shape[0]).reshape(d_L, d_0)
        # keyed on both index tensors: an in-place edit of either is a new density
        cols_key = (id(cols), None if cols.is_inference() else cols._version)
        return family, [_derive(rows, (cdtype, d_L, d_0, "density", cols_key), density)]
    if family == families.RANK_ONE:
        return family, [flat(cast(operands[0]), 2), flat(cast(operands[1]), 2)]
    if family == families.DENSE:
        return family, [flat(cast(operands[0]), 3)]
    if family == families.INPUTS:
        def gram(x):
            x = x.to(cdtype)
            return ((x.transpose(-1, -2) @ x) / (x.shape[-2] * d_L)).contiguous()
        return family, [flat(_derive(operands[0], (cdtype, d_L), gram), 2)]
    return family, []


def _flat(weights, cdtype):
    """The layers as (B, d_j, d_{j-1}) in the compute dtype (views when they can be)."""
    B = math.prod(weights[0].shape[:-2])
    return [w.reshape(B, *w.shape[-2:]).to(cdtype) for w in weights]


def _pack(weights, cdtype):
    """The layers of each problem one after the other: (B, Σ_j d_j d_{j-1}), one copy."""
    B = math.prod(weights[0].shape[:-2])
    return torch.cat([w.reshape(B, -1).to(cdtype) for w in weights], dim=1)


def saved_specs(weights, family: int, operands, *, path: str = "auto") -> list[tuple[tuple[int, ...], torch.dtype]]:
    """``[(shape, dtype), ...]`` of the ``saved`` tensors the forward returns for these inputs.

    The fake kernel of ``flatkern::hessian_trace`` sizes its outputs with it; ``_forward`` is
    checked against it (``tests/test_triton.py``).  Small plan: ``P_ws``, ``Q_ws`` (B, L, D, D) and
    the packed layers (B, Σ d_j d_{j-1}); large plan: the products ``P_1 … P_{L-2}``,
    ``Q_3 … Q_L`` (``P_{L-1} = W_L`` and ``Q_2 = W_1`` are the weights) and the norms the family
    reads; plain-torch plan: nothing (its backward recomputes).
    """
    cdtype = _compute_dtype(weights[0].dtype)
    B, L, d = math.prod(weights[0].shape[:-2]), len(weights), _widths(weights)
    plan = _plan(weights, path)
    if plan == "small":
        D = small_width(d)
        return [((B, L, D, D), cdtype), ((B, L, D, D), cdtype), ((B, sum(d[j + 1] * d[j] for j in range(L))), cdtype)]
    need_r, need_c = norms_needed(_kernel_family(family))
    shapes = ([(B, d[L], d[j + 1]) for j in range(L - 2)] + [(B, d[j], d[0]) for j in range(2, L)]
              + [(B, d[L])] * ((L - 1) * need_r) + [(B, d[0])] * ((L - 1) * need_c))
    return [(s, cdtype) for s in shapes]


def _forward(weights, family, operands, with_e: bool, path: str, block: int | None):
    """``(c (B, L), E (B, d_L, d_0) or None, saved)`` in the compute dtype."""
    cdtype = _compute_dtype(weights[0].dtype)
    d_L = weights[-1].shape[-2]
    B = math.prod(weights[0].shape[:-2])
    if B == 0:  # an empty batch: nothing to launch, outputs of the right shapes
        like = weights[0].new_empty((), dtype=cdtype)
        E = like.new_empty((0, d_L, weights[0].shape[-1])) if with_e else None
        return like.new_empty((0, len(weights))), E, [like.new_empty(s) for s, _ in saved_specs(weights, family,
                                                                                                 operands, path=path)]
    plan = _plan(weights, path)
    prec = _dot_precision(weights[0].device, cdtype)
    family, data = _prepare(family, operands, cdtype, d_L, weights[0].shape[-1], plan)
    if plan == "small":
        W = _pack(weights, cdtype)
        c, P_ws, Q_ws, E = chain_small_fwd(W, _widths(weights), family, data, prec, with_e)
        return c, E, [P_ws, Q_ws, W]
    red = TritonReductions(block, prec)
    c, P, Q, rp, cq, E = large_fwd(_flat(weights, cdtype), family, data, red, with_e)
    # P[L-2] = W_L and Q[1] = W_1 alias the inputs: the backward takes them from the weights
    L = len(weights)
    norms = [r for r in rp if r is not None] + [s for s in cq if s is not None]
    return c, E, [*P[: max(L - 2, 0)], *Q[2:], *norms]


def _backward(weights, family, operands, saved, g, grad_E, path: str, block: int | None, fresh: bool = True):
    """Gradients, shaped like the weights, of ``Σ_j g[:, j] c_j + <grad_E, E>``.

    ``g``: (B, L) and ``grad_E``: (B, d_L, d_0) or ``None``, both contiguous in the compute dtype.
    ``fresh=False`` lets the small plan return views of one packed gradient (see ``_unpack``).
    """
    cdtype = _compute_dtype(weights[0].dtype)
    d_L, L = weights[-1].shape[-2], len(weights)
    if math.prod(weights[0].shape[:-2]) == 0:  # an empty batch: empty gradients
        return [torch.zeros_like(w) for w in weights]
    plan = _plan(weights, path)
    prec = _dot_precision(weights[0].device, cdtype)
    family, data = _prepare(family, operands, cdtype, d_L, weights[0].shape[-1], plan)
    if plan == "small":
        P_ws, Q_ws, W = saved
        dW = chain_small_bwd(W, P_ws, Q_ws, g, grad_E, _widths(weights), family, data, prec)
        return _unpack(dW, weights, fresh)
    Ws = _flat(weights, cdtype)
    red = TritonReductions(block, prec)
    k = max(L - 2, 0)
    P = list(saved[:k]) + ([Ws[L - 1]] if L > 1 else []) + [None]
    Q = [None] + ([Ws[0]] if L > 1 else []) + list(saved[k: 2 * k])
    need_r, need_c = norms_needed(family)
    norms = list(saved[2 * k:])
    rp = (norms[: L - 1] if need_r else [None] * (L - 1)) + [None]
    cq = [None] + (norms[(L - 1) * need_r:] if need_c else [None] * (L - 1))
    dW = large_bwd(Ws, P, Q, rp, cq, g, grad_E, family, data, red)
    return [d.reshape(w.shape).to(w.dtype) for d, w in zip(dW, weights)]


def _unpack(dW, weights, fresh: bool):
    """Per-layer gradients from the small plan's packed ``dW`` (B, Σ d_j d_{j-1}).

    ``fresh``: one tensor per layer, filled by one copy (an op's outputs may not alias each
    other); else views of ``dW``, which autograd accepts (copies only to change the dtype).
    """
    sizes = [w.shape[-2] * w.shape[-1] for w in weights]
    if fresh and dW.dtype == weights[0].dtype:
        grads = [torch.empty_like(w, memory_format=torch.contiguous_format) for w in weights]
        torch.split_with_sizes_copy(dW, sizes, dim=1, out=[g.view(dW.shape[0], -1) for g in grads])
        return grads
    return [d.view(w.shape).to(w.dtype) for d, w in zip(torch.split(dW, sizes, dim=1), weights)]


def _terms(c, weights, scale: float, sum_layers: bool):
    """``scale · c`` (``(..., L)``) or ``scale · Σ_j c_j`` (``(...)``), in the weights' dtype."""
    if scale != 1.0:
        c = c * scale
    if sum_layers:
        c = c.sum(-1)
    shape = (*weights[0].shape[:-2], *(() if sum_layers else (len(weights),)))
    return c.reshape(shape).to(weights[0].dtype)


def _end_to_end(E, weights):
    if E is None:
        return weights[0].new_empty((0,))
    return E.reshape(*weights[0].shape[:-2], *E.shape[-2:]).to(weights[0].dtype)


def _terms_grad(grad_terms, weights, scale: float, sum_layers: bool):
    """The weights ``g (B, L)`` of ``c_j`` in ``<grad_terms, terms>``, contiguous, compute dtype."""
    B, L = math.prod(weights[0].shape[:-2]), len(weights)
    g = grad_terms.to(_compute_dtype(weights[0].dtype))
    g = g.reshape(B, 1).expand(B, L) if sum_layers else g.reshape(B, L)
    return (g * scale if scale != 1.0 else g).contiguous()


def _grad_E(grad_E, weights):
    if grad_E is None:
        return None
    B, d_L, d_0 = math.prod(weights[0].shape[:-2]), weights[-1].shape[-2], weights[0].shape[-1]
    return grad_E.reshape(B, d_L, d_0).to(_compute_dtype(weights[0].dtype)).contiguous()


# ------------------------------------------------------------------ op kernels


def hessian_trace_triton(weights, family, operands, with_end_to_end=False, scale=1.0, sum_layers=False):
    """``flatkern::hessian_trace`` by the Triton kernels: ``(terms, E, saved)`` (``schemas.py`` has the contract)."""
    weights = list(weights)
    c, E, saved = _forward(weights, family, list(operands), with_end_to_end, "auto", None)
    return _terms(c, weights, scale, sum_layers), _end_to_end(E, weights), saved


def hessian_trace_backward_triton(weights, family, operands, saved, grad_terms, grad_E, scale=1.0, sum_layers=False):
    """``flatkern::hessian_trace_backward`` by the Triton kernels: the gradient of ``<grad_terms, terms> + <grad_E, E>``.

    ``grad_E`` contributes ``P_jᵀ G Q_jᵀ`` to ``W_j``, through the same reverse accumulation.
    """
    weights = list(weights)
    return _backward(weights, family, list(operands), list(saved), _terms_grad(grad_terms, weights, scale, sum_layers),
                     _grad_E(grad_E, weights), "auto", None)


def hessian_trace_and_grad_triton(weights, family, operands, scale=1.0, sum_layers=False):
    """``flatkern::hessian_trace_and_grad`` by the Triton kernels: the forward and the backward back to back."""
    weights = list(weights)
    operands = list(operands)
    c, _, saved = _forward(weights, family, operands, False, "auto", None)
    g = c.new_full(c.shape, scale)
    return _terms(c, weights, scale, sum_layers), _backward(weights, family, operands, saved, g, None, "auto", None)


# ------------------------------------------------------------------ the interpreter's entries


def _forward_fn(path: str, block: int | None):
    def forward(weights, family, operands, with_end_to_end, scale, sum_layers):
        c, E, saved = _forward(list(weights), family, list(operands), with_end_to_end, path, block)
        return _terms(c, weights, scale, sum_layers), _end_to_end(E, weights), saved
    return forward


def _backward_fn(path: str, block: int | None):
    def backward(weights, family, operands, saved, grad_terms, grad_E, scale, sum_layers):
        weights = list(weights)
        return _backward(weights, family, list(operands), list(saved), _terms_grad(grad_terms, weights, scale, sum_layers),
                         _grad_E(grad_E, weights), path, block, fresh=False)
    return backward


@torch.compiler.disable  # the interpreter runs numpy on the tensors' memory: no graph can hold it
def layer_terms(weights, family: int, operands, *, scale: float = 1.0, sum_layers: bool = False,
                with_end_to_end: bool = False, path: str = "auto", block: int | None = None):
    """``(terms, E or None)``: the per-layer terms ``scale · c_j`` by the Triton kernels, differentiable once.

        c_j = (1/n) Σ_i ‖P_jᵀ A_i Q_jᵀ‖_F²

    Through the one autograd formula (its Python twin, ``flatkern/kernels/autograd.py``), with these
    launchers as forward and backward: how ``backend="triton"`` runs on CPU tensors under
    ``TRITON_INTERPRET=1``, and how tests force a path and a tile size.

    Args:
        weights: ``[W_1, ..., W_L]``, ``W_j`` of shape ``(..., d_j, d_{j-1})`` (validated and routed
            by the caller: a non-empty batch, widths >= 1), on CUDA or on CPU under ``TRITON_INTERPRET=1``.
        family, operands: a measurement object's encoding (``flatkern/kernels/families.py``).
        scale: multiplies every term (``flatkern.hessian_trace`` passes 2 or 2n).
        sum_layers: return ``scale · Σ_j c_j``, shape ``(...)``, instead of the terms.
        with_end_to_end: also return ``E = W_L ⋯ W_1`` (``(..., d_L, d_0)``), from the same chain.
        path: ``"auto"`` (the single-program kernels when every width is at most
            ``SMALL_MAX_WIDTH``, else tiled), ``"small"`` (an error when a width is larger) or ``"large"``.
        block: tile size of the large path's kernels (default: 128 x 128 x 32 GEMM tiles, 64 for
            the other kernels); tests use small tiles so that several are exercised.

    Returns:
        ``terms`` (``(..., L)``, ``(...)`` with ``sum_layers``) in the weights' dtype, and ``E`` or
        ``None``; both differentiable with respect to the weights, once: a second derivative raises
        a ``RuntimeError`` that points to ``backend="torch"``.
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if block is not None and (block < 16 or block & (block - 1)):
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    weights, operands = list(weights), list(operands)
    if path == "small" and max(_widths(weights)) > SMALL_MAX_WIDTH:
        raise ValueError(f'path="small" needs every width <= {SMALL_MAX_WIDTH}, got widths {_widths(weights)}')
    terms, E, _ = autograd.apply(_forward_fn(path, block), _backward_fn(path, block), "triton", weights, family,
                                 operands, with_end_to_end, scale, sum_layers)
    return terms, (E if with_end_to_end else None)


def hessian_trace_and_grad_interpret(weights, family: int, operands, scale: float = 1.0, sum_layers: bool = False):
    """``(terms, grads)`` as ``flatkern::hessian_trace_and_grad``: forward and backward back to back,
    no autograd graph (works under ``no_grad`` and ``inference_mode``)."""
    with torch.no_grad():
        terms, grads = hessian_trace_and_grad_triton(weights, family, operands, scale, sum_layers)
    return terms, list(grads)
