"""The inductive bias of flatness for deep linear networks (docs/MATH.md, the theorem).

For a target ``M`` of shape ``(d_L, d_0)`` and hidden widths ``>= rank M``:

    min_{W : E(W) = M} Σ_j ‖P_j‖_F² ‖Q_j‖_F² = L (d_0 d_L)^{1/L} ‖M‖_*^{2(L-1)/L}

so the minimum trace of the ``Isotropic`` Hessian (MSE, mean) is twice that,
and the flattest interpolator is the minimum-nuclear-norm one for every depth.
"""

from __future__ import annotations

import torch

from ._checks import check_int, check_real
from ._checks import check_widths as _check_widths  # the one rule for widths (flattest_solution imports it from here)
from .measurements import Dense, Entries, Inputs, Isotropic, Measurements, RankOne

__all__ = ["flatness_lower_bound", "flattest_factorization", "rip_constant_lower_estimate", "rip_nuclear_norm_factor"]


def _check_matrix(M, name="M") -> None:
    if not isinstance(M, torch.Tensor) or not M.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor of shape (..., d_L, d_0), got {type(M).__name__}"
                        + (f" of dtype {M.dtype}" if isinstance(M, torch.Tensor) else ""))
    if M.dim() < 2:
        raise ValueError(f"{name} must have shape (..., d_L, d_0), got {tuple(M.shape)}")


def flatness_lower_bound(M: torch.Tensor, depth: int) -> torch.Tensor:
    """Minimum of the ``Isotropic`` trace of the Hessian over depth-``depth`` factorizations of ``M``.

        2 L (d_0 d_L)^{1/L} ‖M‖_*^{2 - 2/L}        (MSE, reduction="mean")

    Args:
        M: ``(..., d_L, d_0)``.
        depth: number of layers ``L >= 1`` (an int or numpy integer).

    Returns:
        Shape ``(...)``.  Attained by ``flattest_factorization`` when the hidden
        widths are at least ``rank M``.
    """
    _check_matrix(M)
    depth = check_int(depth, "depth", minimum=1)
    d_L, d_0 = M.shape[-2], M.shape[-1]
    nuc = torch.linalg.matrix_norm(M, ord="nuc")
    return 2 * depth * (d_0 * d_L) ** (1 / depth) * nuc ** (2 - 2 / depth)


def flattest_factorization(M: torch.Tensor, widths, *, rtol: float | None = None) -> list[torch.Tensor]:
    """Weights ``[W_1, ..., W_L]`` with ``W_L ⋯ W_1 = M`` whose ``Isotropic`` trace is ``flatness_lower_bound``.

    With ``M = U Σ Vᵀ`` (rank ``r``) and ``β = (‖M‖_* / √(d_0 d_L))^{1/L}`` (docs/MATH.md):
    ``W_1 = (d_0/d_L)^{1/4} β^{1-L/2} [Σ^{1/2} Vᵀ; 0]``, ``W_j = β diag(I_r, 0)``,
    ``W_L = (d_L/d_0)^{1/4} β^{1-L/2} [U Σ^{1/2}, 0]``.

    Args:
        M: ``(d_L, d_0)`` (unbatched).
        widths: all layer widths ``[d_0, d_1, ..., d_L]``, ints (``d_0``, ``d_L`` must match ``M``);
            hidden widths must be at least ``rank M``.
        rtol: singular values below ``rtol * σ_max`` count as zero (default: dtype eps × max(d)).

    Returns:
        List of ``L = len(widths) - 1`` tensors, ``W_j`` of shape ``(d_j, d_{j-1})``.
    """
    _check_matrix(M)
    if M.dim() != 2:
        raise ValueError(f"flattest_factorization takes one matrix M of shape (d_L, d_0), got {tuple(M.shape)}")
    widths = _check_widths(widths)
    d_L, d_0 = M.shape
    if widths[0] != d_0 or widths[-1] != d_L:
        raise ValueError(f"widths {widths} must start with d_0={d_0} and end with d_L={d_L} for M of shape {tuple(M.shape)}")
    L = len(widths) - 1
    if L == 1:
        return [M.clone()]
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    tol = (rtol if rtol is not None else torch.finfo(M.dtype).eps * max(d_0, d_L)) * (S[0] if S.numel() else 0)
    r = int((S > tol).sum())
    hidden = widths[1:-1]
    if r > min(hidden):
        raise ValueError(f"hidden widths {hidden} must be at least rank M = {r}")
    zeros = [torch.zeros(widths[j + 1], widths[j], dtype=M.dtype, device=M.device) for j in range(L)]
    if r == 0:
        return zeros
    U, S, Vh = U[:, :r], S[:r], Vh[:r]
    beta = (S.sum() / (d_0 * d_L) ** 0.5) ** (1 / L)
    end = beta ** (1 - L / 2)
    W = zeros
    W[0][:r] = (d_0 / d_L) ** 0.25 * end * S.sqrt()[:, None] * Vh
    W[-1][:, :r] = (d_L / d_0) ** 0.25 * end * U * S.sqrt()
    for j in range(1, L - 1):
        W[j][:r, :r] = beta * torch.eye(r, dtype=M.dtype, device=M.device)
    return W


# ---------------------------------------------------------------------------------------------------------
# The training-loss trace and the RIP constant (docs/MATH.md): the theorem with the trace of the training
# loss in place of the Isotropic one holds up to the factor ((1 + δ)/(1 - δ))^{L/(2L-2)}, δ the (1, δ)-RIP
# constant of the measurements.  Certifying δ is NP-hard; what follows is a lower estimate of it.


def rip_constant_lower_estimate(measurements, shape=None, *, restarts: int | None = None, iterations: int = 100,
                                tol: float = 1e-12, generator: torch.Generator | None = None,
                                return_witness: bool = False):
    """A lower estimate of the rank-one (``(1, δ)``-) RIP constant of a measurement set.

    The constant is the smallest ``δ`` with

        (1 - δ) ‖X‖_F² ≤ (s/n) Σ_i <A_i, X>² ≤ (1 + δ) ‖X‖_F²       for every rank-one X,

    i.e. ``δ = max over unit u ∈ R^{d_L}, v ∈ R^{d_0} of |f(u, v) - 1|`` with
    ``f(u, v) = (s/n) Σ_i (uᵀ A_i v)²``.  The normalization ``s`` is the one under which
    ``E f(u, v) = 1`` for the family's random draws:

    - ``Dense(A)``, ``A`` of shape ``(n, d_L, d_0)``: ``s = 1`` (i.i.d. N(0, 1) entries, ``Dense.gaussian``);
    - ``RankOne(u, v)`` (``A_i = u_i v_iᵀ``): ``s = 1`` (i.i.d. N(0, 1) ``u_i``, ``v_i``);
    - ``Entries`` (``A_i = e_{a_i} e_{b_i}ᵀ``): ``s = d_0 d_L`` (uniform entries), so
      ``f(u, v) = (d_0 d_L / n) Σ_i u_{a_i}² v_{b_i}²``;
    - ``Isotropic``: ``E[A ⊗ A] = I`` exactly, so ``δ = 0``.

    Certifying ``δ`` is NP-hard in general; for ``Dense`` and ``RankOne`` the value returned is
    ``|f(u, v) - 1|`` at the best pair found, hence a LOWER estimate: the true ``δ`` is at least this
    (and may be larger).  The search: ``restarts`` random unit ``v`` for each of the two sides (largest
    ``f``, for the deviation above 1, and smallest ``f``, below 1), then alternating optimization: with
    ``v`` fixed, ``f(·, v)`` is the quadratic form of ``(s/n) Σ_i (A_i v)(A_i v)ᵀ`` (``d_L × d_L``), whose
    top (bottom) eigenvector is the best ``u``; then the same in ``v`` with
    ``(s/n) Σ_i (A_iᵀ u)(A_iᵀ u)ᵀ`` (``d_0 × d_0``).  Each step is exact, so ``f`` is monotone along a
    chain; a chain stops when one round moves ``f`` by at most ``tol · max(1, |f|)`` or after
    ``iterations`` rounds.  ``f`` at the pair returned is recomputed in float64 directly from the
    measurements, so the value returned is ``|f - 1|`` at an actual unit pair, whatever the search's
    precision.  When ``d_L = 1`` or
    ``d_0 = 1`` every matrix is rank-one and the first round already reaches the global optimum.

    For ``Entries`` the answer is exact (no search): ``f`` is bilinear in ``(u², v²)`` over two
    simplices, so its extremes are at entries, ``δ = max((s/n) c_max - 1, 1 - (s/n) c_min)`` with
    ``c`` the number of times each entry is observed (``c_min = 0``, hence ``δ ≥ 1``, while any entry is
    unobserved: completion is never RIP below ``d_0 d_L`` observations).  ``Inputs`` (every output
    observed) is refused: its training trace over the isotropic one is governed by the spectrum of
    ``xᵀx / N``, not by a RIP constant.

    Cost per round and chain (``Dense``): two passes over ``A`` (``O(n d_L d_0)``) and two Gram
    matrices (``O(n (d_L² + d_0²))``), batched over the ``2 · restarts`` chains as matrix products (no
    loop over ``n``).  The search runs in float64 below ``n d_L d_0 = 10⁶`` and in float32 from there on
    (a copy of ``A`` in float32; rounds 2.5x faster; a round moving ``f`` by less than ``10 ε_32`` is no
    progress): a few seconds for ``100 × 100``, ``n = 5000`` on one CPU core with the defaults.

    Args:
        measurements: a ``Dense``, ``RankOne``, ``Entries`` or ``Isotropic`` object.
        shape: optional ``(d_L, d_0)``, checked against the measurements; needed only for the witness
            of ``Isotropic``.
        restarts: random starts per side (``>= 1``).  Default: ``max(4, min(16, 10⁷ // (n d_L d_0)))``,
            i.e. 16 for small sets, where local optima are common and a round costs nothing, down to 4 at
            ``100 × 100, n >= 250``, where one round of one chain is ``~10⁸`` flops.  For one
            ``generator`` seed more restarts never give a lower estimate, up to rounding (the starts are nested).
        iterations: most alternating rounds per chain (``>= 1``).
        tol: a chain stops when a round changes ``f`` by at most ``tol · max(1, |f|)`` (``>= 0``).
        generator: ``torch.Generator`` for the random starts (the result is deterministic given it).
        return_witness: also return the unit vectors ``u`` (``(d_L,)``) and ``v`` (``(d_0,)``),
            float64, at which ``|f(u, v) - 1|`` equals the returned ``δ``.

    Returns:
        ``δ`` as a Python float ``>= 0``, or ``(δ, u, v)`` with ``return_witness=True``.
    """
    if not isinstance(measurements, Measurements):
        hint = " (wrap a tensor of sensing matrices as flatkern.Dense(A))" if isinstance(measurements, torch.Tensor) else ""
        raise TypeError(f"measurements must be a flatkern measurement object (Dense, RankOne, Entries or "
                        f"Isotropic), got {type(measurements).__name__}{hint}")
    if isinstance(measurements, Inputs):
        raise TypeError("rip_constant_lower_estimate: measurements of type Inputs (regression y = E x, every output "
                        "observed) have no RIP constant to estimate: their training trace over the isotropic one is "
                        "set by the eigenvalues of x.T @ x / N (torch.linalg.eigvalsh), not by rank-one RIP")
    if not isinstance(measurements, (Dense, RankOne, Entries, Isotropic)):
        raise TypeError(f"rip_constant_lower_estimate supports Dense, RankOne, Entries and Isotropic measurements, "
                        f"got {type(measurements).__name__}")
    if restarts is not None:
        restarts = check_int(restarts, "restarts", minimum=1)
    iterations = check_int(iterations, "iterations", minimum=1)
    tol = check_real(tol, "tol", minimum=0.0)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if not isinstance(return_witness, bool):
        raise TypeError(f"return_witness must be a bool, got {return_witness!r}")
    if shape is not None:
        if isinstance(shape, (str, bytes)) or not hasattr(shape, "__len__") or len(shape) != 2:
            raise ValueError(f"shape must be (d_L, d_0), got {shape!r}")
        shape = (check_int(shape[0], "shape[0] (d_L)", minimum=1), check_int(shape[1], "shape[1] (d_0)", minimum=1))
        measurements._check_shape(*shape)

    if isinstance(measurements, Isotropic):
        if not return_witness:
            return 0.0
        if shape is None:
            raise ValueError("rip_constant_lower_estimate(Isotropic(), return_witness=True) needs shape=(d_L, d_0) "
                             "to build the witness vectors (Isotropic measurements carry no shape)")
        e = [torch.zeros(d, dtype=torch.float64) for d in shape]
        for t in e:
            t[0] = 1.0  # δ = 0 is attained at every pair
        return 0.0, e[0], e[1]
    if isinstance(measurements, Entries):
        delta, u, v = _rip_entries(measurements)
    else:
        delta, u, v = _rip_search(measurements, restarts, iterations, tol, generator)
    return (delta, u, v) if return_witness else delta


def _rip_entries(m) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Exact δ of ``Entries``: ``f`` is extreme at the most and the least observed entry (O(n) memory)."""
    d_L, d_0 = m.shape
    total, s = d_L * d_0, d_L * d_0 / m.n
    flat, counts = torch.unique(m.rows * d_0 + m.cols, sorted=True, return_counts=True)
    top = int(counts.argmax())
    hi_at, hi = int(flat[top]), s * int(counts[top])
    if flat.numel() < total:
        # the first flat index missing from the sorted list: an entry never observed (f = 0 there)
        gaps = (flat != torch.arange(flat.numel(), device=flat.device)).nonzero()
        lo_at, lo = (int(gaps[0]) if gaps.numel() else flat.numel()), 0.0
    else:
        bottom = int(counts.argmin())
        lo_at, lo = int(flat[bottom]), s * int(counts[bottom])
    at = hi_at if hi - 1 >= 1 - lo else lo_at
    u = torch.zeros(d_L, dtype=torch.float64, device=m.rows.device)
    v = torch.zeros(d_0, dtype=torch.float64, device=m.rows.device)
    u[at // d_0], v[at % d_0] = 1.0, 1.0
    return max(hi - 1, 1 - lo), u, v


# from this many multiply-adds per pass over the measurements (n d_L d_0) on, the search runs in float32
# (2.5x faster matrix products on CPU); f at the pair it finds is then recomputed in float64
_RIP_FLOAT32_FROM = 10**6


def _rip_forms(m, dtype):
    """``(gram_u, gram_v)`` of ``Dense``/``RankOne`` in ``dtype`` (s = 1).

    ``gram_u(V)``: ``V`` ``(R, d_0)`` -> ``(R, d_L, d_L)`` = ``(1/n) Σ_i (A_i v_r)(A_i v_r)ᵀ``;
    ``gram_v(U)``: ``U`` ``(R, d_L)`` -> ``(R, d_0, d_0)`` = ``(1/n) Σ_i (A_iᵀ u_r)(A_iᵀ u_r)ᵀ``.
    """
    n = m.n
    if isinstance(m, Dense):
        _, d_L, d_0 = m.A.shape
        # (d_L, n, d_0): both contractions are then single matrix products on views of one buffer
        Ap = m.A.permute(1, 0, 2).to(dtype).contiguous()
        by_col, by_row = Ap.view(d_L * n, d_0), Ap.view(d_L, n * d_0)

        def gram_u(V):
            B = (V @ by_col.T).view(-1, d_L, n)  # B[r, :, i] = A_i v_r
            return B @ B.transpose(-1, -2) / n

        def gram_v(U):
            C = (U @ by_row).view(-1, n, d_0)  # C[r, i, :] = A_iᵀ u_r
            return C.transpose(-1, -2) @ C / n
    else:  # RankOne: uᵀ A_i v = (a_iᵀ u)(b_iᵀ v)
        a, b = m.u.to(dtype), m.v.to(dtype)

        def _weighted_gram(X, w):  # Σ_i w[r, i] x_i x_iᵀ / n for every r
            return (X.T.unsqueeze(0) * w.unsqueeze(1)) @ X / n

        def gram_u(V):
            return _weighted_gram(a, (V @ b.T).square())

        def gram_v(U):
            return _weighted_gram(b, (U @ a.T).square())
    return gram_u, gram_v


def _rip_value(m, u, v) -> float:
    """``f(u, v) = (1/n) Σ_i (uᵀ A_i v)²`` in float64 (``u``, ``v`` float64)."""
    if isinstance(m, Dense):
        _, d_L, d_0 = m.A.shape
        by_row = m.A.permute(1, 0, 2).to(torch.float64).reshape(d_L, m.n * d_0)  # a view for a float64 Dense
        return float(((u @ by_row).view(m.n, d_0) @ v).square().mean())
    return float(((m.u.to(torch.float64) @ u) * (m.v.to(torch.float64) @ v)).square().mean())


def _rip_search(m, restarts, iterations, tol, generator) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Alternating optimization of ``f(u, v)`` from random starts, both sides at once (see the public docstring)."""
    for name, t in ((("A", m.A),) if isinstance(m, Dense) else (("u", m.u), ("v", m.v))):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{type(m).__name__} {name} (shape {tuple(t.shape)}) holds non-finite values: "
                             "no RIP constant to estimate")
    d_L, d_0 = (m.A.shape[1], m.A.shape[2]) if isinstance(m, Dense) else (m.u.shape[1], m.v.shape[1])
    work = m.n * d_L * d_0
    if restarts is None:
        restarts = max(4, min(16, 10**7 // work))
    dtype = torch.float32 if work >= _RIP_FLOAT32_FROM else torch.float64
    # a change of f below the working precision's rounding is no progress
    tol = max(tol, 10 * torch.finfo(dtype).eps) if dtype == torch.float32 else tol
    gram_u, gram_v = _rip_forms(m, dtype)
    device = m.A.device if isinstance(m, Dense) else m.u.device
    chains = 2 * restarts
    draw_on = generator.device if generator is not None else "cpu"
    # one draw per restart (its start above, then its start below): with more restarts the chains are a
    # superset of those with fewer, so for one seed the estimate never goes down as restarts grow
    starts = torch.stack([torch.randn(2, d_0, generator=generator, dtype=torch.float64, device=draw_on)
                          for _ in range(restarts)], dim=1).reshape(chains, d_0).to(device)
    V = (starts / torch.linalg.vector_norm(starts, dim=1, keepdim=True)).to(dtype)
    U = torch.zeros(chains, d_L, dtype=dtype, device=device)
    # the first `restarts` chains maximize f (deviation above 1), the others minimize it (below 1)
    pick = torch.tensor([-1] * restarts + [0] * restarts, device=device)
    f = torch.full((chains,), float("nan"), dtype=dtype, device=device)
    active = torch.arange(chains, device=device)
    for _ in range(iterations):
        rows = torch.arange(active.numel(), device=device)
        _, vecs = torch.linalg.eigh(gram_u(V[active]))
        U[active] = vecs[rows, :, pick[active]]
        vals, vecs = torch.linalg.eigh(gram_v(U[active]))
        V[active] = vecs[rows, :, pick[active]]
        new = vals[rows, pick[active]]
        # a chain whose value stopped moving is done; the others go on (f is monotone along each)
        moving = ~((new - f[active]).abs() <= tol * f[active].abs().clamp(min=1))
        f[active] = new
        active = active[moving]
        if active.numel() == 0:
            break
    # both sides' best pairs, f recomputed at them in float64 (the eigenvalue is f there up to rounding)
    best = []
    for at in (int(f.argmax()), int(f.argmin())):
        u, v = U[at].to(torch.float64), V[at].to(torch.float64)
        u, v = u / torch.linalg.vector_norm(u), v / torch.linalg.vector_norm(v)
        best.append((abs(_rip_value(m, u, v) - 1), u, v))
    return max(best, key=lambda b: b[0])


def rip_nuclear_norm_factor(delta, depth: int) -> float:
    """The theorem's factor under ``(1, δ)``-RIP: ``((1 + δ) / (1 - δ))^{L / (2L - 2)}``.

    With ``x*`` the zero-loss solution of least training-loss trace and ``Ê`` the minimum-nuclear-norm
    interpolator, ``‖E(x*)‖_* ≤ factor · ‖Ê‖_*`` (docs/MATH.md, the training-loss trace and the RIP
    constant).  Feed it ``rip_constant_lower_estimate``'s value only as an estimate: the bound needs
    the true ``δ``, which is at least that.

    Args:
        delta: ``0 <= δ < 1`` (a real number; at ``δ >= 1`` the bound says nothing).
        depth: ``L >= 2`` (at depth 1 the trace does not depend on the factorization and the exponent is infinite).

    Returns:
        The factor, a Python float ``>= 1``.
    """
    delta = check_real(delta, "delta", minimum=0.0)
    if delta >= 1:
        raise ValueError(f"delta must be < 1 for the RIP factor ((1 + δ)/(1 - δ))^(L/(2L-2)) to be finite, got {delta}")
    depth = check_int(depth, "depth", minimum=1)
    if depth < 2:
        raise ValueError(f"depth must be >= 2 for the RIP factor ((1 + δ)/(1 - δ))^(L/(2L-2)) (its exponent is "
                         f"infinite at L = 1), got {depth}")
    return ((1 + delta) / (1 - delta)) ** (depth / (2 * depth - 2))
