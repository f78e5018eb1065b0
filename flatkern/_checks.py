"""Input validation shared by every public entry point.

Each check is one readable rule with a message that names the argument and
the shapes, so that bad input fails in Python before any kernel sees it.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch

from .kernels import BACKENDS

REDUCTIONS = ("mean", "sum")


def check_weights(weights, name: str = "weights") -> list[torch.Tensor]:
    """Validate a layer chain ``[W_1, ..., W_L]`` and return it as a list.

    Rules: a non-empty sequence of floating tensors of one dtype on one device,
    each of shape ``(..., d_j, d_{j-1})`` with the same leading (batch) shape,
    and consecutive layers that chain (``W_{j+1}.shape[-1] == W_j.shape[-2]``).
    """
    # fast path: one pass that accepts only a valid list/tuple chain (this check
    # runs on every call, and a d = 30 problem's whole kernel takes ~20 µs);
    # anything else goes through the rule-by-rule checks below, which name the error
    if type(weights) in (list, tuple) and weights and isinstance(weights[0], torch.Tensor):
        first = weights[0]
        shape, dtype, device = first.shape, first.dtype, first.device
        nd = len(shape)
        if nd >= 2 and dtype.is_floating_point:
            batch, width = shape[:-2], shape[-2]
            for w in weights[1:]:
                if not isinstance(w, torch.Tensor):
                    break
                s = w.shape
                if len(s) != nd or s[-1] != width or (nd > 2 and s[:-2] != batch) or w.dtype != dtype or w.device != device:
                    break
                width = s[-2]
            else:
                check_untied(weights, name)
                return list(weights)
    weights = _check_weights_rules(weights, name)
    check_untied(weights, name)
    return weights


def _extent(w: torch.Tensor) -> tuple[int, int]:
    """``[first, last]`` element offsets ``w`` reads in its storage."""
    last = w.storage_offset() + sum((s - 1) * st for s, st in zip(w.shape, w.stride()) if s > 0)
    return w.storage_offset(), last


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` (one storage) share an element: exact, also for interleaved views."""
    (a0, a1), (b0, b1) = _extent(a), _extent(b)
    if a1 < b0 or b1 < a0:
        return False
    if a.shape == b.shape and a.stride() == b.stride() and a0 == b0:
        return True
    # rare (two strided views whose spans cross): mark a's elements, look for b's
    with torch.no_grad():
        lo, hi = min(a0, b0), max(a1, b1)
        mark = torch.zeros(hi - lo + 1, dtype=torch.bool, device=a.device)
        mark.as_strided(a.shape, a.stride(), a0 - lo).fill_(True)
        return bool(mark.as_strided(b.shape, b.stride(), b0 - lo).any())


def _storage_key(t: torch.Tensor):
    """``(device, storage address)`` of ``t``, ``None`` when it reads no memory (empty, meta, no storage)."""
    if t.numel() == 0 or t.device.type == "meta":
        return None
    try:
        return (str(t.device), t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # a tensor subclass without storage: nothing to compare
        return None


def check_no_shared_memory(named) -> None:
    """Raise if two of the ``(label, tensor)`` pairs are the same tensor or share an element of memory.

    The one check for tied parameters (``hessian_trace``, ``TraceProblem``, ``FlatnessRegularized``):
    a layer used at two positions has a Hessian trace with cross terms between them (they depend on
    the targets), not the per-position trace flatkern computes, and a parameter an optimizer
    reaches twice is stepped twice.  Exact: distinct slices of one tensor, even interleaved
    (``W[:, ::2]``, ``W[:, 1::2]``), are distinct parameters.
    """
    if torch.compiler.is_compiling():
        # storage addresses cannot be traced: the same tensor twice is what a graph can still tell
        for j, (label, t) in enumerate(named):
            for label_i, u in named[:j]:
                if u is t:
                    raise ValueError(f"{label_i} and {label} are the same tensor (tied weights): the trace of a "
                                     "network whose layers share weights has cross terms flatkern's does not include")
        return
    seen: dict = {}
    for label, t in named:
        key = _storage_key(t)
        if key is None:  # no storage to read (a torch.func wrapper, an empty tensor): the same object twice
            key = ("object", id(t)) if t.numel() > 0 else None
        if key is None:
            continue
        for label_i, u in seen.get(key, ()):
            if u is t or _overlap(u, t):
                raise ValueError(
                    f"{label_i} and {label} are the same tensor or share memory (views of one storage): a layer "
                    "used at two positions (tied weights) has a Hessian trace that depends on the targets, not the "
                    "per-position trace flatkern computes, and a parameter reached twice is stepped twice; pass "
                    "separate tensors (e.g. W.clone()) if the layers are meant to be independent")
        seen.setdefault(key, []).append((label, t))


def check_untied(weights, name: str = "weights") -> None:
    """``check_no_shared_memory`` for a chain: the layers must be distinct parameters."""
    if not torch.compiler.is_compiling():
        # the usual case, checked on every call: layers in distinct storages (a d = 30 call cannot
        # afford the labelled check's strings); any shared storage gets the exact check below
        try:
            ptrs = {w.untyped_storage().data_ptr() for w in weights}
        except (RuntimeError, NotImplementedError):
            ptrs = ()
        if len(ptrs) == len(weights):
            return
    check_no_shared_memory([(f"{name}[{j}] (layer W_{j + 1})", w) for j, w in enumerate(weights)])


def _check_weights_rules(weights, name: str) -> list[torch.Tensor]:
    if isinstance(weights, torch.Tensor):
        raise TypeError(
            f"{name} must be a sequence of layer matrices [W_1, ..., W_L], got a single "
            f"tensor of shape {tuple(weights.shape)}; wrap it in a list for depth 1"
        )
    if not isinstance(weights, Sequence) and not hasattr(weights, "__iter__"):
        raise TypeError(f"{name} must be a sequence of tensors, got {type(weights).__name__}")
    weights = list(weights)
    if len(weights) == 0:
        raise ValueError(f"{name} is empty: need at least one layer W_1 of shape (..., d_1, d_0)")
    for j, w in enumerate(weights, start=1):
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"{name}[{j - 1}] (layer W_{j}) must be a tensor, got {type(w).__name__}")
        if w.dim() < 2:
            raise ValueError(
                f"{name}[{j - 1}] (layer W_{j}) must have shape (..., d_{j}, d_{j - 1}), "
                f"got shape {tuple(w.shape)}"
            )
        if not w.is_floating_point():
            raise TypeError(f"{name}[{j - 1}] (layer W_{j}) must be floating point, got dtype {w.dtype}")
    first = weights[0]
    for j, w in enumerate(weights[1:], start=2):
        if w.dtype != first.dtype:
            raise TypeError(
                f"{name} mix dtypes: W_1 is {first.dtype} but W_{j} is {w.dtype}; convert them to one dtype"
            )
        if w.device != first.device:
            raise ValueError(
                f"{name} are on different devices: W_1 is on {first.device} but W_{j} is on {w.device}"
            )
        if w.shape[:-2] != first.shape[:-2]:
            raise ValueError(
                f"{name} must share their leading (batch) shape: W_1 has {tuple(first.shape[:-2])} "
                f"but W_{j} has {tuple(w.shape[:-2])}"
            )
        prev = weights[j - 2]
        if w.shape[-1] != prev.shape[-2]:
            raise ValueError(
                f"{name} do not chain at layer {j}: W_{j} has shape {tuple(w.shape)} (expects input "
                f"width {w.shape[-1]}) but W_{j - 1} has shape {tuple(prev.shape)} (output width {prev.shape[-2]})"
            )
    return weights


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def check_widths(widths, name: str = "widths") -> list[int]:
    """``[d_0, ..., d_L]`` as Python ints (ints and numpy integers; each >= 1, at least two), or an
    error naming ``name`` and the entry: bools, floats (``5.9``, and ``5.0`` as in ``range``) and
    widths below 1 are refused.  The one rule for widths in flatkern."""
    scalar = isinstance(widths, torch.Tensor) and widths.dim() == 0
    if scalar or isinstance(widths, (str, bytes)) or not hasattr(widths, "__iter__"):
        raise TypeError(
            f"{name} must be a sequence of ints [d_0, d_1, ..., d_L] (input, hidden and output widths, "
            f"e.g. [20, 32, 20]), got {widths!r} ({type(widths).__name__})"
        )
    widths = list(widths)
    if len(widths) < 2:
        raise ValueError(f"{name} must list at least two widths [d_0, ..., d_L] (one layer), got {widths!r}")
    return [check_int(d, f"{name}[{j}]", minimum=1) for j, d in enumerate(widths)]


def check_floating(t: torch.Tensor, name: str, like: torch.Tensor) -> None:
    """A floating tensor with ``like``'s dtype and device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating point, got dtype {t.dtype}")
    if t.dtype != like.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but the weights are {like.dtype}; convert one of them")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but the weights are on {like.device}")


def check_int(value, name: str, *, minimum: int | None = None) -> int:
    """``value`` as a Python int: ints and numpy integers (anything with ``__index__``) pass, bools and
    floats (even integral ones, as in ``range``) are refused with a message naming ``name``."""
    if isinstance(value, bool) or getattr(getattr(value, "dtype", None), "kind", None) == "b":
        raise TypeError(f"{name} must be an integer, got the bool {value!r}")
    try:
        out = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})") from None
    if minimum is not None and out < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {out}")
    return out


def check_real(value, name: str, *, minimum: float | None = None) -> float:
    """``value`` as a finite Python float (``>= minimum`` if given), else a ValueError/TypeError naming ``name``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a real number, got the bool {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})") from None
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {out}")
    if minimum is not None and out < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {out}")
    return out
