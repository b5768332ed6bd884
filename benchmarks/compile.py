"""Compile and recompile time of mpcompile against torch.fx's own symbolic_trace, same process.

    .venv/bin/python benchmarks/compile.py [--runs 7]

Medians after one warm-up call. Bars (issue 4, resnet50 without calibration): compile <= 0.5 s,
recompile <= 0.1 s. The policy is FP8 roles with fp16 chunk(32) accumulation, first GEMM kept
in fp32, and a bf16 level; recompile alternates between the two levels.
"""
from __future__ import annotations

import argparse

import torch
import torchvision

import mpcompile
from timing import median_seconds

POLICY = """
version: 1
default:
  input: fp8_e4m3
  weight: fp8_e4m3
  grad_output: fp8_e5m2
  forward: {acc: fp16, order: chunk(32)}
rules:
  - match: {first: true}
    keep: fp32
levels:
  - {name: fp8}
  - {name: bf16, set: {input: bf16, weight: bf16}}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    policy = mpcompile.load_policy(POLICY)
    print(f"runs: {args.runs} (median)")
    for name, bars in (("resnet18", None), ("resnet50", (0.5, 0.1)), ("vit_b_16", None)):
        model = getattr(torchvision.models, name)()
        t_trace = median_seconds(lambda: torch.fx.symbolic_trace(model), args.runs, warmup=True)
        t_compile = median_seconds(lambda: mpcompile.compile(model, policy), args.runs, warmup=True)
        cm = mpcompile.compile(model, policy)
        levels = iter(range(10**9))
        t_recompile = median_seconds(lambda: cm.recompile(level=next(levels) % 2), args.runs, warmup=True)
        verdict = "" if bars is None else (f"  bars compile <= {bars[0]} s: {'ok' if t_compile <= bars[0] else 'MISSED'}, "
                                           f"recompile <= {bars[1]} s: {'ok' if t_recompile <= bars[1] else 'MISSED'}")
        print(f"{name:10s} symbolic_trace {t_trace * 1e3:7.1f} ms   compile {t_compile * 1e3:7.1f} ms "
              f"({t_compile / t_trace:4.1f}x)   recompile {t_recompile * 1e3:7.1f} ms ({t_recompile / t_trace:4.1f}x){verdict}")


if __name__ == "__main__":
    main()
