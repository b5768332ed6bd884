"""One run of a sweep: a model trained in one precision, one mode, one seed; timed and scored.

Timing is wall time of training alone. A network first takes ``WARMUP_STEPS`` steps on a copy
of itself and of its optimizer (allocations, lazy initialisation and, emulated, the graph's
first calls happen there); its training time then covers the epochs' steps, not the test
evaluations after each epoch, which give the time to the target score (the training time up to
the first epoch whose score reaches it). On CUDA every timer synchronizes first. Compiling a
network under its policy (emulated) is timed apart, as ``prepare_seconds``.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..compiler import compile as compile_model
from ..runtime.optim import make_optimizer
from .arithmetic import Arithmetic
from .data import SweepData
from .models import Network, SweepModel, network_loss, score
from .precision import Precision

__all__ = ["WARMUP_STEPS", "Outcome", "run_one"]

WARMUP_STEPS = 2


@dataclass(frozen=True)
class Outcome:
    """What one run measured.

    Attributes:
        score: accuracy or R2 on the test split.
        train_seconds: wall time of training (warm-up and evaluations excluded).
        seconds_to_target: training time until the test score first reached the model's target
            (None: never; a solver's is its training time if its score reaches it).
        prepare_seconds: building the model (compiling it, emulated), not in ``train_seconds``.
        epochs: epochs trained (0 for a solver).
        final_loss: the mean training loss of the last epoch (None for a solver).
        notes: what the reader of the results must know (a policy that quantizes nothing here).
    """

    score: float
    train_seconds: float
    seconds_to_target: float | None
    prepare_seconds: float
    epochs: int
    final_loss: float | None
    notes: str = ""


def run_one(model: SweepModel, data: SweepData, precision: Precision, mode: str, seed: int,
            device: torch.device) -> Outcome:
    """Train ``model`` on ``data`` in ``precision`` run as ``mode``, with ``seed``.

    Raises:
        NotImplementedError, RuntimeError: what torch raises where it cannot compute in the
            precision (the caller records it as unsupported).
    """
    if isinstance(model.trainer, Network):
        return _train_network(model, model.trainer, data, precision, mode, seed, device)
    arith = Arithmetic(precision.dtype) if mode == "native" else _emulating(precision)
    start = time.perf_counter()
    predict = model.trainer.fit(data, arith)
    seconds = time.perf_counter() - start
    value = score(model.metric, predict(data.x_test), data.y_test)
    return Outcome(value, seconds, seconds if value >= model.target else None, 0.0, 0, None)


def _emulating(precision: Precision) -> Arithmetic:
    if precision.fmt is None:
        raise NotImplementedError(f"{precision.name} is a policy of several formats; a solver computes in one "
                                  f"format (give one, e.g. fp8_e4m3)")
    return Arithmetic(torch.float32, precision.fmt)


def _now(device: torch.device) -> float:
    """The wall clock, once the device has finished what was queued."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _train_network(model: SweepModel, net: Network, data: SweepData, precision: Precision, mode: str, seed: int,
                   device: torch.device) -> Outcome:
    data = data.standardized() if net.standardize else data
    dtype = precision.dtype if mode == "native" else torch.float32
    x_train, x_test = data.x_train.to(device, dtype), data.x_test.to(device, dtype)
    y_train, y_test = data.y_train.to(device), data.y_test.to(device)
    if model.metric == "r2":  # standardized targets: the loss stays O(1) in any precision; R2 is unchanged
        mean, std = y_train.mean(), y_train.std()
        y_train, y_test = (y_train - mean) / std, (y_test - mean) / std
    start = _now(device)
    torch.manual_seed(seed)
    module = net.build(data).to(device, dtype)
    notes = ""
    if mode == "emulated":
        module = compile_model(module, precision.policy, (x_train[:2],))
        settings = module.policy.optimizer
        if not any(a.quantizes for a in module.assignments().values()) and settings.master is settings.momentum is None:
            notes = f"fp32: policy {module.policy.name} quantizes no op of this model"
    prepare = _now(device) - start
    optimizer = _optimizer(module, net, mode, len(x_train), seed)
    order = torch.Generator().manual_seed(seed)
    steps = math.ceil(len(x_train) / net.batch_size)

    def step(m: nn.Module, opt, batch: torch.Tensor, lr: float) -> float:
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        loss = network_loss(net.loss, m(x_train[batch]), y_train[batch])
        loss.backward()
        opt.step()
        return float(loss.detach())

    warm = copy.deepcopy(module)
    warm_opt = _optimizer(warm, net, mode, len(x_train), seed)
    for i in range(WARMUP_STEPS):
        step(warm, warm_opt, torch.arange(i * net.batch_size, (i + 1) * net.batch_size) % len(x_train), net.lr)
    del warm, warm_opt
    trained, to_target, losses = 0.0, None, []
    for epoch in range(net.epochs):
        module.train()
        start, losses = _now(device), []
        for i, batch in enumerate(torch.randperm(len(x_train), generator=order).split(net.batch_size)):
            t = (epoch * steps + i) / (net.epochs * steps)
            losses.append(step(module, optimizer, batch.to(device), net.lr * (1 + math.cos(math.pi * t)) / 2))
        trained += _now(device) - start
        value = _evaluate(module, model.metric, x_test, y_test)
        if to_target is None and value >= model.target:
            to_target = trained
    final = sum(losses) / len(losses)
    if not math.isfinite(final):
        notes = "; ".join(filter(None, [notes, "diverged: the training loss is not finite"]))
    return Outcome(value, trained, to_target, prepare, net.epochs, final, notes)


def _optimizer(module: nn.Module, net: Network, mode: str, n: int, seed: int):
    """SGD with momentum 0.9 and the L2 penalty; emulated, under the policy's optimizer section
    (formats of the weights and momentum)."""
    decay = 0.0 if net.l2_C is None else 1.0 / (net.l2_C * n)
    named = list(module.named_parameters())
    penalized = [p for name, p in named if net.penalize_bias or not name.endswith("bias")]
    rest = [p for name, p in named if not (net.penalize_bias or not name.endswith("bias"))]
    groups = [{"params": penalized, "weight_decay": decay}, {"params": rest, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if mode == "native":
        return torch.optim.SGD(groups, lr=net.lr, momentum=0.9)
    settings = module.policy.optimizer
    return make_optimizer("sgd", groups, net.lr, settings, momentum=0.9, seed=seed, module=module)


def _evaluate(module: nn.Module, metric: str, x: torch.Tensor, y: torch.Tensor) -> float:
    module.eval()
    with torch.no_grad():
        return score(metric, module(x), y)
