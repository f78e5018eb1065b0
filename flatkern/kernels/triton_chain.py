"""Triton kernels for the per-layer trace terms and their gradient.

Computes, for a chain ``W_1 … W_L`` (``W_j``: ``(..., d_j, d_{j-1})``) and a
measurement family, the per-layer contractions of MATH.md

    c_j = (1/n) Σ_i ‖P_jᵀ A_i Q_jᵀ‖_F²,     shape (..., L)

(``P_j = W_L ⋯ W_{j+1}``, ``Q_j = W_{j-1} ⋯ W_1``) and their gradient with
respect to the weights.  Both go through the Gram form: ``c_j`` depends on
``P_j`` only through ``G_j = P_j P_jᵀ`` and on ``Q_j`` only through
``H_j = Q_jᵀ Q_j``, so with ``S_j = ∂c_j/∂G_j`` and ``T_j = ∂c_j/∂H_j``

    ∂c_j/∂P_j = 2 S_j P_j          ∂c_j/∂Q_j = 2 Q_j T_j

and the weight gradient follows by reverse accumulation along both chains
(``P_{j-1} = P_j W_j``: ``∂W_j += P_jᵀ P̄acc_{j-1}``; ``Q_{j+1} = W_j Q_j``:
``∂W_j += Q̄acc_{j+1} Q_jᵀ``), about four GEMMs per layer.

Per family (``r = rowsq(P_j)``, ``s = colsq(Q_j)``, ``K = counts / n``,
``M = XᵀX / (N d_L)``, ``α_i = ‖P_jᵀu_i‖²``, ``β_i = ‖Q_j v_i‖²``):

    family      c_j                         2 S_j P_j                  2 Q_j T_j
    Isotropic   Σr · Σs                     2 Σs · P                   2 Σr · Q
    Entries     rᵀ K s                      2 (K s) ⊙rows P            2 Q ⊙cols (Kᵀ r)
    RankOne     (1/n) Σ α_i β_i             (2/n) Uᵀ diag(β) U P       (2/n) Q Vᵀ diag(α) V
    Dense       (1/n) Σ <A_i, G A_i H>      (2/n) Σ A_i H A_iᵀ P       (2/n) Q Σ A_iᵀ G A_i
    Inputs      Σr · <H, M>                 2 <H, M> · P               2 Σr · Q M

Two paths:

- small widths (every ``d_j <= SMALL_MAX_WIDTH = 32``): one program per problem of
  the batch keeps the whole chain on chip (widths zero-padded to a power of
  two ``D``), builds the prefix and suffix products, contracts them with the
  family and writes ``c_j``: one forward launch, one backward launch.  This is
  the regime where eager PyTorch is launch-bound.
- large widths: the chain products are ``torch.matmul`` (cuBLAS is the floor
  the cost model measures against) and the squared row/column norms and the
  row/column scalings of the backward are Triton reduction/epilogue kernels;
  the backward's additions are fused into ``baddbmm``.  The products are not
  yet fused with the norms (a tiled Triton GEMM with those epilogues is the
  next step; the norms are one extra read of each product).

Registration: ``flatkern::triton_layer_terms`` is a ``torch.library.triton_op``
(so ``torch.compile`` sees the kernels) with its autograd formula and a CPU
kernel that runs the plain-torch reference unless ``TRITON_INTERPRET=1``, in
which case the Triton kernels run in the interpreter (that is how CI tests
them).  Eager calls go through an ``autograd.Function`` running the same
forward and backward, skipping the custom-op dispatcher's per-call overhead.
"""

from __future__ import annotations

import math
import os
import weakref

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..measurements import Dense, Entries, Inputs, Isotropic, Measurements, RankOne
from ..reference import chain_products_ref, end_to_end_ref, layer_terms_ref

__all__ = ["unavailable_reason", "end_to_end", "layer_terms", "SMALL_MAX_WIDTH"]

# widest layer the single-program path takes.  fp32 tl.dot without tf32 is
# lowered to fully unrolled FMAs, so compile time grows as D^3 per product:
# compiled offline for sm_90 on a loaded 2-core machine, depth 3 at D = 32 took
# 12 s (Isotropic forward) to 55 s (Dense backward), the Isotropic forward at
# D = 64 two minutes, at D = 128 longer still.  Wider chains take the large path
# until the products are K-chunked through shared memory.
SMALL_MAX_WIDTH = 32

# family codes shared by the op schema and the kernels' FAMILY constexpr
_ISO, _ENTRIES, _RANKONE, _DENSE, _INPUTS = range(5)
_PATHS = {"auto": 0, "small": 1, "large": 2}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def unavailable_reason(device: torch.device) -> str | None:
    """``None`` if the Triton backend can run on ``device``, else why not."""
    device = torch.device(device)
    if device.type == "cuda":
        return None
    if device.type == "cpu" and _interpreting():
        return None
    if device.type == "cpu":
        return "Triton kernels need CUDA tensors (on CPU they run only in the interpreter, with TRITON_INTERPRET=1)"
    return f"Triton kernels run on CUDA tensors, got tensors on {device}"


# =============================================================== small path
#
# Layout: the layers of a problem are packed one after the other, row-major,
# in W (B, Σ_j d_j d_{j-1}) (one torch.cat).  Inside a program each layer is
# loaded zero-padded into a (D, D) tile, D a power of two >= every width; zero
# padding is closed under products, so P_j and Q_j come out zero-padded too
# and only loads, stores and the identities P_L = I_{d_L}, Q_1 = I_{d_0} need
# the widths.  The widths are plain int arguments d0..d12 (depth <= 12 on this
# path) picked per layer at compile time by ``_pick``.  The forward stores P_j
# and Q_j (B, L, D, D) for the backward, which walks the two chains in the
# opposite order; the backward writes the weight gradient packed like W.

MAX_SMALL_DEPTH = 12


@triton.jit
def _pick(j: tl.constexpr, d0, d1, d2, d3, d4, d5, d6, d7, d8, d9, d10, d11, d12):
    """``d_j`` for a compile-time ``j``."""
    if j == 0:
        r = d0
    elif j == 1:
        r = d1
    elif j == 2:
        r = d2
    elif j == 3:
        r = d3
    elif j == 4:
        r = d4
    elif j == 5:
        r = d5
    elif j == 6:
        r = d6
    elif j == 7:
        r = d7
    elif j == 8:
        r = d8
    elif j == 9:
        r = d9
    elif j == 10:
        r = d10
    elif j == 11:
        r = d11
    else:
        r = d12
    return r


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
def _small_contract(p, q, d_L, d_0, n, X1, X2, FAMILY: tl.constexpr, D: tl.constexpr, BN: tl.constexpr,
                    PREC: tl.constexpr):
    """``c_j`` from ``p = P_j`` (D, D; rows d_L) and ``q = Q_j`` (D, D; cols d_0)."""
    o = tl.arange(0, D)
    if FAMILY == 0:  # Isotropic: ‖P‖² ‖Q‖²
        c = tl.sum(p * p) * tl.sum(q * q)
    elif FAMILY == 1:  # Entries: rᵀ K s
        K = _load_square(X1, d_L, d_0, D)
        r = tl.sum(p * p, axis=1)
        s = tl.sum(q * q, axis=0)
        c = tl.sum(tl.sum(K * s[None, :], axis=1) * r)
    elif FAMILY == 2:  # RankOne: (1/n) Σ ‖u_iᵀ P‖² ‖v_iᵀ Qᵀ‖², BN measurements at a time
        acc = tl.zeros([BN], dtype=p.dtype)
        rows = tl.arange(0, BN)
        u_ptr = X1 + rows[:, None] * d_L + o[None, :]
        v_ptr = X2 + rows[:, None] * d_0 + o[None, :]
        for start in range(0, n, BN):
            live = (start + rows) < n
            u = tl.load(u_ptr, mask=live[:, None] & (o[None, :] < d_L), other=0.0)
            v = tl.load(v_ptr, mask=live[:, None] & (o[None, :] < d_0), other=0.0)
            up = tl.dot(u, p, input_precision=PREC)
            vq = tl.dot(v, tl.trans(q), input_precision=PREC)
            acc += tl.sum(up * up, axis=1) * tl.sum(vq * vq, axis=1)
            # advancing the pointers keeps the offsets 64-bit
            u_ptr += BN * d_L
            v_ptr += BN * d_0
        c = tl.sum(acc) / n
    elif FAMILY == 3:  # Dense: (1/n) Σ <A_i, G A_i H>, <A, G A H> = Σ (G A) ⊙ (A H)
        G = tl.dot(p, tl.trans(p), input_precision=PREC)
        H = tl.dot(tl.trans(q), q, input_precision=PREC)
        acc = tl.zeros([D, D], dtype=p.dtype)
        a_ptr = X1
        for i in range(0, n):
            a = _load_square(a_ptr, d_L, d_0, D)
            acc += tl.dot(G, a, input_precision=PREC) * tl.dot(a, H, input_precision=PREC)
            a_ptr += d_L * d_0
        c = tl.sum(acc) / n
    else:  # Inputs: ‖P‖² <QᵀQ, M> = ‖P‖² Σ Q ⊙ (Q M)
        M = _load_square(X1, d_0, d_0, D)
        c = tl.sum(p * p) * tl.sum(q * tl.dot(q, M, input_precision=PREC))
    return c


@triton.jit
def _small_contract_grad(p, q, g, d_L, d_0, n, X1, X2, FAMILY: tl.constexpr, D: tl.constexpr, BN: tl.constexpr,
                         PREC: tl.constexpr):
    """``(g ∂c_j/∂P_j, g ∂c_j/∂Q_j) = (2g S_j P_j, 2g Q_j T_j)``, both (D, D)."""
    o = tl.arange(0, D)
    if FAMILY == 0:
        p_bar = (2.0 * g * tl.sum(q * q)) * p
        q_bar = (2.0 * g * tl.sum(p * p)) * q
    elif FAMILY == 1:
        K = _load_square(X1, d_L, d_0, D)
        r = tl.sum(p * p, axis=1)
        s = tl.sum(q * q, axis=0)
        p_bar = (2.0 * g) * tl.sum(K * s[None, :], axis=1)[:, None] * p
        q_bar = (2.0 * g) * q * tl.sum(K * r[:, None], axis=0)[None, :]
    elif FAMILY == 2:
        p_bar = tl.zeros([D, D], dtype=p.dtype)
        q_bar = tl.zeros([D, D], dtype=p.dtype)
        rows = tl.arange(0, BN)
        u_ptr = X1 + rows[:, None] * d_L + o[None, :]
        v_ptr = X2 + rows[:, None] * d_0 + o[None, :]
        for start in range(0, n, BN):
            live = (start + rows) < n
            u = tl.load(u_ptr, mask=live[:, None] & (o[None, :] < d_L), other=0.0)
            v = tl.load(v_ptr, mask=live[:, None] & (o[None, :] < d_0), other=0.0)
            up = tl.dot(u, p, input_precision=PREC)
            vq = tl.dot(v, tl.trans(q), input_precision=PREC)
            alpha = tl.sum(up * up, axis=1)
            beta = tl.sum(vq * vq, axis=1)
            p_bar += tl.dot(tl.trans(u), beta[:, None] * up, input_precision=PREC)
            q_bar += tl.dot(tl.trans(alpha[:, None] * vq), v, input_precision=PREC)
            u_ptr += BN * d_L
            v_ptr += BN * d_0
        p_bar = (2.0 * g / n) * p_bar
        q_bar = (2.0 * g / n) * q_bar
    elif FAMILY == 3:
        G = tl.dot(p, tl.trans(p), input_precision=PREC)
        H = tl.dot(tl.trans(q), q, input_precision=PREC)
        S = tl.zeros([D, D], dtype=p.dtype)
        T = tl.zeros([D, D], dtype=p.dtype)
        a_ptr = X1
        for i in range(0, n):
            a = _load_square(a_ptr, d_L, d_0, D)
            S += tl.dot(tl.dot(a, H, input_precision=PREC), tl.trans(a), input_precision=PREC)
            T += tl.dot(tl.trans(a), tl.dot(G, a, input_precision=PREC), input_precision=PREC)
            a_ptr += d_L * d_0
        p_bar = (2.0 * g / n) * tl.dot(S, p, input_precision=PREC)
        q_bar = (2.0 * g / n) * tl.dot(q, T, input_precision=PREC)
    else:
        M = _load_square(X1, d_0, d_0, D)
        qm = tl.dot(q, M, input_precision=PREC)
        p_bar = (2.0 * g * tl.sum(q * qm)) * p
        q_bar = (2.0 * g * tl.sum(p * p)) * qm
    return p_bar, q_bar


@triton.jit
def _chain_small_fwd_kernel(W, s_wb, P_ws, Q_ws, OUT, n, X1, X2,
                            d0, d1, d2, d3, d4, d5, d6, d7, d8, d9, d10, d11, d12,
                            L: tl.constexpr, D: tl.constexpr, FAMILY: tl.constexpr, BN: tl.constexpr,
                            PREC: tl.constexpr):
    """One program per problem: ``OUT[b, j] = c_j``; stores ``P_j``, ``Q_j`` for the backward.

    W: (B, Σ d_j d_{j-1}) packed layers, batch stride ``s_wb``; P_ws, Q_ws: (B, L, D, D); OUT: (B, L).
    """
    b = tl.program_id(0).to(tl.int64)
    o = tl.arange(0, D)
    tile = o[:, None] * D + o[None, :]
    ws = b * L * D * D
    wb = W + b * s_wb
    dtype = W.dtype.element_ty
    d_L = _pick(L, d0, d1, d2, d3, d4, d5, d6, d7, d8, d9, d10, d11, d12)

    # prefix chain Q_1 = I, Q_{j+1} = W_j Q_j  (0-based: Q[j+1] = W[j] Q[j])
    q = _eye(d0, D, dtype)
    off = 0
    for j in tl.static_range(L):
        rows = _pick(j + 1, d0, d1, d2, d3, d4, d5, d6, d7, d8, d9, d10, d11, d12)
        cols = _pick(j, d0, d1, d2, d3, d4, d5, d6, d7, d8, d9, d10, d11, d12)
        tl.store(Q_ws + ws + j * D * D + tile, q)
        if j < L - 1:
            q = tl.dot(_load_square(wb + off, rows, cols, D), q, input_precision=PREC)
        off += rows * cols
    # suffix chain P_L = I, P_{j-1} = P_j W_j  (0-based: P[j-1] = P[j] W[j]), walking the offsets back
    p = _eye(d_L, D, dtype)
    for jj in tl.static_range(L):
        j = L - 1 - jj
        rows = _pick(j + 1, d0, d1, d2, d3, d4, d5, d6, d7, d8, d9, d10, d11, d12)
        cols = _pick(j, d0, d1, d2, d3, d4, d5, d6, d7, d8, d9, d10, d11, d12)
        off -= rows * cols
        tl.store(P_ws + ws + j * D * D + tile, p)
        if j > 0:
            p = tl.dot(p, _load_square(wb + off, rows, cols, D), input_precision=PREC)
    # the two chains run in opposite orders: make both visible to every thread
    tl.debug_barrier()
    for j in tl.static_range(L):
        p = tl.load(P_ws + ws + j * D * D + tile)
        q = tl.load(Q_ws + ws + j * D * D + tile)
        c = _small_contract(p, q, d_L, d0, n, X1, X2, FAMILY, D, BN, PREC)
        tl.store(OUT + b * L + j, c)


@triton.jit
def _chain_small_bwd_kernel(W, s_wb, P_ws, Q_ws, GRAD, DW, QBAR_ws, n, X1, X2,
                            d0, d1, d2, d3, d4, d5, d6, d7, d8, d9, d10, d11, d12,
                            L: tl.constexpr, D: tl.constexpr, FAMILY: tl.constexpr, BN: tl.constexpr,
                            PREC: tl.constexpr):
    """One program per problem: ``DW[b] = Σ_k GRAD[b, k] ∂c_k/∂W``, packed like ``W``.

    W, DW: (B, Σ d_j d_{j-1}) with batch stride ``s_wb``; P_ws, Q_ws, QBAR_ws: (B, L, D, D); GRAD: (B, L).
    """
    b = tl.program_id(0).to(tl.int64)
    o = tl.arange(0, D)
    tile = o[:, None] * D + o[None, :]
    ws = b * L * D * D
    wb = W + b * s_wb
    dwb = DW + b * s_wb
    dtype = W.dtype.element_ty
    d_L = _pick(L, d0, d1, d2, d3, d4, d5, d6, d7, d8, d9, d10, d11, d12)

    # suffix chain, j ascending: p_acc is the gradient reaching P_j
    p_acc = tl.zeros([D, D], dtype=dtype)
    off = 0
    for j in tl.static_range(L):
        rows = _pick(j + 1, d0, d1, d2, d3, d4, d5, d6, d7, d8, d9, d10, d11, d12)
        cols = _pick(j, d0, d1, d2, d3, d4, d5, d6, d7, d8, d9, d10, d11, d12)
        p = tl.load(P_ws + ws + j * D * D + tile)
        q = tl.load(Q_ws + ws + j * D * D + tile)
        g = tl.load(GRAD + b * L + j).to(dtype)
        p_bar, q_bar = _small_contract_grad(p, q, g, d_L, d0, n, X1, X2, FAMILY, D, BN, PREC)
        tl.store(QBAR_ws + ws + j * D * D + tile, q_bar)
        if j > 0:
            # P_{j-1} = P_j W_j: ∂W_j = P_jᵀ p_acc, and p_acc flows on as p_acc W_jᵀ
            _store_square(dwb + off, tl.dot(tl.trans(p), p_acc, input_precision=PREC), rows, cols, D)
            w = _load_square(wb + off, rows, cols, D)
            p_acc = tl.dot(p_acc, tl.trans(w), input_precision=PREC)
        p_acc += p_bar
        off += rows * cols
    # the prefix pass reads DW and QBAR written above by other threads
    tl.debug_barrier()
    # prefix chain, j descending: q_acc is the gradient reaching Q_j
    q_acc = tl.zeros([D, D], dtype=dtype)
    for jj in tl.static_range(L):
        j = L - 1 - jj
        rows = _pick(j + 1, d0, d1, d2, d3, d4, d5, d6, d7, d8, d9, d10, d11, d12)
        cols = _pick(j, d0, d1, d2, d3, d4, d5, d6, d7, d8, d9, d10, d11, d12)
        off -= rows * cols
        if j < L - 1:
            # Q_{j+1} = W_j Q_j: ∂W_j = q_acc Q_jᵀ, and q_acc flows on as W_jᵀ q_acc
            q = tl.load(Q_ws + ws + j * D * D + tile)
            dw = tl.dot(q_acc, tl.trans(q), input_precision=PREC)
            if j > 0:
                dw += _load_square(dwb + off, rows, cols, D)
            _store_square(dwb + off, dw, rows, cols, D)
            w = _load_square(wb + off, rows, cols, D)
            q_acc = tl.dot(tl.trans(w), q_acc, input_precision=PREC)
        q_acc += tl.load(QBAR_ws + ws + j * D * D + tile)
    if L == 1:
        # depth 1: the trace is a constant
        _store_square(dwb, tl.zeros([D, D], dtype=dtype), d1, d0, D)


def _small_width(widths: list[int]) -> int:
    # tl.dot needs every tile dimension >= 16
    return max(16, triton.next_power_of_2(max(widths)))


def _small_launch_args(family, data, like):
    """Family data pointers ``X1, X2`` and the measurement count ``n``."""
    if family == _ENTRIES:
        return data[0], data[0], 1
    if family == _RANKONE:
        return data[0], data[1], data[0].shape[0]
    if family == _DENSE:
        return data[0], data[0], data[0].shape[0]
    if family == _INPUTS:
        return data[0], data[0], 1
    return like, like, 1  # Isotropic needs no data; any pointer fills the slot


def _num_warps(D: int) -> int:
    return 2 if D <= 32 else (4 if D <= 64 else 8)


def _dims_args(widths: list[int]) -> list[int]:
    # d0..d12 of the kernels; the unused ones are never read
    return list(widths) + [0] * (MAX_SMALL_DEPTH + 1 - len(widths))


def chain_small_fwd(W, widths, family, data, prec):
    """Launch the forward of the small path on the packed layers ``W`` (B, Σ d_j d_{j-1}).

    Returns ``(terms (B, L), P_ws, Q_ws)``, the last two (B, L, D, D) for the backward.
    """
    B, L, D = W.shape[0], len(widths) - 1, _small_width(widths)
    P_ws, Q_ws = W.new_empty((B, L, D, D)), W.new_empty((B, L, D, D))
    out = W.new_empty((B, L))
    X1, X2, n = _small_launch_args(family, data, W)
    wrap_triton(_chain_small_fwd_kernel)[(B,)](
        W, W.stride(0), P_ws, Q_ws, out, n, X1, X2, *_dims_args(widths),
        L=L, D=D, FAMILY=family, BN=16, PREC=prec, num_warps=_num_warps(D),
    )
    return out, P_ws, Q_ws


def chain_small_bwd(W, P_ws, Q_ws, grad, widths, family, data, prec):
    """Launch the backward of the small path: the weight gradient packed like ``W``."""
    B, L, D = W.shape[0], len(widths) - 1, _small_width(widths)
    dW, q_bar = torch.empty_like(W), torch.empty_like(P_ws)
    X1, X2, n = _small_launch_args(family, data, W)
    wrap_triton(_chain_small_bwd_kernel)[(B,)](
        W, W.stride(0), P_ws, Q_ws, grad, dW, q_bar, n, X1, X2, *_dims_args(widths),
        L=L, D=D, FAMILY=family, BN=16, PREC=prec, num_warps=_num_warps(D),
    )
    return dW


# =============================================================== large path


@triton.jit
def _rowsq_kernel(X, OUT, M, N, s_xb, s_xm, s_xn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``OUT[b, m] = Σ_n X[b, m, n]²`` over a strided ``X``; OUT: (B, M) contiguous.

    Column norms are the row norms of ``Xᵀ``: the caller swaps the strides.
    """
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M], dtype=OUT.dtype.element_ty)
    ptr = X + b * s_xb + rows[:, None] * s_xm + cols[None, :] * s_xn
    for start in range(0, N, BLOCK_N):
        x = tl.load(ptr, mask=(rows[:, None] < M) & ((start + cols)[None, :] < N), other=0.0)
        x = x.to(OUT.dtype.element_ty)
        acc += tl.sum(x * x, axis=1)
        ptr += BLOCK_N * s_xn
    tl.store(OUT + b * M + rows, acc, mask=rows < M)


@triton.jit
def _scale_kernel(X, WR, WC, OUT, M, N, s_xb, s_xm, s_xn, s_rb, s_rm, s_cb, s_cn,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``OUT[b, m, n] = X[b, m, n] · WR[b, m] · WC[b, n]``; OUT: (B, M, N) contiguous.

    A scalar per problem is a weight vector with stride 0.
    """
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(2).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    x = tl.load(X + b * s_xb + rows[:, None] * s_xm + cols[None, :] * s_xn, mask=mask, other=0.0)
    wr = tl.load(WR + b * s_rb + rows * s_rm, mask=rows < M, other=0.0)
    wc = tl.load(WC + b * s_cb + cols * s_cn, mask=cols < N, other=0.0)
    tl.store(OUT + b * M * N + rows[:, None] * N + cols[None, :], x * wr[:, None] * wc[None, :], mask=mask)


class _TritonReductions:
    """Row/column squared norms and row/column scalings of a batch ``(B, M, N)`` by the Triton kernels."""

    def __init__(self, block: int):
        self.block = block

    def rowsq(self, X):
        B, M, N = X.shape
        out = X.new_empty((B, M))
        grid = (B, triton.cdiv(M, self.block))
        wrap_triton(_rowsq_kernel)[grid](X, out, M, N, X.stride(0), X.stride(1), X.stride(2),
                                         BLOCK_M=self.block, BLOCK_N=self.block)
        return out

    def colsq(self, X):
        return self.rowsq(X.transpose(-1, -2))

    def scale(self, X, wr=None, wc=None):
        """``X ⊙ wr[:, :, None] ⊙ wc[:, None, :]``; ``wr``: (B, M) or (B, 1); ``wc``: (B, N) or (B, 1)."""
        B, M, N = X.shape
        one = X.new_ones((B, 1))
        wr = (one if wr is None else wr).expand(B, M)
        wc = (one if wc is None else wc).expand(B, N)
        out = X.new_empty((B, M, N))
        grid = (B, triton.cdiv(M, self.block), triton.cdiv(N, self.block))
        wrap_triton(_scale_kernel)[grid](X, wr, wc, out, M, N, X.stride(0), X.stride(1), X.stride(2),
                                         wr.stride(0), wr.stride(1), wc.stride(0), wc.stride(1),
                                         BLOCK_M=self.block, BLOCK_N=self.block)
        return out


class _TorchReductions:
    """The same reductions in plain torch (the CPU registration without the interpreter)."""

    @staticmethod
    def rowsq(X):
        return X.square().sum(-1)

    @staticmethod
    def colsq(X):
        return X.square().sum(-2)

    @staticmethod
    def scale(X, wr=None, wc=None):
        if wr is not None:
            X = X * wr[:, :, None]
        if wc is not None:
            X = X * wc[:, None, :]
        return X


def _chain_products(Ws):
    """``P[0..L-1]``, ``Q[0..L-1]`` for ``Ws`` of shape (B, d_j, d_{j-1}); identities are ``None``."""
    return chain_products_ref(Ws)


def _large_terms(family, data, P, Q, d_L, d_0, like, red):
    """``c_j`` (B,) from ``P`` (B, d_L, d_j) and ``Q`` (B, d_{j-1}, d_0); ``None`` is an identity.

    ``like``: a (B, ...) tensor giving the batch size, dtype and device.
    """
    B = like.shape[0]
    if family == _ISO or family == _INPUTS:
        fp = red.rowsq(P).sum(-1) if P is not None else like.new_full((B,), float(d_L))
        if family == _ISO:
            fq = red.colsq(Q).sum(-1) if Q is not None else like.new_full((B,), float(d_0))
        else:
            M = data[0]
            fq = (Q * (Q @ M)).sum((-2, -1)) if Q is not None else torch.diagonal(M).sum().expand(B)
        return fp * fq
    if family == _ENTRIES:
        K = data[0]
        Ks = (red.colsq(Q) @ K.T) if Q is not None else K.sum(-1).expand(B, d_L)
        return (red.rowsq(P) * Ks).sum(-1) if P is not None else Ks.sum(-1)
    if family == _RANKONE:
        U, V = data[0], data[1]
        alpha = red.rowsq(U @ P) if P is not None else U.square().sum(-1).expand(B, -1)
        beta = red.rowsq(V @ Q.transpose(-1, -2)) if Q is not None else V.square().sum(-1).expand(B, -1)
        return (alpha * beta).mean(-1)
    # Dense, Gram form <A_i, G A_i H>
    A = data[0]
    GA = A if P is None else (P @ P.transpose(-1, -2)).unsqueeze(-3) @ A
    AH = A if Q is None else A @ (Q.transpose(-1, -2) @ Q).unsqueeze(-3)
    out = (GA * AH).sum((-2, -1)).mean(-1)
    return out.expand(B) if out.dim() == 0 else out


def _large_bars(family, data, P, Q, g, d_L, d_0, red, need_p, need_q):
    """``(2g S_j P_j, 2g Q_j T_j)`` (each ``None`` unless asked for); ``g``: (B,)."""
    B = g.shape[0]
    p_bar = q_bar = None
    if family == _ISO or family == _INPUTS:
        fp = red.rowsq(P).sum(-1) if P is not None else torch.full_like(g, float(d_L))
        if family == _ISO:
            fq = red.colsq(Q).sum(-1) if Q is not None else torch.full_like(g, float(d_0))
            if need_q:
                q_bar = red.scale(Q, wr=(2 * g * fp)[:, None])
        else:
            M = data[0]
            QM = (Q @ M) if Q is not None else None
            fq = (Q * QM).sum((-2, -1)) if Q is not None else torch.diagonal(M).sum().expand(B)
            if need_q:
                q_bar = red.scale(QM, wr=(2 * g * fp)[:, None])
        if need_p:
            p_bar = red.scale(P, wr=(2 * g * fq)[:, None])
    elif family == _ENTRIES:
        K = data[0]
        if need_p:
            s = red.colsq(Q) if Q is not None else torch.ones_like(g)[:, None].expand(B, d_0)
            p_bar = red.scale(P, wr=2 * g[:, None] * (s @ K.T))
        if need_q:
            r = red.rowsq(P) if P is not None else torch.ones_like(g)[:, None].expand(B, d_L)
            q_bar = red.scale(Q, wc=2 * g[:, None] * (r @ K))
    elif family == _RANKONE:
        U, V = data[0], data[1]
        n = U.shape[0]
        UP = (U @ P) if P is not None else U.expand(B, -1, -1)
        VQ = (V @ Q.transpose(-1, -2)) if Q is not None else V.expand(B, -1, -1)
        if need_p:
            p_bar = U.T @ red.scale(UP, wr=(2 / n) * g[:, None] * red.rowsq(VQ))
        if need_q:
            q_bar = red.scale(VQ, wr=(2 / n) * g[:, None] * red.rowsq(UP)).transpose(-1, -2) @ V
    else:
        A = data[0]
        if need_p:
            AH = A if Q is None else A @ (Q.transpose(-1, -2) @ Q).unsqueeze(-3)
            S = (AH @ A.transpose(-1, -2)).mean(-3)
            p_bar = 2 * g[:, None, None] * (S @ P)
        if need_q:
            GA = A if P is None else (P @ P.transpose(-1, -2)).unsqueeze(-3) @ A
            T = (A.transpose(-1, -2) @ GA).mean(-3)
            q_bar = 2 * g[:, None, None] * (Q @ T)
    return p_bar, q_bar


def _large_fwd(Ws, family, data, d_L, d_0, red):
    """``terms (B, L)`` and the products to save, from ``Ws`` (B, d_j, d_{j-1})."""
    P, Q = _chain_products(Ws)
    terms = torch.stack([_large_terms(family, data, P[j], Q[j], d_L, d_0, Ws[0], red) for j in range(len(Ws))], -1)
    return terms, P, Q


def _large_bwd(Ws, P, Q, grad, family, data, d_L, d_0, red):
    """Weight gradients (B, d_j, d_{j-1}) by reverse accumulation along both chains."""
    L = len(Ws)
    dW = [None] * L
    # suffix chain, j ascending: P[j-1] = P[j] W[j]
    p_acc = None
    q_bars = [None] * L
    for j in range(L):
        p_bar, q_bars[j] = _large_bars(family, data, P[j], Q[j], grad[:, j], d_L, d_0, red, need_p=j < L - 1, need_q=j > 0)
        if j > 0:
            dW[j] = p_acc if P[j] is None else P[j].transpose(-1, -2) @ p_acc
            if j < L - 1:
                p_acc = torch.baddbmm(p_bar, p_acc, Ws[j].transpose(-1, -2))
        elif j < L - 1:
            p_acc = p_bar
    # prefix chain, j descending: Q[j+1] = W[j] Q[j]
    q_acc = None
    for j in range(L - 1, -1, -1):
        if j < L - 1:
            if Q[j] is None:
                dW[j] = q_acc
            elif dW[j] is None:
                dW[j] = q_acc @ Q[j].transpose(-1, -2)
            else:
                dW[j] = torch.baddbmm(dW[j], q_acc, Q[j].transpose(-1, -2))
            if j > 0:
                q_acc = torch.baddbmm(q_bars[j], Ws[j].transpose(-1, -2), q_acc)
        elif j > 0:
            q_acc = q_bars[j]
    if L == 1:
        dW[0] = torch.zeros_like(Ws[0])
    return dW


# =============================================================== the op


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp32 accumulation: products of several fp16/bf16 layers overflow or lose all digits
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dot_precision(device: torch.device, dtype: torch.dtype) -> str:
    # tf32 only when the user allowed it for matmuls; never in the interpreter
    if device.type == "cuda" and dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _widths(weights) -> list[int]:
    return [weights[0].shape[-1]] + [w.shape[-2] for w in weights]


def _plan(weights, path: int) -> str:
    """``"ref"`` (CPU, no interpreter), ``"small"`` or ``"large"``."""
    if weights[0].device.type == "cpu" and not _interpreting():
        return "ref"
    if len(weights) > MAX_SMALL_DEPTH:
        return "large"
    if path == 1 and max(_widths(weights)) <= SMALL_MAX_WIDTH:
        return "small"
    if path == 2:
        return "large"
    return "small" if max(_widths(weights)) <= SMALL_MAX_WIDTH else "large"


def _flat(weights, cdtype):
    """The layers as (B, d_j, d_{j-1}) in the compute dtype (views when they can be)."""
    B = math.prod(weights[0].shape[:-2])
    return [w.reshape(B, *w.shape[-2:]).to(cdtype) for w in weights]


def _pack(weights, cdtype):
    """The layers of each problem one after the other: (B, Σ_j d_j d_{j-1}), one copy."""
    B = math.prod(weights[0].shape[:-2])
    return torch.cat([w.reshape(B, -1).to(cdtype) for w in weights], dim=1)


def _saved_shapes(weights, plan):
    """Shapes of the tensors the forward saves for the backward (also used by the fake kernel)."""
    B = math.prod(weights[0].shape[:-2])
    L = len(weights)
    d = _widths(weights)
    if plan == "small":
        D = _small_width(d)
        return [(B, L, D, D), (B, L, D, D), (B, sum(d[j + 1] * d[j] for j in range(L)))]
    if plan == "large":
        # P_{L-1} = W_L and Q_2 = W_1 are the weights themselves: not saved
        return [(B, d[L], d[j + 1]) for j in range(L - 2)] + [(B, d[j], d[0]) for j in range(2, L)]
    return []


def _measurements_from(family: int, data: list[torch.Tensor], dtype) -> Measurements:
    """Rebuild the measurement object the op's tensors encode (for the reference)."""
    if family == _ISO:
        return Isotropic()
    if family == _ENTRIES:
        K, rows, cols = data
        return Entries(rows, cols, tuple(K.shape))
    if family == _RANKONE:
        return RankOne(data[0].to(dtype), data[1].to(dtype))
    if family == _DENSE:
        return Dense(data[0].to(dtype))
    return Inputs(data[1].to(dtype))


def _forward(weights: list[torch.Tensor], family: int, data: list[torch.Tensor], path: int,
             block: int) -> list[torch.Tensor]:
    """``[terms (..., L), *saved]``: the per-layer terms and what the backward needs."""
    dtype = weights[0].dtype
    cdtype = _compute_dtype(dtype)
    batch = weights[0].shape[:-2]
    d_L, d_0 = weights[-1].shape[-2], weights[0].shape[-1]
    L = len(weights)
    plan = _plan(weights, path)
    if plan == "ref":
        # without the interpreter a CPU tensor cannot reach a Triton kernel
        return [layer_terms_ref(list(weights), _measurements_from(family, data, dtype)).to(dtype)]
    if plan == "small":
        W = _pack(weights, cdtype)
        terms, P_ws, Q_ws = chain_small_fwd(W, _widths(weights), family, data,
                                            _dot_precision(weights[0].device, cdtype))
        return [terms.reshape(*batch, L).to(dtype), P_ws, Q_ws, W]
    terms, P, Q = _large_fwd(_flat(weights, cdtype), family, data, d_L, d_0, _TritonReductions(block or 64))
    # P[L-2] = W_L and Q[1] = W_1 alias the inputs: the backward takes them from the weights
    return [terms.reshape(*batch, L).to(dtype), *P[: max(L - 2, 0)], *Q[2:]]


def _backward_impl(weights: list[torch.Tensor], family: int, data: list[torch.Tensor], saved: list[torch.Tensor],
                   grad: torch.Tensor, path: int, block: int) -> list[torch.Tensor]:
    """Gradient of ``Σ_j grad[..., j] c_j``: ``[dW packed (B, Σ d_j d_{j-1})]`` on the small path
    (fp32/fp64; the caller cuts it into layers), else one tensor per layer shaped like the weights.
    """
    dtype = weights[0].dtype
    cdtype = _compute_dtype(dtype)
    d_L, d_0 = weights[-1].shape[-2], weights[0].shape[-1]
    L = len(weights)
    plan = _plan(weights, path)
    B = math.prod(weights[0].shape[:-2])
    g = grad.reshape(B, L).to(cdtype).contiguous()
    if plan == "small":
        P_ws, Q_ws, W = saved
        return [chain_small_bwd(W, P_ws, Q_ws, g, _widths(weights), family, data,
                                _dot_precision(weights[0].device, cdtype))]
    Ws = _flat(weights, cdtype)
    if plan == "large":
        red = _TritonReductions(block or 64)
        k = max(L - 2, 0)
        P = list(saved[:k]) + ([Ws[L - 1]] if L > 1 else []) + [None]
        Q = [None] + ([Ws[0]] if L > 1 else []) + list(saved[k:])
    else:  # reference: the products were not saved
        red = _TorchReductions()
        P, Q = _chain_products(Ws)
    dW = _large_bwd(Ws, P, Q, g, family, data, d_L, d_0, red)
    return [d.reshape(w.shape).to(dtype) for d, w in zip(dW, weights)]


def _unpack_grads(dW, weights):
    """Per-layer views of the small path's packed gradient (copies only to change dtype)."""
    grads, off = [], 0
    for w in weights:
        size = w.shape[-2] * w.shape[-1]
        grads.append(dW[:, off: off + size].view(w.shape).to(w.dtype))
        off += size
    return grads


# ---- registration: torch.compile traces this op (and its Triton kernels)

_layer_terms_op = triton_op("flatkern::triton_layer_terms", mutates_args=())(_forward)


@_layer_terms_op.register_kernel("cpu")
def _forward_cpu(weights, family, data, path, block):
    """CPU tensors: the Triton interpreter with ``TRITON_INTERPRET=1``, else the plain-torch reference."""
    return _forward(weights, family, data, path, block)


@_layer_terms_op.register_fake
def _forward_fake(weights, family, data, path, block):
    cdtype = _compute_dtype(weights[0].dtype)
    terms = weights[0].new_empty((*weights[0].shape[:-2], len(weights)))
    return [terms] + [weights[0].new_empty(s, dtype=cdtype) for s in _saved_shapes(weights, _plan(weights, path))]


_layer_terms_backward_op = triton_op("flatkern::triton_layer_terms_backward", mutates_args=())(_backward_impl)


@_layer_terms_backward_op.register_fake
def _backward_fake(weights, family, data, saved, grad, path, block):
    if _plan(weights, path) == "small":
        B = math.prod(weights[0].shape[:-2])
        return [saved[2].new_empty((B, saved[2].shape[1]))]
    return [torch.empty_like(w) for w in weights]


def _setup_context(ctx, inputs, output):
    weights, family, data, path, block = inputs
    ctx.family, ctx.path, ctx.block = family, path, block
    ctx.num_weights, ctx.num_data = len(weights), len(data)
    ctx.save_for_backward(*weights, *data, *output[1:])


def _op_backward(ctx, grads):
    saved = ctx.saved_tensors
    weights = list(saved[: ctx.num_weights])
    data = list(saved[ctx.num_weights: ctx.num_weights + ctx.num_data])
    products = list(saved[ctx.num_weights + ctx.num_data:])
    grad = grads[0] if grads[0] is not None else weights[0].new_zeros((*weights[0].shape[:-2], len(weights)))
    dW = torch.ops.flatkern.triton_layer_terms_backward(weights, ctx.family, data, products, grad,
                                                        ctx.path, ctx.block)
    if _plan(weights, ctx.path) == "small":
        dW = _unpack_grads(dW[0], weights)
    return list(dW), None, [None] * ctx.num_data, None, None


_layer_terms_op.register_autograd(_op_backward, setup_context=_setup_context)


# ---- eager: the same forward and backward through an autograd.Function
#
# The dispatcher and autograd wrapper of a Python custom op cost tens of
# microseconds per call, which is the whole budget of a small problem; eager
# calls skip them, compiled graphs use the registered op.


class _LayerTerms(torch.autograd.Function):
    @staticmethod
    def forward(ctx, family, path, block, num_weights, *tensors):
        weights, data = list(tensors[:num_weights]), list(tensors[num_weights:])
        out = _forward(weights, family, data, path, block)
        ctx.args = (family, path, block, num_weights)
        ctx.save_for_backward(*tensors, *out[1:])
        ctx.mark_non_differentiable(*out[1:])
        # no zero-filled gradients for the saved products: they would be launches and memory for nothing
        ctx.set_materialize_grads(False)
        return tuple(out)

    @staticmethod
    def backward(ctx, grad, *unused):
        family, path, block, num_weights = ctx.args
        saved = ctx.saved_tensors
        num_inputs = len(saved) - len(unused)
        weights, data, products = list(saved[:num_weights]), list(saved[num_weights:num_inputs]), list(saved[num_inputs:])
        if grad is None:
            return (None,) * (4 + len(saved) - len(unused))
        dW = _backward_impl(weights, family, data, products, grad, path, block)
        if _plan(weights, path) == "small":
            dW = _unpack_grads(dW[0], weights)
        return (None, None, None, None, *dW, *([None] * len(data)))


# =============================================================== entry points

# Entries -> dense count matrix K = counts / n, cached per measurement object
_entries_cache: "weakref.WeakKeyDictionary[Entries, tuple]" = weakref.WeakKeyDictionary()


def _entries_kernel(m: Entries, dtype, device) -> torch.Tensor:
    key = (m.rows.data_ptr(), m.rows._version, m.cols.data_ptr(), m.cols._version, dtype, device)
    hit = _entries_cache.get(m)
    if hit is not None and hit[0] == key:
        return hit[1]
    d_L, d_0 = m.shape
    counts = torch.bincount((m.rows * d_0 + m.cols).to(device), minlength=d_L * d_0)
    K = (counts.to(dtype) / m.n).reshape(d_L, d_0)
    _entries_cache[m] = (key, K)
    return K


# Python-side preparation (and its cache) stays out of torch.compile graphs
@torch.compiler.disable
def _family_data(measurements: Measurements, d_L: int, d_0: int, like: torch.Tensor) -> tuple[int, list]:
    """The op's encoding of a measurement family: a code and its tensors in the compute dtype."""
    cdtype, device = _compute_dtype(like.dtype), like.device
    if isinstance(measurements, Isotropic):
        return _ISO, []
    if isinstance(measurements, Entries):
        return _ENTRIES, [_entries_kernel(measurements, cdtype, device), measurements.rows, measurements.cols]
    if isinstance(measurements, RankOne):
        return _RANKONE, [measurements.u.to(cdtype).contiguous(), measurements.v.to(cdtype).contiguous()]
    if isinstance(measurements, Dense):
        return _DENSE, [measurements.A.to(cdtype).contiguous()]
    if isinstance(measurements, Inputs):
        x = measurements.x.to(cdtype)
        M = (x.T @ x) / (x.shape[0] * d_L)
        return _INPUTS, [M.contiguous(), x]
    raise TypeError(f"the triton backend has no kernel for measurements of type {type(measurements).__name__}")


def layer_terms(weights: list[torch.Tensor], measurements: Measurements, *, path: str = "auto",
                block: int | None = None) -> torch.Tensor:
    """Per-layer contractions ``c_j = (1/n) Σ_i ‖P_jᵀ A_i Q_jᵀ‖_F²`` by the Triton kernels.

    Args:
        weights: ``[W_1, ..., W_L]``, ``W_j`` of shape ``(..., d_j, d_{j-1})`` (validated by the caller).
        measurements: any family of ``flatkern.measurements``.
        path: ``"auto"`` (single-program kernels when every width is at most
            ``SMALL_MAX_WIDTH`` and the depth at most ``MAX_SMALL_DEPTH``, else
            tiled), ``"small"`` (an error when the chain does not fit) or ``"large"``.
        block: tile size of the large path's kernels (default 64); tests use
            small tiles so that several are exercised.

    Returns:
        ``(..., L)`` in the weights' dtype, differentiable with respect to the weights.
    """
    if path not in _PATHS:
        raise ValueError(f"path must be one of {tuple(_PATHS)}, got {path!r}")
    if block is not None and (block < 16 or block & (block - 1)):
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    if path == "small" and (max(_widths(weights)) > SMALL_MAX_WIDTH or len(weights) > MAX_SMALL_DEPTH):
        raise ValueError(
            f'path="small" needs every width <= {SMALL_MAX_WIDTH} and depth <= {MAX_SMALL_DEPTH}, '
            f"got widths {_widths(weights)} (depth {len(weights)})"
        )
    d_L, d_0 = weights[-1].shape[-2], weights[0].shape[-1]
    family, data = _family_data(measurements, d_L, d_0, weights[0])
    weights = list(weights)
    if torch.compiler.is_compiling():
        return torch.ops.flatkern.triton_layer_terms(weights, family, data, _PATHS[path], block or 0)[0]
    return _LayerTerms.apply(family, _PATHS[path], block or 0, len(weights), *weights, *data)[0]


def end_to_end(weights: list[torch.Tensor]) -> torch.Tensor:
    """``E = W_L ⋯ W_1``, shape ``(..., d_L, d_0)``: the chain of cuBLAS matmuls.

    The Triton backend has no kernel of its own for ``E``: it runs the
    plain-torch chain (cuBLAS on CUDA), differentiable, so that ``mse_loss``
    with ``backend="triton"`` or ``"auto"`` on CUDA works without a fallback warning.
    """
    return end_to_end_ref(weights)


def layer_terms_and_end_to_end(weights: list[torch.Tensor], measurements: Measurements):
    """``(layer_terms(weights, measurements), end_to_end(weights))`` for ``flatkern.objective``.

    Not fused yet: the two run separately, each forming the prefix chain.
    """
    return layer_terms(weights, measurements), end_to_end(weights)
