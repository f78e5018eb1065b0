"""The small path: one Triton program per problem holds its whole chain.

For every width ``d_j <= SMALL_MAX_WIDTH`` (128) and any depth, one program per
problem of the batch builds the prefix products ``Q_j = W_{j-1} ⋯ W_1`` and the
suffix products ``P_j = W_L ⋯ W_{j+1}``, contracts them with the measurement
family and writes ``c_j = (1/n) Σ_i ‖P_jᵀ A_i Q_jᵀ‖_F²`` (and, on request,
``E = W_L Q_L``): one forward launch.  One backward launch does the reverse
accumulation along both chains (``docs/MATH.md``, cost model), seeded with the
end-to-end gradient ``∂<G, E>/∂P_1 = G W_1ᵀ`` when one is given.  This is the
regime where eager PyTorch is launch-bound.

Holds: the ``@triton.jit`` kernels (``_chain_small_fwd_kernel``,
``_chain_small_bwd_kernel`` and their helpers) and their launchers
``chain_small_fwd`` / ``chain_small_bwd``.

Layout.  The layers of a problem are packed one after the other, row-major, in
``W (B, Σ_j d_j d_{j-1})``; the widths ``d_0 … d_L`` are an int32 tensor the
kernels read per layer, so neither the kernel's argument list nor its compiled
code depends on the depth.  Every chain product lives in a per-problem
workspace of zero-padded ``(D, D)`` tiles, ``D`` a power of two >= every width:
``P_ws, Q_ws (B, L, D, D)``, which the forward hands to the backward, and a few
scratch tiles (the backward's running gradient, Dense's Grams).  Zero padding is
closed under products, so only loads from the unpadded inputs and the
identities ``P_L = I``, ``Q_1 = I`` need the widths.  A program touches only its
own problem's workspace, so it stays in L1/L2; ``tl.debug_barrier()``
(``__syncthreads``) orders one step's tile stores before the next step's loads.

Compile time is what bounds ``D``: fp32 ``tl.dot`` without tf32 is lowered to
fully unrolled FMAs, so a product held in registers costs ``D³`` instructions
(``D = 64`` took minutes).  Every product here is ``_mm``, a run-time loop over
K-chunks of ``SMALL_BK``, so only a ``D x D x BK`` body is unrolled; the layer
loops, the widths, the depth and the measurement count are run-time values, so
a kernel is compiled once per ``(D, family)``.  There is no depth cap: the code
and the registers do not grow with the depth, only the workspace (``2 B L D²``
elements) does.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .. import families

__all__ = ["SMALL_MAX_WIDTH", "SMALL_BK", "small_width", "widths_tensor", "chain_small_fwd", "chain_small_bwd"]

# widest layer the single-program path takes (compile times: see SMALL_BK)
SMALL_MAX_WIDTH = 128

# The family codes the kernels branch on (a kernel reads only constexpr globals).  DENSE_KERNEL
# never reaches a kernel: the launchers' callers pass it as DENSE (Triton reads Ap for both).
ISOTROPIC = tl.constexpr(families.ISOTROPIC)
ENTRIES = tl.constexpr(families.ENTRIES)
RANK_ONE = tl.constexpr(families.RANK_ONE)
DENSE = tl.constexpr(families.DENSE)
INPUTS = tl.constexpr(families.INPUTS)

# run-time integers: specializing them (== 1, divisible by 16) would compile the same kernel again
# for each pattern of depth, measurement count and strides
_RUNTIME_INTS = ["L", "n", "with_e", "s_wb", "s_scr", "s_ai", "s_aa", "s_ab", "s_x1b", "s_x2b"]


@triton.jit
def _eye(n, D: tl.constexpr, dtype: tl.constexpr):
    """``I_n`` zero-padded to ``(D, D)``."""
    o = tl.arange(0, D)
    return tl.where((o[:, None] == o[None, :]) & (o[:, None] < n), 1.0, 0.0).to(dtype)


@triton.jit
def _load_square(X, rows, cols, D: tl.constexpr):
    """A row-major ``(rows, cols)`` matrix at ``X``, zero-padded to ``(D, D)``."""
    o = tl.arange(0, D)
    return tl.load(X + o[:, None] * cols + o[None, :], mask=(o[:, None] < rows) & (o[None, :] < cols), other=0.0)


@triton.jit
def _store_square(X, x, rows, cols, D: tl.constexpr):
    """The top-left ``(rows, cols)`` block of the (D, D) tile ``x`` to a row-major matrix at ``X``."""
    o = tl.arange(0, D)
    tl.store(X + o[:, None] * cols + o[None, :], x, mask=(o[:, None] < rows) & (o[None, :] < cols))


@triton.jit
def _tile(X, D: tl.constexpr):
    """The (D, D) workspace tile at ``X``."""
    o = tl.arange(0, D)
    return tl.load(X + o[:, None] * D + o[None, :])


@triton.jit
def _put(X, x, D: tl.constexpr):
    """Store the (D, D) tile ``x`` to the workspace tile at ``X``."""
    o = tl.arange(0, D)
    tl.store(X + o[:, None] * D + o[None, :], x)


@triton.jit
def _mm(A, s_am, s_ak, B, s_bk, s_bn, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
        PREC: tl.constexpr):
    """``A[:M, :K] @ B[:K, :N]`` zero-padded to ``(BM, BN)``; A, B strided (a transpose is a stride swap).

    A run-time loop over K-chunks of ``BK``: the compiler unrolls one
    ``BM x BN x BK`` chunk of FMAs, not the whole product.
    """
    rm = tl.arange(0, BM)
    rn = tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros([BM, BN], dtype=A.dtype.element_ty)
    a_ptr = A + rm[:, None] * s_am + rk[None, :] * s_ak
    b_ptr = B + rk[:, None] * s_bk + rn[None, :] * s_bn
    for k0 in range(0, K, BK):
        a = tl.load(a_ptr, mask=(rm[:, None] < M) & ((k0 + rk)[None, :] < K), other=0.0)
        b = tl.load(b_ptr, mask=((k0 + rk)[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
        a_ptr += BK * s_ak
        b_ptr += BK * s_bk
    return acc


@triton.jit
def _small_contract(Pj, Qj, SCR, dp, dq, d_L, d_0, n, X1, X2, s_ai, s_aa, s_ab, FAMILY: tl.constexpr,
                    D: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """``c_j`` from the workspace tiles ``Pj = P_j`` (d_L, dp) and ``Qj = Q_j`` (dq, d_0).

    ``X1``, ``X2``: the family's data (``chain_small_fwd``); ``A_i[a, b]`` at
    ``X1 + i s_ai + a s_aa + b s_ab`` for Dense, which uses two scratch tiles at ``SCR`` for its Grams.
    """
    if FAMILY == ISOTROPIC:  # ‖P‖² ‖Q‖²
        p = _tile(Pj, D)
        q = _tile(Qj, D)
        c = tl.sum(p * p) * tl.sum(q * q)
    elif FAMILY == ENTRIES:  # rᵀ K s, K = counts / n
        p = _tile(Pj, D)
        q = _tile(Qj, D)
        K = _load_square(X1, d_L, d_0, D)
        r = tl.sum(p * p, axis=1)
        s = tl.sum(q * q, axis=0)
        c = tl.sum(tl.sum(K * s[None, :], axis=1) * r)
    elif FAMILY == RANK_ONE:  # (1/n) Σ ‖u_iᵀ P‖² ‖v_iᵀ Qᵀ‖², BN measurements at a time
        acc = tl.zeros([BN], dtype=X1.dtype.element_ty)
        u_ptr = X1
        v_ptr = X2
        for start in range(0, n, BN):
            up = _mm(u_ptr, d_L, 1, Pj, D, 1, n - start, D, d_L, BN, D, BK, PREC)
            vq = _mm(v_ptr, d_0, 1, Qj, 1, D, n - start, D, d_0, BN, D, BK, PREC)
            acc += tl.sum(up * up, axis=1) * tl.sum(vq * vq, axis=1)
            # advancing the pointers keeps the offsets 64-bit
            u_ptr += BN * d_L
            v_ptr += BN * d_0
        c = tl.sum(acc) / n
    elif FAMILY == DENSE:  # (1/n) Σ <A_i, G A_i H>, <A, G A H> = Σ (G A) ⊙ (A H)
        G_ws = SCR
        H_ws = SCR + D * D
        # threads may still be reading the previous layer's Grams
        tl.debug_barrier()
        _put(G_ws, _mm(Pj, D, 1, Pj, 1, D, d_L, d_L, dp, D, D, BK, PREC), D)
        _put(H_ws, _mm(Qj, 1, D, Qj, D, 1, d_0, d_0, dq, D, D, BK, PREC), D)
        tl.debug_barrier()
        acc = tl.zeros([D, D], dtype=X1.dtype.element_ty)
        a_ptr = X1
        for i in range(0, n):
            ga = _mm(G_ws, D, 1, a_ptr, s_aa, s_ab, d_L, d_0, d_L, D, D, BK, PREC)
            ah = _mm(a_ptr, s_aa, s_ab, H_ws, D, 1, d_L, d_0, d_0, D, D, BK, PREC)
            acc += ga * ah
            a_ptr += s_ai
        c = tl.sum(acc) / n
    else:  # ‖P‖² <QᵀQ, M> = ‖P‖² Σ Q ⊙ (Q M), M = XᵀX / (N d_L)
        tl.static_assert(FAMILY == INPUTS)
        p = _tile(Pj, D)
        q = _tile(Qj, D)
        qm = _mm(Qj, D, 1, X1, d_0, 1, dq, d_0, d_0, D, D, BK, PREC)
        c = tl.sum(p * p) * tl.sum(q * qm)
    return c


@triton.jit
def _small_contract_grad(Pj, Qj, SCR, g, dp, dq, d_L, d_0, n, X1, X2, s_ai, s_aa, s_ab, FAMILY: tl.constexpr,
                         D: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """``(g ∂c_j/∂P_j, g ∂c_j/∂Q_j) = (2g S_j P_j, 2g Q_j T_j)``, both (D, D) tiles.

    Dense uses three scratch tiles at ``SCR``.
    """
    o = tl.arange(0, D)
    if FAMILY == ISOTROPIC:
        p = _tile(Pj, D)
        q = _tile(Qj, D)
        p_bar = (2.0 * g * tl.sum(q * q)) * p
        q_bar = (2.0 * g * tl.sum(p * p)) * q
    elif FAMILY == ENTRIES:
        p = _tile(Pj, D)
        q = _tile(Qj, D)
        K = _load_square(X1, d_L, d_0, D)
        r = tl.sum(p * p, axis=1)
        s = tl.sum(q * q, axis=0)
        p_bar = (2.0 * g) * tl.sum(K * s[None, :], axis=1)[:, None] * p
        q_bar = (2.0 * g) * q * tl.sum(K * r[:, None], axis=0)[None, :]
    elif FAMILY == RANK_ONE:
        p_bar = tl.zeros([D, D], dtype=X1.dtype.element_ty)
        q_bar = tl.zeros([D, D], dtype=X1.dtype.element_ty)
        rows = tl.arange(0, BN)
        u_ptr = X1
        v_ptr = X2
        for start in range(0, n, BN):
            live = (start + rows) < n
            u = tl.load(u_ptr + rows[:, None] * d_L + o[None, :], mask=live[:, None] & (o[None, :] < d_L), other=0.0)
            v = tl.load(v_ptr + rows[:, None] * d_0 + o[None, :], mask=live[:, None] & (o[None, :] < d_0), other=0.0)
            up = _mm(u_ptr, d_L, 1, Pj, D, 1, n - start, D, d_L, BN, D, BK, PREC)
            vq = _mm(v_ptr, d_0, 1, Qj, 1, D, n - start, D, d_0, BN, D, BK, PREC)
            alpha = tl.sum(up * up, axis=1)
            beta = tl.sum(vq * vq, axis=1)
            # inner dimension BN: these two are one chunk each
            p_bar += tl.dot(tl.trans(u), beta[:, None] * up, input_precision=PREC)
            q_bar += tl.dot(tl.trans(alpha[:, None] * vq), v, input_precision=PREC)
            u_ptr += BN * d_L
            v_ptr += BN * d_0
        p_bar = (2.0 * g / n) * p_bar
        q_bar = (2.0 * g / n) * q_bar
    elif FAMILY == DENSE:
        # S = Σ_i A_i H A_iᵀ and T = Σ_i A_iᵀ G A_i, one after the other (one (D, D) sum live at a time)
        G_ws = SCR
        H_ws = SCR + D * D
        X_ws = SCR + 2 * D * D
        tl.debug_barrier()
        _put(G_ws, _mm(Pj, D, 1, Pj, 1, D, d_L, d_L, dp, D, D, BK, PREC), D)
        _put(H_ws, _mm(Qj, 1, D, Qj, D, 1, d_0, d_0, dq, D, D, BK, PREC), D)
        S = tl.zeros([D, D], dtype=X1.dtype.element_ty)
        a_ptr = X1
        for i in range(0, n):
            tl.debug_barrier()
            _put(X_ws, _mm(a_ptr, s_aa, s_ab, H_ws, D, 1, d_L, d_0, d_0, D, D, BK, PREC), D)  # A_i H
            tl.debug_barrier()
            S += _mm(X_ws, D, 1, a_ptr, s_ab, s_aa, d_L, d_L, d_0, D, D, BK, PREC)  # (A_i H) A_iᵀ
            a_ptr += s_ai
        tl.debug_barrier()
        _put(X_ws, S, D)
        tl.debug_barrier()
        p_bar = (2.0 * g / n) * _mm(X_ws, D, 1, Pj, D, 1, d_L, dp, d_L, D, D, BK, PREC)
        T = tl.zeros([D, D], dtype=X1.dtype.element_ty)
        a_ptr = X1
        for i in range(0, n):
            tl.debug_barrier()
            _put(X_ws, _mm(G_ws, D, 1, a_ptr, s_aa, s_ab, d_L, d_0, d_L, D, D, BK, PREC), D)  # G A_i
            tl.debug_barrier()
            T += _mm(a_ptr, s_ab, s_aa, X_ws, D, 1, d_0, d_0, d_L, D, D, BK, PREC)  # A_iᵀ (G A_i)
            a_ptr += s_ai
        tl.debug_barrier()
        _put(X_ws, T, D)
        tl.debug_barrier()
        q_bar = (2.0 * g / n) * _mm(Qj, D, 1, X_ws, D, 1, dq, d_0, d_0, D, D, BK, PREC)
    else:
        tl.static_assert(FAMILY == INPUTS)
        p = _tile(Pj, D)
        q = _tile(Qj, D)
        qm = _mm(Qj, D, 1, X1, d_0, 1, dq, d_0, d_0, D, D, BK, PREC)
        p_bar = (2.0 * g * tl.sum(q * qm)) * p
        q_bar = (2.0 * g * tl.sum(p * p)) * qm
    return p_bar, q_bar


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _chain_small_fwd_kernel(W, s_wb, WIDTHS, P_ws, Q_ws, SCR, s_scr, OUT, E_OUT, with_e, L, n, X1, X2,
                            s_x1b, s_x2b, s_ai, s_aa, s_ab, D: tl.constexpr, FAMILY: tl.constexpr,
                            BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """One program per problem: ``OUT[b, j] = c_j``; stores ``P_j``, ``Q_j`` for the backward.

    W: (B, Σ d_j d_{j-1}) packed layers, batch stride ``s_wb``; WIDTHS: (L + 1,) int32, ``d_0 … d_L``;
    P_ws, Q_ws: (B, L, D, D); SCR: scratch tiles, batch stride ``s_scr``; OUT: (B, L);
    E_OUT: (B, d_L, d_0), written when ``with_e != 0``.  X1, X2: the family's data, problem ``b``'s
    at ``X1 + b s_x1b``, ``X2 + b s_x2b`` (batch strides 0: one set shared by every problem).
    """
    b = tl.program_id(0).to(tl.int64)
    X1 = X1 + b * s_x1b
    X2 = X2 + b * s_x2b
    DD: tl.constexpr = D * D
    ws = b * L * DD
    wb = W + b * s_wb
    scr = SCR + b * s_scr
    dtype = W.dtype.element_ty
    d0 = tl.load(WIDTHS)
    d_L = tl.load(WIDTHS + L)

    # prefix chain Q_1 = I, Q_{j+1} = W_j Q_j  (0-based: Q[j+1] = W[j] Q[j], W[j] of shape (d_{j+1}, d_j))
    _put(Q_ws + ws, _eye(d0, D, dtype), D)
    off = b * 0  # int64 offset of W[j] in the packed layers
    for j in range(0, L - 1):
        rows = tl.load(WIDTHS + j + 1)
        cols = tl.load(WIDTHS + j)
        tl.debug_barrier()  # Q[j] was stored by other threads
        q = _mm(wb + off, cols, 1, Q_ws + ws + j * DD, D, 1, rows, d0, cols, D, D, BK, PREC)
        _put(Q_ws + ws + (j + 1) * DD, q, D)
        off += rows * cols
    last = off  # W[L-1]
    # suffix chain P_L = I, P_{j-1} = P_j W_j  (0-based: P[j-1] = P[j] W[j])
    _put(P_ws + ws + (L - 1) * DD, _eye(d_L, D, dtype), D)
    for jj in range(0, L - 1):
        j = L - 1 - jj
        rows = tl.load(WIDTHS + j + 1)
        cols = tl.load(WIDTHS + j)
        tl.debug_barrier()
        p = _mm(P_ws + ws + j * DD, D, 1, wb + off, cols, 1, d_L, cols, rows, D, D, BK, PREC)
        _put(P_ws + ws + (j - 1) * DD, p, D)
        off -= cols * tl.load(WIDTHS + j - 1)
    tl.debug_barrier()
    if with_e != 0:
        # E = W_L Q_L: one product on top of the prefix chain
        d_last = tl.load(WIDTHS + L - 1)
        e = _mm(wb + last, d_last, 1, Q_ws + ws + (L - 1) * DD, D, 1, d_L, d0, d_last, D, D, BK, PREC)
        _store_square(E_OUT + b * d_L * d0, e, d_L, d0, D)
    for j in range(0, L):
        dp = tl.load(WIDTHS + j + 1)
        dq = tl.load(WIDTHS + j)
        c = _small_contract(P_ws + ws + j * DD, Q_ws + ws + j * DD, scr, dp, dq, d_L, d0, n, X1, X2,
                            s_ai, s_aa, s_ab, FAMILY, D, BN, BK, PREC)
        tl.store(OUT + b * L + j, c)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _chain_small_bwd_kernel(W, s_wb, WIDTHS, P_ws, Q_ws, GRAD, GRAD_E, with_e, DW, QBAR_ws, SCR, s_scr, L, n,
                            X1, X2, s_x1b, s_x2b, s_ai, s_aa, s_ab, D: tl.constexpr, FAMILY: tl.constexpr,
                            BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """One program per problem: ``DW[b] = Σ_k GRAD[b, k] ∂c_k/∂W + ∂<GRAD_E[b], E>/∂W``, packed like ``W``.

    W, DW: (B, Σ d_j d_{j-1}) with batch stride ``s_wb``; WIDTHS: (L + 1,) int32; P_ws, Q_ws,
    QBAR_ws: (B, L, D, D); GRAD: (B, L); GRAD_E: (B, d_L, d_0), read when ``with_e != 0``;
    SCR: scratch tiles (the running chain gradient, then Dense's), batch stride ``s_scr``;
    X1, X2: the family's data, problem ``b``'s at ``X1 + b s_x1b``, ``X2 + b s_x2b``.
    """
    b = tl.program_id(0).to(tl.int64)
    X1 = X1 + b * s_x1b
    X2 = X2 + b * s_x2b
    DD: tl.constexpr = D * D
    ws = b * L * DD
    wb = W + b * s_wb
    dwb = DW + b * s_wb
    acc_ws = SCR + b * s_scr
    dtype = W.dtype.element_ty
    d0 = tl.load(WIDTHS)
    d1 = tl.load(WIDTHS + 1)
    d_L = tl.load(WIDTHS + L)

    if with_e != 0:
        # E = P[0] W[0]: ∂W[0] = P[0]ᵀ G here, and G W[0]ᵀ joins the gradient reaching P[0] at j = 0
        ge = GRAD_E + b * d_L * d0
        _store_square(dwb, _mm(P_ws + ws, 1, D, ge, d0, 1, d1, d0, d_L, D, D, BK, PREC), d1, d0, D)
        _put(acc_ws, _mm(ge, d0, 1, wb, 1, d0, d_L, d1, d0, D, D, BK, PREC), D)
        tl.debug_barrier()
    # suffix chain, j ascending: acc_ws holds the gradient reaching P[j-1], (d_L, d_j)
    off = b * 0
    for j in range(0, L):
        rows = tl.load(WIDTHS + j + 1)
        cols = tl.load(WIDTHS + j)
        Pj = P_ws + ws + j * DD
        g = tl.load(GRAD + b * L + j).to(dtype)
        p_bar, q_bar = _small_contract_grad(Pj, Q_ws + ws + j * DD, acc_ws + DD, g, rows, cols, d_L, d0, n,
                                            X1, X2, s_ai, s_aa, s_ab, FAMILY, D, BN, BK, PREC)
        _put(QBAR_ws + ws + j * DD, q_bar, D)
        if j > 0:
            # P[j-1] = P[j] W[j]: ∂W[j] = P[j]ᵀ acc, and acc flows on as acc W[j]ᵀ
            dw = _mm(Pj, 1, D, acc_ws, D, 1, rows, cols, d_L, D, D, BK, PREC)
            _store_square(dwb + off, dw, rows, cols, D)
            p_bar += _mm(acc_ws, D, 1, wb + off, 1, cols, d_L, rows, cols, D, D, BK, PREC)
        elif with_e != 0:
            p_bar += _tile(acc_ws, D)
        # every thread is done reading the old acc before it is overwritten
        tl.debug_barrier()
        _put(acc_ws, p_bar, D)
        tl.debug_barrier()
        off += rows * cols
    # prefix chain, j descending: acc_ws holds the gradient reaching Q[j+1], (d_{j+1}, d_0)
    for jj in range(0, L):
        j = L - 1 - jj
        rows = tl.load(WIDTHS + j + 1)
        cols = tl.load(WIDTHS + j)
        off -= rows * cols
        q_bar = _tile(QBAR_ws + ws + j * DD, D)
        if j < L - 1:
            # Q[j+1] = W[j] Q[j]: ∂W[j] = acc Q[j]ᵀ, and acc flows on as W[j]ᵀ acc
            dw = _mm(acc_ws, D, 1, Q_ws + ws + j * DD, 1, D, rows, cols, d0, D, D, BK, PREC)
            if (j > 0) | (with_e != 0):
                dw += _load_square(dwb + off, rows, cols, D)
            _store_square(dwb + off, dw, rows, cols, D)
            q_bar += _mm(wb + off, 1, cols, acc_ws, D, 1, cols, d0, rows, D, D, BK, PREC)
        tl.debug_barrier()
        _put(acc_ws, q_bar, D)
        tl.debug_barrier()
    if (L == 1) & (with_e == 0):
        # depth 1: the trace is a constant
        _store_square(dwb, tl.zeros([D, D], dtype=dtype), d1, d0, D)


def small_width(widths: list[int]) -> int:
    """``D``: the padded tile width, the next power of two >= 16 and >= every width."""
    # tl.dot needs every tile dimension >= 16; int(): symbolic widths under torch.compile specialize
    return max(16, triton.next_power_of_2(int(max(widths))))


@functools.lru_cache(maxsize=256)
def widths_tensor(widths: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``d_0 … d_L`` as an int32 tensor on ``device``, made once per chain shape.

    Cached: a host-to-device copy per call would cost as much as a small problem's kernel, and
    CUDA-graph capture forbids it (the eager warm-up run fills the cache first).
    """
    return torch.tensor(widths, dtype=torch.int32, device=device)


def _num_warps(D: int) -> int:
    # fp32 ieee dots are FMAs whose operands sit in registers: at most 16-32 outputs of a (D, D)
    # tile per thread (at D = 64 with 4 warps the kernels spilled; with 8 they hardly do)
    return {16: 2, 32: 2, 64: 8}.get(D, 16)


# K-chunk of the small path's products: the unrolled body of a product is D x D x BK FMAs.
# Compiled offline for sm_90 (ptxas, fp32 ieee, BK = 16, ``_num_warps``) on a loaded 2-core
# machine, forward / backward seconds: D = 64 (8 warps): Isotropic 2.2 / 2.6, Entries 4.9 / 5.5,
# RankOne 4.3 / 4.8, Dense 4.2 / 9.5, Inputs 2.5 / 7.9; D = 128 (16 warps): Isotropic 3.2 / 5.0,
# Entries 7.8 / 13.0, RankOne 6.1 / 6.9, Dense 5.2 / 15.9, Inputs 6.0 / 12.7.  (Whole-product
# dots took minutes at D = 64.)  The times do not depend on the depth or the widths: the loops
# run at run time.  Registers: at D = 64 the kernels spill at most 136 bytes a thread; at
# D = 128 (128 registers a thread at 16 warps) 100-1400 bytes, the price of (D, D) tiles held
# in registers by the family contractions.
SMALL_BK = 16


def _family_args(family: int, data: list[torch.Tensor], like: torch.Tensor):
    """``X1, X2, n, (s_x1b, s_x2b, s_ai, s_aa, s_ab)``: the family's data pointers, count, batch
    strides (0: one set for every problem) and Dense's strides.

    ``data`` as ``hessian_trace._prepare`` makes it: Entries ``[K]``, RankOne ``[U, V]`` (contiguous),
    Dense ``[Ap]`` (``A_i[a, b] = Ap[a, i, b]``), Inputs ``[M]`` (contiguous), Isotropic ``[]``; each
    with a leading ``B`` dim for per-problem sets.
    """
    if family == families.ISOTROPIC:
        return like, like, 1, (0, 0, 0, 0, 0)  # no data; any pointer fills the slot
    X1 = data[0]
    X2 = data[1] if family == families.RANK_ONE else X1
    rank = {families.ENTRIES: 2, families.RANK_ONE: 2, families.DENSE: 3, families.INPUTS: 2}[family]
    batched = X1.dim() > rank
    s1b, s2b = (X1.stride(0), X2.stride(0)) if batched else (0, 0)
    if family == families.RANK_ONE:
        return X1, X2, X1.shape[-2], (s1b, s2b, 0, 0, 0)
    if family == families.DENSE:
        return X1, X1, X1.shape[-2], (s1b, s2b, X1.stride(-2), X1.stride(-3), X1.stride(-1))
    return X1, X1, 1, (s1b, s2b, 0, 0, 0)


def _scratch(W, tiles: int, D: int):
    """``tiles`` (D, D) scratch tiles per problem and their batch stride (``W`` as a dummy for none)."""
    if tiles == 0:
        return W, 0
    return W.new_empty((W.shape[0], tiles, D, D)), tiles * D * D


def chain_small_fwd(W, widths: list[int], family: int, data: list[torch.Tensor], prec: str,
                    with_e: bool = False):
    """Launch the forward of the small path on the packed layers ``W`` (B, Σ d_j d_{j-1}).

    Returns ``(terms (B, L), P_ws, Q_ws, E)``: ``P_ws``, ``Q_ws`` (B, L, D, D) for the backward,
    ``E`` (B, d_L, d_0) when ``with_e``, else ``None``.  ``family``: a kernel code (no DENSE_KERNEL).
    """
    B, L, D = W.shape[0], len(widths) - 1, small_width(widths)
    P_ws, Q_ws = W.new_empty((B, L, D, D)), W.new_empty((B, L, D, D))
    out = W.new_empty((B, L))
    E = W.new_empty((B, widths[-1], widths[0])) if with_e else None
    X1, X2, n, strides = _family_args(family, data, W)
    scr, s_scr = _scratch(W, 2 if family == families.DENSE else 0, D)  # Dense: G_j, H_j
    wrap_triton(_chain_small_fwd_kernel)[(B,)](
        W, W.stride(0), widths_tensor(tuple(widths), W.device), P_ws, Q_ws, scr, s_scr, out,
        W if E is None else E, int(with_e), L, n, X1, X2, *strides,
        D=D, FAMILY=family, BN=16, BK=SMALL_BK, PREC=prec, num_warps=_num_warps(D),
    )
    return out, P_ws, Q_ws, E


def chain_small_bwd(W, P_ws, Q_ws, grad, grad_E, widths: list[int], family: int, data: list[torch.Tensor],
                    prec: str):
    """Launch the backward of the small path: the weight gradient packed like ``W``.

    ``grad``: (B, L) weights of the terms; ``grad_E``: (B, d_L, d_0) contiguous, or ``None``.
    """
    B, L, D = W.shape[0], len(widths) - 1, small_width(widths)
    dW, q_bar = torch.empty_like(W), torch.empty_like(P_ws)
    X1, X2, n, strides = _family_args(family, data, W)
    scr, s_scr = _scratch(W, 4 if family == families.DENSE else 1, D)  # the running gradient; Dense: G, H, scratch
    wrap_triton(_chain_small_bwd_kernel)[(B,)](
        W, W.stride(0), widths_tensor(tuple(widths), W.device), P_ws, Q_ws, grad,
        W if grad_E is None else grad_E, int(grad_E is not None), dW, q_bar, scr, s_scr, L, n, X1, X2, *strides,
        D=D, FAMILY=family, BN=16, BK=SMALL_BK, PREC=prec, num_warps=_num_warps(D),
    )
    return dW
