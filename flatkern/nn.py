"""Deep linear modules, and the exact trace of the Hessian of ordinary ``nn.Linear`` stacks.

``DeepLinear(widths)`` is the network ``x ↦ x Eᵀ`` with ``E = W_L ⋯ W_1`` (plus
biases).  ``hessian_trace_of(model, inputs)`` is the exact trace of the Hessian
of its MSE or cross-entropy loss over ALL its parameters, for a ``DeepLinear``
or any ``nn.Sequential`` of ``nn.Linear`` (docs/MATH.md, "Cross-entropy" and "bias").
"""

from __future__ import annotations

import torch
from torch import nn

from ._checks import check_int, check_reduction
from .measurements import Inputs
from .ops import end_to_end, hessian_trace

__all__ = ["DeepLinear", "hessian_trace_of"]

LOSSES = ("mse", "cross_entropy")


def _check_widths(widths) -> list[int]:
    """``[d_0, ..., d_L]`` as Python ints, or an error naming ``widths``."""
    scalar = isinstance(widths, torch.Tensor) and widths.dim() == 0
    if scalar or isinstance(widths, (str, bytes)) or not hasattr(widths, "__iter__"):
        raise TypeError(
            f"widths must be a sequence of ints [d_0, d_1, ..., d_L] (input, hidden and output widths, "
            f"e.g. [20, 32, 20]), got {widths!r} ({type(widths).__name__})"
        )
    widths = list(widths)
    if len(widths) < 2:
        raise ValueError(f"widths must list at least two widths [d_0, ..., d_L] (one layer), got {widths!r}")
    return [check_int(d, f"widths[{j}]", minimum=1) for j, d in enumerate(widths)]


class DeepLinear(nn.Module):
    """A deep linear network ``h_j = W_j h_{j-1} (+ c_j)``: without biases, ``forward(x) = x Eᵀ``.

    Args:
        widths: ``[d_0, d_1, ..., d_L]`` (a sequence of at least two ints >= 1; numpy integers
            count as ints, bools and floats do not); layer ``j`` is an ``nn.Linear(d_{j-1}, d_j)``
            (PyTorch's default initialization), so ``W_j`` has shape ``(d_j, d_{j-1})``.
        bias: give every layer a bias ``c_j`` of shape ``(d_j,)``.

    Attributes:
        layers: ``nn.ModuleList`` of the ``L`` ``nn.Linear`` layers, ``W_1`` first.
        widths: the widths as a list of Python ints (``dims`` is the same list).
    """

    def __init__(self, widths, bias: bool = False, *, device=None, dtype=None):
        super().__init__()
        self.widths = _check_widths(widths)
        self.layers = nn.ModuleList(
            nn.Linear(self.widths[j], self.widths[j + 1], bias=bias, device=device, dtype=dtype)
            for j in range(len(self.widths) - 1)
        )

    @property
    def dims(self) -> list[int]:
        """The widths ``[d_0, ..., d_L]`` (the earlier name of ``widths``)."""
        return self.widths

    @property
    def weights(self) -> list[nn.Parameter]:
        """``[W_1, ..., W_L]`` in chain order, ``W_j`` of shape ``(d_j, d_{j-1})``."""
        return [layer.weight for layer in self.layers]

    @property
    def biases(self) -> list[nn.Parameter | None]:
        """``[c_1, ..., c_L]`` (``None`` where a layer has no bias)."""
        return [layer.bias for layer in self.layers]

    def end_to_end(self, *, backend: str = "auto") -> torch.Tensor:
        """``E = W_L ⋯ W_1``, shape ``(d_L, d_0)`` (biases not included)."""
        return end_to_end(self.weights, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(..., d_0)`` → ``(..., d_L)``; equals ``x Eᵀ`` when there are no biases."""
        # layer by layer: N d² per layer, never more than forming E (d³) when N < d
        for layer in self.layers:
            x = layer(x)
        return x

    def extra_repr(self) -> str:
        return f"widths={self.widths}, bias={self.layers[0].bias is not None}"


def _linear_layers(model: nn.Module) -> list[nn.Linear]:
    """The ``nn.Linear`` layers of ``model`` in application order; raises on anything else."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    if isinstance(model, DeepLinear):
        return list(model.layers)
    if isinstance(model, nn.Linear):
        return [model]
    if not isinstance(model, nn.Sequential):
        raise TypeError(
            "hessian_trace_of supports a flatkern.nn.DeepLinear, an nn.Linear or an nn.Sequential of "
            f"nn.Linear layers, got the module {type(model).__name__}"
        )
    layers = []
    for name, child in model.named_children():
        if isinstance(child, (nn.Sequential, DeepLinear, nn.Linear)):
            layers.extend(_linear_layers(child))
        else:
            raise TypeError(
                f"hessian_trace_of supports deep linear networks only (nn.Linear layers), but the "
                f"nn.Sequential holds {type(child).__name__} at [{name}]: {child!r}"
            )
    if not layers:
        raise ValueError("hessian_trace_of got an nn.Sequential with no nn.Linear layers")
    return layers


def _check_layers_chain(layers: list[nn.Linear], inputs: torch.Tensor) -> None:
    if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point():
        raise TypeError(f"inputs must be a floating tensor of shape (N, d_0), got {getattr(inputs, 'dtype', type(inputs))}")
    w = layers[0].weight
    if inputs.dim() < 1 or inputs.shape[-1] != w.shape[1]:
        raise ValueError(f"inputs has shape {tuple(inputs.shape)} but the first layer takes d_0={w.shape[1]} features: need (N, {w.shape[1]})")
    if inputs.dtype != w.dtype or inputs.device != w.device:
        raise TypeError(f"inputs are {inputs.dtype} on {inputs.device} but the model is {w.dtype} on {w.device}")
    for j in range(1, len(layers)):
        if layers[j].in_features != layers[j - 1].out_features:
            raise ValueError(
                f"layer {j + 1} takes {layers[j].in_features} features but layer {j} gives {layers[j - 1].out_features}"
            )


def _suffix_products(weights: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """``[P_1, ..., P_L]``, ``P_j = W_L ⋯ W_{j+1}`` of shape ``(d_L, d_j)``; ``P_L = None`` (identity)."""
    L = len(weights)
    P: list = [None] * L
    for j in range(L - 2, -1, -1):
        P[j] = weights[j + 1] if P[j + 1] is None else P[j + 1] @ weights[j + 1]
    return P


def hessian_trace_of(
    model: nn.Module,
    inputs: torch.Tensor,
    *,
    loss: str = "mse",
    reduction: str = "mean",
    per_layer: bool = False,
) -> torch.Tensor:
    """Exact trace of the Hessian of ``loss(model(inputs), targets)`` over ALL parameters of ``model``.

    ``model`` is a ``DeepLinear``, an ``nn.Linear`` or an ``nn.Sequential`` of
    ``nn.Linear`` (biases included).  With ``h_{j-1}(x)`` the input of layer
    ``j`` and ``P_j = W_L ⋯ W_{j+1}`` (docs/MATH.md), the output is affine in each
    layer's ``(W_j, c_j)``, so the trace equals the Gauss-Newton trace:

        tr ∇²L = (1/N) Σ_i Σ_j tr(P_jᵀ H_i P_j) (‖h_{j-1}(x_i)‖² + [layer j has a bias])

    - ``loss="mse"`` (``nn.MSELoss`` over an ``(N, d_L)`` output):
      ``H_i = 2/d_L · I``, so the term is ``(2/d_L) ‖P_j‖_F² (...)``.
    - ``loss="cross_entropy"`` (``nn.CrossEntropyLoss`` on logits, class dim last):
      ``H_i = diag(p_i) - p_i p_iᵀ`` with ``p_i = softmax(model(x_i))``, and
      ``tr(Pᵀ H P) = Σ_k p_k ‖P[k,:]‖² - ‖pᵀ P‖²``.

    Neither depends on the targets (labels or regression targets), so none
    are taken: the same trace holds for any targets, soft labels included.

    Args:
        model: the network (unsupported modules raise, naming the module).
        inputs: ``(N, d_0)``; for ``"mse"`` any ``(..., d_0)`` (leading dims are samples).
            With no samples (``N = 0``) the ``"sum"`` trace is 0, as plain torch's loss is;
            the ``"mean"`` one is undefined and raises a ``ValueError``.
        loss: ``"mse"`` or ``"cross_entropy"``.
        reduction: ``"mean"`` or ``"sum"``, as in the torch loss (``"mean"``
            divides by ``N d_L`` for MSE, by ``N`` for cross-entropy).
        per_layer: return the trace of each layer's diagonal block (weight and bias) separately.

    Returns:
        A scalar, or shape ``(L,)`` with ``per_layer=True``; differentiable with
        respect to the parameters (and the inputs).
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    check_reduction(reduction)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module (DeepLinear or nn.Sequential of nn.Linear), got {type(model).__name__}")
    layers = _linear_layers(model)
    _check_layers_chain(layers, inputs)
    if loss == "cross_entropy" and inputs.dim() != 2:
        raise ValueError(f"loss='cross_entropy' needs inputs of shape (N, d_0) (logits (N, classes)), got {tuple(inputs.shape)}")
    x = inputs.reshape(-1, inputs.shape[-1])
    if x.shape[0] == 0 and reduction == "mean":
        # plain torch's mean over no samples is NaN, and so would be its Hessian: no number to give
        raise ValueError(
            f"inputs has shape {tuple(inputs.shape)}: no samples, and the mean loss over no samples is "
            "undefined; pass at least one sample (or reduction='sum', whose trace is then 0)"
        )
    weights = [layer.weight for layer in layers]
    has_bias = [layer.bias is not None for layer in layers]

    if loss == "mse" and not any(has_bias) and x.shape[0] > 0:
        # exactly the Inputs measurement family: use the fast backend
        return hessian_trace(weights, Inputs(x), reduction=reduction, per_layer=per_layer)

    N, d_L = x.shape[0], weights[-1].shape[0]
    # layer inputs h_0 = x, h_j = W_j h_{j-1} + c_j; the output h_L gives the softmax
    hs = [x]
    for layer in layers:
        hs.append(layer(hs[-1]))
    P = _suffix_products(weights)
    if loss == "cross_entropy":
        p = torch.softmax(hs[-1], dim=-1)  # (N, d_L)

    terms = []
    for j in range(len(layers)):
        h2 = hs[j].square().sum(-1)  # (N,) ‖h_{j-1}(x_i)‖²
        if has_bias[j]:
            h2 = h2 + 1.0
        if loss == "mse":
            fro = torch.as_tensor(float(d_L), dtype=x.dtype, device=x.device) if P[j] is None else P[j].square().sum()
            c = 2.0 * fro * h2.sum()
            c = c / (N * d_L) if reduction == "mean" else c
        else:
            if P[j] is None:  # P_L = I: Σ_k p_k - ‖p‖² = 1 - ‖p‖²
                tr_php = 1.0 - p.square().sum(-1)
            else:
                tr_php = p @ P[j].square().sum(-1) - (p @ P[j]).square().sum(-1)  # (N,)
            c = (tr_php * h2).sum()
            c = c / N if reduction == "mean" else c
        terms.append(c)
    terms = torch.stack(terms)
    return terms if per_layer else terms.sum()
