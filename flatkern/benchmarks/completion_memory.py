"""Matrix completion at scale: time and peak memory of the trace and its gradient (issue 18 item 7).

    python bench/bench_completion_memory.py [--d 20000] [--rank 10] [--n 1000] [--repeat 3]

For an ``E`` of shape ``d x d`` factored through rank-``r`` layers (widths ``[d, r, r, d]``)
and ``n`` observed entries, each backend runs ``hessian_trace_and_grad`` in a fresh process;
the table gives the best wall time of ``--repeat`` calls (after one warm-up) and the process's
peak resident memory, next to the plain-torch reference measured in the same run and the
memory of the inputs themselves (factors and entries).  Memory must grow with ``n`` and
``d·r``, never with ``d²`` (``20000² float64`` would be 3.2 GB).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

_CHILD = r"""
import json, resource, sys, time
import torch, flatkern as fk
d, r, n, repeat, backend = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
g = torch.Generator().manual_seed(0)
meas = fk.Entries(torch.randint(d, (n,), generator=g), torch.randint(d, (n,), generator=g), (d, d))
W = [torch.randn(r, d, generator=g) / d ** 0.5, torch.randn(r, r, generator=g) / r ** 0.5,
     torch.randn(d, r, generator=g) / r ** 0.5]
inputs = sum(w.numel() * w.element_size() for w in W) + 2 * n * 8
fk.hessian_trace_and_grad(W, meas, backend=backend)  # warm-up (first-call costs: operands, dispatch)
best = float("inf")
for _ in range(repeat):
    t0 = time.perf_counter()
    trace, grads = fk.hessian_trace_and_grad(W, meas, backend=backend)
    best = min(best, time.perf_counter() - t0)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps(dict(backend=backend, seconds=best, peak_mb=peak / 1024, above_import_mb=(peak - base) / 1024,
                      inputs_mb=inputs / 2**20, trace=float(trace))))
"""


def measure(d: int, rank: int, n: int, repeat: int, backend: str, python: str = sys.executable) -> dict:
    out = subprocess.run([python, "-c", _CHILD, str(d), str(rank), str(n), str(repeat), backend],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=20_000)
    parser.add_argument("--rank", type=int, default=10)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--backends", default="auto,torch")
    args = parser.parse_args(argv)
    rows = [measure(args.d, args.rank, args.n, args.repeat, b) for b in args.backends.split(",")]
    ref = next((r for r in rows if r["backend"] == "torch"), rows[0])
    print(f"Entries completion: E {args.d} x {args.d}, widths [{args.d}, {args.rank}, {args.rank}, {args.d}], "
          f"n = {args.n}, float32, hessian_trace_and_grad, {resource.getpagesize()}-byte pages")
    print("| backend | best of %d (s) | vs torch | peak RSS (MB) | above `import flatkern` (MB) | inputs (MB) |"
          % args.repeat)
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['seconds']:.4f} | {r['seconds'] / ref['seconds']:.2f}x | {r['peak_mb']:.0f} | "
              f"{r['above_import_mb']:.0f} | {r['inputs_mb']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
