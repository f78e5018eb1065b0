"""flatkern's compiled ops: one schema each, one kernel per device, chosen by the dispatcher.

The schemas are defined here, in Python, rather than with ``TORCH_LIBRARY`` in
C++: the op then exists whether or not the C++ extension was built, and
everything above it (``flatkern.hessian_trace``, ``torch.compile`` graphs)
is the same either way.  ``docs/ARCHITECTURE.md`` draws the whole picture.

    flatkern::end_to_end(Tensor[] weights) -> Tensor
    flatkern::hessian_trace(weights, family, operands, with_end_to_end, scale, sum_layers)
        -> (terms, E, saved)
    flatkern::hessian_trace_backward(weights, family, operands, saved, grad_terms, grad_E, scale, sum_layers)
        -> grads
    flatkern::hessian_trace_and_grad(weights, family, operands, scale, sum_layers) -> (terms, grads)

``weights`` are ``[W_1, ..., W_L]``, ``W_j`` of shape ``(..., d_j, d_{j-1})``;
``(family, operands)`` is a measurement object's encoding
(``flatkern/kernels/families.py``).  ``terms`` is ``scale · c_j`` with
``c_j = (1/n) Σ_i ‖P_jᵀ A_i Q_jᵀ‖_F²`` (``(..., L)``), or ``scale · Σ_j c_j``
(``(...)``) with ``sum_layers``; ``E = W_L ⋯ W_1`` (``(..., d_L, d_0)``, or an
empty ``(0,)`` tensor without ``with_end_to_end``); ``saved`` is whatever that
device's backward needs.  ``hessian_trace_and_grad`` returns the same terms
and the gradient of ``scale · Σ_j c_j`` with respect to each weight, without
an autograd graph (its outputs never require grad).

Kernels, by dispatch key:

- CPU: the C++ kernels (``csrc/ops/cpu/``), registered when ``flatkern._C``
  is imported; without the extension, the plain-torch reference, registered
  below (and said once, by ``flatkern.ops``).
- CUDA: the Triton launchers (``flatkern/kernels/triton/``), registered when
  that package is imported (it needs ``triton``).
- Autograd: one formula for every device, in C++
  (``csrc/ops/autograd/hessian_trace.cpp``); without the extension, the same
  formula registered below.
- Fake (``torch.compile``, ``opcheck``): below; the sizes of ``saved`` come
  from the kernels' own definitions (the C++ ``Layout`` through
  ``flatkern._C.hessian_trace_saved_size``, the Triton package's ``saved_specs``).
"""

from __future__ import annotations

import importlib
import os

import torch

from .. import reference
from ..measurements import from_operands
from . import families

__all__ = ["CPP_ERROR", "TRITON_ERROR", "end_to_end", "hessian_trace", "hessian_trace_backward",
           "hessian_trace_and_grad"]

_lib = torch.library.Library("flatkern", "DEF")
_lib.define("end_to_end(Tensor[] weights) -> Tensor")
_lib.define("hessian_trace(Tensor[] weights, int family, Tensor[] operands, bool with_end_to_end=False, "
            "float scale=1., bool sum_layers=False) -> (Tensor, Tensor, Tensor[])")
_lib.define("hessian_trace_backward(Tensor[] weights, int family, Tensor[] operands, Tensor[] saved, "
            "Tensor grad_terms, Tensor? grad_E, float scale=1., bool sum_layers=False) -> Tensor[]")
_lib.define("hessian_trace_and_grad(Tensor[] weights, int family, Tensor[] operands, float scale=1., "
            "bool sum_layers=False) -> (Tensor, Tensor[])")

try:
    # registers the C++ CPU and Autograd kernels ("No module named flatkern._C" when it was not built)
    _C = importlib.import_module("flatkern._C")

    CPP_ERROR: str | None = None
except ImportError as exc:  # not built, or built against another torch
    _C = None
    CPP_ERROR = (f"the C++ extension flatkern._C is not importable ({exc}); reinstall with "
                 "`pip install --no-build-isolation .` against the installed torch")

try:
    from . import triton as _triton  # registers the Triton kernels for CUDA

    TRITON_ERROR: str | None = None
except ImportError as exc:  # triton not installed
    _triton = None
    TRITON_ERROR = f"the Triton backend cannot be imported ({exc})"


def _tag_compile_cache() -> None:
    """Key torch.compile's caches by this build's kernels.

    torch caches compiled graphs across processes and treats a custom op as the same op whatever
    kernels it has; but what ``saved`` holds, and so the compiled backward, depends on the build
    (the C++ kernels, or the plain-torch fallback). A graph compiled by one build must not be
    replayed by another.
    """
    if _C is None:
        build = "flatkern:reference"
    else:
        stat = os.stat(_C.__file__)
        build = f"flatkern:cpp:{stat.st_size}:{stat.st_mtime_ns}"
    tag = torch.compiler.config.cache_key_tag
    if build not in tag:
        torch.compiler.config.cache_key_tag = f"{tag}|{build}" if tag else build


_tag_compile_cache()

end_to_end = torch.ops.flatkern.end_to_end.default
hessian_trace = torch.ops.flatkern.hessian_trace.default
hessian_trace_backward = torch.ops.flatkern.hessian_trace_backward.default
hessian_trace_and_grad = torch.ops.flatkern.hessian_trace_and_grad.default


def _widths(weights) -> list[int]:
    return [int(weights[0].shape[-1])] + [int(w.shape[-2]) for w in weights]


# ------------------------------------------------------------------ fake kernels


def _saved_fake(weights, family, operands) -> list[torch.Tensor]:
    like = weights[0]
    if like.device.type == "cuda" and _triton is not None:
        return [like.new_empty(shape, dtype=dtype) for shape, dtype in _triton.saved_specs(weights, family, operands)]
    if like.device.type == "cpu" and _C is not None:
        size = _C.hessian_trace_saved_size(_widths(weights), family, [list(map(int, o.shape)) for o in operands])
        return [like.new_empty((*like.shape[:-2], size))]
    return []  # the plain-torch kernel saves nothing: its backward recomputes


@torch.library.register_fake("flatkern::hessian_trace")
def _hessian_trace_fake(weights, family, operands, with_end_to_end=False, scale=1.0, sum_layers=False):
    like, batch = weights[0], weights[0].shape[:-2]
    terms = like.new_empty(batch if sum_layers else (*batch, len(weights)))
    E = like.new_empty((*batch, weights[-1].shape[-2], like.shape[-1]) if with_end_to_end else (0,))
    return terms, E, _saved_fake(weights, family, operands)


@torch.library.register_fake("flatkern::hessian_trace_backward")
def _hessian_trace_backward_fake(weights, family, operands, saved, grad_terms, grad_E, scale=1.0, sum_layers=False):
    return [torch.empty_like(w) for w in weights]


@torch.library.register_fake("flatkern::hessian_trace_and_grad")
def _hessian_trace_and_grad_fake(weights, family, operands, scale=1.0, sum_layers=False):
    batch = weights[0].shape[:-2]
    terms = weights[0].new_empty(batch if sum_layers else (*batch, len(weights)))
    return terms, [torch.empty_like(w) for w in weights]


@torch.library.register_fake("flatkern::end_to_end")
def _end_to_end_fake(weights):
    return weights[0].new_empty((*weights[0].shape[:-2], weights[-1].shape[-2], weights[0].shape[-1]))


# ---------------------------------------------- end_to_end: autograd (every build)


def _end_to_end_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[0])


def _end_to_end_backward(ctx, grad_E):
    # dE/dW_j contracted with G is P_jᵀ G Q_jᵀ: reverse accumulation along the
    # suffix chain (G_j = P_jᵀ G) against the prefix products Q_j
    weights = ctx.saved_tensors
    _, Q = reference.chain_products_ref(list(weights))
    grads, G = [None] * len(weights), grad_E
    for j in range(len(weights) - 1, -1, -1):
        grads[j] = G if Q[j] is None else G @ Q[j].transpose(-1, -2)
        if j > 0:
            G = weights[j].transpose(-1, -2) @ G
    return (grads,)


torch.library.register_autograd("flatkern::end_to_end", _end_to_end_backward, setup_context=_end_to_end_setup_context)


# ------------------------------------ plain-torch kernels (no C++ extension)
#
# The same op, computed by flatkern.reference: saved is empty and the backward
# recomputes the forward under autograd.  Only registered when flatkern._C is
# missing, so that the op (and torch.compile over it) is the same in every build.


def _terms_ref(weights, family, operands, with_end_to_end, scale, sum_layers):
    m = from_operands(family, operands)
    if with_end_to_end:
        return reference.layer_terms_and_end_to_end_ref(list(weights), m, scale=scale, sum_layers=sum_layers)
    return reference.layer_terms_ref(list(weights), m, scale=scale, sum_layers=sum_layers), None


def _detached_leaves(weights):
    # inference_mode(False) + clone: weights made under inference_mode cannot enter a graph as they are
    return [w.detach().clone().requires_grad_() for w in weights]


def _hessian_trace_ref(weights, family, operands, with_end_to_end=False, scale=1.0, sum_layers=False):
    terms, E = _terms_ref(weights, family, operands, with_end_to_end, scale, sum_layers)
    return terms.clone(), (E.clone() if E is not None else weights[0].new_empty((0,))), []


def _hessian_trace_backward_ref(weights, family, operands, saved, grad_terms, grad_E, scale=1.0, sum_layers=False):
    with torch.inference_mode(False), torch.enable_grad():
        leaves = _detached_leaves(weights)
        terms, E = _terms_ref(leaves, family, operands, grad_E is not None, scale, sum_layers)
        outputs, grads_out = [terms], [grad_terms]
        if grad_E is not None:
            outputs.append(E)
            grads_out.append(grad_E)
        return list(torch.autograd.grad(outputs, leaves, grads_out, allow_unused=True, materialize_grads=True))


def _hessian_trace_and_grad_ref(weights, family, operands, scale=1.0, sum_layers=False):
    return reference.layer_terms_and_grad_ref(list(weights), from_operands(family, operands), scale=scale,
                                              sum_layers=sum_layers)


class _HessianTrace(torch.autograd.Function):
    """The op's autograd formula, in Python: used only when the C++ extension (whose
    ``csrc/ops/autograd/hessian_trace.cpp`` is the same formula) is missing."""

    @staticmethod
    def forward(ctx, family, with_end_to_end, scale, sum_layers, num_weights, *tensors):
        weights, operands = list(tensors[:num_weights]), list(tensors[num_weights:])
        with torch._C._AutoDispatchBelowAutograd():
            terms, E, saved = hessian_trace(weights, family, operands, with_end_to_end, scale, sum_layers)
        ctx.args = (family, with_end_to_end, scale, sum_layers, num_weights, len(saved))
        ctx.save_for_backward(*tensors, *saved)
        ctx.mark_non_differentiable(*saved)
        ctx.set_materialize_grads(False)
        return (terms, E, *saved)

    @staticmethod
    def backward(ctx, grad_terms, grad_E, *unused):
        family, with_end_to_end, scale, sum_layers, L, num_saved = ctx.args
        if torch.is_grad_enabled():
            raise RuntimeError(
                'flatkern: the compiled op computes first derivatives of the trace only: double backward '
                '(create_graph=True) is not supported there (here its CPU kernel is the plain-torch '
                'fallback); backend="torch" supports derivatives of any order')
        tensors = ctx.saved_tensors
        split = len(tensors) - num_saved
        weights, operands, saved = list(tensors[:L]), list(tensors[L:split]), list(tensors[split:])
        if grad_terms is None:
            batch = weights[0].shape[:-2]
            grad_terms = weights[0].new_zeros(batch if sum_layers else (*batch, L))
        grad_E = grad_E if with_end_to_end and grad_E is not None else None
        grads = hessian_trace_backward(weights, family, operands, saved, grad_terms, grad_E, scale, sum_layers)
        return (None, None, None, None, None, *grads, *([None] * len(operands)))


def _hessian_trace_autograd(weights, family, operands, with_end_to_end=False, scale=1.0, sum_layers=False):
    terms, E, *saved = _HessianTrace.apply(family, with_end_to_end, scale, sum_layers, len(weights), *weights,
                                           *operands)
    return terms, E, saved


def _hessian_trace_and_grad_autograd(weights, family, operands, scale=1.0, sum_layers=False):
    # a value and its gradient, not a node of the caller's graph: run below autograd
    with torch._C._AutoDispatchBelowAutograd():
        return hessian_trace_and_grad(weights, family, operands, scale, sum_layers)


if _C is None:
    _lib.impl("end_to_end", lambda weights: reference.end_to_end_ref(list(weights)).clone(), "CPU")
    _lib.impl("hessian_trace", _hessian_trace_ref, "CPU")
    _lib.impl("hessian_trace_backward", _hessian_trace_backward_ref, "CPU")
    _lib.impl("hessian_trace_and_grad", _hessian_trace_and_grad_ref, "CPU")
    _lib.impl("hessian_trace", _hessian_trace_autograd, "Autograd")
    _lib.impl("hessian_trace_and_grad", _hessian_trace_and_grad_autograd, "Autograd")
