"""Input validation shared by every public entry point.

Each check is one readable rule with a message that names the argument and
the shapes, so that bad input fails in Python before any kernel sees it.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch

BACKENDS = ("auto", "torch", "cpp", "triton")
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
                return list(weights)
    return _check_weights_rules(weights, name)


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
