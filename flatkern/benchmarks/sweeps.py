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
    python bench/bench_sweeps.py --only completion   # (no Dense.predict table)

A second table times ``Dense.predict`` (the products with the ``n`` sensing
matrices every step of Gaussian sensing makes) against ``torch.einsum`` over
``Dense.A``, what plain PyTorch writes, at the ``--full`` sizes.

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

import torch

from ..experiments.recovery import RecoverySettings, batches_seeds, run_networks

__all__ = ["CASES", "compare", "main"]

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
    s = RecoverySettings(**{**settings.__dict__, "d": d, "rank": rank})
    warm = RecoverySettings(**{**s.__dict__, "steps": 2, "polish_steps": 1})
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


# (n, d, problems sharing the set): Dense.predict's forward and backward at the --full sizes
DENSE_CASES = ((2000, 100, 3), (5000, 100, 3), (5000, 100, 1), (2000, 30, 3), (1000, 20, 3), (200, 20, 3))


def dense_predict(n: int, d: int, batch: int, rounds: int) -> dict:
    """CPU seconds of ``Dense.predict`` (forward and backward to ``E``) and of ``torch.einsum`` over ``Dense.A``
    (what plain PyTorch writes: ``<A_i, E>`` as an einsum), medians over interleaved rounds of at least 5 calls, and
    their largest difference relative to the largest prediction."""
    from ..measurements import Dense

    g = torch.Generator().manual_seed(0)
    meas = Dense(torch.randn(n, d, d, generator=g, dtype=torch.float64))
    E = torch.randn(batch, d, d, generator=g, dtype=torch.float64, requires_grad=True)
    providers = {"flatkern": lambda: meas.predict(E), "einsum": lambda: torch.einsum("...ab,nab->...n", E, meas.A)}
    times = {k: [] for k in providers}
    reps = max(5, round(2e7 / (n * d * d)))  # calls per round: enough to time a small set
    for _ in range(rounds + 1):  # the first round warms up
        for k, f in providers.items():
            t = time.thread_time()
            for _ in range(reps):
                f().sum().backward()
            times[k].append((time.thread_time() - t) / reps)
    with torch.no_grad():
        ours, theirs = providers["flatkern"](), providers["einsum"]()
    difference = float((ours - theirs).abs().max() / theirs.abs().max())
    return dict(flatkern=statistics.median(times["flatkern"][1:]), einsum=statistics.median(times["einsum"][1:]),
                ratio=statistics.median(a / b for a, b in zip(times["einsum"][1:], times["flatkern"][1:])),
                difference=difference)


def main(argv: list[str] | None = None) -> int:
    """The command line (``argv``: the options, default ``sys.argv[1:]``); prints the table, returns 0."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="300 + 100 steps instead of --full's 2000 + 500")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 3, --quick 2)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of a grid point (default 3, as --full)")
    parser.add_argument("--only", default=None, help="run only the cases whose row contains this text")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    settings = RecoverySettings(steps=300, polish_steps=100) if args.quick else RecoverySettings(steps=2000, polish_steps=500)
    rounds = args.rounds or (2 if args.quick else 3)
    seeds = tuple(range(args.seeds))
    print(f"torch {torch.__version__}, 1 thread, float64; run_networks, {settings.steps} + {settings.polish_steps} steps, "
          f"{len(seeds)} seeds, {rounds} alternating rounds; CPU seconds (time.thread_time)\n")
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
    if args.only:
        return 0
    print("\n`Dense.predict`, forward and backward to E, against `torch.einsum('...ab,nab->...n', E, A)` "
          "(ms, medians over rounds; below 8e5 entries of A, Dense.predict is that einsum):\n")
    print("| n | d | problems | einsum (ms) | flatkern (ms) | einsum / flatkern | largest difference |")
    print("|---|---|---|---|---|---|---|")
    for n, d, batch in DENSE_CASES:
        r = dense_predict(n, d, batch, max(rounds, 3))
        print(f"| {n} | {d} | {batch} | {1e3 * r['einsum']:.3g} | {1e3 * r['flatkern']:.3g} | {r['ratio']:.2f}x | "
              f"{r['difference']:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
