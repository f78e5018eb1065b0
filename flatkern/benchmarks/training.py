"""Cost of a flatness-regularized training step against an unregularized one (issues 5 and 13).

A step is forward, backward and an SGD update of the layer weights, float32,
2 threads (``--threads``).  Providers, on the same inputs in one run:

- ``unregularized, plain torch``: ``mse_loss(backend="torch")`` (``E`` by
  ``L - 1`` ``@``), backward, step: the baseline every ratio is taken against;
- ``unregularized, flatkern auto``: the same with ``E`` from the fastest backend;
- ``regularized, objective``: ``flatkern.objective(..., lam)`` (``backend="auto"``:
  the C++ fused kernel when built), one backward, step;
- ``regularized, objective torch``: the same with ``backend="torch"``
  (chain products formed once in plain torch);
- ``unregularized, torch.optim.SGD``: ``mse_loss`` (auto), backward, ``torch.optim.SGD.step``;
- ``regularized, FlatnessRegularized``: the same with ``FlatnessRegularized(SGD)``,
  whose ``step`` adds ``lam ∇ tr`` from one ``hessian_trace_and_grad`` call;
  compared with the row above;
- ``regularized, torch reference (unshared)``: ``mse_loss + lam * hessian_trace``,
  both ``backend="torch"``: the docs/MATH.md formula written directly in torch;
- ``regularized, torch autograd (jacrev)``: what plain autograd needs for the
  exact trace: the Jacobian of the ``n`` predictions with respect to the
  weights by ``torch.func.jacrev``, ``tr = (2/n) ‖J‖_F²`` (the Gauss-Newton
  trace, equal to the Hessian trace for a deep linear network, docs/MATH.md), and
  a double backward through it.  Small case only (``J`` is ``n × Σ d_j d_{j-1}``);
- ``bare GEMMs``: the 9, 15 and 21 matrix products of an unregularized step, of
  ``objective``'s step and of ``FlatnessRegularized``'s step
  (``flatkern.benchmarks.floors``), large case only: the floors of the ratios.

A second table times the trace and its gradient alone: the reference's forward
and ``torch.autograd.grad`` against ``hessian_trace(backend="auto")`` with
``autograd.grad`` and against ``hessian_trace_and_grad`` (issue 13).

Targets (issue 13, ``--threads 1``): FlatnessRegularized ≤ 1.25x the SGD step at
d=30, L=3, Entries n=300; ``hessian_trace_and_grad`` ≥ 10x the reference at d=30,
L=3, Isotropic; at d=512, L=4, Isotropic, FlatnessRegularized / SGD within 5% of
21/9 and objective / unregularized within 5% of 15/9, both floors measured in the
same run.  The table prints each target with its measured value.

    python bench/bench_training.py            # both tables
    python bench/bench_training.py --quick    # fewer rounds
    python bench/bench_training.py --threads 1
    python bench/bench_training.py --only d=30   # the cases whose title contains "d=30"

(``python -m flatkern.benchmarks.training`` is the same command; ``bench/bench_training.py``
only calls ``main`` here.)

Timing (``flatkern.benchmarks.timing``): providers are interleaved round-robin
(the machine is shared and noisy), each round times a block of steps; a ratio
is taken within each round (providers seconds apart see about the same load)
and its median over rounds is reported.  Before timing, one step of every
provider from the same weights is checked to give the same updated weights, and
every trace-and-gradient provider the reference's gradients.
"""

from __future__ import annotations

import argparse
import functools
import sys

import torch

import flatkern as fk
from flatkern.objective import objective
from flatkern.optim import FlatnessRegularized

from .floors import loss_step_products, objective_products, optimizer_products
from .timing import interleave, ratio

LAM, LR = 1e-2, 1e-4


def _sgd_step(ws, lr=LR):
    with torch.no_grad():
        for w in ws:
            w.sub_(w.grad, alpha=lr)
            w.grad = None


def unregularized(meas, b, backend):
    def step(ws):
        fk.mse_loss(ws, meas, b, backend=backend).backward()
        _sgd_step(ws)
    return step


def optimizer_step(meas, b, make_optimizer):
    """``mse_loss`` backward, then ``step``/``zero_grad`` of ``make_optimizer(ws)``, one per weight set."""
    opts = {}

    def step(ws):
        key = tuple(id(w) for w in ws)
        if key not in opts:  # built by the warm-up call, outside the timed region
            opts[key] = make_optimizer(ws)
        fk.mse_loss(ws, meas, b).backward()
        opts[key].step()
        opts[key].zero_grad()
    return step


def unregularized_torch_optim(meas, b):
    return optimizer_step(meas, b, lambda ws: torch.optim.SGD(ws, lr=LR))


def regularized_objective(meas, b, backend):
    def step(ws):
        loss, _ = objective(ws, meas, b, lam=LAM, backend=backend)
        loss.backward()
        _sgd_step(ws)
    return step


def regularized_optimizer(meas, b):
    return optimizer_step(meas, b, lambda ws: FlatnessRegularized(ws, torch.optim.SGD, lam=LAM, measurements=meas, lr=LR))


def regularized_reference(meas, b):
    def step(ws):
        (fk.mse_loss(ws, meas, b, backend="torch") + LAM * fk.hessian_trace(ws, meas, backend="torch")).backward()
        _sgd_step(ws)
    return step


def regularized_jacrev(meas, b):
    def predictions(*ws):
        return meas.predict(fk.reference.end_to_end_ref(list(ws)))

    jac = torch.func.jacrev(predictions, argnums=tuple(range(3)))

    def step(ws):
        pred = predictions(*ws)
        J = jac(*ws)  # per weight: (n, d_j, d_{j-1}), differentiable (create_graph implied by func transforms)
        trace = 2.0 * sum(Jj.square().sum() for Jj in J) / pred.shape[-1]
        ((pred - b).square().mean() + LAM * trace).backward()
        _sgd_step(ws)
    return step


def bare(products):
    """A step that does only ``products(ws)``: the floor of a ratio (``flatkern.benchmarks.floors``)."""
    def step(ws):
        products(ws)
    return step


def check_agreement(providers: dict, weights, rtol: float):
    """One step from the same weights: every regularized provider lands on the same weights (and so do the plain ones)."""
    after = {}
    for name, fn in providers.items():
        ws = [w.detach().clone().requires_grad_() for w in weights]
        fn(ws)
        after[name] = [w.detach() for w in ws]
    for kind in ("unregularized", "regularized"):
        names = [n for n in after if n.startswith(kind)]
        for name in names[1:]:
            for a, r, w0 in zip(after[name], after[names[0]], weights):
                # compare the updates, not the weights (an update is LR times smaller)
                torch.testing.assert_close(a - w0, r - w0, rtol=rtol, atol=rtol * (r - w0).abs().max().item(),
                                           msg=f"{name} disagrees with {names[0]}")


def time_steps(providers: dict, weights, rounds: int, min_block_s: float) -> dict:
    """The harness's timings of every provider, each stepping its own copy of the weights."""
    copies = {name: [w.detach().clone().requires_grad_() for w in weights] for name in providers}
    return interleave({name: functools.partial(fn, copies[name]) for name, fn in providers.items()},
                      rounds=rounds, min_block_s=min_block_s)


def cases():
    g = torch.Generator().manual_seed(0)

    def weights(d, L):
        return [torch.randn(d, d, generator=g) / d**0.5 for _ in range(L)]

    meas = fk.Entries.uniform(300, (30, 30), generator=g)
    yield "d=30 L=3, Entries n=300", weights(30, 3), meas, torch.randn(300, generator=g), True
    yield "d=512 L=4, Isotropic", weights(512, 4), fk.Isotropic(), torch.randn(512, 512, generator=g) / 512**0.5, False


def step_table(args, rounds):
    print("| case | provider | median time/step | vs unregularized plain torch | vs fastest unregularized |")
    print("|---|---|---:|---:|---:|")
    for title, ws, meas, b, small in cases():
        if args.only is not None and args.only not in title:
            continue
        providers = {
            "unregularized, plain torch": unregularized(meas, b, "torch"),
            "unregularized, flatkern auto": unregularized(meas, b, "auto"),
            "regularized, objective": regularized_objective(meas, b, "auto"),
            "regularized, objective torch": regularized_objective(meas, b, "torch"),
            "unregularized, torch.optim.SGD": unregularized_torch_optim(meas, b),
            "regularized, FlatnessRegularized": regularized_optimizer(meas, b),
            "regularized, torch reference (unshared)": regularized_reference(meas, b),
        }
        if small:
            providers["regularized, torch autograd (jacrev)"] = regularized_jacrev(meas, b)
        else:
            providers["bare GEMMs of an unregularized step (9)"] = bare(loss_step_products)
            providers["bare GEMMs of an objective step (15)"] = bare(objective_products)
            providers["bare GEMMs of a FlatnessRegularized step (21)"] = bare(optimizer_products)
        check_agreement(providers, ws, rtol=1e-3)
        r = rounds if small else max(3, rounds // 3)  # a large step takes a fraction of a second
        t = time_steps(providers, ws, r, min_block_s=0.05 if small else 0.0)
        unreg = ("unregularized, plain torch", "unregularized, flatkern auto")
        best = min(unreg, key=lambda u: t[u].median)

        def row(label, value="", over_plain="", over_best=""):
            print(f"| {title} | {label} | {value} | {over_plain} | {over_best} |")

        for name in providers:
            row(name, f"{t[name].median * 1e6:,.0f} µs", f"{ratio(t[name], t[unreg[0]]):.2f}x",
                f"{ratio(t[name], t[best]):.2f}x")
        opt = ratio(t["regularized, FlatnessRegularized"], t["unregularized, torch.optim.SGD"])
        if small:
            row("FlatnessRegularized over the same step with torch.optim.SGD (target ≤ 1.25x)", "", f"{opt:.2f}x")
            for slow in ("regularized, torch autograd (jacrev)", "regularized, torch reference (unshared)"):
                row(f"speed-up of objective over {slow.split(', ')[1]}", "",
                    f"{ratio(t[slow], t['regularized, objective']):.2f}x")
        else:
            floor15 = ratio(t["bare GEMMs of an objective step (15)"], t["bare GEMMs of an unregularized step (9)"])
            floor21 = ratio(t["bare GEMMs of a FlatnessRegularized step (21)"], t["bare GEMMs of an unregularized step (9)"])
            obj = ratio(t["regularized, objective"], t["unregularized, flatkern auto"])
            row("floor: bare GEMMs objective / unregularized (15/9 = 1.67)", "", f"{floor15:.2f}x")
            row("objective over unregularized flatkern auto, over that floor (target ≤ 1.05)", "",
                f"{obj:.2f}x / {floor15:.2f} = {obj / floor15:.3f}")
            row("floor: bare GEMMs FlatnessRegularized / unregularized (21/9 = 2.33)", "", f"{floor21:.2f}x")
            row("FlatnessRegularized over torch.optim.SGD, over that floor (target ≤ 1.05)", "",
                f"{opt:.2f}x / {floor21:.2f} = {opt / floor21:.3f}")
        sys.stdout.flush()


# ------------------------------------------------------------------ the trace and its gradient alone


def reference_grad(meas, ws, backend):
    def run():
        return torch.autograd.grad(fk.hessian_trace(ws, meas, backend=backend), ws)
    return run


def one_call_grad(meas, ws):
    def run():
        return fk.hessian_trace_and_grad(ws, meas)[1]
    return run


def grad_cases():
    g = torch.Generator().manual_seed(1)

    def weights(d, L):
        return [(torch.randn(d, d, generator=g) / d**0.5).requires_grad_() for _ in range(L)]

    yield "d=30 L=3, Isotropic", weights(30, 3), fk.Isotropic()
    yield "d=30 L=3, Entries n=300", weights(30, 3), fk.Entries.uniform(300, (30, 30), generator=g)


def grad_table(args, rounds):
    print("| case | provider | median time/call | speed-up over the reference |")
    print("|---|---|---:|---:|")
    for title, ws, meas in grad_cases():
        if args.only is not None and args.only not in title:
            continue
        providers = {
            "reference: hessian_trace(torch) + autograd.grad": reference_grad(meas, ws, "torch"),
            "hessian_trace(auto) + autograd.grad": reference_grad(meas, ws, "auto"),
        }
        if hasattr(fk, "hessian_trace_and_grad"):
            providers["hessian_trace_and_grad(auto)"] = one_call_grad(meas, ws)
        ref = next(iter(providers.values()))()
        for name, fn in providers.items():
            for a, r in zip(fn(), ref):
                torch.testing.assert_close(a, r, rtol=1e-3, atol=1e-3 * r.abs().max().item(), msg=f"{name} disagrees")
        t = interleave(providers, rounds=rounds, min_block_s=0.05)
        base = t["reference: hessian_trace(torch) + autograd.grad"]
        for name in providers:
            print(f"| {title} | {name} | {t[name].median * 1e6:,.0f} µs | {ratio(base, t[name]):.2f}x |")
        if "hessian_trace_and_grad(auto)" in t and "Isotropic" in title:
            print(f"| {title} | hessian_trace_and_grad over the reference (target ≥ 10x) | | "
                  f"{ratio(base, t['hessian_trace_and_grad(auto)']):.2f}x |")
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    """The command line (``argv``: the options, default ``sys.argv[1:]``); prints both tables, returns 0."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default=None, help="run only the cases whose title contains this text")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (5 if args.quick else 31)
    one_call = "yes" if hasattr(fk, "hessian_trace_and_grad") else "no (rows left out)"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, one SGD step "
          f"(forward+backward+update), lam={LAM}, {rounds} interleaved rounds; backends "
          f"{fk.available_backends('cpu')}; flatkern.hessian_trace_and_grad: {one_call}")
    print("Times: median over rounds; ratios: median over rounds of the ratio within a round.\n")
    step_table(args, rounds)
    print("\nThe trace and its gradient with respect to the weights, alone:\n")
    grad_table(args, rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
