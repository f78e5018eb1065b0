"""Speed of the fused C++ CPU kernels of the trace against plain torch (issue 3).

Every provider runs on the same inputs in one run, forward + backward of
``hessian_trace(weights, measurements).sum()`` in float32 on 2 threads, and the
table reports each time with its ratio against the plain-torch reference
(``backend="torch"``) in eager mode and under ``torch.compile``.  For the
large case the floor is the bare ``torch.mm`` calls the chain must do,
timed in the same run.

    python bench/bench_cpu_kernels.py            # full table (a few minutes, most of it torch.compile)
    python bench/bench_cpu_kernels.py --quick    # fewer repeats, no torch.compile
    python bench/bench_cpu_kernels.py --threads 1
    python bench/bench_cpu_kernels.py --only large --rounds 7   # the cases whose title contains "large"

Timing: providers are interleaved round-robin (the machine is shared and
noisy), each round times a block of calls, and the median over rounds is kept.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import flatkern as fk
from flatkern.kernels import cpp


def fwd_bwd(backend: str, meas):
    def run(ws):
        trace = fk.hessian_trace(ws, meas, backend=backend).sum()
        return torch.autograd.grad(trace, ws)

    return run


def compiled_reference(meas):
    # the reference traced and compiled by inductor, forward and backward
    fn = torch.compile(lambda ws: fk.hessian_trace(ws, meas, backend="torch").sum())

    def run(ws):
        return torch.autograd.grad(fn(ws), ws)

    return run


def autograd_floor(ws):
    """What the harness itself costs: ``torch.autograd.grad`` of a scalar through one
    cheap op over the same weights (``stack``, then the same ``.sum()``).

    No implementation of the trace that is called from Python and differentiated by
    ``torch.autograd.grad`` can take less; "vs torch eager" of this row bounds
    the speed-up any kernel can show on the small cases of this machine.
    """
    return torch.autograd.grad(torch.stack(ws).sum(), ws)


def bare_matmuls_isotropic(ws):
    """The matrix products the trace needs for L = 4 (MATH.md cost model): 4 forward, 8 backward.

    Forward: Q_3 = W_2 W_1, Q_4 = W_3 Q_3, P_2 = W_4 W_3, P_1 = P_2 W_2.  Backward by reverse
    accumulation: two products per chain step on each chain.  Same shapes, same dependencies,
    no norms or scalings: the floor of any implementation that does these products.
    """
    W1, W2, W3, W4 = ws
    mm = torch.mm
    Q3 = mm(W2, W1)
    Q4 = mm(W3, Q3)
    P2 = mm(W4, W3)
    P1 = mm(P2, W2)
    gQ4, gP1 = Q4, P1  # stand-ins of the same shapes for the family's contributions
    gW3 = mm(gQ4, Q3.t())
    gQ3 = mm(W3.t(), gQ4)
    gW2 = mm(gQ3, W1.t())
    gQ2 = mm(W2.t(), gQ3)
    gW2b = mm(P2.t(), gP1)
    gP2 = mm(gP1, W2.t())
    gW3b = mm(W4.t(), gP2)
    gP3 = mm(gP2, W3.t())
    return gW3, gW2, gQ2, gW2b, gW3b, gP3


def time_providers(providers: dict, ws, rounds: int, min_block_s: float) -> dict:
    """Median (wall, CPU) seconds per call of each provider, interleaved round-robin.

    CPU time (all threads of the process) is reported next to wall time: on a
    shared machine wall time also counts the time other processes hold the cores.
    """
    number = {}
    for name, fn in providers.items():  # warm up (compiles) and size the blocks
        fn(ws)
        t0 = time.perf_counter()
        fn(ws)
        once = max(time.perf_counter() - t0, 1e-7)
        number[name] = max(1, int(min_block_s / once))
    wall = {name: [] for name in providers}
    cpu = {name: [] for name in providers}
    for _ in range(rounds):
        for name, fn in providers.items():
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(number[name]):
                fn(ws)
            wall[name].append((time.perf_counter() - t0) / number[name])
            cpu[name].append((time.process_time() - c0) / number[name])
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in providers}


def check_agreement(providers: dict, ws, rtol: float):
    """Every trace provider returns the reference's gradients (a fast wrong kernel is no result)."""
    ref = providers["torch eager"](ws)
    for name, fn in providers.items():
        if name.startswith(("bare", "floor")):
            continue
        for a, b in zip(fn(ws), ref):
            torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * b.abs().max().item(), msg=f"{name} disagrees")


def cases(quick: bool):
    g = torch.Generator().manual_seed(0)

    def weights(d, L, batch=()):
        return [(torch.randn(*batch, d, d, generator=g) / d**0.5).requires_grad_(True) for _ in range(L)]

    yield "small d=30 L=3, Isotropic", weights(30, 3), fk.Isotropic(), True, False
    yield "small d=30 L=3, Entries n=300", weights(30, 3), fk.Entries.uniform(300, (30, 30), generator=g), True, False
    yield "batched B=256 d=32 L=4, Isotropic", weights(32, 4, (256,)), fk.Isotropic(), True, False
    yield "batched B=256 d=32 L=4, Entries n=300", weights(32, 4, (256,)), fk.Entries.uniform(300, (32, 32), generator=g), True, False
    yield "Dense n=2000 d=32 L=4", weights(32, 4), fk.Dense.gaussian(2000, (32, 32), generator=g), True, False
    yield "large d=1024 L=4, Isotropic", weights(1024, 4), fk.Isotropic(), False, True


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds and no torch.compile")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--only", default=None, help="run only the cases whose title contains this text")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (5 if args.quick else 15)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, forward+backward, "
          f"median of {rounds} interleaved rounds\n")
    print("| case | provider | wall time | vs torch eager | vs torch.compile | CPU time | CPU vs torch eager |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for title, ws, meas, compile_ref, bare in cases(args.quick):
        if args.only is not None and args.only not in title:
            continue
        providers = {"torch eager": fwd_bwd("torch", meas)}
        if compile_ref and not args.quick:
            providers["torch.compile"] = compiled_reference(meas)
        providers["flatkern cpp"] = fwd_bwd("cpp", meas)
        if title.startswith("small"):
            providers["floor: autograd.grad through one cheap op"] = autograd_floor
        if bare:
            providers["bare torch.mm (12 GEMMs)"] = bare_matmuls_isotropic
        check_agreement(providers, ws, rtol=1e-3)
        r = rounds if not bare or args.rounds else max(3, rounds // 3)
        times = time_providers(providers, ws, r, min_block_s=0.05 if not bare else 0.0)
        base_wall, base_cpu = times["torch eager"]
        comp = times.get("torch.compile", (None,))[0]
        for name, (w, c) in times.items():
            vs_comp = f"{comp / w:.2f}x" if comp else "n/a"
            print(f"| {title} | {name} | {w * 1e6:,.0f} µs | {base_wall / w:.2f}x | {vs_comp} | "
                  f"{c * 1e6:,.0f} µs | {base_cpu / c:.2f}x |")
        if bare:
            (cw, cc), (bw, bc) = times["flatkern cpp"], times["bare torch.mm (12 GEMMs)"]
            print(f"| {title} | cpp / bare GEMMs | {cw / bw:.3f} | | | {cc / bc:.3f} | |")
        sys.stdout.flush()

if __name__ == "__main__":
    main()
