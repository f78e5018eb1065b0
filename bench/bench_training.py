"""Cost of a flatness-regularized training step against an unregularized one (issue 5).

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
  whose ``step`` adds ``lam ∇ tr`` from one ``hessian_trace`` call (a second
  backward); compared with the row above;
- ``regularized, torch reference (unshared)``: ``mse_loss + lam * hessian_trace``,
  both ``backend="torch"``: the MATH.md formula written directly in torch;
- ``regularized, torch autograd (jacrev)``: what plain autograd needs for the
  exact trace: the Jacobian of the ``n`` predictions with respect to the
  weights by ``torch.func.jacrev``, ``tr = (2/n) ‖J‖_F²`` (the Gauss-Newton
  trace, equal to the Hessian trace for a deep linear network, MATH.md), and
  a double backward through it.  Small case only (``J`` is ``n × Σ d_j d_{j-1}``).

    python bench/bench_training.py            # both cases
    python bench/bench_training.py --quick    # fewer rounds
    python bench/bench_training.py --threads 1

Timing: providers are interleaved round-robin (the machine is shared and
noisy), each round times a block of steps; a ratio is taken within each round
(providers seconds apart see about the same load) and its median over
rounds is reported.  Before timing, one step of every provider from the same weights is
checked to give the same updated weights.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import flatkern as fk
from flatkern.kernels import cpp
from flatkern.objective import objective
from flatkern.optim import FlatnessRegularized

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


def bare_gemms(regularized: bool):
    """The matrix products of one ``L = 4`` step and nothing else: the floor of the ratio.

    Unregularized: ``E = W_4 W_3 W_2 W_1`` (3 products) and its backward (6).  The
    regularized step of ``objective`` also needs the suffix chain ``P_2 = W_4 W_3``,
    ``P_1 = P_2 W_2`` (2) and its reverse accumulation (4); the prefix chain's part of
    the regularizer rides on the loss backward for free (MATH.md cost model).  15
    products against 9: no implementation that forms these products can take less
    than 15/9 = 1.67x an unregularized step, whatever its overheads.
    """
    def step(ws):
        W1, W2, W3, W4 = (w.detach() for w in ws)
        mm = torch.mm
        Q3 = mm(W2, W1)
        Q4 = mm(W3, Q3)
        G = mm(W4, Q4)  # E, standing in for dL/dE (same shape)
        mm(G, Q4.t())  # dW_4
        bar_Q4 = mm(W4.t(), G)
        mm(bar_Q4, Q3.t())  # dW_3
        bar_Q3 = mm(W3.t(), bar_Q4)
        mm(bar_Q3, W1.t())  # dW_2
        mm(W2.t(), bar_Q3)  # dW_1
        if regularized:
            P2 = mm(W4, W3)
            P1 = mm(P2, W2)
            mm(P2.t(), P1)  # dW_2 from P_1
            bar_P2 = mm(P1, W2.t())
            mm(W4.t(), bar_P2)  # dW_3 from P_2
            mm(bar_P2, W3.t())  # dW_4 from P_2
    return step


def time_providers(providers: dict, weights, rounds: int, min_block_s: float) -> dict:
    """Per-round seconds per step of each provider (each on its own copy of the weights), round-robin."""
    copies = {name: [w.detach().clone().requires_grad_() for w in weights] for name in providers}
    number = {}
    for name, fn in providers.items():  # warm up and size the blocks
        fn(copies[name])
        t0 = time.perf_counter()
        fn(copies[name])
        number[name] = max(1, int(min_block_s / max(time.perf_counter() - t0, 1e-7)))
    samples = {name: [] for name in providers}
    for _ in range(rounds):
        for name, fn in providers.items():
            ws = copies[name]
            t0 = time.perf_counter()
            for _ in range(number[name]):
                fn(ws)
            samples[name].append((time.perf_counter() - t0) / number[name])
    return samples


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


def cases():
    g = torch.Generator().manual_seed(0)

    def weights(d, L):
        return [torch.randn(d, d, generator=g) / d**0.5 for _ in range(L)]

    meas = fk.Entries.uniform(300, (30, 30), generator=g)
    yield "d=30 L=3, Entries n=300", weights(30, 3), meas, torch.randn(300, generator=g), True
    yield "d=512 L=4, Isotropic", weights(512, 4), fk.Isotropic(), torch.randn(512, 512, generator=g) / 512**0.5, False


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (5 if args.quick else 31)
    fused = hasattr(cpp, "layer_terms_and_end_to_end") and cpp.unavailable_reason(torch.device("cpu")) is None
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, one SGD step "
          f"(forward+backward+update), lam={LAM}, {rounds} interleaved rounds; "
          f"C++ fused layer_terms_and_end_to_end: {'yes' if fused else 'no'}")
    print("Times: median over rounds; ratios: median over rounds of the ratio within a round.\n")
    print("| case | provider | median time/step | vs unregularized plain torch | vs fastest unregularized |")
    print("|---|---|---:|---:|---:|")
    for title, ws, meas, b, small in cases():
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
            providers["bare GEMMs of an unregularized step (9)"] = bare_gemms(False)
            providers["bare GEMMs of a regularized step (15)"] = bare_gemms(True)
        check_agreement(providers, ws, rtol=1e-3)
        r = rounds if small else max(3, rounds // 3)  # a large step takes a fraction of a second
        samples = time_providers(providers, ws, r, min_block_s=0.05 if small else 0.0)
        med = {name: statistics.median(s) for name, s in samples.items()}
        unreg = ("unregularized, plain torch", "unregularized, flatkern auto")
        best = min(unreg, key=lambda u: med[u])

        def ratio(name, over):
            # providers of one round ran seconds apart: the per-round ratio cancels most of the
            # machine's changing load, and its median over rounds is the number to read
            return f"{statistics.median(a / b for a, b in zip(samples[name], samples[over])):.2f}x"

        for name in samples:
            print(f"| {title} | {name} | {med[name] * 1e6:,.0f} µs | {ratio(name, unreg[0])} | {ratio(name, best)} |")
        print(f"| {title} | FlatnessRegularized over the same step with torch.optim.SGD | | "
              f"{ratio('regularized, FlatnessRegularized', 'unregularized, torch.optim.SGD')} | |")
        if not small:
            print(f"| {title} | floor: bare GEMMs regularized / unregularized (15/9 = 1.67) | | "
                  f"{ratio('bare GEMMs of a regularized step (15)', 'bare GEMMs of an unregularized step (9)')} | |")
        if small:
            for slow in ("regularized, torch autograd (jacrev)", "regularized, torch reference (unshared)"):
                print(f"| {title} | speed-up of objective over {slow.split(', ')[1]} | | {ratio(slow, 'regularized, objective')} | |")

if __name__ == "__main__":
    main()
