"""One run of a sweep: a model trained in one precision, one mode, one seed; timed and scored.

Timing is wall time of training alone. A network first takes ``WARMUP_STEPS`` steps on a copy
of itself and of its optimizer (allocations, lazy initialisation and, emulated, the graph's
first calls happen there); its training time then covers the epochs' steps, not the test
evaluations after each epoch, which give the time to the target score (the training time up to
the first epoch whose score reaches it). On CUDA every timer synchronizes first. Compiling a
network under its policy (emulated) is timed apart, as ``prepare_seconds``.
"""
from __future__ import annotations

import contextlib
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
from .native import NativePlan, native_plan
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
            device: torch.device, *, plan: NativePlan | None = None) -> Outcome:
    """Train ``model`` on ``data`` in ``precision`` run as ``mode``, with ``seed``.

    A solver computes on the CPU whatever ``device`` is (its split search and factorisations
    are many small steps).

    Args:
        plan: how a network runs natively (default: ``native_plan``, the device's way).

    Raises:
        NotImplementedError, RuntimeError: what torch raises where it cannot compute in the
            precision (the caller records it as unsupported).
    """
    if isinstance(model.trainer, Network):
        plan = (plan or native_plan(precision, device)) if mode == "native" else None
        if mode == "native" and plan is None:
            raise NotImplementedError(f"{precision.name} has no native dtype or fp8 GEMMs on {device}")
        return _train_network(model, model.trainer, data, precision, plan, seed, device)
    if mode == "native" and precision.dtype is None:
        raise NotImplementedError(f"{precision.name} natively is fp8 GEMMs, for networks; a solver has no fp8 arithmetic")
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


def _train_network(model: SweepModel, net: Network, data: SweepData, precision: Precision, plan: NativePlan | None,
                   seed: int, device: torch.device) -> Outcome:
    """Native where ``plan`` is given, else emulated under the precision's policy."""
    data = data.standardized() if net.standardize else data
    x_train, x_test = data.x_train.to(device, torch.float32), data.x_test.to(device, torch.float32)
    y_train, y_test = data.y_train.to(device), data.y_test.to(device)
    if model.metric == "r2":  # standardized targets: the loss stays O(1) in any precision; R2 is unchanged
        mean, std = y_train.mean(), y_train.std()
        y_train, y_test = (y_train - mean) / std, (y_test - mean) / std
    start = _now(device)
    torch.manual_seed(seed)
    module = net.build(data).to(device)
    notes = f"native: {plan}" if plan is not None and plan.kind != "cast" else ""
    if plan is not None:
        module, x_train = plan.prepare(module, x_train)
        x_test = x_test.to(x_train.dtype)
    else:
        module = compile_model(module, precision.policy, (x_train[:2],))
        settings = module.policy.optimizer
        if not any(a.quantizes for a in module.assignments().values()) and settings.master is settings.momentum is None:
            notes = f"fp32: policy {module.policy.name} quantizes no op of this model"
    prepare = _now(device) - start
    optimizer = _optimizer(module, net, plan is not None, len(x_train), seed)
    order = torch.Generator().manual_seed(seed)
    steps = math.ceil(len(x_train) / net.batch_size)
    forward = plan.forward if plan is not None else lambda device: contextlib.nullcontext()

    def step(m: nn.Module, opt, scaler, batch: torch.Tensor, lr: float) -> float:
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        with forward(device):
            loss = network_loss(net.loss, m(x_train[batch]), y_train[batch])
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        return float(loss.detach())

    scaler = plan.scaler(device) if plan is not None else None
    warm = copy.deepcopy(module)
    warm_opt = _optimizer(warm, net, plan is not None, len(x_train), seed)
    warm_scaler = plan.scaler(device) if plan is not None else None
    for i in range(WARMUP_STEPS):
        batch = torch.arange(i * net.batch_size, (i + 1) * net.batch_size, device=device) % len(x_train)
        step(warm, warm_opt, warm_scaler, batch, net.lr)
    del warm, warm_opt
    trained, to_target, losses = 0.0, None, []
    for epoch in range(net.epochs):
        module.train()
        start, losses = _now(device), []
        for i, batch in enumerate(torch.randperm(len(x_train), generator=order).split(net.batch_size)):
            t = (epoch * steps + i) / (net.epochs * steps)
            losses.append(step(module, optimizer, scaler, batch.to(device), net.lr * (1 + math.cos(math.pi * t)) / 2))
        trained += _now(device) - start
        module.eval()
        with torch.no_grad(), forward(device):
            value = score(model.metric, module(x_test), y_test)
        if to_target is None and value >= model.target:
            to_target = trained
    final = sum(losses) / len(losses)
    if not math.isfinite(final):
        notes = "; ".join(filter(None, [notes, "diverged: the training loss is not finite"]))
    return Outcome(value, trained, to_target, prepare, net.epochs, final, notes)


def _optimizer(module: nn.Module, net: Network, native: bool, n: int, seed: int):
    """SGD with momentum 0.9 and the L2 penalty; emulated, under the policy's optimizer section
    (formats of the weights and momentum)."""
    decay = 0.0 if net.l2_C is None else 1.0 / (net.l2_C * n)
    named = list(module.named_parameters())
    penalized = [p for name, p in named if net.penalize_bias or not name.endswith("bias")]
    rest = [p for name, p in named if not (net.penalize_bias or not name.endswith("bias"))]
    groups = [{"params": penalized, "weight_decay": decay}, {"params": rest, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if native:
        return torch.optim.SGD(groups, lr=net.lr, momentum=0.9)
    settings = module.policy.optimizer
    return make_optimizer("sgd", groups, net.lr, settings, momentum=0.9, seed=seed, module=module)

