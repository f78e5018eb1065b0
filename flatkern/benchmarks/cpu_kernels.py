"""Speed of the fused C++ CPU kernels of the trace against plain torch (issue 3).

Every provider runs on the same inputs in one run, forward + backward of
``hessian_trace(weights, measurements).sum()`` in float32 on 2 threads, and the
table reports each time with its ratio against the plain-torch reference
(``backend="torch"``) in eager mode and under ``torch.compile``.  Providers:

- ``torch eager`` / ``torch.compile``: the reference, ``torch.autograd.grad`` of it;
- ``flatkern cpp``: ``hessian_trace(..., backend="cpp")``, ``torch.autograd.grad`` of it;
- ``flatkern.hessian_trace_and_grad``: the value and gradient in one call, no autograd graph;
- ``op: hessian_trace + hessian_trace_backward``, ``op: hessian_trace_and_grad``: the
  registered ops ``torch.ops.flatkern.*`` called directly on detached weights (the
  kernels with nothing of flatkern's Python around them);
- floors: ``torch.autograd.grad`` through one cheap op (small cases: what any op
  called from Python and differentiated by autograd costs), for the large
  case the 12 bare ``torch.mm`` the chain must do, and for the per-problem
  batched cases (each problem its own measurement set, issue 21; every family at
  B=256 d=32 L=4 and at B=4096 d=8 L=3) the bare batched products of the C++
  kernel, ``floors.family_products`` (``floors.family_product_count`` of them per
  family: 12 / 12 / 30 / 38 / 19 at L = 4 for Isotropic / Entries / RankOne / Dense /
  Inputs, 6 / 6 / 18 / 24 / 11 at L = 3).  A floor row ``<provider> / <floor>`` gives
  the median over rounds of the ratio within a round (``timing.ratio``).

    python bench/bench_cpu_kernels.py            # full table (a few minutes, most of it torch.compile)
    python bench/bench_cpu_kernels.py --quick    # fewer repeats, no torch.compile
    python bench/bench_cpu_kernels.py --threads 1
    python bench/bench_cpu_kernels.py --only large --rounds 7   # the cases whose title contains "large"

(``python -m flatkern.benchmarks.cpu_kernels`` is the same command; ``bench/bench_cpu_kernels.py``
only calls ``main`` here.)

Timing (``flatkern.benchmarks.timing``): providers are interleaved round-robin
(the machine is shared and noisy), each round times a block of calls, and the
median over rounds is kept.  Before timing, every provider's gradients are
checked against the reference's.
"""

from __future__ import annotations

import argparse
import sys

import torch

import flatkern as fk

from .floors import family_product_count, family_products, trace_products
from .timing import interleave, ratio

SCALE = 2.0  # hessian_trace's scale for reduction="mean"


def fwd_bwd(backend: str, meas, ws):
    def run():
        trace = fk.hessian_trace(ws, meas, backend=backend).sum()
        return torch.autograd.grad(trace, ws)

    return run


def compiled_reference(meas, ws):
    # the reference traced and compiled by inductor, forward and backward
    fn = torch.compile(lambda ws: fk.hessian_trace(ws, meas, backend="torch").sum())

    def run():
        return torch.autograd.grad(fn(ws), ws)

    return run


def trace_and_grad(meas, ws):
    """The public one-call value and gradient (``backend="auto"``)."""
    def run():
        return fk.hessian_trace_and_grad(ws, meas)[1]

    return run


def op_forward_backward(meas, ws):
    """``torch.ops.flatkern.hessian_trace`` then ``hessian_trace_backward``, on detached weights."""
    wd, fam, operands = [w.detach() for w in ws], meas.family, list(meas.operands)
    forward, backward = torch.ops.flatkern.hessian_trace, torch.ops.flatkern.hessian_trace_backward

    def run():
        terms, _, saved = forward(wd, fam, operands, False, SCALE, True)
        return backward(wd, fam, operands, saved, torch.ones_like(terms), None, SCALE, True)

    return run


def op_fused(meas, ws):
    """``torch.ops.flatkern.hessian_trace_and_grad``, on detached weights."""
    wd, fam, operands = [w.detach() for w in ws], meas.family, list(meas.operands)
    fused = torch.ops.flatkern.hessian_trace_and_grad

    def run():
        return fused(wd, fam, operands, SCALE, True)[1]

    return run


def autograd_floor(ws):
    """What the harness itself costs: ``torch.autograd.grad`` of a scalar through one
    cheap op over the same weights (``stack``, then the same ``.sum()``).

    No implementation of the trace that is called from Python and differentiated by
    ``torch.autograd.grad`` can take less; "vs torch eager" of this row bounds
    the speed-up any kernel can show on the small cases of this machine.
    """
    return lambda: torch.autograd.grad(torch.stack(ws).sum(), ws)


def new_api_missing(meas) -> str | None:
    """Why the one-call and direct-op rows cannot run here (``None`` if they can)."""
    if not hasattr(fk, "hessian_trace_and_grad"):
        return "flatkern.hessian_trace_and_grad does not exist in this version"
    if not hasattr(meas, "family") or not hasattr(torch.ops.flatkern, "hessian_trace_and_grad"):
        return "the flatkern::hessian_trace ops (measurement .family/.operands) do not exist in this version"
    return None


def check_agreement(providers: dict, rtol: float):
    """Every trace provider returns the reference's gradients (a fast wrong kernel is no result)."""
    ref = providers["torch eager"]()
    for name, fn in providers.items():
        if name.startswith(("bare", "floor")):
            continue
        got = fn()
        assert len(got) == len(ref), f"{name} returns {len(got)} gradients, the reference {len(ref)}"
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * b.abs().max().item(), msg=f"{name} disagrees")


def cases():
    g = torch.Generator().manual_seed(0)

    def weights(d, L, batch=()):
        return [(torch.randn(*batch, d, d, generator=g) / d**0.5).requires_grad_(True) for _ in range(L)]

    def per_problem(name, B, d, n):
        """One measurement set per problem of the batch (issue 21)."""
        randn = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
        if name == "Isotropic":
            return fk.Isotropic()  # no tensor to give each problem: the same population for all
        if name == "Entries":
            return fk.Entries(torch.randint(d, (B, n), generator=g), torch.randint(d, (B, n), generator=g), (d, d))
        if name == "RankOne":
            return fk.RankOne(randn(B, n, d), randn(B, n, d))
        if name == "Dense":
            return fk.Dense(randn(B, n, d, d))
        return fk.Inputs(randn(B, n, d))

    # title, weights, measurements, compile the reference, the floor ((name, fn(ws, meas)) or None)
    yield "small d=30 L=3, Isotropic", weights(30, 3), fk.Isotropic(), True, None
    yield "small d=30 L=3, Entries n=300", weights(30, 3), fk.Entries.uniform(300, (30, 30), generator=g), True, None
    yield "batched B=256 d=32 L=4, Isotropic", weights(32, 4, (256,)), fk.Isotropic(), True, None
    yield "batched B=256 d=32 L=4, Entries n=300", weights(32, 4, (256,)), fk.Entries.uniform(300, (32, 32), generator=g), True, None
    yield "Dense n=2000 d=32 L=4", weights(32, 4), fk.Dense.gaussian(2000, (32, 32), generator=g), True, None
    yield "large d=1024 L=4, Isotropic", weights(1024, 4), fk.Isotropic(), False, \
        ("bare torch.mm (12 GEMMs)", lambda ws, meas: trace_products(ws))
    # per-problem measurements (n per problem: Entries, RankOne, Dense n <= d^2 (no kernel K), Inputs N)
    for B, d, L, sizes in ((256, 32, 4, dict(Entries=300, RankOne=32, Dense=8, Inputs=64)),
                           (4096, 8, 3, dict(Entries=30, RankOne=16, Dense=8, Inputs=32))):
        for name in ("Isotropic", "Entries", "RankOne", "Dense", "Inputs"):
            meas = per_problem(name, B, d, sizes.get(name))
            count = family_product_count(meas.family, L)
            n = f" n={sizes[name]}" if name in sizes else ""
            yield (f"per-problem B={B} d={d} L={L}, {name}{n}", weights(d, L, (B,)), meas, False,
                   (f"floor: bare batched products ({count} matmul)", family_products))


def providers_for(title, ws, meas, compile_ref, floor, quick):
    providers = {"torch eager": fwd_bwd("torch", meas, ws)}
    if compile_ref and not quick:
        providers["torch.compile"] = compiled_reference(meas, ws)
    if "cpp" in fk.available_backends("cpu"):
        providers["flatkern cpp"] = fwd_bwd("cpp", meas, ws)
    if new_api_missing(meas) is None:
        # without the C++ extension the ops' CPU kernel is the plain-torch reference: say so in the row
        kernel = "" if "cpp" in fk.available_backends("cpu") else " (plain-torch kernel: no C++ extension)"
        providers["flatkern.hessian_trace_and_grad" + kernel] = trace_and_grad(meas, ws)
        providers["op: hessian_trace + hessian_trace_backward" + kernel] = op_forward_backward(meas, ws)
        providers["op: hessian_trace_and_grad" + kernel] = op_fused(meas, ws)
    if title.startswith("small"):
        providers["floor: autograd.grad through one cheap op"] = autograd_floor(ws)
    if floor:
        name, fn = floor
        providers[name] = lambda: fn(ws, meas)
    return providers


def main(argv: list[str] | None = None) -> int:
    """The command line (``argv``: the options, default ``sys.argv[1:]``); prints the table, returns 0."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds and no torch.compile")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--only", default=None, help="run only the cases whose title contains this text")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (5 if args.quick else 15)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, forward+backward, "
          f"median of {rounds} interleaved rounds; backends {fk.available_backends('cpu')}")
    missing = new_api_missing(fk.Isotropic())
    if missing:
        print(f"(no one-call or direct-op rows: {missing})")
    print()
    print("| case | provider | wall time | vs torch eager | vs torch.compile | CPU time | CPU vs torch eager |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for title, ws, meas, compile_ref, floor in cases():
        if args.only is not None and args.only not in title:
            continue
        providers = providers_for(title, ws, meas, compile_ref, floor, args.quick)
        check_agreement(providers, rtol=1e-3)
        large = title.startswith("large")  # seconds a call: fewer rounds, one call a block
        r = rounds if not large or args.rounds else max(3, rounds // 3)
        times = interleave(providers, rounds=r, min_block_s=0.0 if large else 0.05)
        base = times["torch eager"]
        comp = times["torch.compile"].median if "torch.compile" in times else None
        for name, t in times.items():
            vs_comp = f"{comp / t.median:.2f}x" if comp else "n/a"
            print(f"| {title} | {name} | {t.median * 1e6:,.0f} µs | {base.median / t.median:.2f}x | {vs_comp} | "
                  f"{t.cpu_median * 1e6:,.0f} µs | {base.cpu_median / t.cpu_median:.2f}x |")
        if floor:
            bare = times[floor[0]]
            for name in ("flatkern cpp", "flatkern.hessian_trace_and_grad", "op: hessian_trace_and_grad"):
                if name in times:
                    t = times[name]
                    print(f"| {title} | {name} / {floor[0]} | {ratio(t, bare):.3f} | | | "
                          f"{t.cpu_median / bare.cpu_median:.3f} | |")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
