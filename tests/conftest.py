"""The test matrix: every backend, every dtype, and the hypothesis profiles.

Fixtures:

- ``backend``: each of ``"torch"``, ``"cpp"``, ``"triton"``, ``"auto"`` in turn, on CPU tensors.
  A backend that cannot run here is a skip that says why (``flatkern.kernels.routing.unavailable``), never
  silently less coverage.  ``"triton"`` on CPU runs in the Triton interpreter only
  (``TRITON_INTERPRET=1``), which is slow: its cases are marked ``triton`` and so left out of the
  default run (pyproject's ``addopts``); ``TRITON_INTERPRET=1 python -m pytest -m triton`` runs them.
- ``dtype``: float32 and float64, the dtypes every kernel takes.

The builders and the tolerance table (``make_weights``, ``make_measurements``, ``TOL``,
``assert_close_to_reference``, ...) live in ``tests/helpers.py``, re-exported here: test modules
and the bench scripts import them from there.

Hypothesis profiles (``tests/test_properties.py``):

- ``"flatkern"``, loaded by default: few examples (each property ~25), no deadline, derandomized
  (the same examples on every run and machine), no example database.  The property suite's share
  of the default run stays under a minute on 2 cores.
- ``"flatkern-slow"``: eight times the examples.  Every property also exists as a ``slow``-marked
  twin that runs under this profile: ``python -m pytest -m slow tests/test_properties.py`` (about
  5 minutes on 2 cores).
  ``HYPOTHESIS_PROFILE=<name>`` overrides the default profile of the non-slow cases.
"""

from __future__ import annotations

import os

# MKL's results for one product may differ in the last bit with the buffers' alignment (seen on
# AMD EPYC hosts), which breaks the tests that claim two kernel paths run the same arithmetic bit
# for bit (tests/test_cpp.py).  STRICT conditional numerical reproducibility keeps the instruction
# set and makes MKL's results independent of alignment; it must be set before torch loads MKL.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import pytest
import torch
from helpers import (  # noqa: F401  (re-exported: the one set of builders and tolerances)
    ALL_FAMILIES, BACKENDS, DIMS, FAMILIES, LAYOUTS, TOL, assert_close_to_reference, autograd_hessian_trace,
    backend_unavailable, make_measurements, make_weights, measurement_sources, measurements_from, terms_and_grads,
)
from hypothesis import HealthCheck, settings

_HYPOTHESIS_COMMON = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("flatkern", max_examples=25, **_HYPOTHESIS_COMMON)
settings.register_profile("flatkern-slow", max_examples=200, **_HYPOTHESIS_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "flatkern"))


@pytest.fixture(scope="session", params=[pytest.param(b, marks=pytest.mark.triton) if b == "triton" else b
                                          for b in BACKENDS])
def backend(request):
    """Each backend on CPU tensors; one that cannot run here is skipped, with its reason."""
    reason = backend_unavailable(request.param)
    if reason is not None:
        pytest.skip(f'backend="{request.param}" cannot run here: {reason}')
    return request.param


@pytest.fixture
def one_thread():
    """Run the test on one intra-op thread, as the reproduction's workers run every task: a solve or a
    training run is thousands of tiny products, where a second thread on a busy machine only waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", params=[torch.float32, torch.float64], ids=["float32", "float64"])
def dtype(request):
    return request.param


def pytest_configure(config):
    # "auto" without the C++ extension runs plain torch and warns once per process; the tests that
    # care about that warning check it in a fresh process (test_reference.py)
    config.addinivalue_line("filterwarnings", "ignore:flatkern. using the plain-torch backend:RuntimeWarning")
