"""GPU check of the Triton backend (issue 4): correctness first, then speed, table last.

    python bench/gpu_check.py                      # on a CUDA machine; writes $OUT (or bench/results)
    TRITON_INTERPRET=1 python bench/gpu_check.py --device cpu --tiny   # the same logic, tiny, in the interpreter

(``python -m flatkern.benchmarks.gpu_check`` is the same command; ``bench/gpu_check.py`` only
puts the checkout first on ``sys.path`` and calls ``main`` here.)

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
   Timed with the repository's one harness (``flatkern.benchmarks.timing``):
   the providers of a regime run interleaved round-robin, medians over rounds.
   Regimes of the issue: ``B=1024, d=32, L=4``; one problem ``d=30, L=3``;
   one problem ``d=8192, L=4`` with ``Isotropic`` and ``Entries`` (10^7 entries);
   then the wide small path, ``B=256, d=64`` and ``B=128, d=128``, ``L=4``.
3. Writes ``gpu_check.md`` and ``gpu_check.json`` to ``--out`` and prints the
   table last.  A time guard (``--budget`` seconds, default 420) skips what
   would not fit and still writes the table.
"""

from __future__ import annotations

import argparse
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
from flatkern.reference import hessian_trace_ref, layer_terms_ref

from .timing import interleave

# the checkout this module runs from (bench/results is the default --out there)
ROOT = Path(__file__).resolve().parents[2]


def _default_out() -> str:
    if os.environ.get("OUT"):
        return os.environ["OUT"]
    return str(ROOT / "bench" / "results") if (ROOT / "bench").is_dir() else os.getcwd()


def _parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (for the CPU interpreter dry run)")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds before the time guard skips the rest")
    ap.add_argument("--out", default=_default_out())
    return ap.parse_args(argv)


# set by main(): the options, the device, the clock, the Triton module and what the run found
ARGS: argparse.Namespace
DEV: torch.device
T0 = DEADLINE = 0.0
tt = None  # flatkern.kernels.triton.hessian_trace (the launchers), imported by main() once the interpreter setting is known
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
    return DEADLINE - time.perf_counter()


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------ problems


def weights(dims, batch=(), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(*batch, dims[j + 1], dims[j], generator=g) / math.sqrt(dims[j]) for j in range(len(dims) - 1)]
    return [w.to(DEV, dtype).requires_grad_() for w in ws]


# one builder per public measurement class; the families checked are the registry's
# (flatkern/kernels/families.py), so a new family without a builder here is an error, not a gap
_BUILDERS = {
    "Isotropic": lambda d_L, d_0, n, dtype, g: fk.Isotropic(),
    "Entries": lambda d_L, d_0, n, dtype, g: fk.Entries.uniform(n, (d_L, d_0), generator=g,
                                                                 replace=n > d_L * d_0 // 2).to(DEV),
    "RankOne": lambda d_L, d_0, n, dtype, g: fk.RankOne(torch.randn(n, d_L, generator=g),
                                                        torch.randn(n, d_0, generator=g)).to(DEV, dtype),
    "Dense": lambda d_L, d_0, n, dtype, g: fk.Dense(torch.randn(n, d_L, d_0, generator=g)).to(DEV, dtype),
    "Inputs": lambda d_L, d_0, n, dtype, g: fk.Inputs(torch.randn(n, d_0, generator=g)).to(DEV, dtype),
}
FAMILIES = [name.lower() for name in _families.CLASS_NAMES]
_missing = set(_families.CLASS_NAMES) - set(_BUILDERS)
assert not _missing, f"gpu_check has no builder for the families {sorted(_missing)} (flatkern/kernels/families.py)"


def measurements(family, d_L, d_0, n, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    name = next(c for c in _families.CLASS_NAMES if c.lower() == family)
    return _BUILDERS[name](d_L, d_0, n, dtype, g)


N_MEAS = {"isotropic": 1, "entries": 200, "rankone": 100, "dense": 16, "inputs": 64}


# ------------------------------------------------------------------ 1. correctness


def check_case(label, family, dims, batch, path, block, n, dtype=torch.float32, rule="rel"):
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


# ------------------------------------------------------------------ 3. report


def table() -> str:
    lines = [f"# flatkern Triton backend: GPU check ({RESULTS['device']})", "",
             f"Command: `{RESULTS['command']}`; total {RESULTS['seconds']:.0f} s; "
             f"tf32 {'allowed' if torch.backends.cuda.matmul.allow_tf32 else 'off'} (fp32 everywhere).", "",
             *([] if DEV.type == "cuda" else ["Dry run in the Triton interpreter: the times below only show that "
                                               "every step runs; they measure nothing.", ""]),
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
    lines += ["", "## Issue criteria", "", "| regime | criterion | value | met |", "|---|---|---|---|"]
    for c in RESULTS["criteria"]:
        lines.append(f"| {c['regime']} | {c['criterion']} | {c['value']} | {'yes' if c['ok'] else 'NO'} |")
    for key in ("skipped", "errors"):
        if RESULTS[key]:
            lines += ["", f"## {key.capitalize()}", ""] + [f"- {s}" for s in RESULTS[key]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """The command line (``argv``: the options, default ``sys.argv[1:]``); exits 0 when every check passed."""
    global ARGS, DEV, T0, DEADLINE, RESULTS, MIN_BLOCK_S, tt
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
    DEADLINE = T0 + ARGS.budget
    RESULTS = {"device": "", "correctness": [], "timings": [], "criteria": [], "skipped": [], "errors": []}
    # seconds each timed block lasts at least (the harness sizes the block once); 0 in the interpreter
    MIN_BLOCK_S = 0.0 if ARGS.tiny else 0.02
    RESULTS["command"] = " ".join(["python", "bench/gpu_check.py", *(sys.argv[1:] if argv is None else argv)])
    RESULTS["device"] = torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu, Triton interpreter"
    RESULTS["torch"], RESULTS["triton"] = torch.__version__, __import__("triton").__version__
    # hard stop a minute after the budget, whatever hangs: the table is still written
    if hasattr(signal, "SIGALRM"):
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(int(ARGS.budget) + 60)
    try:
        for step in (correctness, speed):
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
    ok = all(c["ok"] for c in RESULTS["correctness"]) and not RESULTS["errors"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
