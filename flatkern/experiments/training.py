"""Training loops shared by the experiments: gradient descent, flatness-regularized descent, and minibatch SGD.

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

``train_sgd`` is the exception: the implicit regularizers as the theory defines
them, plain minibatch SGD without momentum (label-noise SGD, and 1-SAM with its
per-example ascent step), its step size ``eta / S_B(W)`` set with ``κ_B``, the
largest curvature of a minibatch loss (``minibatch_kernel_norm``).

``S`` misses the Hessian's other part, ``2 <A*(r)/n, ∇²E>``, which the residual
``r`` drives: from a small initialization of a deep chain with many observed
entries (100×100 completion, depth 4, n = 5,000) it dominates, and a run can
diverge in its first steps.  ``retry_diverged`` trains such a problem again with
its step size halved, and leaves the others' runs as they were.
"""

from __future__ import annotations

import torch

from ..measurements import Dense, Entries, Isotropic, Measurements
from ..ops import end_to_end, hessian_trace, mse_loss
from ..optim import FlatnessRegularized
from ..reference import chain_products_ref

__all__ = ["kernel_norm", "minibatch_kernel_norm", "curvature_bound", "standard_init", "train_gd", "train_flatness", "HeavyBall",
           "train_sgd", "predict_at", "retry_diverged", "retry_fields", "MAX_HALVINGS"]


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


# how many times retry_diverged halves a diverged problem's step size before it reports the problem as diverged
MAX_HALVINGS = 4


def retry_diverged(train, weights: list[torch.Tensor], measurements: Measurements, targets: torch.Tensor, *, eta: float,
                   backend: str = "auto"):
    """``train(W, eta)`` from ``weights``, then again, from ``weights``, for the problems that diverged.

    A problem diverged when its final ``mse_loss`` is not finite or above its loss at ``weights`` (every run here is
    meant to end at zero loss).  Each retry halves the diverged problems' step size (``eta`` becomes a tensor of the
    batch shape) and keeps the problems' earlier runs for the others; since every problem of a batch steps on its own,
    a problem's result is its separate run's, retries included.

    Args:
        train: ``train(W, eta)`` trains the leaf tensors ``W`` in place; ``eta`` is a float or a tensor of the
            weights' batch shape, ``(...)``.  It must draw its random numbers afresh on each call (a retry redraws
            what the first run drew).
        weights: ``[W_1, ..., W_L]``, ``(..., d_j, d_{j-1})``, the start; not modified.

    Returns:
        ``(W, halvings, diverged)``: the trained leaves, and per problem (``(...)``) how many times its step size
        was halved (int64) and whether it still diverged after ``MAX_HALVINGS`` halvings (bool).
    """
    start = [w.detach() for w in weights]
    with torch.no_grad():
        loss0 = mse_loss(start, measurements, targets, backend=backend)
    halvings = torch.zeros(loss0.shape, dtype=torch.int64)
    result, bad = None, None
    for attempt in range(MAX_HALVINGS + 1):
        W = [w.clone().requires_grad_() for w in start]
        train(W, eta if attempt == 0 else eta * 0.5 ** halvings.to(torch.float64))
        with torch.no_grad():
            loss = mse_loss(W, measurements, targets, backend=backend)
            now_bad = ~torch.isfinite(loss) | (loss > loss0)
            if result is None:
                result = [w.detach().clone() for w in W]
            else:  # only the problems retried take the new run
                for r, w in zip(result, W):
                    r[bad] = w.detach()[bad]
                now_bad = now_bad & bad
        bad = now_bad
        if not bad.any() or attempt == MAX_HALVINGS:
            break
        halvings = halvings + bad.to(torch.int64)
    return [r.requires_grad_() for r in result], halvings, bad


def retry_fields(halvings: torch.Tensor, diverged: torch.Tensor, eta: float) -> dict:
    """A record's fields on one problem's ``retry_diverged``: none for a run that did not diverge (its record is as
    before), ``eta`` (the step-size fraction it ran with) and ``step_halvings`` for one that did, and
    ``diverged: true`` for one that diverged at every step size tried."""
    k = int(halvings)
    return ({} if k == 0 else dict(eta=eta * 0.5**k, step_halvings=k)) | ({"diverged": True} if bool(diverged) else {})


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
    kappa: float | torch.Tensor | None = None,
    backend: str = "auto",
    callback=None,
) -> list[torch.Tensor]:
    """Full-batch gradient descent on ``mse_loss``, in place, for ``steps`` steps.

    Args:
        weights: ``[W_1, ..., W_L]`` leaf tensors, possibly batched ``(B, d_j, d_{j-1})``.
        targets: ``(n,)``, shared by the batch, or ``(B, n)`` with per-problem ``measurements``.
        label_noise: standard deviation of fresh Gaussian noise added to the targets
            at every step (label-noise gradient descent, whose implicit regularizer
            is the trace of the Hessian); a number or a tensor of shape ``(B,)``.
        weight_decay: ``(start, end)``: adds ``mu · Σ_j ‖W_j‖_F²`` to the loss, ``mu``
            decaying geometrically from ``start`` to ``end`` (``(0, 0)``: none).
        sam: radius ``ρ`` of sharpness-aware minimization (``0``: none): the two-step
            update takes the gradient at ``W + ρ g / ‖g‖``, ``g = ∇L(W)``, ``‖g‖`` over
            every layer of a problem (Foret et al. 2021), in place of ``∇L(W)``.
        generator: the label noise's ``torch.Generator``, or a list of ``G`` of them: the noisy targets' leading
            dimension splits in ``G`` equal blocks, each drawn from its own (``G`` problems stacked, each drawing
            what its separate run draws).
        kappa: ``kernel_norm(measurements)``, a number or a tensor of the weights' batch shape (per problem).
        callback: called as ``callback(t, weights)`` after step ``t = 1, ..., steps``.
    """
    kappa = kernel_norm(measurements) if kappa is None else kappa
    noise = torch.as_tensor(label_noise, dtype=targets.dtype)
    noisy = bool((noise != 0).any())
    noise = noise.reshape(*noise.shape, 1)
    draws = torch.broadcast_shapes(noise.shape, targets.shape)  # the noisy targets' shape
    generators = list(generator) if isinstance(generator, (list, tuple)) else [generator]
    if noisy and len(generators) > 1 and (len(draws) < 2 or draws[0] % len(generators)):
        raise ValueError(f"train_gd: {len(generators)} generators must split the noisy targets' leading dimension "
                         f"evenly, got targets of shape {tuple(draws)}")
    opt = HeavyBall(weights, lr=0.0, momentum=momentum)  # as torch.optim.SGD(momentum=...), a step size per problem
    step_size = StepSize(kappa, eta)
    for t in range(steps):
        lr = step_size(weights)
        b = targets + noise * _randn(draws, generators, targets.dtype) if noisy else targets

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
        for w, g in zip(weights, grads):
            w.grad = g
        opt.param_groups[0]["lr"] = lr
        opt.step()
        if callback is not None:
            callback(t + 1, weights)
    for w in weights:  # the step read them; the caller's weights come back as they came, without .grad
        w.grad = None
    return weights


def _randn(shape: torch.Size, generators: list, dtype) -> torch.Tensor:
    """Standard normal draws of ``shape``, its leading dimension in ``len(generators)`` equal blocks, block ``j`` from
    ``generators[j]``: a batch of problems stacked from separate runs draws what each run drew on its own."""
    if len(generators) == 1:
        return torch.randn(shape, generator=generators[0], dtype=dtype)
    block = (shape[0] // len(generators), *shape[1:])
    return torch.cat([torch.randn(block, generator=g, dtype=dtype) for g in generators])


class HeavyBall(torch.optim.Optimizer):
    """``torch.optim.SGD(momentum=m)``'s update, ``v ← m v + g`` (``v = g`` at the first step), ``W ← W − η v``, with
    ``η`` a number or a tensor of the weights' batch shape ``(...)``: one step size per problem of a batch, so that
    ``B`` stacked problems step as ``B`` separate runs (``SGD`` takes one number for all)."""

    def __init__(self, params, lr=0.0, momentum: float = 0.9):
        super().__init__(params, dict(lr=lr, momentum=momentum))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr = torch.as_tensor(group["lr"], dtype=torch.float64)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = p.grad.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(p.grad)
                p.sub_(_batch_view(lr.to(p.dtype)) * state["momentum_buffer"])
        return None


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
    kappa: float | torch.Tensor | None = None,
    backend: str = "auto",
    callback=None,
) -> list[torch.Tensor]:
    """Minimize ``mse_loss + lam · tr ∇²L`` with ``flatkern.optim.FlatnessRegularized``, ``lam`` decreasing.

    ``lam`` decays geometrically from ``lam_start`` to ``lam_end`` over ``steps``
    steps, then ``polish_steps`` steps with ``lam = 0`` bring the loss to zero
    from the (nearly flattest) point reached.  Base optimizer: ``torch.optim.SGD``'s update
    (full batch, ``momentum``; ``HeavyBall``, its update with a step size per problem) with the step size
    ``eta / (S(W) + lam R(W))``, ``R`` an estimate of the regularizer's curvature (below), per problem of a batch.

    Args:
        regularizer: the measurements whose trace is regularized (default: the
            training ``measurements``, i.e. the trace of the training loss).
        kappa: ``kernel_norm(measurements)``, a number or a tensor of the weights' batch shape (per problem).
        callback: called as ``callback(t, weights)`` after step ``t = 1, ..., steps + polish_steps``.
    """
    kappa = kernel_norm(measurements) if kappa is None else kappa
    reg = measurements if regularizer is None else regularizer
    opt = FlatnessRegularized(weights, HeavyBall, lam=lam_start, measurements=reg, lr=0.0, momentum=momentum, backend=backend, sharded=False)
    total = steps + polish_steps
    step_size = StepSize(kappa, eta)
    # the trace is a homogeneous polynomial of degree k = 2(L-1) in the weights: along a
    # scaling of the weights its curvature is k(k-1) tr / ‖W‖²; lam times that (with the
    # smallest layer norm) estimates the regularizer's share of the sharpness, which
    # dominates for deep chains at large lam and made them diverge without it
    # (per problem of a batch: B stacked problems step as B separate runs)
    k = 2 * (len(weights) - 1)
    reg_curvature = 0.0
    for t in range(total):
        lam = lam_start * (lam_end / lam_start) ** (t / max(steps - 1, 1)) if t < steps else 0.0
        if t % step_size.every == 0 and lam > 0:
            with torch.no_grad():
                tr = hessian_trace(weights, reg, backend=backend)
                smallest = torch.stack([w.square().sum((-2, -1)) for w in weights]).min(0).values
                reg_curvature = k * (k - 1) * tr / smallest
        sharpness = eta / step_size(weights)  # S(W), the loss's share, shape (...)
        lr = eta / (sharpness + lam * reg_curvature)
        for g in opt.param_groups:
            g["lam"], g["lr"] = lam, lr
        opt.zero_grad()
        mse_loss(weights, measurements, targets, backend=backend).sum().backward()
        opt.step()
        if callback is not None:
            callback(t + 1, weights)
    return weights


# ---------------------------------------------------------------- minibatch SGD (label noise, 1-SAM)


def predict_at(measurements: Measurements, E: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``<A_i, E_k>`` for the measurements ``i = index[k]``: ``E`` of shape ``(*K, d_L, d_0)`` or ``(*K[:-1], d_L, d_0)``
    (one ``E`` shared by the last index dimension), ``index`` int64 of shape ``K``; returns shape ``K``.

    Only the ``index``-ed measurements are read: ``O(|K| d_L d_0)`` for ``Dense``, ``O(|K|)`` for ``Entries``.
    """
    if E.dim() == index.dim() + 1:  # one E per row of minibatch indices: share it
        E = E.unsqueeze(-3)
    if isinstance(measurements, Dense):
        return (measurements.A[index] * E).sum((-2, -1))
    if isinstance(measurements, Entries):
        flat = (measurements.rows * measurements.shape[1] + measurements.cols)[index]
        E = E.flatten(-2).expand(*index.shape, -1)
        return E.gather(-1, flat.unsqueeze(-1)).squeeze(-1)
    raise TypeError(f"predict_at supports Dense and Entries measurements, got {type(measurements).__name__}")


def minibatch_kernel_norm(measurements: Measurements, batch_size: int, *, draws: int = 64, generator=None) -> float:
    """``κ_B``: the largest ``kernel_norm`` of ``draws`` random minibatches of ``batch_size`` measurements (with replacement).

    A minibatch loss is more curved than the full one (for Gaussian ``A``,
    ``κ_B ≈ (1 + √(d_0 d_L / B))²`` against ``(1 + √(d_0 d_L / n))²``); its curvature
    bound ``S_B`` sets SGD's step size.  An empirical maximum over the draws, not a
    bound: the bound ``(n / B) κ`` is about twice as large for Gaussian ``A`` at the
    trajectory's sizes (n = 200, B = 10, d = 20: 20 κ against ~ 9 κ), and would halve
    the step.  Plain SGD is stable below ``2 / S``: ``eta < 2`` keeps a margin for
    the minibatches not drawn.
    """
    n = measurements.n
    if batch_size >= n:
        return kernel_norm(measurements)
    worst = 0.0
    for _ in range(draws):
        index = torch.randint(n, (batch_size,), generator=generator)
        if isinstance(measurements, Dense):
            worst = max(worst, kernel_norm(Dense(measurements.A[index])))
        elif isinstance(measurements, Entries):
            worst = max(worst, kernel_norm(Entries(measurements.rows[index], measurements.cols[index], measurements.shape)))
        else:
            raise TypeError(f"minibatch_kernel_norm supports Dense and Entries, got {type(measurements).__name__}")
    return worst


def train_sgd(
    weights: list[torch.Tensor],
    measurements: Measurements,
    targets: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    eta,
    kappa_batch: float,
    label_noise=0.0,
    one_sam=0.0,
    generator=None,
    backend: str = "auto",
    callback=None,
) -> list[torch.Tensor]:
    """Plain minibatch SGD on the squared loss, in place: label-noise SGD, or 1-SAM.

    Each step draws, for every chain, ``batch_size`` measurements ``I`` (uniform,
    with replacement) and takes ``W ← W − η_t g`` with ``η_t = eta / S_B(W_t)``
    (``curvature_bound`` with ``kappa_batch``, no momentum):

    - label-noise SGD (``label_noise = σ``): ``g = ∇ (1/B) Σ_{i∈I} (<A_i, E> − b_i − σ ξ_i)²``,
      ``ξ_i ~ N(0, 1)`` fresh at every step.  Its implicit regularizer near the
      zero-loss manifold is ``η σ² tr ∇²L`` (Blanc et al. 2020, Damian et al. 2021).
    - 1-SAM (``one_sam = ρ``): the ascent step per example,
      ``g = (1/B) Σ_{i∈I} ∇ℓ_i(W + ρ ∇ℓ_i(W) / ‖∇ℓ_i(W)‖)``, ``ℓ_i = (<A_i, E> − b_i)²``;
      SAM with batch size 1 (averaged over ``B`` examples per step), whose implicit
      regularizer is the trace of the Hessian (Wen, Ma, Li 2023), where full-batch
      SAM's is its largest eigenvalue.

    Args:
        weights: ``[W_1, ..., W_L]``, ``(R, d_j, d_{j-1})``: ``R`` chains, independent
            draws from the same measurements (batched: one chain costs about as much as ``R``).
        eta, label_noise, one_sam: numbers, or tensors of shape ``(R,)`` (one value per chain: a sweep in one batch).
        targets: ``(n,)``.
        kappa_batch: ``minibatch_kernel_norm(measurements, batch_size)``.
        callback: ``callback(t, weights)`` after step ``t = 1, ..., steps``.
    """
    noise = torch.as_tensor(label_noise, dtype=targets.dtype)
    rho = torch.as_tensor(one_sam, dtype=targets.dtype)
    noisy = bool((noise > 0).any())
    if noisy == bool((rho > 0).any()):
        raise ValueError(f"train_sgd runs label-noise SGD or 1-SAM: exactly one of label_noise={label_noise} "
                         f"and one_sam={one_sam} must be positive")
    chains = weights[0].shape[:-2]
    if len(chains) != 1:
        raise ValueError(f"train_sgd: weights must have one leading chain dimension, got W_1 of shape {tuple(weights[0].shape)}")
    noise, rho = noise.reshape(*noise.shape, 1), rho.reshape(*rho.shape, 1)  # against the minibatch dimension
    step_size = StepSize(kappa_batch, torch.as_tensor(eta, dtype=targets.dtype))
    n = measurements.n
    for t in range(steps):
        lr = step_size(weights)
        index = torch.randint(n, (*chains, batch_size), generator=generator)
        b = targets[index]
        if noisy:
            b = b + noise * torch.randn(b.shape, generator=generator, dtype=b.dtype)
            E = end_to_end(weights, backend=backend)
            loss = (predict_at(measurements, E, index) - b).square().mean(-1).sum()
            grads = torch.autograd.grad(loss, weights)
        else:
            # one copy of the weights per example: (R, B, d_j, d_{j-1}), so every example has its own ascent point
            each = [w.detach().unsqueeze(-3).expand(*chains, batch_size, *w.shape[-2:]).requires_grad_() for w in weights]
            residual = predict_at(measurements, end_to_end(each, backend=backend), index) - b
            g = torch.autograd.grad(residual.square().sum(), each)
            with torch.no_grad():
                norm = torch.stack([x.square().sum((-2, -1)) for x in g]).sum(0).sqrt().clamp_min(1e-300)
                ascent = [(w + (rho / norm)[..., None, None] * x).requires_grad_() for w, x in zip(each, g)]
            residual = predict_at(measurements, end_to_end(ascent, backend=backend), index) - b
            grads = [x.mean(-3) for x in torch.autograd.grad(residual.square().sum(), ascent)]
        with torch.no_grad():
            for w, g in zip(weights, grads):
                w.sub_(_batch_view(lr) * g)
        if callback is not None:
            callback(t + 1, weights)
    return weights
