"""One family encoding: Python, the C++ kernels and the Triton kernels agree on it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import flatkern as fk
from flatkern.kernels import families, schemas

ROOT = Path(__file__).resolve().parents[1]
CODES = {name: getattr(families, name) for name in ("ISOTROPIC", "ENTRIES", "RANK_ONE", "DENSE", "DENSE_KERNEL", "INPUTS")}


def test_family_codes_are_distinct_and_named():
    assert sorted(CODES.values()) == list(range(len(CODES)))
    assert set(families.NAMES) == set(CODES.values())


def test_cpp_header_names_the_same_codes():
    text = (ROOT / "csrc/ops/cpu/layout.h").read_text()
    found = {name: int(value) for name, value in re.findall(r"\b([A-Z_]+)\s*=\s*(\d+)\s*,", text) if name in CODES}
    assert found == CODES


def test_triton_package_uses_the_python_codes():
    pytest.importorskip("triton")
    src = "\n".join(p.read_text() for p in (ROOT / "flatkern/kernels/triton").glob("*.py"))
    # the kernels compare against the imported names, never against bare numbers or codes of their own
    assert re.search(r"from \.\.(kernels)?\s*import families|from \.\.families import|flatkern\.kernels\.families", src)
    assert not re.search(r"FAMILY\s*==\s*\d", src)
    assert not re.search(r"=\s*range\(\s*[56]\s*\)", src)


def _measurements(dt):
    torch.manual_seed(0)
    d_L, d_0 = 3, 4
    return {
        families.ISOTROPIC: fk.Isotropic(),
        families.ENTRIES: fk.Entries.uniform(7, (d_L, d_0)),
        families.RANK_ONE: fk.RankOne(torch.randn(8, d_L, dtype=dt), torch.randn(8, d_0, dtype=dt)),
        families.DENSE: fk.Dense(torch.randn(5, d_L, d_0, dtype=dt)),
        families.DENSE_KERNEL: fk.Dense(torch.randn(30, d_L, d_0, dtype=dt)),
        families.INPUTS: fk.Inputs(torch.randn(9, d_0, dtype=dt)),
    }


@pytest.mark.parametrize("code", sorted(CODES.values()), ids=lambda c: families.NAMES[c])
def test_each_code_means_its_family_in_the_op(code):
    """The op, called with a family's code and operands, computes that family's reference trace
    (whichever CPU kernel this build has): the codes mean the same thing on both sides."""
    dt = torch.float64
    m = _measurements(dt)[code]
    assert m.family == code
    W = [torch.randn(6, 4, dtype=dt), torch.randn(5, 6, dtype=dt), torch.randn(3, 5, dtype=dt)]
    terms, _, _ = schemas.hessian_trace(W, code, list(m.operands), False, 1.0, False)
    expected = fk.reference.layer_terms_ref(W, m)
    torch.testing.assert_close(terms, expected, atol=1e-12, rtol=1e-12)


def test_unknown_code_is_an_error_not_a_crash():
    W = [torch.randn(3, 3, dtype=torch.float64)]
    with pytest.raises((RuntimeError, ValueError), match="famil"):
        schemas.hessian_trace(W, 17, [], False, 1.0, False)
