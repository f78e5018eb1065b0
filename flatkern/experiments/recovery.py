"""Experiments 2 and 3: recovering a low-rank ``M*`` from ``n`` measurements (``sensing``, ``completion``).

Every method fits the same measurements ``b = A(M*)`` to (near) zero loss; the
question is which interpolator it picks.  Gaussian sensing (``Dense``) has the
restricted isometry property, so the flattest interpolator is close to the
minimum-nuclear-norm one (docs/MATH.md); uniformly observed entries (``Entries``)
do not, and are reported as they come out.

Methods (one record each):

- ``gd``: gradient descent from LeCun-normal weights (``W_j ~ N(0, 1/d_{j-1})``).
- ``gd_small_init``: the same from weights scaled so that ``‖E‖`` starts ``init_scale``
  times smaller (the implicit-bias-of-small-initialization baseline).
- ``label_noise``: gradient descent with fresh Gaussian noise on the targets at
  every step (an implicit trace-of-Hessian regularizer), then noise-free steps.
- ``flatness``: ``flatkern.optim.FlatnessRegularized`` on ``loss + lam · tr``
  with ``lam`` decaying to ``lam_end``, then ``lam = 0`` to reach zero loss.
  ``tr`` is the trace of the training-loss Hessian for ``completion``; for
  ``sensing`` it is by default its expectation over Gaussian ``A`` (the
  ``Isotropic`` trace, docs/MATH.md), about three times cheaper per step than the
  exact ``Dense`` trace and, in our trials, as good (``sensing_regularizer="train"``
  regularizes the exact one).  The record's ``regularizer`` says which.
- ``flattest_solution``: ``flatkern.flattest_solution``, the factorization of least
  ``Isotropic`` trace among those that fit the measurements exactly (a constrained
  solve, not training).  For any measurements that problem *is* the convex program
  lifted (docs/MATH.md), so its nuclear norm equals ``nuclear_norm``'s at every ``n``.
- ``nuclear_norm``: the convex program ``min ‖X‖_* s.t. A(X) = b`` (cvxpy);
  it has no depth (``depth`` is null in its record).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..measurements import Dense, Entries, Isotropic, Measurements
from ..ops import end_to_end, hessian_trace
from ..theory import flatness_lower_bound
from .baselines import nuclear_norm_solution
from .training import kernel_norm, standard_init, train_flatness, train_gd

__all__ = ["RecoverySettings", "make_problem", "run_networks", "run_flattest_solution", "run_nuclear_norm", "NETWORK_METHODS"]

NETWORK_METHODS = ("gd", "gd_small_init", "label_noise", "flatness")


@dataclass(frozen=True)
class RecoverySettings:
    """Sizes and optimization budget of a recovery run (one ``(depth, n, seed)`` problem)."""

    d: int = 20            # d_0 = d_L = every hidden width
    rank: int = 2
    steps: int = 1000      # main phase (noise or regularization on)
    polish_steps: int = 300  # noise-free / lam = 0 phase reaching zero loss
    eta: float = 0.5       # step size as a fraction of 1 / sharpness bound
    init_scale: float = 1e-3   # gd_small_init: ‖E_0‖ shrinks by this factor
    label_noise: float = 1.0   # std of the label noise (targets have std ≈ ‖M*‖_F = √d)
    lam_start: float = 1e-1
    lam_end: float = 1e-6
    # the trace regularized by `flatness` on sensing: "isotropic" (its expectation over
    # Gaussian A, docs/MATH.md; the cheap one) or "train" (the exact trace on the n measurements)
    sensing_regularizer: str = "isotropic"
    # flattest_solution's feasibility tolerance and iteration caps.  Its defaults (1e-10, 100
    # outer, 1000 inner) cost up to 190 s per depth-4 solve here, for digits no table shows;
    # with these the nuclear norms still agree with the convex program's to 1e-4 or better,
    # and feasibility stays below 1e-6 (measured at d = 20, depths 2-4).  A solve that stops
    # at a cap says so in its record (converged: false) and in the summary.
    solution_tol: float = 1e-8
    solution_max_outer: int = 30
    solution_max_inner: int = 200


def _generator(*key) -> torch.Generator:
    """A generator seeded by ``key``: the same stream whichever order (or rank) runs the task."""
    seed = 1469598103934665603
    for byte in repr(key).encode():  # FNV-1a, since Python's hash() of a str is salted per process
        seed = ((seed ^ byte) * 1099511628211) % 2**64
    return torch.Generator().manual_seed(seed % 2**63)


def make_problem(experiment: str, n: int, seed: int, settings: RecoverySettings):
    """``(M*, measurements, b)`` for one ``(experiment, n, seed)``; the same for every depth and method.

    ``M* = X Yᵀ`` with Gaussian ``X, Y`` of shape ``(d, r)``, scaled to ``‖M*‖_F = √d``:
    the scale of ``E`` at a LeCun-normal initialization, so ``gd`` starts at a
    fair distance.
    """
    d, r = settings.d, settings.rank
    g = _generator("problem", experiment, n, seed)
    X = torch.randn(d, r, generator=g, dtype=torch.float64)
    Y = torch.randn(d, r, generator=g, dtype=torch.float64)
    M = X @ Y.T
    M = M * (d**0.5 / M.norm())
    if experiment == "sensing":
        meas = Dense.gaussian(n, (d, d), generator=g, dtype=torch.float64)
    elif experiment == "completion":
        meas = Entries.uniform(n, (d, d), generator=g)
    else:
        raise ValueError(f"experiment must be 'sensing' or 'completion', got {experiment!r}")
    return M, meas, meas.predict(M)


def metrics(weights, E: torch.Tensor, M: torch.Tensor, meas: Measurements, b: torch.Tensor, depth: int | None, backend: str) -> dict:
    """Recovery error, nuclear norm, train loss, and (for networks) the traces and ``ratio``.

    ``trace``: the trace of the Hessian of the training loss (on ``meas``).
    ``trace_isotropic`` / ``ratio``: the ``Isotropic`` (population) trace, and
    it over ``flatness_lower_bound(E, depth)``, which bounds it from below.
    """
    with torch.no_grad():
        out = {
            "rel_error": float((E - M).norm() / M.norm()),
            "nuclear_norm": float(torch.linalg.matrix_norm(E, ord="nuc")),
            "train_loss": float((meas.predict(E) - b).square().mean()),
            "trace": None, "trace_isotropic": None, "ratio": None,
        }
        if weights is not None:
            iso = float(hessian_trace(weights, Isotropic(), backend=backend))
            out["trace"] = float(hessian_trace(weights, meas, backend=backend))
            out["trace_isotropic"] = iso
            out["ratio"] = iso / float(flatness_lower_bound(E, depth))
    return out


def run_networks(experiment: str, depth: int, n: int, seed: int, settings: RecoverySettings, backend: str = "auto") -> list[dict]:
    """Train the four network methods on one problem; one record per method."""
    M, meas, b = make_problem(experiment, n, seed, settings)
    d, s = settings.d, settings
    widths = [d] * (depth + 1)
    kappa = kernel_norm(meas)
    # gd, gd_small_init and label_noise share the loop: one batch of three problems
    g = _generator("init", experiment, depth, n, seed)
    scales = torch.tensor([1.0, s.init_scale ** (1.0 / depth), 1.0], dtype=torch.float64)
    W = standard_init(widths, scale=scales, batch=(3,), generator=g)
    noise = torch.tensor([0.0, 0.0, s.label_noise], dtype=torch.float64)
    train_gd(W, meas, b, steps=s.steps, eta=s.eta, label_noise=noise, generator=g, kappa=kappa, backend=backend)
    train_gd(W, meas, b, steps=s.polish_steps, eta=s.eta, kappa=kappa, backend=backend)
    records = []
    for i, method in enumerate(("gd", "gd_small_init", "label_noise")):
        Wi = [w[i].detach() for w in W]
        E = end_to_end(Wi, backend=backend)
        records.append(dict(method=method, **metrics(Wi, E, M, meas, b, depth, backend)))

    g = _generator("init", experiment, depth, n, seed, "flatness")
    W = standard_init(widths, generator=g)
    if experiment == "sensing" and s.sensing_regularizer == "isotropic":
        reg = Isotropic()
    elif experiment == "completion" or s.sensing_regularizer == "train":
        reg = meas
    else:
        raise ValueError(f"sensing_regularizer must be 'isotropic' or 'train', got {s.sensing_regularizer!r}")
    train_flatness(W, meas, b, steps=s.steps, lam_start=s.lam_start, lam_end=s.lam_end, polish_steps=s.polish_steps,
                   eta=s.eta, regularizer=reg, kappa=kappa, backend=backend)
    Wf = [w.detach() for w in W]
    records.append(dict(method="flatness", regularizer="isotropic" if reg is not meas else "train",
                        **metrics(Wf, end_to_end(Wf, backend=backend), M, meas, b, depth, backend)))
    return [dict(experiment=experiment, depth=depth, n=n, seed=seed, d=d, rank=s.rank, **r) for r in records]


def run_flattest_solution(experiment: str, depth: int, n: int, seed: int, settings: RecoverySettings, backend: str = "auto") -> list[dict]:
    """``flattest_solution`` (least ``Isotropic`` trace subject to ``A(E) = b``) on one problem; one record."""
    from .solution import solve_flattest

    M, meas, b = make_problem(experiment, n, seed, settings)
    W, report = solve_flattest(meas, b, [settings.d] * (depth + 1), backend=backend,
                               tol=settings.solution_tol, max_outer=settings.solution_max_outer,
                               max_inner=settings.solution_max_inner)
    record = dict(method="flattest_solution", regularizer="isotropic",
                  **metrics(W, end_to_end(W, backend=backend), M, meas, b, depth, backend), **report)
    return [dict(experiment=experiment, depth=depth, n=n, seed=seed, d=settings.d, rank=settings.rank, **record)]


def run_nuclear_norm(experiment: str, n: int, seed: int, settings: RecoverySettings) -> list[dict]:
    """The convex baseline on one problem (no depth)."""
    M, meas, b = make_problem(experiment, n, seed, settings)
    X, status = nuclear_norm_solution(meas, b, tuple(M.shape), return_status=True)
    return [dict(experiment=experiment, method="nuclear_norm", depth=None, n=n, seed=seed, d=settings.d, rank=settings.rank,
                 solver_status=status,
                 **metrics(None, X, M, meas, b, None, "torch"))]
