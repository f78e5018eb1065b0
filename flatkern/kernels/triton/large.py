"""The large path: the chain as tiled GEMMs whose epilogues reduce to what the family reads.

For widths beyond the small path's tiles, the chain products ``P_j = P_{j+1} W_{j+1}``
and ``Q_{j+1} = W_j Q_j`` are a tiled Triton GEMM (``_mm_norms_kernel``) whose
epilogue also reduces each output tile to the squared row norms of ``P_j``
(Entries, Isotropic, Inputs), the column norms of ``Q_j`` (Entries, Isotropic),
or the row norms of ``U P_j`` and ``V Q_jᵀ`` (RankOne's ``α``, ``β``, with
``U P_j`` never stored); Dense's Grams ``P_j P_jᵀ``, ``Q_jᵀ Q_j`` are the same
GEMM.  The forward saves the norms, so the backward reads no product back only
to reduce it.  The backward's reverse accumulation stays on ``torch.matmul`` /
``baddbmm`` (its additions fused into cuBLAS), with the row/column scalings in
``_scale_kernel``.

Holds: the kernels ``_mm_norms_kernel``, ``_rowsq_kernel``, ``_scale_kernel``;
``TritonReductions`` (their launchers); the per-family terms and gradients
(``_large_terms``, ``_large_bars``) and the chain walks ``large_fwd`` /
``large_bwd``.  Inputs the kernels do not take (empty batches, zero widths)
never get here: the routing table sends them to the reference.

Per family (``r = rowsq(P_j)``, ``s = colsq(Q_j)``, ``K = counts / n`` (never formed: d_L x d_0),
``M = XᵀX / (N d_L)``, ``α_i = ‖P_jᵀu_i‖²``, ``β_i = ‖Q_j v_i‖²``):

    family      c_j                         2 S_j P_j                  2 Q_j T_j
    Isotropic   Σr · Σs                     2 Σs · P                   2 Σr · Q
    Entries     (1/n) Σ r[a_i] s[b_i]       2 (K s) ⊙rows P            2 Q ⊙cols (Kᵀ r)   (K s, Kᵀ r: scatter-adds over the n entries)
    RankOne     (1/n) Σ α_i β_i             (2/n) Uᵀ diag(β) U P       (2/n) Q Vᵀ diag(α) V
    Dense       (1/n) Σ <A_i, G A_i H>      (2/n) Σ A_i H A_iᵀ P       (2/n) Q Σ A_iᵀ G A_i
    Inputs      Σr · <H, M>                 2 <H, M> · P               2 Σr · Q M

Dense reads ``Ap (d_L, n, d_0)``: ``G Ap`` viewed ``(d_L, n d_0)`` and ``Ap H``
viewed ``(d_L n, d_0)`` are one GEMM each, and so are ``Σ_i A_i H A_iᵀ`` and
``Σ_i A_iᵀ G A_i``.

Per-problem sets (``hessian_trace._prepare``) carry a leading ``B``: ``rows, cols (B, n)``
(gathers and scatter-adds along dim 1), ``U (B, n, d_L)``, ``Ap (B, d_L, n, d_0)`` (batched
GEMMs), ``M (B, d_0, d_0)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .. import families

__all__ = ["TritonReductions", "norms_needed", "large_chain", "large_fwd", "large_bwd"]


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

    For the norms of matrices that are no product (the weights ``W_L``, ``W_1``).  Column norms
    are the row norms of ``Xᵀ``: the caller swaps the strides.
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


def gemm_config(block: int | None, dtype: torch.dtype) -> dict:
    """Tile sizes of ``_mm_norms_kernel``: ``block`` (tests: several small tiles) or a fixed default."""
    if block:
        return dict(BLOCK_M=block, BLOCK_N=block, BLOCK_K=min(block, 32), GROUP_M=8, num_warps=4, num_stages=2)
    if dtype == torch.float64:
        # fp64 tiles take twice the registers
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, GROUP_M=8, num_warps=4, num_stages=2)
    # the matmul tutorial's Hopper fp32 shape; not autotuned: a fixed config compiles once
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)


class TritonReductions:
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
        cfg = gemm_config(self.gemm_block, a.dtype)
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


def norms_needed(family: int) -> tuple[bool, bool]:
    """Whether the family reads ``rowsq(P_j)`` and ``colsq(Q_j)`` (Isotropic and Inputs: their sums)."""
    return families.get(family).norms


def large_chain(Ws, family, red):
    """``P[j] = P_{j+1}`` (B, d_L, d_{j+1}), ``Q[j] = Q_{j+1}`` (B, d_j, d_0) (0-based; the identities
    ``P[L-1]``, ``Q[0]`` are ``None``) and the norms ``rp[j] = rowsq(P[j])`` (B, d_L), ``cq[j] = colsq(Q[j])``
    (B, d_0) the family needs (else ``None``), from the products' epilogues.
    """
    L = len(Ws)
    need_r, need_c = norms_needed(family)
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


def _dense_views(Ap):
    """``Ap (..., d_L, n, d_0)`` as ``(..., d_L, n d_0)`` (rows ``a``) and ``(..., d_L n, d_0)`` (columns ``b``)."""
    *batch, d_L, n, d_0 = Ap.shape
    return Ap.reshape(*batch, d_L, n * d_0), Ap.reshape(*batch, d_L * n, d_0)


def _gather(values, index):
    """``values[:, index]`` (B, n) for a shared ``index`` (n,), or ``values[b, index[b]]`` for a per-problem (B, n)."""
    return values[:, index] if index.dim() == 1 else values.gather(1, index)


def _trace(M, B: int):
    """``tr M`` for every problem, (B,): one shared ``M`` (d, d) or a per-problem (B, d, d)."""
    if M.dim() == 2:
        return torch.diagonal(M).sum().expand(B)
    return torch.diagonal(M, dim1=-2, dim2=-1).sum(-1)


def _large_terms(family, data, P, Q, rp, cq, d_L, d_0, like, red):
    """``c_j`` (B,) from ``P`` (B, d_L, d_j) and ``Q`` (B, d_{j-1}, d_0) (``None``: an identity)
    and their norms ``rp = rowsq(P)``, ``cq = colsq(Q)`` where the family needs them.

    ``like``: a (B, ...) tensor giving the batch size, dtype and device.
    """
    B = like.shape[0]
    if family == families.ISOTROPIC or family == families.INPUTS:
        fp = rp.sum(-1) if P is not None else like.new_full((B,), float(d_L))
        if family == families.ISOTROPIC:
            fq = cq.sum(-1) if Q is not None else like.new_full((B,), float(d_0))
        else:
            M = data[0]
            fq = (Q * (Q @ M)).sum((-2, -1)) if Q is not None else _trace(M, B)
        return fp * fq
    if family == families.ENTRIES:
        # (1/n) Σ_i rowsq(P)[rows_i] colsq(Q)[cols_i]: gathers over the n entries, O(B n) memory,
        # never a d_L x d_0 matrix (completion problems are large and sparse)
        rows, cols = data[0], data[1]
        r = _gather(rp, rows) if P is not None else None
        c = _gather(cq, cols) if Q is not None else None
        if r is None and c is None:
            return like.new_ones((B,))
        return (r if c is None else c if r is None else r * c).mean(-1)
    if family == families.RANK_ONE:
        U, V = data[0], data[1]
        # ‖u_iᵀ P‖²: row norms of U P, reduced in the product's epilogue, U P never stored
        alpha = red.mm(U, P, rows=True, store=False)[1] if P is not None else U.square().sum(-1).expand(B, -1)
        beta = red.mm(V, Q.transpose(-1, -2), rows=True, store=False)[1] if Q is not None \
            else V.square().sum(-1).expand(B, -1)
        return (alpha * beta).mean(-1)
    # Dense, Gram form (1/n) Σ_i <G A_i, A_i H>
    Ap = data[0]
    n = Ap.shape[-2]
    A_rows, A_cols = _dense_views(Ap)
    GA = A_rows if P is None else red.mm(P, P.transpose(-1, -2))[0] @ A_rows
    AH = A_cols if Q is None else A_cols @ red.mm(Q.transpose(-1, -2), Q)[0]
    out = (GA.reshape(*GA.shape[:-2], -1) * AH.reshape(*AH.shape[:-2], -1)).sum(-1) / n
    return out.expand(B)


def _entries_sum(values, gather, scatter, size: int, B: int, like: torch.Tensor) -> torch.Tensor:
    """``out[b, k] = (1/n) Σ_{i: scatter_i = k} values[b, gather_i]`` (B, size); ``values=None`` means ones.

    ``gather``, ``scatter``: (n,) shared by every problem, or (B, n), problem ``b``'s in row ``b``.
    """
    n = gather.shape[-1]
    src = _gather(values, gather) if values is not None else like.new_ones((1, n)).expand(B, n)
    out = like.new_zeros((B, size))
    if scatter.dim() == 2:
        return out.scatter_add_(1, scatter, src.contiguous()) / n
    return out.index_add_(1, scatter, src) / n


def _large_bars(family, data, P, Q, rp, cq, g, d_L, d_0, red, need_p, need_q):
    """``(2g S_j P_j, 2g Q_j T_j)`` (each ``None`` unless asked for); ``g``: (B,).

    ``rp``, ``cq``: the forward's norms of ``P``, ``Q`` where it saved them, else ``None`` (recomputed).
    """
    B = g.shape[0]
    p_bar = q_bar = None
    if P is not None and rp is None and family in (families.ISOTROPIC, families.ENTRIES, families.INPUTS):
        rp = red.rowsq(P)
    if Q is not None and cq is None and family in (families.ISOTROPIC, families.ENTRIES):
        cq = red.colsq(Q)
    if family == families.ISOTROPIC or family == families.INPUTS:
        fp = rp.sum(-1) if P is not None else torch.full_like(g, float(d_L))
        if family == families.ISOTROPIC:
            fq = cq.sum(-1) if Q is not None else torch.full_like(g, float(d_0))
            if need_q:
                q_bar = red.scale(Q, wr=(2 * g * fp)[:, None])
        else:
            M = data[0]
            QM = (Q @ M) if Q is not None else None
            fq = (Q * QM).sum((-2, -1)) if Q is not None else _trace(M, B)
            if need_q:
                q_bar = red.scale(QM, wr=(2 * g * fp)[:, None])
        if need_p:
            p_bar = red.scale(P, wr=(2 * g * fq)[:, None])
    elif family == families.ENTRIES:
        rows, cols = data[0], data[1]
        if need_p:  # ∂c/∂rowsq(P)[a] = (1/n) Σ_{i: rows_i = a} colsq(Q)[cols_i]
            p_bar = red.scale(P, wr=2 * g[:, None] * _entries_sum(cq, cols, rows, d_L, B, g))
        if need_q:  # ∂c/∂colsq(Q)[b] = (1/n) Σ_{i: cols_i = b} rowsq(P)[rows_i]
            q_bar = red.scale(Q, wc=2 * g[:, None] * _entries_sum(rp, rows, cols, d_0, B, g))
    elif family == families.RANK_ONE:
        U, V = data[0], data[1]
        n = U.shape[-2]
        if P is not None:
            UP, alpha, _ = red.mm(U, P, rows=True)
        else:
            UP, alpha = U.expand(B, -1, -1), U.square().sum(-1).expand(B, -1)
        if Q is not None:
            VQ, beta, _ = red.mm(V, Q.transpose(-1, -2), rows=True)
        else:
            VQ, beta = V.expand(B, -1, -1), V.square().sum(-1).expand(B, -1)
        if need_p:
            p_bar = U.transpose(-1, -2) @ red.scale(UP, wr=(2 / n) * g[:, None] * beta)
        if need_q:
            q_bar = red.scale(VQ, wr=(2 / n) * g[:, None] * alpha).transpose(-1, -2) @ V
    else:  # Dense: S = (1/n) Σ_i A_i H A_iᵀ and T = (1/n) Σ_i A_iᵀ G A_i, one GEMM each
        Ap = data[0]
        n = Ap.shape[-2]
        A_rows, A_cols = _dense_views(Ap)
        if need_p:
            AH = A_cols if Q is None else A_cols @ red.mm(Q.transpose(-1, -2), Q)[0]
            S = AH.reshape(*AH.shape[:-2], d_L, -1) @ A_rows.transpose(-1, -2) / n
            p_bar = 2 * g[:, None, None] * (S @ P)
        if need_q:
            GA = A_rows if P is None else red.mm(P, P.transpose(-1, -2))[0] @ A_rows
            T = A_cols.transpose(-1, -2) @ GA.reshape(*GA.shape[:-2], -1, d_0) / n
            q_bar = 2 * g[:, None, None] * (Q @ T)
    return p_bar, q_bar


def large_fwd(Ws, family, data, red, with_e=False):
    """The per-layer terms and the chain, for ``Ws`` (B, d_j, d_{j-1}) in the compute dtype.

    Returns ``(terms (B, L), P, Q, rp, cq, E)``: the products and norms of ``large_chain`` and
    ``E = W_L Q_L`` (B, d_L, d_0) when ``with_e``, else ``None``.  ``family``: a kernel code
    (no DENSE_KERNEL); ``data``: as ``hessian_trace._prepare`` makes it.
    """
    d_L, d_0 = Ws[-1].shape[-2], Ws[0].shape[-1]
    P, Q, rp, cq = large_chain(Ws, family, red)
    terms = torch.stack([_large_terms(family, data, P[j], Q[j], rp[j], cq[j], d_L, d_0, Ws[0], red)
                         for j in range(len(Ws))], -1)
    E = None
    if with_e:
        E = Ws[0].clone() if Q[-1] is None else red.mm(Ws[-1], Q[-1])[0]
    return terms, P, Q, rp, cq, E


def large_bwd(Ws, P, Q, rp, cq, grad, grad_E, family, data, red):
    """Weight gradients (B, d_j, d_{j-1}) of ``Σ_j grad[:, j] c_j + <grad_E, E>`` by reverse
    accumulation along both chains; ``grad_E`` (B, d_L, d_0) or ``None``.
    """
    L = len(Ws)
    d_L, d_0 = Ws[-1].shape[-2], Ws[0].shape[-1]
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
        else:
            if grad_E is not None:
                # E = P[0] W[0]: ∂W[0] = P[0]ᵀ G, and G W[0]ᵀ joins the gradient reaching P[0]
                dW[0] = grad_E.clone() if P[0] is None else P[0].transpose(-1, -2) @ grad_E
                if L > 1:
                    p_bar = torch.baddbmm(p_bar, grad_E, Ws[0].transpose(-1, -2))
            if L > 1:
                p_acc = p_bar
    # prefix chain, j descending: Q[j+1] = W[j] Q[j]
    q_acc = None
    for j in range(L - 1, -1, -1):
        if j < L - 1:
            if dW[j] is None:
                dW[j] = q_acc if Q[j] is None else q_acc @ Q[j].transpose(-1, -2)
            elif Q[j] is None:
                dW[j] = dW[j] + q_acc
            else:
                dW[j] = torch.baddbmm(dW[j], q_acc, Q[j].transpose(-1, -2))
            if j > 0:
                q_acc = torch.baddbmm(q_bars[j], Ws[j].transpose(-1, -2), q_acc)
        elif j > 0:
            q_acc = q_bars[j]
    if dW[0] is None:  # depth 1 without E: the trace is a constant
        dW[0] = torch.zeros_like(Ws[0])
    return dW
