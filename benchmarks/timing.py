"""Timing shared by the benchmark scripts (run as ``python benchmarks/NAME.py``)."""
from __future__ import annotations

import statistics
import time
from typing import Callable

__all__ = ["median_seconds", "paired_ratio"]


def median_seconds(fn: Callable[[], object], runs: int, *, warmup: bool = False) -> float:
    """Median wall time of ``runs`` calls of fn; ``warmup`` makes one untimed call first (compiles)."""
    if warmup:
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def paired_ratio(fn: Callable[[], object], base: Callable[[], object], runs: int) -> tuple[float, float, float]:
    """(fn's median seconds, base's median seconds, the median of fn / base over runs of the two in
    turn). Timing each run's pair back to back keeps the ratio of a machine whose speed drifts
    (this one's changes by a third from one minute to the next) to what one moment measures. Both
    are called once untimed first (that call compiles); base is timed over enough calls to take a
    millisecond, well above the timer's resolution."""
    fn(), base()
    repeats = max(1, round(1e-3 / median_seconds(base, 5)))
    times, bases, ratios = [], [], []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        start = time.perf_counter()
        for _ in range(repeats):
            base()
        bases.append((time.perf_counter() - start) / repeats)
        ratios.append(times[-1] / bases[-1])
    return statistics.median(times), statistics.median(bases), statistics.median(ratios)
