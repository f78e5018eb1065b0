"""The ``flatkern`` command.

    flatkern reproduce [--quick | --full] [--out DIR] [--resume]   the theory, reproduced end to end
    flatkern bench ...                                              the benchmarks (flatkern.benchmarks)

``reproduce`` checks every option and the output folder before any work, saves
each finished task in ``DIR/records.jsonl`` as it finishes, and on Ctrl-C stops
within a second or two and prints the command that resumes.
``torchrun --nproc_per_node=K -m flatkern reproduce`` spreads the grid over
``K`` ranks (they meet through torchrun's store); rank 0 writes the files.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]

_BACKENDS = ("auto", "torch", "cpp", "triton")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flatkern", description="Exact trace of the Hessian for deep linear networks.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    rep = commands.add_parser(
        "reproduce",
        help="run the experiments: flattest factorization and solution, low-rank recovery, the trace along "
             "training (results.json, summary.md, figures)",
        description="Reproduce the theory end to end on generated data: write results.json, summary.md and PNG figures.",
    )
    size = rep.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="grid", action="store_const", const="quick", help="smoke run, about a minute on 2 cores")
    size.add_argument("--full", dest="grid", action="store_const", const="full",
                      help="the larger grid (more sizes, seeds, matrices; tens of minutes: spread it with torchrun)")
    rep.set_defaults(grid="default")
    rep.add_argument("--out", type=Path, default=Path("flatkern-results"), help="output folder (default: ./flatkern-results/)")
    # plain torch by default: the records then do not depend on which compiled backends
    # this installation has (the problems are small enough to be dispatch-bound anyway)
    rep.add_argument("--backend", default="torch", choices=_BACKENDS,
                     help="backend of the trace and the chain products (default: torch, for records "
                          "that do not depend on the installation)")
    rep.add_argument("--workers", type=_positive_int, default=None,
                     help="local worker processes (default: one per CPU; one per rank under torchrun)")
    rep.add_argument("--resume", action="store_true",
                     help="continue an interrupted run from the records it saved in --out (same --out and grid options)")
    rep.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    rep.add_argument("--quiet", action="store_true", help="do not print the summary")

    # the benchmark module is imported only when `bench` runs, so `reproduce` never needs it
    commands.add_parser("bench", help="run the benchmarks (see `flatkern bench --help`)", add_help=False)
    rep.set_defaults(error=rep.error)  # `flatkern reproduce: error: ...`, exit status 2
    return parser


def _grid_command(args) -> str:
    """The command that reruns this grid (what ``--resume`` needs besides ``--out``)."""
    command = "flatkern reproduce" + ("" if args.grid == "default" else f" --{args.grid}")
    return command + ("" if args.backend == "torch" else f" --backend {args.backend}")


def _check_options(args) -> None:
    """Every option and the output folder, before any work: ``args.error`` (exit 2) on the first that cannot work."""
    if args.backend not in ("auto", "torch"):
        from .ops import available_backends

        available = available_backends("cpu")  # the experiments run on CPU tensors
        if args.backend not in available:
            args.error(f"argument --backend: {args.backend} is not available for CPU tensors in this installation "
                       f"(available: {', '.join(available)})")
    from .experiments import check_out

    try:
        check_out(args.out)
    except OSError as exc:
        args.error(f"argument --out: cannot write to {args.out}: {exc.strerror or exc}")


def _reproduce(args, *, program: bool = False) -> int:
    import importlib.util

    missing = [name for name in ("cvxpy", "matplotlib") if importlib.util.find_spec(name) is None]
    if missing:
        # fail before minutes of training, not at the first nuclear_norm task or figure
        print(f"flatkern reproduce needs {' and '.join(missing)} (the convex baseline and the figures): "
              "pip install 'flatkern[reproduce]'", file=sys.stderr)
        return 2
    _check_options(args)

    from .experiments import GRIDS, JournalError, distributed_rank, run_grid, write_results
    from .experiments.journal import remove_journals
    from .experiments.runner import sigterm_interrupts

    grid = GRIDS[args.grid]
    command = _grid_command(args)
    rank, world = distributed_rank()
    try:
        with sigterm_interrupts():  # a scheduler's SIGTERM stops it as cleanly as Ctrl-C
            run = run_grid(grid, out=args.out, resume=args.resume, command=command, backend=args.backend,
                           workers=args.workers, progress=args.progress)
            if run.records is None:
                return 0
            summary = write_results(run.records, args.out, grid=grid.name, seconds=run.seconds, command=command,
                                    processes=run.processes, resumed=run.resumed, task_seconds=run.task_seconds)
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
            if program:
                # everything is on disk: skip the interpreter's teardown (torch's alone takes
                # seconds on a loaded machine) so that Ctrl-C ends the command at once
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(130)
            return 130
        raise
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
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    args = build_parser().parse_args(argv)
    return _reproduce(args, program=program)


if __name__ == "__main__":
    sys.exit(main())
