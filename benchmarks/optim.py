"""One training epoch of SVRG, LP-SVRG, HALP, SWALP and LP-SGD, as ratios to plain SGD in the same process.

    .venv/bin/python benchmarks/optim.py [--repeats 21] [--threads 1]

Models: logistic regression (``logreg``) and LeNet-5 (``lenet5``) on sklearn's digits (8x8
images, 1347 training examples), float32, on the CPU with --threads intra-op threads (1 by
default: these models are too small to gain from more, and on a shared machine more threads
made an SGD epoch of lenet5 10x slower and noisy). An epoch is one pass over the training
split in batches of 32 (43 steps), each step cross-entropy, backward and the optimizer's step.
The optimizers, all with lr 0.05:

- SGD: ``torch.optim.SGD``, momentum 0 (the baseline).
- SVRG, LP-SVRG (master fixed(8,6)), HALP (8 bits, mu 1: with mu 0.1 lenet5's loss
  oscillates): T = one epoch, so every epoch starts with a full gradient over the training
  split (6 batches of 256, ``full_grad=`` a list of batches with ``grad_fn=``), and every step
  evaluates the batch gradient twice (at w and at the anchor). The full gradient pass is part
  of the epoch's time: an epoch computes 2 * 1347 + 1347 example gradients to SGD's 1347, so
  the variance-reduced optimizers cost about 3x SGD before any overhead of their own (less
  where the full pass's batches of 256 run more efficiently than batches of 32).
- LP-SGD: ``LowPrecisionOptimizer`` around the baseline's SGD (momentum 0, so the ratio is the
  wrapper's rounding alone; with momentum 0.9 lenet5's training loss turned NaN within 12
  epochs), master fixed(8,6).
- SWALP: that LP-SGD, its iterate averaged once an epoch.

Low-precision variants round stochastically. Every variant trains its own copy of the same
initial model on the same batches in the same order. Epoch 0 is a warm-up, untimed; then for
--repeats rounds every variant trains that round's epoch, the variants taking turns in an order
rotated each round, so drift of a shared machine reaches all of them alike. Reported: the
median seconds per epoch, the median over rounds of each round's time / SGD's time in that
round, and the training loss over the whole split after the last epoch (a check that every
variant trained: a step with non-finite gradients is skipped, which would make it cheap).

Bar (issue): one HALP epoch <= 3x one SGD epoch, on both models.
"""
from __future__ import annotations

import argparse
import copy
import functools
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mpcompile.formats import parse
from mpcompile.models import build_model
from mpcompile.policy import OptimizerSettings
from mpcompile.runtime.data import Dataset, batches, load_dataset
from mpcompile.runtime.optim import HALP, LPSVRG, SVRG, SWALP, LowPrecisionOptimizer, VarianceReduced

Batch = tuple[torch.Tensor, torch.Tensor]
Optimizer = torch.optim.Optimizer | LowPrecisionOptimizer
MakeOptimizer = Callable[[nn.Module, list[Batch], int], Optimizer]  # (model, full-gradient batches, T)

LR = 0.05
BATCH, FULL_BATCH = 32, 256
MASTER = "fixed(8,6)"
BAR = 3.0  # HALP epoch / SGD epoch


def loss_backward(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The batch's mean cross-entropy, ``backward`` called on it."""
    x, y = batch
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss


def sgd(model: nn.Module, full: list[Batch], T: int) -> Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR)


def svrg(model: nn.Module, full: list[Batch], T: int) -> Optimizer:
    return SVRG(model.parameters(), LR, T, full, grad_fn=functools.partial(loss_backward, model))


def lpsvrg(model: nn.Module, full: list[Batch], T: int) -> Optimizer:
    return LPSVRG(model.parameters(), LR, T, full, parse(MASTER), grad_fn=functools.partial(loss_backward, model),
                  rounding="stochastic")


def halp(model: nn.Module, full: list[Batch], T: int) -> Optimizer:
    return HALP(model.parameters(), LR, T, full, 1.0, 8, grad_fn=functools.partial(loss_backward, model),
                rounding="stochastic")


def lpsgd(model: nn.Module, full: list[Batch], T: int) -> Optimizer:
    settings = OptimizerSettings(master=parse(MASTER), update_rounding="stochastic")
    return LowPrecisionOptimizer(torch.optim.SGD(model.parameters(), lr=LR), settings)


def swalp(model: nn.Module, full: list[Batch], T: int) -> Optimizer:
    return SWALP(lpsgd(model, full, T), start=0, every=T)


VARIANTS: dict[str, MakeOptimizer] = {"SGD": sgd, "SVRG": svrg, f"LP-SVRG {MASTER}": lpsvrg,
                                      "HALP 8 bits": halp, "SWALP": swalp, f"LP-SGD {MASTER}": lpsgd}
BASELINE, HALP_NAME = "SGD", "HALP 8 bits"


def epoch_runner(model: nn.Module, optimizer: Optimizer) -> Callable[[list[Batch]], None]:
    """A function training ``model`` with ``optimizer`` over one epoch's batches: ``step(closure)``
    for the variance-reduced optimizers, zero_grad / backward / ``step()`` for the others."""
    model.train()
    closure_steps = isinstance(optimizer, VarianceReduced)

    def run(epoch: list[Batch]) -> None:
        for batch in epoch:
            if closure_steps:
                optimizer.step(functools.partial(loss_backward, model, batch))
            else:
                optimizer.zero_grad(set_to_none=True)
                loss_backward(model, batch)
                optimizer.step()
    return run


def interleaved_times(runners: dict[str, Callable[[list[Batch]], None]],
                      epochs: list[list[Batch]]) -> dict[str, list[float]]:
    """Seconds of each runner's epochs 1.. (epoch 0 untimed); in round r the runners take turns
    starting from the r-th, so none is always first or last."""
    names = list(runners)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r, epoch in enumerate(epochs):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            runners[name](epoch)
            if r:
                times[name].append(time.perf_counter() - start)
    return times


@torch.no_grad()
def full_loss(model: nn.Module, full: list[Batch]) -> float:
    """Mean cross-entropy over the batches of ``full``."""
    total = sum(F.cross_entropy(model(x), y, reduction="sum").item() for x, y in full)
    return total / sum(len(y) for _, y in full)


def bench_model(name: str, model: nn.Module, data: Dataset, repeats: int) -> None:
    """Time one epoch of every variant on ``model`` and print the table and the bar line."""
    epochs = [list(batches(data, "train", BATCH, shuffle=True, seed=0, epoch=e)) for e in range(repeats + 1)]
    full = list(batches(data, "train", FULL_BATCH, shuffle=False, seed=0, epoch=0))
    steps = len(epochs[0])
    models = {v: copy.deepcopy(model) for v in VARIANTS}
    runners = {v: epoch_runner(models[v], make(models[v], full, steps)) for v, make in VARIANTS.items()}
    times = interleaved_times(runners, epochs)
    base = times[BASELINE]
    ratios = {v: statistics.median(t / b for t, b in zip(times[v], base)) for v in VARIANTS}

    params = sum(p.numel() for p in model.parameters())
    print(f"{name} ({params} parameters): {steps} steps of {BATCH} per epoch, full gradient {len(full)} batches "
          f"of {FULL_BATCH}")
    print(f"  {'optimizer':20s} {'s / epoch':>10s} {'x SGD':>7s} {'train loss':>11s}")
    for v in VARIANTS:
        print(f"  {v:20s} {statistics.median(times[v]):10.4f} {ratios[v]:7.2f} {full_loss(models[v], full):11.4f}")
    verdict = "met" if ratios[HALP_NAME] <= BAR else "MISSED"
    print(f"  HALP / SGD <= {BAR:g}x: {verdict} ({ratios[HALP_NAME]:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21,
                        help="timed epochs per variant (median; 21: on a shared 2-core machine 11 left HALP's ratio +-0.15)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    data = load_dataset("digits")
    print(f"digits, float32, CPU threads: {torch.get_num_threads()}, lr {LR}; median of {args.repeats} epochs "
          f"after a warm-up epoch, variants interleaved;\n"
          f"x SGD: median over rounds of the epoch's time / SGD's epoch in the same round")
    torch.manual_seed(0)
    for name, model in (("logreg", build_model("logreg", num_classes=10, in_features=64)),
                        ("lenet5", build_model("lenet5", num_classes=10, in_channels=1, image_size=8))):
        bench_model(name, model, data, args.repeats)


if __name__ == "__main__":
    main()
