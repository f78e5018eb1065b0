"""Measurement families: what the deep linear network is trained on.

A family describes ``n`` linear measurements ``y_i = <A_i, E>`` of the
end-to-end matrix ``E`` (shape ``(d_L, d_0)``), and knows the one contraction
the trace of the Hessian needs from it (docs/MATH.md):

    contract(P_j, Q_j) = (1/n) Σ_i ‖P_jᵀ A_i Q_jᵀ‖_F²

with ``P_j`` the suffix product ``(..., d_L, d_j)`` and ``Q_j`` the prefix
product ``(..., d_{j-1}, d_0)``.  ``None`` stands for an identity (``P_L`` and
``Q_1``), so no identity matrix is ever built.  The MSE trace is then
``2 Σ_j contract(P_j, Q_j)`` for ``reduction="mean"`` and ``n`` times that
for ``"sum"``.

Per-problem measurements.  Every family but ``Isotropic`` takes its tensors with
leading batch dimensions ``(...)`` (``Entries`` rows and cols ``(..., n)``,
``RankOne`` u ``(..., n, d_L)`` and v ``(..., n, d_0)``, ``Dense`` A
``(..., n, d_L, d_0)``, ``Inputs`` x ``(..., N, d_0)``): problem ``p`` of a batch of
weights ``(..., d_j, d_{j-1})`` is then measured by its own set, and the batch
shape (``batch_shape``) must equal the weights' batch shape exactly (checked by
``check``).  Without such dimensions one set is shared by every problem of the
batch (broadcast), as before.  ``n`` is the same for every problem of a set.

A measurement object is a value: it keeps private copies of the tensors it is
given, so nothing the caller does to those tensors afterwards (in-place edits,
``.data`` writes, edits through ``.numpy()``) changes its answers on any
backend.  What the kernels read (``family``, ``operands``; the encoding of
``flatkern/kernels/families.py``) is derived from those copies once, on first
use, and cached in one place: ``_operands``.
"""

from __future__ import annotations

import math

import torch

from ._checks import check_floating, check_int
from .kernels import families

__all__ = ["Measurements", "Isotropic", "Entries", "RankOne", "Dense", "Inputs"]


def _fro2(M: torch.Tensor | None, size: int) -> torch.Tensor | int:
    """‖M‖_F² over the last two dims; ``size`` for the identity (``M is None``)."""
    return size if M is None else M.square().sum((-2, -1))


class Measurements:
    """Base class of the measurement families.

    Subclasses set ``n`` (number of scalar measurements) and implement
    ``predict``, ``contract`` and ``_check_shape``.
    """

    n: int | None
    #: the family's code in ``flatkern.kernels.families``
    family: int
    #: the per-problem batch ``(...)`` of the tensors; ``()``: one set shared by every problem
    batch_shape: tuple[int, ...] = ()
    _operands: tuple | None = None

    @property
    def operands(self) -> tuple:
        """The tensors the kernels read (``flatkern/kernels/families.py``), derived once from the private copies."""
        if self._operands is None:
            # ordinary tensors even when first asked for under inference_mode: they are reused outside it
            with torch.inference_mode(False):
                self._operands = self._make_operands()
        return self._operands

    def _make_operands(self) -> tuple:
        return ()

    def predict(self, E: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def contract(self, P: torch.Tensor | None, Q: torch.Tensor | None, d_L: int, d_0: int) -> torch.Tensor:
        """``(1/n) Σ_i ‖Pᵀ A_i Qᵀ‖_F²``, shape ``(...)``.  ``None`` means identity."""
        raise NotImplementedError  # pragma: no cover - abstract

    def target_shape(self, d_L: int, d_0: int) -> tuple[int, ...]:
        """Shape of the targets (without batch dims) for an ``E`` of shape ``(d_L, d_0)``."""
        raise NotImplementedError  # pragma: no cover - abstract

    def check(self, d_L: int, d_0: int, like: torch.Tensor) -> None:
        """Raise if these measurements do not fit an ``E`` of shape ``(d_L, d_0)`` with ``like``'s dtype/device,
        or carry a per-problem batch other than ``like``'s batch shape ``like.shape[:-2]``."""
        if self.batch_shape and tuple(like.shape[:-2]) != self.batch_shape:
            raise ValueError(
                f"{self!r} holds one measurement set per problem for a batch of shape {self.batch_shape}, but the "
                f"weights have batch shape {tuple(like.shape[:-2])} (weights[0] has shape {tuple(like.shape)}); "
                "per-problem measurements need the same batch shape as the weights, or pass one shared set "
                "without batch dimensions")
        self._check_shape(d_L, d_0)
        for name, t in self._float_tensors():
            check_floating(t, f"{type(self).__name__}.{name}", like)
        for name, t in self._index_tensors():
            if t.device != like.device:
                raise ValueError(f"{type(self).__name__}.{name} is on {t.device} but the weights are on {like.device}")

    def _check_shape(self, d_L: int, d_0: int) -> None:
        raise NotImplementedError  # pragma: no cover - abstract

    def _float_tensors(self) -> list[tuple[str, torch.Tensor]]:
        return []

    def _index_tensors(self) -> list[tuple[str, torch.Tensor]]:
        return []

    def to(self, *args, **kwargs) -> "Measurements":
        """A copy with the floating tensors moved/cast like ``Tensor.to`` (index tensors only move)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def num_measurements(self, reduction: str, d_L: int) -> int:
        """``n``, the divisor of ``reduction="mean"``; needed to rescale for ``"sum"``."""
        if self.n is None:
            raise ValueError(
                f'reduction="{reduction}" needs the number of measurements: pass n to {type(self).__name__}(n=...)'
            )
        return self.n


def _private(t: torch.Tensor, dtype=None) -> torch.Tensor:
    """A contiguous copy that shares no memory with ``t`` (a measurement object is a value)."""
    return t.detach().to(dtype=dtype or t.dtype).clone(memory_format=torch.contiguous_format)


def _check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__module__}.{type(t).__name__}"
                        " (convert it with torch.as_tensor)")


def _batch_note(batch: tuple[int, ...]) -> str:
    """``", batch=(3,)"`` for a per-problem set (the reprs), ``""`` for a shared one."""
    return f", batch={batch}" if batch else ""


class Isotropic(Measurements):
    """The Gaussian / RIP population limit: ``E[A ⊗ A] = I``.

    Predictions are ``E`` itself; the loss against a target ``M`` (shape
    ``(d_L, d_0)``) is ``‖E - M‖_F²`` (the mean over infinitely many Gaussian
    measurements).  ``contract = ‖P‖_F² ‖Q‖_F²``.

    Args:
        n: optional number of measurements, needed only for ``reduction="sum"``
            (which multiplies the mean loss and trace by ``n``).
    """

    family = families.ISOTROPIC

    def __init__(self, n: int | None = None):
        self.n = None if n is None else check_int(n, "Isotropic(n=...)", minimum=1)

    def predict(self, E: torch.Tensor) -> torch.Tensor:
        return E

    def contract(self, P, Q, d_L, d_0):
        return _fro2(P, d_L) * _fro2(Q, d_0)

    def target_shape(self, d_L, d_0):
        return (d_L, d_0)

    def _check_shape(self, d_L, d_0):
        pass

    def to(self, *args, **kwargs):
        return self

    def __repr__(self):
        return f"Isotropic(n={self.n})"


class Entries(Measurements):
    """Matrix completion: ``A_i = e_{rows_i} e_{cols_i}ᵀ``, predictions ``E[rows, cols]``.

    ``contract = (1/n) Σ_i ‖P[rows_i, :]‖² ‖Q[:, cols_i]‖²``.

    Args:
        rows, cols: integer tensors of shape ``(n,)`` (one set for every problem), or ``(..., n)``
            with ``(...)`` the weights' batch shape (problem ``p`` observes ``rows[p], cols[p]``).
        shape: ``(d_L, d_0)``, the shape of ``E``; indices are checked against it.
    """

    family = families.ENTRIES

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, shape: tuple[int, int]):
        rows, cols = torch.as_tensor(rows), torch.as_tensor(cols)
        for name, t in (("rows", rows), ("cols", cols)):
            if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise TypeError(f"Entries {name} must be an integer tensor, got dtype {t.dtype}")
            if t.dim() == 0:
                raise ValueError(f"Entries {name} must have shape (n,) or (..., n), got {tuple(t.shape)}")
        if rows.shape != cols.shape:
            raise ValueError(f"Entries rows {tuple(rows.shape)} and cols {tuple(cols.shape)} must have the same shape "
                             "(n,) or (..., n)")
        if rows.shape[-1] == 0:
            raise ValueError(f"Entries rows holds zero measurements (shape {tuple(rows.shape)}); need at least one")
        if not hasattr(shape, "__len__") or len(shape) != 2:
            raise ValueError(f"Entries shape must be (d_L, d_0), got {shape!r}")
        self.shape = (check_int(shape[0], "Entries shape[0] (d_L)", minimum=1),
                      check_int(shape[1], "Entries shape[1] (d_0)", minimum=1))
        # private copies first, then the range check: a later edit of the caller's tensors cannot bypass it
        rows, cols = _private(rows, torch.long), _private(cols, torch.long)
        for name, t, size in (("rows", rows, self.shape[0]), ("cols", cols, self.shape[1])):
            if t.numel() == 0:  # an empty batch: nothing to check
                continue
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi >= size:
                raise ValueError(f"Entries {name} must lie in [0, {size}) for shape {self.shape}, found values in [{lo}, {hi}]")
        self.rows, self.cols = rows, cols
        self.n = rows.shape[-1]
        self.batch_shape = tuple(rows.shape[:-1])

    def _make_operands(self):
        # the indices only: memory O(n), never O(d_L d_0) (a 10^5 x 10^5 completion problem must fit)
        return (self.rows, self.cols)

    @classmethod
    def uniform(cls, n: int, shape: tuple[int, int], *, generator=None, replace: bool = False, device=None) -> "Entries":
        """``n`` entries of an ``shape`` matrix drawn uniformly (without replacement by default).

        ``n``: an integer ``>= 1`` (``<= d_L d_0`` without replacement); ``shape``: ``(d_L, d_0)``.
        """
        n = check_int(n, "Entries.uniform n (the number of entries)", minimum=1)
        if not hasattr(shape, "__len__") or len(shape) != 2:
            raise ValueError(f"Entries.uniform shape must be (d_L, d_0), got {shape!r}")
        shape = (check_int(shape[0], "Entries.uniform shape[0] (d_L)", minimum=1),
                 check_int(shape[1], "Entries.uniform shape[1] (d_0)", minimum=1))
        if not isinstance(replace, bool):
            raise TypeError(f"Entries.uniform replace must be a bool, got {replace!r}")
        total = shape[0] * shape[1]
        if not replace and n > total:
            raise ValueError(f"cannot draw n={n} distinct entries from a {shape} matrix ({total} entries); "
                             "pass a smaller n, or replace=True to draw with replacement")
        if replace:
            flat = torch.randint(total, (n,), generator=generator)
        else:
            flat = torch.randperm(total, generator=generator)[:n]
        return cls(flat // shape[1], flat % shape[1], shape).to(device)

    def predict(self, E):
        if self.batch_shape:  # problem p reads its own entries: a gather along the flattened E[p]
            return torch.take_along_dim(E.flatten(-2), self.rows * E.shape[-1] + self.cols, dim=-1)
        return E[..., self.rows, self.cols]

    def contract(self, P, Q, d_L, d_0):
        # squared row norms of P and column norms of Q, gathered per entry
        if P is None and Q is None:
            return 1.0
        if self.batch_shape:  # per-problem indices: gathers along the last dim, problem by problem
            r = 1.0 if P is None else torch.take_along_dim(P.square().sum(-1), self.rows, dim=-1)
            c = 1.0 if Q is None else torch.take_along_dim(Q.square().sum(-2), self.cols, dim=-1)
            return (r * c).mean(-1)
        r = 1.0 if P is None else P.square().sum(-1)[..., self.rows]
        c = 1.0 if Q is None else Q.square().sum(-2)[..., self.cols]
        return (r * c).mean(-1)

    def target_shape(self, d_L, d_0):
        return (self.n,)

    def _check_shape(self, d_L, d_0):
        if (d_L, d_0) != self.shape:
            raise ValueError(f"Entries were built for a matrix of shape {self.shape} but E has shape ({d_L}, {d_0})")

    def _index_tensors(self):
        return [("rows", self.rows), ("cols", self.cols)]

    def to(self, *args, **kwargs):
        device = kwargs.get("device")
        for a in args:
            if isinstance(a, (str, torch.device)):
                device = a
            elif isinstance(a, torch.Tensor):
                device = a.device
        if device is None:
            return self
        return Entries(self.rows.to(device), self.cols.to(device), self.shape)

    def __repr__(self):
        return f"Entries(n={self.n}, shape={self.shape}{_batch_note(self.batch_shape)})"


class RankOne(Measurements):
    """Rank-one sensing: ``A_i = u_i v_iᵀ``, predictions ``u_iᵀ E v_i``.

    ``contract = (1/n) Σ_i ‖Pᵀ u_i‖² ‖Q v_i‖²``.

    Args:
        u: ``(n, d_L)``;  v: ``(n, d_0)``; or ``(..., n, d_L)`` and ``(..., n, d_0)``, one set per
            problem of a batch of weights of batch shape ``(...)``.
    """

    family = families.RANK_ONE

    def __init__(self, u: torch.Tensor, v: torch.Tensor):
        for name, t in (("u", u), ("v", v)):
            _check_tensor(t, f"RankOne {name}")
            if t.dim() < 2:
                raise ValueError(f"RankOne {name} must be a tensor of shape (n, d) or (..., n, d), got {tuple(t.shape)}")
        if u.shape[:-1] != v.shape[:-1]:
            raise ValueError(f"RankOne u {tuple(u.shape)} and v {tuple(v.shape)} must have the same batch shape and "
                             "number of rows n: (..., n, d_L) and (..., n, d_0)")
        if u.shape[-2] == 0:
            raise ValueError(f"RankOne u holds zero measurements (shape {tuple(u.shape)}); need at least one")
        self.u, self.v, self.n = _private(u), _private(v), u.shape[-2]
        self.batch_shape = tuple(u.shape[:-2])

    def _make_operands(self):
        return (self.u, self.v)

    def predict(self, E):
        if self.batch_shape:
            return torch.einsum("...ab,...na,...nb->...n", E, self.u, self.v)
        return torch.einsum("...ab,na,nb->...n", E, self.u, self.v)

    def contract(self, P, Q, d_L, d_0):
        pu = self.u.square().sum(-1) if P is None else (self.u @ P).square().sum(-1)
        qv = self.v.square().sum(-1) if Q is None else (self.v @ Q.transpose(-1, -2)).square().sum(-1)
        return (pu * qv).mean(-1)

    def target_shape(self, d_L, d_0):
        return (self.n,)

    def _check_shape(self, d_L, d_0):
        if self.u.shape[-1] != d_L or self.v.shape[-1] != d_0:
            raise ValueError(
                f"RankOne u {tuple(self.u.shape)} and v {tuple(self.v.shape)} need widths (n, {d_L}) and (n, {d_0}) "
                f"to measure E of shape ({d_L}, {d_0})"
            )

    def _float_tensors(self):
        return [("u", self.u), ("v", self.v)]

    def to(self, *args, **kwargs):
        return RankOne(self.u.to(*args, **kwargs), self.v.to(*args, **kwargs))

    def __repr__(self):
        return f"RankOne(n={self.n}, d_L={self.u.shape[-1]}, d_0={self.v.shape[-1]}{_batch_note(self.batch_shape)})"


# Dense.predict's einsum over the transposed view below this many entries of A, its per-row products above
_DENSE_EINSUM_MAX = 1_000_000


class Dense(Measurements):
    """General sensing with dense matrices ``A`` of shape ``(n, d_L, d_0)``; predictions ``<A_i, E>``.

    ``contract = (1/n) Σ_i <A_i, (P Pᵀ) A_i (Qᵀ Q)>``.  ``A`` of shape ``(..., n, d_L, d_0)`` gives
    each problem of a batch of weights of batch shape ``(...)`` its own ``n`` matrices.
    """

    def __init__(self, A: torch.Tensor):
        _check_tensor(A, "Dense A")
        if A.dim() < 3:
            raise ValueError(f"Dense A must have shape (n, d_L, d_0) or (..., n, d_L, d_0), got {tuple(A.shape)}")
        if A.shape[-3] == 0:
            raise ValueError(f"Dense A holds zero measurements (shape {tuple(A.shape)}); need at least one")
        # one private copy, stored as Ap (..., d_L, n, d_0) in which the C++ kernel's Σ_i A_i G A_iᵀ is two
        # plain matrix products; A is a view of it
        self._Ap = _private(A.transpose(-3, -2))
        self.A, self.n = self._Ap.transpose(-3, -2), A.shape[-3]
        self.batch_shape = tuple(A.shape[:-3])
        # docs/MATH.md cost model: through K = (1/n) Σ vec(A_i) vec(A_i)ᵀ a contraction costs O((d_0 d_L)²)
        # instead of O(n d_0 d_L (d_0 + d_L)): the better choice when n > d_0 d_L
        self.family = families.DENSE_KERNEL if self.n > A.shape[-2] * A.shape[-1] else families.DENSE

    def _make_operands(self):
        if self.family == families.DENSE_KERNEL:
            return (self._Ap, self._kernel_pairs())
        return (self._Ap,)

    @classmethod
    def gaussian(cls, n: int, shape: tuple[int, int], *, generator=None, dtype=None, device=None) -> "Dense":
        """``n`` i.i.d. standard Gaussian sensing matrices of shape ``shape``."""
        return cls(torch.randn(n, *shape, generator=generator, dtype=dtype).to(device))

    def kernel(self) -> torch.Tensor:
        """``K[a, b, c, d] = (1/n) Σ_i A_i[a, b] A_i[c, d]``, shape ``(..., d_L, d_0, d_L, d_0)``.

        With it ``contract = Σ K[a,b,c,d] (P Pᵀ)[a,c] (Qᵀ Q)[d,b]`` costs
        ``O((d_0 d_L)²)`` instead of ``O(n d_0 d_L (d_0 + d_L))``: the better
        choice when ``n > d_0 d_L`` and the measurements are reused across steps.
        Computed once from the object's private copy of ``A`` (later edits of the
        caller's tensor do not reach it) and cached in the layout the C++ backend
        reads (``_kernel_pairs``).  What is returned is a fresh contiguous copy
        (``(d_L d_0)²`` elements, one copy per call): the cache is what the kernels
        read, so handing it out would let ``kernel().mul_(2)`` change later answers.
        """
        return self._kernel_pairs().transpose(-3, -2).clone(memory_format=torch.contiguous_format)

    def _kernel_pairs(self) -> torch.Tensor:
        """``K`` as ``Kp[a, c, b, d] = K[a, b, c, d]``, contiguous, shape ``(..., d_L, d_L, d_0, d_0)``.

        In this layout ``Σ_{b,d} K[a,b,c,d] G[b,d]`` (G symmetric) is one
        matrix-vector product of ``Kp`` viewed as ``(d_L², d_0²)`` with ``vec(G)``.
        """
        if getattr(self, "_Kp", None) is None:
            with torch.inference_mode(False):
                spec = "...iab,...icd->...acbd" if self.batch_shape else "iab,icd->acbd"
                self._Kp = (torch.einsum(spec, self.A, self.A) / self.n).contiguous()
        return self._Kp

    def predict(self, E):
        # Σ_a (Ap[a] @ E[a, :]): per row a of E, one product with the contiguous (n, d_0) block Ap[a], which
        # reads the private copy once in its own layout.  An einsum over the view A makes a strided copy of
        # all n d_L d_0 entries per call and in its backward: 3.8-8x the time at d = 100, n = 2000-5000, 1.5-1.7x
        # at 1.8e6 entries, but faster while that copy stays in cache (the products take 1.15-1.45x its time at
        # 8e4-4e5 entries; the two cross between 4e5 and 1.8e6; bench/bench_sweeps.py --tables dense)
        if self.A.numel() < _DENSE_EINSUM_MAX:
            spec = "...ab,...nab->...n" if self.batch_shape else "...ab,nab->...n"
            return torch.einsum(spec, E, self.A)
        if self.batch_shape:
            return (self._Ap @ E.unsqueeze(-1)).squeeze(-1).sum(-2)
        lead = E.shape[:-2]
        cols = E.reshape(math.prod(lead), *E.shape[-2:]).permute(1, 2, 0)  # (d_L, d_0, B)
        return (self._Ap @ cols).sum(0).transpose(0, 1).reshape(*lead, self.n)

    def contract(self, P, Q, d_L, d_0):
        A = self.A
        if P is None and Q is None:
            return A.square().sum((-2, -1)).mean(-1)
        # Gram form <A, G_P A G_Q>; an identity Gram is skipped
        left = A if P is None else (P @ P.transpose(-1, -2)).unsqueeze(-3) @ A
        right = A if Q is None else A @ (Q.transpose(-1, -2) @ Q).unsqueeze(-3)
        return (left * right).sum((-2, -1)).mean(-1)

    def target_shape(self, d_L, d_0):
        return (self.n,)

    def _check_shape(self, d_L, d_0):
        if tuple(self.A.shape[-2:]) != (d_L, d_0):
            raise ValueError(f"Dense A has shape {tuple(self.A.shape)} but E has shape ({d_L}, {d_0}); need (n, {d_L}, {d_0})")

    def _float_tensors(self):
        return [("A", self.A)]

    def to(self, *args, **kwargs):
        return Dense(self.A.to(*args, **kwargs))

    def __repr__(self):
        return f"Dense(n={self.n}, shape={tuple(self.A.shape[-2:])}{_batch_note(self.batch_shape)})"


class Inputs(Measurements):
    """Regression ``y = E x`` with every output observed: ``A_{(k,i)} = e_k x_iᵀ``.

    Predictions ``x Eᵀ`` of shape ``(..., N, d_L)``; ``n = N d_L`` (``nn.MSELoss``
    averages over every output).  ``contract = ‖P‖_F² ‖Q xᵀ‖_F² / (N d_L)``.

    Args:
        x: ``(N, d_0)`` inputs, or ``(..., N, d_0)``: problem ``p`` of a batch of weights of batch
            shape ``(...)`` sees its own ``x[p]``.
    """

    family = families.INPUTS

    def __init__(self, x: torch.Tensor):
        _check_tensor(x, "Inputs x")
        if x.dim() < 2:
            raise ValueError(f"Inputs x must have shape (N, d_0) or (..., N, d_0), got {tuple(x.shape)}")
        if x.shape[-2] == 0:
            raise ValueError(f"Inputs x holds zero measurements (shape {tuple(x.shape)}); need at least one")
        self.x = _private(x)
        self.batch_shape = tuple(x.shape[:-2])
        self.n = None  # depends on d_L; see num_measurements

    def predict(self, E):
        return self.x @ E.transpose(-1, -2)

    def contract(self, P, Q, d_L, d_0):
        if Q is not None:
            qx = (self.x @ Q.transpose(-1, -2)).square().sum((-2, -1))
        else:
            qx = self.x.square().sum((-2, -1)) if self.batch_shape else self.x.square().sum()
        return _fro2(P, d_L) * qx / (self.x.shape[-2] * d_L)

    def num_measurements(self, reduction, d_L):
        return self.x.shape[-2] * d_L

    def _make_operands(self):
        return (self.x,)

    def target_shape(self, d_L, d_0):
        return (self.x.shape[-2], d_L)

    def _check_shape(self, d_L, d_0):
        if self.x.shape[-1] != d_0:
            raise ValueError(f"Inputs x has shape {tuple(self.x.shape)} but E has shape ({d_L}, {d_0}); need (N, {d_0})")

    def _float_tensors(self):
        return [("x", self.x)]

    def to(self, *args, **kwargs):
        return Inputs(self.x.to(*args, **kwargs))

    def __repr__(self):
        return f"Inputs(N={self.x.shape[-2]}, d_0={self.x.shape[-1]}{_batch_note(self.batch_shape)})"


def _decode(cls, family: int, operands: tuple) -> Measurements:
    """The object of class ``cls`` that ``(family, operands)`` encode, sharing the operand tensors (no
    copy, no checks): how an op's plain-torch kernel gets back to the reference formulas.  Bound into
    the family registry (``flatkern/kernels/families.py``) below, so that kernels never import this module."""
    m = cls.__new__(cls)
    row = families.get(family)
    shapes = [o.shape for o in operands]
    m.n = row.measurement_count(shapes) or None
    m.batch_shape = row.batch_shape(shapes)
    if family == families.ENTRIES:
        m.rows, m.cols, m.shape = operands[0], operands[1], None
    elif family == families.RANK_ONE:
        m.u, m.v = operands
    elif family in (families.DENSE, families.DENSE_KERNEL):
        m._Ap, m.family = operands[0], family
        m.A = operands[0].transpose(-3, -2)
        if family == families.DENSE_KERNEL:
            m._Kp = operands[1]
    elif family == families.INPUTS:
        m.x, m.n = operands[0], None
    m._operands = operands
    return m


for _cls in (Isotropic, Entries, RankOne, Dense, Inputs):
    _cls._from_operands = classmethod(_decode)
families.bind_class(Isotropic, families.ISOTROPIC)
families.bind_class(Entries, families.ENTRIES)
families.bind_class(RankOne, families.RANK_ONE)
families.bind_class(Dense, families.DENSE, families.DENSE_KERNEL)
families.bind_class(Inputs, families.INPUTS)


def from_operands(family: int, operands) -> Measurements:
    """The measurement object that ``(family, operands)`` encode (``families.get(family).decode``)."""
    return families.get(family).decode(operands)
