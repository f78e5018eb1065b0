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

Batched weights ``(B, d_j, d_{j-1})`` (B problems) make each product one ``torch.bmm``
of the same shapes: the same count, each a batched product.
"""

from __future__ import annotations

import torch

__all__ = ["trace_products", "loss_step_products", "objective_products", "optimizer_products", "PRODUCTS"]


def _four(ws):
    if len(ws) != 4:
        raise ValueError(f"the floors are written for L = 4 layers, got {len(ws)}")
    return [w.detach() for w in ws]


def _mm(ws):
    """``torch.mm``, or ``torch.bmm`` for a batch of problems ``(B, d_j, d_{j-1})``."""
    return torch.bmm if ws[0].dim() == 3 else torch.mm


def _t(x):
    return x.transpose(-1, -2)


def trace_products(ws):
    """The 12 products of the trace and its gradient: 4 forward, 8 backward.

    Forward: Q_3 = W_2 W_1, Q_4 = W_3 Q_3, P_2 = W_4 W_3, P_1 = P_2 W_2.  Backward by reverse
    accumulation: two products per chain step on each chain.
    """
    W1, W2, W3, W4 = _four(ws)
    mm = _mm(ws)
    Q3 = mm(W2, W1)
    Q4 = mm(W3, Q3)
    P2 = mm(W4, W3)
    P1 = mm(P2, W2)
    gQ4, gP1 = Q4, P1  # stand-ins of the same shapes for the family's contributions
    gW3 = mm(gQ4, _t(Q3))
    gQ3 = mm(_t(W3), gQ4)
    gW2 = mm(gQ3, _t(W1))
    gQ2 = mm(_t(W2), gQ3)
    gW2b = mm(_t(P2), gP1)
    gP2 = mm(gP1, _t(W2))
    gW3b = mm(_t(W4), gP2)
    gP3 = mm(gP2, _t(W3))
    return gW3, gW2, gQ2, gW2b, gW3b, gP3


def loss_step_products(ws):
    """The 9 products of an unregularized step: ``E`` (3) and its backward (6)."""
    W1, W2, W3, W4 = _four(ws)
    mm = _mm(ws)
    Q3 = mm(W2, W1)
    Q4 = mm(W3, Q3)
    G = mm(W4, Q4)  # E, standing in for dL/dE (same shape)
    dW4 = mm(G, _t(Q4))
    bar_Q4 = mm(_t(W4), G)
    dW3 = mm(bar_Q4, _t(Q3))
    bar_Q3 = mm(_t(W3), bar_Q4)
    dW2 = mm(bar_Q3, _t(W1))
    dW1 = mm(_t(W2), bar_Q3)
    return dW1, dW2, dW3, dW4


def objective_products(ws):
    """The 15 products of ``objective``'s step: the loss step, the suffix chain (2) and its reverse (4)."""
    W1, W2, W3, W4 = _four(ws)
    mm = _mm(ws)
    grads = loss_step_products(ws)
    P2 = mm(W4, W3)
    P1 = mm(P2, W2)
    dW2 = mm(_t(P2), P1)  # dW_2 from P_1
    bar_P2 = mm(P1, _t(W2))
    dW3 = mm(_t(W4), bar_P2)  # dW_3 from P_2
    dW4 = mm(bar_P2, _t(W3))  # dW_4 from P_2
    return grads, (dW2, dW3, dW4)


def optimizer_products(ws):
    """The 21 products of ``FlatnessRegularized``'s step: the loss step (9), then the trace and its gradient (12)."""
    return loss_step_products(ws), trace_products(ws)


# name -> number of torch.mm calls (tests/test_benchmarks.py counts them)
PRODUCTS = {trace_products: 12, loss_step_products: 9, objective_products: 15, optimizer_products: 21}


# ------------------------------------------------------------------ batched problems, any depth, every family


def family_product_count(family: int, L: int) -> int:
    """How many products ``family_products`` does for depth ``L >= 2`` (the C++ kernel's count):

        chain (every family)   6 (L - 2)   prefix and suffix chains (2 (L - 2)) and their reverse (4 (L - 2))
        Isotropic, Entries     + 0         norms and scalings only (O(d²) per layer)
        Inputs                 + 2 L - 1   S = xᵀ x / (N d_L) once; Q_j S forward, and again in the
                                           gradient 2‖P_j‖² Q_j S
        RankOne                + 6 (L - 1) U P_j, V Q_jᵀ forward; both again, Uᵀ diag(β) U P_j and
                                           (diag(α) V Q_jᵀ)ᵀ V in the gradient
        Dense                  + 8 L - 6   per layer G_P = P Pᵀ, G_Q = Qᵀ Q, Y = A G_Q, H = Σ_i Y_i A_iᵀ;
                                           gradient (H + Hᵀ) P, Z = G_P A, D = Σ_i A_iᵀ Z_i, Q (D + Dᵀ)
    """
    from ..kernels import families

    extra = {families.ISOTROPIC: 0, families.ENTRIES: 0, families.INPUTS: 2 * L - 1,
             families.RANK_ONE: 6 * (L - 1), families.DENSE: 8 * L - 6}
    if L < 2 or family not in extra:
        raise ValueError(f"family_product_count takes L >= 2 and one of {sorted(extra)}, got family {family}, L {L}")
    return 6 * (L - 2) + extra[family]


def family_products(ws, meas):
    """The ``family_product_count`` products of the C++ kernel's trace and gradient, bare: one
    ``torch.matmul`` each, batched over the problems (and over their own measurement sets when
    ``meas`` has one per problem), with the shapes and dependencies the kernel has, and nothing
    else (no norms, scalings, sums or transposed copies).  ``ws``: ``(B, d_j, d_{j-1})``, ``L >= 2``.
    """
    from ..kernels import families

    W = [w.detach() for w in ws]
    L, mm, fam = len(W), torch.matmul, meas.family
    Q = [None, None, W[0]] + [None] * (L - 2)  # 1-based: Q_1 = I, Q_2 = W_1
    for j in range(3, L + 1):
        Q[j] = mm(W[j - 2], Q[j - 1])
    P = [None] * (L + 1)  # P_L = I, P_{L-1} = W_L
    P[L - 1] = W[L - 1]
    for j in range(L - 1, 1, -1):
        P[j - 1] = mm(P[j], W[j - 1])
    out = []
    # the family's products, forward and gradient, layer by layer
    if fam == families.INPUTS:
        x = meas.operands[0]
        S = mm(_t(x), x)  # once per call, as the kernel does
        out += [mm(Q[j], S) for j in range(2, L + 1) for _ in range(2)]
    elif fam == families.RANK_ONE:
        U, V = meas.operands
        for j in range(1, L):
            UP = mm(U, P[j])
            out += [UP, mm(_t(U), mm(U, P[j]))]
        for j in range(2, L + 1):
            VQ = mm(V, _t(Q[j]))
            out += [VQ, mm(_t(mm(V, _t(Q[j]))), V)]
    elif fam == families.DENSE:
        Ap = meas.operands[0]
        *batch, d_L, n, d_0 = Ap.shape
        rows, cols = Ap.reshape(*batch, d_L, n * d_0), Ap.reshape(*batch, d_L * n, d_0)
        for j in range(1, L + 1):
            GP = mm(P[j], _t(P[j])) if P[j] is not None else None
            GQ = mm(_t(Q[j]), Q[j]) if Q[j] is not None else None
            Y = mm(cols, GQ if GQ is not None else torch.eye(d_0, dtype=Ap.dtype, device=Ap.device))
            H = mm(Y.reshape(*Y.shape[:-2], d_L, n * d_0), _t(rows))
            out += [GP, GQ, H]
            if P[j] is not None:
                out.append(mm(H, P[j]))
            if Q[j] is not None:
                Z = mm(GP if GP is not None else torch.eye(d_L, dtype=Ap.dtype, device=Ap.device), rows)
                D = mm(_t(cols), Z.reshape(*Z.shape[:-2], d_L * n, d_0))
                out.append(mm(Q[j], D))
    elif fam not in (families.ISOTROPIC, families.ENTRIES):
        raise ValueError(f"family_products has no product list for the {families.get(fam).name} family")
    # reverse accumulation along both chains: two products per step, on stand-ins of the right shapes
    g = Q[L]
    for j in range(L - 1, 1, -1):
        out.append(mm(g, _t(Q[j])))
        g = mm(_t(W[j - 1]), g)
    g = P[1]
    for j in range(2, L):
        out.append(mm(_t(P[j]), g))
        g = mm(g, _t(W[j - 1]))
    return out
