"""The README's examples run as written (issue 11 §6): each Python block on its own, in a fresh
interpreter, printing what it computes; the training example learns."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


IDS = [f"block{i}" for i in range(1, len(BLOCKS) + 1)]


def test_readme_has_its_python_examples():
    assert len(BLOCKS) >= 2, "the README's ```python blocks were not found"
    assert any("FlatnessRegularized" in b for b in BLOCKS), "the training example is missing"


@pytest.mark.parametrize("block", BLOCKS, ids=IDS)
def test_readme_block_prints_every_value_it_computes(block):
    # a flatkern call at the top level whose value is dropped computes something the reader never sees
    dropped = [ast.unparse(node) for node in ast.parse(block).body
               if isinstance(node, ast.Expr) and ast.unparse(node).startswith(("fk.", "flatkern."))]
    assert not dropped, f"values computed but not printed: {dropped}"


@pytest.mark.parametrize("block", BLOCKS, ids=IDS)
def test_readme_block_runs_on_its_own(block, tmp_path):
    # a fresh interpreter, outside the repository: the block's own imports must suffice
    run = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"the README block failed:\n{block}\n--- stderr ---\n{run.stderr}"
    assert run.stdout.strip(), "the README block printed nothing"
    if "FlatnessRegularized" in block:
        # the training example shows learning: the end-to-end matrix recovers the target, unseen entries included
        found = re.search(r"relative error ([0-9.eE+-]+)", run.stdout)
        assert found, f"the training example does not print its relative error:\n{run.stdout}"
        assert float(found.group(1)) < 0.05, run.stdout
        assert re.search(r"loss \S+ .*trace \S+", run.stdout), run.stdout
