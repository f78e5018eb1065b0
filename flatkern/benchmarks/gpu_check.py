"""GPU check of the Triton backend (issues 4, 19, 21): correctness first, then speed, table last.

    python bench/gpu_check.py                      # on a CUDA machine; writes $OUT (or bench/results)
    python bench/gpu_check.py --sections mlp,per-problem   # only the ReLU-network op and per-problem sets
    TRITON_INTERPRET=1 python bench/gpu_check.py --device cpu --tiny   # the same logic, tiny, in the interpreter

One module over 600 lines: a session lent a GPU for a few minutes runs one short, prepared
script, and its three sections share one time budget, one step order and one table.

(``python -m flatkern.benchmarks.gpu_check`` is the same command; ``bench/gpu_check.py`` only
puts the checkout first on ``sys.path`` and calls ``main`` here.)  Three sections (``--sections``,
default all), each a correctness step and a speed step; every correctness step runs before any
speed step (``STEPS``).

Section ``trace`` (the Triton trace op, issue 4):

1. Correctness: ``backend="triton"`` against the float64 plain-torch reference
   (terms and weight gradients) for the five measurement families, on the
   small path (one program per problem; widths up to 32, batched d = 64 and
   d = 128, its K-chunked products, and depths 15 and 24, past the old 12-layer
   cap) and the large path (the Triton GEMM with the norms in its epilogue), at
   sizes up to d = 2048.
2. Speed, forward + backward of the trace, same inputs, one run:
   triton; ``hessian_trace_and_grad`` (the value and the gradient in one
   call, no graph); the plain-torch reference eager; the reference under
   ``torch.compile`` (modes ``max-autotune-no-cudagraphs`` and
   ``reduce-overhead``); triton under ``torch.compile(mode="reduce-overhead")``;
   and the floor: the ``6 (L - 2)`` bare ``torch.mm``/``torch.bmm`` the
   method must do (forward ``2 (L-2)``, backward ``4 (L-2)``), same precision.
   Regimes of the issue: ``B=1024, d=32, L=4``; one problem ``d=30, L=3``;
   one problem ``d=8192, L=4`` with ``Isotropic`` and ``Entries`` (10^7 entries);
   then the wide small path, ``B=256, d=64`` and ``B=128, d=128``, ``L=4``.

Section ``mlp`` (the ReLU-network op ``flatkern::mlp_hessian_trace`` / ``_and_grad``, issue 19):

3. Correctness: ``hessian_trace_of`` / ``hessian_trace_and_grad_of`` with ``backend="triton"`` against
   ``backend="torch"`` in float64 on the same values: per-layer terms, autograd's gradient (weights,
   biases, inputs) of a random functional of them, and the value-and-grad gradient; float32 and
   float64 x MSE and cross-entropy x with and without bias x ReLU or LeakyReLU(0.1) with ReLU, at
   widths of several masked-GEMM tiles, and the 784-512-512-10 network at batch 128; float16 and
   bfloat16 against the reference where ``routing.MLP_TRITON`` takes them, else a clear refusal.
4. Speed at 784-512-512-10 and 64-256-256-10, batch 128 and 512 (``benchmarks/piecewise.py``'s
   cases, cross-entropy, float32): value, value + autograd and value-and-grad, triton and torch
   eager (the plain-torch formula); the plain-torch value + autograd under ``torch.compile``; the
   CPU benchmark's GEMM floors (``value_gemms``, ``value_and_grad_gemms``).

Section ``per-problem`` (one measurement set per problem, issue 21):

5. Correctness at ``B=256, d=32, L=4``, every family with operands (Isotropic has none) and Dense in
   both regimes, float32 and float64: ``hessian_trace`` + autograd and ``hessian_trace_and_grad`` with
   ``backend="triton"`` against ``backend="torch"`` in float64.
6. Speed at ``B=256, d=32, L=4``, float32, per family: triton forward + backward and
   ``hessian_trace_and_grad``, torch eager forward + backward, and the batched-GEMM floor
   (``floors.family_products``, ``family_product_count`` products).

Timed with the repository's one harness (``flatkern.benchmarks.timing``): the providers of a regime
run interleaved round-robin, medians over rounds.  Writes ``gpu_check.md`` and ``gpu_check.json`` to
``--out`` and prints the table last.  A time guard keeps the run inside ``--budget`` seconds (default
280: about 5 minutes on one H100 with the start): each step gets its share (``STEPS``), skips what
would not fit (listed under "Skipped") and still writes the table; a hard stop 30 s after the budget
catches a hang.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import torch

import flatkern as fk
from flatkern.kernels import families as _families
from flatkern.kernels import routing
from flatkern.reference import hessian_trace_ref, layer_terms_ref

from . import piecewise as _bench_mlp  # the ReLU-network benchmark: its cases, model, providers and floors
from . import timing as _timing
from .timing import interleave

# the checkout this module runs from (bench/results is the default --out there)
ROOT = Path(__file__).resolve().parents[2]


def _default_out() -> str:
    if os.environ.get("OUT"):
        return os.environ["OUT"]
    return str(ROOT / "bench" / "results") if (ROOT / "bench").is_dir() else os.getcwd()


# the sections: the Triton trace op (issue 4), the ReLU-network op (issue 19), per-problem measurements
# (issue 21); each has a correctness step and a speed step
SECTIONS = ("trace", "mlp", "per-problem")


def _sections(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in SECTIONS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"--sections takes a comma-separated subset of {','.join(SECTIONS)}, "
                                         f"got {text!r}")
    return names


def _parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (for the CPU interpreter dry run)")
    ap.add_argument("--budget", type=float, default=280.0,
                    help="seconds before the time guard skips the rest (shared by the sections, see STEPS)")
    ap.add_argument("--sections", type=_sections, default=list(SECTIONS),
                    help=f"comma-separated sections to run, of {','.join(SECTIONS)} (default: all)")
    ap.add_argument("--out", default=_default_out())
    return ap.parse_args(argv)


# set by start(): the options, the device, the clock, the Triton module and what the run found
ARGS: argparse.Namespace = argparse.Namespace()
DEV: torch.device = torch.device("cpu")
T0 = DEADLINE = SECTION_END = 0.0
tt = None  # flatkern.kernels.triton.hessian_trace (the launchers), imported by start() once the interpreter setting is known
RESULTS: dict = {}


def terms_and_grads(fn, W, meas, seed=0):
    """``fn(W, meas)`` and the gradient of a random linear functional of it (tests/helpers.py's check)."""
    terms = fn(W, meas)
    g = torch.Generator().manual_seed(seed)
    # bf16-representable, so that every dtype differentiates the same functional
    weight = torch.randn(terms.shape, generator=g).to(torch.bfloat16).to(terms)
    grads = torch.autograd.grad((terms * weight).sum(), W)
    return terms.detach(), grads



class TimeGuard(Exception):
    pass


def _alarm(signum, frame):
    raise TimeGuard("hard time guard")


def left() -> float:
    """Seconds left to the running step (its share of ``--budget``; see ``STEPS``)."""
    return min(DEADLINE, SECTION_END) - time.perf_counter()


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------ problems


def weights(dims, batch=(), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(*batch, dims[j + 1], dims[j], generator=g) / math.sqrt(dims[j]) for j in range(len(dims) - 1)]
    return [w.to(DEV, dtype).requires_grad_() for w in ws]


# one builder per public measurement class; the families checked are the registry's
# (flatkern/kernels/families.py), so a new family without a builder here is an error, not a gap.
# ``batch``: a per-problem batch (issue 21), each problem its own set; () for one shared set.
def _entries(d_L, d_0, n, dtype, g, batch):
    if not batch:
        return fk.Entries.uniform(n, (d_L, d_0), generator=g, replace=n > d_L * d_0 // 2).to(DEV)
    return fk.Entries(torch.randint(d_L, (*batch, n), generator=g, device=g.device),
                      torch.randint(d_0, (*batch, n), generator=g, device=g.device), (d_L, d_0))


def _randn(g, *shape):
    return torch.randn(*shape, generator=g, device=g.device)


_BUILDERS = {
    "Isotropic": lambda d_L, d_0, n, dtype, g, batch: fk.Isotropic(),
    "Entries": _entries,
    "RankOne": lambda d_L, d_0, n, dtype, g, batch: fk.RankOne(_randn(g, *batch, n, d_L),
                                                               _randn(g, *batch, n, d_0)).to(DEV, dtype),
    "Dense": lambda d_L, d_0, n, dtype, g, batch: fk.Dense(_randn(g, *batch, n, d_L, d_0)).to(DEV, dtype),
    "Inputs": lambda d_L, d_0, n, dtype, g, batch: fk.Inputs(_randn(g, *batch, n, d_0)).to(DEV, dtype),
}
FAMILIES = [name.lower() for name in _families.CLASS_NAMES]
_missing = set(_families.CLASS_NAMES) - set(_BUILDERS)
assert not _missing, f"gpu_check has no builder for the families {sorted(_missing)} (flatkern/kernels/families.py)"


def measurements(family, d_L, d_0, n, dtype=torch.float32, seed=1, batch=()):
    """One measurement set of ``family`` (``batch`` = (): shared, drawn on the CPU) or one per problem of
    ``batch`` (drawn on the device: at B = 256 Dense in its kernel regime is 2^28 numbers)."""
    g = torch.Generator(DEV if batch else "cpu").manual_seed(seed)
    name = next(c for c in _families.CLASS_NAMES if c.lower() == family)
    if batch and name == "Isotropic":
        raise ValueError("Isotropic has no operands, hence no per-problem batch")
    return _BUILDERS[name](d_L, d_0, n, dtype, g, tuple(batch))


N_MEAS = {"isotropic": 1, "entries": 200, "rankone": 100, "dense": 16, "inputs": 64}
# the per-problem section's counts in the interpreter (each measurement a step of a Python-run loop there)
N_MEAS_TINY = {"entries": 20, "rankone": 7, "dense": 3, "inputs": 9}


# ------------------------------------------------------------------ 1. correctness


def check_case(label, family, dims, batch, path, block, n, dtype=torch.float32, rule="rel"):
    if left() < 5:
        RESULTS["skipped"].append(f"correctness {label} {family}: time guard")
        return
    W = weights(dims, batch, dtype)
    meas = measurements(family, dims[-1], dims[0], n, dtype)
    exact, exact_g = terms_and_grads(layer_terms_ref, [w.detach().double().requires_grad_() for w in W],
                                     meas.to(torch.float64))
    got, got_g = terms_and_grads(
        lambda w, m: tt.layer_terms(w, m.family, list(m.operands), path=path, block=block)[0], W, meas)

    def rel(a, b):
        return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()

    err_t = rel(got, exact)
    err_g = max(rel(a, b) for a, b in zip(got_g, exact_g))
    if rule == "rel":
        # fp32 (ieee) products of a few O(1) layers: relative error ~1e-6; 1e-4 leaves room for d = 2048 sums
        ok = err_t < 1e-4 and err_g < 1e-4
        bound = "rel < 1e-4"
    else:  # low precision: at most twice the plain-torch error in the same dtype (flash-attention's rule)
        ref_t, ref_g = terms_and_grads(layer_terms_ref, W, meas)
        bound_t = 2 * rel(ref_t, exact)
        bound_g = 2 * max(rel(a, b) for a, b in zip(ref_g, exact_g))
        ok = err_t <= bound_t and err_g <= bound_g
        bound = f"<= 2x torch {str(dtype).replace('torch.', '')}: {bound_t:.1e} / {bound_g:.1e}"
    RESULTS["correctness"].append(dict(case=label, family=family, dims=dims, batch=list(batch), path=path,
                                       dtype=str(dtype).replace("torch.", ""), rel_err_terms=err_t,
                                       rel_err_grads=err_g, bound=bound, ok=bool(ok)))


def correctness():
    # Each (padded width D, family) of the small path is a kernel pair compiled on first use, whatever
    # the depth: 5-15 s for fp32 without tf32 at D = 64, up to 50 s (Dense backward) at D = 128, so
    # the wide cases take a few families each.  The large path's kernels do not depend on the family
    # or the depth.
    if ARGS.tiny:
        small = [([5, 7, 3, 6, 4], (2,), FAMILIES), ([7, 8, 5, 6], (), ["isotropic"]), ([5, 3], (), ["isotropic"]),
                 ([37, 40, 33, 38], (2,), ["isotropic", "dense"]),
                 ([3, 5, 4, 2, 6] * 3 + [3], (2,), ["entries"])]  # depth 15: beyond the old 12-layer cap
        large = [([37, 20, 45, 18], (2,))]
        block = 16
        big = []
    else:
        small = [([30, 32, 31, 29, 28], (8,), FAMILIES), ([17, 32, 9, 31], (4,), ["isotropic"]),
                 ([5, 3], (), ["isotropic"]),
                 ([64, 64, 64, 64, 64], (64,), ["isotropic", "rankone", "dense"]),
                 ([100, 128, 97, 120, 128], (32,), ["isotropic", "entries", "inputs"]),
                 ([30, 32, 31, 29] * 6 + [28], (16,), ["isotropic", "rankone"])]  # depth 24
        large = [([300, 257, 310, 290], (2,)), ([17, 128, 100, 64], (4,))]
        block = None
        big = [([2048, 2048, 2048, 2048], ())]
    for dims, batch, families in small:
        for fam in families:
            check_case(f"small L={len(dims) - 1} d<={max(dims)}", fam, dims, batch, "small", block, N_MEAS[fam])
    for dims, batch in large:
        for fam in FAMILIES:
            check_case(f"large L={len(dims) - 1}", fam, dims, batch, "large", block, N_MEAS[fam])
    for dims, batch in big:
        for fam, n in (("isotropic", 1), ("entries", 100_000)):
            check_case(f"large d={dims[0]}", fam, dims, batch, "auto", block, n)
    check_case("bf16 in, fp32 acc", "isotropic", [7, 8, 5, 6] if ARGS.tiny else [30, 32, 31, 29], (2,), "small",
               block, 1, dtype=torch.bfloat16, rule="lowp")


# ------------------------------------------------------------------ 2. speed


def regimes():
    """Speed cases in priority order (the time guard drops the last ones first)."""
    if ARGS.tiny:
        return [
            dict(name="batched B=4 d=8 L=4", batch=(4,), dims=[8] * 5, family="isotropic", n=1, path="small",
                 rounds=2, warmup=1, compile=True),
            dict(name="single d=7 L=3", batch=(), dims=[7] * 4, family="isotropic", n=1, path="small",
                 rounds=2, warmup=1, compile=True),
            dict(name="large d=40 L=4", batch=(), dims=[40] * 5, family="isotropic", n=1, path="large",
                 rounds=1, warmup=1, compile=False),
            dict(name="large d=40 L=4", batch=(), dims=[40] * 5, family="entries", n=300, path="large",
                 rounds=1, warmup=1, compile=False),
            dict(name="batched B=2 d=40 L=3", batch=(2,), dims=[37, 40, 33, 38], family="isotropic", n=1,
                 path="small", rounds=1, warmup=1, compile=False),
        ]
    return [
        dict(name="batched B=1024 d=32 L=4", batch=(1024,), dims=[32] * 5, family="isotropic", n=1, path="auto",
             rounds=15, warmup=5, compile=True),
        dict(name="single d=30 L=3", batch=(), dims=[30] * 4, family="isotropic", n=1, path="auto",
             rounds=20, warmup=10, compile=True),
        dict(name="large d=8192 L=4", batch=(), dims=[8192] * 5, family="isotropic", n=1, path="auto",
             rounds=3, warmup=1, compile=False),
        dict(name="large d=8192 L=4", batch=(), dims=[8192] * 5, family="entries", n=10_000_000, path="auto",
             rounds=3, warmup=1, compile=False),
        dict(name="batched B=1024 d=32 L=4", batch=(1024,), dims=[32] * 5, family="entries", n=200, path="auto",
             rounds=15, warmup=5, compile=True),
        # the wide small path (kernels compiled by the correctness step); no torch.compile, for time
        dict(name="batched B=256 d=64 L=4", batch=(256,), dims=[64] * 5, family="isotropic", n=1, path="auto",
             rounds=10, warmup=3, compile=False),
        dict(name="batched B=128 d=128 L=4", batch=(128,), dims=[128] * 5, family="isotropic", n=1, path="auto",
             rounds=10, warmup=3, compile=False),
    ]


def floor_fn(dims, batch):
    """The 6 (L-2) GEMMs of the method (forward 2 (L-2), backward 4 (L-2)), bare."""
    L, d = len(dims) - 1, dims[0]
    B = math.prod(batch)
    a = torch.randn(B, d, d, device=DEV) if batch else torch.randn(d, d, device=DEV)
    b = torch.randn_like(a)
    mm = torch.bmm if batch else torch.mm
    count = 6 * (L - 2)

    def run():
        for _ in range(count):
            mm(a, b)

    return run, count


def providers(reg, family, W, meas):
    path = reg["path"]

    def triton_trace(*w):
        if ARGS.tiny:  # force the path under test at tiny sizes
            return tt.layer_terms(list(w), meas.family, list(meas.operands), scale=2.0, sum_layers=True,
                                  path=path, block=16)[0].sum()
        return fk.hessian_trace(list(w), meas, backend="triton").sum()

    def ref_trace(*w):
        return hessian_trace_ref(list(w), meas).sum()

    def fwd_bwd(f):
        def run():
            torch.autograd.grad(f(*W), W)
        return run

    def value_and_grad():
        fk.hessian_trace_and_grad(W, meas, backend="triton")

    out = [("triton", lambda: fwd_bwd(triton_trace))]
    if not ARGS.tiny:  # (at tiny sizes the path under test is forced through the eager entry)
        out.append(("triton hessian_trace_and_grad", lambda: value_and_grad))
    out.append(("torch eager", lambda: fwd_bwd(ref_trace)))
    if reg["compile"]:
        for mode in ("max-autotune-no-cudagraphs", "reduce-overhead"):
            out.append((f"torch.compile {mode}", lambda mode=mode: fwd_bwd(torch.compile(ref_trace, mode=mode))))
        if DEV.type == "cuda":
            # (in the interpreter AOT tracing would run the kernels on fake tensors)
            out.append(("triton + compile reduce-overhead",
                        lambda: fwd_bwd(torch.compile(triton_trace, mode="reduce-overhead"))))
    return out


MIN_BLOCK_S = 0.02  # set by main(): 0 in the interpreter


def speed():
    for reg in regimes():
        family, n = reg["family"], reg["n"]
        label = f"{reg['name']} {family}" + (f" n={n:.0e}" if family == "entries" else "")
        if left() < 20:
            RESULTS["skipped"].append(f"{label}: time guard")
            continue
        try:
            W = weights(reg["dims"], reg["batch"])
            meas = measurements(family, reg["dims"][-1], reg["dims"][0], n)
        except Exception as exc:  # e.g. out of memory: say so and go on
            RESULTS["errors"].append(f"{label} setup: {type(exc).__name__}: {exc}")
            continue
        # build and warm up each provider (compiling happens here), then time them all interleaved
        fns, setup = {}, {}
        for name, make in providers(reg, family, W, meas):
            # compiling costs tens of seconds: keep a margin for the rest
            if left() < (60 if "compile" in name else 15):
                RESULTS["skipped"].append(f"{label} / {name}: time guard")
                continue
            try:
                t = time.perf_counter()
                fn = make()
                for _ in range(reg["warmup"]):
                    fn()
                sync()
                fns[name], setup[name] = fn, time.perf_counter() - t
            except TimeGuard:
                raise
            except Exception as exc:
                RESULTS["errors"].append(f"{label} / {name}: {type(exc).__name__}: {str(exc)[:300]}")
        run, count = floor_fn(reg["dims"], reg["batch"])
        floor = f"mm floor ({count} {'bmm' if reg['batch'] else 'mm'})"
        fns[floor] = run
        try:
            times = interleave(fns, rounds=reg["rounds"], min_block_s=MIN_BLOCK_S, device=DEV)
        except TimeGuard:
            raise
        except Exception as exc:
            RESULTS["errors"].append(f"{label} / timing: {type(exc).__name__}: {str(exc)[:300]}")
            times = {}
        rows = {}
        for name, t in times.items():
            rows["mm floor" if name == floor else name] = t.median * 1e3
            RESULTS["timings"].append(dict(regime=label, provider=name, ms=t.median * 1e3, cpu_ms=t.cpu_median * 1e3,
                                           rounds=len(t.wall), calls_per_round=t.number,
                                           seconds_incl_setup=setup.get(name, 0.0)))
        criteria(reg, label, rows)
        del W, meas, fns
        torch._dynamo.reset()
        if DEV.type == "cuda":
            torch.cuda.empty_cache()


def criteria(reg, label, rows):
    tri = rows.get("triton")
    if tri is None:
        return

    def add(what, value, ok):
        RESULTS["criteria"].append(dict(regime=label, criterion=what, value=value, ok=bool(ok)))

    if reg["name"].startswith("large"):
        if "mm floor" in rows:
            r = tri / rows["mm floor"]
            add("triton / mm floor <= 1.2", f"{r:.2f}", r <= 1.2)
        return
    if "torch eager" in rows:
        s = rows["torch eager"] / tri
        add("speedup vs torch eager >= 10", f"{s:.1f}x", s >= 10)
    for mode in ("max-autotune-no-cudagraphs", "reduce-overhead"):
        key = f"torch.compile {mode}"
        if key in rows:
            s = rows[key] / tri
            add(f"faster than {key}", f"{s:.2f}x", s > 1)


# ------------------------------------------------------------------ 4. the ReLU-network op (issue 19)


def _rel(a, b):
    """``max |a - b| / max |b|`` in float64 (``b`` the reference)."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def mlp_model(widths, *, bias=True, slope=0.0, dtype=torch.float32, seed=0):
    """``Linear → σ → … → Linear`` on the device, PyTorch's default initialization.  ``σ``: ``nn.ReLU``
    with ``slope`` 0; else ``nn.LeakyReLU(slope)`` after odd layers and ``nn.ReLU`` after even ones
    (both kinds of mask, ``σ'(z<0)`` = slope and 0, in one network)."""
    torch.manual_seed(seed)
    mods = []
    for j, (a, b) in enumerate(zip(widths, widths[1:])):
        mods.append(torch.nn.Linear(a, b, bias=bias))
        if j < len(widths) - 2:
            mods.append(torch.nn.LeakyReLU(slope) if slope and j % 2 == 0 else torch.nn.ReLU())
    return torch.nn.Sequential(*mods).to(DEV, dtype)


def _mlp_run(model, x, loss, backend, seed=0):
    """``(terms (L,), autograd grads [params.., x] of a random functional of the terms, value-and-grad
    value, value-and-grad grads [params..] of the summed trace)`` through ``backend``."""
    params = list(model.parameters())
    xx = x.detach().clone().requires_grad_()
    terms = fk.hessian_trace_of(model, xx, loss=loss, per_layer=True, backend=backend)
    g = torch.Generator().manual_seed(seed)
    # bf16-representable, so that every dtype differentiates the same functional (as terms_and_grads)
    weight = torch.randn(terms.shape, generator=g).to(torch.bfloat16).to(terms)
    # (the last layer's bias does not reach an MSE trace: its gradient is zeros)
    grads = torch.autograd.grad((terms * weight).sum(), params + [xx], allow_unused=True, materialize_grads=True)
    value, vg = fk.hessian_trace_and_grad_of(model, x, loss=loss, per_layer=True, backend=backend)
    return terms.detach(), grads, value, vg


def _mlp_sum_grads(model, x, loss, backend):
    """Autograd's gradient of the summed trace (what ``hessian_trace_and_grad_of`` returns)."""
    params = list(model.parameters())
    return torch.autograd.grad(fk.hessian_trace_of(model, x, loss=loss, backend=backend), params, allow_unused=True,
                               materialize_grads=True)


def mlp_case(widths, N, loss, bias, slope, dtype):
    """``backend="triton"`` against ``backend="torch"`` in float64 on the same values (the float32
    model and inputs, widened exactly): the per-layer terms from both entry points, autograd's
    gradient (in the weights, biases and inputs) of a random functional of the terms, and
    ``hessian_trace_and_grad_of``'s gradient of the summed trace.  Appends one row."""
    label = f"L={len(widths) - 1}"
    acts = "relu" if not slope else f"leaky {slope} / relu"
    row = dict(case=label, loss=loss, widths=list(widths), N=N, bias=bias, acts=acts,
               dtype=str(dtype).replace("torch.", ""))
    if left() < 5:
        RESULTS["skipped"].append(f"mlp correctness {label} {loss} bias={bias} {acts} {row['dtype']}: time guard")
        return
    model = mlp_model(widths, bias=bias, slope=slope, dtype=dtype)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(N, widths[0], generator=g).to(DEV, dtype)
    ref_model, x64 = copy.deepcopy(model).double(), x.double()
    want_t, want_g, _, _ = _mlp_run(ref_model, x64, loss, "torch")
    want_sum_g = _mlp_sum_grads(ref_model, x64, loss, "torch")
    if dtype in routing.MLP_TRITON.dtypes:
        got_t, got_g, got_v, got_vg = _mlp_run(model, x, loss, "triton")
        err_t = max(_rel(got_t, want_t), _rel(got_v, want_t))
        err_g = max(_rel(a, b) for a, b in zip(got_g, want_g))
        err_vg = max(_rel(a, b) for a, b in zip(got_vg, want_sum_g))
        if dtype in (torch.float32, torch.float64):
            # fp32 (ieee) products of a few layers: ~1e-6; fp64: the order of the test suite's 1e-10
            tol = 1e-4 if dtype == torch.float32 else 1e-10
            bound, ok = f"rel < {tol:.0e}", max(err_t, err_g, err_vg) < tol
        else:  # low precision: at most twice plain torch's own error in the same dtype
            ref_t, ref_g, _, ref_vg = _mlp_run(model, x, loss, "torch")
            b_t = 2 * _rel(ref_t, want_t)
            b_g = 2 * max(_rel(a, b) for a, b in zip(ref_g, want_g))
            b_vg = 2 * max(_rel(a, b) for a, b in zip(ref_vg, want_sum_g))
            bound = f"<= 2x torch: {b_t:.1e} / {b_g:.1e} / {b_vg:.1e}"
            ok = err_t <= b_t and err_g <= b_g and err_vg <= b_vg
        row.update(rel_err_terms=err_t, rel_err_grads=err_g, rel_err_value_and_grad=err_vg, bound=bound, ok=bool(ok))
    else:
        # a dtype the kernel does not take (routing.MLP_TRITON.dtypes) must be a clear error naming it
        name = str(dtype).replace("torch.", "")
        try:
            fk.hessian_trace_of(model, x, loss=loss, backend="triton")
            msg, ok = "no error", False
        except (RuntimeError, ValueError, TypeError) as exc:
            msg, ok = f"{type(exc).__name__}: {str(exc)[:160]}", name in str(exc)
        row.update(rel_err_terms=None, rel_err_grads=None, rel_err_value_and_grad=None,
                   bound=f"refused, naming {name}: {msg}", ok=bool(ok))
    RESULTS["mlp_correctness"].append(row)


def mlp_correctness():
    """Every combination of dtype, loss, bias and activations; then the benchmark's network itself, and
    the low-precision dtypes (checked against the reference where the kernel takes them, else refused).
    Widths of several of the masked GEMM's tiles (128 x 64 x 32 on CUDA, 16 x 16 x 16 in the interpreter)."""
    if ARGS.tiny:
        widths, N, big = [5, 19, 6, 17, 3], 6, []  # N C = 18 rows: two 16-row tiles
    else:
        widths, N, big = [50, 200, 130, 70, 10], 40, [((784, 512, 512, 10), 128)]
    for dtype in (torch.float32, torch.float64):
        for loss in ("mse", "cross_entropy"):
            for bias in (True, False):
                for slope in (0.0, 0.1):
                    mlp_case(widths, N, loss, bias, slope, dtype)
        if dtype == torch.float32:
            for w, n in big:  # the benchmark's network and batch, as timed below
                mlp_case(list(w), n, "cross_entropy", True, 0.0, torch.float32)
    for dtype in (torch.float16, torch.bfloat16):
        mlp_case(widths, N, "cross_entropy", True, 0.0, dtype)


def mlp_cases():
    """``[(widths, batch), ...]``: the CPU benchmark's four (``benchmarks/piecewise.py``), or one tiny one."""
    return [((8, 20, 17, 3), 6)] if ARGS.tiny else list(_bench_mlp.CASES)


def mlp_speed():
    """Each of ``mlp_cases()``, cross-entropy, ReLU, float32: the fused op through ``backend="triton"``
    (value under no_grad; value, then autograd's gradient; ``hessian_trace_and_grad_of``), the same
    three through the plain-torch formula (``backend="torch"``) and the CPU benchmark's GEMM floors
    (``value_gemms``, ``value_and_grad_gemms``), interleaved.  Then, network by network while time is
    left (each is a compile of its own, tens of seconds), the plain-torch value + autograd under
    ``torch.compile`` (default mode), interleaved with the eager and triton value + autograd and the
    floor again, its ratios from those rounds."""
    rounds, warmup = (1, 1) if ARGS.tiny else (10, 3)
    cases = []
    for widths, N in mlp_cases():
        label = f"{'-'.join(map(str, widths))} N={N}"
        if left() < 15:
            RESULTS["skipped"].append(f"mlp speed {label}: time guard")
            continue
        case = _mlp_speed_case(widths, N)
        times = _mlp_time(label, {k: v for k, v in case.items() if k != "torch.compile value+autograd"}, rounds,
                          warmup)
        _mlp_criteria(label, times)
        cases.append((label, case))
        torch._dynamo.reset()
    for label, case in cases:
        keep = ("torch eager value+autograd", "triton value+autograd", "floor: value+grad GEMMs",
                "torch.compile value+autograd")
        times = _mlp_time(label, {k: case[k] for k in keep}, rounds, warmup, only="torch.compile value+autograd")
        _mlp_criteria(label, times)
        torch._dynamo.reset()
    if DEV.type == "cuda":
        torch.cuda.empty_cache()


def _mlp_speed_case(widths, N):
    """``{provider: maker}`` for one network and batch (a maker returns the zero-argument callable)."""
    B = _bench_mlp
    model = B.mlp(widths).to(DEV)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, widths[0], generator=g).to(DEV)
    params = list(model.parameters())
    label = f"{'-'.join(map(str, widths))} N={N}"
    # the timed rows answer alike before anything is timed
    want = B.flatkern_value(model, x, "torch").item()
    for name, fn in (("triton value", B.flatkern_value), ("triton value-and-grad", B.flatkern_value_and_grad)):
        got = fn(model, x, "triton").item()
        if not math.isclose(got, want, rel_tol=1e-4):
            RESULTS["errors"].append(f"mlp speed {label}: {name} gives {got!r}, plain torch {want!r}")
    makers = {}
    for who, backend in (("triton", "triton"), ("torch eager", "torch")):
        makers[f"{who} value"] = lambda b=backend: (lambda: B.flatkern_value(model, x, b))
        makers[f"{who} value+autograd"] = lambda b=backend: (lambda: B.flatkern_value_autograd(model, x, b))
        makers[f"{who} value-and-grad"] = lambda b=backend: (lambda: B.flatkern_value_and_grad(model, x, b))
    # the floors' operands on the device: the CPU benchmark's (random stand-ins of the right shapes), moved
    Ws, acts, G, zbar = B._floor_operands(model, x, widths[-1])
    acts, G, zbar = ([t.to(DEV) for t in ts] for ts in (acts, G, zbar))
    makers["floor: value GEMMs"] = lambda: (lambda: B.value_gemms(Ws, acts, G))
    makers["floor: value+grad GEMMs"] = lambda: (lambda: B.value_and_grad_gemms(Ws, acts, G, zbar))

    def compiled_maker():
        compiled = torch.compile(lambda x: fk.hessian_trace_of(model, x, loss="cross_entropy", backend="torch"))
        return lambda: torch.autograd.grad(compiled(x), params)

    makers["torch.compile value+autograd"] = compiled_maker
    return makers


def _kind(name):
    return "value-and-grad" if name.endswith("value-and-grad") else (
        "value+autograd" if name.endswith("value+autograd") else "value")


def _interleaved(fns, rounds, label):
    """``interleave(fns)`` (already warm); ``{}``, with the error recorded under ``label``, if timing fails
    (a ``TimeGuard`` propagates: the budget is spent)."""
    try:
        return interleave(fns, rounds=rounds, min_block_s=MIN_BLOCK_S, warmup=0, device=DEV)
    except TimeGuard:
        raise
    except Exception as exc:
        RESULTS["errors"].append(f"{label}: {type(exc).__name__}: {str(exc)[:300]}")
        return {}


def _mlp_time(label, makers, rounds, warmup, only=None):
    """Warm up and time ``makers`` interleaved; append their rows (or only the row ``only``) with the
    ratios to eager and to the floor from the same rounds; return the timings."""
    fns = _warm(f"mlp {label}", makers, warmup)
    if only is not None and only not in fns:
        return {}
    times = _interleaved(fns, rounds, f"mlp speed {label} / timing")
    if not times:
        return {}
    for name, t in times.items():
        if only is not None and name != only:
            continue
        eager = times.get(f"torch eager {_kind(name)}")
        floor = times.get("floor: value GEMMs" if _kind(name) == "value" else "floor: value+grad GEMMs")
        RESULTS["mlp_timings"].append(dict(
            regime=label, provider=name, ms=t.median * 1e3, cpu_ms=t.cpu_median * 1e3, rounds=len(t.wall),
            calls_per_round=t.number,
            vs_eager=None if eager is None or name.startswith("floor") else _timing.ratio(eager, t),
            vs_floor=None if floor is None or name.startswith("floor") else _timing.ratio(t, floor)))
    return times


def _mlp_criteria(label, times):
    def add(what, value, ok):
        RESULTS["criteria"].append(dict(regime=f"mlp {label}", criterion=what, value=value, ok=bool(ok)))

    r = _timing.ratio
    if "triton value" in times and "floor: value GEMMs" in times:
        v = r(times["triton value"], times["floor: value GEMMs"])
        add("triton value / value GEMM floor <= 1.2", f"{v:.2f}", v <= 1.2)
    if "triton value-and-grad" in times and "triton value" in times:
        v = r(times["triton value-and-grad"], times["triton value"])
        add("triton value-and-grad / triton value <= 3", f"{v:.2f}", v <= 3)
    if "triton value" in times and "triton value+autograd" in times and "torch eager value+autograd" in times:
        v = r(times["torch eager value+autograd"], times["triton value+autograd"])
        add("triton value+autograd faster than torch eager", f"{v:.2f}x", v > 1)
    if "triton value+autograd" in times and "torch.compile value+autograd" in times:
        v = r(times["torch.compile value+autograd"], times["triton value+autograd"])
        add("triton value+autograd faster than torch.compile", f"{v:.2f}x", v > 1)


def _warm(label, makers, warmup):
    """``{name: fn}`` of the makers that built and ran ``warmup`` times (compiling happens here); each failure
    is an error row and a provider less, each one the time guard stops a skipped row."""
    fns = {}
    for name, make in makers.items():
        if left() < (45 if "compile" in name else 8):
            RESULTS["skipped"].append(f"{label} / {name}: time guard")
            continue
        try:
            fn = make()
            for _ in range(warmup):
                fn()
            sync()
            fns[name] = fn
        except TimeGuard:
            raise
        except Exception as exc:
            RESULTS["errors"].append(f"{label} / {name}: {type(exc).__name__}: {str(exc)[:300]}")
    return fns


# ------------------------------------------------------------------ 5. per-problem measurements (issue 21)


def per_problem_families(d_L, d_0):
    """``[(label, family, n)]``: every registry family that has operands (so can take one set per problem),
    Dense in both regimes (its kernel ``K`` from ``n > d_0 d_L``)."""
    out = []
    for code, row in _families.FAMILIES.items():
        if not row.operands:
            continue  # Isotropic: no operand, no per-problem batch
        family = row.class_name.lower()
        n = d_L * d_0 + 1 if code == _families.DENSE_KERNEL else (N_MEAS_TINY if ARGS.tiny else N_MEAS)[family]
        out.append((row.name, family, n))
    return out


def per_problem_case(label, family, dims, batch, n, dtype):
    """``backend="triton"`` against ``backend="torch"`` in float64, one measurement set per problem: the
    per-layer terms and autograd's gradient of a random functional of them (``hessian_trace``), and
    ``hessian_trace_and_grad``'s value and gradient of the summed trace.  Appends two rows."""
    case = f"per-problem B={math.prod(batch)} L={len(dims) - 1}"
    if left() < 5:
        RESULTS["skipped"].append(f"correctness {case} {label} {dtype}: time guard")
        return
    W = weights(dims, batch, dtype)
    meas = measurements(family, dims[-1], dims[0], n, dtype, batch=batch)
    W64, m64 = [w.detach().double().requires_grad_() for w in W], meas.to(torch.float64)

    def trace(backend):
        return lambda w, m: fk.hessian_trace(w, m, per_layer=True, backend=backend)

    exact, exact_g = terms_and_grads(trace("torch"), W64, m64)
    exact_sum_g = torch.autograd.grad(fk.hessian_trace(W64, m64, backend="torch").sum(), W64)
    got, got_g = terms_and_grads(trace("triton"), W, meas)
    value, vg = fk.hessian_trace_and_grad(W, meas, per_layer=True, backend="triton")
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    name = str(dtype).replace("torch.", "")
    for path, err_t, err_g in (("hessian_trace + autograd", _rel(got, exact), max(map(_rel, got_g, exact_g))),
                               ("hessian_trace_and_grad", _rel(value, exact), max(map(_rel, vg, exact_sum_g)))):
        RESULTS["correctness"].append(dict(case=case, family=label, dims=dims, batch=list(batch), path=path,
                                           dtype=name, rel_err_terms=err_t, rel_err_grads=err_g,
                                           bound=f"rel < {tol:.0e} (vs torch fp64)",
                                           ok=bool(err_t < tol and err_g < tol)))


def per_problem_correctness():
    dims, batch = ([5, 7, 6, 4], (2,)) if ARGS.tiny else ([32] * 5, (256,))
    for dtype in (torch.float32, torch.float64):
        for label, family, n in per_problem_families(dims[-1], dims[0]):
            per_problem_case(label, family, dims, batch, n, dtype)


def per_problem_speed():
    """B problems of one shape, each with its own measurement set (every family but Isotropic, Dense in its
    per-measurement regime), float32: ``backend="triton"`` forward + backward and ``hessian_trace_and_grad``,
    plain torch (``backend="torch"``) forward + backward, and the floor: ``floors.family_products``, the
    bare batched products the method must do (``family_product_count`` of them)."""
    from .floors import family_product_count, family_products

    dims, batch = ([8] * 5, (2,)) if ARGS.tiny else ([32] * 5, (256,))
    rounds, warmup = (1, 1) if ARGS.tiny else (10, 3)
    L = len(dims) - 1
    for label, family, n in per_problem_families(dims[-1], dims[0]):
        regime = f"per-problem B={math.prod(batch)} d={dims[0]} L={L} {label} n={n}"
        if family == "dense" and n > dims[-1] * dims[0]:
            continue  # the kernel regime: checked above, not timed (its floor has no product list)
        if left() < 10:
            RESULTS["skipped"].append(f"{regime}: time guard")
            continue
        W = weights(dims, batch)
        meas = measurements(family, dims[-1], dims[0], n, batch=batch)

        def fwd_bwd(backend):
            def run():
                torch.autograd.grad(fk.hessian_trace(W, meas, backend=backend).sum(), W)
            return run

        def floor():
            with DEV:  # family_products builds its identity matrices on the default device
                family_products(W, meas)

        count = family_product_count(meas.family, L)
        floor_name = f"floor: family_products ({count} batched)"
        makers = {"triton": lambda: fwd_bwd("triton"),
                  "triton hessian_trace_and_grad": lambda: (lambda: fk.hessian_trace_and_grad(W, meas,
                                                                                                backend="triton")),
                  "torch eager": lambda: fwd_bwd("torch"),
                  floor_name: lambda: floor}
        fns = _warm(regime, makers, warmup)
        times = _interleaved(fns, rounds, f"{regime} / timing")
        for name, t in times.items():
            RESULTS["timings"].append(dict(regime=regime, provider=name, ms=t.median * 1e3, cpu_ms=t.cpu_median * 1e3,
                                           rounds=len(t.wall), calls_per_round=t.number, seconds_incl_setup=0.0))
        if floor_name in times:
            for name in ("triton", "triton hessian_trace_and_grad"):
                if name in times:
                    v = _timing.ratio(times[name], times[floor_name])
                    RESULTS["criteria"].append(dict(regime=regime, criterion=f"{name} / batched-GEMM floor <= 1.2",
                                                    value=f"{v:.2f}", ok=bool(v <= 1.2)))
        if "triton" in times and "torch eager" in times:
            v = _timing.ratio(times["torch eager"], times["triton"])
            RESULTS["criteria"].append(dict(regime=regime, criterion="triton faster than torch eager",
                                            value=f"{v:.2f}x", ok=bool(v > 1)))
        if DEV.type == "cuda":
            torch.cuda.empty_cache()


# ------------------------------------------------------------------ 6. report


def table() -> str:
    lines = [f"# flatkern Triton backend: GPU check ({RESULTS['device']})", "",
             f"Command: `{RESULTS['command']}`; total {RESULTS['seconds']:.0f} s; "
             f"tf32 {'allowed' if torch.backends.cuda.matmul.allow_tf32 else 'off'} (fp32 everywhere).", "",
             *([] if DEV.type == "cuda" else ["Dry run in the Triton interpreter: the times below only show that "
                                               "every step runs; they measure nothing.", ""]),
             f"Sections: {', '.join(RESULTS['sections'])}.", "",
             "## Correctness (triton vs float64 reference, max |err| / max |ref|)", "",
             "| case | family | dims | batch | path | dtype | terms | grads | bound | ok |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in RESULTS["correctness"]:
        lines.append(f"| {c['case']} | {c['family']} | {c['dims']} | {c['batch']} | {c['path']} | {c['dtype']} | "
                     f"{c['rel_err_terms']:.1e} | {c['rel_err_grads']:.1e} | {c['bound']} | {'yes' if c['ok'] else 'NO'} |")
    lines += ["", "## Forward + backward time (ms, median over interleaved rounds; ratio = torch eager / provider)", "",
              "| regime | provider | ms | CPU ms | rounds x calls | vs torch eager |", "|---|---|---|---|---|---|"]
    eager = {t["regime"]: t["ms"] for t in RESULTS["timings"] if t["provider"] == "torch eager"}
    for t in RESULTS["timings"]:
        ratio = f"{eager[t['regime']] / t['ms']:.2f}x" if t["regime"] in eager else ""
        lines.append(f"| {t['regime']} | {t['provider']} | {t['ms']:.4g} | {t['cpu_ms']:.4g} | "
                     f"{t['rounds']} x {t['calls_per_round']} | {ratio} |")
    if RESULTS["mlp_correctness"]:
        lines += ["", "## ReLU-network op: correctness (triton vs backend=\"torch\" in float64, max |err| / max |ref|)", "",
                  "terms: per-layer traces of `hessian_trace_of` and `hessian_trace_and_grad_of`; grads: autograd's, in "
                  "the parameters and the inputs, of a random functional of the terms; value-and-grad: "
                  "`hessian_trace_and_grad_of`'s gradient of the summed trace.", "",
                  "| case | loss | widths | N | bias | activations | dtype | terms | grads | value-and-grad | bound | ok |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]

        def e(v):
            return "-" if v is None else f"{v:.1e}"

        for c in RESULTS["mlp_correctness"]:
            lines.append(f"| {c['case']} | {c['loss']} | {c['widths']} | {c['N']} | {c['bias']} | {c['acts']} | "
                         f"{c['dtype']} | {e(c['rel_err_terms'])} | {e(c['rel_err_grads'])} | "
                         f"{e(c['rel_err_value_and_grad'])} | {c['bound']} | {'yes' if c['ok'] else 'NO'} |")
    if RESULTS["mlp_timings"]:
        lines += ["", "## ReLU-network op: time (ms, cross-entropy, ReLU, float32; median over interleaved rounds)", "",
                  "vs eager: torch eager's time of the same kind (value, value+autograd, value-and-grad) over the row's; "
                  "vs floor: the row's time over its GEMM floor (value, or value+grad); both medians of per-round ratios.",
                  "", "| network, batch | provider | ms | CPU ms | rounds x calls | vs eager | vs floor |",
                  "|---|---|---|---|---|---|---|"]
        for t in RESULTS["mlp_timings"]:
            ve = "" if t["vs_eager"] is None else f"{t['vs_eager']:.2f}x"
            vf = "" if t["vs_floor"] is None else f"{t['vs_floor']:.2f}"
            lines.append(f"| {t['regime']} | {t['provider']} | {t['ms']:.4g} | {t['cpu_ms']:.4g} | "
                         f"{t['rounds']} x {t['calls_per_round']} | {ve} | {vf} |")
    lines += ["", "## Issue criteria", "", "| regime | criterion | value | met |", "|---|---|---|---|"]
    for c in RESULTS["criteria"]:
        lines.append(f"| {c['regime']} | {c['criterion']} | {c['value']} | {'yes' if c['ok'] else 'NO'} |")
    for key in ("skipped", "errors"):
        if RESULTS[key]:
            lines += ["", f"## {key.capitalize()}", ""] + [f"- {s}" for s in RESULTS[key]]
    return "\n".join(lines) + "\n"


# (section, step, share): the steps in the order they run, correctness first.  A step's share of
# ``--budget`` is what the steps before it must leave it; time a step does not use flows on to the next
# (the first's share is what the others leave it).  The speed steps compile (Triton kernels, torch.compile),
# hence their larger shares.
STEPS = [("trace", correctness, 0.36), ("mlp", mlp_correctness, 0.07), ("per-problem", per_problem_correctness, 0.10),
         ("mlp", mlp_speed, 0.18), ("per-problem", per_problem_speed, 0.07), ("trace", speed, 0.22)]
assert math.isclose(sum(share for _, _, share in STEPS), 1.0)


def start(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``, check that the device can run, load the Triton launchers and reset the run's
    state (the clock, the budget, ``RESULTS``): what ``main`` does before its steps, and what a test
    calls before running one case of a step."""
    global ARGS, DEV, T0, DEADLINE, SECTION_END, RESULTS, MIN_BLOCK_S, tt
    ARGS = _parse(argv)
    if ARGS.device == "cpu":
        if not ARGS.tiny:
            sys.exit("gpu_check: --device cpu runs only with --tiny (the Triton interpreter is far too slow for real sizes)")
        if os.environ.get("TRITON_INTERPRET") != "1":
            if "flatkern.kernels.triton" in sys.modules:
                # @triton.jit picked the compiler when the kernels were decorated: too late to switch
                sys.exit("gpu_check: the Triton kernels are already loaded without the interpreter; run "
                         "`TRITON_INTERPRET=1 python bench/gpu_check.py --device cpu --tiny`")
            os.environ["TRITON_INTERPRET"] = "1"
    if ARGS.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here; nothing measured. For a dry run of the script logic on CPU use "
                 "`TRITON_INTERPRET=1 python bench/gpu_check.py --device cpu --tiny`.")
    from flatkern.kernels.triton import hessian_trace as tt  # noqa: F811 (after the interpreter setting above)

    DEV = torch.device(ARGS.device)
    T0 = time.perf_counter()
    DEADLINE = SECTION_END = T0 + ARGS.budget
    RESULTS = {"device": "", "sections": list(ARGS.sections), "correctness": [], "mlp_correctness": [], "timings": [],
               "mlp_timings": [], "criteria": [], "skipped": [], "errors": []}
    # seconds each timed block lasts at least (the harness sizes the block once); 0 in the interpreter
    MIN_BLOCK_S = 0.0 if ARGS.tiny else 0.02
    RESULTS["command"] = " ".join(["python", "bench/gpu_check.py", *(sys.argv[1:] if argv is None else argv)])
    RESULTS["device"] = torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu, Triton interpreter"
    RESULTS["torch"], RESULTS["triton"] = torch.__version__, __import__("triton").__version__
    return ARGS


def main(argv: list[str] | None = None) -> int:
    """The command line (``argv``: the options, default ``sys.argv[1:]``); exits 0 when every check that
    ran passed, nothing failed to run, and at least one check ran (a budget that skipped them all is no pass)."""
    global SECTION_END
    start(argv)
    # hard stop half a minute after the budget, whatever hangs: the table is still written
    if hasattr(signal, "SIGALRM"):
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(int(ARGS.budget) + 30)
    steps = [(g, step, share) for g, step, share in STEPS if g in ARGS.sections]
    try:
        for i, (group, step, _) in enumerate(steps):
            # each step leaves the steps after it their shares of the budget; what it does not use flows on
            SECTION_END = DEADLINE - ARGS.budget * sum(share for _, _, share in steps[i + 1:])
            try:
                step()
            except TimeGuard:
                raise
            except Exception as exc:
                RESULTS["errors"].append(f"{step.__name__}: {type(exc).__name__}: {exc}\n{traceback.format_exc()[-1500:]}")
    except TimeGuard as exc:
        RESULTS["errors"].append(str(exc))
    finally:
        if hasattr(signal, "SIGALRM"):
            signal.alarm(0)
    RESULTS["seconds"] = time.perf_counter() - T0
    out = Path(ARGS.out)
    out.mkdir(parents=True, exist_ok=True)
    md = table()
    suffix = "" if DEV.type == "cuda" else "_cpu_tiny"
    (out / f"gpu_check{suffix}.md").write_text(md)
    (out / f"gpu_check{suffix}.json").write_text(json.dumps(RESULTS, indent=1, default=str))
    print(md)
    checks = RESULTS["correctness"] + RESULTS["mlp_correctness"]
    ok = bool(checks) and all(c["ok"] for c in checks) and not RESULTS["errors"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
