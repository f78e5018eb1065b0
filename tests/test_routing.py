"""Backend routing (issue 12 §2): ``backend="auto"`` answers whatever plain torch answers, a backend
named by the user runs or says why not, and ``hessian_trace_and_grad`` is the reference's value and
gradient on every backend, with or without autograd."""

from __future__ import annotations

import contextlib
import subprocess
import sys

import pytest
import torch
from helpers import ALL_FAMILIES, assert_close_to_reference, make_measurements, make_weights

import flatkern as fk
from flatkern import ops
from flatkern.kernels import routing

# inputs no compiled kernel takes on CPU: (dims, batch, dtype, what the refusal must name)
AWKWARD = {
    "float16": ([3, 4, 5], (2,), torch.float16, "float16"),
    "bfloat16": ([3, 4, 5], (2,), torch.bfloat16, "bfloat16"),
    "zero_hidden_width": ([3, 0, 5], (2,), torch.float64, "width"),
    "zero_input_width": ([0, 4, 5], (), torch.float64, "width"),
    "empty_batch": ([3, 4, 5], (0,), torch.float64, "batch|empty"),
}
# Entries cannot measure an E with no columns
AWKWARD_CASES = [(case, family) for case in AWKWARD for family in ALL_FAMILIES
                 if not (case == "zero_input_width" and family == "entries")]


def _problem(case, family):
    dims, batch, dtype, _ = AWKWARD[case]
    W = make_weights(dims, batch=batch, dtype=dtype, seed=2)
    meas, targets = make_measurements(family, dims[-1], dims[0], dtype=dtype)
    return W, meas, targets


def _every_answer(W, meas, targets, backend):
    """Each public op's output (and the trace's gradient) on ``backend``."""
    Wg = [w.detach().requires_grad_() for w in W]
    per_layer = fk.hessian_trace(Wg, meas, per_layer=True, backend=backend)
    out = {
        "hessian_trace": fk.hessian_trace(W, meas, backend=backend),
        "hessian_trace(sum)": fk.hessian_trace(W, meas, reduction="sum", backend=backend),
        "hessian_trace(per_layer)": per_layer.detach(),
        "grad of hessian_trace": torch.autograd.grad(per_layer.sum(), Wg, allow_unused=True, materialize_grads=True),
        "mse_loss": fk.mse_loss(W, meas, targets, backend=backend),
        "objective": fk.objective(W, meas, targets, lam=0.25, backend=backend),
        "end_to_end": fk.end_to_end(W, backend=backend),
    }
    for per_layer in (False, True):
        trace, grads = fk.hessian_trace_and_grad(W, meas, per_layer=per_layer, backend=backend)
        out[f"hessian_trace_and_grad(per_layer={per_layer})"] = (trace, grads)
    return out


@pytest.mark.parametrize("case, family", AWKWARD_CASES)
def test_auto_answers_what_plain_torch_answers(case, family):
    W, meas, targets = _problem(case, family)
    want = _every_answer(W, meas, targets, "torch")
    got = _every_answer(W, meas, targets, "auto")
    for key in want:
        torch.testing.assert_close(got[key], want[key], msg=lambda m: f"{key}: {m}")
    if case == "empty_batch":
        assert got["hessian_trace"].shape == (0,) and got["hessian_trace(per_layer)"].shape == (0, 2)
    if W[0].dtype in (torch.float16, torch.bfloat16):  # and in half precision, an answer near the float64 one
        ref = fk.hessian_trace([w.double() for w in W], meas.to(torch.float64), per_layer=True, backend="torch")
        assert_close_to_reference(got["hessian_trace(per_layer)"], ref, W[0].dtype)


CPP_OPS = {
    "hessian_trace": lambda W, m, t: fk.hessian_trace(W, m, backend="cpp"),
    "hessian_trace(per_layer)": lambda W, m, t: fk.hessian_trace(W, m, per_layer=True, backend="cpp"),
    "hessian_trace_and_grad": lambda W, m, t: fk.hessian_trace_and_grad(W, m, backend="cpp"),
    "mse_loss": lambda W, m, t: fk.mse_loss(W, m, t, backend="cpp"),
    "objective": lambda W, m, t: fk.objective(W, m, t, lam=0.25, backend="cpp"),
}


@pytest.mark.parametrize("op", CPP_OPS)
@pytest.mark.parametrize("case", [c for c in AWKWARD if c != "empty_batch"])
def test_cpp_backend_refuses_what_its_kernel_does_not_take_and_says_why(case, op):
    W, meas, targets = _problem(case, "rankone")
    missing = routing.unavailable("cpp", "cpu")
    why = r"C\+\+ extension" if missing is not None else AWKWARD[case][3]
    with pytest.raises(RuntimeError, match=rf'backend="cpp" cannot run here: .*({why}).*backend="torch" can'):
        CPP_OPS[op](W, meas, targets)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_cpp_backend_answers_an_empty_batch_like_plain_torch(family):
    # the C++ kernel takes an empty batch (nothing to refuse): it must answer what plain torch answers
    W, meas, targets = _problem("empty_batch", family)
    missing = routing.unavailable("cpp", "cpu")
    if missing is not None:
        with pytest.raises(RuntimeError, match=r'backend="cpp" cannot run here: .*C\+\+ extension'):
            fk.hessian_trace(W, meas, backend="cpp")
        return
    want, got = _every_answer(W, meas, targets, "torch"), _every_answer(W, meas, targets, "cpp")
    for key in want:
        torch.testing.assert_close(got[key], want[key], msg=lambda m: f"{key}: {m}")


def test_without_the_extension_the_op_differentiates_like_the_reference():
    # a build without flatkern._C (FLATKERN_SKIP_CPP_BUILD=1) registers the plain-torch kernels and the
    # Python autograd formula for the op: "auto" must then give the reference's values and gradients,
    # per layer or summed, with E (objective) or without
    code = (
        "import sys; sys.modules['flatkern._C'] = None\n"
        "import warnings; warnings.simplefilter('ignore')\n"
        "import torch, flatkern as fk\n"
        "g = torch.Generator().manual_seed(0)\n"
        "W = [torch.randn(2, 4, 3, generator=g, dtype=torch.float64), torch.randn(2, 5, 4, generator=g, dtype=torch.float64)]\n"
        "m = fk.Dense(torch.randn(6, 5, 3, generator=g, dtype=torch.float64)); b = torch.randn(6, dtype=torch.float64)\n"
        "def answers(backend):\n"
        "    out = []\n"
        "    for f in (lambda w: fk.hessian_trace(w, m, backend=backend),\n"
        "              lambda w: fk.hessian_trace(w, m, per_layer=True, backend=backend),\n"
        "              lambda w: fk.hessian_trace(w, m, reduction='sum', per_layer=True, backend=backend),\n"
        "              lambda w: sum(fk.objective(w, m, b, lam=0.5, backend=backend))):\n"
        "        ws = [w.clone().requires_grad_() for w in W]\n"
        "        value = f(ws)\n"
        "        out += [value.detach(), *torch.autograd.grad(value.sum(), ws)]\n"
        "    return out\n"
        "for a, r in zip(answers('auto'), answers('torch')):\n"
        "    torch.testing.assert_close(a, r, atol=1e-12, rtol=1e-12)\n"
        "print('ok')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


UNKNOWN_BACKEND_OPS = {
    "hessian_trace": lambda W, m, t, b: fk.hessian_trace(W, m, backend=b),
    "hessian_trace_and_grad": lambda W, m, t, b: fk.hessian_trace_and_grad(W, m, backend=b),
    "mse_loss": lambda W, m, t, b: fk.mse_loss(W, m, t, backend=b),
    "objective": lambda W, m, t, b: fk.objective(W, m, t, lam=0.25, backend=b),
    "end_to_end": lambda W, m, t, b: fk.end_to_end(W, backend=b),
}


@pytest.mark.parametrize("name", ["cuda", "Torch", "", "c++"])
@pytest.mark.parametrize("op", UNKNOWN_BACKEND_OPS)
def test_unknown_backend_is_a_value_error_naming_the_choices(op, name):
    W = make_weights([3, 4, 5])
    meas, targets = make_measurements("entries", 5, 3)
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'torch', 'cpp', 'triton'\), got"):
        UNKNOWN_BACKEND_OPS[op](W, meas, targets, name)


# ------------------------------------------------- hessian_trace_and_grad on every backend

CONTEXTS = {
    "grad_enabled": contextlib.nullcontext,
    "no_grad": torch.no_grad,
    "inference_mode": torch.inference_mode,
}


@pytest.mark.parametrize("per_layer", [False, True], ids=["summed", "per_layer"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("batch", [(), (2,)], ids=["unbatched", "batched"])
@pytest.mark.parametrize("dims", [[5, 3], [2, 7, 11, 3]], ids=["L1", "L3"])
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_hessian_trace_and_grad_is_the_references_value_and_autograd_gradient(
        backend, dtype, family, dims, batch, reduction, per_layer):
    W = make_weights(dims, batch=batch, dtype=dtype, seed=7, requires_grad=True)
    meas, _ = make_measurements(family, dims[-1], dims[0], dtype=dtype)
    # the ground truth: the float64 reference and autograd.grad of its sum
    W64 = [w.detach().double().requires_grad_() for w in W]
    meas64 = meas.to(torch.float64)
    ref = fk.hessian_trace(W64, meas64, reduction=reduction, per_layer=per_layer, backend="torch")
    ref_grads = torch.autograd.grad(ref.sum(), W64, allow_unused=True, materialize_grads=True)
    contexts = list(CONTEXTS)
    if backend == "triton":  # the interpreter is slow: one context per case, in turn, each still covered
        contexts = [contexts[(ALL_FAMILIES.index(family) + len(dims) + len(batch) + per_layer) % len(contexts)]]
    for context in contexts:
        with CONTEXTS[context]():
            trace, grads = fk.hessian_trace_and_grad(W, meas, reduction=reduction, per_layer=per_layer,
                                                     backend=backend)
        where = f"{backend}, {context}"
        assert not trace.requires_grad and not any(g.requires_grad for g in grads), where
        assert trace.dtype == dtype and trace.shape == ref.shape, where
        assert len(grads) == len(W) and all(g.shape == w.shape and g.dtype == dtype for g, w in zip(grads, W)), where
        assert_close_to_reference(trace, ref, dtype, msg=lambda m: f"trace ({where}): {m}")
        for j, (g, r) in enumerate(zip(grads, ref_grads), start=1):
            assert_close_to_reference(g, r, dtype, msg=lambda m: f"grad of W_{j} ({where}): {m}")
    assert all(w.grad is None for w in W)  # no autograd graph was built or run
