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
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import optimizer as _torch_optimizer

from ._checks import check_backend, check_reduction, check_weights
from .kernels import families
from .measurements import Isotropic, Measurements
from .objective import check_lam
from .ops import TraceProblem

__all__ = ["FlatnessRegularized"]

_INF = math.inf


# torch's registries of the global step hooks (``register_optimizer_step_pre_hook`` and
# ``..._post_hook``, mutated in place); a torch without them sends every step through the hooks
_GLOBAL_HOOKS = [getattr(_torch_optimizer, f"_global_optimizer_{when}_hooks", None) for when in ("pre", "post")]
_GLOBAL_HOOKS_KNOWN = all(isinstance(h, dict) for h in _GLOBAL_HOOKS)


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
    groups = list(params)
    if groups and all(isinstance(g, dict) for g in groups):
        chain = []
        for g in groups:
            ps = g["params"]
            chain.extend([ps] if isinstance(ps, torch.Tensor) else list(ps))
        return chain, groups
    return groups, groups


def _memory_span(t: torch.Tensor):
    """``(device, first byte, end byte)`` of the memory ``t`` can read; ``None`` when it reads none."""
    if t.numel() == 0 or t.device.type == "meta":
        return None
    try:
        start = t.data_ptr()
    except (RuntimeError, NotImplementedError):  # a tensor subclass without storage: nothing to compare
        return None
    span = 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
    return (str(t.device), start, start + span * t.element_size())


def _check_no_shared_memory(named: list[tuple[str, torch.Tensor]]) -> None:
    """Raise if two of the tensors are the same one or overlap in memory (views of one storage).

    A layer used at two positions of the chain (tied weights) has a Hessian trace that is not
    the per-position one flatkern computes (it depends on the targets), and a parameter stepped
    through two views is stepped twice.  Overlap is judged on the address ranges, so two
    interleaved views (``W[:, ::2]``, ``W[:, 1::2]``) are refused too.
    """
    spans = sorted(((*span, name) for name, t in named if (span := _memory_span(t)) is not None),
                   key=lambda s: (s[0], s[1]))
    reach = None  # (device, end, name) of the span reaching furthest so far
    for device, start, end, name in spans:
        if reach is not None and reach[0] == device and start < reach[1]:
            raise ValueError(
                f"{reach[2]} and {name} are the same tensor or share memory (views of one storage): a layer "
                "used at two positions (tied weights) has a Hessian trace that depends on the targets, not "
                "the per-position trace flatkern computes, and a parameter reached twice is stepped twice; "
                "pass separate tensors"
            )
        if reach is None or reach[0] != device or end > reach[1]:
            reach = (device, end, name)


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


def _check_base_optimizer(base_optimizer) -> None:
    if isinstance(base_optimizer, torch.optim.Optimizer):
        name = type(base_optimizer).__name__
        raise TypeError(
            f"base_optimizer must be an optimizer class or a factory, called as base_optimizer(param_groups, "
            f"**kwargs), got an already built {name}; pass the class and its arguments instead: "
            f"FlatnessRegularized(params, torch.optim.{name}, lam=..., measurements=..., lr=...)"
        )
    if not callable(base_optimizer):
        raise TypeError(
            "base_optimizer must be an optimizer class (torch.optim.SGD, ...) or a factory called as "
            f"base_optimizer(param_groups, **kwargs), got {type(base_optimizer).__name__}"
        )


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
      scheduled; it is read, and checked (a finite number ``>= 0``, else a
      ``ValueError`` naming the group, raised before anything changes), at
      every ``step``.  A weight in a group with ``lam = 0`` gets no regularizer.
      With all ``lam`` equal (the usual case) the added gradient is exactly
      ``lam ∇ tr``.
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
        lam: regularization strength ``>= 0`` (default for every group).
        measurements: a flatkern measurement family for ``E = W_L ⋯ W_1``.
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
        lam = check_lam(lam)
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
        _check_no_shared_memory(_chain_and_group_params(self._weights, groups))
        # the measurements, widths, dtype and route, checked once: each step re-checks only what can change
        self._problem = TraceProblem(self._weights, measurements, reduction=reduction, backend=backend)
        for i, g in enumerate(groups):
            if isinstance(g, dict) and "lam" in g:
                g["lam"] = check_lam(g["lam"], f"param_groups[{i}]['lam']")

        super().__init__(groups, dict(lam=lam))
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        if not isinstance(self.base_optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"base_optimizer must build a torch.optim.Optimizer, got {type(self.base_optimizer).__name__}"
            )
        self._share_base_state()
        self._needs_closure = _needs_closure(self.base_optimizer)
        self.defaults.update(self.base_optimizer.defaults)
        self.measurements = measurements
        self.reduction = reduction
        self.backend = backend
        self.sharded = sharded
        self.process_group = process_group
        self.last_trace: torch.Tensor | None = None
        # which group holds each weight: rebuilt when the groups list is replaced or grows
        self._indexed_groups: list | None = None
        self._indexed_count = 0
        self._weight_group: list[int] = []

    def _share_base_state(self) -> None:
        # one list of groups and one state dict: schedulers, zero_grad and
        # GradScaler.unscale_ see exactly what the base optimizer steps with
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    def add_param_group(self, param_group: dict) -> None:
        """Add a group (optimized by the base optimizer, regularized only if its params are in the chain).

        A param that is (or shares memory with) a param already held, or another of the group's, is a
        ``ValueError`` naming both, raised before anything changes.
        """
        param_group.setdefault("lam", self.defaults["lam"])
        param_group["lam"] = check_lam(param_group["lam"], f"param_groups[{len(self.param_groups)}]['lam']")
        if hasattr(self, "base_optimizer"):  # __init__ checked its groups all together
            ps = param_group.get("params", [])
            ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
            param_group["params"] = ps  # a generator is read once
            held = _chain_and_group_params(self._weights, self.param_groups)
            new = [(f"the added group's params[{k}]", p) for k, p in enumerate(ps) if isinstance(p, torch.Tensor)]
            _check_no_shared_memory(held + new)
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

    def _layer_lams(self) -> tuple[float | None, list[float]]:
        """``(lam, lams)``: each weight's ``lam``, and ``lam`` when they are all equal (else ``None``).

        Every group's ``lam`` is checked: a ``ValueError`` (``TypeError``) naming the group.
        """
        groups = self.param_groups
        if groups is not self._indexed_groups or len(groups) != self._indexed_count:
            where = {id(p): i for i, g in enumerate(groups) for p in g["params"]}
            self._weight_group = [where.get(id(w), -1) for w in self._weights]
            self._one_group = len(groups) == 1 and self._weight_group == [0] * len(self._weights)
            self._indexed_groups, self._indexed_count = groups, len(groups)
        lams = []
        for i, g in enumerate(groups):
            lam = g.get("lam")
            # passes exactly the finite floats >= 0 (NaN fails both comparisons); the rest is checked in full
            if type(lam) is not float or not 0.0 <= lam < _INF:
                if "lam" not in g:  # e.g. added to the base optimizer directly: no silent lam = 0
                    raise ValueError(f"param_groups[{i}] has no 'lam': set param_groups[{i}]['lam'] (0.0 for no "
                                   "regularizer), or add groups through FlatnessRegularized.add_param_group")
                lam = check_lam(lam, f"param_groups[{i}]['lam']")
            lams.append(lam)
        if self._one_group:  # the usual case
            return lams[0], lams * len(self._weights)
        per_layer = [lams[i] if i >= 0 else 0.0 for i in self._weight_group]
        return (per_layer[0] if per_layer.count(per_layer[0]) == len(per_layer) else None), per_layer

    def _use_all_reduce(self) -> bool:
        if self.sharded is False or isinstance(self.measurements, Isotropic):
            return False
        if not (dist.is_available() and dist.is_initialized()):
            if self.sharded:
                raise RuntimeError("FlatnessRegularized(sharded=True) needs an initialized torch.distributed process group")
            return False
        return self.sharded or dist.get_world_size(self.process_group) > 1

    def _all_reduce(self, trace: torch.Tensor, grads: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The trace and its gradient over the union of the ranks' shards (one collective)."""
        d_L = self._weights[-1].shape[-2]
        n = float(self.measurements.num_measurements("sum", d_L)) if self.reduction == "mean" else 1.0
        parts = [trace.reshape(-1)] + [g.reshape(-1) for g in grads]
        flat = torch.cat(parts + [grads[0].new_ones(1)]) * n
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.process_group)
        flat = flat[:-1] / flat[-1] if self.reduction == "mean" else flat[:-1]
        chunks = flat.split([p.numel() for p in parts])
        return chunks[0].view_as(trace), [c.view_as(g) for c, g in zip(chunks[1:], grads)]

    def regularizer_grads(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(tr ∇²L, [∂ tr/∂W_1, ..., ∂ tr/∂W_L])`` at the current weights (all-reduced under DDP).

        The gradients are of the trace summed over a batch of problems, the
        ones ``step`` scales by ``lam`` and adds; neither output requires grad.
        """
        # checked once (measurements, widths, dtype, route); each step re-checks only the shapes,
        # dtype and device of the weights, which is all that can change
        problem = self.__dict__.get("_problem")
        if problem is None or problem.measurements is not self.measurements or problem.reduction != self.reduction \
                or problem.backend != self.backend:
            problem = self._problem = TraceProblem(self._weights, self.measurements, reduction=self.reduction,
                                                   backend=self.backend)
        trace, grads = problem(self._weights)
        if self._use_all_reduce():
            trace, grads = self._all_reduce(trace, grads)
        return trace, grads

    def _add_regularizer(self, lam: float | None, lams: list[float]) -> torch.Tensor | None:
        """Add ``lam_j ∂ tr/∂W_j`` to each ``W_j.grad``; the trace (``None`` when every ``lam`` is 0).

        ``lam``: the common value of ``lams`` (``None`` if they differ).
        """
        if lam == 0.0:
            return None
        trace, grads = self.regularizer_grads()  # never requires grad: no graph, whatever the grad mode
        if lam is not None:
            existing = []
            for w in self._weights:
                g = w.grad
                if g is None or g.requires_grad:
                    break
                existing.append(g)
            else:  # the usual case: one foreach op, and grad mode does not matter
                torch._foreach_add_(existing, grads, alpha=lam)
                return trace
        with torch.no_grad():  # a grad that requires grad (create_graph=True) must not record the add
            for w, g, lam_j in zip(self._weights, grads, lams):
                if lam_j == 0.0:
                    continue
                if w.grad is None:
                    w.grad = torch.mul(g, lam_j)
                else:
                    w.grad.add_(g, alpha=lam_j)
        return trace

    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """Add ``lam ∇ tr ∇²L`` to the gradients and step the base optimizer.

        With ``closure``, the base optimizer gets a closure that evaluates
        ``closure()`` (grad enabled), adds the regularizer's gradient at the
        weights of that evaluation and returns ``closure() + lam · tr``; what the
        base optimizer's step returns (the first evaluation's value) is returned.
        """
        # torch.optim.Optimizer wraps every step in a profiler range and its hooks; the range alone
        # costs a few µs, a measurable part of a d = 30 step, so it runs only when something sees it
        if (self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks or _global_step_hooks()
                or torch.autograd._profiler_enabled()):
            return self._hooked_step(closure)
        return self._step(closure)

    step.hooked = True  # tells Optimizer.__init__ not to wrap it: step does so itself when it matters

    def _step(self, closure):
        lam, lams = self._layer_lams()  # raises on a bad lam before any gradient or weight changes
        if closure is None:
            if self._needs_closure:
                raise TypeError(
                    f"{type(self.base_optimizer).__name__}.step needs a closure that recomputes the loss and "
                    "its gradients: call opt.step(closure)"
                )
            self.last_trace = self._add_regularizer(lam, lams)
            self.base_optimizer.step()
            return None
        if lam is None:
            raise ValueError(
                "step(closure) evaluates loss + lam * trace, which needs one lam for every layer weight "
                f"W_1, ..., W_L, got the lams {lams} (one per layer); without a closure, lams may differ by group"
            )
        traces = []

        def regularized_closure():
            with torch.enable_grad():
                loss = closure()
            trace = self._add_regularizer(lam, lams)
            traces.append(trace)
            if trace is None or loss is None:
                return loss
            with torch.no_grad():
                return loss + lam * trace.sum()

        loss = self.base_optimizer.step(regularized_closure)
        # the first evaluation is at the weights before the step
        self.last_trace = traces[0] if traces else None
        return loss

    _hooked_step = torch.optim.Optimizer.profile_hook_step(_step)

    def __repr__(self) -> str:
        # never raises, whatever the groups hold (a group without lam, a lam of any type)
        lams = list(dict.fromkeys(repr(g.get("lam", "missing")) for g in self.param_groups))
        lam = lams[0] if len(lams) == 1 else "[" + ", ".join(lams) + "]"
        return (
            f"FlatnessRegularized(lam={lam}, measurements={self.measurements!r}, "
            f"reduction={self.reduction!r}, base={self.base_optimizer!r})"
        )
