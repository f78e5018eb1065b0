"""The exact Hessian trace of networks that are piecewise linear in each weight (Linear + ReLU / LeakyReLU).

A network of ``nn.Linear`` layers and ReLU / LeakyReLU activations is, almost
everywhere, linear in each single weight, so the diagonal of every output's
Hessian vanishes and the trace of the loss Hessian is the Gauss-Newton trace
(docs/MATH.md, "Beyond linear"):

    tr ∇²L = s Σ_i Σ_l ‖G_l^i‖_F² (‖a_{l-1}^i‖² + [layer l has a bias])
    G_L = S_iᵀ D_L,   G_l = (G_{l+1} W_{l+1}) D_l                      (C × d_l per sample)

with ``a_{l-1}`` the input of layer ``l`` (``z_l = W_l a_{l-1} + b_l``), ``D_l =
diag(σ'(z_l))`` the activation mask after layer ``l`` (the product of the
masks of every activation there; ``I`` if there is none), ``S_i S_iᵀ`` the
Hessian of the loss in the outputs, up to the scale ``s``:

- MSE: ``S = I``, ``s = 2 / (N C)`` (``reduction="mean"``) or ``2`` (``"sum"``);
- cross-entropy: ``S = diag(√p) - p √pᵀ`` (``S Sᵀ = diag(p) - p pᵀ``), ``s = 1/N`` or ``1``.

The C-column reverse sweep ``G_l = (G_{l+1} W_{l+1}) D_l`` is one batched GEMM
``(N·C × d_{l+1}) · (d_{l+1} × d_l)`` per layer with the mask applied to its
result.  A layer above every mask keeps one ``G_l`` for all samples (``"shared"``):
a network without activations costs what the deep linear formula does.

At a kink (``z = 0``) the mask is the one-sided derivative that torch's own
backward uses: ``σ'(0) = 0`` for ``nn.ReLU``, ``σ'(0) = negative_slope`` for
``nn.LeakyReLU``.  Autograd's Hessian (``torch.func.hessian``) uses the same
masks, so the two agree everywhere, kinks included.

One module over 600 lines: the walker's ``Network`` is what the formula, its reverse sweep and
the op's encoding read, and the formula is also the op's plain-torch CPU kernel; splitting them
would spread one definition of the network over several files.  (Candidate split, not done: the
walker into its own module.)

The model walker maps each module type to its role (BackPACK's shape: one
row per module type, a clear error for anything else):

    linear    nn.Linear (with or without bias)                      a layer W_l, b_l
    mask      nn.ReLU, nn.LeakyReLU (any slope)                     a factor of D_l
    identity  nn.Identity, nn.Dropout* in eval mode (or p = 0)      nothing
    reshape   nn.Flatten                                            before the first Linear; a no-op after
    (containers: nn.Sequential, flatkern.nn.DeepLinear, nested; DistributedDataParallel and
    torch.compile wrappers are unwrapped)

API (shapes: ``N`` samples, ``C = d_L`` outputs):

    walk(model) -> Network                               the chain, or an error naming the module
    first_input(net, inputs, loss) -> (M, d_0)         a_0: the steps before the first Linear, samples flattened
    layer_terms(net, a0, loss, reduction) -> (L,)        differentiable (masks held fixed)
    layer_terms_and_grad(net, a0, loss, reduction) -> ((L,), grads)
        grads[l] = (∂T/∂W_l, ∂T/∂b_l or None), T = Σ_l terms_l, by the hand-derived reverse
        sweep (no autograd graph)

The same formula fused into one op, ``flatkern::mlp_hessian_trace`` (C++ on CPU, Triton on CUDA;
``flatkern/kernels/schemas.py``), is reached through ``kernel_layer_terms`` /
``kernel_layer_terms_and_grad``, which route by ``backend=`` (``routing.resolve_mlp``); the functions
above are that op's plain-torch kernel when the C++ extension is missing, and the ``"torch"`` backend:

    encode(net) -> (weights, biases, slopes, num_acts)   the op's arguments
    network_of(weights, biases, slopes, num_acts) -> Network   and back (the op's plain-torch kernel)
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_no_shared_memory

__all__ = ["Network", "Layer", "TensorLayer", "Activation", "walk", "first_input", "forward", "layer_terms",
           "layer_terms_and_grad", "ROLES", "encode", "network_of", "kernel_layer_terms", "kernel_layer_terms_and_grad",
           "check_op_args"]


# ------------------------------------------------------------------ the table: module type -> role

ROLES: dict[type, str] = {
    nn.Linear: "linear",
    nn.ReLU: "mask",
    nn.LeakyReLU: "mask",
    nn.Identity: "identity",
    nn.Dropout: "identity",
    nn.Dropout1d: "identity",
    nn.Dropout2d: "identity",
    nn.Dropout3d: "identity",
    nn.AlphaDropout: "identity",
    nn.FeatureAlphaDropout: "identity",
    nn.Flatten: "reshape",
}

# smooth nonlinearities: a clear reason rather than "unsupported"
_SMOOTH = (
    nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.Softplus, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softsign,
    nn.LogSigmoid, nn.Tanhshrink, nn.Hardswish, nn.Softmax, nn.LogSoftmax, nn.Softmin,
)
_BATCHNORM = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)

SUPPORTED = ("nn.Linear, nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Flatten, nn.Dropout (eval mode), "
             "nested in nn.Sequential or flatkern.nn.DeepLinear")


@dataclasses.dataclass(frozen=True)
class Activation:
    """One piecewise-linear activation: ``σ(z) = z`` for ``z > 0``, ``slope · z`` otherwise."""

    slope: float  # σ'(z) for z <= 0: 0 for ReLU (torch's relu backward at 0), negative_slope for LeakyReLU
    relu: bool  # apply torch.relu (nn.ReLU) rather than F.leaky_relu: the model's own forward, NaN included
    path: str

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return torch.relu(z) if self.relu else F.leaky_relu(z, self.slope)

    def mask(self, z: torch.Tensor) -> torch.Tensor:
        """``σ'(z)`` with torch's convention at 0 (the mask its backward applies), ``z``'s dtype."""
        if self.slope == 0.0:
            return (z > 0).to(z.dtype)
        # the slope in z's dtype: a Python float would make a float32 tensor (0.01 -> 0.009999999776)
        return torch.where(z > 0, z.new_ones(()), z.new_full((), self.slope))


@dataclasses.dataclass
class Layer:
    """``nn.Linear`` number ``l`` and what follows it up to the next one."""

    linear: nn.Linear
    path: str
    acts: list[Activation] = dataclasses.field(default_factory=list)
    reshapes: list[tuple[str, nn.Module]] = dataclasses.field(default_factory=list)  # must be no-ops

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear.bias


@dataclasses.dataclass
class TensorLayer:
    """A layer given by its tensors (the op's arguments): what ``Layer`` gives the formula, without a module."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    acts: list[Activation]
    path: str


@dataclasses.dataclass
class Network:
    """A model as the trace sees it: the steps before the first ``nn.Linear``, then the layers."""

    pre: list  # Activation or (path, reshape module), applied to the inputs in order
    layers: list[Layer]

    @property
    def linear(self) -> bool:
        """No activation after the first Linear changes anything: a deep linear network (in ``a_0``)."""
        return all(act.slope == 1.0 for layer in self.layers for act in layer.acts)

    def parameters(self) -> list[torch.Tensor]:
        return [p for layer in self.layers for p in (layer.weight, layer.bias) if p is not None]


# ------------------------------------------------------------------ the walker


def _path(prefix: str, name: str) -> str:
    return f"{prefix}[{name}]" if name.isdigit() else f"{prefix}.{name}"


def _table_type(module: nn.Module) -> type | None:
    """The row of ``ROLES`` whose forward ``module`` runs: its own type, or a base whose forward it keeps."""
    for base in type(module).__mro__:
        if base in ROLES:
            return base if type(module).forward is base.forward else None
    return None


def _unsupported(module: nn.Module, path: str) -> Exception:
    name = type(module).__name__
    if isinstance(module, _SMOOTH):
        return TypeError(
            f"hessian_trace_of: {path} is {module!r}, a smooth nonlinearity: the trace formula needs a network "
            f"piecewise linear in each weight (Linear layers with ReLU / LeakyReLU), where the output's "
            f"second derivatives in each single weight vanish; with {name} they do not, and the Gauss-Newton "
            "trace is not the Hessian trace"
        )
    if isinstance(module, _BATCHNORM):
        mode = "in train mode normalizes with the batch's statistics, which couples the samples and is not " \
            "piecewise linear in each weight" if module.training else "(eval mode) adds parameters of its own that " \
            "the trace does not cover yet"
        return TypeError(
            f"hessian_trace_of: {path} is {module!r}: {name} {mode}; the trace formula needs a network piecewise "
            "linear in each weight (fold a trained normalization into the preceding nn.Linear)"
        )
    for base in ROLES:
        if isinstance(module, base):
            return TypeError(
                f"hessian_trace_of: {path} is {name}, a subclass of nn.{base.__name__} with its own forward: the "
                f"trace is computed from nn.{base.__name__}'s formula, which {name} may not follow"
            )
    return TypeError(f"hessian_trace_of does not support {name} ({path}: {module!r}); it supports {SUPPORTED}")


def _check_no_hooks(module: nn.Module, path: str) -> None:
    # a forward hook may change what the module returns, and the trace is computed from the module's formula
    if module._forward_hooks or module._forward_pre_hooks or _global_hooks():
        raise TypeError(
            f"hessian_trace_of: {path} ({type(module).__name__}) has forward hooks, which may change its output; "
            "the trace is computed from the module's own formula: remove the hooks (or pass a copy without them)"
        )
    if nn.utils.parametrize.is_parametrized(module):
        raise TypeError(
            f"hessian_trace_of: {path} ({type(module).__name__}) is parametrized (torch.nn.utils.parametrize): "
            "its weight is a function of other parameters, and the trace over those is not the one computed here"
        )


def _global_hooks() -> bool:
    mod = nn.modules.module
    return bool(getattr(mod, "_global_forward_hooks", None) or getattr(mod, "_global_forward_pre_hooks", None))


def _leaf_steps(module: nn.Module, path: str, out: list) -> None:
    from .nn import DeepLinear  # flatkern.nn imports this module

    if isinstance(module, nn.parallel.DistributedDataParallel):
        return _leaf_steps(module.module, path + ".module", out)
    if hasattr(module, "_orig_mod") and type(module).__name__ == "OptimizedModule":  # torch.compile(model)
        return _leaf_steps(module._orig_mod, path + "._orig_mod", out)
    _check_no_hooks(module, path)
    if type(module).forward is nn.Sequential.forward and isinstance(module, nn.Sequential):
        # _modules, as Sequential.forward iterates it: named_children() skips a module seen before
        for name, child in module._modules.items():
            _leaf_steps(child, _path(path, name), out)
        return
    if isinstance(module, DeepLinear) and type(module).forward is DeepLinear.forward:
        for name, child in module.layers._modules.items():
            _leaf_steps(child, _path(path + ".layers", name), out)
        return
    base = _table_type(module)
    if base is None:
        raise _unsupported(module, path)
    out.append((ROLES[base], module, path))


def _check_not_shared(layers: list[Layer]) -> None:
    """One module object, parameter or stretch of memory at two positions: a tied weight, where the
    per-position formula does not hold (issue 18 item 2): raise, naming both positions."""
    seen: dict[int, str] = {}
    for layer in layers:
        if id(layer.linear) in seen:
            raise ValueError(
                f"hessian_trace_of: the same nn.Linear object is used at {seen[id(layer.linear)]} and at {layer.path}: "
                "a layer applied twice ties its weight to two positions, and the trace of a tied weight's Hessian "
                "has cross terms between the positions that depend on the targets (no target-free trace exists); "
                "use separate layers"
            )
        seen[id(layer.linear)] = layer.path
    # the one check for parameters that share memory (flatkern._checks), named by module path
    check_no_shared_memory([(f"{layer.path}.{kind}", p) for layer in layers
                            for kind, p in (("weight", layer.weight), ("bias", layer.bias)) if p is not None])


def walk(model: nn.Module, name: str = "model") -> Network:
    """``model`` as a chain of ``Layer``\\ s, or a ``TypeError``/``ValueError`` naming the module that does not fit."""
    steps: list = []
    _leaf_steps(model, name, steps)
    pre: list = []
    layers: list[Layer] = []
    for role, module, path in steps:
        if role == "identity":
            if module.training and getattr(module, "p", 0.0) > 0:
                raise TypeError(
                    f"hessian_trace_of: {path} is {module!r} in train mode: it multiplies by a fresh random mask on "
                    "every call, so there is no one network whose Hessian to take; call model.eval() (dropout is "
                    "then the identity)"
                )
            continue
        if role == "linear":
            layers.append(Layer(module, path))
            continue
        if role == "mask":
            slope = 0.0 if isinstance(module, nn.ReLU) else float(module.negative_slope)
            if not math.isfinite(slope):
                raise ValueError(f"hessian_trace_of: {path} has negative_slope={slope}; need a finite slope")
            step = Activation(slope, isinstance(module, nn.ReLU), path)
        else:  # reshape
            step = (path, module)
        if not layers:
            pre.append(step)
        elif role == "mask":
            layers[-1].acts.append(step)
        else:
            layers[-1].reshapes.append(step)
    if not layers:
        raise ValueError(f"hessian_trace_of: {name} has no nn.Linear layer: there are no parameters to take the trace over")
    _check_not_shared(layers)
    for j in range(1, len(layers)):
        if layers[j].linear.in_features != layers[j - 1].linear.out_features:
            raise ValueError(
                f"hessian_trace_of: {layers[j].path} takes {layers[j].linear.in_features} features but "
                f"{layers[j - 1].path} gives {layers[j - 1].linear.out_features}"
            )
    return Network(pre, layers)


# ------------------------------------------------------------------ the forward pass


def apply_pre(net: Network, inputs: torch.Tensor) -> torch.Tensor:
    """The input of the first ``nn.Linear``: ``inputs`` through the steps before it (any shape ``(..., d_0)``)."""
    a = inputs
    for step in net.pre:
        a = step(a) if isinstance(step, Activation) else step[1](a)
    return a


@dataclasses.dataclass
class Forward:
    """What the sweep needs from the forward pass; ``M`` samples, ``C = d_L``."""

    acts: list[torch.Tensor]  # a_0 .. a_{L-1}: (M, d_{l-1}), the inputs of the layers
    masks: list[torch.Tensor | None]  # D_1 .. D_L: (M, d_l), None where no activation follows layer l
    out: torch.Tensor  # (M, C), the network's output
    pre: list[torch.Tensor] = dataclasses.field(default_factory=list)  # z_1 .. z_L: (M, d_l), the pre-activations


def forward(net: Network, a0: torch.Tensor) -> Forward:
    """The layers on ``a0`` (``(M, d_0)``), keeping each layer's input and the mask after it."""
    acts, masks, pre = [], [], []
    a = a0
    for layer in net.layers:
        acts.append(a)
        z = F.linear(a, layer.weight, layer.bias)
        pre.append(z)
        m = None
        for act in layer.acts:
            # the mask of each stage at its own input: relu(relu(z)) has the mask of torch's backward
            with torch.no_grad():
                mk = act.mask(z)
            m = mk if m is None else m * mk
            z = act(z)
        masks.append(m)
        a = z
    return Forward(acts, masks, a, pre)


# ------------------------------------------------------------------ the C-column reverse sweep
#
# G_l is held as one of
#   ("eye", None)      G = I_C, every sample (the MSE chain's top, no output mask)
#   ("diag", g)        G^i = diag(g^i), g: (M, C)
#   ("shared", A)      G^i = A for every sample, A: (C, d_l) (no mask at or above this layer)
#   ("batch", B)       G^i = B[i], B: (M, C, d_l)
#   ("softmax", (Sᵀ D_L, p, √p, m_L))   the cross-entropy top G_L, with what the step below it uses


def _down(G, W: torch.Tensor, m: torch.Tensor | None):
    """``G_l = (G_{l+1} W_{l+1}) D_l`` for ``W`` of shape ``(d_{l+1}, d_l)`` and ``m``: ``(M, d_l)`` or ``None``."""
    kind, t = G
    if kind == "softmax":
        # Sᵀ D_L W_L row by row: √p_k ((D_L W_L)[k, :] - pᵀ D_L W_L), O(M C d) instead of a GEMM with inner
        # dimension C (slow at C = 10).  Row k loses digits only where p_k ≈ 1, and that row's weight in
        # the trace is then (1 - p_k) times the others': the trace keeps its accuracy
        _, p, sp, mL = t
        DW = W if mL is None else mL.unsqueeze(-1) * W
        r = (p if mL is None else p * mL) @ W  # pᵀ D_L W_L: (M, d)
        out = sp.unsqueeze(-1) * (DW - r.unsqueeze(-2))
        return ("batch", out if m is None else out.mul_(m.unsqueeze(-2)))
    if kind in ("batch", "diag"):
        # batch: one GEMM (M·C × d_{l+1}) · (d_{l+1} × d_l).  The mask goes on in place: the product is
        # fresh, and autograd keeps a product's inputs, not its result, so this is safe under a graph
        out = t @ W if kind == "batch" else t.unsqueeze(-1) * W
        return ("batch", out if m is None else out.mul_(m.unsqueeze(-2)))
    A = W if kind == "eye" else t @ W
    return ("shared", A) if m is None else ("batch", A * m.unsqueeze(-2))


def _sqnorm(G, C: int, like: torch.Tensor):
    """``‖G^i‖_F²``: ``(M,)``, or a scalar where it is the same for every sample."""
    kind, t = G
    if kind == "eye":
        return torch.tensor(float(C), dtype=like.dtype, device=like.device)
    if kind == "softmax":
        t = t[0]
    elif kind == "diag":
        return t.square().sum(-1)
    if kind == "shared":
        return t.square().sum()
    # a reduction without the (M, C, d) temporary of square(): a third of the time at these sizes
    return torch.linalg.vector_norm(t, dim=(-2, -1)).square()


def _top(fwd: Forward, loss: str):
    """``G_L = S ᵀ D_L``, and the softmax ``p`` for cross-entropy (``None`` for MSE)."""
    out = fwd.out
    if loss == "mse":
        return (("eye", None) if fwd.masks[-1] is None else ("diag", fwd.masks[-1])), None
    logp = torch.log_softmax(out, dim=-1)
    p = logp.exp()
    # √p as exp(log p / 2): where p underflows to 0, sqrt's derivative 1/(2√p) would make 0 · inf = NaN
    sp = (0.5 * logp).exp()
    C = out.shape[-1]
    # Sᵀ = diag(√p) (I - 1 pᵀ); its diagonal 1 - p_k as -expm1(log p_k): no cancellation for a confident class
    off = 1.0 - torch.eye(C, dtype=out.dtype, device=out.device)
    St = sp.unsqueeze(-1) * (torch.diag_embed(-torch.expm1(logp)) - p.unsqueeze(-2) * off)
    if fwd.masks[-1] is not None:
        St = St.mul_(fwd.masks[-1].unsqueeze(-2))
    # ("softmax", ...): G_L = Sᵀ D_L itself (M, C, C), and what the step to G_{L-1} uses
    return ("softmax", (St, p, sp, fwd.masks[-1])), p


def _scale(loss: str, reduction: str, M: int, C: int) -> float:
    if reduction == "sum":
        return 2.0 if loss == "mse" else 1.0
    return 2.0 / (M * C) if loss == "mse" else 1.0 / M


def _h(net: Network, fwd: Forward) -> list[torch.Tensor]:
    """``‖a_{l-1}^i‖² + [bias]``: ``(M,)`` per layer."""
    hs = []
    for layer, a in zip(net.layers, fwd.acts):
        h = a.square().sum(-1)
        hs.append(h + 1.0 if layer.bias is not None else h)
    return hs


def first_input(net: Network, inputs: torch.Tensor, loss: str) -> torch.Tensor:
    """``a_0``, the input of the first layer, as ``(M, d_0)`` (leading dimensions are samples), or a
    ``ValueError`` naming the shapes; cross-entropy takes ``(N, d_0)`` only."""
    a0 = apply_pre(net, inputs)
    d0 = net.layers[0].linear.in_features
    if a0.dim() < 1 or a0.shape[-1] != d0:
        after = f" ({tuple(a0.shape)} after {', '.join(s.path if isinstance(s, Activation) else s[0] for s in net.pre)})" \
            if net.pre and a0.shape != inputs.shape else ""
        raise ValueError(
            f"inputs has shape {tuple(inputs.shape)}{after} but the first layer {net.layers[0].path} takes "
            f"d_0={d0} features: need (N, {d0})"
        )
    if loss == "cross_entropy" and a0.dim() != 2:
        raise ValueError(
            f"loss='cross_entropy' needs inputs of shape (N, d_0) at the first layer (logits (N, classes)), "
            f"got {tuple(a0.shape)}"
        )
    lead = tuple(a0.shape[:-1])
    for layer in net.layers:
        for path, module in layer.reshapes:
            # after the first Linear a reshape must leave (samples..., features) as they are: the sweep
            # flattens the samples, and a Flatten that merged positions into features would reuse each
            # weight at several positions of one sample
            shape = (*lead, layer.linear.out_features)
            try:
                same = tuple(module(torch.empty(shape, device="meta")).shape) == shape
            except (IndexError, RuntimeError):
                same = False
            if not same:
                raise ValueError(
                    f"hessian_trace_of: {path} ({module!r}) after the first nn.Linear would reshape its input of "
                    f"shape {shape}: only a Flatten that leaves (samples, features) as they are is supported there"
                )
    return a0.reshape(-1, d0)


def layer_terms(net: Network, a0: torch.Tensor, loss: str = "mse", reduction: str = "mean",
                fwd: Forward | None = None) -> torch.Tensor:
    """Per-layer traces ``s Σ_i ‖G_l^i‖_F² (‖a_{l-1}^i‖² + [bias])``, shape ``(L,)``.

    Plain torch, differentiable (to every order; the masks are held fixed, which is exact almost
    everywhere) with respect to every parameter and to ``a0``, the first layer's input ``(M, d_0)``
    (``first_input``).  Inputs assumed checked (dtype, device, ``M > 0`` for ``"mean"``).  ``fwd``:
    ``forward(net, a0)`` if the caller has it already.
    """
    fwd = forward(net, a0) if fwd is None else fwd
    M, C = fwd.out.shape
    s = _scale(loss, reduction, M, C)
    hs = _h(net, fwd)
    G, _ = _top(fwd, loss)
    terms = [None] * len(net.layers)
    for l in range(len(net.layers) - 1, -1, -1):
        if l < len(net.layers) - 1:
            G = _down(G, net.layers[l + 1].weight, fwd.masks[l])
        terms[l] = (_sqnorm(G, C, a0) * hs[l]).sum() * s
    return torch.stack(terms)


def layer_terms_and_grad(net: Network, a0: torch.Tensor, loss: str = "mse", reduction: str = "mean",
                         cotangents=None, x_grad: bool = False):
    """``(layer_terms(net, inputs, ...), grads)``, ``grads[l] = (∂T/∂W_l, ∂T/∂b_l or None)``, ``T = Σ_l terms_l``
    (``T = Σ_l g_l terms_l`` with ``cotangents = [g_1, ..., g_L]``: the op's backward); with ``x_grad``,
    ``(terms, grads, ∂T/∂a0)``.

    The hand-derived reverse sweep (docs/MATH.md, "Beyond linear"), masks held fixed, no autograd
    graph: nothing returned requires grad.  With ``T = s Σ_i Σ_l h_l^i ‖G_l^i‖²``:

        Ḡ_1 = 2 s h_1 G_1;   U_l = Ḡ_l D_l;   ∂T/∂W_{l+1} += Σ_i G_{l+1}ᵀ U_l;
        Ḡ_{l+1} = 2 s h_{l+1} G_{l+1} + U_l W_{l+1}ᵀ                      (the C-column sweep, reversed)
        cross-entropy: ∂T/∂f^i = u^i - p^i Σ_k u_k^i,  u_k^i = s Σ_l h_l^i ‖G_l^i[k, :]‖²   (S's dependence on p)
        ∂T/∂a_{l-1} = ∂z_l/∂a_{l-1} ... + 2 s ‖G_l‖² a_{l-1}                 (ordinary backprop from ∂T/∂f)
    """
    L = len(net.layers)
    with torch.no_grad():
        fwd = forward(net, a0.detach())
        M, C = fwd.out.shape
        s = _scale(loss, reduction, M, C)
        # c_l = s g_l: each layer's term enters T with its own weight (s alone for the gradient of Σ_l terms_l)
        c = [s] * L if cotangents is None else [s * float(g) for g in cotangents]
        hs = _h(net, fwd)
        Gs: list = [None] * L
        G, p = _top(fwd, loss)
        Gs[L - 1] = G
        for l in range(L - 2, -1, -1):
            G = _down(G, net.layers[l + 1].weight, fwd.masks[l])
            Gs[l] = G
        if loss == "cross_entropy":  # every G_l is per sample: keep the row norms ‖G_l^i[k, :]‖² for (2)
            rows = [torch.linalg.vector_norm(_per_sample(G), dim=-1).square() for G in Gs]  # (M, C)
            V = [r.sum(-1) for r in rows]
        else:
            V = [_sqnorm(G, C, a0) for G in Gs]  # ‖G_l^i‖²: (M,) or scalar
        terms = torch.stack([(V[l] * hs[l]).sum() * s for l in range(L)])

        gW = [torch.zeros_like(layer.weight) for layer in net.layers]
        gb = [None if layer.bias is None else torch.zeros_like(layer.bias) for layer in net.layers]

        # (1) the C-column sweep reversed: U_l = Ḡ_l D_l from the layer terms, up the chain
        U = _direct(Gs[0], hs[0], c[0], fwd.masks[0]) if L > 1 else None
        for l in range(L - 1):
            above = Gs[l + 1]
            if above[0] in ("eye", "shared") and U[0] == "batch":
                U = ("sum", U[1].sum(0))  # G_{l+1} is the same for all samples: only Σ_i U^i is needed
            gW[l + 1] += _weight_grad(above, U)
            if l + 1 < L - 1:
                back = U[1] @ net.layers[l + 1].weight.T  # U_l W_{l+1}ᵀ: fresh, so Ḡ_{l+1} accumulates in place
                U = _direct(above, hs[l + 1], c[l + 1], fwd.masks[l + 1], into=back)

        # (2) cross-entropy: S depends on p, hence on the logits f
        zbar = None
        if loss == "cross_entropy":
            u = sum(hs[l].unsqueeze(-1) * rows[l] * c[l] for l in range(L))  # (M, C)
            zbar = u - p * u.sum(-1, keepdim=True)
            if fwd.masks[-1] is not None:
                zbar = zbar * fwd.masks[-1]

        # (3) ordinary backprop of ∂T/∂f and of the h-terms ∂T/∂a_{l-1} = 2 c_l ‖G_l‖² a_{l-1}
        abar = None
        for l in range(L - 1, -1, -1):
            a = fwd.acts[l]
            if zbar is not None:
                gW[l] += zbar.T @ a
                if gb[l] is not None:
                    gb[l] += zbar.sum(0)
            if l == 0 and not x_grad:
                break
            Vl = V[l] if V[l].dim() == 0 else V[l].unsqueeze(-1)
            abar = (2.0 * c[l]) * Vl * a
            if zbar is not None:
                abar = abar + zbar @ net.layers[l].weight
            if l == 0:
                break
            zbar = abar if fwd.masks[l - 1] is None else abar * fwd.masks[l - 1]
    if x_grad:
        return terms, list(zip(gW, gb)), abar
    return terms, list(zip(gW, gb))


# adjoints: ("batch", (M, C, d)) per sample, or ("sum", (C, d)) = Σ_i Ḡ^i where G is the same for all samples


def _direct(G, h: torch.Tensor, s: float, m: torch.Tensor | None, into: torch.Tensor | None = None):
    """``U_l = (Ḡ_l) D_l`` with ``Ḡ_l = 2 s h^i G_l^i (+ into)``: the layer's own term (plus what came
    down from below, ``into``, which is overwritten); ``s`` is the layer's coefficient ``c_l``."""
    kind, t = G
    if kind == "shared":  # then no mask at this layer: Σ_i of the adjoint is all that is needed
        out = (2.0 * s * h.sum()) * t
        return ("sum", out if into is None else into.add_(out))
    if kind != "batch":
        raise AssertionError(f"G of kind {kind} below the top of the chain")  # eye/diag occur at l = L only
    coef = (2.0 * s) * h[:, None, None]
    if into is None:
        # one pass over (M, C, d): the per-sample scale and the mask multiply the small factor first
        return ("batch", t * (coef if m is None else coef * m.unsqueeze(-2)))
    into.addcmul_(t, coef)
    return ("batch", into if m is None else into.mul_(m.unsqueeze(-2)))


def _per_sample(G) -> torch.Tensor:
    """``(M, C, d)`` of a per-sample ``G`` ("batch", or the cross-entropy top "softmax")."""
    return G[1][0] if G[0] == "softmax" else G[1]


def _weight_grad(G, U) -> torch.Tensor:
    """``Σ_i G^iᵀ U^i``, shape ``(d_{l+1}, d_l)``, for ``G = G_{l+1}`` and ``U = Ḡ_l D_l``."""
    kind, t = G
    if kind == "eye":
        return U[1]  # U is ("sum", ...)
    if kind == "shared":
        return t.T @ U[1]
    if kind == "diag":
        return (t.unsqueeze(-1) * U[1]).sum(0)
    t = _per_sample(G)
    M, C, d_hi = t.shape
    return t.reshape(M * C, d_hi).T @ U[1].reshape(M * C, U[1].shape[-1])  # one GEMM (d_{l+1} × N·C) · (N·C × d_l)


# ------------------------------------------------------------------ the fused op (flatkern::mlp_hessian_trace)


def encode(net: Network):
    """``(weights, biases, slopes, num_acts)``: ``net`` as ``flatkern::mlp_hessian_trace``'s arguments
    (``biases[l]`` an empty ``(0,)`` tensor where layer ``l`` has no bias)."""
    weights = [layer.weight for layer in net.layers]
    none = None
    biases = []
    for layer in net.layers:
        if layer.bias is None:
            if none is None:
                none = layer.weight.new_empty((0,))
            biases.append(none)
        else:
            biases.append(layer.bias)
    slopes = [act.slope for layer in net.layers for act in layer.acts]
    return weights, biases, slopes, [len(layer.acts) for layer in net.layers]


def network_of(weights, biases, slopes, num_acts) -> Network:
    """The ``Network`` that the op's arguments describe (``encode``'s inverse; slope 0 is ``torch.relu``)."""
    if not (len(weights) == len(biases) == len(num_acts)) or sum(num_acts) != len(slopes):
        raise ValueError(
            f"mlp_hessian_trace: {len(weights)} weights, {len(biases)} biases and {len(num_acts)} num_acts must "
            f"match, and num_acts must sum to the {len(slopes)} slopes (sums to {sum(num_acts)})"
        )
    layers, k = [], 0
    for l, (W, b, n) in enumerate(zip(weights, biases, num_acts)):
        acts = [Activation(float(sl), float(sl) == 0.0, f"slopes[{k + j}]") for j, sl in enumerate(slopes[k:k + n])]
        k += n
        layers.append(TensorLayer(W, None if b.numel() == 0 else b, acts, f"weights[{l}]"))
    return Network([], layers)


def _reduction(mean: bool) -> str:
    return "mean" if mean else "sum"


def _loss_name(code: int) -> str:
    from .kernels.schemas import MLP_LOSSES
    return next(name for name, c in MLP_LOSSES.items() if c == code)


def kernel_layer_terms(net: Network, a0: torch.Tensor, loss: str, reduction: str, backend: str = "auto",
                       sum_layers: bool = False) -> torch.Tensor:
    """``layer_terms(net, a0, loss, reduction)`` (``(L,)``, or their sum with ``sum_layers``) through the
    kernel ``backend`` picks (``routing.resolve_mlp``): the fused op, or this module's plain torch.
    Differentiable once (the op) or to every order (plain torch) in every parameter and ``a0``."""
    from .kernels import routing, schemas

    weights, biases, slopes, num_acts = encode(net)
    route = routing.resolve_mlp(backend, a0, weights)
    if route == "ref":
        terms = layer_terms(net, a0, loss, reduction)
        return terms.sum() if sum_layers else terms
    args = (a0, weights, biases, slopes, num_acts, schemas.MLP_LOSSES[loss], reduction == "mean", sum_layers)
    if route == "interpret":  # Triton on CPU tensors: the launchers through the autograd twin
        from .kernels import autograd
        from .kernels.triton import mlp_hessian_trace as launchers
        return autograd.mlp_apply(launchers.mlp_hessian_trace_triton, launchers.mlp_hessian_trace_backward_triton,
                                  "triton", *args)[0]
    return schemas.mlp_hessian_trace(*args)[0]


def kernel_layer_terms_and_grad(net: Network, a0: torch.Tensor, loss: str, reduction: str, backend: str = "auto"):
    """``(terms (L,), grads)`` as ``layer_terms_and_grad`` gives them, through the kernel ``backend`` picks;
    no autograd graph on any route."""
    from .kernels import routing, schemas

    weights, biases, slopes, num_acts = encode(net)
    route = routing.resolve_mlp(backend, a0, weights)
    if route == "ref":
        return layer_terms_and_grad(net, a0, loss, reduction)
    args = (a0.detach(), [w.detach() for w in weights], [b.detach() for b in biases], slopes, num_acts,
            schemas.MLP_LOSSES[loss], reduction == "mean", False)
    if route == "interpret":
        from .kernels.triton import mlp_hessian_trace as launchers
        terms, grads = launchers.mlp_hessian_trace_and_grad_triton(*args)
    else:
        terms, grads = schemas.mlp_hessian_trace_and_grad(*args)
    L = len(weights)
    gW, gb = grads[:L], grads[L:]
    return terms, [(w, None if layer.bias is None else b) for w, b, layer in zip(gW, gb, net.layers)]


# ------------------------------------------------------------------ the op's plain-torch kernels (no C++ extension)


def check_op_args(x, weights, biases, slopes, num_acts, loss, mean) -> None:
    """The op's argument rules (the C++ kernel checks the same in C++): a ``ValueError`` naming what is wrong."""
    L = len(weights)
    if not (L >= 1 and len(biases) == L and len(num_acts) == L and sum(num_acts) == len(slopes)):
        raise ValueError(f"mlp_hessian_trace: {L} weights, {len(biases)} biases and {len(num_acts)} num_acts must "
                         f"match (L >= 1), and num_acts must sum to the {len(slopes)} slopes")
    if not x.is_floating_point() or x.dim() != 2 or x.shape[1] != weights[0].shape[-1]:
        raise ValueError(f"mlp_hessian_trace: x is {x.dtype} of shape {tuple(x.shape)}, need a floating "
                         f"(M, {weights[0].shape[-1]})")
    for l in range(L):
        W, b = weights[l], biases[l]
        if W.dim() != 2 or (l and W.shape[1] != weights[l - 1].shape[0]):
            raise ValueError(f"mlp_hessian_trace: weights[{l}] has shape {tuple(W.shape)} but its input has "
                             f"{weights[l - 1].shape[0] if l else x.shape[1]} features")
        if W.dtype != x.dtype or W.device != x.device or (b.numel() and (b.dtype != x.dtype or b.device != x.device)):
            raise ValueError(f"mlp_hessian_trace: weights[{l}] / biases[{l}] are not {x.dtype} on {x.device}, as x is")
        if b.numel() and tuple(b.shape) != (W.shape[0],):
            raise ValueError(f"mlp_hessian_trace: biases[{l}] has shape {tuple(b.shape)}, need ({W.shape[0]},) or (0,)")
    if not all(math.isfinite(s) for s in slopes):
        raise ValueError(f"mlp_hessian_trace: slopes {list(slopes)} must be finite")
    if loss not in (0, 1):
        raise ValueError(f"mlp_hessian_trace: loss must be 0 (mse) or 1 (cross_entropy), got {loss}")
    if mean and x.shape[0] == 0:
        raise ValueError(f"mlp_hessian_trace: x has no samples (shape {tuple(x.shape)}): the mean over no samples "
                         "is undefined")


def mlp_hessian_trace_torch(x, weights, biases, slopes, num_acts, loss=0, mean=True, sum_layers=False):
    """``flatkern::mlp_hessian_trace`` in plain torch: ``(terms, [z_1 .. z_L])``."""
    check_op_args(x, weights, biases, slopes, num_acts, loss, mean)
    net = network_of(weights, biases, slopes, num_acts)
    fwd = forward(net, x)
    terms = layer_terms(net, x, _loss_name(loss), _reduction(mean), fwd=fwd)
    return (terms.sum() if sum_layers else terms), [z.clone() for z in fwd.pre]


def _grads_list(x, net, grads, gx=None):
    """``[∂/∂x (if given), ∂/∂W_1 .., ∂/∂b_1 ..]`` in the op's layout (a ``(0,)`` tensor for a missing bias)."""
    gW = [g for g, _ in grads]
    gb = [x.new_empty((0,)) if g is None else g for _, g in grads]
    return ([] if gx is None else [gx]) + gW + gb


def mlp_hessian_trace_backward_torch(x, weights, biases, slopes, num_acts, loss, mean, sum_layers, saved, grad_terms):
    """``flatkern::mlp_hessian_trace_backward`` in plain torch (the forward re-run: ``saved`` is not read)."""
    check_op_args(x, weights, biases, slopes, num_acts, loss, mean)
    net = network_of(weights, biases, slopes, num_acts)
    g = grad_terms.detach()
    cot = [g.item()] * len(weights) if sum_layers else g.tolist()
    _, grads, gx = layer_terms_and_grad(net, x.detach(), _loss_name(loss), _reduction(mean), cotangents=cot,
                                        x_grad=True)
    return _grads_list(x, net, grads, gx)


def mlp_hessian_trace_and_grad_torch(x, weights, biases, slopes, num_acts, loss=0, mean=True, sum_layers=False):
    """``flatkern::mlp_hessian_trace_and_grad`` in plain torch."""
    check_op_args(x, weights, biases, slopes, num_acts, loss, mean)
    net = network_of(weights, biases, slopes, num_acts)
    terms, grads = layer_terms_and_grad(net, x.detach(), _loss_name(loss), _reduction(mean))
    return (terms.sum() if sum_layers else terms), _grads_list(x, net, grads)
