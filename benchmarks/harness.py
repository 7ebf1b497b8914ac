"""Timing and memory harness shared by the benchmarks: interleaved rounds, per-round ratios, peak RSS.

`compare` times each callable once per round, reversing the order every other round, and ratios are taken
round by round (`t_peer / t_mmfm`), so drift and other load on the machine slow both terms of a ratio alike:

    setup()
    result = compare({"mmfm": run_mmfm, "timm": run_timm}, rounds=10)
    print(result.format("image encoder"))
    speed = result.ratio("mmfm", "timm")  # median [min, max] of t_timm / t_mmfm; above 1: mmfm is faster
"""

from __future__ import annotations

import gc
import multiprocessing
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

THREADS = 2


def setup(seed: int = 0) -> None:
    """Pins the thread count every benchmark runs under and seeds torch's global RNG."""
    torch.set_num_threads(THREADS)
    torch.manual_seed(seed)


@dataclass
class Ratio:
    """The median, min and max over rounds of one pair's per-round time ratio."""

    median: float
    min: float
    max: float

    def __str__(self) -> str:
        return f"{self.median:.2f}x [{self.min:.2f}, {self.max:.2f}]"


@dataclass
class Comparison:
    """Seconds of every timed round per callable, and the last value each returned (to check the work matched)."""

    times: dict[str, list[float]]
    outputs: dict[str, Any]

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])

    def ratio(self, fast: str, slow: str) -> Ratio:
        """Per-round `t[slow] / t[fast]`: how many times faster `fast` is than `slow` (below 1: slower)."""
        ratios = [s / f for f, s in zip(self.times[fast], self.times[slow])]
        return Ratio(statistics.median(ratios), min(ratios), max(ratios))

    def format(self, title: str) -> str:
        """Median times of every callable and the ratio of every pair, as a small table under `title`."""
        names = list(self.times)
        rounds = len(self.times[names[0]])
        rows = [[name, f"{self.median(name) * 1e3:.1f} ms", ""] for name in names]
        for i, a in enumerate(names):
            rows += [[f"{a} vs {b}", "", str(self.ratio(a, b))] for b in names[i + 1 :]]
        return table([f"{title}, {rounds} rounds", "median", "A vs B: t_B / t_A median [min, max]"], rows)


@dataclass
class Result:
    """One headline number of a benchmark, for the summary: a ratio (read as mmfm's speed-up) and its target."""

    name: str
    ratio: Ratio
    target: float
    meaning: str

    @property
    def met(self) -> bool:
        return self.ratio.median >= self.target


def compare(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1) -> Comparison:
    """Times every callable once per round, in an order that flips every round.

    Garbage is collected before each call and the collector is off during it, so one side's garbage is never
    collected on the other side's clock.

    Args:
        fns: name -> callable taking no arguments; put mmfm first and read `ratio(mmfm, peer)`.
        rounds: timed rounds.
        warmup: untimed calls of every callable first (allocator, caches, lazy initialisation).
    """
    outputs = {}
    for _ in range(warmup):
        for name, fn in fns.items():
            outputs[name] = fn()
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            gc.collect()
            gc.disable()
            try:
                start = time.perf_counter()
                outputs[name] = fns[name]()
                times[name].append(time.perf_counter() - start)
            finally:
                gc.enable()
    return Comparison(times, outputs)


def table(header: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns as wide as their longest cell."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@dataclass
class PeakRSS:
    """MiB of resident memory of a fresh interpreter: once everything is imported, and the callable's peak."""

    baseline: float
    peak: float

    def __str__(self) -> str:
        added = self.peak - self.baseline
        return f"peak {self.peak:.0f} MiB (+{added:.0f} MiB over {self.baseline:.0f} MiB after imports)"


def peak_rss(fn: Callable[..., Any], *args: Any) -> PeakRSS:
    """Runs `fn(*args)` in a fresh 'spawn' subprocess and reports its peak RSS.

    `fn` must be a module-level function (it is pickled by name). The peak is the kernel's high-water mark
    VmHWM, reset after the imports. `getrusage().ru_maxrss` is not used: on Linux a child started by
    fork + exec inherits the parent's high-water mark, so it would report the parent's memory.
    """
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        baseline, peak = pool.apply(_measure_in_child, (fn, args))
    return PeakRSS(baseline / 1024, peak / 1024)


def _measure_in_child(fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[int, int]:
    setup()
    baseline = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    fn(*args)
    return baseline, _status_kib("VmHWM")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")
