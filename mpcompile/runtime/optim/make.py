"""The optimizer a policy's ``optimizer:`` section (and the trainer) asks for, built."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import torch

from ...errors import MpcompileError, PolicyError
from ...policy import OPTIMIZER_KINDS, OptimizerSettings
from ...policy.schema import OPTIMIZER_KEY_KINDS
from .full_gradient import FullGradient
from .halp import HALP
from .low_precision import LowPrecisionOptimizer
from .svrg import LPSVRG, SVRG
from .swalp import SWALP

__all__ = ["make_optimizer", "optimizer_kind", "OPTIMIZERS", "VARIANCE_REDUCED"]

OPTIMIZERS = OPTIMIZER_KINDS
VARIANCE_REDUCED = ("svrg", "lpsvrg", "halp")  # they take step(closure) and need the full gradient


def optimizer_kind(name: str | None, settings: OptimizerSettings) -> str:
    """The kind that trains: ``name`` (a caller's choice, e.g. ``--optimizer``), the policy's
    ``kind``, or ``sgd``; a choice that contradicts the policy is an error."""
    if name is not None and settings.kind is not None and name != settings.kind:
        raise MpcompileError(f"the policy's optimizer section is for kind {settings.kind}, but {name} was asked for; "
                             f"drop the choice or use a policy for {name}")
    kind = name or settings.kind or "sgd"
    if kind not in OPTIMIZERS:
        raise MpcompileError(f"unknown optimizer {kind!r}; choose one of {', '.join(OPTIMIZERS)}")
    return kind


def _check_keys(kind: str, settings: OptimizerSettings) -> None:
    """Settings the kind would not read are refused (the parser does this for YAML)."""
    for field in dataclasses.fields(settings):
        kinds = OPTIMIZER_KEY_KINDS.get(field.name)
        if kinds and kind not in kinds and getattr(settings, field.name) != field.default:
            raise PolicyError(f"optimizer.{field.name} is not read by kind {kind} (only by {', '.join(kinds)}); drop it")
    if kind == "lpsvrg" and settings.master is None:
        raise PolicyError("optimizer kind lpsvrg needs optimizer.master, the weights' format; with fp32 weights it is svrg")
    if kind == "halp" and settings.mu is None:
        raise PolicyError("optimizer kind halp needs optimizer.mu (> 0), the strong-convexity constant of its scale")


def make_optimizer(name: str | None, params: Iterable[torch.nn.Parameter], lr: float,
                   settings: OptimizerSettings = OptimizerSettings(), *, momentum: float = 0.9, seed: int = 0,
                   steps_per_epoch: int | None = None, full_grad: FullGradient | None = None,
                   grad_fn: Callable[[Any], Any] | None = None,
                   module: torch.nn.Module | None = None) -> torch.optim.Optimizer | LowPrecisionOptimizer:
    """The optimizer of kind ``name`` (``optimizer_kind``) over ``params``, with ``settings``.

    Args:
        name: one of ``OPTIMIZERS``, or None for the policy's ``kind`` (else ``sgd``).
        params: the parameters (a CompiledModel's survive recompile: they are the same objects).
        lr: learning rate (> 0).
        settings: the policy's ``optimizer:`` section.
        momentum: SGD's (and SWALP's SGD's) momentum.
        seed: seed of the stochastic rounding.
        steps_per_epoch: converts periods given in epochs (``T``, ``swa_start``, ``swa_every``).
        full_grad, grad_fn: the full gradient of svrg, lpsvrg and halp (``full_gradient``).
        module: the module that reads ``params``, for weights stored packed (``LowPrecisionOptimizer``).
    """
    if not lr > 0:
        raise MpcompileError(f"learning rate {lr} must be positive")
    kind = optimizer_kind(name, settings)
    _check_keys(kind, settings)
    steps = lambda period, key: _steps(period, key, steps_per_epoch)  # noqa: E731
    if kind in VARIANCE_REDUCED:
        if full_grad is None:
            raise PolicyError(f"optimizer kind {kind} needs data for its full gradient: give full_grad= (a data "
                              f"loader with grad_fn=, or a closure), or train with mpcompile train / Trainer")
        common = dict(grad_fn=grad_fn, weight_decay=settings.weight_decay or 0.0, rounding=settings.update_rounding,
                      seed=seed)
        T = steps(settings.T, "T")
        if kind == "svrg":
            return SVRG(params, lr, T, full_grad, **common)
        if kind == "lpsvrg":
            return LPSVRG(params, lr, T, full_grad, settings.master, **common)
        return HALP(params, lr, T, full_grad, settings.mu, settings.bits, **common)
    if kind in ("sgd", "swalp"):
        inner = torch.optim.SGD(params, lr=lr, momentum=momentum)
    elif kind == "adam":
        inner = torch.optim.Adam(params, lr=lr)
    else:
        inner = torch.optim.AdamW(params, lr=lr)
    optimizer = LowPrecisionOptimizer(inner, settings, seed=seed, module=module)
    if kind == "swalp":
        return SWALP(optimizer, steps(settings.swa_start, "swa_start"), steps(settings.swa_every, "swa_every"))
    return optimizer


def _steps(period, key: str, steps_per_epoch: int | None) -> int:
    if period.unit == "epochs" and steps_per_epoch is None:
        raise PolicyError(f"optimizer.{key} is {period}: give steps_per_epoch, or the period in steps")
    return period.steps(steps_per_epoch)
