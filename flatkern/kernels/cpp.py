"""Python side of the C++ extension ``flatkern._C``: loading and autograd.

The ops themselves are declared in ``csrc/flatkern.cpp`` and their CPU
kernels live in ``csrc/cpu/<op>_cpu.cpp``; importing ``flatkern._C`` registers
them as ``torch.ops.flatkern.<op>``.  This module registers their autograd
formulas and says why the extension is unavailable when it is.
"""

from __future__ import annotations

import torch

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
