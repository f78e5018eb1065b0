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
    if "FlatnessRegularizedMLP" in block:
        # the minibatch example shows the regularizer at work: the trace it prints falls from the first epoch
        traces = [float(t) for t in re.findall(r"tr ∇²L on the last batch = ([0-9.eE+-]+)", run.stdout)]
        assert len(traces) == 10 and traces[-1] < traces[0], run.stdout
    elif "FlatnessRegularized" in block:
        # the training example shows learning: the end-to-end matrix recovers the target, unseen entries included
        found = re.search(r"relative error ([0-9.eE+-]+)", run.stdout)
        assert found, f"the training example does not print its relative error:\n{run.stdout}"
        assert float(found.group(1)) < 0.05, run.stdout
        assert re.search(r"loss \S+ .*trace \S+", run.stdout), run.stdout


# ------------------------------------------------------------------ the README's test command (issue 22)

ROOT = README.parent


def _test_command() -> str:
    """The command CI runs: .ci/run reads it from the README (the line after the test-command marker)."""
    run = subprocess.run(["bash", str(ROOT / ".ci" / "run"), "--print-command"], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0 and run.stdout.strip(), run.stderr
    return run.stdout.strip()


_FAKE_PIP = '#!/bin/sh\necho "pip $*" >> "$CALLS"\n'
# a python that only records its call and, for a pytest run, exits with the status asked for that half
_FAKE_PYTHON = '''#!/bin/sh
echo "python TRITON_INTERPRET=${TRITON_INTERPRET:-} $*" >> "$CALLS"
case "$*" in
  *pytest*) if [ "${TRITON_INTERPRET:-}" = 1 ]; then exit "$SECOND_HALF"; else exit "$FIRST_HALF"; fi ;;
esac
'''


def _run_with_fake_tools(cmd, tmp_path, first, second, shell):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("pip", _FAKE_PIP), ("python", _FAKE_PYTHON)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    calls = tmp_path / "calls.txt"
    calls.write_text("")
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "CALLS": str(calls), "FIRST_HALF": str(first),
           "SECOND_HALF": str(second)}
    run = subprocess.run([*shell, cmd], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    return run.returncode, calls.read_text().splitlines()


def test_readme_test_command_installs_the_cpu_torch_first():
    cmd = _test_command()
    # a bare `torch` requirement would pull a multi-GB CUDA build: the pin comes before flatkern's install
    assert cmd.startswith("pip install torch==2.13.0 "), cmd
    assert cmd.index("torch==2.13.0") < cmd.index('-e ".[test]"'), cmd


@pytest.mark.parametrize("shell", [["bash", "-euo", "pipefail", "-c"], ["bash", "-c"], ["sh", "-c"]],
                         ids=["as-ci-runs-it", "pasted-in-bash", "pasted-in-sh"])
@pytest.mark.parametrize("first, second", [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_readme_test_command_runs_both_halves_and_fails_if_either_fails(first, second, shell, tmp_path):
    code, calls = _run_with_fake_tools(_test_command(), tmp_path, first, second, shell)
    pytest_runs = [c for c in calls if "pytest" in c]
    # both halves ran, the default run first, then the Triton half in the interpreter
    assert len(pytest_runs) == 2, calls
    assert "TRITON_INTERPRET= " in pytest_runs[0] and "-m triton or slow" not in pytest_runs[0], pytest_runs
    assert "TRITON_INTERPRET=1 " in pytest_runs[1] and "-m triton or slow" in pytest_runs[1], pytest_runs
    assert (code == 0) == (first == 0 and second == 0), (first, second, code)


def test_readme_test_command_stops_when_the_install_fails(tmp_path):
    # a failed install must not be reported as a test run that passed
    cmd = _test_command().replace("pip install", "pip_fails install", 1)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "pip_fails").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "bin" / "pip_fails").chmod(0o755)
    code, calls = _run_with_fake_tools(cmd, tmp_path, 0, 0, ["bash", "-euo", "pipefail", "-c"])
    assert code != 0 and not [c for c in calls if "pytest" in c], calls
