"""The CUDA kernels of ``flatkern::mlp_hessian_trace`` (issue 19): one Triton GEMM with the mask,
the per-sample scaling and the squared row norms in its epilogue, and the launchers that walk the
network with it.  The formula and its reverse sweep are the C++ kernel's
(``csrc/ops/cpu/mlp_hessian_trace_kernel.cpp``; plain torch: ``flatkern/piecewise.py``):

    G_L = S_iᵀ D_L,   G_l = (G_{l+1} W_{l+1}) D_l                        (C × d_l per sample)
    terms_l = s Σ_i ‖G_l^i‖_F² (‖a_{l-1}^i‖² + [b_l given])
    U_1 = 2 c_1 h_1 G_1 D_1,   U_{l+1} = (U_l W_{l+1}ᵀ + 2 c_{l+1} h_{l+1} G_{l+1}) D_{l+1}
    ∂/∂W_{l+1} += Σ_i G_{l+1}^iᵀ U_l^i

``_masked_gemm_kernel`` does both sweeps' products ``(N·C × d_{l+1})·(d_{l+1} × d_l)`` (and the
transposed one of the reverse sweep, in place in ``G_{l+1}``), with the mask of each row's sample,
the reverse sweep's direct term and the rows' squared norms applied to the tile in registers: the
``(N·C × d)`` products are written once and never re-read for their masks or norms.  The
forward pass, the top (softmax, ``O(N C²)``), the elementwise ``G_{L-1}`` and the weight gradients
(one cuBLAS GEMM each, ``(d_{l+1} × N·C)·(N·C × d_l)``) are torch ops on the device.

These launchers are registered as the op's CUDA kernels (``schemas.py``, imported on the first
CUDA call) rather than made a ``triton_op``: the op is opaque to ``torch.compile`` either way, and
its CPU kernel is C++.  Under ``TRITON_INTERPRET=1`` they run on CPU tensors (tests, tiny shapes),
reached through the autograd twin (``routing.resolve_mlp``'s ``"interpret"`` route).  fp32 GEMMs run
in "ieee" precision (tf32 only where ``torch.backends.cuda.matmul.allow_tf32`` allows it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..routing import interpreting
from .hessian_trace import _dot_precision  # tf32 only where torch allows it for matmuls: one rule for both ops

__all__ = ["masked_gemm", "mlp_hessian_trace_triton", "mlp_hessian_trace_backward_triton",
           "mlp_hessian_trace_and_grad_triton"]


@triton.jit
def _masked_gemm_kernel(A, B, OUT, ADD, COEF, MASK, RSQ, R, N, K, C,
                        s_am, s_ak, s_bk, s_bn,
                        HAS_MASK: tl.constexpr, HAS_ADD: tl.constexpr, ROWS: tl.constexpr, PREC: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``OUT[r, n] = (Σ_k A[r, k] B[k, n] + COEF[r // C] · ADD[r, n]) · MASK[r // C, n]`` and, with
    ``ROWS``, ``RSQ[r] += Σ_n OUT[r, n]²`` (atomically over the column tiles).

    ``A``: (R, K) and ``B``: (K, N) strided; ``OUT``, ``ADD``: (R, N) contiguous (``OUT`` may be
    ``ADD``: each tile is read and written by the same program); ``MASK``: (R / C, N) contiguous.
    """
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptr = A + rm[:, None] * s_am + rk[None, :] * s_ak
    b_ptr = B + rk[:, None] * s_bk + rn[None, :] * s_bn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=OUT.dtype.element_ty)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptr, mask=(rm[:, None] < R) & ((k0 + rk)[None, :] < K), other=0.0)
        b = tl.load(b_ptr, mask=((k0 + rk)[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
        a_ptr += BLOCK_K * s_ak
        b_ptr += BLOCK_K * s_bk
    inside = (rm[:, None] < R) & (rn[None, :] < N)
    sample = rm // C
    if HAS_ADD:
        coef = tl.load(COEF + sample, mask=rm < R, other=0.0)
        acc += coef[:, None] * tl.load(ADD + rm[:, None] * N + rn[None, :], mask=inside, other=0.0)
    if HAS_MASK:
        acc *= tl.load(MASK + sample[:, None] * N + rn[None, :], mask=inside, other=0.0)
    tl.store(OUT + rm[:, None] * N + rn[None, :], acc, mask=inside)
    if ROWS:
        # masked loads left zeros outside (R, N): they add nothing
        tl.atomic_add(RSQ + rm, tl.sum(acc * acc, axis=1), mask=rm < R)


def _blocks(dtype: torch.dtype) -> dict:
    if interpreting():  # every program runs in Python: small tiles, several of them on the tests' shapes
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)
    if dtype == torch.float64:  # fp64 tiles take twice the registers
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=4)
    return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3)


def masked_gemm(A: torch.Tensor, B: torch.Tensor, C: int, mask: torch.Tensor | None, out: torch.Tensor | None = None,
                add: torch.Tensor | None = None, coef: torch.Tensor | None = None, rows: bool = True):
    """``(A B + coef ⊙ add) ⊙ mask`` (``A``: (R, K), ``B``: (K, N), any strides; ``mask``: (R / C, N) or
    None; ``coef``: (R / C,)), written to ``out`` ((R, N), contiguous; a fresh tensor if None), and the
    squared norms of its rows ((R,), or None without ``rows``)."""
    R, K = A.shape
    N = B.shape[1]
    if out is None:
        out = A.new_empty((R, N))
    rsq = torch.zeros(R, dtype=A.dtype, device=A.device) if rows else out
    cfg = _blocks(A.dtype)
    grid = (triton.cdiv(R, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
    if R == 0 or N == 0:
        return out, (rsq if rows else None)
    _masked_gemm_kernel[grid](
        A, B, out, add if add is not None else out, coef if coef is not None else out,
        mask if mask is not None else out, rsq, R, N, K, C,
        A.stride(0), A.stride(1), B.stride(0), B.stride(1),
        HAS_MASK=mask is not None, HAS_ADD=add is not None, ROWS=rows, PREC=_dot_precision(A.device, A.dtype), **cfg)
    return out, (rsq if rows else None)


# ------------------------------------------------------------------ the launchers


def _unpack(weights, biases, slopes, num_acts):
    acts, k = [], 0
    for n in num_acts:
        acts.append([float(s) for s in slopes[k:k + n]])
        k += n
    return list(weights), [None if b.numel() == 0 else b for b in biases], acts


def _activate(z: torch.Tensor, slopes: list[float]):
    """``(σ(z), σ'(z))`` for the activations after one layer, each stage's mask at its own input
    (``σ'(0)`` = the slope, torch's convention); ``(z, None)`` without activations."""
    if not slopes:
        return z, None
    a, m = z, None
    for s in slopes:
        pos = a > 0
        mk = torch.where(pos, a.new_ones(()), a.new_full((), s))
        a = torch.relu(a) if s == 0.0 else torch.where(pos, a, a * s)
        m = mk if m is None else m * mk
    return a, m


def _check(x, weights, biases, slopes, num_acts, loss, mean):
    from ...piecewise import check_op_args  # the op's argument rules, once for its Python kernels

    check_op_args(x, weights, biases, slopes, num_acts, loss, mean)


def _forward(x, weights, biases, acts, zs=None):
    """Layer inputs a_0 .. a_{L-1}, pre-activations z_1 .. z_L, masks D_1 .. D_L and the output a_L."""
    a, ins, pre, masks = x, [], [], []
    for l, (W, b) in enumerate(zip(weights, biases)):
        ins.append(a)
        z = (torch.addmm(b, a, W.t()) if b is not None else a @ W.t()) if zs is None else zs[l]
        pre.append(z)
        a, m = _activate(z, acts[l])
        masks.append(m)
    return ins, pre, masks, a


def _sweep(x, weights, biases, acts, ce: bool, mean: bool, keep: bool, coef=None, zs=None):
    """The forward pass and the C-column sweep: ``(s, ins, pre, masks, h, V, G, top, p, u)``, every
    per-layer list indexed 0..L-1 (``G[L-1]``: None, the top lives in ``top``)."""
    L, M, C = len(weights), x.shape[0], weights[-1].shape[0]
    s = (1.0 / M if mean else 1.0) if ce else (2.0 / (M * C) if mean else 2.0)
    ins, pre, masks, out = _forward(x, weights, biases, acts, zs)
    h = [a.square().sum(-1) + (1.0 if b is not None else 0.0) for a, b in zip(ins, biases)]
    V, G, rows = [None] * L, [None] * L, [None] * L
    mL = masks[-1]
    top = p = u = None
    if ce:
        logp = torch.log_softmax(out, dim=-1)  # of the output, after its activations
        p = logp.exp()
        sp = (0.5 * logp).exp()  # √p: no 0 · inf where p underflows
        off = 1.0 - torch.eye(C, dtype=x.dtype, device=x.device)
        top = sp.unsqueeze(-1) * (torch.diag_embed(-torch.expm1(logp)) - p.unsqueeze(-2) * off)
        if mL is not None:
            top = top * mL.unsqueeze(-2)
        rows[-1] = top.square().sum(-1)  # (M, C)
    else:
        rows[-1] = (mL.square() if mL is not None else x.new_ones((M, C)))
    V[-1] = rows[-1].sum(-1)
    if L >= 2:
        WL, m = weights[-1], masks[-2]
        DW = WL if mL is None else mL.unsqueeze(-1) * WL  # (M, C, d) or (C, d)
        if ce:
            r = (p if mL is None else p * mL) @ WL
            g = sp.unsqueeze(-1) * (DW - r.unsqueeze(-2))
        else:
            g = DW.expand(M, C, WL.shape[1])  # a view of W_L itself when there is no mask
        # G_{L-1} must be a fresh tensor: the reverse sweep overwrites it with U_{L-1} in place
        g = g * m.unsqueeze(-2) if m is not None else (g if ce else g.clone())
        G[-2] = g.reshape(M * C, WL.shape[1]).contiguous()  # widths spelled out: M may be 0
        rows[-2] = G[-2].square().sum(-1).view(M, C)
        V[-2] = rows[-2].sum(-1)
        for l in range(L - 3, -1, -1):
            G[l], rsq = masked_gemm(G[l + 1], weights[l + 1], C, masks[l])
            rows[l] = rsq.view(M, C)
            V[l] = rows[l].sum(-1)
            if not keep:
                G[l + 1] = None
    terms = torch.stack([(V[l] * h[l]).sum() for l in range(L)]) * s
    if ce and coef is not None:
        u = sum(coef[l] * h[l].unsqueeze(-1) * rows[l] for l in range(L))
    return terms, s, ins, pre, masks, h, V, G, top, p, u


def _reverse(x, weights, biases, acts, ce, ins, masks, h, V, G, top, p, u, c, want_x=True):
    """``[∂/∂x (want_x), ∂/∂W_1 .., ∂/∂b_1 ..]`` with per-layer coefficients ``c`` (``s`` times the cotangents)."""
    L, M, C = len(weights), x.shape[0], weights[-1].shape[0]
    gW = [torch.zeros_like(W) for W in weights]
    gb = [x.new_empty((0,)) if b is None else torch.zeros_like(b) for b in biases]
    if L >= 2:
        m0 = masks[0]
        d1 = G[0].shape[1]
        U = G[0].view(M, C, d1) * (2.0 * c[0] * h[0])[:, None, None]
        U = (U if m0 is None else U * m0.unsqueeze(-2)).reshape(M * C, d1)
        for l in range(L - 2):
            gW[l + 1] += G[l + 1].t() @ U
            coef = (2.0 * c[l + 1] * h[l + 1]).contiguous()
            U, _ = masked_gemm(U, weights[l + 1].t(), C, masks[l + 1], out=G[l + 1], add=G[l + 1], coef=coef,
                               rows=False)
        if ce:
            gW[-1] += top.reshape(M * C, C).t() @ U
        elif masks[-1] is not None:
            gW[-1] += (U.view(M, C, U.shape[1]) * masks[-1].unsqueeze(-1)).sum(0)
        else:
            gW[-1] += U.view(M, C, U.shape[1]).sum(0)
    zbar = None
    if ce:
        zbar = u - p * u.sum(-1, keepdim=True)
        if masks[-1] is not None:
            zbar = zbar * masks[-1]
    gx = None
    for l in range(L - 1, -1, -1):
        a = ins[l]
        if zbar is not None:
            gW[l] += zbar.t() @ a
            if biases[l] is not None:
                gb[l] += zbar.sum(0)
        if l == 0 and not want_x:
            break
        abar = (2.0 * c[l] * V[l]).unsqueeze(-1) * a
        if zbar is not None:
            abar = abar + zbar @ weights[l]
        if l == 0:
            gx = abar
            break
        zbar = abar if masks[l - 1] is None else abar * masks[l - 1]
    return ([gx] if want_x else []) + [*gW, *gb]


def mlp_hessian_trace_triton(x, weights, biases, slopes, num_acts, loss=0, mean=True, sum_layers=False):
    """``flatkern::mlp_hessian_trace`` on the device: ``(terms, [z_1 .. z_L])``."""
    _check(x, weights, biases, slopes, num_acts, loss, mean)
    weights, bs, acts = _unpack(weights, biases, slopes, num_acts)
    terms, _, _, pre, *_ = _sweep(x.contiguous(), weights, bs, acts, loss == 1, mean, keep=False)
    return (terms.sum() if sum_layers else terms), [z.contiguous() for z in pre]


def mlp_hessian_trace_backward_triton(x, weights, biases, slopes, num_acts, loss, mean, sum_layers, saved, grad_terms):
    """``flatkern::mlp_hessian_trace_backward`` on the device: the sweep re-run from the saved ``z_l``."""
    _check(x, weights, biases, slopes, num_acts, loss, mean)
    weights, bs, acts = _unpack(weights, biases, slopes, num_acts)
    L, M, C = len(weights), x.shape[0], weights[-1].shape[0]
    s = (1.0 / M if mean else 1.0) if loss == 1 else (2.0 / (M * C) if mean else 2.0)
    g = grad_terms.reshape(()).expand(L) if sum_layers else grad_terms
    c = s * g.to(x.dtype)
    _, _, ins, _, masks, h, V, G, top, p, u = _sweep(x.contiguous(), weights, bs, acts, loss == 1, mean, keep=True,
                                                     coef=c, zs=list(saved))
    return _reverse(x, weights, bs, acts, loss == 1, ins, masks, h, V, G, top, p, u, c)


def mlp_hessian_trace_and_grad_triton(x, weights, biases, slopes, num_acts, loss=0, mean=True, sum_layers=False):
    """``flatkern::mlp_hessian_trace_and_grad`` on the device."""
    _check(x, weights, biases, slopes, num_acts, loss, mean)
    weights, bs, acts = _unpack(weights, biases, slopes, num_acts)
    L, M, C = len(weights), x.shape[0], weights[-1].shape[0]
    s = (1.0 / M if mean else 1.0) if loss == 1 else (2.0 / (M * C) if mean else 2.0)
    c = torch.full((L,), s, dtype=x.dtype, device=x.device)
    terms, _, ins, _, masks, h, V, G, top, p, u = _sweep(x.contiguous(), weights, bs, acts, loss == 1, mean, keep=True,
                                                         coef=c)
    grads = _reverse(x, weights, bs, acts, loss == 1, ins, masks, h, V, G, top, p, u, c, want_x=False)
    return (terms.sum() if sum_layers else terms), grads
