"""A flatness-regularized optimizer: any torch optimizer plus ``lam * ∇ tr ∇²L``.

    g_j  ←  g_j + lam · ∂/∂W_j  tr ∇²L(W)              (then the base optimizer steps)

where ``tr ∇²L`` is ``flatkern.hessian_trace(weights, measurements, reduction=...)``
(docs/MATH.md): the exact trace of the Hessian of the MSE loss on ``measurements``.
The trace and its gradient come from one ``flatkern.hessian_trace_and_grad`` call
(one fused kernel on CPU, no autograd graph; a ``flatkern.TraceProblem`` checked once, at the
first step) and are added with one foreach op.

    >>> model = flatkern.nn.DeepLinear([5, 8, 8, 4])
    >>> opt = flatkern.optim.FlatnessRegularized(model, torch.optim.SGD, lam=1e-2,
    ...                                          measurements=meas, lr=0.1)
    >>> loss = flatkern.mse_loss(model.weights, meas, b); loss.backward(); opt.step()
    >>> opt.last_trace                                  # tr ∇²L before that step, for free

``FlatnessRegularizedMLP`` is its sibling for ``nn.Sequential`` networks of ``nn.Linear`` and
ReLU / LeakyReLU (``flatkern.hessian_trace_of``): the trace is taken on the minibatch passed
to each ``step(inputs=x)``, over every parameter of the model, biases included.

    >>> opt = flatkern.optim.FlatnessRegularizedMLP(model, torch.optim.SGD, lam=1e-3,
    ...                                             loss="cross_entropy", lr=0.1)
    >>> F.cross_entropy(model(x), y).backward(); opt.step(inputs=x)

One concern, the regularized optimizers, in one file over 600 lines: the two classes share their
base ``_Regularized`` (groups and state shared with the base optimizer, ``lam`` per group, the
closure protocol, ``state_dict``, hooks, the DDP all-reduce), and each half reads the other.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import optimizer as _torch_optimizer

from ._checks import check_backend, check_no_shared_memory, check_reduction, check_weights
from .kernels import families
from .measurements import Isotropic, Measurements
from .objective import check_lam
from .ops import TraceProblem

__all__ = ["FlatnessRegularized", "FlatnessRegularizedMLP"]

_INF = math.inf


# torch's registries of the global step hooks (``register_optimizer_step_pre_hook`` and
# ``..._post_hook``, mutated in place); a torch without them sends every step through the hooks
_GLOBAL_HOOKS = [getattr(_torch_optimizer, f"_global_optimizer_{when}_hooks", None) for when in ("pre", "post")]
_GLOBAL_HOOKS_KNOWN = all(isinstance(h, dict) for h in _GLOBAL_HOOKS)


#: whether this torch build has torch.distributed (fixed for the process; asked on every step otherwise)
_DIST_AVAILABLE = dist.is_available()


def _global_step_hooks() -> bool:
    """Whether a global optimizer step hook may be registered."""
    return not _GLOBAL_HOOKS_KNOWN or any(_GLOBAL_HOOKS)


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
    groups = _read_groups(params)
    if groups and all(isinstance(g, dict) for g in groups):
        chain = []
        for g in groups:
            ps = g["params"]
            chain.extend([ps] if isinstance(ps, torch.Tensor) else ps)
        return chain, groups
    return groups, groups


def _check_problem_lam(lam: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``lam``, one strength per problem, as a private tensor of ``like``'s dtype and device: a real
    tensor of the weights' batch shape ``like.shape[:-2]``, finite and ``>= 0``; else an error naming it."""
    batch = tuple(like.shape[:-2])
    if lam.dtype == torch.bool or lam.is_complex():
        raise TypeError(f"lam must be a number or a real tensor (one lam per problem), got dtype {lam.dtype}")
    if tuple(lam.shape) != batch:
        raise ValueError(f"lam has shape {tuple(lam.shape)}, but one lam per problem needs the weights' batch shape "
                         f"{batch} (weights[0] has shape {tuple(like.shape)}); pass a number for one lam for all")
    lam = lam.detach().to(dtype=like.dtype, device=like.device).clone()
    if not bool(((lam >= 0) & (lam < _INF)).all()):  # NaN fails both comparisons
        raise ValueError(f"lam must be finite and >= 0 for every problem, got {lam}")
    return lam


def _read_groups(params) -> list:
    """``list(params)``, each group's ``"params"`` read into a list: a generator there (``model[0].parameters()``)
    is read once, by these checks, and would leave the base optimizer an empty group that never steps."""
    groups = list(params)
    for g in groups:
        # a set is left to torch, which refuses it (no order); a list or a tensor is read as it is
        if isinstance(g, dict) and "params" in g and not isinstance(g["params"], (torch.Tensor, list, set, frozenset)):
            g["params"] = list(g["params"])
    return groups


def _chain_and_group_params(chain: list[torch.Tensor], groups) -> list[tuple[str, torch.Tensor]]:
    """Every parameter once, named: the chain by position, then what the groups add (biases)."""
    named = [(f"params[{j}] (layer W_{j + 1})", w) for j, w in enumerate(chain)]
    in_chain = {id(w) for w in chain}
    for i, g in enumerate(groups):
        if isinstance(g, dict):
            ps = g.get("params", [])
            ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
            named += [(f"param_groups[{i}]['params'][{k}]", p) for k, p in enumerate(ps)
                      if isinstance(p, torch.Tensor) and id(p) not in in_chain]
        elif isinstance(g, torch.Tensor) and id(g) not in in_chain:  # a DeepLinear's parameters(): a bias
            named.append((f"parameters()[{i}]", g))
    return named


def _needs_closure(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` takes a closure without a default (``torch.optim.LBFGS``)."""
    try:
        closure = inspect.signature(optimizer.step).parameters.get("closure")
    except (TypeError, ValueError):  # no signature to read: let the base optimizer say
        return False
    return closure is not None and closure.default is inspect.Parameter.empty


def _check_base_optimizer(base_optimizer, call: str = "FlatnessRegularized(params, torch.optim.{name}, lam=..., "
                          "measurements=..., lr=...)") -> None:
    if isinstance(base_optimizer, torch.optim.Optimizer):
        name = type(base_optimizer).__name__
        raise TypeError(
            f"base_optimizer must be an optimizer class or a factory, called as base_optimizer(param_groups, "
            f"**kwargs), got an already built {name}; pass the class and its arguments instead: "
            + call.format(name=name)
        )
    if not callable(base_optimizer):
        raise TypeError(
            "base_optimizer must be an optimizer class (torch.optim.SGD, ...) or a factory called as "
            f"base_optimizer(param_groups, **kwargs), got {type(base_optimizer).__name__}"
        )


def _add_to_grads(params: list[torch.Tensor], grads: list[torch.Tensor], lam: float | None, lams: list[float]) -> None:
    """``p.grad += lam_p · g`` for each parameter (``p.grad = lam_p · g`` where it has none).

    ``lam``: the common value of ``lams`` when they are all equal (and not 0), else ``None``.
    """
    if lam is not None:
        existing = []
        for p in params:
            g = p.grad
            if g is None or g.requires_grad:
                break
            existing.append(g)
        else:  # the usual case: one foreach op, and grad mode does not matter
            torch._foreach_add_(existing, grads, alpha=lam)
            return
    with torch.no_grad():  # a grad that requires grad (create_graph=True) must not record the add
        for p, g, lam_p in zip(params, grads, lams):
            if lam_p == 0.0:
                continue
            if p.grad is None:
                p.grad = torch.mul(g, lam_p)
            else:
                p.grad.add_(g, alpha=lam_p)


def _all_reduce_weighted(trace: torch.Tensor, grads: list[torch.Tensor], n: float, mean: bool,
                         group) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The trace and its gradient over the union of the ranks' samples, in one collective.

    ``Σ_r n_r t_r / Σ_r n_r`` (``mean``; ``n`` this rank's sample count) or ``Σ_r t_r``: the mean
    over the union is the sample-weighted mean of the ranks' means, whatever their sizes.
    """
    n = n if mean else 1.0
    parts = [trace.reshape(-1)] + [g.reshape(-1) for g in grads]
    flat = torch.cat(parts + [grads[0].new_ones(1)]) * n
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat = flat[:-1] / flat[-1] if mean else flat[:-1]
    chunks = flat.split([p.numel() for p in parts])
    return chunks[0].view_as(trace), [c.view_as(g) for c, g in zip(chunks[1:], grads)]


class _Regularized(torch.optim.Optimizer):
    """What the regularized optimizers share: the base optimizer's groups and state, ``lam`` in every
    group, ``load_state_dict`` that keeps ``lam``, the closure protocol, the all-reduce switch and the
    step hooks.  A subclass gives ``_held_params`` (every parameter held, named), ``_step`` and ``step``."""

    def _held_params(self) -> list[tuple[str, torch.Tensor]]:
        raise NotImplementedError

    def _init_groups(self, groups, lam: float, base_optimizer, base_kwargs: dict, *, reduction: str, backend: str,
                     sharded, process_group) -> None:
        """What both constructors end with: each group's ``lam`` checked, the groups held, the base
        optimizer built on them, and the options both optimizers keep."""
        for i, g in enumerate(groups):
            if isinstance(g, dict) and "lam" in g:
                g["lam"] = check_lam(g["lam"], f"param_groups[{i}]['lam']")
        super().__init__(groups, dict(lam=lam))
        self._attach_base(base_optimizer, base_kwargs)
        self.reduction = reduction
        self.backend = backend
        self.sharded = sharded
        self.process_group = process_group
        self.last_trace: torch.Tensor | None = None

    def _attach_base(self, base_optimizer, base_kwargs: dict) -> None:
        """Build the base optimizer on this optimizer's groups and share its groups and state."""
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        if not isinstance(self.base_optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"base_optimizer must build a torch.optim.Optimizer, got {type(self.base_optimizer).__name__}"
            )
        self._share_base_state()
        self._needs_closure = _needs_closure(self.base_optimizer)
        self.defaults.update(self.base_optimizer.defaults)

    def _share_base_state(self) -> None:
        # one list of groups and one state dict: schedulers, zero_grad and
        # GradScaler.unscale_ see exactly what the base optimizer steps with
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    def add_param_group(self, param_group: dict) -> None:
        """Add a group (optimized by the base optimizer, regularized only where the trace depends on its params).

        A param that is (or shares memory with) a param already held, or another of the group's, is a
        ``ValueError`` naming both, raised before anything changes.
        """
        param_group.setdefault("lam", self.defaults["lam"])
        param_group["lam"] = check_lam(param_group["lam"], f"param_groups[{len(self.param_groups)}]['lam']")
        if hasattr(self, "base_optimizer"):  # __init__ checked its groups all together
            ps = param_group.get("params", [])
            ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
            param_group["params"] = ps  # a generator is read once
            new = [(f"the added group's params[{k}]", p) for k, p in enumerate(ps) if isinstance(p, torch.Tensor)]
            check_no_shared_memory(self._held_params() + new)
            self.base_optimizer.add_param_group(param_group)
        else:  # during __init__, before the base optimizer exists
            super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load the base optimizer's state and the groups' hyperparameters (``lam`` included).

        A group of ``state_dict`` without ``lam`` (a plain optimizer's ``state_dict``, such as
        ``torch.optim.SGD``'s) keeps the ``lam`` of the group it replaces, position by position;
        a ``lam`` it has is checked (a ``ValueError`` naming it) before anything changes.
        """
        saved = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if isinstance(saved, (list, tuple)):
            for i, g in enumerate(saved):
                if isinstance(g, dict) and "lam" in g:
                    check_lam(g["lam"], f"state_dict['param_groups'][{i}]['lam']")
        lams = [g.get("lam", self.defaults["lam"]) for g in self.param_groups]
        # Optimizer.load_state_dict replaces the groups list and the state: share the new ones
        self.base_optimizer.load_state_dict(state_dict)
        self._share_base_state()
        # the loaded groups replace the old ones whole (torch keeps only their params): without this
        # a plain optimizer's state_dict would leave groups with no lam, and steps with no regularizer
        for g, lam in zip(self.param_groups, lams):
            g.setdefault("lam", lam)

    def _group_lams(self) -> list[float]:
        """Each group's ``lam``, checked: a ``ValueError`` (``TypeError``) naming the group."""
        lams = []
        for i, g in enumerate(self.param_groups):
            lam = g.get("lam")
            # passes exactly the finite floats >= 0 (NaN fails both comparisons); the rest is checked in full
            if type(lam) is not float or not 0.0 <= lam < _INF:
                if "lam" not in g:  # e.g. added to the base optimizer directly: no silent lam = 0
                    raise ValueError(f"param_groups[{i}] has no 'lam': set param_groups[{i}]['lam'] (0.0 for no "
                                     f"regularizer), or add groups through {type(self).__name__}.add_param_group")
                lam = check_lam(lam, f"param_groups[{i}]['lam']")
            lams.append(lam)
        return lams

    def _group_index(self) -> dict[int, int]:
        """``id(param) -> index of its group``: rebuilt when the groups list is replaced or grows."""
        groups = self.param_groups
        if groups is not self.__dict__.get("_indexed_groups") or len(groups) != self._indexed_count:
            self._where = {id(p): i for i, g in enumerate(groups) for p in g["params"]}
            self._indexed_groups, self._indexed_count = groups, len(groups)
            self._on_regroup()
        return self._where

    def _on_regroup(self) -> None:
        """Called when ``_group_index`` rebuilds its map (a subclass caches what depends on it)."""

    def _trace_sum(self, trace: torch.Tensor) -> torch.Tensor:
        """What ``lam`` multiplies in the closure's value: the trace summed over a batch of problems."""
        return trace.sum()

    def _use_all_reduce(self) -> bool:
        if self.sharded is False:
            return False
        if not (_DIST_AVAILABLE and dist.is_initialized()):
            if self.sharded:
                raise RuntimeError(f"{type(self).__name__}(sharded=True) needs an initialized torch.distributed "
                                   "process group")
            return False
        return self.sharded or dist.get_world_size(self.process_group) > 1

    def _wants_hooks(self) -> bool:
        # torch.optim.Optimizer wraps every step in a profiler range and its hooks; the range alone
        # costs a few µs, a measurable part of a d = 30 step, so it runs only when something sees it
        return bool(self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks or _global_step_hooks()
                    or torch.autograd._profiler_enabled())

    def _call_step(self, *args, **kwargs):
        return self._step(*args, **kwargs)

    # the hooks and the profiler range "Optimizer.step#<class>.step" around _step, as torch's own step has them
    _hooked_step = torch.optim.Optimizer.profile_hook_step(_call_step)

    def _run_step(self, closure, lam: float | None, regularize: Callable[[], torch.Tensor | None]):
        """Step with ``regularize()`` (adds ``lam ∇ tr`` to the grads, returns the trace or ``None``).

        With ``closure`` every evaluation the base optimizer makes gets the regularizer at its own
        weights and returns ``closure() + lam · tr`` (``lam`` must then be one number).
        """
        if closure is None:
            if self._needs_closure:
                raise TypeError(
                    f"{type(self.base_optimizer).__name__}.step needs a closure that recomputes the loss and "
                    "its gradients: call opt.step(closure)"
                )
            self.last_trace = regularize()
            self.base_optimizer.step()
            return None
        traces = []

        def regularized_closure():
            with torch.enable_grad():
                loss = closure()
            trace = regularize()
            traces.append(trace)
            if trace is None or loss is None:
                return loss
            with torch.no_grad():
                return loss + lam * self._trace_sum(trace)

        loss = self.base_optimizer.step(regularized_closure)
        # the first evaluation is at the weights before the step
        self.last_trace = traces[0] if traces else None
        return loss


class FlatnessRegularized(_Regularized):
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
      scheduled; it is read, and checked (a finite number ``>= 0``, else a
      ``ValueError`` naming the group, raised before anything changes), at
      every ``step``.  A weight in a group with ``lam = 0`` gets no regularizer.
      With all ``lam`` equal (the usual case) the added gradient is exactly
      ``lam ∇ tr``.
    - Batched weights ``(..., d_j, d_{j-1})`` are independent problems (issue 21),
      each measured by its own set or by one shared set: the added gradient of
      problem ``p`` is that of its own trace.  ``lam`` may then be a tensor of the
      weights' batch shape ``(...)``, one strength per problem (``problem_lam``,
      checked once); the groups' ``lam`` (default 1.0) multiplies it, so
      problem ``p`` gets ``group["lam"] · lam[p] · ∇ tr_p``.  With an elementwise
      base optimizer (SGD, Adam, ...) one optimizer then steps the problems as
      separate runs would; one that couples entries (LBFGS's line search) does not.
    - ``step(closure)``: the closure is wrapped so that every evaluation the
      base optimizer makes (``torch.optim.LBFGS`` makes several, in its line
      search) sees the regularized objective: the gradients get
      ``lam ∇ tr`` at the weights of that evaluation, and the value returned is
      ``closure() + lam · tr`` (the trace summed over a batch of problems).  The
      value needs one ``lam`` for every layer weight (else a ``ValueError``).
    - ``last_trace``: after each ``step``, the trace at the weights before that
      step (detached; shape ``(...)``, one value per problem for batched
      weights; the trace over all ranks' shards under DDP).  Logging flatness
      costs nothing: the step computes it anyway.  ``None`` before the first
      step and after a step with every ``lam`` zero (then nothing is computed).
    - ``torch.amp.GradScaler``: ``scaler.step(opt)`` unscales the gradients
      (through the shared ``param_groups``) before it calls ``opt.step``, so
      the regularizer is added to unscaled gradients, and skipped with the
      step when the scaler found infs.
    - ``DistributedDataParallel``: ``measurements`` on each rank are taken to
      be that rank's shard of the full set, and every rank applies the
      gradient of the trace over the union, all-reduced in one collective:
      ``Σ_r n_r ∇t_r / Σ_r n_r`` for ``reduction="mean"`` (``n_r`` the shard
      size), ``Σ_r ∇t_r`` for ``"sum"`` (the trace itself likewise, in the same
      collective).  ``Isotropic`` is a population, not a shard: it is never
      all-reduced.  Pass ``sharded=False`` when every rank holds the same
      measurements.

    Args:
        params: the layer weights ``[W_1, ..., W_L]`` in chain order
            (``W_j`` of shape ``(..., d_j, d_{j-1})``), a list of param groups
            whose params concatenate to that chain, or a ``flatkern.nn.DeepLinear``
            (possibly wrapped in ``DistributedDataParallel``; its biases are
            optimized but not regularized).
        base_optimizer: an optimizer class (or factory) called as
            ``base_optimizer(param_groups, **base_kwargs)``; not an optimizer object.
        lam: regularization strength ``>= 0`` (default for every group), or a tensor of the
            weights' batch shape: one strength per problem (see above).
        measurements: a flatkern measurement family for ``E = W_L ⋯ W_1`` (one set shared by
            every problem of batched weights, or one per problem: ``flatkern.measurements``).
        reduction: ``"mean"`` or ``"sum"``, the reduction of the regularized trace.
        backend: backend of the trace (``"auto"`` picks the fast one).
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
        problem_lam, lam = (lam, 1.0) if isinstance(lam, torch.Tensor) else (None, check_lam(lam))
        _check_base_optimizer(base_optimizer)
        check_reduction(reduction)
        check_backend(backend)
        if not isinstance(measurements, Measurements):
            raise TypeError(
                f"measurements must be a flatkern measurement family ({families.families_message()}), "
                f"got {type(measurements).__name__}"
            )
        chain, groups = _split_params(params)
        self._weights = check_weights(chain, "params")
        #: one lam per problem (the weights' batch shape), or None
        self.problem_lam = None if problem_lam is None else _check_problem_lam(problem_lam, self._weights[0])
        check_no_shared_memory(_chain_and_group_params(self._weights, groups))
        # the measurements, widths, dtype and route, checked once: each step re-checks only what can change
        self._problem = TraceProblem(self._weights, measurements, reduction=reduction, backend=backend)
        self._init_groups(groups, lam, base_optimizer, base_kwargs, reduction=reduction, backend=backend,
                          sharded=sharded, process_group=process_group)
        self.measurements = measurements
        # which group holds each weight: rebuilt when the groups list is replaced or grows
        self._indexed_groups: list | None = None
        self._indexed_count = 0
        self._weight_group: list[int] = []

    def _held_params(self) -> list[tuple[str, torch.Tensor]]:
        return _chain_and_group_params(self._weights, self.param_groups)

    def _on_regroup(self) -> None:
        self._weight_group = [self._where.get(id(w), -1) for w in self._weights]
        self._one_group = len(self.param_groups) == 1 and self._weight_group == [0] * len(self._weights)

    def _layer_lams(self) -> tuple[float | None, list[float]]:
        """``(lam, lams)``: each weight's ``lam``, and ``lam`` when they are all equal (else ``None``).

        Every group's ``lam`` is checked: a ``ValueError`` (``TypeError``) naming the group.
        """
        groups = self.param_groups
        if groups is self._indexed_groups and len(groups) == 1 and self._one_group:
            lam = groups[0].get("lam")  # the usual case, every step: one group, a valid float lam
            if type(lam) is float and 0.0 <= lam < _INF:
                return lam, [lam] * len(self._weights)
        self._group_index()
        lams = self._group_lams()
        if self._one_group:  # the usual case
            return lams[0], lams * len(self._weights)
        per_layer = [lams[i] if i >= 0 else 0.0 for i in self._weight_group]
        return (per_layer[0] if per_layer.count(per_layer[0]) == len(per_layer) else None), per_layer

    def _use_all_reduce(self) -> bool:
        # Isotropic is a population, not a shard: every rank already has the whole trace
        return not isinstance(self.measurements, Isotropic) and _Regularized._use_all_reduce(self)

    def _all_reduce(self, trace: torch.Tensor, grads: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The trace and its gradient over the union of the ranks' shards (one collective)."""
        d_L = self._weights[-1].shape[-2]
        n = float(self.measurements.num_measurements("sum", d_L)) if self.reduction == "mean" else 1.0
        return _all_reduce_weighted(trace, grads, n, self.reduction == "mean", self.process_group)

    def regularizer_grads(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(tr ∇²L, [∂ tr/∂W_1, ..., ∂ tr/∂W_L])`` at the current weights (all-reduced under DDP).

        The gradients are of the trace summed over a batch of problems, the
        ones ``step`` scales by ``lam`` and adds; neither output requires grad.
        """
        trace, grads = self._current_problem()(self._weights)
        if self._use_all_reduce():
            trace, grads = self._all_reduce(trace, grads)
        return trace, grads

    def _current_problem(self) -> TraceProblem:
        # checked once (measurements, widths, dtype, route); each step re-checks only the shapes,
        # dtype and device of the weights, which is all that can change
        problem = self.__dict__.get("_problem")
        if problem is None or problem.measurements is not self.measurements or problem.reduction != self.reduction \
                or problem.backend != self.backend:
            problem = self._problem = TraceProblem(self._weights, self.measurements, reduction=self.reduction,
                                                   backend=self.backend)
        return problem

    def _add_regularizer(self, lam: float | None, lams: list[float]) -> torch.Tensor | None:
        """Add ``lam_j ∂ tr/∂W_j`` to each ``W_j.grad``; the trace (``None`` when every ``lam`` is 0).

        ``lam``: the common value of ``lams`` (``None`` if they differ).
        """
        if lam == 0.0:
            return None
        if lam is not None and self.problem_lam is None:
            into = []
            for w in self._weights:  # every .grad, each a plain tensor (not one that records a graph)
                g = w.grad
                if g is None or g.requires_grad:
                    into = None
                    break
                into.append(g)
            if into is not None and not self._use_all_reduce():
                # the usual step: W_j.grad += lam ∂ tr/∂W_j inside the kernel's own call
                return self._current_problem().accumulate(self._weights, into, lam)
        trace, grads = self.regularizer_grads()  # never requires grad: no graph, whatever the grad mode
        if self.problem_lam is not None:  # problem p's gradient scaled by its own lam
            scale = self.problem_lam[..., None, None]
            grads = [g * scale for g in grads]
        _add_to_grads(self._weights, grads, lam, lams)
        return trace

    def _trace_sum(self, trace: torch.Tensor) -> torch.Tensor:
        return trace.sum() if self.problem_lam is None else (self.problem_lam * trace).sum()

    def state_dict(self) -> dict:
        """The base optimizer's ``state_dict`` (each group's ``lam`` included), and ``problem_lam`` when
        there is one lam per problem."""
        state = super().state_dict()
        if self.problem_lam is not None:
            state["problem_lam"] = self.problem_lam.clone()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """As ``_Regularized.load_state_dict``; a saved ``problem_lam`` (checked against the weights'
        batch shape before anything changes) replaces this optimizer's, and without one it keeps its own."""
        problem_lam = state_dict.get("problem_lam") if isinstance(state_dict, dict) else None
        if problem_lam is not None:
            if not isinstance(problem_lam, torch.Tensor):
                raise TypeError(f"state_dict['problem_lam'] must be a tensor, got {type(problem_lam).__name__}")
            problem_lam = _check_problem_lam(problem_lam, self._weights[0])
            state_dict = {k: v for k, v in state_dict.items() if k != "problem_lam"}
        super().load_state_dict(state_dict)
        if problem_lam is not None:
            self.problem_lam = problem_lam

    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """Add ``lam ∇ tr ∇²L`` to the gradients and step the base optimizer.

        With ``closure``, the base optimizer gets a closure that evaluates
        ``closure()`` (grad enabled), adds the regularizer's gradient at the
        weights of that evaluation and returns ``closure() + lam · tr``; what the
        base optimizer's step returns (the first evaluation's value) is returned.
        """
        return self._hooked_step(closure) if self._wants_hooks() else self._step(closure)

    step.hooked = True  # tells Optimizer.__init__ not to wrap it: step does so itself when it matters

    def _step(self, closure):
        lam, lams = self._layer_lams()  # raises on a bad lam before any gradient or weight changes
        if closure is None and lam is not None and not self._needs_closure:
            # the usual step, what _run_step does without a closure, with two calls fewer (a d = 30
            # step is ~120 µs, and the regularizer may add a quarter of that, all of it included)
            self.last_trace = self._add_regularizer(lam, lams)
            self.base_optimizer.step()
            return None
        if closure is not None and lam is None:
            raise ValueError(
                "step(closure) evaluates loss + lam * trace, which needs one lam for every layer weight "
                f"W_1, ..., W_L, got the lams {lams} (one per layer); without a closure, lams may differ by group"
            )
        return self._run_step(closure, lam, lambda: self._add_regularizer(lam, lams))

    def __repr__(self) -> str:
        # never raises, whatever the groups hold (a group without lam, a lam of any type)
        lams = list(dict.fromkeys(repr(g.get("lam", "missing")) for g in self.param_groups))
        lam = lams[0] if len(lams) == 1 else "[" + ", ".join(lams) + "]"
        problem_lam = getattr(self, "problem_lam", None)
        if problem_lam is not None:  # the groups' lam multiplies one lam per problem
            lam = f"{lam} x {problem_lam.tolist()}"
        return (
            f"FlatnessRegularized(lam={lam}, measurements={self.measurements!r}, "
            f"reduction={self.reduction!r}, base={self.base_optimizer!r})"
        )


def _autocast_off(device_type: str):
    """A context that turns autocast off for ``device_type`` (a no-op where it is off or does not exist)."""
    try:
        on = torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta, ...): nothing to turn off
        on = False
    return torch.autocast(device_type, enabled=False) if on else contextlib.nullcontext()


class FlatnessRegularizedMLP(_Regularized):
    """Wraps ``base_optimizer`` and adds ``lam * ∇ tr ∇²L`` on the current minibatch at every ``step(inputs=x)``.

    For a network ``model`` piecewise linear in each weight (what ``flatkern.hessian_trace_of``
    takes: an ``nn.Sequential``, nested too, of ``nn.Linear`` with or without bias, ``nn.ReLU``,
    ``nn.LeakyReLU``, ``nn.Identity``, ``nn.Flatten``, ``nn.Dropout``) the regularized objective
    on a minibatch ``(x, y)`` is

        L(θ; x, y) + lam · tr ∇²_θ L(θ; x)          θ = every parameter of ``model``, biases included

    with ``tr ∇²_θ L(θ; x) = flatkern.hessian_trace_of(model, x, loss=loss, reduction=reduction)``,
    the exact trace (the Gauss-Newton trace, docs/MATH.md "Beyond linear"; it does not depend on
    the targets ``y``).  Gradients of ``L`` come from the user's ``backward()``; ``step(inputs=x)``
    takes the trace and its gradient in one ``flatkern.hessian_trace_and_grad_of`` call (a forward
    and a reverse sweep, no autograd graph), adds ``lam_p ∂ tr/∂p`` to each ``p.grad`` and steps the
    base optimizer.  The ``loss`` and ``reduction`` named here must be the ones the model is trained
    with: they define which Hessian's trace is penalized.

    - ``param_groups`` and ``state`` are the base optimizer's (the same objects): learning-rate
      schedulers, ``zero_grad`` and ``state_dict()`` / ``load_state_dict()`` act on both, and
      ``load_state_dict`` keeps each group's ``lam`` (a plain optimizer's ``state_dict`` has none).
    - ``lam`` lives in each param group (``group["lam"]``), can be scheduled, and is checked (a
      finite number ``>= 0``, else a ``ValueError`` naming the group, before anything changes) at
      every ``step``.  A parameter of ``model`` gets its group's ``lam`` (``lam = 0``: nothing).  A
      parameter of ``model`` in no group, or with ``requires_grad=False``, is not touched; the trace
      is still over all of ``model``'s parameters (``hessian_trace_of``'s definition).  A
      parameter in a group that is not ``model``'s (a temperature, say) is stepped but the trace
      does not depend on it.
    - ``inputs`` (keyword, required): the minibatch the trace is taken on, usually the one the
      loss of this step was computed on: ``(N, d_0)`` (for ``"mse"`` any ``(..., d_0)``, and
      ``(N, ...)`` when a Flatten comes first), the model's dtype and device.  Taking it explicitly
      (not from a hook on ``forward``) keeps the batch of the trace the caller's choice.
    - ``nn.Dropout`` in train mode: the trace and its gradient are those of the network with
      dropout as the identity, i.e. of the eval-mode network (a train-mode dropout draws a fresh
      random mask on each call, so there is no one network whose Hessian to take); the modules are
      switched to eval for the trace only and switched back.  Anything else the trace formula does
      not cover (a smooth activation, BatchNorm, tied weights, forward hooks) raises when the
      optimizer is built, with ``hessian_trace_of``'s error naming the module.
    - At a kink (a pre-activation exactly 0) the mask is torch's one-sided derivative, as in
      ``hessian_trace_of``: exact almost everywhere.
    - ``step(closure, inputs=x)``: every evaluation the base optimizer makes (``torch.optim.LBFGS``
      makes several) gets ``lam ∇ tr`` at its own weights and returns ``closure() + lam · tr``; this
      needs one ``lam`` for every regularized parameter (else a ``ValueError``).
    - ``last_trace``: after each ``step``, the trace on ``inputs`` at the weights before the step
      (a detached scalar; over all ranks' batches under DDP), free since the step computes it.
      ``None`` before the first step and after a step with every ``lam`` zero (nothing computed).
    - ``torch.amp.GradScaler``: ``scaler.step(opt, inputs=x)`` unscales the gradients (through the
      shared ``param_groups``) before it calls ``opt.step(inputs=x)``, so the regularizer is added
      to unscaled gradients, and skipped with the step when the scaler found infs.  The trace is
      computed with autocast off, in the parameters' dtype.
    - ``DistributedDataParallel`` (``model`` wrapped or not): each rank's ``inputs`` are its part of
      the global batch, and every rank applies the gradient of the trace over the union, all-reduced
      in one collective: ``Σ_r n_r ∇t_r / Σ_r n_r`` for ``reduction="mean"`` (``n_r`` the rank's
      samples, as the mean counts them), ``Σ_r ∇t_r`` for ``"sum"``; the trace likewise.  Pass
      ``sharded=False`` when every rank holds the same batch.

    Args:
        model: the network (possibly wrapped in ``DistributedDataParallel`` or ``torch.compile``).
        base_optimizer: an optimizer class (or factory) called as
            ``base_optimizer(param_groups, **base_kwargs)``; not an optimizer object.
        lam: regularization strength ``>= 0`` (default for every group).
        loss: ``"cross_entropy"`` (``nn.CrossEntropyLoss`` on logits) or ``"mse"`` (``nn.MSELoss``
            over the ``(N, C)`` output); no default, as a wrong one would penalize another Hessian.
        reduction: ``"mean"`` or ``"sum"``, that of the loss (``"mean"`` divides by ``N C`` for
            MSE, by ``N`` for cross-entropy).
        params: what the base optimizer steps (tensors or param groups, which may carry ``lam``);
            default ``model.parameters()``.
        backend: backend of the trace (``"auto"``: the fused op ``flatkern::mlp_hessian_trace``, C++ on
            CPU, Triton on CUDA; ``"cpp"``/``"triton"``: that kernel or an error; ``"torch"``: plain torch).
        sharded: all-reduce the regularizer under ``torch.distributed`` (see above); ``None``
            means: yes when a process group of size > 1 is initialized.
        process_group: the group to all-reduce over (default: the world).
        **base_kwargs: passed to ``base_optimizer`` (``lr``, ``momentum``, ...).

    Example::

        opt = FlatnessRegularizedMLP(model, torch.optim.SGD, lam=1e-3, loss="cross_entropy", lr=0.1)
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step(inputs=x)           # adds lam ∇ tr ∇²L(x), then the SGD step
            opt.last_trace               # tr ∇²L(x) before the step
    """

    def __init__(
        self,
        model: nn.Module,
        base_optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.SGD,
        *,
        lam: float,
        loss: str,
        reduction: str = "mean",
        params=None,
        backend: str = "auto",
        sharded: bool | None = None,
        process_group=None,
        **base_kwargs,
    ):
        from . import piecewise
        from .nn import LOSSES

        lam = check_lam(lam)
        _check_base_optimizer(base_optimizer, "FlatnessRegularizedMLP(model, torch.optim.{name}, lam=..., loss=..., "
                                              "lr=...)")
        if not isinstance(loss, str) or loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, the loss the model is trained with, got {loss!r}")
        check_reduction(reduction)
        check_backend(backend)
        if not isinstance(model, nn.Module):
            raise TypeError(
                "model must be an nn.Module (an nn.Sequential of nn.Linear / nn.ReLU / nn.LeakyReLU ...), got "
                f"{type(model).__name__}; FlatnessRegularized takes a deep linear network's weights"
            )
        on = _train_mode_dropout(model)[0]
        try:
            piecewise.walk(model)  # an unsupported model raises now, naming the module, not at the first step
        finally:
            _set_training(on, True)
        if params is None:
            groups = list(model.parameters())
        elif isinstance(params, torch.Tensor):
            raise TypeError(f"params must be an iterable of tensors or param groups, got a single tensor of shape "
                            f"{tuple(params.shape)}; wrap it in a list")
        else:
            groups = _read_groups(params)
        check_no_shared_memory(_chain_and_group_params([], groups))
        self._init_groups(groups, lam, base_optimizer, base_kwargs, reduction=reduction, backend=backend,
                          sharded=sharded, process_group=process_group)
        self.model = model
        self.loss = loss

    def _held_params(self) -> list[tuple[str, torch.Tensor]]:
        return _chain_and_group_params([], self.param_groups)

    def _param_lams(self, params: list[torch.Tensor]) -> tuple[float | None, list[tuple[int, float]]]:
        """``(lam, picked)``: ``picked`` the ``(k, lam_k)`` of each ``params[k]`` (a parameter of the model)
        that is in a group and requires grad, ``lam`` their common ``lam`` (``None`` if they differ, 0 if none).

        Every group's ``lam`` is checked: a ``ValueError`` (``TypeError``) naming the group.
        """
        where = self._group_index()
        lams = self._group_lams()
        picked = [(k, lams[i]) for k, p in enumerate(params) if p.requires_grad and (i := where.get(id(p), -1)) >= 0]
        if not picked:
            return 0.0, picked
        first = picked[0][1]
        return (first if all(lam == first for _, lam in picked) else None), picked

    def regularizer_grads(self, inputs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(tr ∇²L(inputs), [∂ tr/∂p for p in model.parameters()])`` at the current weights.

        ``hessian_trace_and_grad_of(model, inputs, loss=..., reduction=...)`` with train-mode dropout
        as the identity and autocast off, all-reduced over the ranks under DDP (see the class);
        neither output requires grad.
        """
        from .nn import hessian_trace_and_grad_of

        on, first = _train_mode_dropout(self.model)
        try:
            with _autocast_off(inputs.device.type if isinstance(inputs, torch.Tensor) else "cpu"):
                trace, grads = hessian_trace_and_grad_of(self.model, inputs, loss=self.loss, reduction=self.reduction,
                                                         backend=self.backend)
        finally:
            _set_training(on, True)
        if grads and self._use_all_reduce():
            # the samples the mean counts: the rows of the first layer's input (the steps before it keep numel)
            n = float(inputs.numel() // first.in_features)
            trace, grads = _all_reduce_weighted(trace, grads, n, self.reduction == "mean", self.process_group)
        return trace, grads

    def _add_regularizer(self, inputs, params: list[torch.Tensor], lam: float | None,
                         picked: list[tuple[int, float]]) -> torch.Tensor | None:
        """Add ``lam_p ∂ tr/∂p`` to each picked ``p.grad``; the trace (``None`` when every ``lam`` is 0)."""
        if lam == 0.0:
            return None
        trace, grads = self.regularizer_grads(inputs)
        if len(grads) != len(params):
            raise RuntimeError("the model's parameters changed during the step: "
                               f"{len(params)} before the trace, {len(grads)} after")
        _add_to_grads([params[k] for k, _ in picked], [grads[k] for k, _ in picked], lam,
                      [lam_k for _, lam_k in picked])
        return trace

    def step(self, closure: Callable[[], torch.Tensor] | None = None, *, inputs: torch.Tensor | None = None):
        """Add ``lam ∇ tr ∇²L(inputs)`` to the gradients and step the base optimizer.

        ``inputs``: the minibatch the trace is taken on (required).  With ``closure``, every
        evaluation the base optimizer makes gets the regularizer's gradient at its own weights and
        returns ``closure() + lam · tr``; what the base optimizer's step returns is returned.
        """
        if self._wants_hooks():
            return self._hooked_step(closure, inputs=inputs)
        return self._step(closure, inputs=inputs)

    step.hooked = True  # tells Optimizer.__init__ not to wrap it: step does so itself when it matters

    def _step(self, closure=None, *, inputs=None):
        params = list(self.model.parameters())
        lam, picked = self._param_lams(params)  # raises on a bad lam before any gradient or weight changes
        if inputs is None:
            raise TypeError(
                "FlatnessRegularizedMLP.step needs the minibatch the trace is taken on: opt.step(inputs=x) "
                "(scaler.step(opt, inputs=x) under a GradScaler), x the inputs the loss of this step was computed on"
            )
        if closure is not None and lam is None:
            raise ValueError(
                "step(closure) evaluates loss + lam * trace, which needs one lam for every regularized parameter, "
                f"got the lams {sorted({lam_k for _, lam_k in picked})}; without a closure, lams may differ by group"
            )
        return self._run_step(closure, lam, lambda: self._add_regularizer(inputs, params, lam, picked))

    def __repr__(self) -> str:
        # never raises, whatever the groups hold (a group without lam, a lam of any type)
        lams = list(dict.fromkeys(repr(g.get("lam", "missing")) for g in self.param_groups))
        lam = lams[0] if len(lams) == 1 else "[" + ", ".join(lams) + "]"
        return (f"FlatnessRegularizedMLP(lam={lam}, loss={self.loss!r}, reduction={self.reduction!r}, "
                f"base={self.base_optimizer!r})")


def _train_mode_dropout(model: nn.Module) -> tuple[list[nn.Module], nn.Linear | None]:
    """The dropout modules of ``model`` in train mode, now switched to eval (``_set_training(on, True)``
    switches them back), and the first ``nn.Linear`` (the first layer: ``modules()`` walks a
    Sequential in its forward order)."""
    on, first = [], None
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training:
            on.append(m)
        elif first is None and isinstance(m, nn.Linear):
            first = m
    _set_training(on, False)
    return on, first


def _set_training(modules: list[nn.Module], mode: bool) -> None:
    for m in modules:
        m.training = mode  # leaves: no children to recurse into
