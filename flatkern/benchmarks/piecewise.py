"""The exact Hessian trace of ReLU MLPs (issue 19) against its floor and the ways people compute it today.

    python bench/bench_relu.py [--quick] [--threads N] [--rounds N] [--only TEXT] [--json PATH]
    python -m flatkern.benchmarks.piecewise ...          (the same)

For each MLP (784-512-512-10 and 64-256-256-10, ReLU, cross-entropy, float32, CPU) at batch
128 and 512, every row below runs on the same model and batch, interleaved round-robin through
the one timing harness (``timing.interleave``), and every number is reported as a ratio to the
flatkern value measured in the same rounds (``timing.ratio``: median over rounds of the per-round
ratio):

    flatkern value            hessian_trace_of(model, x, loss="cross_entropy") under no_grad
    flatkern value+autograd   the same with a graph, then .backward() (what loss + lam * trace costs)
    flatkern value-and-grad   hessian_trace_and_grad_of: the hand-derived reverse sweep, no graph
                              (these three: backend="auto", the fused op flatkern::mlp_hessian_trace)
    plain-torch value, plain-torch value+autograd, plain-torch value-and-grad
                              the same with backend="torch" (flatkern.piecewise, what "auto" ran before
                              the fused kernels): the before/after of issue 19 item 2 in one run
    floor: value GEMMs        the bare products the value must do: the forward (N × d_{l-1})·(d_{l-1} × d_l)
                              and the C-column sweep (N·C × d_{l+1})·(d_{l+1} × d_l), nothing else
    floor: value+grad GEMMs   those, the sweep's two more per layer (Gᵀ U, U Wᵀ) and the forward's backward
    torch.func vmap(jacrev)   per-sample Jacobians of the logits, Σ_i ‖S_iᵀ J_i‖² (the GGN trace, exact),
                              where all N of them fit in JAC_MAX_BYTES (1 GiB); skipped, with the size, elsewhere
    Hutchinson-100            100 Rademacher probes through Hessian-vector products, one at a time
                              (PyHessian's loop); its relative error against the exact trace is reported
    BackPACK DiagGGNExact     the exact GGN diagonal (forward, backward with the extension), summed;
                              skipped, with the reason, when BackPACK is not installed

The exact values (flatkern, vmap GGN, BackPACK) are compared before timing; a disagreement
beyond float32 rounding stops the run.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import warnings

import torch
from torch import nn

from ..nn import hessian_trace_and_grad_of, hessian_trace_of
from .timing import interleave, ratio

__all__ = ["CASES", "NUM_PROBES", "JAC_MAX_BYTES", "make_case", "providers", "run_case", "vmap_ggn_trace", "hutchinson", "main"]

CASES = [  # (widths, batch)
    ((784, 512, 512, 10), 128),
    ((784, 512, 512, 10), 512),
    ((64, 256, 256, 10), 128),
    ((64, 256, 256, 10), 512),
]
NUM_PROBES = 100  # Hutchinson probes, PyHessian's default use
JAC_MAX_BYTES = 2**30  # the per-sample Jacobians (N · C · p floats) must fit in this


def mlp(widths, *, seed: int = 0, dtype=torch.float32) -> nn.Sequential:
    """``Linear → ReLU → … → Linear`` with PyTorch's default initialization."""
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    for j, (a, b) in enumerate(zip(widths, widths[1:])):
        mods.append(nn.Linear(a, b, dtype=dtype))
        if j < len(widths) - 2:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods)


def make_case(widths, batch: int, *, seed: int = 0):
    """``(model, x, labels)``: the MLP, standard normal inputs ``(batch, d_0)``, uniform labels."""
    model = mlp(widths, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, widths[0], generator=g)
    y = torch.randint(widths[-1], (batch,), generator=g)
    return model, x, y


# ------------------------------------------------------------------ flatkern


def flatkern_value(model, x, backend: str = "auto"):
    with torch.no_grad():
        return hessian_trace_of(model, x, loss="cross_entropy", backend=backend)


def flatkern_value_autograd(model, x, backend: str = "auto"):
    params = list(model.parameters())
    t = hessian_trace_of(model, x, loss="cross_entropy", backend=backend)
    torch.autograd.grad(t, params)
    return t.detach()


def flatkern_value_and_grad(model, x, backend: str = "auto"):
    return hessian_trace_and_grad_of(model, x, loss="cross_entropy", backend=backend)[0]


# ------------------------------------------------------------------ the floors: bare GEMMs


def _floor_operands(model, x, C: int):
    Ws = [m.weight.detach() for m in model if isinstance(m, nn.Linear)]
    N = x.shape[0]
    acts = [x]
    for W in Ws[:-1]:
        acts.append(torch.randn(N, W.shape[0]))
    G = [torch.randn(N * C, W.shape[0]) for W in Ws]  # G_l flattened: (N·C, d_l)
    zbar = [torch.randn(N, W.shape[0]) for W in Ws]  # the forward's output gradients
    return Ws, acts, G, zbar


def value_gemms(Ws, acts, G):
    """The forward ``a_{l-1} W_lᵀ`` and the sweep ``G_l = G_{l+1} W_{l+1}`` (l < L): the value's products."""
    mm = torch.mm
    for W, a in zip(Ws, acts):
        mm(a, W.t())
    for l in range(len(Ws) - 1):
        mm(G[l + 1], Ws[l + 1])


def value_and_grad_gemms(Ws, acts, G, zbar):
    """The value's products, the sweep reversed (``G_{l+1}ᵀ U_l`` and, below the top, ``U_l W_{l+1}ᵀ``),
    and the forward's backward (``z̄ᵀ a`` and ``z̄ W``)."""
    value_gemms(Ws, acts, G)
    mm = torch.mm
    L = len(Ws)
    for l in range(L - 1):
        mm(G[l + 1].t(), G[l])
        if l + 1 < L - 1:
            mm(G[l], Ws[l + 1].t())
    for l in range(L - 1, -1, -1):
        mm(zbar[l].t(), acts[l])
        if l:
            mm(zbar[l], Ws[l])


# ------------------------------------------------------------------ peers


def vmap_ggn_trace(model, x, chunk: int | None = None):
    """``Σ_i ‖S_iᵀ J_i‖_F² / N``, ``J_i = ∂f(x_i)/∂θ`` from ``vmap(jacrev)`` (in chunks of ``chunk`` samples)."""
    from torch.func import functional_call, jacrev, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    C = model[-1].out_features

    def logits(p, xi):
        return functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)

    per_sample = vmap(jacrev(logits), in_dims=(None, 0))
    N = x.shape[0]
    chunk = chunk or N
    total = x.new_zeros(())
    for i in range(0, N, chunk):
        xs = x[i:i + chunk]
        J = per_sample(params, xs)  # {name: (n, C, *shape)}
        J = torch.cat([j.reshape(j.shape[0], C, -1) for j in J.values()], dim=-1)  # (n, C, p)
        p = torch.softmax(logits_batch(model, xs), dim=-1)
        St = p.sqrt().unsqueeze(-1) * (torch.eye(C, dtype=x.dtype) - p.unsqueeze(-2))
        total = total + (St @ J).square().sum()
    return total / N


def logits_batch(model, x):
    with torch.no_grad():
        return model(x)


def vmap_skip(model, x) -> str | None:
    """Why the per-sample Jacobians ``(N, C, p)`` do not fit in ``JAC_MAX_BYTES``, or ``None``."""
    p = sum(t.numel() for t in model.parameters())
    need = x.shape[0] * model[-1].out_features * p * x.element_size()
    if need > JAC_MAX_BYTES:
        return f"the per-sample Jacobians (N, C, p) need {need / 2**30:.1f} GiB (> {JAC_MAX_BYTES / 2**30:.0f})"
    return None


def hutchinson(model, x, y, num_probes: int = NUM_PROBES, seed: int = 0):
    """PyHessian's estimator: ``(1/m) Σ_k v_kᵀ H v_k``, Rademacher ``v_k``, one HVP per probe."""
    params = list(model.parameters())
    loss = nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    g = torch.Generator().manual_seed(seed)
    acc = 0.0
    for _ in range(num_probes):
        vs = [torch.randint(0, 2, p.shape, generator=g).to(p.dtype) * 2 - 1 for p in params]
        hv = torch.autograd.grad(grads, params, vs, retain_graph=True)
        acc += sum((h * v).sum() for h, v in zip(hv, vs)).item()
    return torch.tensor(acc / num_probes)


def backpack_skip() -> str | None:
    try:
        import backpack  # noqa: F401
    except ImportError:
        return "not installed (pip install --no-deps backpack-for-pytorch==1.7.1 unfoldNd==0.2.3 einops)"
    return None


def backpack_model(model):
    from backpack import extend

    return extend(copy.deepcopy(model)), extend(nn.CrossEntropyLoss())


def backpack_trace(ext_model, lossfunc, x, y):
    """``Σ diag(GGN)`` of BackPACK's ``DiagGGNExact`` (forward, backward with the extension)."""
    from backpack import backpack
    from backpack.extensions import DiagGGNExact

    ext_model.zero_grad(set_to_none=True)
    loss = lossfunc(ext_model(x), y)
    with backpack(DiagGGNExact()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss.backward()
    return sum(p.diag_ggn_exact.sum() for p in ext_model.parameters()).detach()


# ------------------------------------------------------------------ one case


def providers(model, x, y, *, hutch: bool = True):
    """``({name: zero-argument callable}, {name: reason skipped})`` for one case."""
    C = model[-1].out_features
    Ws, acts, G, zbar = _floor_operands(model, x, C)
    fns = {
        "flatkern value": lambda: flatkern_value(model, x),
        "flatkern value+autograd": lambda: flatkern_value_autograd(model, x),
        "flatkern value-and-grad": lambda: flatkern_value_and_grad(model, x),
        # the plain-torch formula (backend="torch"): what "auto" ran before the fused op (issue 19 item 2)
        "plain-torch value": lambda: flatkern_value(model, x, "torch"),
        "plain-torch value+autograd": lambda: flatkern_value_autograd(model, x, "torch"),
        "plain-torch value-and-grad": lambda: flatkern_value_and_grad(model, x, "torch"),
        "floor: value GEMMs": lambda: value_gemms(Ws, acts, G),
        "floor: value+grad GEMMs": lambda: value_and_grad_gemms(Ws, acts, G, zbar),
    }
    skipped = {}
    why = vmap_skip(model, x)
    if why is not None:
        skipped["torch.func vmap(jacrev)"] = why
    else:
        fns["torch.func vmap(jacrev)"] = lambda: vmap_ggn_trace(model, x)
    if hutch:
        fns[f"Hutchinson-{NUM_PROBES}"] = lambda: hutchinson(model, x, y)
    else:
        skipped[f"Hutchinson-{NUM_PROBES}"] = "--quick"
    why = backpack_skip()
    if why is None:
        ext, lossfunc = backpack_model(model)
        fns["BackPACK DiagGGNExact"] = lambda: backpack_trace(ext, lossfunc, x, y)
    else:
        skipped["BackPACK DiagGGNExact"] = why
    return fns, skipped


def run_case(widths, batch: int, *, rounds: int = 3, hutch: bool = True) -> dict:
    model, x, y = make_case(widths, batch)
    fns, skipped = providers(model, x, y, hutch=hutch)
    exact = flatkern_value(model, x).item()
    values = {"flatkern value": exact}
    # every exact method must give the same number before anything is timed
    checks = {"flatkern value+autograd": flatkern_value_autograd, "flatkern value-and-grad": flatkern_value_and_grad,
              "plain-torch value": lambda m, x: flatkern_value(m, x, "torch"),
              "plain-torch value+autograd": lambda m, x: flatkern_value_autograd(m, x, "torch"),
              "plain-torch value-and-grad": lambda m, x: flatkern_value_and_grad(m, x, "torch")}
    for name, fn in checks.items():
        values[name] = fn(model, x).item()
    if "torch.func vmap(jacrev)" in fns:
        values["torch.func vmap(jacrev)"] = fns["torch.func vmap(jacrev)"]().item()
    if "BackPACK DiagGGNExact" in fns:
        values["BackPACK DiagGGNExact"] = fns["BackPACK DiagGGNExact"]().item()
    for name, v in values.items():
        if not math.isclose(v, exact, rel_tol=1e-4):
            raise AssertionError(f"{name} gives {v!r} but flatkern's exact trace is {exact!r}")
    hutch_error = None
    if hutch:
        est = fns[f"Hutchinson-{NUM_PROBES}"]().item()
        values[f"Hutchinson-{NUM_PROBES}"] = est
        hutch_error = abs(est - exact) / abs(exact)
    # blocks of at least 0.1 s: a 3 ms call timed once per round is mostly scheduler noise on a shared machine
    timings = interleave(fns, rounds=rounds, warmup=1, min_block_s=0.1)
    base = timings["flatkern value"]
    rows = {name: {"seconds": t.median, "ratio_to_value": ratio(t, base), "calls": t.calls}
            for name, t in timings.items()}
    return {
        "widths": list(widths), "batch": batch, "params": sum(p.numel() for p in model.parameters()),
        "trace": exact, "values": values, "hutchinson_relative_error": hutch_error,
        "rows": rows, "skipped": skipped,
        "targets": {
            "BackPACK / value (>= 2)": rows["BackPACK DiagGGNExact"]["ratio_to_value"] if "BackPACK DiagGGNExact" in rows else None,
            "value / value floor (<= 1.2)": 1.0 / rows["floor: value GEMMs"]["ratio_to_value"],
            "value-and-grad / value (<= 3)": rows["flatkern value-and-grad"]["ratio_to_value"],
            "plain torch: value-and-grad / value": (rows["plain-torch value-and-grad"]["ratio_to_value"]
                                                    / rows["plain-torch value"]["ratio_to_value"]),
            "plain-torch value / fused value": rows["plain-torch value"]["ratio_to_value"],
        },
    }


def _fmt_s(s: float) -> str:
    return f"{s * 1e3:9.2f} ms" if s < 10 else f"{s:9.1f} s "


def to_text(result: dict) -> str:
    w, N = "-".join(map(str, result["widths"])), result["batch"]
    lines = [f"{w}, batch {N}, cross-entropy, float32 ({result['params']:,} parameters), trace {result['trace']:.6g}"]
    for name, row in result["rows"].items():
        extra = ""
        if name.startswith("Hutchinson") and result["hutchinson_relative_error"] is not None:
            extra = f"   relative error {result['hutchinson_relative_error']:.3f}"
        lines.append(f"  {name:<26}{_fmt_s(row['seconds'])}  {row['ratio_to_value']:8.2f}x value{extra}")
    for name, why in result["skipped"].items():
        lines.append(f"  {name:<26}skipped: {why}")
    for name, v in result["targets"].items():
        lines.append(f"  target {name}: " + ("n/a" if v is None else f"{v:.2f}"))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="leave out Hutchinson (the slowest row)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per case (default 3)")
    ap.add_argument("--only", default=None, help="run the cases whose name ('784-512-512-10/512') contains this")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    results = []
    for widths, batch in CASES:
        name = f"{'-'.join(map(str, widths))}/{batch}"
        if args.only and args.only not in name:
            continue
        result = run_case(widths, batch, rounds=args.rounds, hutch=not args.quick)
        results.append(result)
        print(to_text(result), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
