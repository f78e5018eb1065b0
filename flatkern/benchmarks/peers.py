"""The ways people compute the Hessian trace today: the peers ``flatkern bench`` times flatkern against.

- ``torch.compile(reference)``: flatkern's plain-torch formula under ``torch.compile``;
- ``autograd Hessian``: ``torch.func.hessian`` of the loss, then its trace
  (exact; skipped when the ``p x p`` matrix would not fit);
- ``autograd HVP loop``: the exact trace ``Σ_k e_kᵀ H e_k`` by Hessian-vector
  products in chunks of basis vectors, for when ``hessian`` does not fit
  (timed on one chunk and extrapolated when all ``p`` products are out of reach);
- ``Hutchinson-100``: 100 Rademacher probes through HVPs, one probe at a
  time as PyHessian does (``loop``), and all probes at once (``vmap``);
- ``BackPACK DiagGGNExact``: the exact GGN diagonal of an ``nn.Sequential``
  of bias-free ``nn.Linear`` layers (regression, ``Inputs`` only); for a deep
  linear network ``tr H = tr GGN`` (docs/MATH.md), so its sum is the exact trace;
- ``curvlinops Hutch++``: ``curvlinops.hutchpp_trace`` with 99 matrix-vector
  products of its ``HessianLinearOperator`` (Hutch++ needs a multiple of 3).

``providers_for(device)`` is the full list of rows: flatkern's backends, then these.
"""

from __future__ import annotations

import warnings

import torch

import flatkern

from ..measurements import Dense, Entries
from ..reference import end_to_end_ref, hessian_trace_ref
from .problems import Problem, Provider, flat_loss, flatkern_provider, needs_one_problem
from .timing import time_once

__all__ = ["PEERS", "PEER_INSTALL", "providers_for", "flatkern_auto_backend", "hutchinson_loop", "hutchinson_vmap",
           "hvp_loop_trace", "backpack_trace", "curvlinops_hutchpp", "NUM_PROBES", "HUTCHPP_MATVECS"]

# How the README installs the peers (after the ``bench`` extra), and the one command a skipped peer suggests:
# --no-deps, because their declared dependencies replace a CPU torch with a CUDA build (tests check the
# README holds this very line)
PEER_INSTALL = ("pip install --no-deps backpack-for-pytorch==1.7.1 unfoldNd==0.2.3 "
                "curvlinops-for-pytorch==3.0.1 einconv==0.1.0")
_NOT_INSTALLED = f"not installed; the README installs the peers with `{PEER_INSTALL}` (--no-deps keeps torch)"

NUM_PROBES = 100  # Hutchinson probes, as in PyHessian's default use
HUTCHPP_MATVECS = 99  # Hutch++ splits its products in thirds: the multiple of 3 closest to NUM_PROBES


# --- the reference under torch.compile

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
    reason = needs_one_problem(problem)
    if reason:
        return reason
    p = problem.regime.num_params
    need = p * p * problem.weights[0].element_size()
    if need > HESSIAN_MAX_BYTES:
        return f"the {p} x {p} Hessian needs {need / 2**30:.0f} GiB (> {HESSIAN_MAX_BYTES / 2**30:.0f}); see the HVP loop"
    return None


def _hessian_trace(problem: Problem) -> torch.Tensor:
    loss, theta = flat_loss(problem)
    return torch.func.hessian(loss)(theta).diagonal().sum()


HVP_CHUNK = 256  # basis vectors per vmapped batch of HVPs
HVP_MAX_PARAMS = 20_000  # run the whole loop up to this many parameters; extrapolate above


def _hvp_fn(problem: Problem):
    loss, theta = flat_loss(problem)

    def hvp(v):  # forward-over-reverse: one HVP at about the cost of a gradient
        return torch.func.jvp(torch.func.grad(loss), (theta,), (v,))[1]

    return torch.func.vmap(hvp), theta


def hvp_loop_trace(problem: Problem, chunk: int = HVP_CHUNK) -> torch.Tensor:
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
    seconds = time_once(lambda: hvps(basis), theta.device)
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
    seconds = time_once(lambda: hutchinson_loop(problem, num_probes=2), problem.weights[0].device)
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
        return _NOT_INSTALLED
    reason = needs_one_problem(problem)
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
        return _NOT_INSTALLED
    reason = needs_one_problem(problem)
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
    seconds = time_once(lambda: curvlinops_hutchpp(problem, num_matvecs=3), problem.weights[0].device)
    return seconds * HUTCHPP_MATVECS / 3, f"extrapolated from 3 matvecs ({seconds:.3g} s)"


PEERS = [
    Provider("torch.compile(reference)", "exact", _compiled_trace, differentiable=True, compiles=True,
             quick_regimes=()),
    Provider("autograd Hessian (torch.func.hessian)", "exact", _hessian_trace, _hessian_skip),
    Provider("autograd HVP loop (exact, chunked)", "exact", hvp_loop_trace, needs_one_problem,
             too_slow=_hvp_loop_too_slow, estimate_time=_hvp_loop_estimate, quick_regimes=()),
    Provider(f"Hutchinson-{NUM_PROBES} (PyHessian loop)", "estimator", hutchinson_loop, needs_one_problem,
             too_slow=_hutch_too_slow, estimate_time=_hutch_estimate),
    Provider(f"Hutchinson-{NUM_PROBES} (vmap)", "estimator", hutchinson_vmap, needs_one_problem, too_slow=_hutch_too_slow),
    Provider("BackPACK DiagGGNExact", "exact", backpack_trace, _backpack_skip),
    Provider(f"curvlinops Hutch++ ({HUTCHPP_MATVECS} matvecs)", "estimator", curvlinops_hutchpp, _curvlinops_skip,
             too_slow=_hutch_too_slow, estimate_time=_curvlinops_estimate),
]


def providers_for(device: str | torch.device = "cpu") -> list[Provider]:
    """flatkern's backends available on ``device`` (``torch`` = the eager reference), then the peers."""
    return [flatkern_provider(b) for b in flatkern.available_backends(device)] + PEERS


# what backend="auto" runs on each device when that backend is available (flatkern.hessian_trace's docs);
# elsewhere it runs the plain-torch reference
_AUTO_PREFERS = {"cpu": "cpp", "cuda": "triton"}


def flatkern_auto_backend(device: str | torch.device = "cpu") -> str:
    """The backend ``backend="auto"`` runs on ``device`` (the row every ratio is taken against)."""
    device = torch.device(device)
    preferred = _AUTO_PREFERS.get(device.type)
    return preferred if preferred in flatkern.available_backends(device) else "torch"
