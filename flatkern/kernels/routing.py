"""The routing table: one record per kernel, and the one function that reads them.

Each kernel states once what it takes (device, dtypes, widths, families,
derivative order, forward-mode derivatives, empty batches) and why it cannot
run when it cannot.  ``resolve`` turns ``backend=`` and the tensors into a
route; the fake kernels (``fake.py``) size ``saved`` from the record of the
device's kernel; the error messages ("cannot run here: ...") come from the
records; the tests' backend matrix lists them.  No other module branches on a
device or a dtype to pick a kernel.

Routes:

- ``"op"``: the compiled op; the dispatcher picks the device's kernel (C++ on
  CPU, or the plain-torch kernel when the extension is missing; Triton on CUDA);
- ``"interpret"``: the Triton launchers on CPU tensors under ``TRITON_INTERPRET=1``
  (``backend="triton"`` on CPU, for tests): the dispatcher's CPU kernel is the
  C++ one, so this route calls the launchers through the autograd twin;
- ``"ref"``: ``flatkern.reference``, plain torch (derivatives of every order,
  forward mode, ``torch.func`` transforms).

``backend="auto"`` takes the device's kernel when its record accepts the input
and the reference otherwise (saying so once when the kernel is missing);
``"cpp"``/``"triton"`` take that kernel or raise, naming why.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.autograd.forward_ad as _forward_ad

from . import BACKENDS, families

__all__ = ["BACKENDS", "Kernel", "KERNELS", "CPP", "TRITON", "TORCH_OP", "REFERENCE", "resolve", "unavailable",
           "available_backends", "op_kernel", "reset", "MLP_CPP", "MLP_TRITON", "MLP_TORCH_OP", "MLP_KERNELS",
           "Op", "TRACE_OP", "MLP_OP", "resolve_mlp"]

#: the C++ kernels index with 32-bit BLAS dimensions; every kernel takes widths in [1, MAX_WIDTH)
MAX_WIDTH = 1 << 20
_ALL_FAMILIES = frozenset(families.FAMILIES)


@dataclass(frozen=True)
class Kernel:
    """What one kernel takes.  ``unavailable(device)`` says why it cannot run on ``device`` at all
    (``None`` if it can); ``refuses(weights, family)`` why it does not take these inputs."""

    backend: str                          # as ``backend=`` names it
    devices: tuple[str, ...]              # device types it is the op's kernel for
    dtypes: tuple[torch.dtype, ...]
    families: frozenset[int]
    derivatives: int | None               # order of derivatives of the trace it gives; None: any
    forward_mode: bool                    # jvp / jacfwd / forward_ad, and torch.func transforms
    empty_batch: bool                     # takes a batch with no problem in it
    max_width: int
    _unavailable: Callable[[torch.device], str | None]
    _saved_specs: Callable[..., list]

    def unavailable(self, device: torch.device) -> str | None:
        return self._unavailable(torch.device(device))

    def refuses_static(self, dtype: torch.dtype, family: int | None) -> str | None:
        """Why the kernel does not take this dtype or family (what a cached route may depend on);
        ``family=None`` for an op that takes no measurement family."""
        if dtype not in self.dtypes:
            return f"its kernel does not take {dtype} (takes {', '.join(str(d) for d in self.dtypes)})"
        if family is not None and family not in self.families:
            return f"its kernel does not take the {families.get(family).name} family"
        return None

    def refuses_shape(self, weights) -> str | None:
        """Why the kernel does not take these shapes (checked on every call: shapes change)."""
        first, top = weights[0], self.max_width
        ok = 0 < first.shape[-1] < top
        for w in weights:  # a loop, not any(genexpr): this runs on every call
            ok = ok and 0 < w.shape[-2] < top
        if not ok:
            widths = [first.shape[-1]] + [w.shape[-2] for w in weights]
            return f"its kernel does not take a width of 0 or >= 2^{self.max_width.bit_length() - 1} (widths {widths})"
        if not self.empty_batch and first.numel() == 0:
            return f"its kernel does not take an empty batch (batch shape {tuple(first.shape[:-2])})"
        return None

    def saved_specs(self, weights, family: int, operands) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """``[(shape, dtype), ...]`` of the ``saved`` tensors the op's forward returns on this kernel."""
        return self._saved_specs(weights, family, operands)


# ------------------------------------------------------------------ the records


def _cpp_unavailable(device: torch.device) -> str | None:
    from . import schemas
    if schemas.CPP_ERROR is not None:
        return schemas.CPP_ERROR
    return None if device.type == "cpu" else f"the C++ backend runs on CPU tensors only, got tensors on {device}"


def _cpp_saved_specs(weights, family, operands):
    from . import schemas
    widths = [int(weights[0].shape[-1])] + [int(w.shape[-2]) for w in weights]
    size = schemas._C.hessian_trace_saved_size(widths, family, [list(map(int, o.shape)) for o in operands])
    return [((*weights[0].shape[:-2], size), weights[0].dtype)]


def interpreting() -> bool:
    """Whether Triton kernels run on CPU tensors here (``TRITON_INTERPRET=1``: slow; for tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


_triton_import_error: list = []  # [reason or None], filled on the first import


def _triton_launchers():
    """``flatkern.kernels.triton.hessian_trace``, imported on first use (it imports triton: ~2 s)."""
    from .triton import hessian_trace as launchers
    return launchers


def _triton_unavailable(device: torch.device) -> str | None:
    if device.type == "cpu" and not interpreting():
        return "Triton kernels need CUDA tensors (on CPU they run only in the interpreter, with TRITON_INTERPRET=1)"
    if device.type not in ("cpu", "cuda"):
        return f"Triton kernels run on CUDA tensors, got tensors on {device}"
    if not _triton_import_error:
        try:
            _triton_launchers()
            _triton_import_error.append(None)
        except ImportError as exc:  # triton not installed
            _triton_import_error.append(f"the Triton backend cannot be imported ({exc})")
    return _triton_import_error[0]


def _triton_saved_specs(weights, family, operands):
    return _triton_launchers().saved_specs(weights, family, operands)


def _torch_op_unavailable(device: torch.device) -> str | None:
    from . import schemas
    if device.type != "cpu":
        return f"the plain-torch op kernel is registered for CPU tensors only, got tensors on {device}"
    return None if schemas._C is None else "the C++ extension is the op's CPU kernel"


_FLOATS = (torch.float32, torch.float64)

#: the C++ CPU kernels (``csrc/ops/cpu/``)
CPP = Kernel("cpp", ("cpu",), _FLOATS, _ALL_FAMILIES, derivatives=1, forward_mode=False, empty_batch=True,
             max_width=MAX_WIDTH, _unavailable=_cpp_unavailable, _saved_specs=_cpp_saved_specs)
#: the Triton kernels (``flatkern/kernels/triton/``): CUDA, or CPU under the interpreter
TRITON = Kernel("triton", ("cuda",), (torch.float16, torch.bfloat16) + _FLOATS, _ALL_FAMILIES, derivatives=1,
                forward_mode=False, empty_batch=True, max_width=MAX_WIDTH, _unavailable=_triton_unavailable,
                _saved_specs=_triton_saved_specs)
#: the plain-torch reference as the op's CPU kernel, when the C++ extension is missing (``reference_kernel.py``)
TORCH_OP = Kernel("torch", ("cpu",), _FLOATS, _ALL_FAMILIES, derivatives=1, forward_mode=False, empty_batch=True,
                  max_width=MAX_WIDTH, _unavailable=_torch_op_unavailable, _saved_specs=lambda *args: [])
#: ``flatkern.reference`` itself: every input, derivatives of every order
REFERENCE = Kernel("torch", ("cpu", "cuda"), (torch.float16, torch.bfloat16) + _FLOATS, _ALL_FAMILIES,
                   derivatives=None, forward_mode=True, empty_batch=True, max_width=1 << 62,
                   _unavailable=lambda device: None, _saved_specs=lambda *args: [])

KERNELS = {"cpp": CPP, "triton": TRITON}
#: the kernels "auto" tries for a device type, in order
_AUTO = {"cpu": (CPP, TORCH_OP), "cuda": (TRITON,)}


@dataclass(frozen=True, eq=False)
class Op:
    """One op's kernel records, which ``resolve`` and ``op_kernel`` read: ``kernels`` by ``backend=``
    name, ``auto`` the kernels "auto" tries for a device type (in order), ``cpu_fallback`` what the
    dispatcher runs on CPU without the extension, ``other`` on a device with no kernel of its own."""

    kernels: dict
    auto: dict
    cpu_fallback: Kernel
    other: Kernel


#: flatkern::hessian_trace and its siblings (the deep linear chain)
TRACE_OP = Op(KERNELS, _AUTO, TORCH_OP, REFERENCE)


def op_kernel(device, op: Op = TRACE_OP) -> Kernel:
    """The record of the kernel the dispatcher runs for ``device`` (what the fake kernel sizes)."""
    device = torch.device(device)
    for kernel in op.auto.get(device.type, ()):
        if kernel.unavailable(device) is None or kernel.backend == "triton":
            return kernel
    return op.cpu_fallback if device.type == "cpu" else op.other


def unavailable(backend: str, device) -> str | None:
    """Why ``backend`` cannot run on ``device`` at all (``None`` if it can)."""
    check_backend(backend)
    if backend in ("auto", "torch"):
        return None
    return KERNELS[backend].unavailable(torch.device(device))


def available_backends(device="cpu") -> list[str]:
    """Backends that can run the trace on ``device``: always ``"torch"``, then ``"cpp"``/``"triton"``."""
    device = torch.device(device)
    return ["torch"] + [name for name, k in KERNELS.items() if k.unavailable(device) is None]


def check_backend(backend) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


# ------------------------------------------------------------------ resolution

# (op, backend, device type, dtype, family) -> (route, kernel): the part of the choice that depends on
# nothing else, cached (it runs on every call, and a d = 30 problem's whole kernel takes ~20 µs)
_static: dict = {}
_warned: set = set()


def reset() -> None:
    """Forget the cached routes and warnings (tests that change the environment)."""
    _static.clear()
    _warned.clear()
    _triton_import_error.clear()


def _warn_fallback(device_type: str, reason: str) -> None:
    """Say once per device type that "auto" runs on plain torch, and why."""
    if device_type not in _warned and not torch.compiler.is_compiling():
        _warned.add(device_type)
        warnings.warn(f"flatkern: using the plain-torch backend on {device_type}: {reason}", RuntimeWarning,
                      stacklevel=5)


def _refuse(backend: str, reason: str):
    raise RuntimeError(f'flatkern: backend="{backend}" cannot run here: {reason}; backend="torch" can')


def _resolve_static(op: Op, backend: str, device: torch.device, dtype: torch.dtype, family: int | None):
    if backend == "torch":
        return "ref", REFERENCE
    if backend == "auto":
        candidates = op.auto.get(device.type, ())
        for i, kernel in enumerate(candidates):
            reason = kernel.unavailable(device)
            if reason is None:
                return ("op", kernel) if kernel.refuses_static(dtype, family) is None else ("ref", REFERENCE)
            if i == 0:
                _warn_fallback(device.type, reason)
        if not candidates:
            _warn_fallback(device.type, f"no compiled kernel for {device.type}")
        return "ref", REFERENCE
    check_backend(backend)
    kernel = op.kernels[backend]
    reason = kernel.unavailable(device) or kernel.refuses_static(dtype, family)
    if reason is not None:
        _refuse(backend, reason)
    return ("interpret" if kernel.backend == "triton" and device.type == "cpu" else "op"), kernel


def transform_active() -> str | None:
    """What needs derivatives no compiled kernel gives: forward mode or a ``torch.func`` transform."""
    if _forward_ad._current_level >= 0:
        return "forward-mode derivatives (torch.autograd.forward_ad) are active"
    if torch._C._functorch.maybe_current_level() is not None:
        return "a torch.func transform (jvp, jacfwd, vmap, grad, ...) is active"
    return None


def resolve(backend: str, weights, family: int, *, transforms: bool = True) -> str:
    """``"op"``, ``"interpret"`` or ``"ref"`` for these (validated) weights and family code; a
    RuntimeError naming why when ``backend`` names a kernel that cannot take them.  ``transforms=False``:
    the caller computes in plain torch whatever the route (Triton's ``E``), so forward mode and
    ``torch.func`` transforms are no reason to refuse."""
    return _resolve(TRACE_OP, backend, weights[0], weights, family, transforms)


def _resolve(op: Op, backend: str, first: torch.Tensor, weights, family: int | None, transforms: bool) -> str:
    """``resolve`` for ``op``'s records, the device and dtype read from ``first``."""
    compiling = torch.compiler.is_compiling()
    key = (op, backend, first.device.type, first.dtype, family)
    static = None if compiling else _static.get(key)
    if static is None:
        static = _resolve_static(op, backend, first.device, first.dtype, family)
        if not compiling:
            _static[key] = static
    route, kernel = static
    if route == "ref":
        return route
    reason = kernel.refuses_shape(weights)
    if reason is None and transforms and not compiling:
        reason = transform_active()
    if reason is None:
        return route
    if backend == "auto":
        return "ref"
    _refuse(backend, reason)


# ------------------------------------------------------------------ flatkern::mlp_hessian_trace (issue 19)
#
# The op of networks piecewise linear in each weight has its own records, in the same shape: each
# kernel states what it takes, and ``resolve``'s rules read them through ``MLP_OP`` (``resolve_mlp``).
# ``families`` is empty (the op takes no measurement family); ``saved_specs(weights, None, (x,))``
# gives ``[z_1 .. z_L]``, ``(M, d_l)`` each: every kernel of this op saves the pre-activations.


def _mlp_saved_specs(weights, family, operands):
    x = operands[0]
    return [((int(x.shape[0]), int(w.shape[-2])), x.dtype) for w in weights]


_NO_FAMILIES: frozenset = frozenset()

#: the C++ CPU kernels of the mlp op (``csrc/ops/cpu/mlp_hessian_trace_kernel.cpp``)
MLP_CPP = Kernel("cpp", ("cpu",), _FLOATS, _NO_FAMILIES, derivatives=1, forward_mode=False, empty_batch=True,
                 max_width=MAX_WIDTH, _unavailable=_cpp_unavailable, _saved_specs=_mlp_saved_specs)
#: the Triton kernels of the mlp op (``flatkern/kernels/triton/mlp_hessian_trace.py``): fp32 / fp64, the GEMMs
#: in fp32 ("ieee", no TF32) or fp64
MLP_TRITON = Kernel("triton", ("cuda",), _FLOATS, _NO_FAMILIES, derivatives=1, forward_mode=False, empty_batch=True,
                    max_width=MAX_WIDTH, _unavailable=_triton_unavailable, _saved_specs=_mlp_saved_specs)
#: the plain-torch formula (``flatkern.piecewise``) as the mlp op's CPU kernel, when the C++ extension is missing
MLP_TORCH_OP = Kernel("torch", ("cpu",), _FLOATS, _NO_FAMILIES, derivatives=1, forward_mode=False, empty_batch=True,
                      max_width=MAX_WIDTH, _unavailable=_torch_op_unavailable, _saved_specs=_mlp_saved_specs)

MLP_KERNELS = {"cpp": MLP_CPP, "triton": MLP_TRITON}
#: flatkern::mlp_hessian_trace and its siblings (every kernel of it, the plain-torch one too, saves z)
MLP_OP = Op(MLP_KERNELS, {"cpu": (MLP_CPP, MLP_TORCH_OP), "cuda": (MLP_TRITON,)}, MLP_TORCH_OP, MLP_TORCH_OP)


def resolve_mlp(backend: str, x: torch.Tensor, weights) -> str:
    """``"op"``, ``"interpret"`` or ``"ref"`` for ``flatkern::mlp_hessian_trace`` on these (validated)
    inputs ``x`` ``(M, d_0)`` and weights: ``resolve``'s rules with the mlp records (the static part
    cached; widths and active transforms checked on every call)."""
    return _resolve(MLP_OP, backend, x, weights, None, True)
