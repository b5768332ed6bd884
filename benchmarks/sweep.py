"""Issue 25's bars for the precision sweep: the default sweep's wall time, and the sweep's own work per run.

    .venv/bin/python benchmarks/sweep.py [--out DIR] [--seeds 3]

Runs ``mpcompile.sweep`` with its defaults (7 models x 6 precisions, every mode, 3 seeds, on
scikit-learn's data and digits) into ``--out`` (a temporary folder by default) and prints the
wall time of the whole sweep against the 20-minute bar, and the overhead per run against the 0.5 s
bar two ways: the sweep machinery's own (the time of a run's row outside the run: building the
row, appending it to results.csv, the progress bar; median and largest), and everything that is
not training, (wall time - the runs' training time) / runs: imports, data, scikit-learn's
references, compiling, warm-up steps, evaluations, the summary and plots.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

import mpcompile

WALL_BAR, OVERHEAD_BAR = 20 * 60.0, 0.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="results folder (default: a temporary one)")
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        rows = mpcompile.sweep(seeds=args.seeds, out=args.out or tmp, progress=False)
        wall = time.perf_counter() - start
    overheads = [r["overhead_seconds"] for r in rows]
    ok = sum(r["status"] == "ok" for r in rows)
    not_training = (wall - sum(r["train_seconds"] or 0.0 for r in rows)) / len(rows)
    print(f"default sweep, {len(rows)} runs ({ok} ok), CPU threads: {torch.get_num_threads()}")
    print(f"  wall time            {wall:8.1f} s   bar {WALL_BAR:.0f} s: {'met' if wall <= WALL_BAR else 'MISSED'} "
          f"({wall / WALL_BAR:.2f}x of the bar)")
    print(f"  overhead per run     median {statistics.median(overheads) * 1e3:.3f} ms, max {max(overheads) * 1e3:.3f} ms   "
          f"bar {OVERHEAD_BAR} s: {'met' if max(overheads) <= OVERHEAD_BAR else 'MISSED'}")
    print(f"  not training per run {not_training:.3f} s   bar {OVERHEAD_BAR} s: "
          f"{'met' if not_training <= OVERHEAD_BAR else 'MISSED'}")


if __name__ == "__main__":
    main()
