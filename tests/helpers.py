"""Problem builders and the autograd ground truth shared by the tests."""

from __future__ import annotations

import torch

import flatkern as fk

FAMILIES = ("isotropic", "entries", "rankone", "dense", "inputs")

# depth 1 to 5, prime and non-square widths
DIMS = [
    [5, 3],
    [5, 7, 3],
    [2, 7, 11, 3],
    [3, 5, 2, 7, 4],
    [4, 3, 5, 2, 3, 7],
]


def make_weights(dims, batch=(), dtype=torch.float64, seed=0, requires_grad=False):
    """Random ``[W_1, ..., W_L]`` for widths ``dims = [d_0, ..., d_L]``, scaled so products stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    ws = [
        (torch.randn(*batch, dims[j + 1], dims[j], generator=g, dtype=torch.float64) / dims[j] ** 0.5).to(dtype)
        for j in range(len(dims) - 1)
    ]
    return [w.requires_grad_(requires_grad) for w in ws]


def make_measurements(family, d_L, d_0, n=7, dtype=torch.float64, seed=1):
    """A measurement family of ``n`` measurements for ``E`` of shape ``(d_L, d_0)``, with matching targets."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    if family == "isotropic":
        return fk.Isotropic(n=n), randn(d_L, d_0)
    if family == "entries":
        rows = torch.randint(d_L, (n,), generator=g)
        cols = torch.randint(d_0, (n,), generator=g)
        return fk.Entries(rows, cols, (d_L, d_0)), randn(n)
    if family == "rankone":
        return fk.RankOne(randn(n, d_L), randn(n, d_0)), randn(n)
    if family == "dense":
        return fk.Dense(randn(n, d_L, d_0)), randn(n)
    if family == "inputs":
        return fk.Inputs(randn(n, d_0)), randn(n, d_L)
    raise ValueError(family)


def autograd_hessian_trace(weights, measurements, targets, reduction="mean", per_layer=False):
    """Trace of ``torch.func.hessian`` of ``mse_loss``, one unbatched problem; shape ``()`` or ``(L,)``."""
    weights = [w.detach() for w in weights]
    L = len(weights)

    def loss(*ws):
        return fk.mse_loss(list(ws), measurements, targets, reduction, backend="torch")

    H = torch.func.hessian(loss, argnums=tuple(range(L)))(*weights)
    blocks = torch.stack([H[j][j].reshape(weights[j].numel(), -1).diagonal().sum() for j in range(L)])
    return blocks if per_layer else blocks.sum()


def terms_and_grads(fn, W, meas, seed=0):
    """``fn(W, meas)`` and the gradient of a random linear functional of it."""
    terms = fn(W, meas)
    g = torch.Generator().manual_seed(seed)
    # bf16-representable, so that every dtype differentiates the same functional
    weight = torch.randn(terms.shape, generator=g).to(torch.bfloat16).to(terms)
    grads = torch.autograd.grad((terms * weight).sum(), W)
    return terms.detach(), grads
