"""The flattest zero-loss solution, by the method of multipliers (docs/MATH.md, "The flattest zero-loss solution").

    min_W  T(W)   subject to   r(W) = A(W_L ⋯ W_1) - b = 0

with ``T`` the exact trace of the Hessian of the MSE loss (``reduction="mean"``)
of ``trace_of``: by default the ``Isotropic`` trace ``2 Σ_j ‖P_j‖_F² ‖Q_j‖_F²``,
whose minimum over the factorizations of ``E`` is ``2 L (d_0 d_L)^{1/L} ‖E‖_*^{2-2/L}``
(the theorem), so that the answer's ``E`` is the minimum-nuclear-norm interpolator.

The augmented Lagrangian

    L_ρ(W, y) = T(W)/2 + yᵀ r(W) + (ρ/2) ‖r(W)‖²

is minimized in ``W`` by L-BFGS with a strong-Wolfe line search, then
``y ← y + ρ r``, and ``ρ`` doubles whenever ``‖r‖`` has not halved.  ``T`` and
``r`` come from the public ops (``hessian_trace``, ``end_to_end``,
``Measurements.predict``).  Four choices, each measured (d = 20, r = 2 and small
problems; Gaussian sensing and completion; depths 2-5; see the tests):

- The start is random at the scale of the answer (LeCun-normal layers, in
  units where a rough interpolator has ``‖E‖_F = 1``).  Starts 10-100 times
  smaller stop, at depths 4-5 below the recovery threshold, at stationary
  points whose ``E`` lacks a rank the answer needs (nuclear norm up to 3%
  above the convex optimum): adding a rank needs every layer to grow at once.
- Such a stop can still happen (one in the tests).  The multipliers bound
  every interpolator's nuclear norm from below (weak duality); with the
  ``Isotropic`` trace, a stationary point they do not certify is restarted from
  the flattest factorization of ``E`` plus the directions they point to, and
  the restart is kept only if it lowers the trace.  At depth ``L >= 3`` they
  can fail to certify the optimum itself (d = 20, n = 160, L = 4, 5): the
  restart then returns to the same trace, is dropped, and has cost about as
  much again.
- Each inner solve stops once its gradient is below ``max(‖r‖/‖b‖, stationarity_tol/10)``
  times the trace's own gradient (a tenth of that already cost six times the
  evaluations in our runs, and stalled as ``ρ`` grew).
- Near the answer the decrease of ``L_ρ`` along a step falls below the
  rounding error of ``L_ρ`` (``T`` is many orders of magnitude larger than what
  still moves), and a value-based line search stops short; there the line
  search compares values through the trapezoid rule on the directional
  derivatives instead (the approximate Wolfe test of Hager & Zhang, 2005).

One concern, this solver, in one file over 600 lines: the outer multiplier loop, its strong-Wolfe
L-BFGS, the feasibility pre-checks and the weak-duality certificate share the problem's state
and are read together.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch

from ._checks import check_int
from .kernels import families
from .measurements import Dense, Entries, Inputs, Isotropic, Measurements
from .ops import end_to_end, hessian_trace
from .theory import _check_widths, flattest_factorization

__all__ = ["flattest_solution", "FlattestReport", "ConvergenceWarning"]


class ConvergenceWarning(RuntimeWarning):
    """``flattest_solution`` stopped before reaching its tolerances; the message gives the residuals."""


@dataclass
class FlattestReport:
    """How ``flattest_solution`` ended, in the caller's units.

    Attributes:
        converged: ``feasibility <= tol`` and ``stationarity <= stationarity_tol``.
        feasibility: ``‖A(E) - b‖ / ‖b‖`` at the answer.
        stationarity: ``‖∇_W (T/2 + yᵀ r)‖ / ‖∇_W T/2‖`` at the answer and the final multipliers
            ``y``: the first-order optimality residual, 0 at a KKT point.
        trace: ``T`` at the answer (``hessian_trace(weights, trace_of)``, MSE, ``reduction="mean"``).
        nuclear_norm: ``‖E‖_*`` of the answer.
        nuclear_norm_bound: ``|yᵀb| / ‖A*(y)‖_op`` for the best multipliers seen: by weak duality
            every interpolator has at least this nuclear norm.  Where it meets ``nuclear_norm``
            the answer is proven the minimum-nuclear-norm one; below it proves nothing (the
            multipliers of the lifted problem need not be a certificate of the convex one).
        outer_iterations: multiplier updates.
        inner_iterations: L-BFGS iterations, all outer iterations together.
        evaluations: evaluations of ``L_ρ`` and its gradient.
        restarts: restarts from stationary points that the multipliers did not certify, toward
            the ranks they pointed to (``Isotropic`` trace only; one is kept only if it lowers ``T``
            by more than 1e-6 of it, judged at feasibility 1e-7, within as many evaluations again).
        penalty: the final ``ρ``.
        multipliers: ``y``, shaped like ``targets``.
        seconds: wall time.
        history: one dict per outer iteration (``feasibility``, ``stationarity``, ``trace``,
            ``penalty``, ``inner``).
        tol, stationarity_tol: the tolerances the solve used (the defaults of ``dtype``, or the
            ones asked for, raised to what ``dtype`` can resolve).
        stalled: the solve stopped because neither residual had halved in ``_PATIENCE`` outer
            iterations (``converged`` is then ``False``).
    """

    converged: bool
    feasibility: float
    stationarity: float
    trace: float
    nuclear_norm: float
    nuclear_norm_bound: float
    outer_iterations: int
    inner_iterations: int
    evaluations: int
    restarts: int
    penalty: float
    multipliers: torch.Tensor
    seconds: float = 0.0
    history: list = field(default_factory=list, repr=False)
    tol: float = math.nan
    stationarity_tol: float = math.nan
    stalled: bool = False


def flattest_solution(
    measurements: Measurements,
    targets: torch.Tensor,
    widths,
    *,
    trace_of: Measurements | None = None,
    dtype: torch.dtype = torch.float64,
    tol: float | None = None,
    stationarity_tol: float | None = None,
    max_outer: int = 100,
    max_inner: int = 1000,
    generator: torch.Generator | int | None = None,
    verbose: bool = False,
    progress: bool = False,
    backend: str = "torch",
    return_report: bool = False,
):
    """The factorization of least trace of the Hessian among those that fit the measurements exactly.

        min_W  tr ∇²L(W)   subject to   measurements.predict(W_L ⋯ W_1) = targets

    With ``trace_of=None`` the trace is the ``Isotropic`` one, ``2 Σ_j ‖P_j‖_F² ‖Q_j‖_F²``
    (the theorem's statement): the answer's ``E`` is then the minimum-nuclear-norm
    interpolator, and its trace is ``flatness_lower_bound(E, L)`` (hidden widths
    ``>= rank E``).  ``trace_of=measurements`` minimizes the trace of the training loss.

    Method (module docstring, docs/MATH.md): the augmented Lagrangian
    ``T/2 + yᵀ r + (ρ/2) ‖r‖²`` minimized by L-BFGS (strong Wolfe) from a random start,
    ``y ← y + ρ r`` after each inner solve, ``ρ`` doubled while ``‖r‖`` stalls.  The lifted
    problem is not convex: at depth ``L >= 3`` a run can reach a stationary point whose ``E``
    lacks a rank the convex solution has.  ``report.nuclear_norm_bound`` proves the answer
    optimal where it meets ``report.nuclear_norm``; with the ``Isotropic`` trace a point it does
    not certify is restarted toward the missing ranks (``report.restarts``).  Where the bound
    stays below, compare with the convex program.

    A hidden width below ``min(d_0, d_L)`` caps the rank of ``E``: where the answer's rank reaches
    the cap it is the flattest of that rank, and wider layers may give a flatter one (the
    multipliers certify nothing there: with no spare width they need not bound the nuclear norm).

    Before the solve, where the measurement matrix is small enough to form (``Entries`` and
    ``Inputs`` always), the least-squares fit of ``targets`` is computed: targets that no ``E``
    fits (contradictory or linearly dependent measurements, ``‖A(E_ls) - b‖/‖b‖ > max(tol, 1e-8)``)
    and measurements that determine ``E`` with a rank the hidden widths cannot hold are a
    ``ValueError``.  A solve in which neither residual halves in ``_PATIENCE`` (10) outer
    iterations stops there (``report.stalled``).  One that does not converge returns the most
    feasible iterate it met, or ``W = 0`` where none fit better than ``E = 0`` (feasibility 1).

    Depth 1 (``widths = [d_0, d_L]``) is refused: there the trace, ``(2/n) Σ_i ‖A_i‖_F²``
    (``2 d_L d_0`` for ``Isotropic``), does not depend on ``W``, so every interpolator is equally
    flat and none is "the" flattest.

    Args:
        measurements: the family fit exactly (``Dense``, ``Entries``, ``RankOne``, ``Inputs``;
            ``Isotropic`` fixes ``E = targets`` and leaves only the factorization free).
        targets: of shape ``measurements.target_shape(d_L, d_0)``: ``(n,)``; ``(N, d_L)`` for
            ``Inputs``; ``(d_L, d_0)`` for ``Isotropic``.  No batch dimensions.
        widths: ``[d_0, d_1, ..., d_L]`` (ints), as in ``flattest_factorization``.
        trace_of: the measurements whose trace is minimized; ``None`` means ``Isotropic()``.
        dtype: ``torch.float64`` (default) or ``torch.float32``, the dtype of the solve and of the answer.
        tol: feasibility tolerance on ``‖A(E) - b‖ / ‖b‖``; ``None``: ``1e-10`` in float64,
            ``100 eps = 1.2e-5`` in float32.  A tolerance below ``100 eps`` of ``dtype``, which its
            rounding cannot reach, is raised to ``100 eps`` with a warning.
        stationarity_tol: tolerance on ``‖∇_W (T/2 + yᵀ r)‖ / ‖∇_W T/2‖``; ``None``: ``1e-6``
            (``100 eps`` in float32); raised to ``100 eps`` likewise.
        max_outer: most multiplier updates.
        max_inner: most L-BFGS iterations per multiplier update.
        generator: the random start: a ``torch.Generator``, an int seed, or ``None`` (seed 0,
            so that the answer is reproducible).
        verbose: print one line per outer iteration to stderr.
        progress: show a tqdm progress bar over the outer iterations.
        backend: the backend of ``end_to_end`` and ``hessian_trace``.
        return_report: also return the ``FlattestReport``.

    Returns:
        ``[W_1, ..., W_L]``, ``W_j`` of shape ``(d_j, d_{j-1})`` and dtype ``dtype`` on the
        targets' device, not requiring grad; with ``return_report``, ``(weights, report)``.

    Raises:
        TypeError, ValueError: arguments of the wrong type, shape or value, naming them; depth 1;
            targets that no ``E`` fits, or that need a rank above the hidden widths (see above).

    Warns:
        ConvergenceWarning: the tolerances were not reached in ``max_outer`` iterations, or the
            solve stalled; the message gives the residuals, and the weights are the most feasible
            iterate met.
        UserWarning: a tolerance below what ``dtype`` can resolve was raised.
    """
    start_time = time.perf_counter()
    widths = _check_widths(widths)
    if len(widths) == 2:
        raise ValueError(
            f"flattest_solution needs depth L >= 2 (widths [d_0, d_1, ..., d_L] with a hidden width), got widths "
            f"{widths}: at depth 1 the trace of the Hessian, (2/n) Σ_i ‖A_i‖_F² (2 d_L d_0 for Isotropic), does "
            "not depend on the weights, so every interpolator is equally flat; the theorem's flattest solution "
            "(the minimum-nuclear-norm one) is reached from depth 2 on")
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float64 or torch.float32, got {dtype!r} (half precision cannot resolve "
                        "the constraint)")
    tol = _tolerance(tol, "tol", _DEFAULT_TOL, dtype)
    stationarity_tol = _tolerance(stationarity_tol, "stationarity_tol", _DEFAULT_STATIONARITY_TOL, dtype)
    max_outer = check_int(max_outer, "max_outer", minimum=1)
    max_inner = check_int(max_inner, "max_inner", minimum=1)
    if not isinstance(progress, bool) or not isinstance(verbose, bool):
        raise TypeError(f"verbose and progress must be bools, got {verbose!r} and {progress!r}")
    d_0, d_L, L = widths[0], widths[-1], len(widths) - 1
    hidden = widths[1:-1]

    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a tensor, got {type(targets).__name__}")
    if targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"targets must be a real tensor, got dtype {targets.dtype}")
    b = targets.detach().to(dtype=dtype)
    m = _prepare(measurements, "measurements", widths, b)
    expected = tuple(m.target_shape(d_L, d_0))
    if tuple(b.shape) != expected:
        raise ValueError(f"targets has shape {tuple(b.shape)} but {measurements!r} on E of shape "
                         f"({d_L}, {d_0}) (widths {widths}) needs targets of shape {expected}")
    if not bool(torch.isfinite(b).all()):
        raise ValueError("targets contain NaN or inf")
    t_of = _prepare(Isotropic() if trace_of is None else trace_of, "trace_of", widths, b)
    if isinstance(m, Isotropic) and hidden:
        rank = int(torch.linalg.matrix_rank(b))
        if rank > min(hidden):
            raise ValueError(f"hidden widths {hidden} must be at least rank(targets) = {rank}: "
                             "narrower layers cannot reach zero loss")
    elif float(b.norm()) != 0.0:
        _check_a_fit_exists(measurements, targets, widths, tol)
    if isinstance(generator, torch.Generator):
        gen = generator
    elif generator is None:
        gen = torch.Generator().manual_seed(0)
    else:
        gen = torch.Generator().manual_seed(check_int(generator, "generator (a seed)"))

    if float(b.norm()) == 0.0:  # E = 0 fits, and W = 0 has trace 0
        weights = [torch.zeros(widths[j + 1], widths[j], dtype=dtype, device=b.device) for j in range(L)]
        report = FlattestReport(True, 0.0, 0.0, 0.0, 0.0, 0.0, 0, 0, 0, 0, 0.0, torch.zeros_like(b),
                                time.perf_counter() - start_time, tol=tol, stationarity_tol=stationarity_tol)
        return (weights, report) if return_report else weights

    solver = _AugmentedLagrangian(m, t_of, b, widths, backend=backend, generator=gen)
    weights, report = solver.run(tol=tol, stationarity_tol=stationarity_tol, max_outer=max_outer,
                                 max_inner=max_inner, verbose=verbose, progress=progress)
    report.seconds = time.perf_counter() - start_time
    report.tol, report.stationarity_tol = tol, stationarity_tol
    if not report.converged:
        narrow = ""
        if hidden and min(hidden) < min(d_0, d_L):
            narrow = (f"; the hidden widths {hidden} are below min(d_0, d_L) = {min(d_0, d_L)}, so E has rank at "
                      f"most {min(hidden)}: zero loss may need wider layers")
        how = (f"stalled after {report.outer_iterations} outer iterations (neither residual halved in the last "
               f"{_PATIENCE})" if report.stalled else f"did not converge in {report.outer_iterations} outer iterations")
        warnings.warn(
            f"flattest_solution {how}: feasibility "
            f"‖A(E) - b‖/‖b‖ = {report.feasibility:.3g} (tol {tol:g}), stationarity {report.stationarity:.3g} "
            f"(tol {stationarity_tol:g}); the weights are the most feasible iterate met{narrow}",
            ConvergenceWarning, stacklevel=2)
    return (weights, report) if return_report else weights


def _tolerance(value, name: str, default: float, dtype: torch.dtype) -> float:
    """``value`` (``default`` if ``None``) checked, and raised to ``100 eps`` of ``dtype`` with a warning:
    below that the residuals are rounding noise, and the solve would run to ``max_outer`` for nothing."""
    floor = _TOL_EPS * torch.finfo(dtype).eps
    if value is None:
        return max(default, floor)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
    if value < floor:
        warnings.warn(f"{name}={value:g} is below what {dtype} can resolve ({_TOL_EPS:g} eps = {floor:.2g}): using "
                      f"{name}={floor:.2g}; solve in torch.float64 for a tighter one", UserWarning, stacklevel=3)
        return floor
    return float(value)


def _no_fit(detail: str) -> ValueError:
    return ValueError(f"no E fits the targets: {detail}; the measurements are linearly dependent (for instance "
                      "the same measurement twice) and the targets contradict them. Drop or average the repeated "
                      "measurements, or fit them in least squares (flatkern.mse_loss) instead of exactly")


def _check_a_fit_exists(measurements: Measurements, targets: torch.Tensor, widths: list[int], tol: float) -> None:
    """Raise if no ``E`` fits ``targets`` (least squares, in float64 on the CPU), or if the measurements
    determine ``E`` and its rank exceeds the narrowest hidden width.

    Formed only where cheap: ``Entries`` (the repeated entries must agree; ``E`` is determined when
    every entry is seen) and ``Inputs`` (the least squares of ``x``) always, others through their
    ``(n, d_L d_0)`` measurement matrix when it has at most ``_FIT_CHECK_MAX`` entries.  A rank is
    refused only when the measurements prove it: ``σ_min(J) ‖E - E_k‖_F``, a lower bound on the
    residual of every rank-``k`` matrix, above the threshold.
    """
    d_L, d_0, hidden = widths[-1], widths[0], widths[1:-1]
    b = targets.detach().to(device="cpu", dtype=torch.float64)
    threshold = max(tol, _FIT_RTOL) * float(b.norm())
    if isinstance(measurements, Entries):
        flat = (measurements.rows * d_0 + measurements.cols).cpu()
        seen, where, counts = torch.unique(flat, return_inverse=True, return_counts=True)
        mean = torch.zeros(len(seen), dtype=torch.float64).index_add_(0, where, b) / counts
        residual = float((b - mean[where]).norm())
        if residual > threshold:
            worst = int((b - mean[where]).abs().argmax())
            raise _no_fit(f"Entries measure entry ({int(measurements.rows[worst])}, {int(measurements.cols[worst])}) "
                          f"more than once with different targets (least-squares residual ‖A(E) - b‖/‖b‖ = "
                          f"{residual / float(b.norm()):.3g})")
        if len(seen) < d_L * d_0:
            return
        E, sigma_min = mean.reshape(d_L, d_0), float(counts.min()) ** 0.5
    else:
        if isinstance(measurements, Inputs):
            x = measurements.x.detach().to(device="cpu", dtype=torch.float64)
            fit = torch.linalg.lstsq(x, b, driver="gelsd")   # E ᵀ from x Eᵀ = B
            E, J_rank, J_sv, full = fit.solution.T, int(fit.rank), fit.singular_values, d_0
            residual = float((x @ fit.solution - b).norm())
        else:
            if b.numel() * d_L * d_0 > _FIT_CHECK_MAX:
                return
            m = measurements.to(device="cpu", dtype=torch.float64)
            if isinstance(m, Dense):
                J = m.A.reshape(m.n, d_L * d_0)
            else:  # the rows of J are the A_i: the Jacobian of the linear map predict
                J = torch.func.jacrev(m.predict)(torch.zeros(d_L, d_0, dtype=torch.float64)).reshape(-1, d_L * d_0)
            fit = torch.linalg.lstsq(J, b.reshape(-1, 1), driver="gelsd")
            E, J_rank, J_sv, full = fit.solution.reshape(d_L, d_0), int(fit.rank), fit.singular_values, d_L * d_0
            residual = float((J @ fit.solution - b.reshape(-1, 1)).norm())
        if residual > threshold:
            raise _no_fit(f"the least-squares fit leaves ‖A(E) - b‖/‖b‖ = {residual / float(b.norm()):.3g} "
                          f"(tol {tol:g}); the measurements have rank {J_rank} for {b.numel()} targets")
        if J_rank < full:
            return
        sigma_min = float(J_sv[-1])
    if not hidden:
        return
    k = min(hidden)
    S = torch.linalg.svdvals(E)
    # every rank-k E' leaves ‖A(E') - b‖ = ‖A(E' - E)‖ >= σ_min(J) ‖E' - E‖_F >= σ_min(J) ‖σ_{>k}(E)‖
    if sigma_min * float(S[k:].norm()) > threshold:
        rank = int((S > S[0] * _RANK_RTOL).sum())
        raise ValueError(f"hidden widths {hidden} must be at least the rank of E, which the measurements determine: "
                         f"the one E that fits them has rank {rank} (singular values {S[:rank + 1].tolist()}), and "
                         f"narrower layers cannot reach zero loss")


def _prepare(measurements, name: str, widths: list[int], like: torch.Tensor) -> Measurements:
    """``measurements`` in ``like``'s dtype and device, checked against ``E`` of shape ``(d_L, d_0)``."""
    if not isinstance(measurements, Measurements):
        raise TypeError(f"{name} must be a flatkern measurement family ({families.families_message()}), "
                        f"got {type(measurements).__name__}")
    d_L, d_0 = widths[-1], widths[0]
    m = measurements.to(device=like.device, dtype=like.dtype)
    try:
        m.check(d_L, d_0, like)
    except ValueError as exc:
        raise ValueError(f"widths {widths} give E of shape ({d_L}, {d_0}), which {name} {measurements!r} "
                         f"cannot measure: {exc}") from None
    return m


def _adjoint(m: Measurements, y: torch.Tensor, d_L: int, d_0: int) -> torch.Tensor:
    """``A*(y) = Σ_i y_i A_i``, shape ``(d_L, d_0)``: the gradient of ``<y, predict(E)>``, which is linear in ``E``."""
    E = torch.zeros(d_L, d_0, dtype=y.dtype, device=y.device, requires_grad=True)
    with torch.enable_grad():
        (adj,) = torch.autograd.grad((m.predict(E) * y).sum(), E)
    return adj


class _AugmentedLagrangian:
    """The method of multipliers on one problem, in units where ``‖E_0‖_F = 1`` for a rough
    interpolator ``E_0`` (so that the constants below do not depend on the data's scale)."""

    def __init__(self, m: Measurements, t_of: Measurements, b: torch.Tensor, widths: list[int], *, backend: str, generator):
        self.m, self.t_of, self.widths, self.backend = m, t_of, widths, backend
        self.L = L = len(widths) - 1
        d_L, d_0 = widths[-1], widths[0]
        # E_0: the multiple of A*(b) that fits b best
        Ab = _adjoint(m, b, d_L, d_0)
        pred = m.predict(Ab)
        if float(pred.square().sum()) == 0.0:  # A A*(b) = 0: b is orthogonal to every measurement's range
            raise _no_fit("A*(b) = Σ_i b_i A_i is zero, so b is orthogonal to everything the measurements can "
                          "predict")
        E0 = Ab * (float(b.flatten() @ pred.flatten()) / float(pred.square().sum()))
        self.scale = float(E0.norm())
        self.b = (b / self.scale).flatten()
        self.b_shape = b.shape
        E0 = E0 / self.scale
        # ρ in units of T/‖b‖²: the penalty's curvature against the trace's, estimated at the
        # flattest factorization of E_0's best approximation of the narrowest width's rank
        k = min(widths[1:-1], default=min(d_0, d_L))
        U, S, Vh = torch.linalg.svd(E0, full_matrices=False)
        with torch.no_grad():
            W0 = flattest_factorization((U[:, :k] * S[:k]) @ Vh[:k], widths)
            self.rho_unit = float(hessian_trace(W0, t_of, backend=backend)) / float(self.b @ self.b)
        self.shapes = [(widths[j + 1], widths[j]) for j in range(L)]
        self.offsets = [0]
        for h, w in self.shapes:
            self.offsets.append(self.offsets[-1] + h * w)
        # the start: LeCun-normal layers, drawn on the CPU so that a seed gives one start on every device
        self.x = torch.cat([torch.randn(h * w, generator=generator, dtype=b.dtype) * (_INIT / w ** 0.5)
                            for h, w in self.shapes]).to(b.device)
        self.generator = generator
        self.noise = max(_NOISE, 1e3 * torch.finfo(b.dtype).eps)
        self.evaluations = 0

    def layers(self, x):
        return [x[o:o + h * w].view(h, w) for o, (h, w) in zip(self.offsets, self.shapes)]

    def parts(self, x):
        """``T(W)``, ``r(W)`` (flat) and ``E(W)`` for the flat weights ``x``."""
        W = self.layers(x)
        E = end_to_end(W, backend=self.backend)
        T = hessian_trace(W, self.t_of, backend=self.backend)
        return T, self.m.predict(E).flatten() - self.b, E

    def run(self, *, tol, stationarity_tol, max_outer, max_inner, verbose, progress):
        x, b_norm = self.x, float(self.b.norm())
        y = torch.zeros_like(self.b)
        rho = _RHO0 * self.rho_unit
        best_feas, bound = math.inf, 0.0
        history, inner_total, converged = [], 0, False
        certify, escapes, saved = isinstance(self.t_of, Isotropic), 0, None
        # progress: the larger residual over its tolerance; a solve where it has not halved in
        # _PATIENCE outer iterations is stuck (infeasible widths, rounding floors) and stops
        best_progress, since, stalled = math.inf, 0, False
        # the fallback answer of a solve that does not converge: the most feasible iterate met,
        # starting from W = 0 (feasibility 1), so that it never fits worse than E = 0
        most_feasible = (1.0, torch.zeros_like(x), y, math.inf)
        memory = _Memory(_HISTORY)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=max_outer, desc="flattest_solution", unit="outer", leave=False)
        for k in range(max_outer):
            def value_and_grad(z, y=y, rho=rho):
                z = z.detach().requires_grad_()
                T, r, _ = self.parts(z)
                f = T / 2 + y @ r + rho / 2 * (r @ r)
                (g,) = torch.autograd.grad(f, z)
                self.evaluations += 1
                return float(f.detach()), g

            z = x.detach().requires_grad_()
            (grad_T,) = torch.autograd.grad(self.parts(z)[0] / 2, z)
            omega = max(min(_OMEGA0, best_feas), _OMEGA_STAT * stationarity_tol)
            x, inner = _lbfgs(value_and_grad, x, memory, max_iter=max_inner, gtol=omega * float(grad_T.norm()),
                              noise=self.noise)
            inner_total += inner

            z = x.detach().requires_grad_()
            T, r, E = self.parts(z)
            y = y + rho * r.detach()
            grad_T = torch.autograd.grad(T / 2, z, retain_graph=True)[0]
            grad_c = torch.autograd.grad(y @ r, z)[0]
            feas = float(r.detach().norm()) / b_norm
            stat = float((grad_T + grad_c).norm()) / max(float(grad_T.norm()), 1e-300)
            bound = max(bound, self.nuclear_norm_bound(y))
            entry = dict(feasibility=feas, stationarity=stat, trace=float(T.detach()) * self.scale ** (2 - 2 / self.L),
                         penalty=rho / self.scale ** (2 / self.L), inner=inner)
            history.append(entry)
            if verbose:
                print(f"flattest_solution: outer {k + 1}: {inner} L-BFGS iterations, rho {entry['penalty']:.3g}, "
                      f"feasibility {feas:.2e}, stationarity {stat:.2e}, trace {entry['trace']:.12g}",
                      file=sys.stderr, flush=True)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(feasibility=f"{feas:.1e}", stationarity=f"{stat:.1e}")
            if saved is not None and (feas <= _RESTART_FEAS and stat <= 10 * stationarity_tol
                                      or self.evaluations > 2 * saved[5]):
                # judge the restart once it is nearly feasible (a real gain is ~1e-3 of the trace), or
                # when it has cost as much as the first solve
                if float(T.detach()) >= saved[2] * (1 - _RESTART_GAIN) or self.evaluations > 2 * saved[5]:
                    x, y, _, stat, feas, _ = saved  # it found nothing flatter: keep the first answer
                    saved, converged = None, True
                    break
                saved = None
            if feas <= tol and stat <= stationarity_tol:
                gap = 1 - bound / float(torch.linalg.matrix_norm(E.detach(), ord="nuc"))
                x_new = self._escape(E.detach(), y) if certify and gap > _GAP_TOL and escapes < _MAX_ESCAPES else None
                if x_new is None:
                    converged = True
                    break
                # the multipliers do not certify this point, and point to ranks it lacks: restart with them
                if verbose:
                    print(f"flattest_solution: the multipliers leave a nuclear-norm gap of {gap:.2e}: restarting "
                          "with the ranks they point to", file=sys.stderr, flush=True)
                saved = (x, y, float(T.detach()), stat, feas, self.evaluations)
                x, escapes, best_feas, rho = x_new, escapes + 1, math.inf, _RHO0 * self.rho_unit
                best_progress, since = math.inf, 0
                memory.clear()
                continue
            if feas < most_feasible[0]:
                most_feasible = (feas, x, y, stat)
            progress_now = max(feas / tol, stat / stationarity_tol)
            if progress_now < 0.5 * best_progress:
                best_progress, since = progress_now, 0
            else:
                since += 1
                if since >= _PATIENCE and saved is None:
                    stalled = True
                    break
            if feas > _STALL * best_feas:
                rho = min(rho * _RHO_GROWTH, _RHO_MAX * self.rho_unit)
            best_feas = min(best_feas, feas)
        if saved is not None:  # the restart ran out of iterations: the point it left is the answer
            x, y, _, stat, feas, _ = saved
            converged = True
        if not converged and most_feasible[0] < feas:
            feas, x, y, stat = most_feasible
        if bar is not None:
            bar.close()
        weights = [w.detach() * self.scale ** (1 / self.L) for w in self.layers(x)]
        with torch.no_grad():
            E = end_to_end(weights, backend=self.backend)
            trace = float(hessian_trace(weights, self.t_of, backend=self.backend))
        report = FlattestReport(
            converged=converged, feasibility=feas, stationarity=stat, trace=trace,
            nuclear_norm=float(torch.linalg.matrix_norm(E, ord="nuc")), nuclear_norm_bound=bound * self.scale,
            outer_iterations=k + 1, inner_iterations=inner_total, evaluations=self.evaluations, restarts=escapes,
            penalty=rho / self.scale ** (2 / self.L),
            multipliers=(y * self.scale ** (1 - 2 / self.L)).reshape(self.b_shape), history=history, stalled=stalled)
        return weights, report

    def _escape(self, E, y):
        """A restart at the flattest factorization of ``E`` plus the directions the multipliers say it lacks.

        With ``G = -c A*(y)`` scaled so that ``U_kᵀ G V_k = I`` on the rank-``k`` support of ``E``,
        ``E`` is the minimum-nuclear-norm interpolator if ``‖P_U⊥ G P_V⊥‖_op <= 1``; a singular pair
        of that block above 1 is a direction in which the nuclear norm falls.  In the lifted problem
        that direction needs every layer to grow at once; the flattest factorization grows them.
        """
        U, S, Vh = torch.linalg.svd(E, full_matrices=False)
        k = int((S > _RANK_RTOL * S[0]).sum())
        room = min(self.widths[1:-1], default=0) - k
        if k == 0 or room <= 0:
            return None
        G = -_adjoint(self.m, y.reshape(self.b_shape), self.widths[-1], self.widths[0])
        Uk, Vk = U[:, :k], Vh[:k].T
        G = G * (k / float(torch.trace(Uk.T @ G @ Vk)))
        Z = G - Uk @ (Uk.T @ G)
        Z = Z - (Z @ Vk) @ Vk.T
        Uz, Sz, Vhz = torch.linalg.svd(Z, full_matrices=False)
        new = min(int((Sz > 1).sum()), room)
        if new == 0:
            return None
        E_new = E + (_ESCAPE_SIZE * float(S[k - 1])) * (Uz[:, :new] @ Vhz[:new])
        x = torch.cat([w.flatten() for w in flattest_factorization(E_new, self.widths)])
        noise = torch.randn(x.shape, generator=self.generator, dtype=x.dtype).to(x.device)
        return x + _ESCAPE_NOISE * float(x.abs().max()) * noise

    def nuclear_norm_bound(self, y) -> float:
        """Weak duality: every interpolator ``E`` has ``‖E‖_* >= |yᵀb| / ‖A*(y)‖_op``, whatever ``y``."""
        Y = _adjoint(self.m, y.reshape(self.b_shape), self.widths[-1], self.widths[0])
        op = float(torch.linalg.matrix_norm(Y, ord=2))
        return abs(float(y @ self.b)) / op if op > 0 else 0.0


class _Memory:
    """The L-BFGS pairs ``(s_i, y_i)``, applied in the compact form (Byrd, Nocedal, Schnabel 1994):
    a handful of matrix products instead of the two-loop recursion's ``4m`` vector operations,
    each of which costs a dispatch."""

    def __init__(self, size: int):
        self.size, self.S, self.Y = size, [], []

    def push(self, s, yv) -> None:
        if float(s @ yv) <= 1e-12 * float(s.norm() * yv.norm()):  # no positive curvature: skip the pair
            return
        self.S.append(s)
        self.Y.append(yv)
        if len(self.S) > self.size:
            del self.S[0], self.Y[0]

    def clear(self) -> None:
        self.S, self.Y = [], []

    def direction(self, g):
        """``-H g``, ``H`` the L-BFGS inverse-Hessian approximation (``γ I`` updated by the pairs)."""
        if not self.S:
            return -g
        S, Y = torch.stack(self.S), torch.stack(self.Y)
        SY = S @ Y.T                                    # SY[i, j] = s_iᵀ y_j
        gamma = SY[-1, -1] / (Y[-1] @ Y[-1])
        R = torch.triu(SY)
        q = torch.linalg.solve_triangular(R, (S @ g)[:, None], upper=True)[:, 0]
        rhs = torch.diagonal(SY) * q + gamma * (Y @ (Y.T @ q)) - gamma * (Y @ g)
        top = torch.linalg.solve_triangular(R.T, rhs[:, None], upper=False)[:, 0]
        return -(gamma * g + S.T @ top - gamma * (Y.T @ q))


def _lbfgs(value_and_grad, x, memory: _Memory, *, max_iter: int, gtol: float, noise: float):
    """Minimize ``value_and_grad`` (``z -> (f, ∇f)``) from ``x`` by L-BFGS with a strong-Wolfe line search.

    Stops when ``‖∇f‖ <= gtol``, after ``max_iter`` iterations, or when no step makes progress.
    The memory is kept across calls: successive inner problems differ by a multiplier update,
    and their curvature pairs stay useful.  Returns the last iterate and the iteration count.
    """
    f, g = value_and_grad(x)
    it = 0
    while it < max_iter and float(g.norm()) > gtol:
        d = memory.direction(g)
        gtd = float(g @ d)
        if gtd >= 0:  # stale memory: steepest descent
            memory.clear()
            d, gtd = -g, -float(g @ g)
        t0 = 1.0 if memory.S else min(1.0, 1.0 / float(g.abs().sum()))
        t, f_new, g_new = _strong_wolfe(value_and_grad, x, f, g, d, gtd, t0, noise=noise * abs(f))
        if t == 0.0:
            if not memory.S:
                break
            memory.clear()
            continue
        s = t * d
        memory.push(s, g_new - g)
        x, f, g = x + s, f_new, g_new
        it += 1
    return x.detach(), it


def _strong_wolfe(value_and_grad, x, f0, g0, d, gtd0, t, *, noise, c1=1e-4, c2=0.9, max_evals=25):
    """A step ``t`` along ``d`` meeting the strong Wolfe conditions (Nocedal & Wright, Algorithms 3.5, 3.6).

    Differences of values at most ``noise`` apart are taken from the trapezoid rule on the
    directional derivatives instead (Hager & Zhang's approximate Wolfe test): near the answer
    the decrease falls below the rounding error of the values, not of the slopes.
    Returns ``(t, f, g)``; ``t = 0`` when no acceptable step was found.
    """
    def rise(a, b):
        """``f(t_b) - f(t_a)`` for points ``(t, f, g, slope)``."""
        return b[1] - a[1] if abs(b[1] - a[1]) > noise else (b[0] - a[0]) * (a[3] + b[3]) / 2

    origin = (0.0, f0, g0, gtd0)

    def too_high(p, ref):
        return rise(origin, p) > c1 * p[0] * gtd0 or rise(ref, p) >= 0

    prev, lo, hi, evals = origin, None, None, 0
    while evals < max_evals:  # bracketing
        f, g = value_and_grad(x + t * d)
        evals += 1
        cur = (t, f, g, float(g @ d))
        if rise(origin, cur) > c1 * t * gtd0 or (evals > 1 and rise(prev, cur) >= 0):
            lo, hi = prev, cur
            break
        if abs(cur[3]) <= -c2 * gtd0:
            return t, f, g
        if cur[3] >= 0:
            lo, hi = cur, prev
            break
        t_next = _interpolate(prev, cur, noise, bounds=(t + 0.01 * (t - prev[0]), 10 * t))
        prev, t = cur, t_next
    else:
        return (prev[0], prev[1], prev[2]) if prev[0] > 0 else (0.0, f0, g0)

    d_max, x_max = float(d.abs().max()), max(1.0, float(x.abs().max()))
    while evals < max_evals:  # zoom: lo meets the decrease test and is lower than hi
        a, b = sorted((lo[0], hi[0]))
        if (b - a) * d_max < 1e-16 * x_max:
            break
        t = min(max(_interpolate(lo, hi, noise), a + 0.1 * (b - a)), b - 0.1 * (b - a))
        f, g = value_and_grad(x + t * d)
        evals += 1
        cur = (t, f, g, float(g @ d))
        if too_high(cur, lo):
            hi = cur
        else:
            if abs(cur[3]) <= -c2 * gtd0:
                return t, f, g
            if cur[3] * (hi[0] - lo[0]) >= 0:
                hi = lo
            lo = cur
    return (lo[0], lo[1], lo[2]) if lo[0] > 0 else (0.0, f0, g0)


def _interpolate(p, q, noise, bounds=None):
    """Minimizer of the cubic through two points' values and slopes (the secant on the slopes where
    the values do not resolve their difference), clipped to ``bounds`` (default: between the points)."""
    (t1, f1, _, d1), (t2, f2, _, d2) = p, q
    lo, hi = bounds if bounds is not None else (min(t1, t2), max(t1, t2))
    t = None
    if abs(f2 - f1) > noise:
        e1 = d1 + d2 - 3 * (f1 - f2) / (t1 - t2)
        disc = e1 * e1 - d1 * d2
        if disc >= 0:
            e2 = math.copysign(math.sqrt(disc), t2 - t1)
            if d2 - d1 + 2 * e2 != 0:
                t = t2 - (t2 - t1) * (d2 + e2 - e1) / (d2 - d1 + 2 * e2)
    elif d2 != d1:
        t = t1 - d1 * (t2 - t1) / (d2 - d1)
    if t is None or not math.isfinite(t):
        t = (lo + hi) / 2
    return min(max(t, lo), hi)


_INIT = 1.0         # start: W_j ~ N(0, _INIT² / d_{j-1}), in units where ‖E_0‖_F = 1
_HISTORY = 20       # L-BFGS memory
_RHO0 = 10.0        # first ρ, in units of T/‖b‖²
_RHO_GROWTH = 2.0   # ρ doubles ...
_STALL = 0.5        # ... when ‖r‖ did not fall below half its best
_RHO_MAX = 1e8      # cap on ρ, same units: beyond it y + ρ r is rounding noise
_OMEGA0 = 1e-2      # inner tolerance (relative gradient) at the start ...
_OMEGA_STAT = 0.1   # ... tightened with ‖r‖/‖b‖ down to this fraction of stationarity_tol
_GAP_TOL = 1e-6     # a nuclear-norm gap the multipliers leave above this triggers an escape ...
_MAX_ESCAPES = 3
_RESTART_FEAS = 1e-7  # ... which is judged once ‖r‖/‖b‖ is below this, and kept only if it
_RESTART_GAIN = 1e-6  # lowers the trace by more than this fraction
_ESCAPE_SIZE = 0.1   # size of the added directions, relative to E's smallest singular value
_ESCAPE_NOISE = 1e-3
_RANK_RTOL = 1e-6
_NOISE = 1e-10      # relative rounding error of L_ρ below which the line search compares slopes
_PATIENCE = 10      # outer iterations without halving max(feasibility/tol, stationarity/stationarity_tol): stalled
_DEFAULT_TOL = 1e-10               # feasibility tolerance in float64 ...
_DEFAULT_STATIONARITY_TOL = 1e-6   # ... and stationarity tolerance
_TOL_EPS = 100.0    # the tightest tolerances a dtype resolves, in units of its eps (float32: 1.2e-5)
_FIT_RTOL = 1e-8    # a least-squares residual (relative, float64) above max(tol, this) proves no E fits
_FIT_CHECK_MAX = 1 << 22  # most entries of the (n, d_L d_0) measurement matrix formed for that check (32 MB)
