"""Timing shared by the benchmark scripts (run as ``python benchmarks/NAME.py``)."""
from __future__ import annotations

import statistics
import time
from typing import Callable

__all__ = ["median_seconds"]


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
