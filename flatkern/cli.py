"""The ``flatkern`` command.

    flatkern reproduce [--quick | --full] [--out DIR] [--resume | --overwrite]   the theory, reproduced end to end
                       [--experiments A,B] [--sizes D,..] [--ranks R,..] [--depths L,..] [--ns N,..] [--seeds S,..]
                       [--grid-file FILE.toml|.json]                           ... on a grid of your own
    flatkern bench ...                                                          the benchmarks (flatkern.benchmarks)

``flatkern`` alone prints this help.  ``reproduce`` checks every option and the
output folder before any work (and before it imports torch: a usage error
costs no more than starting Python), saves each finished task in
``DIR/records.jsonl`` as it finishes, and on Ctrl-C stops within a second or
two and prints the command that resumes.  ``torchrun --nproc_per_node=K -m
flatkern reproduce`` spreads the grid over ``K`` ranks (they meet through
torchrun's store); rank 0 writes the files.

This module imports only the standard library at its top; torch comes with
``flatkern.experiments`` once the options are known to be good.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import shlex
import sys
from pathlib import Path

__all__ = ["main", "build_parser", "build_reproduce_parser", "read_grid_file", "GridFileError"]

_GRIDS = ("quick", "default", "full")  # the names of flatkern.experiments.GRIDS, which imports torch
# the grid axes (flatkern.experiments.base.AXES, which imports nothing but is beside modules that import torch)
_AXES = ("sizes", "ranks", "depths", "ns", "seeds")
_AXIS_HELP = {
    "sizes": "matrix sizes d (a d × d M*; with --ranks, every (size, rank) pair)",
    "ranks": "ranks of M* (each at most every size)",
    "depths": "network depths L",
    "ns": "measurement counts n (every size at each n)",
    "seeds": "seeds, from 0 (the problem and the initialization)",
}


def _experiment_names() -> tuple[str, ...]:
    """The registered experiments' names, from the registry's lines (``module:INSTANCE``, the name its instance in
    lower case: tests/test_experiments.py checks it), without importing an experiment (which imports torch)."""
    from .experiments import REGISTRY

    return tuple(line.split(":")[1].lower() for line in REGISTRY)


def _int_list(text: str, minimum: int = 1) -> tuple[int, ...]:
    """``"2,3,4"`` as ``(2, 3, 4)``: distinct ints of at least ``minimum``, comma-separated."""
    what = "positive ints" if minimum == 1 else f"ints >= {minimum}"
    values = []
    for word in text.split(","):
        try:
            value = int(word)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be comma-separated {what} (e.g. 2,3,4), got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {what}, got {value} in {text!r}")
        values.append(value)
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"must be distinct, got {text!r}")
    return tuple(values)


def _names(text: str) -> tuple[str, ...]:
    names, known = tuple(w.strip() for w in text.split(",")), _experiment_names()
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            raise argparse.ArgumentTypeError(f"no experiment {name!r}" + (f" (did you mean {close[0]}?)" if close else "")
                                             + f"; the experiments are {', '.join(known)}")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"must be distinct, got {text!r}")
    return names


class GridFileError(ValueError):
    """A grid file that cannot be read or says something ``flatkern reproduce`` cannot run."""


def _axis_minimum(axis: str) -> int:
    return 0 if axis == "seeds" else 1  # seed 0 is every preset's first


def _axis_type(axis: str):
    def parse(text: str) -> tuple[int, ...]:
        return _int_list(text, _axis_minimum(axis))

    return parse


def _axis_values(value, axis: str, where: str) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise GridFileError(f"{where} must be an int or a list of ints, got {value!r}")
    try:
        return _int_list(",".join(map(str, value)), _axis_minimum(axis))
    except argparse.ArgumentTypeError as exc:
        raise GridFileError(f"{where} {exc}") from None


def read_grid_file(path: Path) -> dict:
    """A grid file (``.toml``, read with ``tomllib``, or ``.json``) as ``{"preset", "experiments", "axes", "per_experiment"}``.

    Keys: ``preset`` (``"quick"``, ``"default"`` or ``"full"``), ``experiments`` (a list of names), the axes
    ``sizes``, ``ranks``, ``depths``, ``ns``, ``seeds`` (a positive int or a list), and one table per experiment
    (``[sensing]``) with axes for that experiment only.  ``GridFileError`` names the key of anything else.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise GridFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    if path.suffix == ".toml":
        import tomllib

        try:
            obj = tomllib.loads(data.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise GridFileError(f"{path} is not valid TOML: {exc}") from None
    elif path.suffix == ".json":
        import json

        try:
            obj = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise GridFileError(f"{path} is not valid JSON: {exc}") from None
    else:
        raise GridFileError(f"{path}: a grid file ends in .toml or .json, got {path.suffix or 'no suffix'!r}")
    if not isinstance(obj, dict):
        raise GridFileError(f"{path} must hold a table (a JSON object), got a {type(obj).__name__}")
    known = _experiment_names()
    grid = {"preset": None, "experiments": None, "axes": {}, "per_experiment": {}}
    for key, value in obj.items():
        where = f"{path}: {key}"
        if key == "preset":
            if value not in _GRIDS:
                raise GridFileError(f"{where} must be one of {', '.join(_GRIDS)}, got {value!r}")
            grid["preset"] = value
        elif key == "experiments":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or not value:
                raise GridFileError(f"{where} must be a list of experiment names, got {value!r}")
            try:
                grid["experiments"] = _names(",".join(value))
            except argparse.ArgumentTypeError as exc:
                raise GridFileError(f"{where}: {exc}") from None
        elif key in _AXES:
            grid["axes"][key] = _axis_values(value, key, where)
        elif key in known:
            if not isinstance(value, dict):
                raise GridFileError(f"{where} must be a table of axes ({', '.join(_AXES)}), got {value!r}")
            for axis, values in value.items():
                if axis not in _AXES:
                    close = difflib.get_close_matches(axis, _AXES, n=1)
                    raise GridFileError(f"{where}.{axis}: not an axis" + (f" (did you mean {close[0]}?)" if close else "")
                                        + f"; the axes are {', '.join(_AXES)}")
                grid["per_experiment"].setdefault(key, {})[axis] = _axis_values(values, axis, f"{where}.{axis}")
        else:
            close = difflib.get_close_matches(key, ["preset", "experiments", *_AXES, *known], n=1)
            raise GridFileError(f"{where}: unknown key" + (f" (did you mean {close[0]}?)" if close else "")
                                + f"; a grid file has preset, experiments, {', '.join(_AXES)} and one table per "
                                  f"experiment ({', '.join(known)})")
    return grid


def _backend_names() -> tuple[str, ...]:
    """The backend names, from ``flatkern.kernels`` (which imports nothing; ``flatkern._checks`` re-exports them)."""
    from .kernels import BACKENDS

    return tuple(BACKENDS)


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose unrecognized options name their closest known option (``--quik``: did you mean ``--quick``?)."""

    def parse_args(self, args=None, namespace=None):
        args, extras = self.parse_known_args(args, namespace)
        if extras:
            known = [s for action in self._actions for s in action.option_strings if s.startswith("--")]
            words = []
            for extra in extras:
                close = difflib.get_close_matches(extra.split("=", 1)[0], known, n=1, cutoff=0.6) if extra.startswith("-") else []
                words.append(f"{extra} (did you mean {close[0]}?)" if close else extra)
            self.error("unrecognized arguments: " + " ".join(words))
        return args


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _folder(text: str) -> Path:
    # Path("") is Path("."): an empty --out (an unset shell variable) would write into the current folder
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must name a folder, got {text!r} (e.g. --out flatkern-results)")
    return Path(text)


def build_reproduce_parser() -> argparse.ArgumentParser:
    """The options of ``flatkern reproduce`` (a parser of its own, so that its errors show its usage)."""
    rep = _Parser(
        prog="flatkern reproduce",
        description="Reproduce the theory end to end on generated data: write results.json, summary.md and PNG figures.",
    )
    size = rep.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="grid", action="store_const", const="quick", help="smoke run, about a minute on 2 cores")
    size.add_argument("--full", dest="grid", action="store_const", const="full",
                      help="the larger grid (more sizes, seeds, matrices, the literature's 100 x 100): 19,000 s of task time "
                           "measured, 2 h 40 min on 2 cores; an estimated 20 minutes with torchrun --nproc_per_node=16")
    rep.set_defaults(grid="default")  # there is no --default: "default" means no preset option was given
    sweep = rep.add_argument_group(
        "the grid", "a preset (--quick, the default, --full) with these fields replaced: the experiments to run and the "
                    "axes (comma-separated positive ints; an experiment ignores an axis it does not have). A grid file "
                    "(TOML or JSON) holds the same keys (preset, experiments, sizes, ranks, depths, ns, seeds) and a "
                    "table per experiment; options given here override it.")
    sweep.add_argument("--experiments", type=_names, default=None, metavar="NAME,..",
                       help="run only these experiments (default: every one of the preset)")
    for axis in _AXES:
        sweep.add_argument(f"--{axis}", type=_axis_type(axis), default=None, metavar="N,..", help=_AXIS_HELP[axis])
    sweep.add_argument("--grid-file", type=Path, default=None, metavar="FILE", help="a grid file, .toml or .json")
    rep.add_argument("--out", type=_folder, default=Path("flatkern-results"), help="output folder (default: ./flatkern-results/)")
    backends = _backend_names()
    rep.add_argument("--backend", default="auto", choices=backends, metavar="{" + ",".join(backends) + "}",
                     help="backend of the trace and the chain products (default: auto, the compiled kernels where "
                          "this installation has them; results.json holds the digits every backend agrees on)")
    rep.add_argument("--workers", type=_positive_int, default=None,
                     help="local worker processes (default: one per CPU; one per rank under torchrun)")
    again = rep.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue an interrupted run from the records it saved in --out (same --out and grid options)")
    again.add_argument("--overwrite", action="store_true",
                       help="replace the finished (or unfinished) run in --out; without it, a run there is never replaced")
    rep.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    rep.add_argument("--quiet", action="store_true", help="do not print the summary")
    rep.set_defaults(error=rep.error)  # `flatkern reproduce: error: ...`, exit status 2
    return rep


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: what ``flatkern --help`` shows; ``main`` hands each command its own parser."""
    parser = _Parser(prog="flatkern", description="Exact trace of the Hessian for deep linear networks.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser(
        "reproduce",
        help="run the experiments: flattest factorization and solution, low-rank recovery, the trace along "
             "training (results.json, summary.md, figures); `flatkern reproduce --help` for its options",
        add_help=False,
    )
    # the benchmark module is imported only when `bench` runs, so `reproduce` never needs it
    commands.add_parser("bench", help="run the benchmarks (see `flatkern bench --help`)", add_help=False)
    return parser


def _grid_command(args) -> str:
    """The command that reruns this grid (what ``--resume`` needs besides ``--out``)."""
    command = "flatkern reproduce" + ("" if args.grid == "default" else f" --{args.grid}")
    if getattr(args, "grid_file", None) is not None:
        command += f" --grid-file {shlex.quote(str(args.grid_file))}"
    if getattr(args, "experiments", None):
        command += f" --experiments {','.join(args.experiments)}"
    for axis in _AXES:
        if getattr(args, axis, None):
            command += f" --{axis} {','.join(map(str, getattr(args, axis)))}"
    return command + ("" if args.backend == "auto" else f" --backend {args.backend}")


def _grid_options(args) -> dict:
    """The grid asked for, from the preset, the grid file and the options (in that order of precedence, lowest
    first): ``{"preset", "experiments", "axes", "per_experiment", "custom"}``; ``args.error`` (exit 2) on a bad file
    or an impossible combination, before torch is imported."""
    grid = {"preset": None, "experiments": None, "axes": {}, "per_experiment": {}}
    if args.grid_file is not None:
        try:
            grid = read_grid_file(args.grid_file)
        except GridFileError as exc:
            args.error(f"argument --grid-file: {exc}")
    preset = args.grid if args.grid != "default" else grid["preset"] or "default"
    experiments = args.experiments or grid["experiments"]
    axes = dict(grid["axes"], **{axis: getattr(args, axis) for axis in _AXES if getattr(args, axis) is not None})
    if axes.get("sizes") and axes.get("ranks") and max(axes["ranks"]) > min(axes["sizes"]):
        args.error(f"argument --ranks: a rank-r d × d matrix needs r <= d; ranks {list(axes['ranks'])} with sizes "
                   f"{list(axes['sizes'])} pair rank {max(axes['ranks'])} with size {min(axes['sizes'])}")
    custom = bool(experiments or axes or grid["per_experiment"])
    return dict(preset=preset, experiments=experiments, axes=axes, per_experiment=grid["per_experiment"], custom=custom)


def _check_options(args) -> None:
    """Every option and the output folder, before any work: ``args.error`` (exit 2) on the first that cannot work.

    Only ``--backend cpp|triton`` imports torch (to ask whether the kernel loads here); the rest is the standard library.
    """
    from .experiments.journal import JournalError, check_out

    try:
        check_out(args.out, resume=args.resume, overwrite=args.overwrite)
    except JournalError as exc:
        args.error(f"argument --out: {exc}")
    except OSError as exc:
        args.error(f"argument --out: cannot write to {args.out}: {exc.strerror or exc}")
    if args.backend not in ("auto", "torch"):
        from .ops import available_backends

        available = available_backends("cpu")  # the experiments run on CPU tensors
        if args.backend not in available:
            args.error(f"argument --backend: {args.backend} is not available for CPU tensors in this installation "
                       f"(available: {', '.join(available)})")


def _reproduce(args, *, program: bool = False) -> int:
    import importlib.util

    missing = [package for package, module in (("cvxpy", "cvxpy"), ("matplotlib", "matplotlib"),
                                               ("scikit-learn", "sklearn")) if importlib.util.find_spec(module) is None]
    if missing:
        # fail before minutes of training, not at the first nuclear_norm task, figure or digits task
        print(f"flatkern reproduce needs {' and '.join(missing)} (the convex baseline, the figures and the digits "
              "data set): pip install 'flatkern[reproduce]'", file=sys.stderr)
        return 2
    wanted = _grid_options(args)
    _check_options(args)

    from . import experiments  # torch, the kernels and the experiments: the options are good
    from .experiments.journal import JournalError, OutLock, remove_journals
    from .experiments.runner import sigterm_interrupts

    grid = experiments.GRIDS[wanted["preset"]]
    if wanted["custom"]:
        try:  # what only the experiments know (a trajectory of several sizes): still before any work
            grid = experiments.custom_grid(grid, experiments_=wanted["experiments"], axes=wanted["axes"],
                                           per_experiment=wanted["per_experiment"], name=f"{grid.name}, custom")
        except ValueError as exc:
            args.error(f"the grid: {exc}")
    command = _grid_command(args)
    rank, world = experiments.distributed_rank()
    lock = OutLock(args.out) if rank == 0 else None  # rank 0 speaks for the run: one run per --out
    try:
        with sigterm_interrupts():  # a scheduler's SIGTERM stops it as cleanly as Ctrl-C
            run = experiments.run_grid(grid, out=args.out, resume=args.resume, command=command, backend=args.backend,
                                       workers=args.workers, progress=args.progress, lock=lock, overwrite=args.overwrite)
            if run.records is None:
                return 0
            summary = experiments.write_results(run.records, args.out, grid=grid.name, seconds=run.seconds,
                                                command=command, processes=run.processes, resumed=run.resumed,
                                                task_seconds=run.task_seconds, experiments=[e for e, _ in grid.parts],
                                                settings={e.name: settings for e, settings in grid.parts},
                                                by_experiment=run.by_experiment)
            remove_journals(args.out)
    except JournalError as exc:
        if rank == 0:
            args.error(str(exc))
        return 2  # rank 0 says why
    except BaseException as exc:
        if rank == 0:
            launcher = f"torchrun --nproc_per_node={world} -m flatkern" if world > 1 else "flatkern"
            resume = command.replace("flatkern", launcher, 1) + f" --out {shlex.quote(str(args.out))} --resume"
            what = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"stopped by an error ({type(exc).__name__})"
            print(f"\nflatkern reproduce: {what}; every finished task is saved in {args.out}/records*.jsonl. "
                  f"Resume with:\n  {resume}", file=sys.stderr)
        if isinstance(exc, KeyboardInterrupt):
            if lock is not None:
                lock.release()
            if program:
                # everything is on disk: skip the interpreter's teardown (torch's alone takes
                # seconds on a loaded machine) so that Ctrl-C ends the command at once
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(130)
            return 130
        raise
    finally:
        if lock is not None:
            lock.release()
    if not args.quiet:
        print(summary)
    print(f"wrote {args.out}/results.json, summary.md and figures ({run.seconds:.0f} s on "
          f"{run.processes} worker process{'es' if run.processes != 1 else ''})", file=sys.stderr)
    return 0


def _bench(argv: list[str]) -> int:
    try:
        # through sys.modules (not the package attribute) so the module can be replaced
        benchmarks = importlib.import_module("flatkern.benchmarks")
    except ImportError as exc:
        if getattr(exc, "name", None) != "flatkern.benchmarks":
            raise
        print("flatkern bench: this installation has no flatkern.benchmarks module; the benchmarks are not available",
              file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="flatkern bench", description="Benchmarks of the flatkern backends.")
    benchmarks.add_arguments(parser)
    return int(benchmarks.run(parser.parse_args(argv)) or 0)


def main(argv: list[str] | None = None) -> int:
    """The command line; ``argv=None`` (the program itself) reads ``sys.argv`` and may end the process at once on Ctrl-C."""
    program = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        build_parser().print_help()  # `flatkern` alone: what it can do
        return 0
    if argv[0] == "bench":
        return _bench(argv[1:])
    if argv[0] == "reproduce":
        return _reproduce(build_reproduce_parser().parse_args(argv[1:]), program=program)
    parser = build_parser()
    if argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    close = difflib.get_close_matches(argv[0], ["reproduce", "bench"], n=1)
    parser.error(f"unknown command {argv[0]!r}" + (f" (did you mean {close[0]}?)" if close else "")
                 + "; the commands are reproduce and bench")


if __name__ == "__main__":
    sys.exit(main())
