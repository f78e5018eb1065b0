"""``flatkern bench``: flatkern's exact trace next to the ways people compute it today.

Every regime builds one problem (weights, measurements, targets) and hands the
same tensors to every provider, so the ratios within one table are measured
in one run on one machine:

- ``flatkern[<backend>]``: ``flatkern.hessian_trace`` for each backend
  available on the device (``torch`` is the plain-torch reference, eager);
- ``torch.compile(reference)``: the same reference formula under ``torch.compile``;
- ``autograd Hessian``: ``torch.func.hessian`` of the loss, then its trace
  (exact; skipped when the ``p x p`` matrix would not fit);
- ``autograd HVP loop``: the exact trace ``Σ_k e_kᵀ H e_k`` by Hessian-vector
  products in chunks of basis vectors, for when ``hessian`` does not fit
  (timed on one chunk and extrapolated when all ``p`` products are out of reach);
- ``Hutchinson-100``: 100 Rademacher probes through HVPs, one probe at a
  time as PyHessian does (``loop``), and all probes at once (``vmap``);
- ``BackPACK DiagGGNExact``: the exact GGN diagonal of an ``nn.Sequential``
  of bias-free ``nn.Linear`` layers (regression, ``Inputs`` only); for a deep
  linear network ``tr H = tr GGN`` (MATH.md), so its sum is the exact trace;
- ``curvlinops Hutch++``: ``curvlinops.hutchpp_trace`` with 99 matrix-vector
  products of its ``HessianLinearOperator`` (Hutch++ needs a multiple of 3).

The loss every peer differentiates has the value of flatkern's own
``mse_loss_ref(end_to_end_ref(W), measurements, targets)`` (``reduction="mean"``),
so every provider estimates the same number; Dense predictions are written
as one matrix product, the form autograd differentiates fastest (``peer_predict``).
A quick run (the default) leaves ``torch.compile`` and the exact HVP loop
to ``--full``: compiling alone takes 20-60 s per regime on 2 cores.

What is measured:

- time: wall-clock seconds.  Each provider first runs once, untimed, on a
  tiny problem of the same family (lazy imports and one-time setup); then its
  first call on the real problem is timed, and if it took longer than
  ``--single-shot`` seconds that one call is the time ("one timed call");
  otherwise the time is the median of repeated calls over ``--min-time``
  seconds.  A first call much slower than the median is noted (the C++
  backend builds and caches ``Dense.kernel()`` then; torch.compile's
  compilation is timed apart).  ``fwd`` is the trace, ``fwd+bwd`` the trace
  and its gradient with respect to the weights (differentiable providers only);
- peak memory, of that first call: on CPU, the rise of the process's peak
  resident set size (``VmHWM``, reset through ``/proc/self/clear_refs``) over
  its resident size before the call, with glibc told to return blocks over
  64 KiB to the system at once (``mallopt``, ``malloc_trim``) so that memory
  freed earlier can neither hide nor inflate it; on CUDA,
  ``torch.cuda.max_memory_allocated`` above the memory allocated before the call;
- error: ``|value - exact| / |exact|`` with ``exact`` the plain-torch
  reference in float64 (the largest over the problems of a batch).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import ops
from .measurements import Dense, Entries, Inputs, Isotropic, Measurements
from .reference import end_to_end_ref, hessian_trace_ref, mse_loss_ref

__all__ = [
    "Regime", "Problem", "Provider", "REGIMES", "PEERS", "make_problem", "providers_for",
    "measure", "run_regime", "add_arguments", "run", "main",
]

NUM_PROBES = 100  # Hutchinson probes, as in PyHessian's default use
HUTCHPP_MATVECS = 99  # Hutch++ splits its products in thirds: the multiple of 3 closest to NUM_PROBES


# ------------------------------------------------------------------ problems


@dataclass(frozen=True)
class Regime:
    """One benchmark problem: widths ``dims = [d_0, ..., d_L]``, a measurement family and its size."""

    name: str
    dims: tuple[int, ...]
    family: str  # "dense", "entries", "inputs", "isotropic"
    n: int = 0  # measurements (dense, entries) or samples N (inputs)
    batch: tuple[int, ...] = ()
    quick: bool = False  # part of the default (quick) run
    description: str = ""

    @property
    def num_params(self) -> int:
        return sum(a * b for a, b in zip(self.dims[:-1], self.dims[1:]))


REGIMES = [
    Regime("small", (30, 30, 30, 30), "dense", 200, quick=True, description="one small problem, d=30, L=3, Dense n=200"),
    Regime("regression", (30, 30, 30, 30), "inputs", 256, quick=True,
           description="one small regression y = E x, d=30, L=3, N=256 (the model BackPACK and curvlinops take)"),
    Regime("batched", (30, 30, 30, 30), "dense", 200, batch=(64,), quick=True,
           description="64 independent small problems (d=30, L=3) sharing one Dense n=200"),
    Regime("headline", (32, 32, 32, 32, 32), "dense", 2000, quick=True,
           description="d=32, L=4, Dense n=2000: the README's headline"),
    Regime("large", (1024,) * 5, "inputs", 256, description="one large problem, d=1024, L=4, regression N=256"),
    Regime("dense-large-n", (16,) * 5, "dense", 100_000, description="dense sensing with large n: d=16, L=4, n=10^5"),
    Regime("completion", (2000, 100, 100, 2000), "entries", 1_000_000,
           description="matrix completion, 10^6 observed entries of a 2000 x 2000 matrix, widths 100, L=3"),
]
# tiny problems for the tests (not listed by --regimes unless named)
TEST_REGIMES = [
    Regime("tiny", (3, 4, 5, 2), "dense", 9, description="test problem"),
    Regime("tiny-regression", (3, 4, 5, 2), "inputs", 6, description="test problem"),
    Regime("tiny-batched", (3, 4, 5, 2), "dense", 9, batch=(2,), description="test problem"),
]


@dataclass
class Problem:
    """The tensors of one regime: ``weights`` ``[W_1..W_L]`` of shape ``(*batch, d_j, d_{j-1})``."""

    regime: Regime
    weights: list[torch.Tensor]
    measurements: Measurements
    targets: torch.Tensor
    exact: torch.Tensor = field(default=None)  # float64 reference trace, shape batch

    @property
    def batched(self) -> bool:
        return len(self.regime.batch) > 0

    def loss(self, weights: list[torch.Tensor]) -> torch.Tensor:
        """The MSE loss (``reduction="mean"``) that every peer differentiates: ``mse_loss_ref``'s value."""
        E = end_to_end_ref(weights)
        if isinstance(self.measurements, Isotropic):
            return mse_loss_ref(E, self.measurements, self.targets, "mean")
        return (peer_predict(E, self.measurements) - self.targets).square().mean()


def peer_predict(E: torch.Tensor, measurements: Measurements) -> torch.Tensor:
    """The predictions ``<A_i, E>`` as the peers compute them (one unbatched ``E``).

    Dense is one matrix product ``vec(E)ᵀ A_flatᵀ`` rather than ``mse_loss_ref``'s
    einsum: on CPU the einsum's double backward is two orders of magnitude
    slower (measured: 375 ms against 1 ms per HVP at d=30, n=200), which would
    flatter flatkern next to every HVP-based peer.
    """
    if isinstance(measurements, Dense):
        A = measurements.A
        return (E.reshape(1, -1) @ A.reshape(A.shape[0], -1).T).reshape(-1)
    return measurements.predict(E)


def make_problem(regime: Regime, *, dtype=torch.float32, device="cpu", seed: int = 0) -> Problem:
    """Random weights scaled so that products stay O(1), measurements and targets of ``regime``."""
    g = torch.Generator().manual_seed(seed)
    dims = regime.dims
    weights = [
        (torch.randn(*regime.batch, dims[j + 1], dims[j], generator=g, dtype=torch.float64) / math.sqrt(dims[j]))
        for j in range(len(dims) - 1)
    ]
    d_L, d_0, n = dims[-1], dims[0], regime.n
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    if regime.family == "dense":
        meas, targets = Dense(randn(n, d_L, d_0)), randn(n)
    elif regime.family == "entries":
        meas, targets = Entries.uniform(n, (d_L, d_0), generator=g), randn(n)
    elif regime.family == "inputs":
        meas, targets = Inputs(randn(n, d_0)), randn(n, d_L)
    elif regime.family == "isotropic":
        meas, targets = Isotropic(), randn(d_L, d_0)
    else:
        raise ValueError(f"regime {regime.name!r} has unknown family {regime.family!r}")
    # the ground truth in float64 before casting: the exact number estimators are judged against
    exact = hessian_trace_ref(weights, meas)
    weights = [w.to(device=device, dtype=dtype) for w in weights]
    return Problem(regime, weights, meas.to(device=device, dtype=dtype), targets.to(device=device, dtype=dtype), exact)


# ------------------------------------------------------------------ providers


@dataclass
class Provider:
    """One way to compute the trace.

    ``trace(problem)`` returns the trace, shape ``batch``; ``skip(problem)``
    says why it cannot run on ``problem`` (``None`` if it can).
    ``differentiable`` providers are also timed with a backward pass.
    ``too_slow(problem)`` says why a full run is out of reach; then
    ``estimate_time(problem)``, where given, returns ``(seconds, note)``
    extrapolated from a part of the work.
    """

    name: str
    kind: str  # "exact" or "estimator"
    trace: Callable[[Problem], torch.Tensor]
    skip: Callable[[Problem], str | None] = lambda p: None
    differentiable: bool = False
    too_slow: Callable[[Problem], str | None] = lambda p: None
    estimate_time: Callable[[Problem], tuple[float, str]] | None = None
    compiles: bool = False  # first call on each shape compiles: timed apart
    quick_regimes: tuple[str, ...] | None = None  # where a quick run includes it (None: everywhere; () : --full only)


def _flat(problem: Problem):
    """The loss as a function of one flat parameter vector ``θ`` (what torch.func's Hessian takes)."""
    shapes = [w.shape for w in problem.weights]
    sizes = [w.numel() for w in problem.weights]

    def loss(theta):
        return problem.loss([t.view(s) for t, s in zip(theta.split(sizes), shapes)])

    theta = torch.cat([w.detach().reshape(-1) for w in problem.weights])
    return loss, theta


def _needs_one_problem(problem: Problem) -> str | None:
    if problem.batched:
        return "no batched mode: one problem at a time (see the single-problem tables)"
    return None


# --- flatkern backends and the reference under torch.compile


def _flatkern_provider(backend: str) -> Provider:
    return Provider(
        f"flatkern[{backend}]", "exact",
        lambda p: ops.hessian_trace(p.weights, p.measurements, backend=backend),
        differentiable=True,
    )


_compiled: dict = {}


def _compiled_trace(problem: Problem) -> torch.Tensor:
    # one compiled function per measurements object (the closure holds it); the last one only
    meas = problem.measurements
    if _compiled.get("measurements") is not meas:
        # a fresh cache: every regime compiles the same lambda, and past the recompile limit
        # (8) dynamo would silently run it eagerly
        torch._dynamo.reset()
        _compiled.update(measurements=meas, fn=torch.compile(lambda ws: hessian_trace_ref(ws, meas), dynamic=False))
    return _compiled["fn"](problem.weights)


# --- autograd: the full Hessian, and the exact HVP loop

HESSIAN_MAX_BYTES = 2 * 2**30  # the p x p Hessian must fit in this


def _hessian_skip(problem: Problem) -> str | None:
    reason = _needs_one_problem(problem)
    if reason:
        return reason
    p = problem.regime.num_params
    need = p * p * problem.weights[0].element_size()
    if need > HESSIAN_MAX_BYTES:
        return f"the {p} x {p} Hessian needs {need / 2**30:.0f} GiB (> {HESSIAN_MAX_BYTES / 2**30:.0f}); see the HVP loop"
    return None


def _hessian_trace(problem: Problem) -> torch.Tensor:
    loss, theta = _flat(problem)
    return torch.func.hessian(loss)(theta).diagonal().sum()


HVP_CHUNK = 256  # basis vectors per vmapped batch of HVPs
HVP_MAX_PARAMS = 20_000  # run the whole loop up to this many parameters; extrapolate above


def _hvp_fn(problem: Problem):
    loss, theta = _flat(problem)

    def hvp(v):  # forward-over-reverse: one HVP at about the cost of a gradient
        return torch.func.jvp(torch.func.grad(loss), (theta,), (v,))[1]

    return torch.func.vmap(hvp), theta


def _hvp_loop_trace(problem: Problem, chunk: int = HVP_CHUNK) -> torch.Tensor:
    """Exact ``Σ_k e_kᵀ H e_k``: ``p`` HVPs with basis vectors, ``chunk`` at a time."""
    hvps, theta = _hvp_fn(problem)
    p, total = theta.numel(), theta.new_zeros(())
    for start in range(0, p, chunk):
        idx = torch.arange(start, min(start + chunk, p), device=theta.device)
        basis = torch.zeros(len(idx), p, dtype=theta.dtype, device=theta.device)
        basis[torch.arange(len(idx)), idx] = 1
        total = total + hvps(basis)[torch.arange(len(idx)), idx].sum()
    return total


def _hvp_loop_too_slow(problem: Problem) -> str | None:
    if problem.regime.num_params > HVP_MAX_PARAMS:
        return f"p = {problem.regime.num_params} HVPs (> {HVP_MAX_PARAMS})"
    return None


HVP_ESTIMATE_CHUNK = 8  # HVPs timed to extrapolate the loop: a vmapped HVP of a large problem holds GBs


def _hvp_loop_estimate(problem: Problem) -> tuple[float, str]:
    hvps, theta = _hvp_fn(problem)
    p, k = theta.numel(), min(HVP_CHUNK, HVP_ESTIMATE_CHUNK)
    basis = torch.zeros(k, p, dtype=theta.dtype, device=theta.device)
    basis[torch.arange(k), torch.arange(k)] = 1
    seconds = _time_once(lambda: hvps(basis))
    return seconds * p / k, f"extrapolated: {k} HVPs took {seconds:.3g} s, p = {p}"


# --- Hutchinson with Rademacher probes


def _rademacher(shape, generator, dtype, device):
    return (torch.randint(0, 2, shape, generator=generator) * 2 - 1).to(dtype=dtype, device=device)


def hutchinson_loop(problem: Problem, num_probes: int = NUM_PROBES, seed: int = 0) -> torch.Tensor:
    """PyHessian's estimator: ``(1/m) Σ_k v_kᵀ H v_k``, one HVP (double backward) per probe."""
    g = torch.Generator().manual_seed(seed)
    params = [w.detach().requires_grad_() for w in problem.weights]
    grads = torch.autograd.grad(problem.loss(params), params, create_graph=True)
    total = params[0].new_zeros(())
    for _ in range(num_probes):
        vs = [_rademacher(w.shape, g, w.dtype, w.device) for w in params]
        hvs = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True)
        total = total + sum((hv * v).sum() for hv, v in zip(hvs, vs))
    return total.detach() / num_probes


def hutchinson_vmap(problem: Problem, num_probes: int = NUM_PROBES, seed: int = 0) -> torch.Tensor:
    """The same estimator with all probes in one vmapped forward-over-reverse HVP."""
    g = torch.Generator().manual_seed(seed)
    hvps, theta = _hvp_fn(problem)
    V = _rademacher((num_probes, theta.numel()), g, theta.dtype, theta.device)
    return (hvps(V) * V).sum(-1).mean()


HUTCH_MAX_PARAMS = 2_000_000  # above this, 100 HVPs are timed on a few and extrapolated


def _hutch_too_slow(problem: Problem) -> str | None:
    if problem.regime.num_params > HUTCH_MAX_PARAMS:
        return f"p = {problem.regime.num_params} (> {HUTCH_MAX_PARAMS}): {NUM_PROBES} HVPs take minutes"
    return None


def _hutch_estimate(problem: Problem) -> tuple[float, str]:
    seconds = _time_once(lambda: hutchinson_loop(problem, num_probes=2))
    return seconds * NUM_PROBES / 2, f"extrapolated from 2 probes ({seconds:.3g} s)"


# --- BackPACK


def _deep_linear_sequential(problem: Problem) -> torch.nn.Sequential:
    """The network as an ``nn.Sequential`` of bias-free ``nn.Linear`` layers holding copies of the weights."""
    layers = []
    for W in problem.weights:
        lin = torch.nn.Linear(W.shape[-1], W.shape[-2], bias=False, device=W.device, dtype=W.dtype)
        with torch.no_grad():
            lin.weight.copy_(W)
        layers.append(lin)
    return torch.nn.Sequential(*layers)


def _backpack_skip(problem: Problem) -> str | None:
    try:
        import backpack  # noqa: F401
    except ImportError:
        return "not installed (pip install backpack-for-pytorch)"
    reason = _needs_one_problem(problem)
    if reason:
        return reason
    if problem.regime.family != "inputs":
        return "needs an nn.Module on inputs: regression (Inputs) problems only"
    # DiagGGNExact backpropagates the d_L columns of the output Hessian's square root per sample
    N, d_L, d = problem.measurements.x.shape[0], problem.regime.dims[-1], max(problem.regime.dims)
    need = N * d_L * d * problem.weights[0].element_size()
    if need > 2**29:
        return f"its square-root GGN needs about N d_L d = {need / 2**30:.1f} GiB per layer"
    return None


def backpack_trace(problem: Problem) -> torch.Tensor:
    """``Σ diag(GGN)`` from BackPACK's ``DiagGGNExact``; exact for deep linear networks (``tr H = tr GGN``)."""
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNExact

    model = extend(_deep_linear_sequential(problem))
    lossfunc = extend(torch.nn.MSELoss(reduction="mean"))
    loss = lossfunc(model(problem.measurements.x), problem.targets)
    with backpack(DiagGGNExact()), warnings.catch_warnings():
        # the inputs need no gradient; BackPACK's hooks say so on every call
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        loss.backward()
    return sum(p.diag_ggn_exact.sum() for p in model.parameters()).detach()


# --- curvlinops


class _Predictor(torch.nn.Module):
    """``X -> <A_i, E>``: the network as curvlinops sees it (a model of the batch ``X``)."""

    def __init__(self, problem: Problem):
        super().__init__()
        self.params = torch.nn.ParameterList([torch.nn.Parameter(w.detach().clone()) for w in problem.weights])
        self.family = problem.regime.family

    def forward(self, X):
        E = end_to_end_ref(list(self.params))
        if self.family == "dense":  # as in peer_predict
            return (E.reshape(1, -1) @ X.reshape(X.shape[0], -1).T).reshape(-1)
        if self.family == "entries":
            return E[X[:, 0], X[:, 1]]
        return X @ E.T  # inputs


def _curvlinops_skip(problem: Problem) -> str | None:
    try:
        import curvlinops  # noqa: F401
    except ImportError:
        return "not installed (pip install curvlinops-for-pytorch)"
    reason = _needs_one_problem(problem)
    if reason:
        return reason
    if problem.regime.family == "isotropic":
        return "no finite data set to hand to a linear operator"
    if problem.regime.num_params <= HUTCHPP_MATVECS:
        return f"Hutch++ needs more than {HUTCHPP_MATVECS} parameters, got {problem.regime.num_params}"
    return None


def _curvlinops_data(problem: Problem):
    m = problem.measurements
    if isinstance(m, Dense):
        return m.A
    if isinstance(m, Entries):
        return torch.stack([m.rows, m.cols], dim=1)
    return m.x


def curvlinops_hutchpp(problem: Problem, num_matvecs: int = HUTCHPP_MATVECS, seed: int = 0) -> torch.Tensor:
    """curvlinops' Hutch++ estimate of the Hessian trace with ``num_matvecs`` products."""
    from curvlinops import HessianLinearOperator, hutchpp_trace

    model = _Predictor(problem)
    H = HessianLinearOperator(
        model, torch.nn.MSELoss(reduction="mean"), list(model.parameters()),
        [(_curvlinops_data(problem), problem.targets)], check_deterministic=False,
    )
    torch.manual_seed(seed)  # curvlinops draws its probes from the global generator
    return hutchpp_trace(H, num_matvecs).detach()


def _curvlinops_estimate(problem: Problem) -> tuple[float, str]:
    seconds = _time_once(lambda: curvlinops_hutchpp(problem, num_matvecs=3))
    return seconds * HUTCHPP_MATVECS / 3, f"extrapolated from 3 matvecs ({seconds:.3g} s)"


PEERS = [
    Provider("torch.compile(reference)", "exact", _compiled_trace, differentiable=True, compiles=True,
             quick_regimes=()),
    Provider("autograd Hessian (torch.func.hessian)", "exact", _hessian_trace, _hessian_skip),
    Provider("autograd HVP loop (exact, chunked)", "exact", _hvp_loop_trace, _needs_one_problem,
             too_slow=_hvp_loop_too_slow, estimate_time=_hvp_loop_estimate, quick_regimes=()),
    Provider(f"Hutchinson-{NUM_PROBES} (PyHessian loop)", "estimator", hutchinson_loop, _needs_one_problem,
             too_slow=_hutch_too_slow, estimate_time=_hutch_estimate),
    Provider(f"Hutchinson-{NUM_PROBES} (vmap)", "estimator", hutchinson_vmap, _needs_one_problem, too_slow=_hutch_too_slow),
    Provider("BackPACK DiagGGNExact", "exact", backpack_trace, _backpack_skip),
    Provider(f"curvlinops Hutch++ ({HUTCHPP_MATVECS} matvecs)", "estimator", curvlinops_hutchpp, _curvlinops_skip,
             too_slow=_hutch_too_slow, estimate_time=_curvlinops_estimate),
]


def providers_for(device: str | torch.device = "cpu") -> list[Provider]:
    """flatkern's backends available on ``device`` (``torch`` = the eager reference), then the peers."""
    return [_flatkern_provider(b) for b in ops.available_backends(device)] + PEERS


def flatkern_auto_backend(device: str | torch.device = "cpu") -> str:
    """The backend ``backend="auto"`` picks on ``device`` (the row every ratio is taken against)."""
    device = torch.device(device)
    preferred = ops._AUTO_BY_DEVICE.get(device.type)
    return preferred if preferred in ops.available_backends(device) else "torch"


# ------------------------------------------------------------------ measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _time(fn, device, *, min_time: float, max_repeat: int, single_shot: float, memory: bool = False):
    """``(median seconds, timed calls, first result, peak bytes of the first call, first call's seconds)``.

    See the module docstring.
    """
    out, first, peak = peak_memory(fn, device) if memory else (None, None, None)
    if not memory:
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        first = time.perf_counter() - start
    if first > single_shot:
        return first, 1, out, peak, first
    times, spent = [], 0.0
    while len(times) < max_repeat and (spent < min_time or len(times) < 3):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
        spent += times[-1]
    times.sort()
    return times[len(times) // 2], len(times), out, peak, first


_libc = None


def _release_freed_memory() -> bool:
    """Ask glibc to hand blocks over 64 KiB straight back to the system, so RSS tracks live memory."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
            _libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD (fixed: no dynamic growth)
            _libc.mallopt(-1, 1 << 16)  # M_TRIM_THRESHOLD
        except OSError:
            _libc = False
    return bool(_libc)


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def peak_memory(fn, device) -> tuple[object, float, float | None]:
    """``(fn(), seconds, bytes of peak memory fn() adds)`` (see the module docstring).

    The bytes are ``None`` where they cannot be measured (CPU outside Linux).
    """
    device = torch.device(device)
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        seconds = time.perf_counter() - start
        return out, seconds, float(torch.cuda.max_memory_allocated(device) - base)
    base = None
    if sys.platform.startswith("linux") and _release_freed_memory():
        try:
            _libc.malloc_trim(0)  # hand back what earlier calls freed, so it cannot be reused unseen
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            base = _proc_status_kib("VmRSS")
        except OSError:
            base = None
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    peak = None if base is None else float(_proc_status_kib("VmHWM") - base) * 1024
    return out, seconds, peak


def _fwd_bwd(provider: Provider, problem: Problem):
    weights = [w.detach().requires_grad_() for w in problem.weights]
    p = Problem(problem.regime, weights, problem.measurements, problem.targets, problem.exact)

    def call():
        for w in weights:
            w.grad = None
        provider.trace(p).sum().backward()

    return call


_warmed: set = set()


def _warm_up(provider: Provider, problem: Problem) -> None:
    """One untimed call on a tiny problem of the same family: lazy imports and one-time setup are not timed."""
    key = (provider.name, problem.regime.family, len(problem.regime.batch), problem.weights[0].dtype)
    if key in _warmed or provider.compiles:
        return
    _warmed.add(key)
    tiny = Regime("warm-up", (3, 4, 5, 4), problem.regime.family, 9, batch=(2,) * len(problem.regime.batch))
    tiny_problem = make_problem(tiny, dtype=problem.weights[0].dtype, device=problem.weights[0].device)
    if provider.skip(tiny_problem) is None:
        try:
            provider.trace(tiny_problem)
            if provider.differentiable:
                _fwd_bwd(provider, tiny_problem)()
        except (RuntimeError, ValueError):
            pass  # the timed call will report it


def measure(provider: Provider, problem: Problem, *, min_time=0.5, max_repeat=50, single_shot=3.0, memory=True) -> dict:
    """Time, peak memory, value and relative error of one provider on one problem (a row of the table)."""
    device = problem.weights[0].device
    row = {"regime": problem.regime.name, "provider": provider.name, "kind": provider.kind, "fwd_s": None,
           "fwd_bwd_s": None, "peak_bytes": None, "value": None, "rel_err": None, "note": ""}
    reason = provider.skip(problem)
    if reason is not None:
        row["note"] = "skipped: " + reason
        return row
    reason = provider.too_slow(problem)
    if reason is not None:
        if provider.estimate_time is None:
            row["note"] = "skipped: " + reason
        else:
            row["fwd_s"], row["note"] = provider.estimate_time(problem)
            row["extrapolated"] = True
        return row
    try:
        _warm_up(provider, problem)
        fn = lambda: provider.trace(problem)  # noqa: E731
        notes = []
        if provider.compiles:
            row["compile_s"] = _time_once(fn) + _time_once(_fwd_bwd(provider, problem))
            notes.append(f"compiling took {row['compile_s']:.3g} s (not in the times)")
        row["fwd_s"], row["repeats"], value, row["peak_bytes"], row["first_s"] = _time(
            fn, device, min_time=min_time, max_repeat=max_repeat, single_shot=single_shot, memory=memory)
        if row["repeats"] > 1 and row["first_s"] > 3 * row["fwd_s"]:
            # e.g. the C++ backend builds and caches Dense.kernel() on its first call
            notes.append(f"first call {_fmt_time(row['first_s'])}")
        exact = problem.exact.to(value.device)
        row["value"] = value.double().reshape(-1).tolist()
        row["rel_err"] = ((value.double() - exact).abs() / exact.abs()).max().item()
        if provider.differentiable:
            row["fwd_bwd_s"], *_ = _time(_fwd_bwd(provider, problem), device, min_time=min_time,
                                            max_repeat=max_repeat, single_shot=single_shot)
        if row["repeats"] == 1:
            notes.append("one timed call")
        row["note"] = "; ".join(notes)
    except (RuntimeError, MemoryError) as exc:  # an out-of-memory peer is a result, not a crash
        row["note"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return row


def run_regime(regime: Regime, providers: list[Provider], *, dtype=torch.float32, device="cpu", log=None,
               deferred: tuple[str, ...] = (), **kw) -> dict:
    """Every provider on one problem of ``regime``: the regime's entry of the results.

    Rows carry ``slowdown_vs_flatkern`` = provider time / time of the backend ``"auto"`` picks.
    Providers named in ``deferred`` get a row saying they run with ``--full``.
    """
    problem = make_problem(regime, dtype=dtype, device=device)
    rows = []
    for provider in providers:
        if provider.name in deferred:
            rows.append({"regime": regime.name, "provider": provider.name, "kind": provider.kind, "fwd_s": None,
                         "fwd_bwd_s": None, "peak_bytes": None, "value": None, "rel_err": None,
                         "note": "not in the quick run: --full"})
            continue
        if log:
            log(f"  {regime.name}: {provider.name} ...")
        rows.append(measure(provider, problem, **kw))
    base = next((r["fwd_s"] for r in rows if r["provider"] == f"flatkern[{flatkern_auto_backend(device)}]"), None)
    for r in rows:
        r["slowdown_vs_flatkern"] = r["fwd_s"] / base if (base and r["fwd_s"]) else None
    return {"description": regime.description, "dims": list(regime.dims), "family": regime.family, "n": regime.n,
            "batch": list(regime.batch), "num_params": regime.num_params,
            "exact": problem.exact.reshape(-1).tolist(), "rows": rows}


# ------------------------------------------------------------------ report


def _fmt_time(s):
    if s is None:
        return "—"
    return f"{s * 1e6:.0f} µs" if s < 1e-3 else f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def _fmt_bytes(b):
    if b is None:
        return "—"
    return f"{b / 2**20:.1f} MiB" if b >= 2**20 else f"{b / 2**10:.0f} KiB"


def _fmt_row(r) -> list[str]:
    est = r.get("extrapolated")
    t = _fmt_time(r["fwd_s"])
    ratio = r.get("slowdown_vs_flatkern")
    return [
        r["provider"], r["kind"], ("≈ " + t) if est and r["fwd_s"] else t, _fmt_time(r["fwd_bwd_s"]),
        _fmt_bytes(r["peak_bytes"]), "—" if r["rel_err"] is None else f"{r['rel_err']:.1e}",
        "—" if ratio is None else (("≈ " if est else "") + f"{ratio:,.3g}x"), r["note"],
    ]


HEADER = ["provider", "kind", "fwd", "fwd+bwd", "peak mem", "rel. error", "time / flatkern", "note"]


def to_markdown(results: dict, header: bool = True) -> str:
    """The tables of ``results`` (``run``'s json) as markdown, with the machine and versions unless ``header=False``."""
    lines = []
    if header:
        env = results["environment"]
        packages = ("torch", "flatkern", "backpack-for-pytorch", "curvlinops-for-pytorch", "triton")
        versions = ", ".join(f"{k} {env[k]}" for k in packages)
        commit = f" at commit {env['commit']}" if env.get("commit") else ""
        lines += [f"Machine: {env['cpu']}, {env['threads']} torch threads, device {env['device']}"
                  + (f" ({env['gpu']})" if "gpu" in env else "") + f"; Python {env['python']}; {versions}{commit}.", "",
                  f"Command: `{results['command']}` ({results['dtype']}, {results['seconds']:.0f} s). "
                  f"`time / flatkern` is each row's fwd time over `{results['flatkern_row']}`, the backend "
                  "`backend=\"auto\"` picks; `≈` marks times extrapolated from part of the work.", ""]
    for regime_name, info in results["regimes"].items():
        lines += [f"### {regime_name}: {info['description']}", "",
                  f"`p = {info['num_params']}` parameters, exact trace = {info['exact'][0]:.6g}", "",
                  "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
        lines += ["| " + " | ".join(_fmt_row(r)) + " |" for r in info["rows"]]
        lines.append("")
    return "\n".join(lines)


def to_text(results: dict) -> str:
    out = []
    for regime_name, info in results["regimes"].items():
        cells = [HEADER[:-1]] + [_fmt_row(r)[:-1] for r in info["rows"]]
        widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER) - 1)]
        out.append(f"{regime_name}: {info['description']} (p = {info['num_params']}, exact = {info['exact'][0]:.6g})")
        for k, c in enumerate(cells):
            note = "" if k == 0 else info["rows"][k - 1]["note"]
            out.append("  " + "  ".join(x.ljust(w) for x, w in zip(c, widths)) + (f"  [{note}]" if note else ""))
        out.append("")
    return "\n".join(out)


def environment(device) -> dict:
    """Machine and versions, for the table's header."""
    from importlib.metadata import PackageNotFoundError, version

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    env = {"cpu": cpu, "threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
           "device": str(device)}
    if torch.device(device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    for pkg in ("flatkern", "backpack-for-pytorch", "curvlinops-for-pytorch", "triton"):
        try:
            env[pkg] = version(pkg)
        except PackageNotFoundError:
            env[pkg] = "not installed"
    try:  # the checkout measured, when run from one
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        def git(*args):
            cmd = ["git", "--no-optional-locks", "-C", root, *args]  # read-only: never touches the index
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()

        dirty = " (with uncommitted changes)" if git("status", "--porcelain") else ""
        env["commit"] = git("rev-parse", "--short", "HEAD") + dirty
    except (OSError, subprocess.SubprocessError):
        pass
    return env


# ------------------------------------------------------------------ command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``flatkern bench``."""
    names = [r.name for r in REGIMES + TEST_REGIMES]
    parser.add_argument("--full", action="store_true",
                        help="every regime and provider (default: the quick ones, under 3 minutes on 2 CPU cores)")
    parser.add_argument("--regimes", nargs="+", choices=names, metavar="NAME",
                        help=f"run only these regimes (choices: {', '.join(names)})")
    parser.add_argument("--all-providers", action="store_true",
                        help="every provider in every regime run, also torch.compile (~20-60 s of compiling per regime) "
                             "and the exact HVP loop, which a quick run leaves to --full")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's default)")
    parser.add_argument("--providers", nargs="+", metavar="SUBSTRING",
                        help="run only providers whose name contains one of these (the flatkern rows always run)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds of repeated calls per timing (default 0.5)")
    parser.add_argument("--single-shot", type=float, default=3.0,
                        help="a provider whose first call takes longer is timed by that call alone (default 3 s)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--out", metavar="FILE", help="also write the results: FILE.json as json, anything else as markdown")


def _command(args) -> str:
    """The command line that produced a run, for the table's header."""
    argv = getattr(args, "argv", None)
    if argv is None:  # called by flatkern.cli: sys.argv is [flatkern, bench, ...]
        argv = sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]
    return " ".join(["flatkern bench", *argv])


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args`` (see ``add_arguments``); print the table; 0 on success."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("flatkern bench: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    regimes = [r for r in REGIMES + TEST_REGIMES if r.name in args.regimes] if args.regimes else \
        [r for r in REGIMES if args.full or r.quick]
    providers = providers_for(device)
    if args.providers:
        providers = [p for p in providers if p.name.startswith("flatkern[") or any(s in p.name for s in args.providers)]
    results = {"environment": environment(device), "command": _command(args),
               "dtype": args.dtype, "flatkern_row": f"flatkern[{flatkern_auto_backend(device)}]", "regimes": {}}
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    start = time.perf_counter()
    everywhere = args.full or args.all_providers
    for regime in regimes:
        log(f"{regime.name}: {regime.description}")
        deferred = tuple(p.name for p in providers
                         if not (everywhere or p.quick_regimes is None or regime.name in p.quick_regimes))
        results["regimes"][regime.name] = run_regime(
            regime, providers, deferred=deferred, dtype=getattr(torch, args.dtype), device=device, log=log,
            min_time=args.min_time, single_shot=args.single_shot, memory=not args.no_memory)
    results["seconds"] = time.perf_counter() - start
    env = results["environment"]
    print(f"flatkern bench on {env['cpu']} ({env['threads']} threads), torch {env['torch']}, {args.dtype}, device {device}")
    print(f"time / flatkern: each row's fwd time over {results['flatkern_row']} (what backend='auto' picks)\n")
    print(to_text(results))
    print(f"total {results['seconds']:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            if args.out.endswith(".json"):
                json.dump(results, f, indent=1)
            else:
                f.write(to_markdown(results) + "\n")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="flatkern bench", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
