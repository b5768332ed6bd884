"""Emulated arithmetic against torch, same data, same process: medians of paired ratios (>= 5 runs).

    .venv/bin/python benchmarks/arith.py [--runs 7]

Each case is called once untimed first (that call compiles). Bars: 256^3 GEMM mul e5m2 /
acc e5m10 sequential <= 150x torch.mm (issue 3); chunk(32) <= 8x, linear fwd+bwd sequential
<= 60x nn.Linear, conv2d fwd+bwd chunk(32) <= 10x F.conv2d (issue 27; issue 3's were 20x and
200x).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from mpcompile import ops
from mpcompile.ops import ArithSpec
from timing import paired_ratio


def linear_step(x, w, b, **kw):
    xx = x.detach().requires_grad_()
    ww = w.detach().requires_grad_()
    bb = b.detach().requires_grad_()
    y = ops.linear(xx, ww, bb, **kw) if kw else F.linear(xx, ww, bb)
    y.backward(torch.ones_like(y))


def conv_step(x, w, b, **kw):
    xx = x.detach().requires_grad_()
    ww = w.detach().requires_grad_()
    bb = b.detach().requires_grad_()
    y = ops.conv2d(xx, ww, bb, padding=1, **kw) if kw else F.conv2d(xx, ww, bb, padding=1)
    y.backward(torch.ones_like(y))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    seq = ArithSpec(mul="fp8_e5m2", acc="e5m10")
    chunk = ArithSpec(mul="fp8_e5m2", acc="e5m10", order="chunk(32)")
    rows = []
    for name, spec, bar in (("gemm 256^3 e5m2/e5m10 sequential", seq, 150),
                            ("gemm 256^3 e5m2/e5m10 chunk(32)", chunk, 8)):
        t, t_mm, ratio = paired_ratio(lambda: ops.matmul(a, b, forward=spec), lambda: torch.mm(a, b), args.runs)
        rows.append((name, t, ratio, f"torch.mm {t_mm * 1e3:.3f} ms", bar))

    x, w, bias = torch.randn(256, 256), torch.randn(256, 256), torch.randn(256)
    t, t_lin, ratio = paired_ratio(lambda: linear_step(x, w, bias, forward=seq, backward=seq),
                                   lambda: linear_step(x, w, bias), args.runs)
    rows.append(("linear 256->256 b256 fwd+bwd sequential", t, ratio, f"nn.Linear {t_lin * 1e3:.3f} ms", 60))

    xc, wc, bc = torch.randn(32, 16, 32, 32), torch.randn(16, 16, 3, 3), torch.randn(16)
    t, t_conv, ratio = paired_ratio(lambda: conv_step(xc, wc, bc, forward=chunk, backward=chunk),
                                    lambda: conv_step(xc, wc, bc), args.runs)
    rows.append(("conv2d 3x3 16->16 32x32 b32 fwd+bwd chunk(32)", t, ratio, f"F.conv2d {t_conv * 1e3:.3f} ms", 10))

    print(f"threads: {torch.get_num_threads()}, runs: {args.runs} (each the op, then its torch baseline; medians)")
    for name, t, ratio, base, bar in rows:
        verdict = f"  bar <= {bar}x: {'ok' if ratio <= bar else 'MISSED'}"
        print(f"{name:48s} {t * 1e3:9.2f} ms  {ratio:8.1f}x  ({base}){verdict}")


if __name__ == "__main__":
    main()
