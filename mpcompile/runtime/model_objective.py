"""A compiled model on a loss, with its policy's level ladder: the trust-region controller's objective.

Precision moves by ``CompiledModel.recompile(level=...)``: in place, the parameters and
everything the controller holds are kept. With ``per_layer`` each op has its own level and a
raise moves up only the op with the largest estimated share of the loss error, kappa * u
(``CompiledModel.error_terms``); a lowering undoes the latest raise.

eps, the error of the loss at the current precision: ``measured`` is |loss - fp32 loss| on the
batch, the fp32 loss from the original model (it shares the parameters); ``bound`` is a
first-order estimate, |loss| * sum over ops of kappa * u (kappa the op's median condition number
from calibration, 1 where there is none; u the largest unit roundoff its forward pass rounds
with). The bound counts one rounding per op and no growth with the reduction length: an
estimate to rank levels by, not a rigorous bound.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import torch
import torch.nn as nn

from ..compiler import CompiledModel
from ..errors import MpcompileError
from ..policy import OptimizerSettings, TrustRegionSettings
from .optim import StoredRounding
from .scaling import LossScaler

__all__ = ["ModelObjective"]


class ModelObjective:
    """``compiled`` trained on ``loss_fn`` as a ``trust_region.Objective``.

    Args:
        compiled: the model; its policy's ``levels`` are the ladder.
        reference: the original (fp32) model, whose parameters ``compiled`` shares.
        loss_fn: ``loss_fn(output, target)``; a batch is ``(input, target)``.
        scaler: the loss scaler of the gradients.
        settings: the ``trust_region:`` section.
        optimizer: the ``optimizer:`` section: ``gradient`` and ``master`` formats apply; the
            controller keeps its momentum itself, so ``momentum`` / ``second_moment`` formats are refused.
        seed: seed of stochastic update rounding.
    """

    def __init__(self, compiled: CompiledModel, reference: nn.Module, loss_fn: Callable, scaler: LossScaler,
                 settings: TrustRegionSettings, optimizer: OptimizerSettings = OptimizerSettings(), *, seed: int = 0):
        if optimizer.momentum is not None or optimizer.second_moment is not None:
            raise MpcompileError(f"{compiled.policy.source}: trust_region keeps its momentum in fp32 itself; "
                                 f"optimizer.momentum / second_moment formats would not be applied: drop them")
        self.compiled, self.reference, self.loss_fn, self.scaler = compiled, reference, loss_fn, scaler
        self.settings, self.optimizer = settings, optimizer
        self.params = [p for p in compiled.parameters() if p.requires_grad]
        self._round = StoredRounding(optimizer.update_rounding, seed)
        self.names = [lv.name for lv in compiled.policy.levels] or ["level 0"]
        self.top = len(self.names) - 1
        ops = list(compiled.assignments())
        current = compiled.level
        if settings.per_layer:
            start = current if isinstance(current, dict) else dict.fromkeys(ops, current)
            self.levels: int | dict[str, int] = {op: compiled.policy.level_index(start.get(op, 0)) for op in ops}
        else:
            if isinstance(current, dict):
                raise MpcompileError("per-op levels need trust_region.per_layer: true")
            self.levels = compiled.policy.level_index(current)
        self.raised: list[str] = []  # per_layer: ops in the order they were raised
        self.raised_last: str | None = None  # per_layer: the op the latest lowering moved down
        self.recompiles, self.recompile_seconds = 0, 0.0
        self.nan_loss_steps, self.last_correct, self._last_loss = 0, 0, None

    # -- losses -----------------------------------------------------------------------------
    def loss_and_grad(self, batch: Any) -> tuple[float, list[torch.Tensor]] | None:
        x, y = batch
        for p in self.params:
            p.grad = None
        out = self.compiled(x)
        loss = self.loss_fn(out, y)
        if not torch.isfinite(loss):  # the forward overflowed: no gradient to scale, so the scale stays
            self.nan_loss_steps += 1
            return None
        if self.scaler.backward(loss, self.params, self.optimizer.gradient):
            return None
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach() for p in self.params]
        if self.optimizer.gradient is not None:
            grads = [self._round(g, self.optimizer.gradient) for g in grads]
        self.last_correct = int((out.argmax(1) == y).sum()) if out.dim() == 2 else 0
        self._last_loss = float(loss.detach())
        return self._last_loss, grads

    @torch.no_grad()
    def loss(self, batch: Any) -> float:
        x, y = batch
        return float(self.loss_fn(self.compiled(x), y))

    @torch.no_grad()
    def _reference_loss(self, batch: Any) -> float:
        x, y = batch
        return float(self.loss_fn(self.reference(x), y))

    def error(self, batch: Any) -> float:
        if self.settings.epsilon == "measured":
            return abs(self.loss(batch) - self._reference_loss(batch))
        f = self._last_loss if self._last_loss is not None else self.loss(batch)
        return abs(f) * sum((1.0 if kappa is None else kappa) * u for kappa, u in self.compiled.error_terms().values())

    def error_lower(self, batch: Any) -> float | None:
        if not self.lower_precision():
            return None
        try:
            return self.error(batch)
        finally:
            self.raise_precision(self.raised_last if self.settings.per_layer else None)

    # -- the ladder -------------------------------------------------------------------------
    @property
    def level(self) -> str:
        if isinstance(self.levels, int):
            return self.names[self.levels]
        return "/".join(self.names[i] for i in sorted(set(self.levels.values())))

    @property
    def level_index(self) -> int:
        """The (highest) level index: what the plots show."""
        return self.levels if isinstance(self.levels, int) else max(self.levels.values(), default=0)

    def raise_precision(self, op: str | None = None) -> bool:
        if isinstance(self.levels, int):
            if self.levels >= self.top:
                return False
            self.levels += 1
        else:
            op = op or self._worst_op()
            if op is None:
                return False
            self.levels[op] += 1
            self.raised.append(op)
        self._recompile()
        return True

    def lower_precision(self) -> bool:
        if isinstance(self.levels, int):
            if self.levels == 0:
                return False
            self.levels -= 1
        else:
            if not self.raised:
                return False
            self.raised_last = self.raised.pop()
            self.levels[self.raised_last] -= 1
        self._recompile()
        return True

    def _worst_op(self) -> str | None:
        """The op below the top with the largest kappa * u (None if no such op rounds anything)."""
        terms = self.compiled.error_terms()
        shares = {op: (1.0 if terms[op][0] is None else terms[op][0]) * terms[op][1]
                  for op, lv in self.levels.items() if lv < self.top and op in terms}
        return max(shares, key=shares.get) if shares else None

    def _recompile(self) -> None:
        start = time.perf_counter()
        self.compiled.recompile(level=self.levels if isinstance(self.levels, int) else dict(self.levels))
        self.recompile_seconds += time.perf_counter() - start
        self.recompiles += 1

    def after_update(self) -> None:
        if self.optimizer.master is not None:
            with torch.no_grad():
                for p in self.params:
                    p.copy_(self._round(p, self.optimizer.master))

    # -- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"levels": self.levels, "raised": list(self.raised), "recompiles": self.recompiles,
                "recompile_seconds": self.recompile_seconds, "nan_loss_steps": self.nan_loss_steps,
                "rounding": self._round.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.levels = state["levels"] if isinstance(state["levels"], int) else dict(state["levels"])
        self.raised, self.recompiles = list(state["raised"]), state["recompiles"]
        self.recompile_seconds, self.nan_loss_steps = state["recompile_seconds"], state["nan_loss_steps"]
        self._round.load_state_dict(state["rounding"])
        self.compiled.recompile(level=self.levels if isinstance(self.levels, int) else dict(self.levels))
