"""A sweep's seeds as one batch of problems against one run per seed (issue 21 §4): ``run_networks``.

``flatkern reproduce`` trains the four network methods of a recovery problem
(``flatkern.experiments.recovery.run_networks``) for every seed of a grid point in
one task: the seeds' problems (each with its own measurements, step sizes and
random numbers) stacked into one batch.  This times that task against the same
seeds run one after another, on one thread (``time.thread_time``: CPU time of
this thread, which other processes on a loaded machine disturb least), in
alternating rounds, and checks that the records agree:

    python bench/bench_sweeps.py            # the --full settings (2000 + 500 steps), 3 seeds
    python bench/bench_sweeps.py --quick    # 300 + 100 steps
    python bench/bench_sweeps.py --only completion   # the seeds table's completion rows only
    python bench/bench_sweeps.py --tables dense,convex

A second table times ``Dense.predict`` (the products with the ``n`` sensing
matrices every step of Gaussian sensing makes) against ``torch.einsum`` over
``Dense.A``, what plain PyTorch writes, from the ``--full`` sizes down to where
its einsum takes over; a third the convex baseline by ADMM against cvxpy where
both fit, and ADMM alone at 100 × 100.

Columns: CPU seconds of the seeds one by one and batched (median over rounds),
their ratio (median of the per-round ratios), and the largest difference of a
record's number between the two, relative to the number or to 1e-8 if it is
smaller (the loss and the recovery error of an exact fit are rounding
themselves: 1e-30 against 2e-30 is no disagreement).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace

import torch

from ..experiments.recovery import RecoverySettings, batches_seeds, run_networks

__all__ = ["CASES", "DENSE_CASES", "CONVEX_CASES", "compare", "dense_predict", "convex", "main"]

# (experiment, d, rank, n, depth): the --full grid's problems whose seeds run batched
CASES = (("sensing", 20, 2, 200, 2), ("sensing", 20, 2, 200, 4), ("completion", 20, 2, 200, 2),
         ("completion", 20, 2, 200, 4), ("completion", 100, 5, 2000, 2), ("completion", 100, 5, 5000, 4))


def _largest_difference(separate: list[dict], batched: list[dict]) -> float:
    """The largest ``|a − b| / max(|a|, 1e-8)`` over the records' numbers: a number below 1e-8 (the loss or the
    recovery error of an exact fit) is the rounding of its computation, and its difference counts against 1e-8."""
    worst = 0.0
    for a, b in zip(separate, batched, strict=True):
        for k, x in a.items():
            if isinstance(x, float):
                worst = max(worst, abs(x - b[k]) / max(abs(x), 1e-8))
    return worst


def compare(case: tuple, seeds: tuple, settings: RecoverySettings, rounds: int) -> dict:
    """``{"separate", "batched"}`` CPU seconds (medians), ``ratio`` (median of per-round ratios) and ``difference``."""
    experiment, d, rank, n, depth = case
    s = replace(settings, d=d, rank=rank)
    warm = replace(s, steps=2, polish_steps=1)
    run_networks(experiment, depth, n, seeds[0], warm), run_networks(experiment, depth, n, seeds, warm)  # first-call costs
    times = {"separate": [], "batched": []}
    for _ in range(rounds):
        t = time.thread_time()
        separate = [r for seed in seeds for r in run_networks(experiment, depth, n, seed, s)]
        times["separate"].append(time.thread_time() - t)
        t = time.thread_time()
        batched = run_networks(experiment, depth, n, seeds, s)
        times["batched"].append(time.thread_time() - t)
    return dict(separate=statistics.median(times["separate"]), batched=statistics.median(times["batched"]),
                ratio=statistics.median(a / b for a, b in zip(times["separate"], times["batched"])),
                difference=_largest_difference(separate, batched))


# (n, d, problems, per-problem sets): Dense.predict's forward and backward, from the --full sizes down to where its
# einsum (below _DENSE_EINSUM_MAX entries of A) takes over from its per-row products
DENSE_CASES = ((2000, 100, 3, False), (5000, 100, 3, False), (5000, 100, 1, False), (2000, 30, 3, False),
               (500, 40, 3, False), (1000, 20, 3, False), (200, 20, 3, False), (200, 20, 9, True), (2000, 30, 3, True))


def dense_predict(n: int, d: int, problems: int, per_problem: bool, rounds: int) -> dict:
    """CPU seconds of ``torch.einsum`` over ``Dense.A`` (what plain PyTorch writes for ``<A_i, E>``), of
    ``Dense.predict``'s per-row products (forced), and of ``Dense.predict`` as it chooses, each forward and backward
    to ``E`` for ``problems`` matrices ``E`` (each with its own ``n`` matrices if ``per_problem``); medians over
    interleaved rounds of at least 5 calls, and the largest difference relative to the largest prediction."""
    from .. import measurements
    from ..measurements import Dense

    g = torch.Generator().manual_seed(0)
    meas = Dense(torch.randn(*((problems,) if per_problem else ()), n, d, d, generator=g, dtype=torch.float64))
    E = torch.randn(problems, d, d, generator=g, dtype=torch.float64, requires_grad=True)
    spec = "...ab,...nab->...n" if per_problem else "...ab,nab->...n"

    def per_row():
        threshold, measurements._DENSE_EINSUM_MAX = measurements._DENSE_EINSUM_MAX, 0
        try:
            return meas.predict(E)
        finally:
            measurements._DENSE_EINSUM_MAX = threshold

    providers = {"einsum": lambda: torch.einsum(spec, E, meas.A), "per-row": per_row, "flatkern": lambda: meas.predict(E)}
    times = {k: [] for k in providers}
    reps = min(1000, max(5, round(2e7 / (n * d * d * (problems if per_problem else 1)))))  # enough to time a small set
    for _ in range(rounds + 1):  # the first round warms up
        for k, f in providers.items():
            t = time.thread_time()
            for _ in range(reps):
                f().sum().backward()
            times[k].append((time.thread_time() - t) / reps)
    with torch.no_grad():
        theirs = providers["einsum"]()
        difference = max(float((providers[k]() - theirs).abs().max() / theirs.abs().max()) for k in ("per-row", "flatkern"))
    out = {k: statistics.median(v[1:]) for k, v in times.items()}
    for k in ("per-row", "flatkern"):
        out[f"{k} ratio"] = statistics.median(a / b for a, b in zip(times["einsum"][1:], times[k][1:]))
    return dict(out, difference=difference, entries=meas.A.numel())


# (experiment, d, rank, n): the convex program by ADMM against cvxpy where both fit, and ADMM alone at 100 × 100
CONVEX_CASES = (("sensing", 20, 2, 120), ("sensing", 20, 2, 200), ("completion", 20, 2, 120), ("completion", 20, 2, 200),
                ("sensing", 40, 2, 480), ("completion", 40, 2, 480),
                ("completion", 100, 5, 2000), ("completion", 100, 5, 5000), ("sensing", 100, 5, 2000),
                ("sensing", 100, 5, 5000))


def convex(experiment: str, d: int, rank: int, n: int) -> dict:
    """CPU seconds of ``nuclear_norm_first_order`` (ADMM) and, where its SDP fits (``CVXPY_MAX_SIZE``), of cvxpy
    on one problem (``make_problem``, seed 0), ADMM's iterations and certified gap, and the relative difference of
    the two nuclear norms."""
    from ..experiments.baselines import CVXPY_MAX_SIZE, nuclear_norm_first_order
    from ..experiments.recovery import make_problem

    M, meas, b = make_problem(experiment, n, 0, RecoverySettings(d=d, rank=rank))
    t = time.thread_time()
    X, report = nuclear_norm_first_order(meas, b, (d, d))
    out = dict(admm=time.thread_time() - t, iterations=report["iterations"], gap=report["gap"], cvxpy=None,
               difference=None)
    if d <= CVXPY_MAX_SIZE:
        import cvxpy  # noqa: F401  (imported before the clock starts)

        from ..experiments.baselines import nuclear_norm_solution

        t = time.process_time()  # cvxpy's solver may use threads of its own: all of this process's CPU time
        Y = nuclear_norm_solution(meas, b, (d, d))
        out["cvxpy"] = time.process_time() - t
        nuc = lambda Z: float(torch.linalg.matrix_norm(Z, ord="nuc"))  # noqa: E731
        out["difference"] = abs(nuc(X) - nuc(Y)) / nuc(Y)
    return out


def main(argv: list[str] | None = None) -> int:
    """The command line (``argv``: the options, default ``sys.argv[1:]``); prints the table, returns 0."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="300 + 100 steps instead of --full's 2000 + 500")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 3, --quick 2)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of a grid point (default 3, as --full)")
    parser.add_argument("--only", default=None, help="run only the cases whose row contains this text")
    parser.add_argument("--tables", default="seeds,dense,convex",
                        help="which tables, comma-separated (default: seeds,dense,convex)")
    args = parser.parse_args(argv)
    tables = set(args.tables.split(","))
    if not tables or tables - {"seeds", "dense", "convex"}:
        parser.error(f"--tables: choose among seeds, dense, convex; got {args.tables!r}")
    torch.set_num_threads(1)
    settings = RecoverySettings(steps=300, polish_steps=100) if args.quick else RecoverySettings(steps=2000, polish_steps=500)
    rounds = args.rounds or (2 if args.quick else 3)
    seeds = tuple(range(args.seeds))
    print(f"torch {torch.__version__}, 1 thread, float64; run_networks, {settings.steps} + {settings.polish_steps} steps, "
          f"{len(seeds)} seeds, {rounds} alternating rounds; CPU seconds (time.thread_time)\n")
    if "seeds" in tables:
        _seeds_table(args, settings, seeds, rounds)
    if "dense" in tables and not args.only:
        _dense_table(rounds)
    if "convex" in tables and not args.only:
        _convex_table()
    return 0


def _seeds_table(args, settings: RecoverySettings, seeds: tuple, rounds: int) -> None:
    print("| problem | depth | seeds one by one (s) | batched (s) | one by one / batched | largest relative difference |")
    print("|---|---|---|---|---|---|")
    for case in CASES:
        experiment, d, rank, n, depth = case
        row = f"{experiment} {d}×{d} rank {rank}, n = {n}"
        if args.only and args.only not in f"{row} depth {depth}":
            continue
        if not batches_seeds(experiment, d, n):
            print(f"| {row} | {depth} | — | — | not batched (a large Dense set) | — |")
            continue
        r = compare(case, seeds, settings, rounds)
        print(f"| {row} | {depth} | {r['separate']:.2f} | {r['batched']:.2f} | {r['ratio']:.2f}x | {r['difference']:.1e} |",
              flush=True)


def _dense_table(rounds: int) -> None:
    print("\n`Dense.predict`, forward and backward to E, against `torch.einsum` over `A` (plain PyTorch); `per-row`: "
          "its products forced, `flatkern`: as it chooses (the einsum below 1e6 entries of A); CPU ms, medians over "
          "rounds:\n")
    print("| n | d | problems | own sets | entries of A | einsum (ms) | per-row (ms) | einsum / per-row | flatkern (ms) "
          "| einsum / flatkern | largest difference |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n, d, problems, per_problem in DENSE_CASES:
        r = dense_predict(n, d, problems, per_problem, max(rounds, 3))
        print(f"| {n} | {d} | {problems} | {'yes' if per_problem else 'no'} | {r['entries']:.1e} | {1e3 * r['einsum']:.3g} "
              f"| {1e3 * r['per-row']:.3g} | {r['per-row ratio']:.2f}x | {1e3 * r['flatkern']:.3g} "
              f"| {r['flatkern ratio']:.2f}x | {r['difference']:.1e} |", flush=True)


def _convex_table() -> None:
    print("\nThe convex program `min ‖X‖_* s.t. A(X) = b` (seed 0): ADMM with a certified duality gap "
          "(`nuclear_norm_first_order`) against cvxpy + Clarabel where its SDP fits (CPU seconds; cvxpy's over its "
          "process):\n")
    print("| problem | n | ADMM (s) | iterations | certified gap | cvxpy (s) | cvxpy / ADMM | nuclear norms differ by |")
    print("|---|---|---|---|---|---|---|---|")
    for experiment, d, rank, n in CONVEX_CASES:
        r = convex(experiment, d, rank, n)
        theirs = "— (its SDP does not fit)" if r["cvxpy"] is None else f"{r['cvxpy']:.2f}"
        ratio = "—" if r["cvxpy"] is None else f"{r['cvxpy'] / r['admm']:.2f}x"
        diff = "—" if r["difference"] is None else f"{r['difference']:.1e}"
        print(f"| {experiment} {d}×{d} rank {rank} | {n} | {r['admm']:.2f} | {r['iterations']} | {r['gap']:.1e} | {theirs} "
              f"| {ratio} | {diff} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
