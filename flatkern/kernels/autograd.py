"""The Python twin of the op's autograd formula (``csrc/ops/autograd/hessian_trace.cpp``).

One formula, in C++, registered for the Autograd key of ``flatkern::hessian_trace``.
This twin is used in exactly two places:

- as that Autograd kernel when the C++ extension is missing (``register``), its
  forward and backward being the op and ``hessian_trace_backward`` below autograd;
- for the Triton kernels on CPU tensors under ``TRITON_INTERPRET=1``
  (``backend="triton"`` on CPU, for tests), where the dispatcher's CPU kernel is
  the C++ one: ``apply`` with the Triton launchers as forward and backward.

The contract is the C++ one: the forward saves the weights, the operands and the
kernel's ``saved``; the backward is ``hessian_trace_backward``; first derivatives
work under ``create_graph=True``, and a second derivative raises
``double_backward_error(backend)``, the same words as the C++ formula.
"""

from __future__ import annotations

import torch

__all__ = ["double_backward_error", "apply", "register", "mlp_apply"]


def double_backward_error(backend: str) -> str:
    """The message a second derivative of the trace meets on ``backend`` (the C++ formula's words)."""
    return (f'flatkern: the "{backend}" backend computes first derivatives of the trace only: double backward '
            '(a second derivative of the trace) is not supported there; backend="torch" supports second derivatives')


class _NoDoubleBackward(torch.autograd.Function):
    """The identity on first-order gradients, whose own backward raises: under ``create_graph=True``
    a second ``autograd.grad`` fails with a message naming the backend, rather than return a wrong value."""

    @staticmethod
    def forward(ctx, backend, num_weights, *tensors):
        ctx.backend = backend
        # the weights are inputs only so that the outputs belong to the graph
        return tuple(t.clone() for t in tensors[num_weights:])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(double_backward_error(ctx.backend))


class _TraceFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernels, family, with_end_to_end, scale, sum_layers, num_weights, *tensors):
        forward, backward, backend = kernels
        weights, operands = list(tensors[:num_weights]), list(tensors[num_weights:])
        terms, E, saved = forward(weights, family, operands, with_end_to_end, scale, sum_layers)
        saved = list(saved)
        ctx.args = (backward, backend, family, with_end_to_end, scale, sum_layers, num_weights, len(operands))
        ctx.save_for_backward(*weights, *operands, *saved)
        ctx.mark_non_differentiable(*saved)
        # an unused output gets no gradient rather than zeros: no E, no work
        ctx.set_materialize_grads(False)
        if not with_end_to_end:
            ctx.mark_non_differentiable(E)
        return (terms, E, *saved)

    @staticmethod
    def backward(ctx, grad_terms, grad_E, *unused):
        backward, backend, family, with_end_to_end, scale, sum_layers, L, num_operands = ctx.args
        tensors = ctx.saved_tensors
        weights, operands = list(tensors[:L]), list(tensors[L:L + num_operands])
        saved = list(tensors[L + num_operands:])
        none = (None,) * 6
        if grad_terms is None and grad_E is None:
            return (*none, *([None] * (L + num_operands)))
        if grad_terms is None:  # only E was used
            batch = weights[0].shape[:-2]
            grad_terms = weights[0].new_zeros(batch if sum_layers else (*batch, L))
        grad_E = grad_E.contiguous() if with_end_to_end and grad_E is not None else None
        with torch.no_grad():
            grads = list(backward(weights, family, operands, saved, grad_terms.contiguous(), grad_E, scale,
                                  sum_layers))
        if torch.is_grad_enabled():  # create_graph=True: first derivatives, and a clear error after
            grads = list(_NoDoubleBackward.apply(backend, L, *weights, *grads))
        return (*none, *grads, *([None] * num_operands))


def apply(forward, backward, backend: str, weights, family: int, operands, with_end_to_end: bool = False,
          scale: float = 1.0, sum_layers: bool = False):
    """``(terms, E, saved)`` from ``forward``, differentiable once through ``backward`` (both with
    the signatures of ``flatkern::hessian_trace`` and ``flatkern::hessian_trace_backward``)."""
    terms, E, *saved = _TraceFunction.apply((forward, backward, backend), family, with_end_to_end, scale,
                                            sum_layers, len(weights), *weights, *operands)
    return terms, E, saved


class _MlpTraceFunction(torch.autograd.Function):
    """The twin of ``csrc/ops/autograd/mlp_hessian_trace.cpp`` (``flatkern::mlp_hessian_trace``)."""

    @staticmethod
    def forward(ctx, kernels, slopes, num_acts, loss, mean, sum_layers, L, x, *tensors):
        forward, backward, backend = kernels
        weights, biases = list(tensors[:L]), list(tensors[L:])
        terms, saved = forward(x, weights, biases, slopes, num_acts, loss, mean, sum_layers)
        saved = list(saved)
        ctx.args = (backward, backend, slopes, num_acts, loss, mean, sum_layers, L)
        ctx.save_for_backward(x, *weights, *biases, *saved)
        ctx.mark_non_differentiable(*saved)
        return (terms, *saved)

    @staticmethod
    def backward(ctx, grad_terms, *unused):
        backward, backend, slopes, num_acts, loss, mean, sum_layers, L = ctx.args
        x, *rest = ctx.saved_tensors
        weights, biases, saved = rest[:L], rest[L:2 * L], rest[2 * L:]
        with torch.no_grad():
            grads = list(backward(x, weights, biases, slopes, num_acts, loss, mean, sum_layers, saved,
                                  grad_terms.contiguous()))
        if torch.is_grad_enabled():  # create_graph=True: first derivatives, and a clear error after
            grads = list(_NoDoubleBackward.apply(backend, 1 + 2 * L, x, *weights, *biases, *grads))
        # no bias: the (0,) placeholder gets no gradient
        grads = [None if i > L and b.numel() == 0 else g for i, (g, b) in enumerate(zip(grads, [x, *weights, *biases]))]
        return (None,) * 7 + tuple(grads)


def mlp_apply(forward, backward, backend: str, x, weights, biases, slopes, num_acts, loss: int = 0, mean: bool = True,
              sum_layers: bool = False):
    """``(terms, saved)`` from ``forward``, differentiable once through ``backward`` (the signatures of
    ``flatkern::mlp_hessian_trace`` and ``flatkern::mlp_hessian_trace_backward``)."""
    terms, *saved = _MlpTraceFunction.apply((forward, backward, backend), list(slopes), list(num_acts), loss, mean,
                                            sum_layers, len(weights), x, *weights, *biases)
    return terms, saved


def register(lib: torch.library.Library) -> None:
    """Register the twin as the Autograd kernels of the ops in ``lib`` (the extension is missing)."""
    from . import schemas

    def forward_below(weights, family, operands, with_end_to_end, scale, sum_layers):
        with torch._C._AutoDispatchBelowAutograd():
            return schemas.hessian_trace(weights, family, operands, with_end_to_end, scale, sum_layers)

    kernels = (forward_below, schemas.hessian_trace_backward, "cpp")

    def hessian_trace_autograd(weights, family, operands, with_end_to_end=False, scale=1.0, sum_layers=False):
        # the op's CPU kernel is the plain-torch reference here, but the op's contract (and its
        # double-backward message) is the one every build has
        return apply(*kernels, list(weights), family, list(operands), with_end_to_end, scale, sum_layers)

    def hessian_trace_and_grad_autograd(weights, family, operands, scale=1.0, sum_layers=False):
        # a value and its gradient, not a node of the caller's graph: run below autograd
        with torch._C._AutoDispatchBelowAutograd():
            return schemas.hessian_trace_and_grad(weights, family, operands, scale, sum_layers)

    lib.impl("hessian_trace", hessian_trace_autograd, "Autograd")
    lib.impl("hessian_trace_and_grad", hessian_trace_and_grad_autograd, "Autograd")

    # flatkern::mlp_hessian_trace (issue 19): the same contract
    def mlp_forward_below(*args):
        with torch._C._AutoDispatchBelowAutograd():
            return schemas.mlp_hessian_trace(*args)

    def mlp_hessian_trace_autograd(x, weights, biases, slopes, num_acts, loss=0, mean=True, sum_layers=False):
        return mlp_apply(mlp_forward_below, schemas.mlp_hessian_trace_backward, "cpp", x, list(weights),
                         list(biases), slopes, num_acts, loss, mean, sum_layers)

    def mlp_hessian_trace_and_grad_autograd(*args):
        with torch._C._AutoDispatchBelowAutograd():
            return schemas.mlp_hessian_trace_and_grad(*args)

    lib.impl("mlp_hessian_trace", mlp_hessian_trace_autograd, "Autograd")
    lib.impl("mlp_hessian_trace_and_grad", mlp_hessian_trace_and_grad_autograd, "Autograd")
