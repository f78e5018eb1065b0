"""How fast Ctrl-C stops ``flatkern reproduce``: from SIGINT to the command and every worker process gone.

    python bench/bench_ctrl_c.py [--repeats 5] [--no-torchrun]

Each run is the tests' tiny grid (eight small ``flattest`` tasks) plus the
``hold`` task of ``tests/test_experiments.py``, which returns only when the
script lets it: SIGINT always lands on a run that is still computing.  The
signal is sent once two tasks are in the journal, to the command (one process,
two workers) or, under ``torchrun --nproc_per_node=2``, to its whole process
group, as a terminal's Ctrl-C does.  The latency is the wall time until the
command has exited and every worker it started is gone (multiprocessing's
resource tracker, which does no work, is not waited for).  The tests only
check that a stop happens at all (tests/test_reproduce.py, limits 15 s and 40 s).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
sys.path.insert(0, str(TESTS))
from helpers import child_pids, pid_alive  # noqa: E402  (the tests' /proc helpers: one copy)

GRID = f"""
import os, sys
sys.path.insert(0, {str(TESTS)!r})
from flatkern.experiments import GRIDS
from flatkern.experiments.grid import Grid, grid_of
from flatkern.experiments.flattest import FlattestGrid, FlattestSettings
from test_experiments import HOLD, HoldSettings
tiny = grid_of("tiny", flattest=FlattestGrid(matrices=(((5, 5), 2),), depths=(2, 3), seeds=(0, 1, 2, 3),
                                             budget=FlattestSettings(steps=150, polish_steps=30)))
GRIDS["quick"] = Grid("tiny", tiny.parts + ((HOLD, HoldSettings(os.environ["FLATKERN_TEST_RELEASE"])),))
from flatkern.cli import main
sys.exit(main())
"""


def _is_tracker(pid: int) -> bool:
    try:
        return "resource_tracker" in Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return False


def _saved(out: Path) -> int:
    journals = list(out.glob("records*.jsonl")) if out.exists() else []
    return sum(max(0, p.read_text().count("\n") - 1) for p in journals)


def one_stop(torchrun: bool) -> tuple[float, float]:
    """``(seconds until the command exited, seconds until every worker was gone)`` after one SIGINT."""
    with tempfile.TemporaryDirectory() as tmp:
        out, release = Path(tmp) / "out", Path(tmp) / "release"
        env = dict(os.environ, OMP_NUM_THREADS="1", FLATKERN_TEST_RELEASE=str(release))
        command = [sys.executable, "-c", GRID, "reproduce", "--quick", "--out", str(out), "--no-progress", "--quiet"]
        if torchrun:
            command = ["torchrun", "--standalone", "--nproc_per_node=2", "--no-python", *command]
        else:
            command += ["--workers", "2"]
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while _saved(out) < 2:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the run did not save two tasks: {proc.stderr.read().decode()[-2000:]}")
                time.sleep(0.02)
            family = child_pids(proc.pid)
            family += [k for c in family for k in child_pids(c)]
            family = [p for p in family if not _is_tracker(p)]
            start = time.monotonic()
            if torchrun:
                os.killpg(proc.pid, signal.SIGINT)
            else:
                proc.send_signal(signal.SIGINT)
            proc.wait(timeout=120)
            exited = time.monotonic() - start
            while any(pid_alive(p) for p in family) and time.monotonic() - start < 120:
                time.sleep(0.005)
            return exited, time.monotonic() - start
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-torchrun", dest="torchrun", action="store_false", help="only the single-process run")
    args = parser.parse_args()
    modes = [False] + ([True] if args.torchrun and shutil.which("torchrun") else [])
    print(f"flatkern reproduce, Ctrl-C latency over {args.repeats} stops each (os.cpu_count() = {os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.1f} at the start)")
    print("| run | command exited: median (min-max) | every worker gone: median (min-max) |")
    print("|---|---|---|")
    for torchrun in modes:
        stops = [one_stop(torchrun) for _ in range(args.repeats)]
        exited, gone = [s[0] for s in stops], [s[1] for s in stops]
        name = "torchrun, 2 ranks x 1 worker" if torchrun else "1 process, 2 workers"
        print(f"| {name} | {statistics.median(exited):.2f} s ({min(exited):.2f}-{max(exited):.2f}) "
              f"| {statistics.median(gone):.2f} s ({min(gone):.2f}-{max(gone):.2f}) |")


if __name__ == "__main__":
    main()
