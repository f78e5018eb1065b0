"""Running a grid: worker processes, torchrun ranks, a journal of finished tasks, and a clean stop.

Every process (every torchrun rank) runs its tasks in spawned worker processes
and only coordinates: it hands out tasks, appends each finished task to its
journal the moment it arrives (``journal.py``), and on SIGINT or SIGTERM
terminates its workers and returns within a fraction of a second
(``KeyboardInterrupt``), every finished task already on disk.

Under ``torchrun`` the ranks meet through the launcher's TCP store
(``torch.distributed.rendezvous("env://")``; no process group, so no collective
can block a stop): rank 0 checks the journals and publishes which tasks
remain, every rank claims the next task from a shared counter (a fast rank
takes more), and at the end each rank hands its records to rank 0 through the
store; rank 0 writes the results.

A worker exits when its coordinator dies (``kill -9`` included): the kernel
kills it (``PR_SET_PDEATHSIG`` on Linux), and a watcher thread that sees its
parent change ends it anywhere else.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path

import torch

from .grid import Grid, run_task, task_cost, tasks_of
from .journal import Journal, JournalError, OutLock, prepare

__all__ = ["Run", "run_grid", "distributed_rank", "sigterm_interrupts"]


@dataclass
class Run:
    """What ``run_grid`` returns (``records`` is ``None`` on ranks other than 0)."""

    records: list[dict] | None
    seconds: float       # wall time of this invocation
    processes: int       # worker processes that ran at least one task, over every rank
    tasks: int           # tasks in the grid
    resumed: int         # tasks whose records came from an earlier run's journal
    task_seconds: float  # compute time of the tasks run here (sum over workers)
    # where the time went: {experiment: (tasks, their seconds, the cost model's estimate)}, every task of the grid
    # (a resumed task with the seconds its journal line holds)
    by_experiment: dict = field(default_factory=dict)


def distributed_rank() -> tuple[int, int]:
    """``(rank, world_size)`` from torchrun's environment (``(0, 1)`` outside it)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


# ---------------------------------------------------------------- worker processes


def _exit_with_parent(parent: int) -> None:
    """End this process when ``parent`` (the coordinator) dies, so no orphan keeps computing."""
    try:
        import ctypes

        # PR_SET_PDEATHSIG = 1: the kernel sends SIGKILL when the parent dies (Linux)
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the watcher below does it

    def watch():
        # also covers a parent that died before prctl took effect (we were re-parented already)
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="flatkern-parent-watch", daemon=True).start()


def _worker_main(conn, grid: Grid, backend: str, parent: int) -> None:
    # the coordinator stops workers (SIGTERM); a Ctrl-C that reaches the whole process group is its to handle
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent(parent)
    # one thread per task: the problems are far too small to gain from more, and a fixed
    # thread count keeps every floating-point reduction, hence every record, identical
    torch.set_num_threads(1)
    while (item := conn.recv()) is not None:
        index, task = item
        start = time.perf_counter()
        try:
            records = run_task(task, grid, backend)
        except BaseException:
            conn.send(("error", index, traceback.format_exc()))
            return
        conn.send(("done", index, records, time.perf_counter() - start))


@contextmanager
def _signals_blocked(*signals):
    """Hold back ``signals`` for the block; one that came meanwhile is raised when it ends."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, set(signals))
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextmanager
def sigterm_interrupts():
    """SIGTERM (torchrun's or a scheduler's stop) raises ``KeyboardInterrupt``, like Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


class _Pool:
    """``n`` spawned worker processes, each fed one task at a time through its own pipe."""

    def __init__(self, n: int, grid: Grid, backend: str):
        # spawn, not fork: a forked child of a process that already ran OpenMP code can hang
        ctx = multiprocessing.get_context("spawn")
        self.workers = []
        # workers inherit the mask: a Ctrl-C never hits a half-started worker
        with _signals_blocked(signal.SIGINT):
            try:
                for _ in range(n):
                    parent, child = ctx.Pipe()
                    proc = ctx.Process(target=_worker_main, args=(child, grid, backend, os.getpid()), daemon=True)
                    proc.start()
                    child.close()
                    self.workers.append((proc, parent))
            except BaseException:
                self.close(terminate=True)
                raise
        self.busy: dict = {}     # pipe -> (process, task index)
        self.idle = list(self.workers)
        self.used: set[int] = set()

    def submit(self, index: int, task) -> None:
        proc, conn = self.idle.pop()
        conn.send((index, task))
        self.busy[conn] = (proc, index)
        self.used.add(proc.pid)

    def results(self, timeout: float | None):
        """Yield ``(index, records, seconds)`` for every task finished within ``timeout``."""
        sentinels = {proc.sentinel: conn for conn, (proc, _) in self.busy.items()}
        for ready in wait(list(self.busy) + list(sentinels), timeout):
            conn = sentinels.get(ready, ready)
            if conn not in self.busy:
                continue  # its result was read already
            proc, index = self.busy.pop(conn)
            try:
                message = conn.recv()
            except EOFError:
                proc.join(1.0)
                raise RuntimeError(f"worker process {proc.pid} died (exit code {proc.exitcode}) "
                                   f"while running task {index}") from None
            if message[0] == "error":
                raise RuntimeError(f"task {index} failed in worker process {proc.pid}:\n{message[2]}")
            self.idle.append((proc, conn))
            yield message[1:]

    def close(self, *, terminate: bool) -> None:
        for proc, conn in self.workers:
            if terminate:
                proc.terminate()  # SIGTERM: a worker holds no state worth saving
            else:
                try:
                    conn.send(None)
                except OSError:
                    pass
        for proc, conn in self.workers:
            proc.join(1.0)
            if proc.is_alive():
                proc.kill()
                proc.join()
            conn.close()


# ---------------------------------------------------------------- the run


class _Local:
    """Task claims and progress (tasks, and their cost in ms) for one process."""

    def __init__(self):
        self.next = self.total = self.cost = 0

    def claim(self) -> int:
        self.next += 1
        return self.next - 1

    def finished(self, count: int, cost_ms: int) -> tuple[int, int]:
        self.total += count
        self.cost += cost_ms
        return self.total, self.cost


class _Ranks:
    """Task claims and progress shared by torchrun's ranks through the store."""

    def __init__(self, store):
        self.store = store

    def claim(self) -> int:
        return int(self.store.add("next", 1)) - 1

    def finished(self, count: int, cost_ms: int) -> tuple[int, int]:
        return int(self.store.add("finished", count)), int(self.store.add("finished_cost", cost_ms))


class _Progress:
    """A progress bar that advances by the tasks' estimated cost (``Experiment.cost``), not their count.

    The longest tasks go first, so a bar by count would barely move at first and
    then race; by cost its estimate of the time left is honest from the first task on.
    """

    def __init__(self, total_ms: int, tasks: int, desc: str, disable: bool):
        from tqdm import tqdm

        self.tasks, self.desc = tasks, desc
        # the time left is tqdm's: (work left) / (work done per second so far), the work in estimated seconds
        self.bar = tqdm(total=total_ms / 1000, desc=f"{desc} 0/{tasks} tasks", disable=disable, smoothing=0,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}, by estimated cost]")
        self.done_ms = 0

    def show(self, count: int, cost_ms: int) -> None:
        if cost_ms != self.done_ms:
            self.bar.set_description_str(f"{self.desc} {count}/{self.tasks} tasks", refresh=False)
            self.bar.update((cost_ms - self.done_ms) / 1000)
            self.done_ms = cost_ms

    def close(self) -> None:
        self.bar.close()


def _wait_key(store, key: str) -> bytes:
    # a polling loop rather than store.get: a blocked C++ call would not see Ctrl-C
    while not store.check([key]):
        time.sleep(0.05)
    return store.get(key)


def run_grid(
    grid: Grid,
    *,
    out: Path | None = None,
    resume: bool = False,
    command: str = "flatkern reproduce",
    backend: str = "auto",
    workers: int | None = None,
    progress: bool = True,
    lock: OutLock | None = None,
    overwrite: bool = False,
) -> Run:
    """Run ``grid`` on ``workers`` local worker processes, or spread over torchrun's ranks.

    With ``out``, each finished task is appended to a journal there as it
    finishes, and ``resume=True`` keeps the tasks an earlier run of the same
    grid finished (``journal.prepare``: ``JournalError`` before any work if the
    journals do not allow it).  ``workers``: local worker processes (default:
    one per CPU, or one per rank under torchrun).  Returns a ``Run`` with the
    records in task order on rank 0.  SIGINT or SIGTERM stop it within a
    fraction of a second with ``KeyboardInterrupt``, the workers terminated.
    ``lock``: acquired on rank 0 before the journals are read (``JournalError``
    if another run holds it), released by the caller once the results are written.
    ``overwrite``: a fresh run may discard an unfinished run's journals.
    """
    start = time.perf_counter()
    rank, world = distributed_rank()
    if workers is None:
        workers = 1 if world > 1 else (os.cpu_count() or 1)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    tasks = tasks_of(grid)
    store = None
    if world > 1:
        import torch.distributed as dist

        base, rank, world = next(dist.rendezvous("env://"))
        store = dist.PrefixStore("flatkern-reproduce/", base)
    kept: dict[int, dict] = {}
    if rank == 0:
        try:
            if lock is not None:
                lock.acquire()
            kept = (prepare(out, grid, tasks, backend, resume=resume, command=command, overwrite=overwrite)
                    if out is not None else {})
        except JournalError as exc:
            if store is not None:
                store.set("plan", json.dumps({"error": str(exc)}))
            raise
        if store is not None:
            store.set("plan", json.dumps({"done": sorted(kept)}))
    else:
        plan = json.loads(_wait_key(store, "plan"))
        if "error" in plan:
            raise JournalError(plan["error"])
        kept = dict.fromkeys(plan["done"])
    cost_ms = [max(1, round(1000 * task_cost(task, grid))) for task in tasks]
    seconds_of = {i: entry.get("seconds") for i, entry in kept.items() if isinstance(entry, dict)}
    remaining = sorted((i for i in range(len(tasks)) if i not in kept), key=lambda i: -cost_ms[i])
    shared = _Ranks(store) if store is not None else _Local()
    journal = Journal(out, rank, grid, tasks, backend, command) if out is not None else None
    done: dict[int, list[dict]] = {}
    pool = None
    bar = _Progress(sum(cost_ms[i] for i in remaining), len(remaining),
                    f"flatkern reproduce ({grid.name}" + (f", {world} ranks)" if world > 1 else ")"),
                    disable=not progress or rank != 0)
    try:
        with sigterm_interrupts():
            n_workers = min(workers, len(remaining))
            pool = _Pool(n_workers, grid, backend) if n_workers else None
            exhausted = pool is None
            while True:
                while not exhausted and pool.idle:
                    claim = shared.claim()
                    if claim >= len(remaining):
                        exhausted = True
                        break
                    pool.submit(remaining[claim], tasks[remaining[claim]])
                if pool is None or not pool.busy:
                    break
                count = cost = 0
                for index, records, seconds in pool.results(timeout=0.25):
                    # a stop between receiving a task and saving it would lose it
                    with _signals_blocked(signal.SIGINT, signal.SIGTERM):
                        if journal is not None:
                            journal.append(index, tasks[index], records, seconds)
                        done[index] = records
                    seconds_of[index] = seconds
                    count += 1
                    cost += cost_ms[index]
                if rank == 0 or count:
                    bar.show(*shared.finished(count, cost))
            if pool is not None:
                pool.close(terminate=False)
            processes = len(pool.used) if pool is not None else 0
            if store is not None:
                payload = {"done": {str(i): r for i, r in done.items()}, "processes": processes,
                           "seconds": {str(i): seconds_of[i] for i in done}}
                if rank != 0:
                    store.set(f"records/{rank}", json.dumps(payload))
                    return Run(None, time.perf_counter() - start, processes, len(tasks), len(kept),
                               sum(seconds_of[i] for i in done))
                for other in range(1, world):
                    key = f"records/{other}"
                    while not store.check([key]):  # polled, so that Ctrl-C is seen
                        time.sleep(0.05)
                        bar.show(*shared.finished(0, 0))
                    part = json.loads(store.get(key))
                    done.update({int(i): r for i, r in part["done"].items()})
                    processes += part["processes"]
                    seconds_of.update({int(i): x for i, x in part["seconds"].items()})
    except BaseException:
        if pool is not None:
            pool.close(terminate=True)
        raise
    finally:
        bar.close()
        if journal is not None:
            journal.close()
    task_seconds = sum(seconds_of[i] for i in done)  # the tasks run here, on every rank: not the resumed ones
    for index, entry in kept.items():
        done.setdefault(index, entry["records"])
    missing = [i for i in range(len(tasks)) if i not in done]
    if missing:
        raise RuntimeError(f"tasks {missing[:10]} have no records (lost by a rank?)")
    records = [r for i in range(len(tasks)) for r in done[i]]
    by_experiment: dict = {}
    for i, task in enumerate(tasks):
        count, seconds, estimate = by_experiment.get(task.experiment, (0, 0.0, 0.0))
        by_experiment[task.experiment] = (count + 1, seconds + float(seconds_of.get(i) or 0.0), estimate + cost_ms[i] / 1000)
    return Run(records, time.perf_counter() - start, processes, len(tasks), len(kept), task_seconds, by_experiment)
