"""Training loops shared by the experiments: gradient descent and flatness-regularized descent.

Every loop is full-batch gradient descent on ``mse_loss`` (``reduction="mean"``)
with heavy-ball momentum 0.9 (as ``torch.optim.SGD(momentum=0.9)``) and a step
size set from the current weights, so that one rule works for every depth,
initialization scale and measurement count without tuning:

    η_t = eta / S(W_t),    S(W) = 2 κ Σ_j ‖P_j‖₂² ‖Q_j‖₂²

``S`` bounds the largest eigenvalue of the Gauss-Newton matrix (which is the
Hessian at zero loss): ``∂E/∂W_j`` maps ``Δ`` to ``P_j Δ Q_j`` and
``κ = λ_max((1/n) Σ_i vec(A_i) vec(A_i)ᵀ)`` is the largest curvature of the
loss in ``E``.  Batched weights ``(B, d_j, d_{j-1})`` are ``B`` independent
problems, each with its own step size.  Heavy ball is stable for
``η λ_max < 2 (1 + momentum)``; ``eta = 0.5`` leaves a wide margin.
"""

from __future__ import annotations

import torch

from ..measurements import Dense, Entries, Isotropic, Measurements
from ..ops import hessian_trace, mse_loss
from ..optim import FlatnessRegularized
from ..reference import chain_products_ref

__all__ = ["kernel_norm", "curvature_bound", "standard_init", "train_gd", "train_flatness"]


def kernel_norm(measurements: Measurements) -> float:
    """``κ = λ_max((1/n) Σ_i vec(A_i) vec(A_i)ᵀ)``: the loss ``(1/n) Σ (<A_i,E> - b_i)²`` has curvature ``2κ`` in ``E``."""
    if isinstance(measurements, Dense):
        flat = measurements.A.reshape(measurements.n, -1)
        # the n x n Gram and the (d_L d_0)^2 kernel share their nonzero spectrum: take the smaller
        gram = flat @ flat.T if flat.shape[0] <= flat.shape[1] else flat.T @ flat
        return float(torch.linalg.eigvalsh(gram / measurements.n)[-1])
    if isinstance(measurements, Isotropic):
        return 1.0  # the loss is ‖E - M‖_F²
    if isinstance(measurements, Entries):
        # the kernel is diagonal: (times entry (a, b) is observed) / n
        flat = measurements.rows * measurements.shape[1] + measurements.cols
        return float(torch.bincount(flat).max()) / measurements.n
    raise TypeError(f"kernel_norm supports Dense and Entries measurements, got {type(measurements).__name__}")


@torch.no_grad()
def curvature_bound(weights: list[torch.Tensor], kappa: float, *, ord=2) -> torch.Tensor:
    """``S(W) = 2 κ Σ_j ‖P_j‖² ‖Q_j‖²``, shape ``(...)``: with the spectral norm (``ord=2``) an upper bound on the Gauss-Newton sharpness."""
    P, Q = chain_products_ref(weights)
    total = torch.zeros(weights[0].shape[:-2], dtype=weights[0].dtype, device=weights[0].device)
    for p, q in zip(P, Q):
        a = 1.0 if p is None else torch.linalg.matrix_norm(p, ord).square()
        c = 1.0 if q is None else torch.linalg.matrix_norm(q, ord).square()
        total = total + a * c
    return 2.0 * kappa * total


class StepSize:
    """``η_t = eta / S(W_t)``, with the spectral ``S`` recomputed every ``every`` steps.

    Between two exact evaluations ``S`` is scaled by how much its Frobenius
    version (a few small matmuls, no SVD) has changed: the weights move little
    in ``every`` steps, except when they grow out of a small initialization or
    align, which the Frobenius version of the chain follows.  (A product of
    per-layer norms does not see alignment, and let deep runs diverge.)
    """

    def __init__(self, kappa: float, eta: float, every: int = 10):
        self.kappa, self.eta, self.every, self.t = kappa, eta, every, 0

    def __call__(self, weights: list[torch.Tensor]) -> torch.Tensor:
        fro = curvature_bound(weights, self.kappa, ord="fro")
        if self.t % self.every == 0:
            self.spectral_over_fro = curvature_bound(weights, self.kappa, ord=2) / fro
        self.t += 1
        return self.eta / (self.spectral_over_fro * fro)


def standard_init(widths: list[int], *, scale=1.0, batch: tuple[int, ...] = (), generator=None, dtype=torch.float64) -> list[torch.Tensor]:
    """``W_j ~ N(0, scale_j² / d_{j-1})`` entrywise, shape ``(*batch, d_j, d_{j-1})`` (LeCun normal, times ``scale``).

    ``scale`` is a number, or a tensor of shape ``batch`` (one scale per problem).
    """
    scale = torch.as_tensor(scale, dtype=dtype)
    scale = scale.reshape(*scale.shape, 1, 1)
    return [
        (torch.randn(*batch, d_out, d_in, generator=generator, dtype=dtype) * scale / d_in**0.5).requires_grad_()
        for d_in, d_out in zip(widths[:-1], widths[1:])
    ]


def _batch_view(lr: torch.Tensor) -> torch.Tensor:
    return lr.reshape(*lr.shape, 1, 1)


def train_gd(
    weights: list[torch.Tensor],
    measurements: Measurements,
    targets: torch.Tensor,
    *,
    steps: int,
    eta: float = 0.5,
    label_noise=0.0,
    weight_decay: tuple[float, float] = (0.0, 0.0),
    sam: float = 0.0,
    momentum: float = 0.9,
    generator=None,
    kappa: float | None = None,
    backend: str = "auto",
    callback=None,
) -> list[torch.Tensor]:
    """Full-batch gradient descent on ``mse_loss``, in place, for ``steps`` steps.

    Args:
        weights: ``[W_1, ..., W_L]`` leaf tensors, possibly batched ``(B, d_j, d_{j-1})``.
        targets: ``(n,)``, shared by the batch.
        label_noise: standard deviation of fresh Gaussian noise added to the targets
            at every step (label-noise gradient descent, whose implicit regularizer
            is the trace of the Hessian); a number or a tensor of shape ``(B,)``.
        weight_decay: ``(start, end)``: adds ``mu · Σ_j ‖W_j‖_F²`` to the loss, ``mu``
            decaying geometrically from ``start`` to ``end`` (``(0, 0)``: none).
        sam: radius ``ρ`` of sharpness-aware minimization (``0``: none): the two-step
            update takes the gradient at ``W + ρ g / ‖g‖``, ``g = ∇L(W)``, ``‖g‖`` over
            every layer of a problem (Foret et al. 2021), in place of ``∇L(W)``.
        callback: called as ``callback(t, weights)`` after step ``t = 1, ..., steps``.
    """
    kappa = kernel_norm(measurements) if kappa is None else kappa
    noise = torch.as_tensor(label_noise, dtype=targets.dtype)
    noisy = bool((noise != 0).any())
    noise = noise.reshape(*noise.shape, 1)
    velocity = [torch.zeros_like(w) for w in weights]
    step_size = StepSize(kappa, eta)
    for t in range(steps):
        lr = step_size(weights)
        b = targets + noise * torch.randn(noise.shape[:-1] + targets.shape, generator=generator, dtype=targets.dtype) if noisy else targets

        def gradient(ws):
            loss = mse_loss(ws, measurements, b, backend=backend).sum()
            if weight_decay[0] > 0:
                mu = weight_decay[0] * (weight_decay[1] / weight_decay[0]) ** (t / max(steps - 1, 1))
                loss = loss + mu * sum(w.square().sum() for w in ws)
            return torch.autograd.grad(loss, ws)

        grads = gradient(weights)
        if sam > 0:
            with torch.no_grad():
                norm = torch.stack([g.square().sum((-2, -1)) for g in grads]).sum(0).sqrt().clamp_min(1e-300)
                ascent = [(w + _batch_view(sam / norm) * g).requires_grad_() for w, g in zip(weights, grads)]
            grads = gradient(ascent)
        with torch.no_grad():
            for w, v, g in zip(weights, velocity, grads):
                v.mul_(momentum).add_(g)  # heavy ball, as torch.optim.SGD(momentum=...)
                w.sub_(_batch_view(lr) * v)
        if callback is not None:
            callback(t + 1, weights)
    return weights


def train_flatness(
    weights: list[torch.Tensor],
    measurements: Measurements,
    targets: torch.Tensor,
    *,
    steps: int,
    lam_start: float,
    lam_end: float,
    polish_steps: int,
    eta: float = 0.5,
    momentum: float = 0.9,
    regularizer: Measurements | None = None,
    kappa: float | None = None,
    backend: str = "auto",
    callback=None,
) -> list[torch.Tensor]:
    """Minimize ``mse_loss + lam · tr ∇²L`` with ``flatkern.optim.FlatnessRegularized``, ``lam`` decreasing.

    ``lam`` decays geometrically from ``lam_start`` to ``lam_end`` over ``steps``
    steps, then ``polish_steps`` steps with ``lam = 0`` bring the loss to zero
    from the (nearly flattest) point reached.  Base optimizer: ``torch.optim.SGD``
    (full batch, ``momentum``) with the step size ``eta / (S(W) + lam R(W))``,
    ``R`` an estimate of the regularizer's curvature (below).

    Args:
        regularizer: the measurements whose trace is regularized (default: the
            training ``measurements``, i.e. the trace of the training loss).
        callback: called as ``callback(t, weights)`` after step ``t = 1, ..., steps + polish_steps``.
    """
    kappa = kernel_norm(measurements) if kappa is None else kappa
    reg = measurements if regularizer is None else regularizer
    opt = FlatnessRegularized(weights, torch.optim.SGD, lam=lam_start, measurements=reg, lr=0.0, momentum=momentum, backend=backend, sharded=False)
    total = steps + polish_steps
    step_size = StepSize(kappa, eta)
    # the trace is a homogeneous polynomial of degree k = 2(L-1) in the weights: along a
    # scaling of the weights its curvature is k(k-1) tr / ‖W‖²; lam times that (with the
    # smallest layer norm) estimates the regularizer's share of the sharpness, which
    # dominates for deep chains at large lam and made them diverge without it
    k = 2 * (len(weights) - 1)
    reg_curvature = 0.0
    for t in range(total):
        lam = lam_start * (lam_end / lam_start) ** (t / max(steps - 1, 1)) if t < steps else 0.0
        if t % step_size.every == 0 and lam > 0:
            with torch.no_grad():
                tr = hessian_trace(weights, reg, backend=backend)
                smallest = torch.stack([w.square().sum((-2, -1)) for w in weights]).min(0).values
                reg_curvature = float((k * (k - 1) * tr / smallest).max())
        sharpness = eta / float(step_size(weights).min())  # S(W), the loss's share
        lr = eta / (sharpness + lam * reg_curvature)
        for g in opt.param_groups:
            g["lam"], g["lr"] = lam, lr
        opt.zero_grad()
        mse_loss(weights, measurements, targets, backend=backend).sum().backward()
        opt.step()
        if callback is not None:
            callback(t + 1, weights)
    return weights
