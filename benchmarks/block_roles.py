"""A ResNet-20 training step with MX roles, as ratios to eager fp32 in the same process.

    .venv/bin/python benchmarks/block_roles.py [--runs 5] [--batch 64]

Input and weight in mxfp8_e4m3, grad_output in mxfp8_e5m2, torch's fp32 arithmetic: the
block roles alone. Variants: blocks along the reduction dimension K (the default: a conv
weight's in_channels x kernel, its activations' channels), and along each tensor's last axis
(``axis: -1``: a conv weight's kernel width, 3 long, padded to 32 per block), as mpcompile blocked
before. A step is forward, cross-entropy, backward and an SGD step on one fixed random batch;
each variant trains its own copy of the same model, called once untimed first, and its median
of --runs steps is divided by the median of eager fp32 steps timed just before it.
"""
from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F

import mpcompile
from mpcompile.models import resnet20
from timing import median_seconds

ROLES = {"input": "mxfp8_e4m3", "weight": "mxfp8_e4m3", "grad_output": "mxfp8_e5m2"}
VARIANTS = {
    "blocks along K (default)": {"version": 1, "default": ROLES},
    "blocks along the last axis (axis: -1)": {"version": 1, "default": {r: f"{f}:axis=-1" for r, f in ROLES.items()}},
}


def step_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    torch.manual_seed(0)
    base = resnet20()
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    print(f"ResNet-20 training step, batch {args.batch}, median of {args.runs} (CPU, {torch.get_num_threads()} threads)")
    for name, policy in VARIANTS.items():
        eager = median_seconds(step_fn(copy.deepcopy(base), x, y), args.runs, warmup=True)
        model = copy.deepcopy(base)
        cm = mpcompile.compile(model, policy, (x,), calibration=[])
        seconds = median_seconds(step_fn(cm, x, y), args.runs, warmup=True)
        print(f"{name:40s} {seconds * 1e3:8.1f} ms   {seconds / eager:6.2f}x eager fp32 ({eager * 1e3:.1f} ms)")


if __name__ == "__main__":
    main()
