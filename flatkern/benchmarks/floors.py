"""The bare matrix products of the trace and of a training step, for ``L = 4``: the floors of the benchmarks.

Each function does the ``torch.mm`` calls an implementation must do, with the
same shapes and dependencies, and nothing else (no norms, no scalings, no
autograd): no implementation that forms these products can take less time.
``cpu_kernels.py`` and ``training.py`` (``python bench/bench_*.py``) time them in
the same run as the real providers (docs/MATH.md, cost model):

    trace_products       12  the trace and its gradient: chains 4, reverse accumulation 8
    loss_step_products    9  an unregularized step: E = W_4 W_3 W_2 W_1 (3) and its backward (6)
    objective_products   15  ``flatkern.objective``'s step: the loss step, plus the suffix chain
                             P_2 = W_4 W_3, P_1 = P_2 W_2 (2) and its reverse accumulation (4);
                             the prefix chain's part of the regularizer rides on the loss backward
    optimizer_products   21  ``FlatnessRegularized``'s step: the loss step (9) and, apart, the
                             trace and its gradient (12)

So a regularized step costs at least 15/9 = 1.67x an unregularized one
through ``objective``, and 21/9 = 2.33x through the optimizer.
"""

from __future__ import annotations

import torch

__all__ = ["trace_products", "loss_step_products", "objective_products", "optimizer_products", "PRODUCTS"]


def _four(ws):
    if len(ws) != 4:
        raise ValueError(f"the floors are written for L = 4 layers, got {len(ws)}")
    return [w.detach() for w in ws]


def trace_products(ws):
    """The 12 products of the trace and its gradient: 4 forward, 8 backward.

    Forward: Q_3 = W_2 W_1, Q_4 = W_3 Q_3, P_2 = W_4 W_3, P_1 = P_2 W_2.  Backward by reverse
    accumulation: two products per chain step on each chain.
    """
    W1, W2, W3, W4 = _four(ws)
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


def loss_step_products(ws):
    """The 9 products of an unregularized step: ``E`` (3) and its backward (6)."""
    W1, W2, W3, W4 = _four(ws)
    mm = torch.mm
    Q3 = mm(W2, W1)
    Q4 = mm(W3, Q3)
    G = mm(W4, Q4)  # E, standing in for dL/dE (same shape)
    dW4 = mm(G, Q4.t())
    bar_Q4 = mm(W4.t(), G)
    dW3 = mm(bar_Q4, Q3.t())
    bar_Q3 = mm(W3.t(), bar_Q4)
    dW2 = mm(bar_Q3, W1.t())
    dW1 = mm(W2.t(), bar_Q3)
    return dW1, dW2, dW3, dW4


def objective_products(ws):
    """The 15 products of ``objective``'s step: the loss step, the suffix chain (2) and its reverse (4)."""
    W1, W2, W3, W4 = _four(ws)
    mm = torch.mm
    grads = loss_step_products(ws)
    P2 = mm(W4, W3)
    P1 = mm(P2, W2)
    dW2 = mm(P2.t(), P1)  # dW_2 from P_1
    bar_P2 = mm(P1, W2.t())
    dW3 = mm(W4.t(), bar_P2)  # dW_3 from P_2
    dW4 = mm(bar_P2, W3.t())  # dW_4 from P_2
    return grads, (dW2, dW3, dW4)


def optimizer_products(ws):
    """The 21 products of ``FlatnessRegularized``'s step: the loss step (9), then the trace and its gradient (12)."""
    return loss_step_products(ws), trace_products(ws)


# name -> number of torch.mm calls (tests/test_benchmarks.py counts them)
PRODUCTS = {trace_products: 12, loss_step_products: 9, objective_products: 15, optimizer_products: 21}
