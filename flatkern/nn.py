"""Deep linear modules, and the exact trace of the Hessian of ``nn.Linear`` / ReLU networks.

``DeepLinear(widths)`` is the network ``x ↦ x Eᵀ`` with ``E = W_L ⋯ W_1`` (plus
biases).  ``hessian_trace_of(model, inputs)`` is the exact trace of the Hessian
of its MSE or cross-entropy loss over ALL its parameters, for a ``DeepLinear``
or any ``nn.Sequential`` of ``nn.Linear``, ``nn.ReLU``, ``nn.LeakyReLU`` and
shape-keeping modules (docs/MATH.md, "Cross-entropy", "bias" and "Beyond
linear"); ``hessian_trace_and_grad_of`` adds its gradient without an autograd
graph.  The model walker and the formula for activations are ``flatkern.piecewise``.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from . import piecewise
from ._checks import check_backend, check_reduction, check_widths
from .measurements import Inputs
from .ops import end_to_end, hessian_trace

__all__ = ["DeepLinear", "BatchedLinear", "hessian_trace_of", "hessian_trace_and_grad_of"]

LOSSES = ("mse", "cross_entropy")


def _check_batch(batch) -> tuple[int, ...]:
    """``batch`` as a tuple of ints >= 1 (``()``: one network), or an error naming ``batch``."""
    if isinstance(batch, int) and not isinstance(batch, bool):
        batch = (batch,)
    if not isinstance(batch, (tuple, list, torch.Size)) or any(
            isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batch):
        raise ValueError(f"DeepLinear batch must be a tuple of ints >= 1 (the problems' batch shape), got {batch!r}")
    return tuple(batch)


def _check_widths(widths) -> list[int]:
    """``[d_0, ..., d_L]`` as Python ints, or an error naming ``widths`` (the one rule: ``_checks.check_widths``)."""
    return check_widths(widths)


class BatchedLinear(nn.Module):
    """``B`` independent ``nn.Linear(in_features, out_features)`` layers in one module (one per problem).

    ``weight``: ``(*batch, out_features, in_features)``; ``bias``: ``(*batch, out_features)`` or
    ``None``; both drawn, problem by problem, from ``nn.Linear``'s default distribution
    (``U(-1/√in_features, 1/√in_features)``).  ``forward(x)``: ``x (*batch, ..., in_features)`` →
    ``x W[p]ᵀ + c[p]`` for problem ``p``, shape ``(*batch, ..., out_features)``.
    """

    def __init__(self, in_features: int, out_features: int, batch: tuple[int, ...], bias: bool = False, *,
                 device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.batch = in_features, out_features, tuple(batch)
        bound = 1.0 / in_features ** 0.5  # nn.Linear's kaiming_uniform_(a=√5) and its bias: both 1/√fan_in
        weight = torch.empty(*self.batch, out_features, in_features, device=device, dtype=dtype)
        self.weight = nn.Parameter(weight.uniform_(-bound, bound))
        if bias:
            self.bias = nn.Parameter(torch.empty(*self.batch, out_features, device=device, dtype=dtype)
                                     .uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[: len(self.batch)]) != self.batch or x.dim() < len(self.batch) + 2:
            raise ValueError(f"BatchedLinear of batch {self.batch} takes x of shape (*{self.batch}, N, "
                             f"{self.in_features}), got {tuple(x.shape)}")
        extra = x.dim() - len(self.batch) - 1  # sample dims between the batch and the features
        W = self.weight.reshape(*self.batch, *(1,) * (extra - 1), self.out_features, self.in_features)
        y = x @ W.transpose(-1, -2)
        if self.bias is not None:
            y = y + self.bias.reshape(*self.batch, *(1,) * extra, self.out_features)
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, batch={self.batch}, "
                f"bias={self.bias is not None}")


class DeepLinear(nn.Module):
    """A deep linear network ``h_j = W_j h_{j-1} (+ c_j)``: without biases, ``forward(x) = x Eᵀ``.

    Args:
        widths: ``[d_0, d_1, ..., d_L]`` (a sequence of at least two ints >= 1; numpy integers
            count as ints, bools and floats do not); layer ``j`` is an ``nn.Linear(d_{j-1}, d_j)``
            (PyTorch's default initialization), so ``W_j`` has shape ``(d_j, d_{j-1})``.
        bias: give every layer a bias ``c_j`` of shape ``(d_j,)``.
        batch: ``B`` independent networks at once (issue 21): layer ``j`` is a ``BatchedLinear``
            with ``W_j`` of shape ``(*batch, d_j, d_{j-1})``, each problem drawn as ``nn.Linear``
            draws its weights; ``forward`` takes ``x (*batch, N, d_0)``.  ``weights`` is then the
            batched chain that ``hessian_trace`` and ``FlatnessRegularized`` take (with one
            measurement set per problem, or one shared).  ``()`` (the default): one network.

    Attributes:
        layers: ``nn.ModuleList`` of the ``L`` ``nn.Linear`` (or ``BatchedLinear``) layers, ``W_1`` first.
        widths: the widths as a list of Python ints (``dims`` is the same list).
    """

    def __init__(self, widths, bias: bool = False, *, batch=(), device=None, dtype=None):
        super().__init__()
        self.widths = _check_widths(widths)
        self.batch = _check_batch(batch)
        if self.batch:
            self.layers = nn.ModuleList(
                BatchedLinear(self.widths[j], self.widths[j + 1], self.batch, bias=bias, device=device, dtype=dtype)
                for j in range(len(self.widths) - 1)
            )
            return
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
        """``E = W_L ⋯ W_1``, shape ``(*batch, d_L, d_0)`` (biases not included)."""
        return end_to_end(self.weights, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(..., d_0)`` → ``(..., d_L)``; equals ``x Eᵀ`` when there are no biases."""
        # layer by layer: N d² per layer, never more than forming E (d³) when N < d
        for layer in self.layers:
            x = layer(x)
        return x

    def extra_repr(self) -> str:
        batch = f", batch={self.batch}" if self.batch else ""
        return f"widths={self.widths}, bias={self.layers[0].bias is not None}{batch}"


def _suffix_products(weights: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """``[P_1, ..., P_L]``, ``P_j = W_L ⋯ W_{j+1}`` of shape ``(d_L, d_j)``; ``P_L = None`` (identity)."""
    L = len(weights)
    P: list = [None] * L
    for j in range(L - 2, -1, -1):
        P[j] = weights[j + 1] if P[j + 1] is None else P[j + 1] @ weights[j + 1]
    return P



def _linear_layer_terms(layers: list[nn.Linear], x: torch.Tensor, loss: str, reduction: str) -> torch.Tensor:
    """The deep linear network's per-layer traces (no activation after the first layer), shape ``(L,)``:
    ``Σ_i tr(P_jᵀ H_i P_j) (‖h_{j-1}(x_i)‖² + [bias])`` with the suffix products ``P_j`` shared by all samples."""
    N = x.shape[0]
    weights = [layer.weight for layer in layers]
    has_bias = [layer.bias is not None for layer in layers]
    d_L = weights[-1].shape[0]
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
    return torch.stack(terms)


def _checked(model, inputs, loss: str, reduction: str, backend: str):
    """Validate the arguments; the model walked into a ``piecewise.Network`` (an error naming what does not fit)."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    check_reduction(reduction)
    check_backend(backend)
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be an nn.Module (an nn.Sequential of nn.Linear / nn.ReLU / nn.LeakyReLU ..., or a "
            f"DeepLinear), got {type(model).__name__}"
        )
    net = piecewise.walk(model)
    if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point():
        raise TypeError(
            f"inputs must be a floating tensor of shape (N, d_0), got {getattr(inputs, 'dtype', type(inputs).__name__)}"
        )
    w = net.layers[0].weight
    for p in net.parameters():
        if p.dtype != inputs.dtype or p.device != inputs.device:
            raise TypeError(f"inputs are {inputs.dtype} on {inputs.device} but the model is {p.dtype} on {p.device}")
    if inputs.dim() < 1:
        raise ValueError(f"inputs has shape {tuple(inputs.shape)} but the first layer takes d_0={w.shape[1]} features: need (N, {w.shape[1]})")
    return net


def _no_samples(inputs: torch.Tensor) -> None:
    # plain torch's mean over no samples is NaN, and so would be its Hessian: no number to give
    raise ValueError(
        f"inputs has shape {tuple(inputs.shape)}: no samples, and the mean loss over no samples is "
        "undefined; pass at least one sample (or reduction='sum', whose trace is then 0)"
    )


def hessian_trace_of(
    model: nn.Module,
    inputs: torch.Tensor,
    *,
    loss: str = "mse",
    reduction: str = "mean",
    per_layer: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Exact trace of the Hessian of ``loss(model(inputs), targets)`` over ALL parameters of ``model``.

    ``model``: an ``nn.Sequential`` (nested too) of ``nn.Linear`` (with or without bias),
    ``nn.ReLU``, ``nn.LeakyReLU`` (any slope), ``nn.Identity``, ``nn.Flatten`` and ``nn.Dropout``
    in eval mode; a ``DeepLinear``; an ``nn.Linear``.  Such a network is piecewise linear in each
    single weight, so the trace is the Gauss-Newton trace (docs/MATH.md, "Beyond linear"):

        tr ∇²L = s Σ_i Σ_l ‖S_iᵀ D_L W_L D_{L-1} ⋯ W_{l+1} D_l‖_F² (‖a_{l-1}(x_i)‖² + [layer l has a bias])

    with ``a_{l-1}`` the input of the ``l``-th Linear, ``D_l = diag(σ'(z_l))`` the activation
    masks after it, and the output Hessian ``H_i = S_i S_iᵀ``:

    - ``loss="mse"`` (``nn.MSELoss`` over an ``(N, C)`` output, any ``C``): ``S = I``,
      ``s = 2 / (N C)`` (``"mean"``) or ``2`` (``"sum"``).
    - ``loss="cross_entropy"`` (``nn.CrossEntropyLoss`` on logits, class dim last):
      ``S = diag(√p) - p √pᵀ`` with ``p = softmax(model(x_i))`` (``S Sᵀ = diag(p) - p pᵀ``),
      ``s = 1/N`` or ``1``.

    Neither depends on the targets (labels or regression targets), so none are taken: the
    same trace holds for any targets, soft labels included.  Exact almost everywhere: at a kink
    (``z = 0`` exactly) the mask is torch's one-sided derivative, ``σ'(0) = 0`` for ``nn.ReLU``
    and ``negative_slope`` for ``nn.LeakyReLU``, the convention ``torch.func.hessian`` uses too.
    Without activations the network is a deep linear network and the answer is the deep
    linear formula's, bit for bit.

    Anything else raises, naming the module and why: a smooth activation (the output's second
    derivative in a weight does not vanish), BatchNorm, train-mode Dropout, a layer or weight
    used at two positions (a tied weight has no target-free trace), forward hooks.

    Args:
        model: the network.
        inputs: ``(N, d_0)``; for ``"mse"`` any ``(..., d_0)`` (leading dims are samples), and
            ``(N, ...)`` if a Flatten comes before the first Linear.  With no samples (``N = 0``)
            the ``"sum"`` trace is 0, as plain torch's loss is; the ``"mean"`` one is undefined and
            raises a ``ValueError``.  NaN in ``inputs`` gives NaN, as plain torch's Hessian does.
        loss: ``"mse"`` or ``"cross_entropy"``.
        reduction: ``"mean"`` or ``"sum"``, as in the torch loss (``"mean"``
            divides by ``N C`` for MSE, by ``N`` for cross-entropy).
        per_layer: return the trace of each Linear's diagonal block (weight and bias) separately.
        backend: ``"auto"``, ``"torch"``, ``"cpp"`` or ``"triton"``.  A deep linear network with
            ``loss="mse"`` and no biases takes ``flatkern.hessian_trace`` with ``Inputs``; any other
            network the fused op ``flatkern::mlp_hessian_trace`` (C++ on CPU, Triton on CUDA), except
            that ``"auto"`` keeps a deep linear network on its plain-torch formula.  ``"torch"`` is
            the plain-torch formula (``flatkern.piecewise``), the only one with second derivatives.
            A named kernel that cannot run raises, naming why.

    Returns:
        A scalar, or shape ``(L,)`` (one per ``nn.Linear``, in order) with ``per_layer=True``;
        differentiable with respect to the parameters and the inputs (masks held fixed: exact
        almost everywhere).
    """
    net = _checked(model, inputs, loss, reduction, backend)
    x = piecewise.first_input(net, inputs, loss)  # (M, d_0): the first layer's input, samples flattened
    if x.shape[0] == 0 and reduction == "mean":
        _no_samples(inputs)
    if net.linear:
        layers = [layer.linear for layer in net.layers]
        wants_x_grad = (torch.is_grad_enabled() and x.requires_grad) or _transformed([x] + [la.weight for la in layers])
        if loss == "mse" and not any(layer.bias is not None for layer in layers) and x.shape[0] > 0 and not wants_x_grad:
            # exactly the Inputs measurement family: use the fast backend.  Inputs keeps a private
            # copy of x, so an x that needs a derivative takes the plain-torch formula below (issue 18 item 3)
            return hessian_trace([layer.weight for layer in layers], Inputs(x), reduction=reduction,
                                 per_layer=per_layer, backend=backend)
        if backend in ("auto", "torch"):
            return _per_layer_or_sum(_linear_layer_terms(layers, x, loss, reduction), per_layer)
        # a kernel named: the fused ReLU-network op takes a network without activations too
    # the fused op (C++ on CPU, Triton on CUDA) or plain torch, as routing.resolve_mlp picks
    return piecewise.kernel_layer_terms(net, x, loss, reduction, backend=backend, sum_layers=not per_layer)


def _per_layer_or_sum(terms: torch.Tensor, per_layer: bool) -> torch.Tensor:
    return terms if per_layer else terms.sum()


def _transformed(tensors) -> bool:
    """Whether a tensor carries a forward-mode tangent or is wrapped by a ``torch.func`` transform (jvp,
    grad, vmap): the compiled op's forward-mode and batching rules are not plain torch's (issue 18
    item 1), so such a call takes the plain-torch formula, whose derivatives are torch's own."""
    for t in tensors:
        if torch._C._functorch.is_functorch_wrapped_tensor(t) or fwAD.unpack_dual(t).tangent is not None:
            return True
    return False


def hessian_trace_and_grad_of(
    model: nn.Module,
    inputs: torch.Tensor,
    *,
    loss: str = "mse",
    reduction: str = "mean",
    per_layer: bool = False,
    backend: str = "auto",
):
    """``hessian_trace_of(model, inputs, ...)`` and its gradient with respect to every parameter, in one call.

    The gradient is the hand-derived reverse sweep of the trace (docs/MATH.md, "Beyond
    linear"; ``flatkern.piecewise.layer_terms_and_grad``), masks held fixed (exact almost
    everywhere), not autograd through the forward: no graph is built, the outputs never require
    grad, and the call works under ``torch.no_grad()`` and ``torch.inference_mode()``.  It costs
    about three times the value's reverse sweep.

    Args:
        model, inputs, loss, reduction, per_layer: as in ``hessian_trace_of``.
        backend: as in ``hessian_trace_of``: ``"auto"`` runs the fused op's value-and-gradient kernel
            (a deep linear network stays on the plain-torch sweep), ``"torch"`` plain torch.

    Returns:
        ``(trace, grads)``: ``trace`` a scalar (``(L,)`` with ``per_layer``; the value agrees with
        ``hessian_trace_of`` to rounding), ``grads`` a list aligned with ``list(model.parameters())``,
        ``grads[k]`` the gradient of the (summed) trace with respect to that parameter.
    """
    net = _checked(model, inputs, loss, reduction, backend)
    x = piecewise.first_input(net, inputs.detach(), loss)
    if x.shape[0] == 0 and reduction == "mean":
        _no_samples(inputs)
    if net.linear and backend == "auto":
        # a deep linear network: the plain-torch sweep keeps one G_l for all samples above every mask,
        # which the fused op (per-sample G_l) does not
        terms, grads = piecewise.layer_terms_and_grad(net, x, loss, reduction)
    else:
        terms, grads = piecewise.kernel_layer_terms_and_grad(net, x, loss, reduction, backend=backend)
    by_param = {}
    for layer, (gW, gb) in zip(net.layers, grads):
        by_param[id(layer.weight)] = gW
        if gb is not None:
            by_param[id(layer.bias)] = gb
    out = [by_param[id(p)] if id(p) in by_param else torch.zeros_like(p).detach() for p in model.parameters()]
    return (terms if per_layer else terms.sum()), out
