"""Where a ResNet-20 training step under an mpcompile policy spends its time (torch.profiler).

    .venv/bin/python benchmarks/profile_train_step.py [--policy hfp8] [--batch 128] [--steps 1]

One SGD step (forward, cross-entropy, backward, momentum 0.9) on a fixed random batch, after
one untimed step (that compiles). Every operator the profiler records gives its own (self) CPU
time to the innermost ``mpcompile.profiling`` section around it (quantize, GEMM products, chunk
rounding, fused GEMM kernels, im2col); outside a section, to copies (torch's copy, cast, pad,
cat operators) or to the rest of torch's work, inside an ``mpc::`` op or outside one (autograd,
batch norm, the optimizer). Printed: the step's wall time against eager fp32 (the plain
nn.Module), the time per category, and per ``mpc::`` op the time of each category.
"""
from __future__ import annotations

import argparse
import copy
from collections import defaultdict

import torch
from torch.autograd.profiler_util import FunctionEvent

import mpcompile
from mpcompile.models import resnet20
from mpcompile.profiling import SECTIONS
from timing import median_seconds
from train_step import make_step

COPIES = {"aten::copy_", "aten::_to_copy", "aten::to", "aten::clone", "aten::contiguous", "aten::cat",
          "aten::constant_pad_nd", "aten::pad", "aten::reshape", "aten::_unsafe_view", "aten::index_put_",
          "aten::new_zeros", "aten::zeros", "aten::empty", "aten::empty_strided", "aten::flip"}


def _innermost(event: FunctionEvent, prefix: str) -> str | None:
    """The name of the nearest enclosing event (itself included) whose name starts with ``prefix``."""
    while event is not None:
        if event.name.startswith(prefix):
            return event.name
        event = event.cpu_parent
    return None


def category(event: FunctionEvent) -> str:
    """The category an event's own time belongs to (see the module)."""
    named = _innermost(event, "mpc.")
    if named is not None:
        return named.removeprefix("mpc.")
    if event.name in COPIES:
        return "copies"
    return "torch, in mpc ops" if _innermost(event, "mpc::") else "torch, outside mpc ops"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="hfp8")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=1, help="profiled steps")
    args = parser.parse_args()
    torch.manual_seed(0)
    base = resnet20()
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    eager = make_step(copy.deepcopy(base), x, y)
    step = make_step(mpcompile.compile(copy.deepcopy(base), args.policy), x, y)
    t_eager = median_seconds(eager, 11, warmup=True)
    t_step = median_seconds(step, 1, warmup=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    by_category: dict[str, float] = defaultdict(float)
    by_op: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for event in prof.events():
        ms = event.self_cpu_time_total / 1e3 / args.steps
        cat = category(event)
        by_category[cat] += ms
        op = _innermost(event, "mpc::")
        if op is not None:
            by_op[op.removeprefix("mpc::")][cat] += ms
    total = sum(by_category.values())
    print(f"resnet20, batch {args.batch}, policy {args.policy}, threads {torch.get_num_threads()}: step "
          f"{t_step * 1e3:.0f} ms = {t_step / t_eager:.1f}x eager fp32 ({t_eager * 1e3:.0f} ms); "
          f"profiled {args.steps} step(s), {total:.0f} ms of operator time a step")
    order = [*SECTIONS, "copies", "torch, in mpc ops", "torch, outside mpc ops"]
    print(f"\n  {'category':28s} {'ms':>9s} {'share':>7s}")
    for cat in order:
        if by_category.get(cat):
            print(f"  {cat:28s} {by_category[cat]:9.1f} {by_category[cat] / total:7.1%}")
    shown = [c for c in order[:-1] if any(ops.get(c) for ops in by_op.values())]
    print(f"\n  {'mpc op':22s} {'ms':>9s}" + "".join(f" {c[:14]:>14s}" for c in shown))
    for op, cats in sorted(by_op.items(), key=lambda kv: -sum(kv[1].values())):
        print(f"  {op:22s} {sum(cats.values()):9.1f}" + "".join(f" {cats.get(c, 0.0):14.1f}" for c in shown))


if __name__ == "__main__":
    main()
