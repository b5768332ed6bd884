"""Issue 24's benchmarks: what monitoring costs, and what packed low-precision optimizer states save and cost.

    .venv/bin/python benchmarks/monitor.py [--repeats 21] [--threads 1] [--device cpu]

Monitoring (``monitoring_overhead``): the extra training time of ``--monitor 50`` (every 50th
step monitored: the lowered graph run node by node, every rounding's statistics, the row
written to monitor.jsonl and TensorBoard), as (a monitored step - a plain step) / (50 plain
steps), each the median of --repeats steps of SGD (momentum 0.9), plain and monitored steps
interleaved: lenet5 on a batch of 32 digit-sized images under hfp8 (fp8 operands, e6m9
accumulation, emulated), and resnet20 on a batch of 32 CIFAR-sized images under fp8_e4m3 (fp8
operands with per-tensor scaling, fp32 accumulation). Bar: at most 10 %.

Adam states (``adam_states``): Adam whose first and second moments are kept packed in the
block-wise dynamic tree codebooks of 8-bit optimizers (Dettmers et al. 2022; bitsandbytes'
Adam8bit): 8-bit ``blockwise(dynamic8,256)`` / ``blockwise(dynamic8u,256)`` and 4-bit
``blockwise(dynamic4,256)`` / ``blockwise(dynamic4u,256)``, ``storage: packed``, against
``torch.optim.Adam`` in fp32 (its default implementation; the packed variants wrap the same
one in ``LowPrecisionOptimizer``, whose fused CPU kernel steps the packed moments). Parameters under 4096 elements keep fp32 states, as in
bitsandbytes. Models: resnet20 (0.27M parameters) and an MLP 64-512-10, each variant on its own
copy of the same initial weights. Every step reads the same gradients in every variant: those
of four random batches (CIFAR-sized 3x32x32 images for resnet20, 64 features for the MLP,
batch 32), taken in turn. After 3 untimed steps (the first packs the states), each of
--repeats rounds times one optimizer step of every variant, the variants taking turns in an
order rotated each round. Reported: state bytes between steps (``state_bytes()``; the state
tensors otherwise, each storage once), and the median over rounds of each round's step time /
fp32 Adam's step time in the same round. Where bitsandbytes is installed (the test extra),
its own ``Adam8bit`` runs too, as a reference.

The 4-bit second moment's codebook holds 0, and an exp_avg_sq rounded to 0 under a nonzero
exp_avg makes Adam's step explode (the zero-point problem of Li et al. 2023): Adam with it
diverges on digits, so the 4-bit row measures cost, not a recipe; a 4-bit first moment with
the 8-bit second trains (tests/runtime/optim/test_blockwise_adam.py).

Bars (issue 24): monitoring every 50 steps at most 10 % extra training time; packed 8-bit states at most 0.3x fp32 Adam's state bytes, and the 8-bit
optimizer step at most 2x fp32 Adam's time, on both models.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mpcompile.formats import parse
from mpcompile.models import build_model
from mpcompile.policy import OptimizerSettings
from mpcompile.runtime.optim import LowPrecisionOptimizer

Optimizer = torch.optim.Optimizer | LowPrecisionOptimizer

LR = 1e-3
BATCH, GRADIENT_SETS, WARMUP = 32, 4, 3
BYTES_BAR, TIME_BAR, MONITOR_BAR = 0.3, 2.0, 0.10
EVERY = 50
STATE_FORMATS = {"8-bit": ("blockwise(dynamic8,256)", "blockwise(dynamic8u,256)"),
                 "4-bit": ("blockwise(dynamic4,256)", "blockwise(dynamic4u,256)")}
BNB = "bnb Adam8bit"


def packed_adam(params, momentum: str, second_moment: str) -> LowPrecisionOptimizer:
    settings = OptimizerSettings(kind="adam", momentum=parse(momentum), second_moment=parse(second_moment),
                                 storage="packed")
    return LowPrecisionOptimizer(torch.optim.Adam(params, lr=LR), settings)


def state_bytes(optimizer: Optimizer) -> int:
    """Bytes of the states kept between steps (a storage that several states share, once)."""
    if isinstance(optimizer, LowPrecisionOptimizer):
        return optimizer.state_bytes()
    tensors = {t.untyped_storage().data_ptr(): t for state in optimizer.state.values() for t in state.values()
               if isinstance(t, torch.Tensor)}
    return sum(t.untyped_storage().nbytes() for t in tensors.values())


def bitsandbytes_adam(params) -> Optimizer | None:
    """bitsandbytes' Adam8bit, or None where it is not installed."""
    try:
        import bitsandbytes
    except ImportError:
        return None
    return bitsandbytes.optim.Adam8bit(params, lr=LR)


def gradient_sets(model: nn.Module, input_shape: tuple[int, ...], device: torch.device) -> list[list[torch.Tensor]]:
    """The parameter gradients of ``GRADIENT_SETS`` random batches (cross-entropy on random labels)."""
    g = torch.Generator().manual_seed(0)
    sets = []
    for _ in range(GRADIENT_SETS):
        model.zero_grad(set_to_none=True)
        x = torch.randn(BATCH, *input_shape, generator=g).to(device)
        y = torch.randint(0, 10, (BATCH,), generator=g).to(device)
        nn.functional.cross_entropy(model(x), y).backward()
        sets.append([p.grad.detach().clone() for p in model.parameters()])
    return sets


def step_timer(model: nn.Module, optimizer: Optimizer, grads: list[list[torch.Tensor]],
               device: torch.device) -> Callable[[int], float]:
    """A function taking step k with gradient set k mod GRADIENT_SETS and returning its seconds."""
    params = list(model.parameters())

    def step(k: int) -> float:
        for p, g in zip(params, grads[k % len(grads)]):
            p.grad = g.clone()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start
    return step


def adam_states(name: str, model: nn.Module, input_shape: tuple[int, ...], repeats: int, device: torch.device) -> None:
    """Print the state bytes and step times of packed 8-bit and 4-bit Adam (and bitsandbytes'
    Adam8bit) against fp32 Adam on ``model``."""
    model = model.to(device)
    grads = gradient_sets(model, input_shape, device)
    models = {v: copy.deepcopy(model) for v in ("fp32", *STATE_FORMATS, BNB)}
    optimizers: dict[str, Optimizer] = {"fp32": torch.optim.Adam(models["fp32"].parameters(), lr=LR)}
    for v, (momentum, second) in STATE_FORMATS.items():
        optimizers[v] = packed_adam(models[v].parameters(), momentum, second)
    reference = bitsandbytes_adam(models[BNB].parameters())
    if reference is None:
        del models[BNB]
    else:
        optimizers[BNB] = reference
    steps = {v: step_timer(models[v], optimizers[v], grads, device) for v in models}
    for k in range(WARMUP):
        for v in steps:
            steps[v](k)
    names = list(steps)
    times: dict[str, list[float]] = {v: [] for v in names}
    for r in range(repeats):
        for v in names[r % len(names):] + names[:r % len(names)]:
            times[v].append(steps[v](WARMUP + r))

    params = list(model.parameters())
    large = sum(p.numel() for p in params if p.numel() >= 4096)
    total = sum(p.numel() for p in params)
    print(f"{name}: {total} parameters in {len(params)} tensors, {large / total:.1%} of them in tensors of "
          f"4096 elements or more")
    print(f"  {'Adam states':13s} {'state bytes':>12s} {'x fp32':>7s} {'ms / step':>10s} {'x fp32':>7s}")
    fp32_bytes = state_bytes(optimizers["fp32"])
    for v in names:
        ratio = statistics.median(t / b for t, b in zip(times[v], times["fp32"]))
        print(f"  {v:13s} {state_bytes(optimizers[v]):12d} {state_bytes(optimizers[v]) / fp32_bytes:7.3f} "
              f"{statistics.median(times[v]) * 1e3:10.3f} {ratio:7.2f}")
    bytes_ratio = state_bytes(optimizers["8-bit"]) / fp32_bytes
    time_ratio = statistics.median(t / b for t, b in zip(times["8-bit"], times["fp32"]))
    print(f"  8-bit state bytes <= {BYTES_BAR:g}x fp32: {'met' if bytes_ratio <= BYTES_BAR else 'MISSED'} "
          f"({bytes_ratio:.3f}x)")
    print(f"  8-bit step time <= {TIME_BAR:g}x fp32: {'met' if time_ratio <= TIME_BAR else 'MISSED'} ({time_ratio:.2f}x)")


def monitoring_overhead(name: str, model: nn.Module, policy: str, x: torch.Tensor, y: torch.Tensor,
                        every: int, repeats: int) -> float:
    """Extra training time of monitoring every ``every`` steps: (a monitored step - a plain
    step) / (``every`` plain steps), each step time the median of ``repeats``, steps interleaved."""
    from mpcompile import compile as compile_model
    from mpcompile.policy import MonitorSettings
    from mpcompile.runtime.monitor import Monitor

    cm = compile_model(model, policy, (x[:2],))
    optimizer = torch.optim.SGD(cm.parameters(), lr=1e-3, momentum=0.9)
    with tempfile.TemporaryDirectory() as out:
        monitor = Monitor(cm, MonitorSettings(every=every), Path(out))

        def plain() -> None:
            optimizer.zero_grad()
            F.cross_entropy(cm(x), y).backward()
            optimizer.step()

        def monitored() -> None:
            optimizer.zero_grad()
            with monitor.step(0, 1):
                F.cross_entropy(monitor.forward(x), y).backward()
                optimizer.step()

        plain(), monitored()  # warm-up: captures, caches
        times: dict[str, list[float]] = {"plain": [], "monitored": []}
        for _ in range(repeats):
            for label, step in (("plain", plain), ("monitored", monitored)):
                start = time.perf_counter()
                step()
                times[label].append(time.perf_counter() - start)
        monitor.close()
    t_plain, t_monitored = statistics.median(times["plain"]), statistics.median(times["monitored"])
    overhead = (t_monitored - t_plain) / (every * t_plain)
    verdict = "met" if overhead <= MONITOR_BAR else "MISSED"
    print(f"{name} under {policy}, batch {len(y)}: plain step {1e3 * t_plain:.1f} ms, monitored step "
          f"{1e3 * t_monitored:.1f} ms; every {every} steps: +{100 * overhead:.1f} % training time "
          f"(bar <= {100 * MONITOR_BAR:g} %): {verdict}")
    return overhead


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21, help="timed steps per variant (median; at least 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    args = parser.parse_args()
    if args.repeats < 5 or args.threads < 1:
        parser.error("--repeats must be at least 5 and --threads at least 1")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    torch.manual_seed(0)
    print(f"Monitoring every {EVERY} steps on {where}, median of {args.repeats} steps each, interleaved:")
    digits = torch.randn(BATCH, 1, 8, 8, device=device), torch.randint(0, 10, (BATCH,), device=device)
    monitoring_overhead("lenet5", build_model("lenet5", num_classes=10, in_channels=1, image_size=8).to(device),
                        "hfp8", *digits, EVERY, args.repeats)
    images = torch.randn(BATCH, 3, 32, 32, device=device), torch.randint(0, 10, (BATCH,), device=device)
    monitoring_overhead("resnet20", build_model("resnet20").to(device), "fp8_e4m3", *images, EVERY, args.repeats)
    print(f"Adam states, float32 on {where}: lr {LR}, median of {args.repeats} steps after {WARMUP} untimed, "
          f"variants interleaved;\nx fp32: median over rounds of the step's time / fp32 Adam's step in the same round")
    adam_states("resnet20", build_model("resnet20"), (3, 32, 32), args.repeats, device)
    adam_states("mlp 64-512-10", build_model("mlp", hidden=(512,)), (64,), args.repeats, device)


if __name__ == "__main__":
    main()
