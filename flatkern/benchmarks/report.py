"""``flatkern bench``: measuring each provider on each regime, the tables, and the command line.

What a row holds (``measure``):

- time: wall-clock seconds.  Each provider first runs once, untimed, on a
  tiny problem of the same family (lazy imports and one-time setup); then its
  first call on the real problem is timed, and if it took longer than
  ``--single-shot`` seconds that one call is the time ("one timed call");
  otherwise ``fwd`` and ``fwd+bwd`` are timed by the harness
  (``timing.interleave``: interleaved rounds of one call each, the median over
  rounds, as many rounds as give the slower of the two ``--min-time`` seconds,
  at least 3 and at most 50).  A first call much slower than the median is noted (the C++
  backend builds and caches ``Dense.kernel()`` then; torch.compile's
  compilation is timed apart).  ``fwd`` is the trace, ``fwd+bwd`` the trace
  and its gradient with respect to the weights (differentiable providers only);
- peak memory, of that first call (``timing.peak_memory``): on CPU the rise of
  the process's peak resident set size, on CUDA ``torch.cuda.max_memory_allocated``;
- error: ``|value - exact| / |exact|`` with ``exact`` the plain-torch
  reference in float64 (the largest over the problems of a batch).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch

from .peers import flatkern_auto_backend, providers_for
from .problems import REGIMES, TEST_REGIMES, Problem, Provider, Regime, make_problem
from .timing import fmt_bytes, fmt_time, interleave, peak_memory, sync, time_once

__all__ = ["measure", "run_regime", "fwd_bwd", "warm_up", "to_markdown", "to_text", "environment",
           "add_arguments", "run", "main", "DESCRIPTION"]

DESCRIPTION = "flatkern's exact Hessian trace next to the ways people compute it today."


# ------------------------------------------------------------------ measuring


def fwd_bwd(provider: Provider, problem: Problem):
    """A call that computes the provider's trace and its gradient with respect to the weights."""
    weights = [w.detach().requires_grad_() for w in problem.weights]
    p = Problem(problem.regime, weights, problem.measurements, problem.targets, problem.exact)

    def call():
        for w in weights:
            w.grad = None
        provider.trace(p).sum().backward()

    return call


_warmed: set = set()


def warm_up(provider: Provider, problem: Problem) -> None:
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
                fwd_bwd(provider, tiny_problem)()
        except (RuntimeError, ValueError):
            pass  # the timed call will report it


def _empty_row(regime: Regime, provider: Provider, note: str = "") -> dict:
    return {"regime": regime.name, "provider": provider.name, "kind": provider.kind, "fwd_s": None,
            "fwd_bwd_s": None, "peak_bytes": None, "value": None, "rel_err": None, "note": note}


def measure(provider: Provider, problem: Problem, *, min_time=0.5, max_repeat=50, single_shot=3.0, memory=True) -> dict:
    """Time, peak memory, value and relative error of one provider on one problem (a row of the table)."""
    device = problem.weights[0].device
    row = _empty_row(problem.regime, provider)
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
        warm_up(provider, problem)
        fns = {"fwd": lambda: provider.trace(problem)}
        if provider.differentiable:
            fns["fwd_bwd"] = fwd_bwd(provider, problem)
        notes = []
        if provider.compiles:
            row["compile_s"] = sum(time_once(fn, device) for fn in fns.values())
            notes.append(f"compiling took {row['compile_s']:.3g} s (not in the times)")
        # the first call on this problem: its value, its peak memory, and the time of a slow provider
        if memory:
            value, first, row["peak_bytes"] = peak_memory(fns["fwd"], device)
        else:
            sync(device)
            start = time.perf_counter()
            value = fns["fwd"]()
            sync(device)
            first = time.perf_counter() - start
        row["first_s"] = first
        if first > single_shot:
            row["fwd_s"], row["repeats"] = first, 1
            del fns["fwd"]
        if "fwd_bwd" in fns:
            first_bwd = time_once(fns["fwd_bwd"], device)
            if first_bwd > single_shot:
                row["fwd_bwd_s"] = first_bwd
                del fns["fwd_bwd"]
        if fns:
            timings = interleave(fns, min_time=min_time, max_rounds=max_repeat, warmup=0, device=device)
            for key, t in timings.items():
                row[f"{key}_s"], row[f"{key}_cpu_s"] = t.median, t.cpu_median
            if "fwd" in timings:
                row["repeats"] = timings["fwd"].calls
        if row["repeats"] > 1 and row["first_s"] > 3 * row["fwd_s"]:
            # e.g. the C++ backend builds and caches Dense.kernel() on its first call
            notes.append(f"first call {fmt_time(row['first_s'])}")
        exact = problem.exact.to(value.device)
        row["value"] = value.double().reshape(-1).tolist()
        row["rel_err"] = ((value.double() - exact).abs() / exact.abs()).max().item()
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
            rows.append(_empty_row(regime, provider, "not in the quick run: --full"))
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


def _fmt_row(r) -> list[str]:
    est = r.get("extrapolated")
    t = fmt_time(r["fwd_s"])
    ratio = r.get("slowdown_vs_flatkern")
    return [
        r["provider"], r["kind"], ("≈ " + t) if est and r["fwd_s"] else t, fmt_time(r["fwd_bwd_s"]),
        fmt_bytes(r["peak_bytes"]), "—" if r["rel_err"] is None else f"{r['rel_err']:.1e}",
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
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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
    parser.add_argument("--min-time", type=float, default=0.5,
                        help="seconds of timed calls per provider: fwd and fwd+bwd run in interleaved rounds "
                             "until the slower has had this long (3 to 50 rounds; default 0.5)")
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
    parser = argparse.ArgumentParser(prog="flatkern bench", description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return run(args)

