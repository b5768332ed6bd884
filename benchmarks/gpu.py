"""Triton kernels on a CUDA GPU: quantize bandwidth against a copy, emulated GEMM against cuBLAS.

Quantize: 64M float32 values to E4M3, to MXFP8 (E4M3 elements, blocks of 32) and to E4M3 with
stochastic rounding, each as a share of a device-to-device copy's bandwidth (read 4 B + write
4 B per value for both). GEMM: 4096 x 4096 x 4096, the Triton kernel with E4M3 operands quantized
in its prologue and a bf16 accumulator in chunk(32) order (rounding to nearest, and
stochastically), bf16 operands (whose products' range the data decides) in chunk(32) order, and
E4M3 operands in sequential order with e5m2 and e5m10 accumulators, each as a share of cuBLAS's
bf16 and fp32 throughput in the same run.
Every figure is the median of --runs samples timed with CUDA events after a warm-up call; a
quantize or copy sample is 10 back-to-back calls, so that the host's launch latency (tens of
microseconds against a 0.2 ms kernel) is not counted as the kernel's time.

    .venv/bin/python benchmarks/gpu.py [--runs 7] [--size 4096]

Bars (issue 7): quantize >= 70 % of copy bandwidth; chunk(32) E4M3 GEMM >= 40 % of cuBLAS bf16.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from typing import Callable

import torch

from mpcompile import quantize
from mpcompile.codegen.triton_gemm import triton_matmul
from mpcompile.ops.spec import parse_arith, parse_quant


def cuda_median_seconds(fn: Callable[[], object], runs: int, calls: int = 1) -> float:
    """Seconds per call of fn: the median over ``runs`` samples, each ``calls`` back-to-back calls
    timed with CUDA events, after one warm-up call. Several calls per sample keep the GPU busy
    while Python prepares the next launch, so a short kernel is timed, not the host's latency."""
    fn()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return statistics.median(times)


def quantize_rows(runs: int, numel: int) -> None:
    x = torch.randn(numel, device="cuda")
    y = torch.empty_like(x)
    copy = cuda_median_seconds(lambda: y.copy_(x), runs, calls=10)
    gbps = 8 * numel / copy / 1e9
    print(f"quantize, {numel / 2**20:.0f}M float32 values; copy: {copy * 1e3:.2f} ms ({gbps:.0f} GB/s)")
    for name, fmt, rounding in (("E4M3", "fp8_e4m3", "nearest"), ("MXFP8", "mxfp8_e4m3", "nearest"),
                                ("E4M3 stochastic", "fp8_e4m3", "stochastic")):
        t = cuda_median_seconds(lambda: quantize(x, fmt, rounding, backend="triton"), runs, calls=10)
        share = copy / t
        print(f"  {name:18s} {t * 1e3:8.2f} ms  {share:6.1%} of copy bandwidth  bar >= 70%: "
              f"{'ok' if share >= 0.7 else 'MISSED'}")


def gemm_rows(runs: int, n: int) -> None:
    a, b = torch.randn(1, n, n, device="cuda"), torch.randn(1, n, n, device="cuda")
    flops = 2 * n**3
    a16, b16 = a.bfloat16(), b.bfloat16()  # cast outside the timing: cuBLAS's own throughput
    bf16 = cuda_median_seconds(lambda: a16 @ b16, runs)
    fp32 = cuda_median_seconds(lambda: a @ b, runs)
    print(f"GEMM {n}^3: cuBLAS bf16 {flops / bf16 / 1e12:.1f} TFLOP/s, fp32 {flops / fp32 / 1e12:.1f} TFLOP/s")
    e4m3, bf16_role = parse_quant("fp8_e4m3"), parse_quant("bf16")
    for name, arith, role in (("E4M3, acc bf16 chunk(32)", "acc=bf16 order=chunk(32)", e4m3),
                              ("E4M3, acc bf16 SR chunk(32)", "acc=bf16 rounding=stochastic order=chunk(32)", e4m3),
                              ("bf16, acc bf16 chunk(32)", "acc=bf16 order=chunk(32)", bf16_role),
                              ("E4M3, acc e5m2 sequential", "acc=e5m2", e4m3),
                              ("E4M3, acc e5m10 sequential", "acc=e5m10", e4m3)):
        spec = parse_arith(arith)
        t = cuda_median_seconds(lambda: triton_matmul(a, b, spec, a_role=role, b_role=role, seed=1), runs)
        bar = f"  bar >= 40% of bf16: {'ok' if bf16 / t >= 0.4 else 'MISSED'}" if name == "E4M3, acc bf16 chunk(32)" else ""
        print(f"  {name:28s} {t * 1e3:9.2f} ms  {flops / t / 1e12:7.2f} TFLOP/s  {bf16 / t:6.1%} of cuBLAS bf16  "
              f"{fp32 / t:6.1%} of fp32{bar}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--numel", type=int, default=64 * 2**20)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing was measured")
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, median of {args.runs} runs")
    quantize_rows(args.runs, args.numel)
    gemm_rows(args.runs, args.size)


if __name__ == "__main__":
    main()
