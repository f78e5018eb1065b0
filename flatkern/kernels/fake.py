"""Fake (meta) kernels of flatkern's ops, for ``torch.compile`` and ``torch.library.opcheck``,
and the autograd formula of ``flatkern::end_to_end``.

The fake kernels give each output's shape; the size of ``saved`` is whatever the
device's kernel saves, which only that kernel's record knows
(``routing.op_kernel(device).saved_specs``): the C++ ``Layout`` on CPU, the
Triton package's ``saved_specs`` on CUDA, nothing for the plain-torch kernel.
"""

from __future__ import annotations

import torch

from . import routing

__all__: list[str] = []


@torch.library.register_fake("flatkern::hessian_trace")
def _hessian_trace_fake(weights, family, operands, with_end_to_end=False, scale=1.0, sum_layers=False):
    like, batch = weights[0], weights[0].shape[:-2]
    terms = like.new_empty(batch if sum_layers else (*batch, len(weights)))
    E = like.new_empty((*batch, weights[-1].shape[-2], like.shape[-1]) if with_end_to_end else (0,))
    specs = routing.op_kernel(like.device).saved_specs(weights, family, operands)
    return terms, E, [like.new_empty(shape, dtype=dtype) for shape, dtype in specs]


@torch.library.register_fake("flatkern::hessian_trace_backward")
def _hessian_trace_backward_fake(weights, family, operands, saved, grad_terms, grad_E, scale=1.0, sum_layers=False):
    return [torch.empty_like(w) for w in weights]


@torch.library.register_fake("flatkern::hessian_trace_and_grad")
def _hessian_trace_and_grad_fake(weights, family, operands, scale=1.0, sum_layers=False):
    batch = weights[0].shape[:-2]
    terms = weights[0].new_empty(batch if sum_layers else (*batch, len(weights)))
    return terms, [torch.empty_like(w) for w in weights]


# ---------------------------------------------- mlp_hessian_trace (issue 19): saved = [z_1 .. z_L] on every kernel


def _mlp_terms_fake(x, weights, sum_layers):
    return x.new_empty(() if sum_layers else (len(weights),))


def _mlp_grads_fake(x, weights, biases, with_x=True):
    return [torch.empty_like(x)] * with_x + [torch.empty_like(w) for w in weights] + [torch.empty_like(b) for b in biases]


@torch.library.register_fake("flatkern::mlp_hessian_trace")
def _mlp_hessian_trace_fake(x, weights, biases, slopes, num_acts, loss=0, mean=True, sum_layers=False):
    # the mlp records' saved_specs read the weights and, as their one operand, x
    specs = routing.op_kernel(x.device, routing.MLP_OP).saved_specs(weights, None, (x,))
    return _mlp_terms_fake(x, weights, sum_layers), [x.new_empty(shape, dtype=dtype) for shape, dtype in specs]


@torch.library.register_fake("flatkern::mlp_hessian_trace_backward")
def _mlp_hessian_trace_backward_fake(x, weights, biases, slopes, num_acts, loss, mean, sum_layers, saved, grad_terms):
    return _mlp_grads_fake(x, weights, biases)


@torch.library.register_fake("flatkern::mlp_hessian_trace_and_grad")
def _mlp_hessian_trace_and_grad_fake(x, weights, biases, slopes, num_acts, loss=0, mean=True, sum_layers=False):
    return _mlp_terms_fake(x, weights, sum_layers), _mlp_grads_fake(x, weights, biases, with_x=False)


@torch.library.register_fake("flatkern::end_to_end")
def _end_to_end_fake(weights):
    return weights[0].new_empty((*weights[0].shape[:-2], weights[-1].shape[-2], weights[0].shape[-1]))


# ---------------------------------------------- end_to_end: autograd (every build)


def _end_to_end_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[0])


def _end_to_end_backward(ctx, grad_E):
    # dE/dW_j contracted with G is P_jᵀ G Q_jᵀ: reverse accumulation along the
    # suffix chain (G_j = P_jᵀ G) against the prefix products Q_j = W_{j-1} ⋯ W_1
    weights = ctx.saved_tensors
    L = len(weights)
    Q = [None] * L
    for j in range(1, L):
        Q[j] = weights[j - 1] if Q[j - 1] is None else weights[j - 1] @ Q[j - 1]
    grads, G = [None] * L, grad_E
    for j in range(L - 1, -1, -1):
        grads[j] = G if Q[j] is None else G @ Q[j].transpose(-1, -2)
        if j > 0:
            G = weights[j].transpose(-1, -2) @ G
    return (grads,)


torch.library.register_autograd("flatkern::end_to_end", _end_to_end_backward, setup_context=_end_to_end_setup_context)
