"""A flatness-regularized optimizer: any torch optimizer plus ``lam * ∇ tr ∇²L``.

    g_j  ←  g_j + lam · ∂/∂W_j  tr ∇²L(W)              (then the base optimizer steps)

where ``tr ∇²L`` is ``flatkern.hessian_trace(weights, measurements, reduction=...)``
(MATH.md): the exact trace of the Hessian of the MSE loss on ``measurements``.
The regularizer gradient comes from one call of that op and one
``torch.autograd.grad``; the fast backend is chosen by ``backend="auto"``.

    >>> model = flatkern.nn.DeepLinear([5, 8, 8, 4])
    >>> opt = flatkern.optim.FlatnessRegularized(model, torch.optim.SGD, lam=1e-2,
    ...                                          measurements=meas, lr=0.1)
    >>> loss = flatkern.mse_loss(model.weights, meas, b); loss.backward(); opt.step()
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from ._checks import check_backend, check_reduction, check_weights
from .measurements import Isotropic, Measurements
from .ops import hessian_trace

__all__ = ["FlatnessRegularized"]


def _check_lam(lam, name: str = "lam") -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0:
        raise ValueError(f"{name} must be a number >= 0, got {lam!r}")
    return float(lam)


def _split_params(params) -> tuple[list[torch.Tensor], list]:
    """The regularized chain ``[W_1, ..., W_L]`` and what to hand to the base optimizer."""
    from .nn import DeepLinear

    module = params.module if isinstance(params, nn.parallel.DistributedDataParallel) else params
    if isinstance(module, nn.Module):
        if not isinstance(module, DeepLinear):
            raise TypeError(
                "FlatnessRegularized takes the layer weights [W_1, ..., W_L] in chain order or a "
                f"flatkern.nn.DeepLinear, got the module {type(module).__name__}; pass its weight "
                "tensors in chain order (W_1 first)"
            )
        # biases are optimized but not regularized: the trace on `measurements` depends on E only
        return list(module.weights), list(module.parameters())
    if isinstance(params, torch.Tensor):
        raise TypeError(
            f"params must be a sequence of layer weights [W_1, ..., W_L], got a single tensor of shape "
            f"{tuple(params.shape)}; wrap it in a list for depth 1"
        )
    groups = list(params)
    if groups and all(isinstance(g, dict) for g in groups):
        chain = []
        for g in groups:
            ps = g["params"]
            chain.extend([ps] if isinstance(ps, torch.Tensor) else list(ps))
        return chain, groups
    return groups, groups


class FlatnessRegularized(torch.optim.Optimizer):
    """Wraps ``base_optimizer`` and adds ``lam * ∇ tr ∇²L`` to the gradients at every ``step``.

    The regularized objective is ``L(W) + lam · tr ∇²L(W)`` with ``L`` the MSE
    loss on ``measurements`` (``flatkern.mse_loss``) and the trace from
    ``flatkern.hessian_trace`` (the trace does not depend on the targets).
    Gradients of ``L`` (or of any other loss) come from the user's
    ``backward()``; ``step`` adds the regularizer once, however many backward
    passes were accumulated, then steps the base optimizer.

    - ``param_groups`` and ``state`` are the base optimizer's (the same
      objects), so learning-rate schedulers, ``zero_grad`` and
      ``state_dict()`` / ``load_state_dict()`` act on both.
    - ``lam`` lives in each param group (``group["lam"]``) and can be
      scheduled; a weight in a group with ``lam = 0`` gets no regularizer.
      With all ``lam`` equal (the usual case) the added gradient is exactly
      ``lam ∇ tr``.
    - ``torch.amp.GradScaler``: ``scaler.step(opt)`` unscales the gradients
      (through the shared ``param_groups``) before it calls ``opt.step``, so
      the regularizer is added to unscaled gradients, and skipped with the
      step when the scaler found infs.
    - ``DistributedDataParallel``: ``measurements`` on each rank are taken to
      be that rank's shard of the full set, and every rank applies the
      gradient of the trace over the union, all-reduced in one collective:
      ``Σ_r n_r ∇t_r / Σ_r n_r`` for ``reduction="mean"`` (``n_r`` the shard
      size), ``Σ_r ∇t_r`` for ``"sum"``.  ``Isotropic`` is a population, not
      a shard: it is never all-reduced.  Pass ``sharded=False`` when every
      rank holds the same measurements.

    Args:
        params: the layer weights ``[W_1, ..., W_L]`` in chain order
            (``W_j`` of shape ``(..., d_j, d_{j-1})``), a list of param groups
            whose params concatenate to that chain, or a ``flatkern.nn.DeepLinear``
            (possibly wrapped in ``DistributedDataParallel``; its biases are
            optimized but not regularized).
        base_optimizer: an optimizer class (or factory) called as
            ``base_optimizer(param_groups, **base_kwargs)``.
        lam: regularization strength ``>= 0`` (default for every group).
        measurements: a flatkern measurement family for ``E = W_L ⋯ W_1``.
        reduction: ``"mean"`` or ``"sum"``, the reduction of the regularized trace.
        backend: backend of ``hessian_trace`` (``"auto"`` picks the fast one).
        sharded: all-reduce the regularizer under ``torch.distributed`` (see above);
            ``None`` means: yes when a process group of size > 1 is initialized.
        process_group: the group to all-reduce over (default: the world).
        **base_kwargs: passed to ``base_optimizer`` (``lr``, ``momentum``, ...).
    """

    def __init__(
        self,
        params,
        base_optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.SGD,
        *,
        lam: float,
        measurements: Measurements,
        reduction: str = "mean",
        backend: str = "auto",
        sharded: bool | None = None,
        process_group=None,
        **base_kwargs,
    ):
        lam = _check_lam(lam)
        check_reduction(reduction)
        check_backend(backend)
        if not isinstance(measurements, Measurements):
            raise TypeError(
                "measurements must be a flatkern measurement family (Isotropic, Entries, RankOne, Dense, "
                f"Inputs), got {type(measurements).__name__}"
            )
        chain, groups = _split_params(params)
        self._weights = check_weights(chain, "params")
        d_L, d_0 = self._weights[-1].shape[-2], self._weights[0].shape[-1]
        measurements.check(d_L, d_0, self._weights[0])
        for g in groups:
            if isinstance(g, dict) and "lam" in g:
                _check_lam(g["lam"], "param group lam")

        super().__init__(groups, dict(lam=lam))
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        if not isinstance(self.base_optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"base_optimizer must build a torch.optim.Optimizer, got {type(self.base_optimizer).__name__}"
            )
        self._share_base_state()
        self.defaults.update(self.base_optimizer.defaults)
        self.measurements = measurements
        self.reduction = reduction
        self.backend = backend
        self.sharded = sharded
        self.process_group = process_group

    def _share_base_state(self) -> None:
        # one list of groups and one state dict: schedulers, zero_grad and
        # GradScaler.unscale_ see exactly what the base optimizer steps with
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    def add_param_group(self, param_group: dict) -> None:
        """Add a group (optimized by the base optimizer, regularized only if its params are in the chain)."""
        param_group.setdefault("lam", self.defaults["lam"])
        _check_lam(param_group["lam"], "param group lam")
        if hasattr(self, "base_optimizer"):
            self.base_optimizer.add_param_group(param_group)
        else:  # during __init__, before the base optimizer exists
            super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load the base optimizer's state and the groups' hyperparameters (``lam`` included)."""
        # Optimizer.load_state_dict replaces the groups list and the state: share the new ones
        self.base_optimizer.load_state_dict(state_dict)
        self._share_base_state()

    def _layer_lams(self) -> list[float]:
        lam_of = {id(p): g["lam"] for g in self.param_groups for p in g["params"]}
        return [float(lam_of.get(id(w), 0.0)) for w in self._weights]

    def _use_all_reduce(self) -> bool:
        if isinstance(self.measurements, Isotropic) or self.sharded is False:
            return False
        if not (dist.is_available() and dist.is_initialized()):
            if self.sharded:
                raise RuntimeError("FlatnessRegularized(sharded=True) needs an initialized torch.distributed process group")
            return False
        return self.sharded or dist.get_world_size(self.process_group) > 1

    def _all_reduce(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """Gradient of the trace over the union of the ranks' shards (one collective)."""
        d_L = self._weights[-1].shape[-2]
        n = float(self.measurements.num_measurements("sum", d_L)) if self.reduction == "mean" else 1.0
        flat = torch.cat([g.reshape(-1) * n for g in grads] + [grads[0].new_full((1,), n)])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.process_group)
        flat = flat[:-1] / flat[-1] if self.reduction == "mean" else flat[:-1]
        return [chunk.view_as(g) for chunk, g in zip(flat.split([g.numel() for g in grads]), grads)]

    def regularizer_grads(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(tr ∇²L, [∂ tr/∂W_1, ..., ∂ tr/∂W_L])`` at the current weights (all-reduced under DDP).

        The trace returned is this rank's (not all-reduced); the gradients are
        the ones ``step`` scales by ``lam`` and adds.
        """
        with torch.enable_grad():
            ws = [w.detach().requires_grad_() for w in self._weights]
            trace = hessian_trace(ws, self.measurements, reduction=self.reduction, backend=self.backend)
            grads = list(torch.autograd.grad(trace.sum(), ws))
        if self._use_all_reduce():
            grads = self._all_reduce(grads)
        return trace.detach(), grads

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """Evaluate ``closure`` (if given), add ``lam ∇ tr ∇²L`` to the gradients, step the base optimizer."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        lams = self._layer_lams()
        if any(lam != 0.0 for lam in lams):
            _, grads = self.regularizer_grads()
            for w, g, lam in zip(self._weights, grads, lams):
                if lam == 0.0:
                    continue
                if w.grad is None:
                    w.grad = (lam * g).to(w.dtype)
                else:
                    w.grad.add_(g, alpha=lam)
        self.base_optimizer.step()
        return loss

    def __repr__(self) -> str:
        lams = sorted({g["lam"] for g in self.param_groups})
        return (
            f"FlatnessRegularized(lam={lams[0] if len(lams) == 1 else lams}, measurements={self.measurements!r}, "
            f"reduction={self.reduction!r}, base={self.base_optimizer!r})"
        )
