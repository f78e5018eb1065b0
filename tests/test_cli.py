"""The `flatkern` command line: subcommands, options, and the lazy `bench` wiring."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flatkern import cli

REPO = Path(__file__).resolve().parents[1]

# `flatkern` as a bare package: its submodules import as usual, its __init__ (which imports torch) does not run
_BARE_PACKAGE = """
import importlib.util, pathlib, sys, types
root = pathlib.Path(importlib.util.find_spec("flatkern").origin).parent
package = types.ModuleType("flatkern"); package.__path__ = [str(root)]; sys.modules["flatkern"] = package
"""


def test_help_lists_reproduce_and_bench(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "reproduce" in out and "bench" in out


def test_reproduce_defaults_to_the_default_grid_flatkern_results_and_the_fast_path():
    parse = cli.build_reproduce_parser().parse_args
    args = parse([])
    assert args.grid == "default" and args.out == Path("flatkern-results") and args.backend == "auto"
    assert not args.overwrite and not args.resume
    assert parse(["--quick"]).grid == "quick"
    assert parse(["--full", "--out", "x"]).out == Path("x")


def test_the_backend_choices_are_the_package_s_one_list():
    from flatkern._checks import BACKENDS

    code = _BARE_PACKAGE + "import flatkern.cli as c; print(c._backend_names(), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"{tuple(BACKENDS)} False"  # read without importing torch
    assert next(a for a in cli.build_reproduce_parser()._actions if a.dest == "backend").choices == tuple(BACKENDS)


def test_quick_and_full_are_mutually_exclusive(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["reproduce", "--quick", "--full"])
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_no_command_prints_the_help_and_succeeds(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: flatkern") and "reproduce" in out and "bench" in out


@pytest.mark.parametrize("argv", [["-m", "flatkern"], ["-c", "import sys; from flatkern.cli import main; sys.exit(main())"]],
                         ids=["python-m-flatkern", "the-console-script"])
def test_flatkern_alone_prints_the_help_and_exits_0(argv):
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: flatkern") and "reproduce" in proc.stdout, proc


def test_an_unknown_command_names_the_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["reprodcue"])
    assert exc.value.code == 2
    assert "unknown command 'reprodcue' (did you mean reproduce?)" in capsys.readouterr().err


def test_a_misspelled_option_gets_reproduce_s_usage_and_a_suggestion(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["reproduce", "--quik"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: flatkern reproduce") and "--quik (did you mean --quick?)" in err, err


def test_reproduce_never_imports_the_benchmarks():
    code = (
        "import sys, flatkern.cli, flatkern.experiments;"
        "flatkern.cli.build_reproduce_parser().parse_args(['--quick']);"
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
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
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


def test_out_that_is_a_file_is_refused_saying_so(tmp_path, capsys, no_work):
    (tmp_path / "afile").write_text("keep")
    err = _refused(capsys, ["reproduce", "--quick", "--out", str(tmp_path / "afile")])
    assert f"argument --out: {tmp_path / 'afile'} is a file, not a folder" in err
    assert (tmp_path / "afile").read_text() == "keep"


@pytest.mark.parametrize("out", ["", "  "])
def test_an_empty_out_is_refused(capsys, no_work, out):
    err = _refused(capsys, ["reproduce", "--quick", "--out", out])
    assert "argument --out: must name a folder" in err


def test_a_finished_run_is_never_replaced_without_overwrite(tmp_path, capsys, no_work):
    (tmp_path / "results.json").write_text("[]\n")
    err = _refused(capsys, ["reproduce", "--quick", "--out", str(tmp_path)])
    assert f"argument --out: {tmp_path} holds a finished run (results.json); pass --overwrite" in err
    assert (tmp_path / "results.json").read_text() == "[]\n"
    with pytest.raises(AssertionError, match="the grid started"):  # --overwrite gets past every check
        cli.main(["reproduce", "--quick", "--out", str(tmp_path), "--overwrite"])


def test_resume_and_overwrite_exclude_each_other(tmp_path, capsys, no_work):
    err = _refused(capsys, ["reproduce", "--out", str(tmp_path), "--resume", "--overwrite"])
    assert "not allowed with argument" in err


# ---------------------------------------------------------------- usage errors before torch (issue 17 §7, issue 22 §4)

# `import flatkern` imports torch (flatkern/__init__.py); the command line itself must not, so a
# usage error costs only the start of Python once the package's own imports are lazy.  Here the
# package is a bare module, so that only what cli.py imports counts.
_WITHOUT_TORCH = _BARE_PACKAGE + """
from flatkern.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print("torch imported:", "torch" in sys.modules, file=sys.stderr)
sys.exit(code)
"""


@pytest.mark.parametrize("argv", [
    ["--help"], [], ["reproduce", "--help"], ["reproduce", "--quik"], ["reproduce", "--workers", "0"],
    ["reproduce", "--backend", "cuda"], ["reproduce", "--out", ""], ["reproduce", "--out", "{file}"],
    ["reproduce", "--out", "{file}/under"], ["reproduce", "--out", "{finished}"], ["reproduce", "--quick", "--full"],
], ids=["help", "nothing", "reproduce-help", "misspelled", "workers", "backend", "empty-out", "out-a-file",
        "out-under-a-file", "out-finished", "quick-and-full"])
def test_usage_errors_and_help_come_before_torch_is_imported(tmp_path, argv):
    (tmp_path / "file").write_text("")
    (tmp_path / "finished").mkdir()
    (tmp_path / "finished" / "results.json").write_text("[]")
    argv = [a.format(file=tmp_path / "file", finished=tmp_path / "finished") for a in argv]
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_TORCH, *argv], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode in (0, 2), proc.stderr[-3000:]
    assert "torch imported: False" in proc.stderr, proc.stderr[-3000:]


# ---------------------------------------------------------------- the grid from the command line (issue 20 §2)

_BAD_GRIDS = [
    (["--sizes", "0"], "argument --sizes: must be positive ints, got 0"),
    (["--depths", "2,x"], "argument --depths: must be comma-separated positive ints"),
    (["--seeds", "-1"], "argument --seeds: must be ints >= 0, got -1"),
    (["--ns", "100,100"], "argument --ns: must be distinct"),
    (["--sizes", "3", "--ranks", "2,5"], "argument --ranks: a rank-r d × d matrix needs r <= d"),
    (["--experiments", "sensign"], "no experiment 'sensign' (did you mean sensing?)"),
    (["--grid-file", "missing.toml"], "argument --grid-file: cannot read missing.toml"),
    (["--grid-file", "grid.yaml"], "a grid file ends in .toml or .json"),
]


@pytest.mark.parametrize("argv, message", _BAD_GRIDS, ids=[m.split(":")[0] + str(i) for i, (_, m) in enumerate(_BAD_GRIDS)])
def test_a_bad_grid_is_a_usage_error_before_torch_is_imported(argv, message, tmp_path):
    (tmp_path / "grid.yaml").write_text("sizes: [3]\n")
    code = _BARE_PACKAGE + (
        "import flatkern.cli as c\n"
        f"try:\n    c.main(['reproduce', *{argv!r}, '--out', 'out'])\n"
        "except SystemExit as e:\n    print(e.code, 'torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.stdout.split() == ["2", "False"], proc
    assert message in proc.stderr and proc.stderr.startswith("usage: flatkern reproduce"), proc.stderr


@pytest.mark.parametrize("text, message", [
    ('experimens = ["sensing"]', "experimens: unknown key (did you mean experiments?)"),
    ('preset = "quik"', "preset must be one of quick, default, full"),
    ("sizes = [3.5]", "sizes must be an int or a list of ints"),
    ("seeds = []", "seeds must be an int or a list of ints"),
    ('[sensing]\ndeptsh = [2]', "sensing.deptsh: not an axis (did you mean depths?)"),
    ("sensing = 3", "sensing must be a table of axes"),
    ("sizes = [", "is not valid TOML"),
])
def test_a_grid_file_names_the_key_it_cannot_use(tmp_path, text, message):
    path = tmp_path / "grid.toml"
    path.write_text(text + "\n")
    with pytest.raises(cli.GridFileError) as exc:
        cli.read_grid_file(path)
    assert message in str(exc.value) and str(path) in str(exc.value)


def test_a_toml_and_a_json_grid_file_say_the_same_and_options_override_them(tmp_path):
    toml = tmp_path / "grid.toml"
    toml.write_text('preset = "quick"\nexperiments = ["sensing", "trajectory"]\nsizes = 6\nranks = [1]\nseeds = [0, 3]\n'
                    "[sensing]\nns = [30, 40]\n")
    json_file = tmp_path / "grid.json"
    json_file.write_text('{"preset": "quick", "experiments": ["sensing", "trajectory"], "sizes": 6, "ranks": [1], '
                         '"seeds": [0, 3], "sensing": {"ns": [30, 40]}}')
    assert cli.read_grid_file(toml) == cli.read_grid_file(json_file) == {
        "preset": "quick", "experiments": ("sensing", "trajectory"), "axes": {"sizes": (6,), "ranks": (1,), "seeds": (0, 3)},
        "per_experiment": {"sensing": {"ns": (30, 40)}}}
    args = cli.build_reproduce_parser().parse_args(["--grid-file", str(toml), "--seeds", "5", "--full"])
    wanted = cli._grid_options(args)
    assert wanted["preset"] == "full" and wanted["axes"] == {"sizes": (6,), "ranks": (1,), "seeds": (5,)}
    assert wanted["custom"] and wanted["per_experiment"] == {"sensing": {"ns": (30, 40)}}
    # what --resume needs to rebuild the same grid
    assert cli._grid_command(args) == f"flatkern reproduce --full --grid-file {toml} --seeds 5"
    plain = cli.build_reproduce_parser().parse_args([])
    assert not cli._grid_options(plain)["custom"] and cli._grid_command(plain) == "flatkern reproduce"


@settings(max_examples=40, deadline=None)
@given(values=st.lists(st.integers(-3, 50), min_size=1, max_size=5), axis=st.sampled_from(["sizes", "ranks", "depths", "ns", "seeds"]))
def test_an_axis_option_takes_distinct_ints_above_its_minimum_or_names_what_is_wrong(values, axis):
    minimum = 0 if axis == "seeds" else 1
    parse = cli._axis_type(axis)
    text = ",".join(map(str, values))
    if min(values) >= minimum and len(set(values)) == len(values):
        assert parse(text) == tuple(values)
    else:
        with pytest.raises(cli.argparse.ArgumentTypeError) as exc:
            parse(text)
        assert ("distinct" in str(exc.value)) or (str(min(values)) in str(exc.value)), exc.value
