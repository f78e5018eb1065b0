"""flatkern: the exact, differentiable trace of the Hessian for deep linear networks.

    >>> import torch, flatkern
    >>> W = [torch.randn(8, 5), torch.randn(6, 8), torch.randn(4, 6)]   # E = W_3 W_2 W_1: (4, 5)
    >>> flatkern.hessian_trace(W, flatkern.Isotropic())                  # tr ∇² ‖E - M‖_F²

See ``flatkern.ops.hessian_trace`` for the formula and ``docs/MATH.md`` for the theory.
"""

from ._version import __version__
from .measurements import Dense, Entries, Inputs, Isotropic, Measurements, RankOne
from .ops import available_backends, end_to_end, hessian_trace, hessian_trace_and_grad, mse_loss
from .theory import flatness_lower_bound, flattest_factorization
from .flattest_solution import ConvergenceWarning, FlattestReport, flattest_solution
from . import nn, optim
from .nn import hessian_trace_of
from .objective import objective


__all__ = [
    "Measurements", "Isotropic", "Entries", "RankOne", "Dense", "Inputs",
    "end_to_end", "mse_loss", "hessian_trace", "hessian_trace_and_grad", "available_backends",
    "flatness_lower_bound", "flattest_factorization", "flattest_solution", "FlattestReport", "ConvergenceWarning",
    "nn", "optim", "hessian_trace_of", "objective",
]
