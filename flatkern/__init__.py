"""flatkern: the exact, differentiable trace of the Hessian for deep linear networks.

    >>> import torch, flatkern
    >>> W = [torch.randn(8, 5), torch.randn(6, 8), torch.randn(4, 6)]   # E = W_3 W_2 W_1: (4, 5)
    >>> flatkern.hessian_trace(W, flatkern.Isotropic())                  # tr ∇² ‖E - M‖_F²

See ``flatkern.ops.hessian_trace`` for the formula and ``docs/MATH.md`` for the theory.

The public names load on first use (PEP 562): ``import flatkern`` itself imports
neither torch nor triton, so that the command line answers a usage error or
``--help`` at once; the first attribute (``flatkern.hessian_trace``, ...) imports
torch and registers the ops ``torch.ops.flatkern.*``.  Triton is imported only
when a CUDA tensor (or ``backend="triton"`` under ``TRITON_INTERPRET=1``) needs it.
"""

from __future__ import annotations

import importlib
import sys
import types

from ._version import __version__

# name -> the module that defines it, grouped by kind (the public surface as a table of contents)
_EXPORTS = {
    # measurement families
    "Measurements": "measurements", "Isotropic": "measurements", "Entries": "measurements",
    "RankOne": "measurements", "Dense": "measurements", "Inputs": "measurements",
    # the ops
    "end_to_end": "ops", "mse_loss": "ops", "hessian_trace": "ops", "hessian_trace_and_grad": "ops",
    "available_backends": "ops", "TraceProblem": "ops", "objective": "objective",
    # networks beyond the chain (nn.Sequential of Linear, ReLU, LeakyReLU, ...)
    "hessian_trace_of": "nn", "hessian_trace_and_grad_of": "nn",
    # theory and the flattest solution
    "flatness_lower_bound": "theory", "flattest_factorization": "theory",
    "rip_constant_lower_estimate": "theory", "rip_nuclear_norm_factor": "theory",
    "flattest_solution": "flattest_solution", "FlattestReport": "flattest_solution",
    "ConvergenceWarning": "flattest_solution",
}
_SUBMODULES = ("nn", "optim", "ops", "reference", "measurements", "theory", "kernels", "objective",
               "flattest_solution", "experiments", "benchmarks", "cli")

__all__ = [
    "Measurements", "Isotropic", "Entries", "RankOne", "Dense", "Inputs",
    "end_to_end", "mse_loss", "hessian_trace", "hessian_trace_and_grad", "available_backends", "TraceProblem",
    "flatness_lower_bound", "flattest_factorization", "rip_constant_lower_estimate", "rip_nuclear_norm_factor",
    "flattest_solution", "FlattestReport", "ConvergenceWarning",
    "nn", "optim", "hessian_trace_of", "hessian_trace_and_grad_of", "objective",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'flatkern' has no attribute {name!r}")
    globals()[name] = value  # once: later lookups are plain attribute reads
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))


class _Package(types.ModuleType):
    """flatkern's module type: importing the submodule ``flatkern.objective`` must not replace the
    function ``flatkern.objective`` (the import system sets a package attribute per submodule)."""

    def __setattr__(self, name, value):
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
