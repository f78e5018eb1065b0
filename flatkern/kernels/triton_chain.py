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

- small widths (every ``d_j <= SMALL_MAX_WIDTH = 128``, depth ``<= 12``): one
  program per problem of the batch holds its chain in a per-problem workspace
  of zero-padded ``(D, D)`` tiles (``D`` the next power of two >= 16), builds the
  prefix and suffix products, contracts them with the family and writes
  ``c_j``: one forward launch; one backward launch does the reverse
  accumulation.  Every product is a run-time loop over K-chunks of
  ``SMALL_BK`` (fp32 ``tl.dot`` without tf32 is unrolled into FMAs, so a whole
  ``D x D x D`` product would compile for minutes); the layer loops are run-time
  too, so a kernel is compiled once per ``(D, family)``, whatever the depth.
  This is the regime where eager PyTorch is launch-bound.
- large widths: the chain products are a tiled Triton GEMM
  (``_mm_norms_kernel``) whose epilogue reduces each output tile to the
  squared row norms of ``P_j`` (Entries, Isotropic, Inputs) and column norms
  of ``Q_j`` (Entries, Isotropic), or to the row norms of ``U P_j``, ``V Q_jᵀ``
  (RankOne, ``α``, ``β``); Dense's Grams ``P_j P_jᵀ``, ``Q_jᵀ Q_j`` are the same GEMM.  The
  norms are saved for the backward, so no product is read back only to be
  reduced.  The backward's reverse accumulation stays on ``torch.matmul`` /
  ``baddbmm`` (its additions fused into cuBLAS), with the row/column scalings
  in a Triton epilogue kernel.

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
from ..reference import chain_products_ref, end_to_end_ref, layer_terms_ref, scaled_terms

__all__ = ["unavailable_reason", "end_to_end", "layer_terms", "SMALL_MAX_WIDTH"]

# widest layer the single-program path takes (compile times: see SMALL_BK)
SMALL_MAX_WIDTH = 128

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
# in W (B, Σ_j d_j d_{j-1}) (one torch.cat).  Every chain product lives in a
# per-problem workspace of zero-padded (D, D) tiles, D a power of two >= every
# width: P_ws, Q_ws (B, L, D, D), which the forward also hands to the backward,
# and a few scratch tiles SCR (the backward's running gradient, Dense's Grams).
# Zero padding is closed under products, so only loads from the unpadded
# inputs (layers, measurements) and the identities P_L = I_{d_L}, Q_1 = I_{d_0}
# need the widths.  A program touches only its own problem's workspace, so it
# stays in L1/L2; tl.debug_barrier() (__syncthreads) orders the tile stores of
# one step before the loads of the next.
#
# Compile time is what bounds D.  fp32 tl.dot without tf32 is lowered to fully
# unrolled FMAs, so a product held in registers costs D^3 instructions (D = 64
# took minutes to compile).  Here every product is ``_mm``: a run-time loop over
# K-chunks of BK read from memory, so only a D x D x BK body is unrolled.  The
# layer loops and the widths are run-time values too (d0..d12 are plain ints,
# ``_pick`` selects one), so a kernel is compiled once per (D, family) and its
# size does not grow with the depth.

MAX_SMALL_DEPTH = 12
# the widths, depth and measurement count are run-time values: specializing them
# (== 1, divisible by 16) would compile the same kernel again for each pattern
_RUNTIME_INTS = ["L", "n"] + [f"d{i}" for i in range(MAX_SMALL_DEPTH + 1)]


@triton.jit
def _pick(j, d0, d1, d2, d3, d4, d5, d6, d7, d8, d9, d10, d11, d12):
    """``d_j`` for a run-time ``j`` (selects, no memory access)."""
    r = tl.where(j == 1, d1, d0)
    r = tl.where(j == 2, d2, r)
    r = tl.where(j == 3, d3, r)
    r = tl.where(j == 4, d4, r)
    r = tl.where(j == 5, d5, r)
    r = tl.where(j == 6, d6, r)
    r = tl.where(j == 7, d7, r)
    r = tl.where(j == 8, d8, r)
    r = tl.where(j == 9, d9, r)
    r = tl.where(j == 10, d10, r)
    r = tl.where(j == 11, d11, r)
    r = tl.where(j == 12, d12, r)
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
def _small_contract(Pj, Qj, SCR, dp, dq, d_L, d_0, n, X1, X2, FAMILY: tl.constexpr, D: tl.constexpr,
                    BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """``c_j`` from the workspace tiles ``Pj = P_j`` (d_L, dp) and ``Qj = Q_j`` (dq, d_0).

    Dense uses two scratch tiles at ``SCR`` for its Grams.
    """
    if FAMILY == 0:  # Isotropic: ‖P‖² ‖Q‖²
        p = _tile(Pj, D)
        q = _tile(Qj, D)
        c = tl.sum(p * p) * tl.sum(q * q)
    elif FAMILY == 1:  # Entries: rᵀ K s
        p = _tile(Pj, D)
        q = _tile(Qj, D)
        K = _load_square(X1, d_L, d_0, D)
        r = tl.sum(p * p, axis=1)
        s = tl.sum(q * q, axis=0)
        c = tl.sum(tl.sum(K * s[None, :], axis=1) * r)
    elif FAMILY == 2:  # RankOne: (1/n) Σ ‖u_iᵀ P‖² ‖v_iᵀ Qᵀ‖², BN measurements at a time
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
    elif FAMILY == 3:  # Dense: (1/n) Σ <A_i, G A_i H>, <A, G A H> = Σ (G A) ⊙ (A H)
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
            ga = _mm(G_ws, D, 1, a_ptr, d_0, 1, d_L, d_0, d_L, D, D, BK, PREC)
            ah = _mm(a_ptr, d_0, 1, H_ws, D, 1, d_L, d_0, d_0, D, D, BK, PREC)
            acc += ga * ah
            a_ptr += d_L * d_0
        c = tl.sum(acc) / n
    else:  # Inputs: ‖P‖² <QᵀQ, M> = ‖P‖² Σ Q ⊙ (Q M)
        p = _tile(Pj, D)
        q = _tile(Qj, D)
        qm = _mm(Qj, D, 1, X1, d_0, 1, dq, d_0, d_0, D, D, BK, PREC)
        c = tl.sum(p * p) * tl.sum(q * qm)
    return c


@triton.jit
def _small_contract_grad(Pj, Qj, SCR, g, dp, dq, d_L, d_0, n, X1, X2, FAMILY: tl.constexpr, D: tl.constexpr,
                         BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """``(g ∂c_j/∂P_j, g ∂c_j/∂Q_j) = (2g S_j P_j, 2g Q_j T_j)``, both (D, D) tiles.

    Dense uses four scratch tiles at ``SCR``.
    """
    o = tl.arange(0, D)
    if FAMILY == 0:
        p = _tile(Pj, D)
        q = _tile(Qj, D)
        p_bar = (2.0 * g * tl.sum(q * q)) * p
        q_bar = (2.0 * g * tl.sum(p * p)) * q
    elif FAMILY == 1:
        p = _tile(Pj, D)
        q = _tile(Qj, D)
        K = _load_square(X1, d_L, d_0, D)
        r = tl.sum(p * p, axis=1)
        s = tl.sum(q * q, axis=0)
        p_bar = (2.0 * g) * tl.sum(K * s[None, :], axis=1)[:, None] * p
        q_bar = (2.0 * g) * q * tl.sum(K * r[:, None], axis=0)[None, :]
    elif FAMILY == 2:
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
    elif FAMILY == 3:
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
            _put(X_ws, _mm(a_ptr, d_0, 1, H_ws, D, 1, d_L, d_0, d_0, D, D, BK, PREC), D)  # A_i H
            tl.debug_barrier()
            S += _mm(X_ws, D, 1, a_ptr, 1, d_0, d_L, d_L, d_0, D, D, BK, PREC)  # (A_i H) A_iᵀ
            a_ptr += d_L * d_0
        tl.debug_barrier()
        _put(X_ws, S, D)
        tl.debug_barrier()
        p_bar = (2.0 * g / n) * _mm(X_ws, D, 1, Pj, D, 1, d_L, dp, d_L, D, D, BK, PREC)
        T = tl.zeros([D, D], dtype=X1.dtype.element_ty)
        a_ptr = X1
        for i in range(0, n):
            tl.debug_barrier()
            _put(X_ws, _mm(G_ws, D, 1, a_ptr, d_0, 1, d_L, d_0, d_L, D, D, BK, PREC), D)  # G A_i
            tl.debug_barrier()
            T += _mm(a_ptr, 1, d_0, X_ws, D, 1, d_0, d_0, d_L, D, D, BK, PREC)  # A_iᵀ (G A_i)
            a_ptr += d_L * d_0
        tl.debug_barrier()
        _put(X_ws, T, D)
        tl.debug_barrier()
        q_bar = (2.0 * g / n) * _mm(Qj, D, 1, X_ws, D, 1, dq, d_0, d_0, D, D, BK, PREC)
    else:
        p = _tile(Pj, D)
        q = _tile(Qj, D)
        qm = _mm(Qj, D, 1, X1, d_0, 1, dq, d_0, d_0, D, D, BK, PREC)
        p_bar = (2.0 * g * tl.sum(q * qm)) * p
        q_bar = (2.0 * g * tl.sum(p * p)) * qm
    return p_bar, q_bar


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _chain_small_fwd_kernel(W, s_wb, P_ws, Q_ws, SCR, s_scr, OUT, L, n, X1, X2,
                            d0, d1, d2, d3, d4, d5, d6, d7, d8, d9, d10, d11, d12,
                            D: tl.constexpr, FAMILY: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                            PREC: tl.constexpr):
    """One program per problem: ``OUT[b, j] = c_j``; stores ``P_j``, ``Q_j`` for the backward.

    W: (B, Σ d_j d_{j-1}) packed layers, batch stride ``s_wb``; P_ws, Q_ws: (B, L, D, D);
    SCR: scratch tiles, batch stride ``s_scr``; OUT: (B, L).
    """
    b = tl.program_id(0).to(tl.int64)
    DD: tl.constexpr = D * D
    ws = b * L * DD
    wb = W + b * s_wb
    scr = SCR + b * s_scr
    dtype = W.dtype.element_ty
    d_L = _pick(L, d0, d1, d2, d3, d4, d5, d6, d7, d8, d9, d10, d11, d12)

    # prefix chain Q_1 = I, Q_{j+1} = W_j Q_j  (0-based: Q[j+1] = W[j] Q[j], W[j] of shape (d_{j+1}, d_j))
    _put(Q_ws + ws, _eye(d0, D, dtype), D)
    off = b * 0  # int64 offset of W[j] in the packed layers
    for j in range(0, L - 1):
        rows = _pick(j + 1, d0, d1, d2, d3, d4, d5, d6, d7, d8, d9, d10, d11, d12)
        cols = _pick(j, d0, d1, d2, d3, d4, d5, d6, d7, d8, d9, d10, d11, d12)
        tl.debug_barrier()  # Q[j] was stored by other threads
        q = _mm(wb + off, cols, 1, Q_ws + ws + j * DD, D, 1, rows, d0, cols, D, D, BK, PREC)
        _put(Q_ws + ws + (j + 1) * DD, q, D)
        off += rows * cols
    # suffix chain P_L = I, P_{j-1} = P_j W_j  (0-based: P[j-1] = P[j] W[j]); off is W[L-1]'s now
    _put(P_ws + ws + (L - 1) * DD, _eye(d_L, D, dtype), D)
    for jj in range(0, L - 1):
        j = L - 1 - jj
        rows = _pick(j + 1, d0, d1, d2, d3, d4, d5, d6, d7, d8, d9, d10, d11, d12)
        cols = _pick(j, d0, d1, d2, d3, d4, d5, d6, d7, d8, d9, d10, d11, d12)
        tl.debug_barrier()
        p = _mm(P_ws + ws + j * DD, D, 1, wb + off, cols, 1, d_L, cols, rows, D, D, BK, PREC)
        _put(P_ws + ws + (j - 1) * DD, p, D)
        off -= cols * _pick(j - 1, d0, d1, d2, d3, d4, d5, d6, d7, d8, d9, d10, d11, d12)
    tl.debug_barrier()
    for j in range(0, L):
        dp = _pick(j + 1, d0, d1, d2, d3, d4, d5, d6, d7, d8, d9, d10, d11, d12)
        dq = _pick(j, d0, d1, d2, d3, d4, d5, d6, d7, d8, d9, d10, d11, d12)
        c = _small_contract(P_ws + ws + j * DD, Q_ws + ws + j * DD, scr, dp, dq, d_L, d0, n, X1, X2,
                            FAMILY, D, BN, BK, PREC)
        tl.store(OUT + b * L + j, c)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _chain_small_bwd_kernel(W, s_wb, P_ws, Q_ws, GRAD, DW, QBAR_ws, SCR, s_scr, L, n, X1, X2,
                            d0, d1, d2, d3, d4, d5, d6, d7, d8, d9, d10, d11, d12,
                            D: tl.constexpr, FAMILY: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                            PREC: tl.constexpr):
    """One program per problem: ``DW[b] = Σ_k GRAD[b, k] ∂c_k/∂W``, packed like ``W``.

    W, DW: (B, Σ d_j d_{j-1}) with batch stride ``s_wb``; P_ws, Q_ws, QBAR_ws: (B, L, D, D);
    GRAD: (B, L); SCR: scratch tiles (the running chain gradient, then Dense's), batch stride ``s_scr``.
    """
    b = tl.program_id(0).to(tl.int64)
    DD: tl.constexpr = D * D
    ws = b * L * DD
    wb = W + b * s_wb
    dwb = DW + b * s_wb
    acc_ws = SCR + b * s_scr
    dtype = W.dtype.element_ty
    d_L = _pick(L, d0, d1, d2, d3, d4, d5, d6, d7, d8, d9, d10, d11, d12)

    # suffix chain, j ascending: acc_ws holds the gradient reaching P[j-1], (d_L, d_j)
    off = b * 0
    for j in range(0, L):
        rows = _pick(j + 1, d0, d1, d2, d3, d4, d5, d6, d7, d8, d9, d10, d11, d12)
        cols = _pick(j, d0, d1, d2, d3, d4, d5, d6, d7, d8, d9, d10, d11, d12)
        Pj = P_ws + ws + j * DD
        g = tl.load(GRAD + b * L + j).to(dtype)
        p_bar, q_bar = _small_contract_grad(Pj, Q_ws + ws + j * DD, acc_ws + DD, g, rows, cols, d_L, d0, n,
                                            X1, X2, FAMILY, D, BN, BK, PREC)
        _put(QBAR_ws + ws + j * DD, q_bar, D)
        if j > 0:
            # P[j-1] = P[j] W[j]: ∂W[j] = P[j]ᵀ acc, and acc flows on as acc W[j]ᵀ
            dw = _mm(Pj, 1, D, acc_ws, D, 1, rows, cols, d_L, D, D, BK, PREC)
            _store_square(dwb + off, dw, rows, cols, D)
            p_bar += _mm(acc_ws, D, 1, wb + off, 1, cols, d_L, rows, cols, D, D, BK, PREC)
        # every thread is done reading the old acc before it is overwritten
        tl.debug_barrier()
        _put(acc_ws, p_bar, D)
        tl.debug_barrier()
        off += rows * cols
    # prefix chain, j descending: acc_ws holds the gradient reaching Q[j+1], (d_{j+1}, d_0)
    for jj in range(0, L):
        j = L - 1 - jj
        rows = _pick(j + 1, d0, d1, d2, d3, d4, d5, d6, d7, d8, d9, d10, d11, d12)
        cols = _pick(j, d0, d1, d2, d3, d4, d5, d6, d7, d8, d9, d10, d11, d12)
        off -= rows * cols
        q_bar = _tile(QBAR_ws + ws + j * DD, D)
        if j < L - 1:
            # Q[j+1] = W[j] Q[j]: ∂W[j] = acc Q[j]ᵀ, and acc flows on as W[j]ᵀ acc
            dw = _mm(acc_ws, D, 1, Q_ws + ws + j * DD, 1, D, rows, cols, d0, D, D, BK, PREC)
            if j > 0:
                dw += _load_square(dwb + off, rows, cols, D)
            _store_square(dwb + off, dw, rows, cols, D)
            q_bar += _mm(wb + off, 1, cols, acc_ws, D, 1, cols, d0, rows, D, D, BK, PREC)
        tl.debug_barrier()
        _put(acc_ws, q_bar, D)
        tl.debug_barrier()
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


def _dims_args(widths: list[int]) -> list[int]:
    # d0..d12 of the kernels; the unused ones are never selected
    return list(widths) + [0] * (MAX_SMALL_DEPTH + 1 - len(widths))


def _scratch(W, tiles: int, D: int):
    """``tiles`` (D, D) scratch tiles per problem and their batch stride (a 1-element dummy for none)."""
    if tiles == 0:
        return W, 0
    return W.new_empty((W.shape[0], tiles, D, D)), tiles * D * D


def chain_small_fwd(W, widths, family, data, prec):
    """Launch the forward of the small path on the packed layers ``W`` (B, Σ d_j d_{j-1}).

    Returns ``(terms (B, L), P_ws, Q_ws)``, the last two (B, L, D, D) for the backward.
    """
    B, L, D = W.shape[0], len(widths) - 1, _small_width(widths)
    P_ws, Q_ws = W.new_empty((B, L, D, D)), W.new_empty((B, L, D, D))
    out = W.new_empty((B, L))
    X1, X2, n = _small_launch_args(family, data, W)
    scr, s_scr = _scratch(W, 2 if family == _DENSE else 0, D)  # Dense: G_j, H_j
    wrap_triton(_chain_small_fwd_kernel)[(B,)](
        W, W.stride(0), P_ws, Q_ws, scr, s_scr, out, L, n, X1, X2, *_dims_args(widths),
        D=D, FAMILY=family, BN=16, BK=SMALL_BK, PREC=prec, num_warps=_num_warps(D),
    )
    return out, P_ws, Q_ws


def chain_small_bwd(W, P_ws, Q_ws, grad, widths, family, data, prec):
    """Launch the backward of the small path: the weight gradient packed like ``W``."""
    B, L, D = W.shape[0], len(widths) - 1, _small_width(widths)
    dW, q_bar = torch.empty_like(W), torch.empty_like(P_ws)
    X1, X2, n = _small_launch_args(family, data, W)
    scr, s_scr = _scratch(W, 4 if family == _DENSE else 1, D)  # the running gradient; Dense: G, H, scratch
    wrap_triton(_chain_small_bwd_kernel)[(B,)](
        W, W.stride(0), P_ws, Q_ws, grad, dW, q_bar, scr, s_scr, L, n, X1, X2, *_dims_args(widths),
        D=D, FAMILY=family, BN=16, BK=SMALL_BK, PREC=prec, num_warps=_num_warps(D),
    )
    return dW


# =============================================================== large path
#
# The chain products are tiled Triton GEMMs (``_mm_norms_kernel``) whose
# epilogue also reduces the output tile to the squared row and/or column norms
# the family needs (``rowsq(P_j)``, ``colsq(Q_j)``, ``‖U P_j‖`` row norms), so no
# product is read back only to be reduced; the forward saves those norms for the
# backward.  The backward's reverse accumulation stays on ``torch.matmul`` /
# ``baddbmm`` (its additions fused into cuBLAS), with the row/column scalings in
# ``_scale_kernel``.


@triton.jit
def _mm_norms_kernel(A, B, C, RSQ, CSQ, M, N, K, s_ab, s_am, s_ak, s_bb, s_bk, s_bn,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                     STORE_C: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, PREC: tl.constexpr):
    """``C[b] = A[b] @ B[b]`` and, in the epilogue, the squared norms of its rows and columns.

    A: (B, M, K), B: (B, K, N), strided (batch stride 0 broadcasts one matrix); C: (B, M, N) contiguous.
    RSQ: (B, ⌈N/BLOCK_N⌉, M), ``RSQ[b, t, m] = Σ_{n in column tile t} C[b, m, n]²``; CSQ: (B, ⌈M/BLOCK_M⌉, N)
    likewise per row tile.  Per-tile partials, summed by the launcher, rather than atomics: the sums
    come out the same on every run.
    """
    b = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # grouped order: GROUP_M row tiles in a row reuse the same column tiles of B from L2
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    tm = first_m + (pid % group) % size_m
    tn = (pid % group) // size_m
    rm = tm.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tn.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptr = A + b * s_ab + rm[:, None] * s_am + rk[None, :] * s_ak
    b_ptr = B + b * s_bb + rk[:, None] * s_bk + rn[None, :] * s_bn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=A.dtype.element_ty)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptr, mask=(rm[:, None] < M) & ((k0 + rk)[None, :] < K), other=0.0)
        bk = tl.load(b_ptr, mask=((k0 + rk)[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(a, bk, acc, input_precision=PREC)
        a_ptr += BLOCK_K * s_ak
        b_ptr += BLOCK_K * s_bk
    # masked loads leave zeros outside (M, N): they add nothing to the norms
    if STORE_C:
        tl.store(C + b * M * N + rm[:, None] * N + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))
    if ROWS:
        tl.store(RSQ + (b * num_n + tn) * M + rm, tl.sum(acc * acc, axis=1), mask=rm < M)
    if COLS:
        tl.store(CSQ + (b * num_m + tm) * N + rn, tl.sum(acc * acc, axis=0), mask=rn < N)


@triton.jit
def _rowsq_kernel(X, OUT, M, N, s_xb, s_xm, s_xn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``OUT[b, m] = Σ_n X[b, m, n]²`` over a strided ``X``; OUT: (B, M) contiguous.

    For the norms of matrices that are no product (the weights ``W_L``, ``W_1``, and the
    products the reference plan forms).  Column norms are the row norms of ``Xᵀ``: the caller
    swaps the strides.
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


def _gemm_config(block: int | None, dtype: torch.dtype) -> dict:
    """Tile sizes of ``_mm_norms_kernel``: ``block`` (tests: several small tiles) or a fixed default."""
    if block:
        return dict(BLOCK_M=block, BLOCK_N=block, BLOCK_K=min(block, 32), GROUP_M=8, num_warps=4, num_stages=2)
    if dtype == torch.float64:
        # fp64 tiles take twice the registers
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, GROUP_M=8, num_warps=4, num_stages=2)
    # the matmul tutorial's Hopper fp32 shape; not autotuned: a fixed config compiles once
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)


class _TritonReductions:
    """Products with norm epilogues, squared norms and row/column scalings of batches ``(B, M, N)``."""

    def __init__(self, block: int | None, prec: str = "ieee"):
        self.block = block or 64
        self.gemm_block = block
        self.prec = prec

    def mm(self, a, b, rows=False, cols=False, store=True):
        """``(a @ b, rowsq(a @ b), colsq(a @ b))``, each ``None`` unless asked for.

        a: (B, M, K) or (M, K) (shared by the batch), b: (B, K, N); out (B, M, N), (B, M), (B, N).
        """
        if a.dim() == 2:
            a = a.unsqueeze(0)
        B = max(a.shape[0], b.shape[0])
        a, b = a.expand(B, -1, -1), b.expand(B, -1, -1)  # a shared matrix: batch stride 0
        M, K, N = a.shape[1], a.shape[2], b.shape[2]
        cfg = _gemm_config(self.gemm_block, a.dtype)
        num_m, num_n = triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"])
        c = a.new_empty((B, M, N)) if store else a
        rsq = a.new_empty((B, num_n, M)) if rows else a
        csq = a.new_empty((B, num_m, N)) if cols else a
        wrap_triton(_mm_norms_kernel)[(B, num_m * num_n)](
            a, b, c, rsq, csq, M, N, K, a.stride(0), a.stride(1), a.stride(2), b.stride(0), b.stride(1), b.stride(2),
            STORE_C=store, ROWS=rows, COLS=cols, PREC=self.prec, **cfg,
        )
        return (c if store else None,
                (rsq[:, 0] if num_n == 1 else rsq.sum(1)) if rows else None,
                (csq[:, 0] if num_m == 1 else csq.sum(1)) if cols else None)

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
    """The same operations in plain torch (the CPU registration without the interpreter)."""

    @staticmethod
    def mm(a, b, rows=False, cols=False, store=True):
        c = a @ b
        return (c if store else None, c.square().sum(-1) if rows else None, c.square().sum(-2) if cols else None)

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


def _norms_needed(family: int) -> tuple[bool, bool]:
    """Whether the family reads ``rowsq(P_j)`` and ``colsq(Q_j)`` (Isotropic and Inputs: their sums)."""
    return family in (_ISO, _ENTRIES, _INPUTS), family in (_ISO, _ENTRIES)


def _large_chain(Ws, family, red):
    """``P``, ``Q`` (lists as ``_chain_products``) and the norms ``rp[j] = rowsq(P_j)`` (B, d_L),
    ``cq[j] = colsq(Q_j)`` (B, d_0) the family needs (else ``None``), from the products' epilogues.
    """
    L = len(Ws)
    need_r, need_c = _norms_needed(family)
    P, Q, rp, cq = [None] * L, [None] * L, [None] * L, [None] * L
    for j in range(L - 2, -1, -1):  # P_j = P_{j+1} W_{j+1}
        if P[j + 1] is None:
            P[j], rp[j] = Ws[j + 1], red.rowsq(Ws[j + 1]) if need_r else None
        else:
            P[j], rp[j], _ = red.mm(P[j + 1], Ws[j + 1], rows=need_r)
    for j in range(1, L):  # Q_{j+1} = W_j Q_j
        if Q[j - 1] is None:
            Q[j], cq[j] = Ws[0], red.colsq(Ws[0]) if need_c else None
        else:
            Q[j], _, cq[j] = red.mm(Ws[j - 1], Q[j - 1], cols=need_c)
    return P, Q, rp, cq


def _large_terms(family, data, P, Q, rp, cq, d_L, d_0, like, red):
    """``c_j`` (B,) from ``P`` (B, d_L, d_j) and ``Q`` (B, d_{j-1}, d_0) (``None``: an identity)
    and their norms ``rp = rowsq(P)``, ``cq = colsq(Q)`` where the family needs them.

    ``like``: a (B, ...) tensor giving the batch size, dtype and device.
    """
    B = like.shape[0]
    if family == _ISO or family == _INPUTS:
        fp = rp.sum(-1) if P is not None else like.new_full((B,), float(d_L))
        if family == _ISO:
            fq = cq.sum(-1) if Q is not None else like.new_full((B,), float(d_0))
        else:
            M = data[0]
            fq = (Q * (Q @ M)).sum((-2, -1)) if Q is not None else torch.diagonal(M).sum().expand(B)
        return fp * fq
    if family == _ENTRIES:
        K = data[0]
        Ks = (cq @ K.T) if Q is not None else K.sum(-1).expand(B, d_L)
        return (rp * Ks).sum(-1) if P is not None else Ks.sum(-1)
    if family == _RANKONE:
        U, V = data[0], data[1]
        # ‖u_iᵀ P‖²: row norms of U P, reduced in the product's epilogue, U P never stored
        alpha = red.mm(U, P, rows=True, store=False)[1] if P is not None else U.square().sum(-1).expand(B, -1)
        beta = red.mm(V, Q.transpose(-1, -2), rows=True, store=False)[1] if Q is not None \
            else V.square().sum(-1).expand(B, -1)
        return (alpha * beta).mean(-1)
    # Dense, Gram form <A_i, G A_i H>
    A = data[0]
    GA = A if P is None else red.mm(P, P.transpose(-1, -2))[0].unsqueeze(-3) @ A
    AH = A if Q is None else A @ red.mm(Q.transpose(-1, -2), Q)[0].unsqueeze(-3)
    out = (GA * AH).sum((-2, -1)).mean(-1)
    return out.expand(B) if out.dim() == 0 else out


def _large_bars(family, data, P, Q, rp, cq, g, d_L, d_0, red, need_p, need_q):
    """``(2g S_j P_j, 2g Q_j T_j)`` (each ``None`` unless asked for); ``g``: (B,).

    ``rp``, ``cq``: the forward's norms of ``P``, ``Q`` where it saved them, else ``None`` (recomputed).
    """
    B = g.shape[0]
    p_bar = q_bar = None
    if P is not None and rp is None and family in (_ISO, _ENTRIES, _INPUTS):
        rp = red.rowsq(P)
    if Q is not None and cq is None and family in (_ISO, _ENTRIES):
        cq = red.colsq(Q)
    if family == _ISO or family == _INPUTS:
        fp = rp.sum(-1) if P is not None else torch.full_like(g, float(d_L))
        if family == _ISO:
            fq = cq.sum(-1) if Q is not None else torch.full_like(g, float(d_0))
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
            s = cq if Q is not None else torch.ones_like(g)[:, None].expand(B, d_0)
            p_bar = red.scale(P, wr=2 * g[:, None] * (s @ K.T))
        if need_q:
            r = rp if P is not None else torch.ones_like(g)[:, None].expand(B, d_L)
            q_bar = red.scale(Q, wc=2 * g[:, None] * (r @ K))
    elif family == _RANKONE:
        U, V = data[0], data[1]
        n = U.shape[0]
        if P is not None:
            UP, alpha, _ = red.mm(U, P, rows=True)
        else:
            UP, alpha = U.expand(B, -1, -1), U.square().sum(-1).expand(B, -1)
        if Q is not None:
            VQ, beta, _ = red.mm(V, Q.transpose(-1, -2), rows=True)
        else:
            VQ, beta = V.expand(B, -1, -1), V.square().sum(-1).expand(B, -1)
        if need_p:
            p_bar = U.T @ red.scale(UP, wr=(2 / n) * g[:, None] * beta)
        if need_q:
            q_bar = red.scale(VQ, wr=(2 / n) * g[:, None] * alpha).transpose(-1, -2) @ V
    else:
        A = data[0]
        if need_p:
            AH = A if Q is None else A @ red.mm(Q.transpose(-1, -2), Q)[0].unsqueeze(-3)
            S = (AH @ A.transpose(-1, -2)).mean(-3)
            p_bar = 2 * g[:, None, None] * (S @ P)
        if need_q:
            GA = A if P is None else red.mm(P, P.transpose(-1, -2))[0].unsqueeze(-3) @ A
            T = (A.transpose(-1, -2) @ GA).mean(-3)
            q_bar = 2 * g[:, None, None] * (Q @ T)
    return p_bar, q_bar


def _large_fwd(Ws, family, data, d_L, d_0, red):
    """``terms (B, L)``, the products ``P``, ``Q`` and their norms ``rp``, ``cq`` (``_large_chain``)."""
    P, Q, rp, cq = _large_chain(Ws, family, red)
    terms = torch.stack([_large_terms(family, data, P[j], Q[j], rp[j], cq[j], d_L, d_0, Ws[0], red)
                         for j in range(len(Ws))], -1)
    return terms, P, Q, rp, cq


def _large_bwd(Ws, P, Q, rp, cq, grad, family, data, d_L, d_0, red):
    """Weight gradients (B, d_j, d_{j-1}) by reverse accumulation along both chains."""
    L = len(Ws)
    dW = [None] * L
    # suffix chain, j ascending: P[j-1] = P[j] W[j]
    p_acc = None
    q_bars = [None] * L
    for j in range(L):
        p_bar, q_bars[j] = _large_bars(family, data, P[j], Q[j], rp[j], cq[j], grad[:, j], d_L, d_0, red,
                                       need_p=j < L - 1, need_q=j > 0)
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


def _saved_shapes(weights, plan, family):
    """Shapes of the tensors the forward saves for the backward (also used by the fake kernel)."""
    B = math.prod(weights[0].shape[:-2])
    L = len(weights)
    d = _widths(weights)
    if plan == "small":
        D = _small_width(d)
        return [(B, L, D, D), (B, L, D, D), (B, sum(d[j + 1] * d[j] for j in range(L)))]
    if plan == "large":
        # P_{L-1} = W_L and Q_2 = W_1 are the weights themselves: not saved; then the norms
        # rowsq(P_j), j < L, and colsq(Q_j), j > 1, where the family reads them
        need_r, need_c = _norms_needed(family)
        return ([(B, d[L], d[j + 1]) for j in range(L - 2)] + [(B, d[j], d[0]) for j in range(2, L)]
                + [(B, d[L])] * ((L - 1) * need_r) + [(B, d[0])] * ((L - 1) * need_c))
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
    red = _TritonReductions(block or None, _dot_precision(weights[0].device, cdtype))
    terms, P, Q, rp, cq = _large_fwd(_flat(weights, cdtype), family, data, d_L, d_0, red)
    # P[L-2] = W_L and Q[1] = W_1 alias the inputs: the backward takes them from the weights
    norms = [r for r in rp if r is not None] + [c for c in cq if c is not None]
    return [terms.reshape(*batch, L).to(dtype), *P[: max(L - 2, 0)], *Q[2:], *norms]


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
        red = _TritonReductions(block or None, _dot_precision(weights[0].device, cdtype))
        k = max(L - 2, 0)
        P = list(saved[:k]) + ([Ws[L - 1]] if L > 1 else []) + [None]
        Q = [None] + ([Ws[0]] if L > 1 else []) + list(saved[k: 2 * k])
        need_r, need_c = _norms_needed(family)
        norms = list(saved[2 * k:])
        rp = (norms[: L - 1] if need_r else [None] * (L - 1)) + [None]
        cq = [None] + (norms[(L - 1) * need_r:] if need_c else [None] * (L - 1))
    else:  # reference: the products were not saved
        red = _TorchReductions()
        P, Q = _chain_products(Ws)
        rp = cq = [None] * L
    dW = _large_bwd(Ws, P, Q, rp, cq, g, family, data, d_L, d_0, red)
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
    return [terms] + [weights[0].new_empty(s, dtype=cdtype) for s in _saved_shapes(weights, _plan(weights, path), family)]


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


def layer_terms(weights: list[torch.Tensor], measurements: Measurements, *, scale: float = 1.0,
                sum_layers: bool = False, path: str = "auto", block: int | None = None) -> torch.Tensor:
    """Per-layer contractions ``c_j = (1/n) Σ_i ‖P_jᵀ A_i Q_jᵀ‖_F²`` by the Triton kernels.

    Args:
        weights: ``[W_1, ..., W_L]``, ``W_j`` of shape ``(..., d_j, d_{j-1})`` (validated by the caller).
        measurements: any family of ``flatkern.measurements``.
        scale: multiplies every term (``flatkern.hessian_trace`` passes 2 or 2n).
        sum_layers: return ``scale · Σ_j c_j``, shape ``(...)``, instead of the terms.
        path: ``"auto"`` (single-program kernels when every width is at most
            ``SMALL_MAX_WIDTH`` and the depth at most ``MAX_SMALL_DEPTH``, else
            tiled), ``"small"`` (an error when the chain does not fit) or ``"large"``.
        block: tile size of the large path's kernels (default: 128 x 128 x 32 GEMM
            tiles, 64 for the other kernels); tests use small tiles so that several are
            exercised.

    Returns:
        ``(..., L)`` (``(...)`` with ``sum_layers``) in the weights' dtype, differentiable
        with respect to the weights.
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
        terms = torch.ops.flatkern.triton_layer_terms(weights, family, data, _PATHS[path], block or 0)[0]
    else:
        terms = _LayerTerms.apply(family, _PATHS[path], block or 0, len(weights), *weights, *data)[0]
    return scaled_terms(terms, scale, sum_layers)


def end_to_end(weights: list[torch.Tensor]) -> torch.Tensor:
    """``E = W_L ⋯ W_1``, shape ``(..., d_L, d_0)``: the chain of cuBLAS matmuls.

    The Triton backend has no kernel of its own for ``E``: it runs the
    plain-torch chain (cuBLAS on CUDA), differentiable, so that ``mse_loss``
    with ``backend="triton"`` or ``"auto"`` on CUDA works without a fallback warning.
    """
    return end_to_end_ref(weights)


def layer_terms_and_end_to_end(weights: list[torch.Tensor], measurements: Measurements, *, scale: float = 1.0,
                               sum_layers: bool = False):
    """``(layer_terms(weights, measurements, ...), end_to_end(weights))`` for ``flatkern.objective``.

    Not fused yet: the two run separately, each forming the prefix chain.
    """
    return layer_terms(weights, measurements, scale=scale, sum_layers=sum_layers), end_to_end(weights)
