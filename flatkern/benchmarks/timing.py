"""The one timing harness of flatkern's benchmarks.

``flatkern bench`` (``report.py``) and the benchmarks ``cpu_kernels.py``,
``training.py`` and ``gpu_check.py`` of this package all time through this
module, so a measurement bug has one place to be fixed.

The method: the machine is shared and noisy, so the functions under test
run **interleaved round-robin** (round 1 runs a block of each, round 2 again,
...), each round times a **block of calls** (sized once so that a block takes
at least ``min_block_s``), and the number kept is the **median over rounds**
of the seconds per call.  A ratio of two functions is best read as the median
over rounds of the ratio within a round (``ratio``): functions of one round ran
seconds apart and saw about the same load.

API::

    sync(device)                      wait for the device's queued work (CUDA; nothing on CPU)
    time_once(fn, device="cpu")       seconds of one call, synchronized
    interleave(fns, *, rounds=None, min_time=None, max_rounds=50, min_block_s=0.0,
               number=None, warmup=1, device="cpu") -> {name: Timing}
        fns: {name: zero-argument callable}.  Each gets ``warmup`` untimed calls, then one
        timed call (``Timing.once``) that sizes its block: ``number`` calls if given, else
        ``max(1, min_block_s // once)``.  ``rounds`` rounds if given, else as many as give the
        slowest block ``min_time`` seconds in all (at least 3, at most ``max_rounds``).
    Timing: .wall, .cpu (per-round seconds per call; CPU time counts every thread of the
        process), .median (wall), .cpu_median, .number (calls per block), .once, .calls
    ratio(a, b)                       median over rounds of a.wall[i] / b.wall[i]
    peak_memory(fn, device="cpu") -> (fn(), seconds, bytes or None)
        the peak memory ``fn()`` adds: on CUDA ``torch.cuda.max_memory_allocated`` above the
        memory allocated before the call; on Linux CPUs the rise of the process's peak
        resident set size (``VmHWM``, reset through ``/proc/self/clear_refs``) over its
        resident size before the call, with glibc told to return blocks over 64 KiB to the
        system at once (``mallopt``, ``malloc_trim``) so that memory freed earlier can
        neither hide nor inflate it; ``None`` elsewhere.
    fmt_time(seconds), fmt_bytes(nbytes)   "12 µs", "3.4 ms", "1.2 s"; "12 KiB", "3.4 MiB"

Device-aware: with ``device`` a CUDA device, every timed region starts and ends
with ``torch.cuda.synchronize``, so that a block's time is the time its
kernels ran, not the time Python took to queue them.

    >>> from flatkern.benchmarks.timing import interleave, ratio
    >>> t = interleave({"a": lambda: sum(range(100)), "b": lambda: sum(range(10_000))},
    ...                rounds=5, min_block_s=0.01)
    >>> len(t["a"].wall), t["a"].number > t["b"].number
    (5, True)
    >>> print(f"b takes {ratio(t['b'], t['a']):.0f}x as long as a")   # doctest: +SKIP
    b takes 80x as long as a
"""

from __future__ import annotations

import ctypes
import math
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

__all__ = ["Timing", "sync", "time_once", "interleave", "ratio", "peak_memory", "fmt_time", "fmt_bytes"]


def sync(device: str | torch.device | None = "cpu") -> None:
    """Wait until ``device`` has run everything queued on it (CUDA only; CPU work is synchronous)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: str | torch.device | None = "cpu") -> float:
    """Seconds of one call of ``fn``, synchronized on ``device``."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


@dataclass
class Timing:
    """What ``interleave`` measured for one function: seconds per call, one value per round."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # process CPU time, every thread
    number: int = 1  # calls per block
    once: float = 0.0  # the sizing call (after the warm-up)

    @property
    def median(self) -> float:
        """Median over rounds of the wall seconds per call: the number to report."""
        return statistics.median(self.wall)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)

    @property
    def calls(self) -> int:
        """Timed calls in all (the sizing call not counted)."""
        return self.number * len(self.wall)


def interleave(
    fns: Mapping[str, Callable[[], object]],
    *,
    rounds: int | None = None,
    min_time: float | None = None,
    max_rounds: int = 50,
    min_block_s: float = 0.0,
    number: int | None = None,
    warmup: int = 1,
    device: str | torch.device | None = "cpu",
) -> dict[str, Timing]:
    """Time every function of ``fns`` in interleaved rounds (see the module docstring).

    Args:
        fns: name -> zero-argument callable (bind the inputs with a lambda or ``functools.partial``).
        rounds: number of rounds; if ``None``, chosen from ``min_time``.
        min_time: seconds the slowest block should get over all rounds (used when ``rounds`` is ``None``;
            ``None`` then means 3 rounds).
        max_rounds: cap on the rounds chosen from ``min_time``.
        min_block_s: each block holds enough calls to take at least this long (one call if 0).
        number: calls per block, overriding ``min_block_s``.
        warmup: untimed calls of each function first (compilation, caches, lazy imports).
        device: synchronized around every timed region when it is a CUDA device.

    Returns:
        name -> ``Timing``, in the order of ``fns``.
    """
    out = {name: Timing() for name in fns}
    for name, fn in fns.items():  # warm up (compiles, caches) and size the blocks
        for _ in range(warmup):
            fn()
        once = out[name].once = max(time_once(fn, device), 1e-9)
        out[name].number = number if number is not None else max(1, int(min_block_s / once))
    if rounds is None:
        slowest = max((t.number * t.once for t in out.values()), default=0.0)
        wanted = math.ceil(min_time / slowest) if min_time and slowest > 0 else 3
        rounds = min(max_rounds, max(3, wanted))
    for _ in range(rounds):
        for name, fn in fns.items():
            t = out[name]
            sync(device)
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(t.number):
                fn()
            sync(device)
            t.wall.append((time.perf_counter() - w0) / t.number)
            t.cpu.append((time.process_time() - c0) / t.number)
    return out


def ratio(a: Timing, b: Timing) -> float:
    """Median over rounds of ``a``'s time over ``b``'s in the same round.

    Functions of one round ran seconds apart: the per-round ratio cancels most
    of the machine's changing load.
    """
    return statistics.median(x / y for x, y in zip(a.wall, b.wall))


# ------------------------------------------------------------------ peak memory

_libc = None


def _release_freed_memory() -> bool:
    """Ask glibc to hand blocks over 64 KiB straight back to the system, so RSS tracks live memory."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
            _libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD (fixed: no dynamic growth)
            _libc.mallopt(-1, 1 << 16)  # M_TRIM_THRESHOLD
        except OSError:
            _libc = False
    return bool(_libc)


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def peak_memory(fn: Callable[[], object], device: str | torch.device = "cpu") -> tuple[object, float, float | None]:
    """``(fn(), seconds, bytes of peak memory fn() adds)``; the bytes are ``None`` where they cannot be measured."""
    device = torch.device(device)
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        seconds = time.perf_counter() - start
        return out, seconds, float(torch.cuda.max_memory_allocated(device) - base)
    base = None
    if sys.platform.startswith("linux") and _release_freed_memory():
        try:
            _libc.malloc_trim(0)  # hand back what earlier calls freed, so it cannot be reused unseen
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            base = _proc_status_kib("VmRSS")
        except OSError:
            base = None
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    peak = None if base is None else float(_proc_status_kib("VmHWM") - base) * 1024
    return out, seconds, peak


# ------------------------------------------------------------------ formatting


def fmt_time(s: float | None) -> str:
    if s is None:
        return "—"
    return f"{s * 1e6:.0f} µs" if s < 1e-3 else f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def fmt_bytes(b: float | None) -> str:
    if b is None:
        return "—"
    return f"{b / 2**20:.1f} MiB" if b >= 2**20 else f"{b / 2**10:.0f} KiB"
