"""Property-based tests (issue 11 §5): random problems on every backend against the reference.

Each property draws widths 1-40, depths 1-6, a batch shape, a family (both Dense regimes), the
reduction, ``per_layer``, float32 or float64, and a memory layout per weight (contiguous,
transposed, expanded over the batch, sliced), and checks one claim.  The hypothesis profiles are
registered in ``tests/conftest.py``: every property runs ~25 derandomized examples in the default
run, and again with eight times as many under ``-m slow``.  The Triton interpreter (``-m triton``)
gets smaller problems and an eighth of the examples: an interpreted Dense call on width 40 takes
seconds.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from helpers import (
    ALL_FAMILIES, LAYOUTS, assert_close_to_reference, autograd_hessian_trace, make_measurements, make_weights,
    measurement_sources, measurements_from, per_problem_sources, terms_and_grads,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import flatkern as fk
from flatkern._checks import BACKENDS

# every property twice: the default run's few examples, and the slow run's many
PROFILES = [pytest.param("default", id="default"), pytest.param("flatkern-slow", id="long", marks=pytest.mark.slow)]


@pytest.fixture(params=PROFILES)
def profile(request):
    return request.param


def _settings(profile: str, backend: str) -> settings:
    base = settings() if profile == "default" else settings.get_profile(profile)  # settings(): the loaded profile
    if backend == "triton":  # the interpreter: an eighth of the examples (5 by default, 25 under -m slow)
        return settings(base, max_examples=max(5, base.max_examples // 8))
    return base


@dataclasses.dataclass(frozen=True)
class Problem:
    dims: tuple[int, ...]
    batch: tuple[int, ...]
    dtype: torch.dtype
    family: str
    n: int
    layout: tuple[str, ...]
    reduction: str
    per_layer: bool
    seed: int

    def weights(self, requires_grad=False):
        return make_weights(list(self.dims), batch=self.batch, dtype=self.dtype, seed=self.seed,
                            requires_grad=requires_grad, layout=self.layout)

    def measurements(self):
        return make_measurements(self.family, self.dims[-1], self.dims[0], n=self.n, dtype=self.dtype,
                                 seed=self.seed + 1)

    def per_problem_measurements(self):
        """``(measurements, targets, sets)``: one set per problem of ``batch`` (``per_problem_sources``),
        as one per-problem object and stacked targets, and the sets one by one as objects."""
        tensors, targets, sets = per_problem_sources(self.family, self.dims[-1], self.dims[0], self.batch,
                                                     n=self.n, dtype=self.dtype, seed=self.seed + 1)
        return (measurements_from(self.family, tensors), targets,
                [(measurements_from(self.family, t), b) for t, b in sets])


@st.composite
def problems(draw, max_width=40, max_depth=6, dtypes=(torch.float32, torch.float64), families=ALL_FAMILIES,
             batches=((), (1,), (3,), (2, 2))):
    family = draw(st.sampled_from(families))
    depth = draw(st.integers(1, max_depth))
    width = st.integers(1, max_width)
    # the Dense kernel regime needs n > d_0 d_L measurements: small end widths keep n (and K) small
    end = st.integers(1, min(6, max_width)) if family == "dense_kernel" else width
    dims = [draw(end)] + [draw(width) for _ in range(depth - 1)] + [draw(end)]
    n = draw(st.integers(1, 12))
    if family == "dense":
        n = min(n, dims[0] * dims[-1])  # n <= d_0 d_L: the per-measurement contraction
    return Problem(
        dims=tuple(dims),
        batch=draw(st.sampled_from(batches)),
        dtype=draw(st.sampled_from(dtypes)),
        family=family,
        n=n,
        layout=tuple(draw(st.lists(st.sampled_from(LAYOUTS), min_size=depth, max_size=depth))),
        reduction=draw(st.sampled_from(["mean", "sum"])),
        per_layer=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def _sizes(backend):
    return dict(max_width=12, max_depth=4) if backend == "triton" else {}


def test_every_backend_matches_the_reference_on_random_problems(backend, profile):
    @_settings(profile, backend)
    @given(p=problems(**_sizes(backend)))
    def check(p):
        W = p.weights(requires_grad=True)
        meas, _ = p.measurements()
        W64 = [w.detach().double().requires_grad_() for w in W]
        meas64 = meas.to(torch.float64)

        def trace(weights, m, backend=backend):
            return fk.hessian_trace(weights, m, reduction=p.reduction, per_layer=p.per_layer, backend=backend)

        ref, ref_grads = terms_and_grads(lambda w, m: trace(w, m, "torch"), W64, meas64, seed=p.seed)
        got, grads = terms_and_grads(trace, W, meas, seed=p.seed)
        assert got.shape == p.batch + ((len(W),) if p.per_layer else ()) and got.dtype == p.dtype
        assert_close_to_reference(got, ref, p.dtype, msg=lambda m: f"trace: {m}")
        for j, (g, r) in enumerate(zip(grads, ref_grads), start=1):
            assert_close_to_reference(g, r, p.dtype, msg=lambda m: f"gradient of W_{j}: {m}")

        # the value-and-gradient call: the same trace, the gradient of its sum
        value, value_grads = fk.hessian_trace_and_grad(W, meas, reduction=p.reduction, per_layer=p.per_layer,
                                                       backend=backend)
        sum_grads = torch.autograd.grad(trace(W64, meas64, "torch").sum(), W64)
        assert_close_to_reference(value, ref, p.dtype, msg=lambda m: f"hessian_trace_and_grad value: {m}")
        for j, (g, r) in enumerate(zip(value_grads, sum_grads), start=1):
            assert_close_to_reference(g, r, p.dtype, msg=lambda m: f"hessian_trace_and_grad, W_{j}: {m}")

    check()


def test_per_problem_measurements_match_the_reference_problem_by_problem(backend, profile):
    """Issue 21: each problem of a batch measured by its own set.  The batched call (trace, its
    autograd gradient, the value-and-grad call, the loss) equals the float64 reference run on each
    problem alone, with its own set: every family, reduction, per_layer, dtype and weight layout."""
    @_settings(profile, backend)
    @given(p=problems(**_sizes(backend), batches=((1,), (3,), (2, 2))))
    def check(p):
        W = p.weights(requires_grad=True)
        meas, targets, sets = p.per_problem_measurements()
        assert meas.batch_shape == (() if p.family == "isotropic" else p.batch)  # Isotropic holds no tensor
        kw = dict(reduction=p.reduction, per_layer=p.per_layer)
        got, grads = terms_and_grads(lambda w, m: fk.hessian_trace(w, m, backend=backend, **kw), W, meas,
                                     seed=p.seed)
        value, value_grads = fk.hessian_trace_and_grad(W, meas, backend=backend, **kw)
        loss = fk.mse_loss(W, meas, targets, p.reduction, backend=backend)
        assert got.shape == p.batch + ((len(W),) if p.per_layer else ()) and got.dtype == p.dtype

        def problems_of(t, tail):  # (prod(batch), *tail): problem b in row b, in the order of `sets`
            return t.reshape(-1, *t.shape[t.dim() - tail:])

        flat_W = [problems_of(w.detach().double(), 2) for w in W]
        got_b, value_b, loss_b = problems_of(got, int(p.per_layer)), problems_of(value, int(p.per_layer)), \
            problems_of(loss, 0)
        grads_b = [problems_of(g, 2) for g in value_grads]
        for b, (m_b, t_b) in enumerate(sets):
            W_b = [w[b].clone().requires_grad_() for w in flat_W]
            m_b = m_b.to(torch.float64)
            ref = fk.hessian_trace(W_b, m_b, backend="torch", **kw)
            ref_grads = torch.autograd.grad(ref.sum(), W_b)
            assert_close_to_reference(got_b[b], ref, p.dtype, msg=lambda m: f"trace of problem {b}: {m}")
            assert_close_to_reference(value_b[b], ref, p.dtype, msg=lambda m: f"value of problem {b}: {m}")
            for j, g_b in enumerate(ref_grads):
                assert_close_to_reference(grads_b[j][b], g_b, p.dtype,
                                          msg=lambda m: f"value-and-grad W_{j + 1} of problem {b}: {m}")
            ref_loss = fk.mse_loss(W_b, m_b, t_b.double(), p.reduction, backend="torch")
            assert_close_to_reference(loss_b[b], ref_loss, p.dtype, msg=lambda m: f"loss of problem {b}: {m}")
        # the autograd gradient of the sum of a random projection, problem by problem (terms_and_grads
        # draws the projection from p.seed): checked against the reference on the whole batch
        ref_W = [w.detach().double().requires_grad_() for w in W]
        ref_all, ref_all_grads = terms_and_grads(lambda w, m: fk.hessian_trace(w, m, backend="torch", **kw), ref_W,
                                                 meas.to(torch.float64), seed=p.seed)
        assert_close_to_reference(got, ref_all, p.dtype)
        for j, (g, r) in enumerate(zip(grads, ref_all_grads), start=1):
            assert_close_to_reference(g, r, p.dtype, msg=lambda m: f"gradient of W_{j}: {m}")

    check()


def test_every_backend_matches_the_autograd_hessian_on_tiny_problems(backend, profile):
    # torch.func.hessian forms the whole Hessian: a few dozen parameters at most, in float64
    @_settings(profile, backend)
    @given(p=problems(max_width=4, max_depth=4, dtypes=(torch.float64,), batches=((),)))
    def check(p):
        W = p.weights()
        meas, targets = p.measurements()
        expected = autograd_hessian_trace(W, meas, targets, p.reduction, per_layer=p.per_layer)
        got = fk.hessian_trace(W, meas, reduction=p.reduction, per_layer=p.per_layer, backend=backend)
        assert_close_to_reference(got, expected, torch.float64)

    check()


@st.composite
def edits(draw, tensors: dict):
    """New values for each of the caller's tensors (float: random; indices: random, negatives included)
    and how they are written (in place, through ``.data``, through ``.numpy()``)."""
    out = {}
    for name, t in tensors.items():
        if t.is_floating_point():
            scale = draw(st.sampled_from([-1.0, 0.0, 0.5, 3.0]))
            out[name] = t * scale + draw(st.floats(-2, 2))
        else:
            size = 50
            out[name] = torch.tensor(draw(st.lists(st.integers(-size, size), min_size=len(t), max_size=len(t))),
                                     dtype=t.dtype)
    return out, draw(st.sampled_from(["in_place", "data", "numpy"])), draw(st.booleans())


def test_editing_measurement_tensors_after_construction_changes_nothing(backend, profile):
    @_settings(profile, backend)
    # a value, whatever the size: small problems suffice
    @given(p=problems(max_width=12, max_depth=4, families=tuple(f for f in ALL_FAMILIES if f != "isotropic")),
           data=st.data())
    def check(p, data):
        W = p.weights()
        src, targets = measurement_sources(p.family, p.dims[-1], p.dims[0], n=p.n, dtype=p.dtype, seed=p.seed)
        tensors = {k: v for k, v in src.items() if isinstance(v, torch.Tensor)}
        meas = measurements_from(p.family, src)
        pristine = measurements_from(p.family, {k: v.clone() if k in tensors else v for k, v in src.items()})

        def answers(m):
            trace, grads = fk.hessian_trace_and_grad(W, m, reduction=p.reduction, per_layer=p.per_layer,
                                                     backend=backend)
            return [trace, *grads, fk.mse_loss(W, m, targets, p.reduction, backend=backend)]

        want = answers(pristine)
        new, how, used_first = data.draw(edits(tensors))
        if used_first:
            answers(meas)  # every cache a backend keeps is built before the edit
        for name, t in tensors.items():
            if how == "in_place":
                t.copy_(new[name])
            elif how == "data":
                t.data.copy_(new[name])
            else:
                t.numpy()[...] = new[name].numpy()
        for got, w in zip(answers(meas), want):
            torch.testing.assert_close(got, w, atol=0, rtol=0)

    check()


# ------------------------------------------------------------------ bad input


def _text(exclude):
    return st.text(st.characters(codec="ascii"), max_size=8).filter(lambda s: s not in exclude)


@st.composite
def bad_inputs(draw):
    """``(description, call(op), exception type, message pattern)``: one wrong argument in an otherwise
    valid call; ``op`` is one of the public ops, each given ``(weights, measurements, targets, **kw)``."""
    depth = draw(st.integers(1, 4))
    dims = [draw(st.integers(1, 7)) for _ in range(depth + 1)]
    d_L, d_0 = dims[-1], dims[0]
    batch = draw(st.sampled_from([(), (2,)]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    W = make_weights(dims, batch=batch, dtype=dtype, seed=draw(st.integers(0, 99)))
    family = draw(st.sampled_from(ALL_FAMILIES))
    meas, targets = make_measurements(family, d_L, d_0, dtype=dtype)
    kind = draw(st.sampled_from([
        "no_chain", "mixed_dtypes", "integer_weights", "not_a_matrix", "batch_mismatch", "single_tensor",
        "empty_list", "wrong_measurement_shape", "measurement_dtype", "not_measurements", "reduction",
        "backend", "targets_shape", "isotropic_sum_without_n", "lam",
    ]))
    kw = {}
    if kind == "no_chain":
        if depth == 1:
            W = W + [torch.ones(3, d_L + 1, dtype=dtype).expand(*batch, 3, d_L + 1)]
            j = 2
        else:
            j = draw(st.integers(2, depth))
            w = W[j - 1]
            W[j - 1] = torch.ones(*w.shape[:-1], w.shape[-1] + draw(st.integers(1, 3)), dtype=dtype)
        return kind, W, meas, targets, kw, ValueError, rf"weights do not chain at layer {j}: W_{j} has shape"
    if kind == "mixed_dtypes":
        other = torch.float64 if dtype == torch.float32 else torch.float32
        if depth == 1:
            W, j = W + [torch.ones(*batch, 3, d_L, dtype=other)], 2
        else:
            j = draw(st.integers(2, depth))
            W[j - 1] = W[j - 1].to(other)
        return kind, W, meas, targets, kw, TypeError, rf"weights mix dtypes: W_1 is {dtype} but W_{j} is {other}"
    if kind == "integer_weights":
        W = [w.to(torch.int64) for w in W]
        return kind, W, meas, targets, kw, TypeError, r"W_1\) must be floating point, got dtype torch.int64"
    if kind == "not_a_matrix":
        j = draw(st.integers(1, depth))
        W[j - 1] = torch.ones(draw(st.sampled_from([(), (3,)])), dtype=dtype)
        return kind, W, meas, targets, kw, ValueError, rf"W_{j}\) must have shape \(\.\.\., d_{j}, d_{j - 1}\)"
    if kind == "batch_mismatch":
        if depth == 1:
            W = W + [torch.ones(5, 3, d_L, dtype=dtype)]  # chains, but its batch (5,) is not W_1's
        else:
            j = draw(st.integers(2, depth))
            W[j - 1] = W[j - 1].detach().expand(7, *W[j - 1].shape) if not batch else W[j - 1][:1]
        return kind, W, meas, targets, kw, ValueError, r"must share their leading \(batch\) shape"
    if kind == "single_tensor":
        return kind, W[0], meas, targets, kw, TypeError, r"wrap it in a list"
    if kind == "empty_list":
        return kind, [], meas, targets, kw, ValueError, r"weights is empty"
    if kind == "wrong_measurement_shape":
        family = draw(st.sampled_from([f for f in ALL_FAMILIES if f != "isotropic"]))
        # Inputs measure d_0 only: every output is observed
        shape = draw(st.sampled_from([(d_L, d_0 + 2)] + ([(d_L + 1, d_0)] if family != "inputs" else [])))
        meas, _ = make_measurements(family, *shape, dtype=dtype)
        return kind, W, meas, targets, kw, ValueError, rf"\({d_L}, {d_0}\)"
    if kind == "measurement_dtype":
        family = draw(st.sampled_from(["rankone", "dense", "dense_kernel", "inputs"]))
        other = torch.float64 if dtype == torch.float32 else torch.float32
        meas, _ = make_measurements(family, d_L, d_0, dtype=other)
        return kind, W, meas, targets, kw, TypeError, rf"has dtype {other} but the weights are {dtype}"
    if kind == "not_measurements":
        bad = draw(st.sampled_from([None, "isotropic", torch.ones(3, d_L, d_0), 3]))
        return kind, W, bad, targets, kw, TypeError, r"measurements must be a flatkern measurement family"
    if kind == "reduction":
        kw["reduction"] = draw(_text({"mean", "sum"}))
        return kind, W, meas, targets, kw, ValueError, r"reduction must be one of \('mean', 'sum'\)"
    if kind == "backend":
        kw["backend"] = draw(_text(set(BACKENDS)))
        return kind, W, meas, targets, kw, ValueError, r"backend must be one of \(.*\), got"
    if kind == "targets_shape":
        shape = list(targets.shape)
        shape[-1] += draw(st.sampled_from([-1, 1, 2])) if shape[-1] > 1 else 1
        return kind, W, meas, torch.zeros(shape, dtype=dtype), kw, ValueError, r"targets has shape"
    if kind == "isotropic_sum_without_n":
        kw["reduction"] = "sum"
        M = torch.zeros(d_L, d_0, dtype=dtype)
        return kind, W, fk.Isotropic(), M, kw, ValueError, r"pass n to Isotropic\(n=\.\.\.\)"
    # lam
    kw["lam"] = draw(st.sampled_from([-1.0, -1e-9, math.nan, math.inf, -math.inf]))
    return kind, W, meas, targets, kw, ValueError, r"lam must be a finite number >= 0"


OPS = {
    "hessian_trace": lambda W, m, t, kw: fk.hessian_trace(W, m, **kw),
    "hessian_trace(per_layer)": lambda W, m, t, kw: fk.hessian_trace(W, m, per_layer=True, **kw),
    "hessian_trace_and_grad": lambda W, m, t, kw: fk.hessian_trace_and_grad(W, m, **kw),
    "mse_loss": lambda W, m, t, kw: fk.mse_loss(W, m, t, **kw),
    "objective": lambda W, m, t, kw: fk.objective(W, m, t, **{"lam": 0.5, **kw}),
}
# which ops read which argument
TAKES = {"targets_shape": ("mse_loss", "objective"), "lam": ("objective",)}


def test_random_bad_input_raises_the_documented_error(backend, profile):
    @_settings(profile, backend)
    @given(case=bad_inputs(), data=st.data())
    def check(case, data):
        kind, W, meas, targets, kw, exc, pattern = case
        op = data.draw(st.sampled_from(TAKES.get(kind, tuple(OPS))), label="op")
        kw = {"backend": backend, **kw}
        with pytest.raises(exc, match=pattern):
            OPS[op](W, meas, targets, kw)

    check()


# ---- issue 18: the kinds of silent answers the second probe found, as properties


def test_forward_mode_derivatives_are_the_references_or_a_clear_error(backend, profile):
    # jvp through every op: "auto" and "torch" give the reference's tangent (auto routes transforms to
    # it); a named kernel, which has no forward-mode rule, raises naming forward mode or torch.func
    @_settings(profile, backend)
    @given(p=problems(max_width=8, max_depth=4, dtypes=(torch.float64,), batches=((), (2,))))
    def check(p):
        # jvp's dual tensors are written in place: a stride-0 (expanded) primal fails in torch.func itself
        W = [w.clone() for w in p.weights()]
        T = [torch.randn(w.shape, dtype=w.dtype, generator=torch.Generator().manual_seed(p.seed + j))
             for j, w in enumerate(W)]
        meas, targets = p.measurements()
        calls = {
            "hessian_trace": lambda b: (lambda *w: fk.hessian_trace(list(w), meas, reduction=p.reduction,
                                                                    per_layer=p.per_layer, backend=b)),
            "objective": lambda b: (lambda *w: fk.objective(list(w), meas, targets, lam=0.5, reduction=p.reduction,
                                                            backend=b)[0]),
            "mse_loss": lambda b: (lambda *w: fk.mse_loss(list(w), meas, targets, p.reduction, backend=b)),
        }
        for name, make in calls.items():
            want = torch.func.jvp(make("torch"), tuple(W), tuple(T))[1]
            if backend in ("auto", "torch") or (name == "mse_loss" and backend == "triton"):
                got = torch.func.jvp(make(backend), tuple(W), tuple(T))[1]
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")
            else:
                with pytest.raises(RuntimeError, match=rf'backend="{backend}" cannot run here: .*(forward|torch\.func)'):
                    torch.func.jvp(make(backend), tuple(W), tuple(T))

    check()


@st.composite
def ties(draw, depth_min=2):
    """A chain of square layers in which two positions are tied: the same tensor, a view, a transpose."""
    depth = draw(st.integers(depth_min, 5))
    d = draw(st.integers(1, 8))
    i, j = sorted(draw(st.lists(st.integers(0, depth - 1), min_size=2, max_size=2, unique=True)))
    how = draw(st.sampled_from(["same", "view", "transpose", "detached_view"]))
    return depth, d, i, j, how, draw(st.integers(0, 2**16))


def test_a_tied_layer_is_always_an_error(backend, profile):
    @_settings(profile, backend)
    @given(case=ties())
    def check(case):
        depth, d, i, j, how, seed = case
        g = torch.Generator().manual_seed(seed)
        W = [torch.randn(d, d, dtype=torch.float64, generator=g) for _ in range(depth)]
        W[j] = {"same": W[i], "view": W[i].view(d, d), "transpose": W[i].t(), "detached_view": W[i].detach()}[how]
        for call in (lambda: fk.hessian_trace(W, fk.Isotropic(), backend=backend),
                     lambda: fk.hessian_trace_and_grad(W, fk.Isotropic(), backend=backend),
                     lambda: fk.TraceProblem(W, fk.Isotropic(), backend=backend)):
            with pytest.raises(ValueError, match=rf"weights\[{i}\] \(layer W_{i + 1}\) and weights\[{j}\] "
                                                 rf"\(layer W_{j + 1}\) are the same tensor or share memory"):
                call()

    check()


def test_hessian_trace_of_keeps_the_gradient_with_respect_to_the_inputs(profile):
    # the trace of a network's loss Hessian depends on x: its gradient in x must reach x.grad
    @settings(settings() if profile == "default" else settings.get_profile(profile))
    @given(depth=st.integers(1, 4), width=st.integers(1, 6), n=st.integers(1, 5), bias=st.booleans(),
           act=st.sampled_from(["none", "relu", "leaky"]), loss=st.sampled_from(["mse", "cross_entropy"]),
           seed=st.integers(0, 2**16))
    def check(depth, width, n, bias, act, loss, seed):
        torch.manual_seed(seed)
        layers = []
        for k in range(depth):
            layers.append(torch.nn.Linear(width, width if k < depth - 1 else 3, bias=bias, dtype=torch.float64))
            if k < depth - 1 and act != "none":
                layers.append(torch.nn.ReLU() if act == "relu" else torch.nn.LeakyReLU(0.1))
        model = torch.nn.Sequential(*layers)
        x = torch.randn(n, width, dtype=torch.float64, requires_grad=True)
        fk.hessian_trace_of(model, x, loss=loss).backward()
        assert x.grad is not None
        # the reference in x: the trace as a function of x alone, differentiated by autograd
        params = dict(model.named_parameters())

        def trace_in_x(xx):
            def loss_of(ps):
                out = torch.func.functional_call(model, ps, (xx,))
                if loss == "mse":
                    return torch.nn.functional.mse_loss(out, torch.zeros_like(out))
                return torch.nn.functional.cross_entropy(out, torch.zeros(n, dtype=torch.long))
            H = torch.func.hessian(loss_of)(params)
            return sum(H[k][k].reshape(v.numel(), v.numel()).diagonal().sum() for k, v in params.items())

        want = torch.func.grad(trace_in_x)(x.detach())
        torch.testing.assert_close(x.grad, want, rtol=1e-8, atol=1e-10)

    check()
