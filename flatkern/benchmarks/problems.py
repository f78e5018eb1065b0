"""The problems of ``flatkern bench`` and the rows that time flatkern itself.

A ``Regime`` names a problem (widths, measurement family, size, batch);
``make_problem`` builds its tensors once, with the float64 reference trace
every provider is judged against.  A ``Provider`` is one way to compute the
trace; ``flatkern_provider(backend)`` is ``flatkern.hessian_trace`` with that
backend (the peers live in ``peers.py``).

The loss every peer differentiates has the value of flatkern's own
``mse_loss_ref(end_to_end_ref(W), measurements, targets)`` (``reduction="mean"``),
so every provider estimates the same number; Dense predictions are written
as one matrix product, the form autograd differentiates fastest (``peer_predict``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import flatkern

from ..kernels import families
from ..measurements import Dense, Entries, Inputs, Isotropic, Measurements, RankOne
from ..reference import end_to_end_ref, hessian_trace_ref, mse_loss_ref

__all__ = ["Regime", "REGIMES", "TEST_REGIMES", "Problem", "peer_predict", "make_problem", "Provider",
           "flatkern_provider", "flat_loss", "needs_one_problem"]

@dataclass(frozen=True)
class Regime:
    """One benchmark problem: widths ``dims = [d_0, ..., d_L]``, a measurement family and its size."""

    name: str
    dims: tuple[int, ...]
    family: str  # a registry class name in lower case (flatkern/kernels/families.py): "dense", "entries", ...
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


# measurements and targets per family, keyed by the registry's class names (lower case): a family the
# registry has and the benchmarks cannot build is a ValueError naming it, never a silent gap
_BUILDERS = {
    "dense": lambda d_L, d_0, n, g, randn: (Dense(randn(n, d_L, d_0)), randn(n)),
    "entries": lambda d_L, d_0, n, g, randn: (Entries.uniform(n, (d_L, d_0), generator=g), randn(n)),
    "inputs": lambda d_L, d_0, n, g, randn: (Inputs(randn(n, d_0)), randn(n, d_L)),
    "isotropic": lambda d_L, d_0, n, g, randn: (Isotropic(), randn(d_L, d_0)),
    "rankone": lambda d_L, d_0, n, g, randn: (RankOne(randn(n, d_L), randn(n, d_0)), randn(n)),
}
assert set(_BUILDERS) == {name.lower() for name in families.CLASS_NAMES}, "a registry family has no benchmark builder"


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
    build = _BUILDERS.get(regime.family)
    if build is None:
        raise ValueError(f"regime {regime.name!r} has unknown family {regime.family!r}; the benchmarks build "
                         f"{', '.join(sorted(_BUILDERS))} (flatkern/kernels/families.py lists "
                         f"{families.families_message()})")
    meas, targets = build(d_L, d_0, n, g, randn)
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


def flat_loss(problem: Problem):
    """The loss as a function of one flat parameter vector ``θ`` (what torch.func's Hessian takes)."""
    shapes = [w.shape for w in problem.weights]
    sizes = [w.numel() for w in problem.weights]

    def loss(theta):
        return problem.loss([t.view(s) for t, s in zip(theta.split(sizes), shapes)])

    theta = torch.cat([w.detach().reshape(-1) for w in problem.weights])
    return loss, theta


def needs_one_problem(problem: Problem) -> str | None:
    if problem.batched:
        return "no batched mode: one problem at a time (see the single-problem tables)"
    return None


def flatkern_provider(backend: str) -> Provider:
    """``flatkern.hessian_trace(weights, measurements, backend=backend)``: the row ``flatkern[<backend>]``."""
    return Provider(
        f"flatkern[{backend}]", "exact",
        lambda p: flatkern.hessian_trace(p.weights, p.measurements, backend=backend),
        differentiable=True,
    )
