"""The `flatkern` command line: subcommands, options, and the lazy `bench` wiring."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from flatkern import cli

REPO = Path(__file__).resolve().parents[1]


def test_help_lists_reproduce_and_bench(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "reproduce" in out and "bench" in out


def test_reproduce_defaults_to_the_default_grid_and_flatkern_results():
    args = cli.build_parser().parse_args(["reproduce"])
    assert args.grid == "default" and args.out == Path("flatkern-results") and args.backend == "torch"
    assert cli.build_parser().parse_args(["reproduce", "--quick"]).grid == "quick"
    assert cli.build_parser().parse_args(["reproduce", "--full", "--out", "x"]).out == Path("x")


def test_quick_and_full_are_mutually_exclusive(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["reproduce", "--quick", "--full"])
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_a_missing_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2


def test_reproduce_never_imports_the_benchmarks():
    code = (
        "import sys, flatkern.cli, flatkern.experiments;"
        "flatkern.cli.build_parser().parse_args(['reproduce', '--quick']);"
        "print('flatkern.benchmarks' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_bench_hands_its_arguments_to_the_benchmarks_module(monkeypatch):
    seen = {}
    fake = types.ModuleType("flatkern.benchmarks")
    fake.add_arguments = lambda parser: parser.add_argument("--size", type=int, default=1)
    fake.run = lambda args: seen.setdefault("size", args.size) and 7
    monkeypatch.setitem(sys.modules, "flatkern.benchmarks", fake)
    assert cli.main(["bench", "--size", "5"]) == 7
    assert seen == {"size": 5}


def test_bench_without_the_benchmarks_module_says_so(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "flatkern.benchmarks", None)  # makes the import fail
    assert cli.main(["bench"]) == 2
    assert "no flatkern.benchmarks module" in capsys.readouterr().err


def test_python_dash_m_flatkern_runs_the_cli():
    proc = subprocess.run([sys.executable, "-m", "flatkern", "reproduce", "--help"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0 and "--quick" in proc.stdout and "--full" in proc.stdout


def test_reproduce_without_cvxpy_stops_before_training(monkeypatch, capsys, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cvxpy" else real(name, *a))
    assert cli.main(["reproduce", "--quick", "--out", str(tmp_path / "out")]) == 2
    assert "needs cvxpy" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- options checked before any work (issue 11 §4)


@pytest.fixture
def no_work(monkeypatch):
    """Make any start of the grid fail the test: the checks must come first."""
    import flatkern.experiments

    def started(*args, **kwargs):
        raise AssertionError("the grid started before the options were checked")

    monkeypatch.setattr(flatkern.experiments, "run_grid", started)


def _refused(capsys, argv) -> str:
    import time

    start = time.perf_counter()
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert time.perf_counter() - start < 1.0
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: flatkern reproduce") and "flatkern reproduce: error: argument " in err, err
    return err


def test_out_under_a_regular_file_is_refused_before_any_work(tmp_path, capsys, no_work):
    (tmp_path / "file").write_text("")
    err = _refused(capsys, ["reproduce", "--quick", "--out", str(tmp_path / "file" / "out")])
    assert "argument --out" in err and "Not a directory" in err


def test_an_unwritable_out_is_refused_before_any_work(tmp_path, capsys, no_work):
    if os.geteuid() == 0:  # root writes anywhere chmod allows: use a folder nobody can create files in
        out = Path("/proc/flatkern-out")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        out = locked / "out"
    err = _refused(capsys, ["reproduce", "--quick", "--out", str(out)])
    assert f"argument --out: cannot write to {out}" in err


@pytest.mark.parametrize("workers", ["0", "-1", "two"])
def test_a_worker_count_below_one_is_refused_before_any_work(tmp_path, capsys, no_work, workers):
    err = _refused(capsys, ["reproduce", "--quick", "--out", str(tmp_path), "--workers", workers])
    assert "argument --workers" in err


def test_an_unavailable_backend_is_refused_before_any_work(tmp_path, capsys, no_work, monkeypatch):
    import flatkern.ops

    monkeypatch.setattr(flatkern.ops, "available_backends", lambda device="cpu", *a, **k: ["torch"])
    err = _refused(capsys, ["reproduce", "--quick", "--out", str(tmp_path), "--backend", "cpp"])
    assert "argument --backend: cpp is not available" in err and "available: torch" in err
