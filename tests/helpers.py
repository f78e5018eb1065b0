"""The tests' one set of builders, tolerances and ground truths.

Plain functions, importable from any test module (``from helpers import ...``)
and from the scripts in ``bench/`` (which put ``tests/`` on ``sys.path``);
``tests/conftest.py`` builds its fixtures (``backend``, ``dtype``) and the
hypothesis profiles on top of them.
"""

from __future__ import annotations

import torch

import flatkern as fk
from flatkern import ops
from flatkern.benchmarks.gpu_check import terms_and_grads  # noqa: F401  (one copy: the GPU check runs it too)
from flatkern.kernels import routing

BACKENDS = ("torch", "cpp", "triton", "auto")

# the families of make_measurements: "dense" has n <= d_0 d_L (the per-measurement contraction),
# "dense_kernel" n > d_0 d_L (Dense then reads its precomputed kernel K)
FAMILIES = ("isotropic", "entries", "rankone", "dense", "inputs")
ALL_FAMILIES = FAMILIES + ("dense_kernel",)

# depth 1 to 5, prime and non-square widths
DIMS = [
    [5, 3],
    [5, 7, 3],
    [2, 7, 11, 3],
    [3, 5, 2, 7, 4],
    [4, 3, 5, 2, 3, 7],
]

# (atol, rtol) of a result against the float64 reference, per dtype of the computation.  atol is
# relative to the reference's largest magnitude (assert_close_to_reference): traces and gradients
# of random chains span many orders of magnitude, their rounding error scales with the largest term.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (8e-2, 8e-2),
}

# how a weight is laid out in memory: the kernels must read strides, not assume them
LAYOUTS = ("contiguous", "transposed", "expanded", "sliced")


def backend_unavailable(backend: str, device: str = "cpu") -> str | None:
    """Why ``backend`` cannot run on ``device`` (``None`` if it can): "torch" and "auto" always can
    ("auto" falls back to the reference); "cpp" and "triton" as their records in the routing table say."""
    return routing.unavailable(backend, torch.device(device))


def make_weights(dims, batch=(), dtype=torch.float64, seed=0, requires_grad=False, layout="contiguous"):
    """Random ``[W_1, ..., W_L]`` for widths ``dims = [d_0, ..., d_L]``, scaled so products stay O(1).

    ``layout`` (one for all layers, or one per layer): ``"contiguous"``; ``"transposed"`` (the
    transpose of a contiguous ``(d_{j-1}, d_j)`` tensor); ``"expanded"`` (one matrix expanded over
    the batch, stride 0; with no batch, an expanded size-1 dim squeezed away); ``"sliced"`` (every
    other row and a column window of a larger tensor).  With ``requires_grad`` the returned tensors
    are leaves in the contiguous layout and views of leaves otherwise (``autograd.grad`` takes both).
    """
    g = torch.Generator().manual_seed(seed)
    layouts = [layout] * (len(dims) - 1) if isinstance(layout, str) else list(layout)
    ws = []
    for j, lay in enumerate(layouts):
        rows, cols = dims[j + 1], dims[j]

        def randn(*shape):
            return (torch.randn(*shape, generator=g, dtype=torch.float64) / max(cols, 1) ** 0.5).to(dtype)

        if lay == "contiguous":
            w = randn(*batch, rows, cols).requires_grad_(requires_grad)
        elif lay == "transposed":
            w = randn(*batch, cols, rows).requires_grad_(requires_grad).transpose(-1, -2)
        elif lay == "expanded":
            w = randn(rows, cols).requires_grad_(requires_grad).expand(*batch, rows, cols)
            if not batch:
                w = w.unsqueeze(0).expand(1, rows, cols)[0]
        elif lay == "sliced":
            w = randn(*batch, 2 * rows, cols + 3).requires_grad_(requires_grad)[..., ::2, 1:cols + 1]
        else:
            raise ValueError(f"unknown layout {lay!r}; one of {LAYOUTS}")
        ws.append(w)
    return ws


def measurement_sources(family, d_L, d_0, n=7, dtype=torch.float64, seed=1):
    """``(tensors, targets)``: the caller's tensors a measurement object of ``family`` is built from
    (``measurements_from``), ``n`` measurements for ``E`` of shape ``(d_L, d_0)``, and matching targets.

    ``"dense_kernel"`` is ``Dense`` with at least ``d_0 d_L + 1`` measurements (its kernel regime).
    """
    g = torch.Generator().manual_seed(seed)
    randn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    if family == "isotropic":
        return {"n": n}, randn(d_L, d_0)
    if family == "entries":
        rows = torch.randint(d_L, (n,), generator=g)
        cols = torch.randint(d_0, (n,), generator=g)
        return {"rows": rows, "cols": cols, "shape": (d_L, d_0)}, randn(n)
    if family == "rankone":
        return {"u": randn(n, d_L), "v": randn(n, d_0)}, randn(n)
    if family == "dense":
        return {"A": randn(n, d_L, d_0)}, randn(n)
    if family == "dense_kernel":
        n = max(n, d_0 * d_L + 1)
        return {"A": randn(n, d_L, d_0)}, randn(n)
    if family == "inputs":
        return {"x": randn(n, d_0)}, randn(n, d_L)
    raise ValueError(family)


def measurements_from(family, tensors):
    """The measurement object of ``family`` built from ``tensors`` (as ``measurement_sources`` gives them)."""
    build = {"isotropic": fk.Isotropic, "entries": fk.Entries, "rankone": fk.RankOne, "dense": fk.Dense,
             "dense_kernel": fk.Dense, "inputs": fk.Inputs}[family]
    return build(**tensors)


def make_measurements(family, d_L, d_0, n=7, dtype=torch.float64, seed=1):
    """A measurement family of ``n`` measurements for ``E`` of shape ``(d_L, d_0)``, with matching targets.

    ``"dense_kernel"`` is ``Dense`` with at least ``d_0 d_L + 1`` measurements (its kernel regime).
    """
    tensors, targets = measurement_sources(family, d_L, d_0, n=n, dtype=dtype, seed=seed)
    return measurements_from(family, tensors), targets


def per_problem_sources(family, d_L, d_0, batch, n=7, dtype=torch.float64, seed=1):
    """``(tensors, targets, sets)``: one measurement set per problem of a batch of shape ``batch``,
    stacked (``tensors`` build the per-problem object with ``measurements_from``), with stacked
    targets, and the ``prod(batch)`` sets one by one (``[(tensors_b, targets_b), ...]``, in the
    order of the flattened batch), each drawn with its own seed as ``measurement_sources`` draws one.
    """
    import math

    sets = [measurement_sources(family, d_L, d_0, n=n, dtype=dtype, seed=seed + 7919 * b)
            for b in range(math.prod(batch))]
    tensors = {}
    for key, value in sets[0][0].items():
        if isinstance(value, torch.Tensor):
            tensors[key] = torch.stack([s[0][key] for s in sets]).reshape(*batch, *value.shape)
        else:
            tensors[key] = value  # Entries' shape, Isotropic's n: the same for every problem
    targets = torch.stack([s[1] for s in sets]).reshape(*batch, *sets[0][1].shape)
    return tensors, targets, sets


def assert_close_to_reference(got, ref, dtype, msg=None):
    """``got`` (computed in ``dtype``) against the float64 ``ref``, with ``TOL[dtype]``; atol is
    relative to ``ref``'s largest magnitude."""
    atol, rtol = TOL[dtype]
    ref = ref.detach().to(torch.float64)
    scale = ref.abs().max().item() if ref.numel() else 0.0
    torch.testing.assert_close(got.detach().to(torch.float64), ref, atol=atol * max(scale, 1e-30), rtol=rtol,
                               msg=msg)


def autograd_hessian_trace(weights, measurements, targets, reduction="mean", per_layer=False):
    """Trace of ``torch.func.hessian`` of ``mse_loss``, one unbatched problem; shape ``()`` or ``(L,)``."""
    weights = [w.detach() for w in weights]
    L = len(weights)

    def loss(*ws):
        return fk.mse_loss(list(ws), measurements, targets, reduction, backend="torch")

    H = torch.func.hessian(loss, argnums=tuple(range(L)))(*weights)
    blocks = torch.stack([H[j][j].reshape(weights[j].numel(), -1).diagonal().sum() for j in range(L)])
    return blocks if per_layer else blocks.sum()


# ------------------------------------------------------------------ processes (Linux /proc)


def child_pids(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (reads ``/proc``; a process gone mid-read is skipped)."""
    from pathlib import Path

    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return kids


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is running (a zombie, exited but not yet reaped, is not)."""
    from pathlib import Path

    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
