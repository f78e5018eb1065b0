"""The ``flatkern`` command.

    flatkern reproduce [--quick | --full] [--out DIR]     the theory, reproduced end to end
    flatkern bench ...                                    the benchmarks (flatkern.benchmarks)

``torchrun --nproc_per_node=K -m flatkern reproduce`` spreads the grid over
``K`` processes (gloo on CPU, nccl on GPU); rank 0 writes the files.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flatkern", description="Exact trace of the Hessian for deep linear networks.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    rep = commands.add_parser(
        "reproduce",
        help="run the experiments: flattest factorization, low-rank recovery (results.json, summary.md, figures)",
        description="Reproduce the theory end to end on generated data: write results.json, summary.md and PNG figures.",
    )
    size = rep.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="grid", action="store_const", const="quick", help="smoke run, under a minute")
    size.add_argument("--full", dest="grid", action="store_const", const="full",
                      help="the larger grid (more sizes, seeds, matrices; tens of minutes: spread it with torchrun)")
    rep.set_defaults(grid="default")
    rep.add_argument("--out", type=Path, default=Path("flatkern-results"), help="output folder (default: ./flatkern-results/)")
    # plain torch by default: the records then do not depend on which compiled backends
    # this installation has (the problems are small enough to be dispatch-bound anyway)
    rep.add_argument("--backend", default="torch", choices=("auto", "torch", "cpp", "triton"),
                     help="backend of the trace and the chain products (default: torch, for records "
                          "that do not depend on the installation)")
    rep.add_argument("--workers", type=int, default=None,
                     help="local worker processes (default: one per CPU; one per rank under torchrun)")
    rep.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    rep.add_argument("--quiet", action="store_true", help="do not print the summary")

    # the benchmark module is imported only when `bench` runs, so `reproduce` never needs it
    commands.add_parser("bench", help="run the benchmarks (see `flatkern bench --help`)", add_help=False)
    return parser


def _reproduce(args) -> int:
    import importlib.util

    import torch.distributed as dist

    if importlib.util.find_spec("cvxpy") is None:
        # fail before minutes of training, not at the first nuclear_norm task
        print("flatkern reproduce: the nuclear_norm baseline needs cvxpy: pip install cvxpy", file=sys.stderr)
        return 2

    from .experiments import GRIDS, run_grid, write_results

    grid = GRIDS[args.grid]
    try:
        records, seconds = run_grid(grid, backend=args.backend, workers=args.workers, progress=args.progress)
        if records is not None:
            processes = dist.get_world_size() if dist.is_initialized() else 1
            command = "flatkern reproduce" + ("" if args.grid == "default" else f" --{args.grid}")
            summary = write_results(records, args.out, grid=grid.name, seconds=seconds, command=command, processes=processes)
            if not args.quiet:
                print(summary)
            print(f"wrote {args.out}/results.json, summary.md and figures ({seconds:.0f} s)", file=sys.stderr)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _bench(argv: list[str]) -> int:
    try:
        # through sys.modules (not the package attribute) so the module can be replaced
        benchmarks = importlib.import_module("flatkern.benchmarks")
    except ImportError as exc:
        if getattr(exc, "name", None) != "flatkern.benchmarks":
            raise
        print("flatkern bench: this installation has no flatkern.benchmarks module (flatkern/benchmarks.py); "
              "the benchmarks are not available", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="flatkern bench", description="Benchmarks of the flatkern backends.")
    benchmarks.add_arguments(parser)
    return int(benchmarks.run(parser.parse_args(argv)) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    args = build_parser().parse_args(argv)
    return _reproduce(args)


if __name__ == "__main__":
    sys.exit(main())
