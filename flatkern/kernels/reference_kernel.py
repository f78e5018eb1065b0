"""The plain-torch CPU kernels of flatkern's ops, used when the C++ extension is missing.

The same ops, computed by ``flatkern.reference`` on the measurement object that
``(family, operands)`` encode (decoded through the family registry, so this
module never imports ``flatkern.measurements``): ``saved`` is empty and the
backward recomputes the forward under autograd.  Registered by ``schemas.py``
only when ``flatkern._C`` is missing, so that the op (and ``torch.compile``
over it) is the same in every build.
"""

from __future__ import annotations

import torch

from .. import reference
from . import families

__all__ = ["register"]


def _terms_ref(weights, family, operands, with_end_to_end, scale, sum_layers):
    m = families.get(family).decode(operands)
    if with_end_to_end:
        return reference.layer_terms_and_end_to_end_ref(list(weights), m, scale=scale, sum_layers=sum_layers)
    return reference.layer_terms_ref(list(weights), m, scale=scale, sum_layers=sum_layers), None


def hessian_trace_ref_kernel(weights, family, operands, with_end_to_end=False, scale=1.0, sum_layers=False):
    terms, E = _terms_ref(weights, family, operands, with_end_to_end, scale, sum_layers)
    return terms.clone(), (E.clone() if E is not None else weights[0].new_empty((0,))), []


def hessian_trace_backward_ref_kernel(weights, family, operands, saved, grad_terms, grad_E, scale=1.0,
                                      sum_layers=False):
    # inference_mode(False) + clone: weights made under inference_mode cannot enter a graph as they are
    with torch.inference_mode(False), torch.enable_grad():
        leaves = [w.detach().clone().requires_grad_() for w in weights]
        terms, E = _terms_ref(leaves, family, operands, grad_E is not None, scale, sum_layers)
        outputs, grads_out = [terms], [grad_terms]
        if grad_E is not None:
            outputs.append(E)
            grads_out.append(grad_E)
        return list(torch.autograd.grad(outputs, leaves, grads_out, allow_unused=True, materialize_grads=True))


def hessian_trace_and_grad_ref_kernel(weights, family, operands, scale=1.0, sum_layers=False):
    return reference.layer_terms_and_grad_ref(list(weights), families.get(family).decode(operands), scale=scale,
                                              sum_layers=sum_layers)


def register(lib: torch.library.Library) -> None:
    """Register these as the CPU kernels of the ops in ``lib``."""
    lib.impl("end_to_end", lambda weights: reference.end_to_end_ref(list(weights)).clone(), "CPU")
    lib.impl("hessian_trace", hessian_trace_ref_kernel, "CPU")
    lib.impl("hessian_trace_backward", hessian_trace_backward_ref_kernel, "CPU")
    lib.impl("hessian_trace_and_grad", hessian_trace_and_grad_ref_kernel, "CPU")
    # flatkern::mlp_hessian_trace (issue 19): its formula's plain-torch form is flatkern/piecewise.py (one place)
    from .. import piecewise

    lib.impl("mlp_hessian_trace", piecewise.mlp_hessian_trace_torch, "CPU")
    lib.impl("mlp_hessian_trace_backward", piecewise.mlp_hessian_trace_backward_torch, "CPU")
    lib.impl("mlp_hessian_trace_and_grad", piecewise.mlp_hessian_trace_and_grad_torch, "CPU")
