"""Optimizers whose weights, gradients and states live in number formats.

``LowPrecisionOptimizer`` wraps any ``torch.optim`` optimizer: the update itself is torch's, in
fp32, and what the optimizer keeps is rounded to the policy's ``optimizer:`` formats around it
(gradients before the step; momentum / moments and the weights themselves after). With a
low-precision ``master`` the stored weights are low precision, which is the LP-SGD / SWALP
setting; stochastic ``update_rounding`` then keeps small updates alive in expectation.
"""
from __future__ import annotations

from typing import Iterable

import torch

from ...formats import Packed, decode, encode
from ...ops.observe import notify
from ...policy import OptimizerSettings
from ...rounding import quantize

__all__ = ["StoredRounding", "LowPrecisionOptimizer"]

# torch's state names per what they are: SGD keeps momentum_buffer, Adam(W) exp_avg / exp_avg_sq.
_STATES = {"momentum_buffer": "momentum", "exp_avg": "momentum", "exp_avg_sq": "second_moment"}


class StoredRounding:
    """Rounds what an optimizer stores, with ``rounding``; stochastic rounding draws from one
    generator per device, seeded with ``seed``, whose state is checkpointed. A value beyond a
    format that has no infinity (fixed point, e4m3) saturates to its largest value, as fixed-point
    storage does; in a format with inf (bf16, e5m2) it overflows to inf.

    Args:
        rounding: a rounding mode (``update_rounding`` of the policy's optimizer section).
        seed: seed of the generators.
    """

    def __init__(self, rounding: str, seed: int):
        self.rounding, self.seed = rounding, seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def __call__(self, x: torch.Tensor, fmt, *, saturate: bool | None = None) -> torch.Tensor:
        generator = None
        if self.rounding == "stochastic":
            if x.device not in self._generators:
                self._generators[x.device] = torch.Generator(x.device).manual_seed(self.seed)
            generator = self._generators[x.device]
        if saturate is None:  # a stored value past a format without inf is clamped, not NaN (nothing recovers from it)
            saturate = not getattr(fmt, "inf", False)
        return quantize(x, fmt, self.rounding, saturate=saturate, generator=generator)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {str(d): g.get_state() for d, g in self._generators.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._generators = {}
        for device, rng in state.items():
            self._generators[torch.device(device)] = torch.Generator(device)
            self._generators[torch.device(device)].set_state(rng)


class LowPrecisionOptimizer:
    """A torch optimizer with formats for what it stores.

    Args:
        optimizer: any ``torch.optim`` optimizer over the (compiled) model's parameters.
        settings: the policy's ``optimizer:`` section.
        seed: seed of the stochastic rounding's generator (its state is checkpointed).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, settings: OptimizerSettings = OptimizerSettings(), *,
                 seed: int = 0):
        self.optimizer, self.settings, self.seed = optimizer, settings, seed
        self._round = StoredRounding(settings.update_rounding, seed)
        # storage: packed: (parameter index, state name) -> the state's codes, between steps
        self._packed: dict[tuple[int, str], Packed] = {}
        if settings.weight_decay is not None:
            for group in optimizer.param_groups:
                group["weight_decay"] = settings.weight_decay
        if settings.master is not None:  # the weights are stored in the master format from the start
            with torch.no_grad():
                for p in self._params():
                    p.copy_(self._round(p, settings.master))

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def _params(self) -> Iterable[torch.Tensor]:
        return (p for group in self.optimizer.param_groups for p in group["params"])

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        """Round the gradients, take torch's step, round the states and the weights."""
        s = self.settings
        if s.gradient is not None:
            for p in self._params():
                if p.grad is not None:
                    p.grad.copy_(self._round(p.grad, s.gradient))
        self._unpack()
        self.optimizer.step()
        for i, p in enumerate(self._params()):
            state = self.optimizer.state.get(p, {})
            for key, role in _STATES.items():
                fmt = getattr(s, role)
                if fmt is not None and isinstance(state.get(key), torch.Tensor):
                    rounded = self._round(state[key], fmt)
                    notify(role, state[key], rounded, fmt, i)
                    state[key].copy_(rounded)
                    if s.storage == "packed":  # between steps only the codes are kept
                        self._packed[i, key] = encode(state.pop(key), fmt)
            if s.master is not None:
                rounded = self._round(p, s.master)
                notify("master", p, rounded, s.master, i)
                p.copy_(rounded)

    def _unpack(self) -> None:
        """Put the packed states back as the float tensors torch's step reads."""
        params = list(self._params())
        for (i, key), packed in self._packed.items():
            fmt = getattr(self.settings, _STATES[key])
            self.optimizer.state[params[i]][key] = decode(packed, fmt, params[i].shape, params[i].dtype)
        self._packed = {}

    def state_bytes(self) -> int:
        """Bytes the optimizer's states take between steps (packed codes, or torch's tensors)."""
        tensors = [t for state in self.optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors) + sum(p.nbytes for p in self._packed.values())

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "generators": self._round.state_dict(),
                "packed": {f"{i}:{key}": (p.codes, p.scales) for (i, key), p in self._packed.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self._round.load_state_dict(state["generators"])
        self._packed = {(int(k.split(":")[0]), k.split(":")[1]): Packed(*codes)
                        for k, codes in state.get("packed", {}).items()}
