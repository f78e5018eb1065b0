"""Plain-torch formulas: the ground truth every kernel is tested against, and the fallback.

Everything here is vectorized over leading batch dimensions and over
measurements (no Python loop over either); the only loop is over the ``L``
layers of the chain.  Inputs are assumed already validated (see ``ops.py``).

Notation (docs/MATH.md): ``W_j`` of shape ``(..., d_j, d_{j-1})``,
``E = W_L ⋯ W_1``, suffix products ``P_j = W_L ⋯ W_{j+1}`` (``P_L = I``),
prefix products ``Q_j = W_{j-1} ⋯ W_1`` (``Q_1 = I``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .kernels import families

if TYPE_CHECKING:  # annotations only: the formulas call a measurement object's methods, and the
    # kernels read this module, so it imports nothing above it at run time
    from .measurements import Measurements

__all__ = [
    "end_to_end_ref", "chain_products_ref", "layer_terms_ref", "layer_terms_and_end_to_end_ref", "layer_terms_and_grad_ref",
    "hessian_trace_ref", "mse_loss_ref", "trace_scale", "piecewise_layer_terms_ref", "piecewise_layer_terms_and_grad_ref",
]


def end_to_end_ref(weights: list[torch.Tensor]) -> torch.Tensor:
    """``E = W_L ⋯ W_1``, shape ``(..., d_L, d_0)``."""
    E = weights[0]
    for W in weights[1:]:
        E = W @ E
    return E


def chain_products_ref(weights: list[torch.Tensor]) -> tuple[list, list]:
    """Suffix products ``[P_1, ..., P_L]`` and prefix products ``[Q_1, ..., Q_L]``.

    ``P_j``: ``(..., d_L, d_j)``; ``Q_j``: ``(..., d_{j-1}, d_0)``.  The identities
    ``P_L`` and ``Q_1`` are returned as ``None``.
    """
    L = len(weights)
    Q: list = [None] * L
    for j in range(1, L):  # Q_{j+1} = W_j Q_j
        Q[j] = weights[j - 1] if Q[j - 1] is None else weights[j - 1] @ Q[j - 1]
    P: list = [None] * L
    for j in range(L - 2, -1, -1):  # P_j = P_{j+1} W_{j+1}
        P[j] = weights[j + 1] if P[j + 1] is None else P[j + 1] @ weights[j + 1]
    return P, Q


def _layer_terms_from_chain(weights: list[torch.Tensor], measurements: Measurements, P: list, Q: list) -> torch.Tensor:
    """``(..., L)`` contractions from chain products already formed (``chain_products_ref``)."""
    d_L, d_0 = weights[-1].shape[-2], weights[0].shape[-1]
    batch = weights[0].shape[:-2]
    terms = []
    for Pj, Qj in zip(P, Q):
        c = measurements.contract(Pj, Qj, d_L, d_0)
        if Pj is None and Qj is None:
            # depth 1: the trace is a constant; keep it attached to W_1 so that
            # autograd sees a (zero) gradient rather than an unused input
            c = torch.as_tensor(c, dtype=weights[0].dtype, device=weights[0].device)
            c = c + (weights[0] * 0).sum((-2, -1))
        terms.append(c.expand(batch) if c.dim() == 0 else c)
    return torch.stack(terms, dim=-1)


def scaled_terms(terms: torch.Tensor, scale: float, sum_layers: bool) -> torch.Tensor:
    """``scale · terms`` (``(..., L)``), or ``scale · Σ_j terms_j`` (``(...)``) with ``sum_layers``:
    the ``scale``/``sum_layers`` contract of every backend's ``layer_terms``."""
    if scale != 1.0:
        terms = terms * scale
    return terms.sum(-1) if sum_layers else terms


def layer_terms_ref(weights: list[torch.Tensor], measurements: Measurements, *, scale: float = 1.0,
                    sum_layers: bool = False) -> torch.Tensor:
    """Per-layer contractions ``scale · c_j``, ``c_j = (1/n) Σ_i ‖P_jᵀ A_i Q_jᵀ‖_F²``, shape ``(..., L)``.

    The MSE trace of the Hessian is ``2 Σ_j c_j`` (``reduction="mean"``);
    ``sum_layers`` returns ``scale · Σ_j c_j``, shape ``(...)``.
    """
    return scaled_terms(_layer_terms_from_chain(weights, measurements, *chain_products_ref(weights)), scale, sum_layers)


def layer_terms_and_end_to_end_ref(weights: list[torch.Tensor], measurements: Measurements, *, scale: float = 1.0,
                                   sum_layers: bool = False):
    """``(layer_terms_ref(weights, measurements, ...), E)`` with the chain products formed once.

    ``E = W_L Q_L`` (``(..., d_L, d_0)``) costs one product on top of the prefix
    chain the trace already needs, instead of ``L - 1``.
    """
    P, Q = chain_products_ref(weights)
    E = weights[0] if Q[-1] is None else weights[-1] @ Q[-1]
    return scaled_terms(_layer_terms_from_chain(weights, measurements, P, Q), scale, sum_layers), E


def layer_terms_and_grad_ref(weights: list[torch.Tensor], measurements: Measurements, *, scale: float = 1.0,
                             sum_layers: bool = False):
    """``(layer_terms_ref(weights, ...), grads)``, ``grads[j] = ∂ Σ(terms) / ∂W_j``, by autograd on
    detached copies: neither output requires grad, and it works under ``no_grad`` and ``inference_mode``."""
    # inference_mode(False) + clone: weights made under inference_mode cannot enter a graph as they are
    with torch.inference_mode(False), torch.enable_grad():
        leaves = [w.detach().clone().requires_grad_() for w in weights]
        terms = layer_terms_ref(leaves, measurements, scale=scale, sum_layers=sum_layers)
        grads = torch.autograd.grad(terms.sum(), leaves, allow_unused=True, materialize_grads=True)
    return terms.detach(), [g.detach() for g in grads]


def hessian_trace_ref(
    weights: list[torch.Tensor],
    measurements: Measurements,
    reduction: str = "mean",
    per_layer: bool = False,
) -> torch.Tensor:
    """``tr ∇²L(W) = (ℓ''/n) Σ_i Σ_j ‖P_jᵀ A_i Q_jᵀ‖_F²`` with ``ℓ'' = 2`` (MSE), shape ``(...)`` or ``(..., L)``.

    ``reduction="sum"`` multiplies by ``n``.
    """
    scale = trace_scale(measurements, reduction, weights[-1].shape[-2])
    return layer_terms_ref(weights, measurements, scale=scale, sum_layers=not per_layer)


def trace_scale(measurements: Measurements, reduction: str, d_L: int) -> float:
    """The factor of ``Σ_j c_j`` in the MSE trace: ``ℓ'' = 2`` for ``"mean"``, ``2 n`` for ``"sum"``.

    The one place the scale is computed (the ops, ``hessian_trace_ref`` and the optimizer read it)."""
    return 2.0 if reduction == "mean" else 2.0 * measurements.num_measurements(reduction, d_L)


def mse_loss_ref(E: torch.Tensor, measurements: Measurements, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """``nn.MSELoss`` of the predictions ``<A_i, E>`` against ``targets``, shape ``(...)``.

    For ``Isotropic`` the mean loss is ``‖E - M‖_F²`` with ``targets = M``.
    """
    pred = measurements.predict(E)
    sq = (pred - targets).square()
    if measurements.family == families.ISOTROPIC:
        loss = sq.sum((-2, -1))
        return loss if reduction == "mean" else loss * measurements.num_measurements(reduction, E.shape[-2])
    dims = tuple(range(-len(measurements.target_shape(E.shape[-2], E.shape[-1])), 0))
    return sq.mean(dims) if reduction == "mean" else sq.sum(dims)


# ------------------------------------------------------------------ networks piecewise linear in each weight
# (docs/MATH.md, "Beyond linear"): Linear layers with ReLU / LeakyReLU activations between them


def piecewise_layer_terms_ref(weights: list[torch.Tensor], biases: list, slopes: list, x: torch.Tensor,
                              loss: str = "mse", reduction: str = "mean") -> torch.Tensor:
    """Per-layer Hessian traces of a ReLU / LeakyReLU network, shape ``(L,)``, straight from the formula:

        tr_l = (1/N or 1) Σ_i ‖S_iᵀ D_L W_L D_{L-1} ⋯ W_{l+1} D_l‖_F² (‖a_{l-1}(x_i)‖² + [b_l given])

    with ``S_i`` a square root of the output Hessian, formed per sample as a ``(C, C)`` matrix:
    ``√(2/C) I`` (MSE, ``"mean"``; ``√2 I`` with ``"sum"``), ``diag(√p) - p √pᵀ`` (cross-entropy).

    Args:
        weights: ``[W_1, ..., W_L]``, ``W_l`` of shape ``(d_l, d_{l-1})``.
        biases: ``[b_1, ..., b_L]``, each ``(d_l,)`` or ``None``.
        slopes: ``[s_1, ..., s_L]``, ``s_l`` a sequence of the activations after layer ``l``, each
            given by its slope for ``z <= 0`` (``nn.ReLU``: 0); ``σ'(0)`` is that slope, as torch's backward has it.
        x: ``(N, d_0)``, the first layer's input.
        loss, reduction: ``"mse"`` / ``"cross_entropy"``, ``"mean"`` / ``"sum"``.
    """
    N = x.shape[0]
    a, acts, masks = x, [], []
    for W, b, ss in zip(weights, biases, slopes):
        acts.append(a)
        z = a @ W.T if b is None else a @ W.T + b
        m = torch.ones_like(z).detach()
        for s in ss:
            pos = (z > 0).detach()
            m = m * torch.where(pos, torch.ones_like(z), torch.full_like(z, s)).detach()
            z = torch.where(pos, z, s * z)
        masks.append(m)
        a = z
    C = a.shape[-1]
    eye = torch.eye(C, dtype=x.dtype, device=x.device)
    if loss == "mse":
        St = (2.0 / C if reduction == "mean" else 2.0) ** 0.5 * eye.expand(N, C, C)
    else:
        logp = torch.log_softmax(a, dim=-1)
        p = logp.exp()
        # Sᵀ = diag(√p) (I - 1 pᵀ); √p = exp(log p / 2) keeps the derivative finite where p underflows to 0
        St = (0.5 * logp).exp().unsqueeze(-1) * (eye - p.unsqueeze(-2))
    G = St * masks[-1].unsqueeze(-2)  # G_L = Sᵀ D_L: (N, C, C)
    terms = [None] * len(weights)
    for l in range(len(weights) - 1, -1, -1):
        if l < len(weights) - 1:
            G = (G @ weights[l + 1]) * masks[l].unsqueeze(-2)  # G_l = G_{l+1} W_{l+1} D_l: (N, C, d_l)
        h = acts[l].square().sum(-1) + (0.0 if biases[l] is None else 1.0)
        terms[l] = (G.square().sum((-2, -1)) * h).sum()
    terms = torch.stack(terms)
    return terms / N if reduction == "mean" else terms


def piecewise_layer_terms_and_grad_ref(weights, biases, slopes, x, loss: str = "mse", reduction: str = "mean"):
    """``(piecewise_layer_terms_ref(...), grads)``, ``grads[l] = (∂T/∂W_l, ∂T/∂b_l or None)`` for ``T = Σ_l
    terms_l``, by autograd on detached copies (the masks held fixed): neither output requires grad."""
    with torch.inference_mode(False), torch.enable_grad():
        Ws = [w.detach().clone().requires_grad_() for w in weights]
        bs = [None if b is None else b.detach().clone().requires_grad_() for b in biases]
        terms = piecewise_layer_terms_ref(Ws, bs, slopes, x.detach(), loss, reduction)
        leaves = Ws + [b for b in bs if b is not None]
        grads = iter(torch.autograd.grad(terms.sum(), leaves, allow_unused=True, materialize_grads=True))
        gW = [next(grads).detach() for _ in Ws]
        gb = [None if b is None else next(grads).detach() for b in bs]
    return terms.detach(), list(zip(gW, gb))
