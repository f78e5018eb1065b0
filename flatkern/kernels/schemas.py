"""The schemas of flatkern's compiled ops, and the kernels each device gets.

The schemas are defined here, in Python, rather than with ``TORCH_LIBRARY`` in
C++: the ops then exist whether or not the C++ extension was built, and
everything above them (``flatkern.hessian_trace``, ``torch.compile`` graphs)
is the same either way.  ``docs/ARCHITECTURE.md`` draws the whole picture.

    flatkern::end_to_end(Tensor[] weights) -> Tensor
    flatkern::hessian_trace(weights, family, operands, with_end_to_end, scale, sum_layers)
        -> (terms, E, saved)
    flatkern::hessian_trace_backward(weights, family, operands, saved, grad_terms, grad_E, scale, sum_layers)
        -> grads
    flatkern::hessian_trace_and_grad(weights, family, operands, scale, sum_layers) -> (terms, grads)
    flatkern::mlp_hessian_trace(x, weights, biases, slopes, num_acts, loss, mean, sum_layers) -> (terms, saved)
    flatkern::mlp_hessian_trace_backward(..., saved, grad_terms) -> grads
    flatkern::mlp_hessian_trace_and_grad(x, weights, biases, slopes, num_acts, loss, mean, sum_layers)
        -> (terms, grads)                 (ReLU / LeakyReLU networks, issue 19: see below)

``weights`` are ``[W_1, ..., W_L]``, ``W_j`` of shape ``(..., d_j, d_{j-1})``;
``(family, operands)`` is a measurement object's encoding
(``flatkern/kernels/families.py``).  ``terms`` is ``scale · c_j`` with
``c_j = (1/n) Σ_i ‖P_jᵀ A_i Q_jᵀ‖_F²`` (``(..., L)``), or ``scale · Σ_j c_j``
(``(...)``) with ``sum_layers``; ``E = W_L ⋯ W_1`` (``(..., d_L, d_0)``, or an
empty ``(0,)`` tensor without ``with_end_to_end``); ``saved`` is whatever that
device's backward needs.  ``hessian_trace_and_grad`` returns the same terms
and the gradient of ``scale · Σ_j c_j`` with respect to each weight, without
an autograd graph (its outputs never require grad).

Kernels, by dispatch key (one module each):

- CPU: the C++ kernels (``csrc/ops/cpu/``), registered when ``flatkern._C``
  is imported below; without the extension, ``reference_kernel.py``.
- CUDA: the Triton launchers (``triton/``), registered here as thin entries
  that import the Triton package on their first call: ``import flatkern``
  never imports Triton on a machine that does not use it.
- Autograd: one formula for every device, in C++
  (``csrc/ops/autograd/hessian_trace.cpp``); without the extension, its Python
  twin ``autograd.py``.
- Fake (``torch.compile``, ``opcheck``): ``fake.py``, sized by the kernel
  records of ``routing.py``.
"""

from __future__ import annotations

import importlib
import os

import torch

__all__ = ["CPP_ERROR", "end_to_end", "hessian_trace", "hessian_trace_backward", "hessian_trace_and_grad",
           "mlp_hessian_trace", "mlp_hessian_trace_backward", "mlp_hessian_trace_and_grad", "MLP_LOSSES"]

_lib = torch.library.Library("flatkern", "DEF")
_lib.define("end_to_end(Tensor[] weights) -> Tensor")
_lib.define("hessian_trace(Tensor[] weights, int family, Tensor[] operands, bool with_end_to_end=False, "
            "float scale=1., bool sum_layers=False) -> (Tensor, Tensor, Tensor[])")
_lib.define("hessian_trace_backward(Tensor[] weights, int family, Tensor[] operands, Tensor[] saved, "
            "Tensor grad_terms, Tensor? grad_E, float scale=1., bool sum_layers=False) -> Tensor[]")
_lib.define("hessian_trace_and_grad(Tensor[] weights, int family, Tensor[] operands, float scale=1., "
            "bool sum_layers=False) -> (Tensor, Tensor[])")

# networks piecewise linear in each weight (Linear + ReLU / LeakyReLU; issue 19, docs/MATH.md "Beyond
# linear"): x (M, d_0); weights [W_1 .. W_L], W_l (d_l, d_{l-1}); biases [b_1 .. b_L], b_l (d_l,) or an
# empty (0,) tensor for none; the activations after layer l are slopes[Σ_{k<l} num_acts[k] :][: num_acts[l]]
# (0 for ReLU, negative_slope for LeakyReLU), applied in order; loss: MLP_LOSSES; mean: reduction="mean".
# terms: (L,) per layer, () with sum_layers; saved = [z_1 .. z_L] ((M, d_l), the pre-activations) on
# every kernel; the backward's grads = [∂/∂x, ∂/∂W_1 .. ∂/∂W_L, ∂/∂b_1 .. ∂/∂b_L] (a (0,) tensor for a
# missing bias); and_grad's the same without ∂/∂x (its callers train the weights: no x product).
_MLP_ARGS = "Tensor x, Tensor[] weights, Tensor[] biases, float[] slopes, int[] num_acts, int loss=0, bool mean=True, " \
    "bool sum_layers=False"
_lib.define(f"mlp_hessian_trace({_MLP_ARGS}) -> (Tensor, Tensor[])")
_lib.define("mlp_hessian_trace_backward(Tensor x, Tensor[] weights, Tensor[] biases, float[] slopes, int[] num_acts, "
            "int loss, bool mean, bool sum_layers, Tensor[] saved, Tensor grad_terms) -> Tensor[]")
_lib.define(f"mlp_hessian_trace_and_grad({_MLP_ARGS}) -> (Tensor, Tensor[])")
#: the codes of mlp_hessian_trace's ``loss`` argument
MLP_LOSSES = {"mse": 0, "cross_entropy": 1}

end_to_end = torch.ops.flatkern.end_to_end.default
hessian_trace = torch.ops.flatkern.hessian_trace.default
hessian_trace_backward = torch.ops.flatkern.hessian_trace_backward.default
hessian_trace_and_grad = torch.ops.flatkern.hessian_trace_and_grad.default
mlp_hessian_trace = torch.ops.flatkern.mlp_hessian_trace.default
mlp_hessian_trace_backward = torch.ops.flatkern.mlp_hessian_trace_backward.default
mlp_hessian_trace_and_grad = torch.ops.flatkern.mlp_hessian_trace_and_grad.default

try:
    # registers the C++ CPU and Autograd kernels ("No module named flatkern._C" when it was not built)
    _C = importlib.import_module("flatkern._C")

    CPP_ERROR: str | None = None
except ImportError as exc:  # not built, or built against another torch
    _C = None
    CPP_ERROR = (f"the C++ extension flatkern._C is not importable ({exc}); reinstall with "
                 "`pip install --no-build-isolation .` against the installed torch")


#: the ops called through the dispatcher's typed entry (``csrc/ops/unboxed_calls.cpp``): the same
#: dispatch, without converting the arguments to IValues first (~1.5 µs of a d = 30 call).  Without
#: the extension, the ops' own C++ entries.  Not inside a ``torch.compile`` trace (it must see the
#: op objects above).  ``call_hessian_trace_and_grad_into`` (``None`` without the extension) takes
#: ``into`` and ``alpha`` as well: ``into[j] += alpha · grads[j]`` in place, in the same call.
call_hessian_trace = getattr(_C, "call_hessian_trace", None) or getattr(hessian_trace, "_op", hessian_trace)
call_hessian_trace_and_grad = (getattr(_C, "call_hessian_trace_and_grad", None)
                               or getattr(hessian_trace_and_grad, "_op", hessian_trace_and_grad))
call_hessian_trace_and_grad_into = getattr(_C, "call_hessian_trace_and_grad", None)


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


def _triton_entry(name: str, module: str = "hessian_trace"):
    """The CUDA kernel ``name`` of ``flatkern/kernels/triton/<module>.py``, imported on its first call."""
    def kernel(*args):
        # imports triton: only when a CUDA tensor gets here
        launchers = importlib.import_module(f"{__package__}.triton.{module}")
        return getattr(launchers, name)(*args)
    kernel.__name__ = name
    return kernel


_lib.impl("hessian_trace", _triton_entry("hessian_trace_triton"), "CUDA")
_lib.impl("hessian_trace_backward", _triton_entry("hessian_trace_backward_triton"), "CUDA")
_lib.impl("hessian_trace_and_grad", _triton_entry("hessian_trace_and_grad_triton"), "CUDA")
for _name in ("mlp_hessian_trace", "mlp_hessian_trace_backward", "mlp_hessian_trace_and_grad"):
    _lib.impl(_name, _triton_entry(f"{_name}_triton", "mlp_hessian_trace"), "CUDA")

from . import fake  # noqa: E402,F401  (registers the fake kernels and end_to_end's autograd)

if _C is None:
    from . import autograd, reference_kernel  # noqa: E402

    reference_kernel.register(_lib)
    autograd.register(_lib)
