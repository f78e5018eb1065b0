"""flatkern's exact trace against autograd Hessians, Hutchinson, BackPACK and curvlinops.

    pytest bench/test_bench_peers.py --benchmark-group-by=group --benchmark-columns=min,median,max,rounds
    pytest bench/test_bench_peers.py -m slow ...     # the large regimes too (minutes)

One benchmark group per regime: every provider times the trace of the same
problem in the same run, so the ratios read off one table.  The providers
and problems are those of ``flatkern bench`` (``flatkern/benchmarks/``);
the value of each exact provider is checked against the float64 reference
and each estimator's relative error is stored in ``extra_info``.
"""

from __future__ import annotations

import time

import pytest
import torch

import flatkern.benchmarks as B
from flatkern.benchmarks.timing import time_once

PROVIDERS = B.providers_for("cpu")
_problems: dict = {}


def _problem(regime: B.Regime) -> B.Problem:
    if regime.name not in _problems:
        _problems.clear()  # one regime's tensors at a time
        _problems[regime.name] = B.make_problem(regime, dtype=torch.float32)
    return _problems[regime.name]


def _rounds(fn, first: float) -> int:
    """Slow peers are timed once; fast providers for about half a second (sized on a warm call)."""
    if first > 1.0:
        return 1
    second = time_once(fn)
    return max(3, min(200, int(0.5 / max(second, 1e-6))))


def _regime_param(regime: B.Regime):
    return pytest.param(regime, id=regime.name, marks=() if regime.quick else pytest.mark.slow)


@pytest.mark.parametrize("provider", PROVIDERS, ids=[p.name for p in PROVIDERS])
@pytest.mark.parametrize("regime", [_regime_param(r) for r in B.REGIMES])
def test_trace(benchmark, regime, provider):
    problem = _problem(regime)
    reason = provider.skip(problem) or provider.too_slow(problem)
    if reason:
        pytest.skip(reason)
    benchmark.group = f"{regime.name}: {regime.description}"
    fn = lambda: provider.trace(problem)  # noqa: E731
    B.warm_up(provider, problem)
    start = time.perf_counter()
    value = fn()  # warm-up on this problem (torch.compile compiles, the C++ backend caches Dense.kernel())
    first = time.perf_counter() - start
    benchmark.pedantic(fn, rounds=_rounds(fn, first), iterations=1)
    rel_err = ((value.double() - problem.exact).abs() / problem.exact.abs()).max().item()
    benchmark.extra_info.update(kind=provider.kind, rel_err=rel_err, first_call_s=first)
    if provider.kind == "exact":
        assert rel_err < 1e-4, f"{provider.name} is off the float64 reference by {rel_err:.1e} (float32)"


DIFFERENTIABLE = [p for p in PROVIDERS if p.differentiable]


@pytest.mark.parametrize("provider", DIFFERENTIABLE, ids=[p.name for p in DIFFERENTIABLE])
@pytest.mark.parametrize("regime", [_regime_param(r) for r in B.REGIMES])
def test_trace_and_gradient(benchmark, regime, provider):
    problem = _problem(regime)
    reason = provider.skip(problem)
    if reason:
        pytest.skip(reason)
    benchmark.group = f"{regime.name} fwd+bwd: {regime.description}"
    fn = B.fwd_bwd(provider, problem)
    first = time_once(fn)  # warm-up (and compilation)
    benchmark.pedantic(fn, rounds=_rounds(fn, first), iterations=1)
