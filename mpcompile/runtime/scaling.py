"""Loss scaling for training with low-precision gradients, on any device and for any format.

The loss is multiplied by a scale before ``backward`` so that small gradients stay above the
underflow threshold of the gradient formats; the parameter gradients are divided by it again
before the optimizer step. A power-of-two scale adds no rounding error: multiplying and dividing
by ``2**k`` only shifts exponents, so (away from overflow and underflow) every rounded value in
the backward pass, the emulated format quantizations included, is the unscaled one times
``2**k``. All defaults are powers of two and stay so under growth and backoff; other scales are
accepted but round.

    scaler = DynamicLossScaler()
    scaler.scale(loss).backward()
    skipped = scaler.unscale_(model.parameters(), grad_format="fp8_e5m2")
    if not skipped:
        optimizer.step()
    scaler.update(skipped)
    optimizer.zero_grad()

Unlike ``torch.amp.GradScaler`` this is device-agnostic and can check the unscaled gradients
against a custom gradient format's range.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from numbers import Real
from typing import Any, Iterable, Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from ..errors import MpcompileError
from ..formats import Format, parse

__all__ = ["ScalingError", "LossScaler", "StaticLossScaler", "DynamicLossScaler", "DynamicScalingConfig",
           "make_loss_scaler"]

_ACCEPTED = ("None (no scaling), a positive number (static scale), 'dynamic', "
             "{'static': <number>}, or {'dynamic': true, <DynamicLossScaler arguments>} "
             "(or {'dynamic': false[, 'scale': <number>]})")


class ScalingError(MpcompileError, ValueError):
    """A loss-scaler setting, spec or state that cannot be used."""


def _positive(value: Any, what: str) -> float:
    """``value`` as a finite positive float, or a ScalingError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, Real) or not (0 < float(value) < math.inf):
        raise ScalingError(f"{what}={value!r} must be a finite positive number (powers of two "
                           f"keep scaling exact)")
    return float(value)


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ScalingError(f"{what}={value!r} must be a non-negative integer")
    return value


class LossScaler:
    """Shared behaviour of loss scalers: scaling, unscaling with overflow checks, counters.

    Each step: ``scale(loss).backward()``, ``skipped = unscale_(params)``, step the optimizer
    unless skipped, ``update(skipped)``. Subclasses decide in ``_adjust`` how the scale follows.
    """

    kind = ""

    def __init__(self, scale: float) -> None:
        self._scale = scale
        self._steps = 0
        self._overflow_steps = 0
        self._unscaled = False

    @property
    def scale_value(self) -> float:
        """The current scale."""
        return self._scale

    @property
    def steps(self) -> int:
        """Steps recorded by ``update``, skipped ones included."""
        return self._steps

    @property
    def overflow_steps(self) -> int:
        """Steps recorded by ``update`` as skipped for an overflow."""
        return self._overflow_steps

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss * scale``, to call ``backward`` on.

        Args:
            loss: the loss tensor.
        """
        return loss * self._scale

    def unscale_(self, params: Iterable[nn.Parameter], grad_format: Format | str | None = None) -> bool:
        """Divide every ``.grad`` by the scale in place; True if the step must be skipped.

        The division is exact for a power-of-two scale (unless a result falls below the gradient
        dtype's normal range). All gradients are divided even when the step is skipped.

        Args:
            params: parameters whose gradients to unscale (duplicates are unscaled once;
                parameters without a gradient are ignored).
            grad_format: format (or spec string) the optimizer stores gradients in: the step is
                also skipped when an unscaled |grad| exceeds its ``max``, whatever the rounding
                (under nearest rounding values slightly above max would round down to it, under
                stochastic or upward rounding they overflow). A block format's max is its
                element's max times ``2**127``, beyond fp32 for 8-bit float elements, so there
                effectively only non-finite gradients count. None checks only for inf/NaN.

        Returns:
            True if any gradient is inf/NaN or exceeds ``grad_format``'s max (for FSDP2's
            sharded gradients, DTensors: on any rank's shard, so the ranks agree).

        Raises:
            ScalingError: called again before ``update`` (the gradients would be divided twice).
        """
        if self._unscaled:
            raise ScalingError("unscale_ was already called since the last update(); call update(skipped) "
                               "after each step so gradients are not divided twice")
        limit = math.inf if grad_format is None else parse(grad_format).max
        seen: set[int] = set()
        amax: dict[torch.device, list[torch.Tensor]] = {}
        sharded = None  # FSDP2's gradient shards: their process group and device, to decide together
        for p in params:
            g = p.grad
            if g is None or id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(g, DTensor):
                sharded, g = (g.device_mesh.get_group(), g.device), g.to_local()
            g.div_(self._scale)
            if g.numel():
                amax.setdefault(g.device, []).append(g.detach().abs().amax().float())
        self._unscaled = True
        # One host sync per device; amax propagates NaN, so a non-finite maximum catches inf and NaN.
        peaks = [torch.stack(ts).amax().item() for ts in amax.values()]
        skip = any(not math.isfinite(m) or m > limit for m in peaks)
        if sharded is not None:  # a step every rank takes or skips: FSDP2's next gather waits for all of them
            flag = torch.tensor([float(skip)], device=sharded[1])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=sharded[0])
            skip = bool(flag.item())
        return skip

    def update(self, skipped: bool) -> None:
        """Record a step and adjust the scale after it.

        Args:
            skipped: whether the step was skipped (``unscale_``'s answer).
        """
        self._steps += 1
        self._overflow_steps += bool(skipped)
        self._unscaled = False
        self._adjust(bool(skipped))

    def backward(self, loss: torch.Tensor, params: Iterable[nn.Parameter],
                 grad_format: Format | str | None = None) -> bool:
        """One step's scaling in one call: ``scale(loss).backward()``, ``unscale_`` and ``update``.
        Returns ``unscale_``'s answer (True: skip the step); the gradients are left unscaled.

        Args:
            loss: the loss tensor.
            params, grad_format: as for ``unscale_``.
        """
        self.scale(loss).backward()
        skipped = self.unscale_(params, grad_format)
        self.update(skipped)
        return skipped

    def _adjust(self, skipped: bool) -> None:
        """Follow the step's outcome (nothing for a static scale)."""

    def state_dict(self) -> dict[str, Any]:
        """Everything ``load_state_dict`` needs to resume bit-identically (plain Python values)."""
        return {"kind": self.kind, "scale": self._scale, "steps": self._steps,
                "overflow_steps": self._overflow_steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state saved by ``state_dict`` of the same kind of scaler.

        Args:
            state: the saved state.

        Raises:
            ScalingError: the state is of another kind of scaler, or is incomplete or invalid.
        """
        if not isinstance(state, Mapping):
            raise ScalingError(f"load_state_dict: expected the dict state_dict() returned, got {type(state).__name__}")
        if state.get("kind") != self.kind:
            raise ScalingError(f"load_state_dict: the state is of a {state.get('kind')!r} loss scaler, this is a "
                               f"{self.kind!r} one ({type(self).__name__}); load it into the matching kind, e.g. "
                               f"make_loss_scaler({state.get('kind')!r})")
        missing = sorted(set(self.state_dict()) - set(state))
        if missing:
            raise ScalingError(f"load_state_dict: the state lacks {', '.join(missing)}; pass the whole dict "
                               f"state_dict() returned")
        self._load(state)
        self._scale = _positive(state["scale"], "scale")
        self._steps = _count(state["steps"], "steps")
        self._overflow_steps = _count(state["overflow_steps"], "overflow_steps")
        self._unscaled = False

    def _load(self, state: Mapping[str, Any]) -> None:
        """Restore what a subclass adds to the state."""

    def __repr__(self) -> str:
        state = ", ".join(f"{k}={v!r}" for k, v in self.state_dict().items() if k != "kind")
        return f"{type(self).__name__}({state})"


class StaticLossScaler(LossScaler):
    """A fixed scale; 1.0 means no scaling. Overflowing steps are still detected and counted.

    Args:
        scale: the scale (a power of two keeps scaling exact).
    """

    kind = "static"

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__(_positive(scale, "scale"))


@dataclass(frozen=True)
class DynamicScalingConfig:
    """How a ``DynamicLossScaler`` moves its scale (see there)."""

    init_scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000
    min_scale: float = 2.0**-24
    max_scale: float = 2.0**24

    def __post_init__(self) -> None:
        for f in ("init_scale", "growth_factor", "backoff_factor", "min_scale", "max_scale"):
            object.__setattr__(self, f, _positive(getattr(self, f), f))
        if self.growth_factor < 1:
            raise ScalingError(f"growth_factor={self.growth_factor} must be >= 1 (1 never grows the scale)")
        if self.backoff_factor >= 1:
            raise ScalingError(f"backoff_factor={self.backoff_factor} must be < 1 so that an overflow lowers "
                               f"the scale (e.g. 0.5)")
        if isinstance(self.growth_interval, bool) or not isinstance(self.growth_interval, int) \
                or self.growth_interval < 1:
            raise ScalingError(f"growth_interval={self.growth_interval!r} must be a positive integer "
                               f"(good steps between growths)")
        if not self.min_scale <= self.init_scale <= self.max_scale:
            raise ScalingError(f"init_scale={self.init_scale} must lie in [min_scale, max_scale] = "
                               f"[{self.min_scale}, {self.max_scale}]; move init_scale or widen the bounds")


class DynamicLossScaler(LossScaler):
    """A scale that backs off on overflow and grows after a run of good steps.

    A skipped step multiplies the scale by ``backoff_factor`` (not below ``min_scale``) and
    restarts the run; after ``growth_interval`` consecutive good steps it is multiplied by
    ``growth_factor`` (not above ``max_scale``). The power-of-two defaults keep it a power of two.

    Args:
        init_scale: the first scale.
        growth_factor: factor (>= 1) applied after ``growth_interval`` good steps.
        backoff_factor: factor (< 1) applied after a skipped step.
        growth_interval: consecutive good steps before each growth.
        min_scale, max_scale: bounds of the scale.
    """

    kind = "dynamic"

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000, min_scale: float = 2.0**-24, max_scale: float = 2.0**24) -> None:
        self.config = DynamicScalingConfig(init_scale, growth_factor, backoff_factor, growth_interval,
                                           min_scale, max_scale)
        super().__init__(self.config.init_scale)
        self._growth_tracker = 0

    @property
    def growth_tracker(self) -> int:
        """Consecutive good steps since the last growth or skip."""
        return self._growth_tracker

    def _adjust(self, skipped: bool) -> None:
        c = self.config
        if skipped:
            self._scale = max(self._scale * c.backoff_factor, c.min_scale)
            self._growth_tracker = 0
            return
        self._growth_tracker += 1
        if self._growth_tracker >= c.growth_interval:
            self._scale = min(self._scale * c.growth_factor, c.max_scale)
            self._growth_tracker = 0

    def state_dict(self) -> dict[str, Any]:
        """Everything ``load_state_dict`` needs to resume bit-identically (plain Python values)."""
        return {**super().state_dict(), "growth_tracker": self._growth_tracker, "config": asdict(self.config)}

    def _load(self, state: Mapping[str, Any]) -> None:
        config = state["config"]
        names = {f.name for f in fields(DynamicScalingConfig)}
        if not isinstance(config, Mapping) or set(config) != names:
            raise ScalingError(f"load_state_dict: config must be a dict with exactly {', '.join(sorted(names))}, "
                               f"got {config!r}")
        self.config = DynamicScalingConfig(**config)
        self._growth_tracker = _count(state["growth_tracker"], "growth_tracker")


def make_loss_scaler(spec: LossScaler | Real | str | Mapping[str, Any] | None) -> LossScaler:
    """A loss scaler from a config value.

    Args:
        spec: None (static 1.0: no scaling), a positive number (static scale), ``"dynamic"``
            (default ``DynamicLossScaler``), ``{"static": 128}``, ``{"dynamic": True, **kwargs}``
            with ``DynamicLossScaler`` keyword arguments, ``{"dynamic": False[, "scale": x]}``,
            or a ``LossScaler`` (returned as is).

    Raises:
        ScalingError: any other value; the message lists the accepted forms.
    """
    if spec is None:
        return StaticLossScaler()
    if isinstance(spec, LossScaler):
        return spec
    if isinstance(spec, Real) and not isinstance(spec, bool):
        return StaticLossScaler(spec)
    if isinstance(spec, str):
        if spec.strip().lower() == "dynamic":
            return DynamicLossScaler()
        raise ScalingError(f"loss scaling {spec!r} is not understood; accepted: {_ACCEPTED}")
    if isinstance(spec, Mapping):
        return _from_mapping(spec)
    raise ScalingError(f"loss scaling of type {type(spec).__name__} is not understood; accepted: {_ACCEPTED}")


def _from_mapping(spec: Mapping[str, Any]) -> LossScaler:
    kinds = [k for k in ("static", "dynamic") if k in spec]
    if len(kinds) != 1:
        raise ScalingError(f"loss scaling {dict(spec)!r} must have exactly one of 'static' or 'dynamic'; "
                           f"accepted: {_ACCEPTED}")
    rest = {k: v for k, v in spec.items() if k != kinds[0]}
    if kinds[0] == "static":
        if rest:
            raise ScalingError(f"loss scaling {dict(spec)!r}: 'static' takes no other keys (got "
                               f"{', '.join(map(str, rest))}); accepted: {_ACCEPTED}")
        return StaticLossScaler(spec["static"])
    dynamic = spec["dynamic"]
    if not isinstance(dynamic, bool):
        raise ScalingError(f"loss scaling {dict(spec)!r}: 'dynamic' must be true or false, got {dynamic!r}")
    allowed = {f.name for f in fields(DynamicScalingConfig)} if dynamic else {"scale"}
    unknown = sorted(map(str, set(rest) - allowed))
    if unknown:
        raise ScalingError(f"loss scaling {dict(spec)!r}: unknown key(s) {', '.join(unknown)} for "
                           f"dynamic={dynamic}; allowed: {', '.join(sorted(allowed))}")
    return DynamicLossScaler(**rest) if dynamic else StaticLossScaler(rest.get("scale", 1.0))
