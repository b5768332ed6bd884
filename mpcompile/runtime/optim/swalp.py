"""SWALP (Yang, Zhang, Kirichenko, Bai, Wilson, De Sa 2019, "SWALP: Stochastic Weight Averaging
in Low-Precision Training"): average the iterates of low-precision SGD in high precision.

The iterates w_t come from any optimizer, usually LP-SGD (a ``LowPrecisionOptimizer`` with a
low-precision ``master`` and stochastic rounding); from step ``start`` on, every ``every`` steps

    w_swa <- (n w_swa + w_t) / (n + 1),   n <- n + 1

in fp32 (or the parameters' dtype where it is wider). Averaging cancels much of the rounding
noise of the iterates; batch-norm statistics belong to the weights they were measured with, so
``averaged`` recomputes them for the average.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from ..distributed.sharded_state import shard_like
from .low_precision import LowPrecisionOptimizer

__all__ = ["SWALP"]


class SWALP(torch.optim.Optimizer):
    """Stochastic weight averaging around an optimizer (equations in the module docstring).

    Args:
        optimizer: the optimizer whose iterates are averaged (its parameter groups are this one's).
        start: the step after which averaging starts (0: from the first step on).
        every: steps between averaged iterates (>= 1).
    """

    def __init__(self, optimizer: LowPrecisionOptimizer | torch.optim.Optimizer, start: int, every: int):
        if not isinstance(start, int) or start < 0:
            raise ValueError(f"start {start} must be a non-negative integer (steps)")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every {every} must be a positive integer (steps)")
        self.optimizer, self.start, self.every = optimizer, start, every
        super().__init__(optimizer.param_groups, {})
        self.param_groups = optimizer.param_groups
        self.steps, self.averaged_count = 0, 0
        self.average: list[torch.Tensor] = [
            torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) for p in self._params()]

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def unpack_weights(self) -> None:
        """The iterates' packed weights decoded (``LowPrecisionOptimizer.unpack_weights``)."""
        if isinstance(self.optimizer, LowPrecisionOptimizer):
            self.optimizer.unpack_weights()

    @torch.no_grad()
    def step(self, closure=None) -> Any:  # type: ignore[override]
        """The optimizer's step, then the average where this step is one to average."""
        loss = self.optimizer.step() if closure is None else self.optimizer.step(closure)
        self.steps += 1
        if self.steps >= self.start and (self.steps - self.start) % self.every == 0:
            n = self.averaged_count
            self.unpack_weights()
            for avg, p in zip(self.average, self._params()):
                avg.mul_(n / (n + 1)).add_(p.to(avg.dtype), alpha=1 / (n + 1))
            self.averaged_count += 1
        return loss

    @contextlib.contextmanager
    def averaged(self, model: nn.Module | None = None, loader: Iterable | None = None) -> Iterator[None]:
        """Inside, the parameters hold the average; with ``model`` and ``loader``, its batch
        norms hold statistics recomputed for the average over ``loader`` (torch's ``update_bn``).
        Parameters and statistics are put back on exit.

        Raises:
            RuntimeError: no iterate has been averaged yet.
            ValueError: batch norms to recompute in a model captured by torch.export, whose graph
                fixes their momentum (``update_bn`` needs a cumulative average).
        """
        if not self.averaged_count:
            raise RuntimeError(f"no iterate averaged yet: averaging starts at step {self.start} (now {self.steps})")
        params = self._params()
        self.unpack_weights()
        norms = [m for m in (model.modules() if model is not None else ()) if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if norms and loader is not None and getattr(model, "capture", None) == "export":
            raise ValueError("SWALP.averaged: this model was captured by torch.export, whose graph fixes batch norm's "
                             "momentum, so its statistics cannot be recomputed through it; pass the source model "
                             "(compiled.source) to recompute them in its own arithmetic, or an fx-captured model")
        kept = [p.detach().clone() for p in params]
        buffers = [{k: b.clone() for k, b in m.named_buffers(recurse=False)} for m in norms]
        with torch.no_grad():
            for p, avg in zip(params, self.average):
                p.copy_(avg)
        try:
            if norms and loader is not None:
                torch.optim.swa_utils.update_bn(loader, model, device=params[0].device)
            yield
        finally:
            with torch.no_grad():
                for p, w in zip(params, kept):
                    p.copy_(w)
                for m, saved in zip(norms, buffers):
                    for k, b in saved.items():
                        getattr(m, k).copy_(b)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "average": [a.clone() for a in self.average],
                "averaged_count": self.averaged_count, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        for avg, saved in zip(self.average, state["average"]):
            avg.copy_(shard_like(saved, avg))  # whole in a checkpoint of FSDP2's shards
        self.averaged_count, self.steps = state["averaged_count"], state["steps"]
