"""flatkern: the exact, differentiable trace of the Hessian for deep linear networks.

    >>> import torch, flatkern
    >>> W = [torch.randn(8, 5), torch.randn(6, 8), torch.randn(4, 6)]   # E = W_3 W_2 W_1: (4, 5)
    >>> flatkern.hessian_trace(W, flatkern.Isotropic())                  # tr ∇² ‖E - M‖_F²

See ``flatkern.ops.hessian_trace`` for the formula and ``MATH.md`` for the theory.
"""

from .measurements import Dense, Entries, Inputs, Isotropic, Measurements, RankOne
from .ops import available_backends, end_to_end, hessian_trace, mse_loss
from .theory import flatness_lower_bound, flattest_factorization
from . import nn, optim
from .nn import hessian_trace_of
from .objective import objective

__version__ = "0.1.0"

__all__ = [
    "Measurements", "Isotropic", "Entries", "RankOne", "Dense", "Inputs",
    "end_to_end", "mse_loss", "hessian_trace", "available_backends",
    "flatness_lower_bound", "flattest_factorization",
    "nn", "optim", "hessian_trace_of", "objective",
]
