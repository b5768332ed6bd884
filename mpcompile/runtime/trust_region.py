"""Dynamic precision: a stochastic trust-region method that chooses both the step and the precision.

At a check (``checks_per_epoch`` times an epoch) the step ``p = -Delta d / ||d||`` (``d`` the
gradient, or the momentum direction) predicts the decrease ``pred = -g . p`` of the linear model
``f + g . p``. If the loss's error at the current precision is not below ``eta1 * pred / 2``, no
decrease can be certified there: the controller raises precision (the objective recompiles),
evaluates again and takes no step at the lower precision; at the top of the ladder it steps
anyway and records the check as unmet. Otherwise ``rho = (f(x) - f(x + p)) / pred`` on the same
batch at the same precision decides: ``rho >= eta2`` accepts and doubles Delta (up to
``delta_max``), ``eta1 <= rho < eta2`` accepts, ``rho < eta1`` restores the parameters bit for bit
and halves Delta. Between checks the controller takes plain steps of length Delta (the
non-monotone stochastic practice). Why ``eta1 * pred / 2``: if ``|f^ - f| <= eps`` at both points,
an accepted step decreases the true loss by at least ``eta1 * pred - 2 * eps > 0``.

``mp_sgd`` is the first-order rule instead: SGD steps ``-lr * d``, and precision is raised when
``eps > lr * eta / 2 * ||g||^2`` (the predicted decrease of that step is ``lr * ||g||^2``).

Sources: Gratton & Toint, arXiv 1812.03467; Conn, Gould, Toint, Trust-Region Methods, 10.6.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Protocol, Sequence

import torch

from ..policy import TrustRegionSettings

__all__ = ["Objective", "Check", "TrustRegion", "check_record"]


class Objective(Protocol):
    """What the controller asks of a model: losses at the current precision, their error, the ladder."""

    params: Sequence[torch.Tensor]

    def loss_and_grad(self, batch: Any) -> tuple[float, list[torch.Tensor]] | None:
        """The loss at the current precision and its gradient; None when the step must be skipped
        (a gradient overflowed, or the loss is not finite)."""

    def loss(self, batch: Any) -> float:
        """The loss at the current precision, without a gradient."""

    def error(self, batch: Any) -> float:
        """eps: a bound on (or a measure of) |loss at this precision - exact loss|."""

    def error_lower(self, batch: Any) -> float | None:
        """eps one step down the ladder (None at the bottom)."""

    def raise_precision(self) -> bool:
        """Move up the ladder; False at the top."""

    def lower_precision(self) -> bool:
        """Move down the ladder; False at the bottom."""

    def after_update(self) -> None:
        """Called after the parameters change (e.g. to round them to a master format)."""

    @property
    def level(self) -> str:
        """The current level, for the records."""


@dataclass
class Check:
    """One check of the criterion (a row of the run's record)."""

    iteration: int
    level: str
    delta: float
    pred: float
    eps: float
    rho: float | None  # None: no trial step (the level was raised instead, or mp_sgd)
    accepted: bool
    raised: bool  # the criterion failed and precision went up: no step; a new record follows at the new level
    lowered: bool
    criterion_met: bool
    loss: float


class TrustRegion:
    """The controller. ``step(batch)`` is one iteration.

    Args:
        objective: the model and its ladder (``ModelObjective``, or a synthetic one in tests).
        settings: the policy's ``trust_region:`` section.
        steps_per_epoch: iterations in an epoch (checks are spread evenly over it).
        lr: the step size of ``mp_sgd``.
        on_check: called with each ``Check`` as it is made.
    """

    def __init__(self, objective: Objective, settings: TrustRegionSettings, *, steps_per_epoch: int,
                 lr: float = 0.0, on_check: Callable[[Check], None] | None = None):
        if settings.method == "mp_sgd" and not lr > 0:
            raise ValueError(f"mp_sgd takes SGD steps of size lr: give a positive lr, got {lr}")
        self.objective, self.settings, self.lr, self.on_check = objective, settings, lr, on_check
        self.interval = max(1, steps_per_epoch // settings.checks_per_epoch)
        self.delta = settings.delta0
        self.iteration = 0
        self.momentum: list[torch.Tensor] | None = None
        self.checks_made = 0
        self.unmet = 0
        self.safe_streak = 0
        self._eps: float | None = None
        self._eps_age = 0

    # -- one iteration ----------------------------------------------------------------------
    def step(self, batch: Any) -> tuple[float, bool]:
        """Train on ``batch``; returns (loss at the precision stepped at, skipped)."""
        check = self.iteration % self.interval == 0
        self.iteration += 1
        while True:
            out = self.objective.loss_and_grad(batch)
            if out is None:
                return math.nan, True
            f, grads = out
            grads = self._regularised(grads)
            direction = self._direction(grads)
            scale = self._step_length(grads, direction)
            if scale is None:  # a zero gradient: nothing to do
                return f, False
            pred = scale * float(sum((g * d).sum() for g, d in zip(grads, direction)))
            if pred <= 0 and direction is not grads:  # momentum points uphill here: use the gradient
                direction = grads
                scale = self._step_length(grads, direction)
                pred = scale * float(sum(g.square().sum() for g in grads))
            if not check:
                self._move(direction, scale)
                return f, False
            eps = self._error(batch)
            threshold = self._threshold(pred, grads)
            met = eps < threshold
            level = self.objective.level
            if not met and self.objective.raise_precision():
                self._eps = None
                self._record(Check(self.iteration, level, self.delta, pred, eps, None, False, True, False, False, f))
                continue  # evaluate again at the higher precision; no step at the lower one
            break
        self.checks_made += 1
        self.unmet += not met
        if self.settings.method == "mp_sgd":
            self._move(direction, scale)
            rho, accepted = None, True
        else:
            saved = [p.detach().clone() for p in self.objective.params]
            self._move(direction, scale, commit=False)
            rho = (f - self.objective.loss(batch)) / pred
            accepted = rho >= self.settings.eta1
            if accepted:
                self._commit_momentum(direction)
                self.delta = min(2 * self.delta, self.settings.delta_max) if rho >= self.settings.eta2 else self.delta
            else:
                with torch.no_grad():
                    for p, s in zip(self.objective.params, saved):
                        p.copy_(s)
                self.delta /= 2
        lowered = met and self._maybe_lower(batch, threshold)
        self._record(Check(self.iteration, self.objective.level, self.delta, pred, eps, rho, accepted, False,
                           lowered, met, f))
        return f, False

    # -- pieces -----------------------------------------------------------------------------
    def _regularised(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        wd = self.settings.weight_decay
        return [g + wd * p.detach() for g, p in zip(grads, self.objective.params)] if wd else grads

    def _direction(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        mu = self.settings.momentum
        if not mu or self.momentum is None:
            return grads
        return [mu * m + g for m, g in zip(self.momentum, grads)]

    def _step_length(self, grads, direction) -> float | None:
        """The factor s of the step ``-s * direction`` (None when it is zero)."""
        if self.settings.method == "mp_sgd":
            return self.lr
        norm = math.sqrt(sum(float(d.square().sum()) for d in direction))
        return self.delta / norm if norm > 0 else None

    def _threshold(self, pred: float, grads) -> float:
        if self.settings.method == "mp_sgd":
            return self.lr * self.settings.eta / 2 * sum(float(g.square().sum()) for g in grads)
        return self.settings.eta1 * pred / 2

    def _move(self, direction, scale: float, *, commit: bool = True) -> None:
        with torch.no_grad():
            for p, d in zip(self.objective.params, direction):
                p.sub_(d, alpha=scale)
        self.objective.after_update()
        if commit:
            self._commit_momentum(direction)

    def _commit_momentum(self, direction) -> None:
        """The direction of a step taken becomes the momentum (heavy ball: mu * m + g)."""
        if self.settings.momentum:
            self.momentum = [d.detach().clone() for d in direction]

    def _error(self, batch) -> float:
        if self._eps is None or self._eps_age >= self.settings.refresh:
            self._eps, self._eps_age = self.objective.error(batch), 0
        self._eps_age += 1
        return self._eps

    def _maybe_lower(self, batch, threshold: float) -> bool:
        """Step down once the level below has been safe, with margin, for ``lower_patience`` checks."""
        if not self.settings.lower_when_safe:
            return False
        eps = self.objective.error_lower(batch)
        self.safe_streak = self.safe_streak + 1 if eps is not None and eps < self.settings.lower_margin * threshold else 0
        if self.safe_streak < self.settings.lower_patience or not self.objective.lower_precision():
            return False
        self.safe_streak, self._eps = 0, None
        return True

    def _record(self, check: Check) -> None:
        if self.on_check is not None:
            self.on_check(check)

    # -- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"delta": self.delta, "iteration": self.iteration, "momentum": self.momentum,
                "checks_made": self.checks_made, "unmet": self.unmet, "safe_streak": self.safe_streak,
                "eps": self._eps, "eps_age": self._eps_age}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.delta, self.iteration, self.momentum = state["delta"], state["iteration"], state["momentum"]
        self.checks_made, self.unmet, self.safe_streak = state["checks_made"], state["unmet"], state["safe_streak"]
        self._eps, self._eps_age = state["eps"], state["eps_age"]


def check_record(check: Check) -> dict[str, Any]:
    """A check as a JSON-able dict (``metrics.jsonl``)."""
    return {"check": check.iteration, **{k: v for k, v in asdict(check).items() if k != "iteration"}}
