"""quantize speed on the CPU, as ratios to torch's own fp8 cast of the same data.

16M float32 values; every figure is the median of --runs runs in this one process, after a
warm-up call (which, for the fused kernel, also pays the one-time compile, reported apart;
inductor gets an empty cache directory so that this is the cold cost a user first sees); then a
second process reports each fused kernel's first call with the cache the first one filled.
glibc is told to keep freed memory (MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_) so that
fresh large buffers do not page-fault on every call; the script re-executes itself to set it.
The threshold is above a result's size (64 MB at 16M values): below it, every call's output was
mapped afresh and the page faults (about 20 ms) outweighed the kernels being timed.

    .venv/bin/python benchmarks/quantize.py [--runs 7] [--numel 16777216]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(2**32)}
if any(os.environ.get(k) != v for k, v in _MALLOC.items()):
    cold_cache = {"TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="mpcompile-bench-")}
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **_MALLOC, **cold_cache})

import torch  # noqa: E402

from mpcompile import quantize, set_quantize_kernel  # noqa: E402
from timing import median_seconds  # noqa: E402

CASES = [("fp8_e4m3", "nearest"), ("fp8_e4m3", "stochastic"), ("bf16", "nearest"),
         ("fp8_e5m2", "nearest"), ("mxfp8_e4m3", "nearest")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--numel", type=int, default=16 * 2**20)
    ap.add_argument("--second-process", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.numel)
    if args.second_process:
        return _first_calls(x)
    y = torch.empty_like(x)

    def torch_cast():
        return x.to(torch.float8_e4m3fn).float()

    torch_cast()
    base = median_seconds(torch_cast, args.runs)
    print(f"{args.numel / 2**20:.0f}M float32 values, {torch.get_num_threads()} threads, median of {args.runs} runs, "
          f"malloc kept ({', '.join(f'{k}={v}' for k, v in _MALLOC.items())}), cold inductor cache")
    print(f"{'case':34s} {'ms':>9s} {'x torch cast':>13s}")
    print(f"{'torch x.to(float8_e4m3fn).float()':34s} {base * 1e3:9.1f} {1.0:13.2f}")
    y.copy_(x)
    floor = median_seconds(lambda: y.copy_(x), args.runs)
    print(f"{'y.copy_(x) (bandwidth floor)':34s} {floor * 1e3:9.1f} {floor / base:13.2f}")
    for kernel in ("reference", "fused"):
        set_quantize_kernel(kernel)
        for fmt, rounding in CASES:
            start = time.perf_counter()
            quantize(x, fmt, rounding)  # warm-up; compiles the fused kernel
            first = time.perf_counter() - start
            t = median_seconds(lambda: quantize(x, fmt, rounding), args.runs)
            name = f"{'eager' if kernel == 'reference' else 'fused'} {fmt} {rounding}"
            note = f"   (first call {first:.1f} s, cold compile included)" if kernel == "fused" else ""
            print(f"{name:34s} {t * 1e3:9.1f} {t / base:13.2f}{note}")
    set_quantize_kernel(None)
    print("a second process, with the inductor cache the first one filled:")
    subprocess.run([sys.executable, *sys.argv, "--second-process"], check=True)


def _first_calls(x: torch.Tensor) -> None:
    """The fused kernel's first call of each case in this (second) process: what a user pays
    again once inductor's on-disk cache holds the kernels."""
    set_quantize_kernel("fused")
    for fmt, rounding in CASES:
        start = time.perf_counter()
        quantize(x, fmt, rounding)
        print(f"  fused {fmt} {rounding}: first call {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
