"""Optimizers whose weights, gradients and states live in number formats.

``LowPrecisionOptimizer`` wraps any ``torch.optim`` optimizer: the update itself is torch's, in
fp32, and what the optimizer keeps is rounded to the policy's ``optimizer:`` formats around it
(gradients before the step; momentum / moments and the weights themselves after). With a
low-precision ``master`` the stored weights are low precision, which is the LP-SGD / SWALP
setting; stochastic ``update_rounding`` then keeps small updates alive in expectation.

A state in a block-wise codebook format (``blockwise(dynamic8,256)``, bitsandbytes' 8-bit
optimizers) is rounded only for parameters of at least ``MIN_NUMEL`` (4096) elements; smaller
ones keep float32 states, as bitsandbytes' ``min_8bit_size`` does. Packed, such states live in
one run of codes per state (``codebook_states``; plain Adam on the CPU steps them in place, by a
fused kernel: ``codebook_adam``), and the weights themselves, under a ``master`` format, as codes
between steps (``packed_weights``).
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ...errors import MpcompileError, PolicyError
from ...formats import CodebookFormat, Packed, decode, encode
from ...formats.codebook_codes import block_values
from ...ops.observe import notify, observed
from ...policy import OptimizerSettings
from ...rounding import quantize
from ..distributed.sharded_state import shard_states_like_params
from .codebook_adam import fused_segments, step_fused
from .codebook_states import MIN_NUMEL, CodebookStates
from .packed_weights import PackedWeights

__all__ = ["StoredRounding", "LowPrecisionOptimizer", "STATE_ROLES"]

# torch's state names -> the optimizer section's key that gives their format (SGD keeps
# momentum_buffer, Adam(W) exp_avg / exp_avg_sq)
STATE_ROLES = {"momentum_buffer": "momentum", "exp_avg": "momentum", "exp_avg_sq": "second_moment"}


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
        if isinstance(x, DTensor):  # an FSDP2 shard: rounded where it lives (a block format's blocks are the shard's)
            local = self(x.to_local(), fmt, saturate=saturate)
            return DTensor.from_local(local, x.device_mesh, x.placements, shape=x.shape, stride=x.stride())
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

    Under a codebook format (``blockwise(dynamic8,256)``) a state of a parameter with fewer than
    ``MIN_NUMEL`` = 4096 elements stays float32 (bitsandbytes' ``min_8bit_size``), and a parameter
    that torch did not step (no gradient) keeps its state as it was.

    Args:
        optimizer: any ``torch.optim`` optimizer over the (compiled) model's parameters.
        settings: the policy's ``optimizer:`` section.
        seed: seed of the stochastic rounding's generator (its state is checkpointed).
        module: the module whose forward reads the parameters; needed (only) to store the weights
            packed (``storage: packed`` with a ``master`` format): its hooks decode them before use.

    Raises:
        MpcompileError: packed weights without ``module``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, settings: OptimizerSettings = OptimizerSettings(), *,
                 seed: int = 0, module: nn.Module | None = None):
        self.optimizer, self.settings, self.seed = optimizer, settings, seed
        _check_codebooks(settings)
        _check_sharded(optimizer, settings)
        self._round = StoredRounding(settings.update_rounding, seed)
        # storage: packed: (parameter index, state name) -> the state's codes, between steps
        self._packed: dict[tuple[int, str], Packed] = {}
        # storage: packed, codebook formats: (state name, device) -> the run of that state's codes
        self._runs: dict[tuple[str, torch.device], CodebookStates] = {}
        if settings.weight_decay is not None:
            for group in optimizer.param_groups:
                group["weight_decay"] = settings.weight_decay
        if settings.master is not None:  # the weights are stored in the master format from the start
            with torch.no_grad():
                for p in self._params():
                    p.copy_(self._round(p, settings.master))
        self._weights: PackedWeights | None = None
        if settings.storage == "packed" and settings.master is not None:
            if module is None:
                raise MpcompileError(f"optimizer.storage: packed keeps the weights as codes of master "
                                     f"({settings.master}) between steps, decoded by hooks on the module that reads "
                                     f"them: pass module= (the model) to LowPrecisionOptimizer / make_optimizer")
            self._weights = PackedWeights(list(self._params()), settings.master, module)

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def _params(self) -> Iterable[torch.Tensor]:
        return (p for group in self.optimizer.param_groups for p in group["params"])

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def unpack_weights(self) -> None:
        """Decode packed weights into the parameters (the module's hooks do this before its
        forward); call it before reading the parameters any other way between steps."""
        if self._weights is not None:
            self._weights.unpack()

    @torch.no_grad()
    def step(self) -> None:
        """Round the gradients, take torch's step, round the states and the weights."""
        s = self.settings
        if s.gradient is not None:
            for p in self._params():
                if p.grad is not None:
                    p.grad.copy_(self._round(p.grad, s.gradient))
        self.unpack_weights()
        params = list(self._params())
        large = [i for i, p in enumerate(params) if p.numel() >= MIN_NUMEL]  # their codebook states are codes
        fused = None if observed() else fused_segments(self.optimizer, self._runs, params, large)
        self._unpack(runs=fused is None)
        if fused is None:
            self.optimizer.step()
        else:  # the runs stay codes: the fused kernel steps them
            step_fused(self.optimizer, self._runs, params, fused)
        rounded_here = [(key, role, fmt) for key, role in STATE_ROLES.items()  # codebooks: _round_codebook_states
                        if (fmt := getattr(s, role)) is not None and not isinstance(fmt, CodebookFormat)]
        for i, p in enumerate(params if rounded_here or s.master is not None else ()):
            state = self.optimizer.state.get(p, {})
            for key, role, fmt in rounded_here:
                if isinstance(state.get(key), torch.Tensor):
                    rounded = self._round(state[key], fmt)
                    notify(role, state[key], rounded, fmt, p)
                    state[key].copy_(rounded)
                    if s.storage == "packed":  # between steps only the codes are kept
                        self._packed[i, key] = encode(state.pop(key), fmt)
            if s.master is not None:
                rounded = self._round(p, s.master)
                notify("master", p, rounded, s.master, p)
                p.copy_(rounded)
        self._round_codebook_states(params, large)
        if self._weights is not None:
            self._weights.pack()

    def _round_codebook_states(self, params: list[torch.Tensor], large: list[int]) -> None:
        """Round the states whose format is a codebook format, of the parameters torch stepped
        among ``large`` (those of at least ``MIN_NUMEL`` elements); packed, encode each state's
        run at once."""
        codebooks = [(key, role, fmt) for key, role in STATE_ROLES.items()
                     if isinstance(fmt := getattr(self.settings, role), CodebookFormat)]
        if not codebooks:
            return
        stepped = {i for i in large if params[i].grad is not None}
        for key, role, fmt in codebooks:
            held: dict[torch.device, dict[int, torch.Tensor]] = {}
            for i in large:
                state = self.optimizer.state.get(params[i], {})
                if isinstance(state.get(key), torch.Tensor):
                    held.setdefault(state[key].device, {})[i] = state[key]
            for device, states in held.items():
                if self.settings.storage != "packed":
                    for i in sorted(stepped & states.keys()):
                        rounded = self._round(states[i], fmt)
                        notify(role, states[i], rounded, fmt, params[i])
                        states[i].copy_(rounded)
                    continue
                run = self._runs.get((key, device))
                if run is None or not run.repack(states, stepped):
                    run = self._runs[key, device] = CodebookStates.pack(fmt, states)
                if observed():
                    rounded = block_values(run.codes, run.absmax, fmt)
                    for seg in run.segments:
                        if seg.index in stepped:
                            view = rounded[seg.start:seg.start + seg.numel].view_as(states[seg.index])
                            notify(role, states[seg.index], view, fmt, params[seg.index])
                for i in states:
                    del self.optimizer.state[params[i]][key]

    def _unpack(self, runs: bool = True) -> None:
        """Put the packed states back as the float tensors torch's step reads (those of the
        codebook runs too, if ``runs``)."""
        params = list(self._params())
        for (i, key), packed in self._packed.items():
            fmt = getattr(self.settings, STATE_ROLES[key])
            self.optimizer.state[params[i]][key] = decode(packed, fmt, params[i].shape, params[i].dtype)
        self._packed = {}
        for (key, _), run in self._runs.items() if runs else ():
            for i, state in run.unpack({seg.index: params[seg.index].shape for seg in run.segments}).items():
                self.optimizer.state[params[i]][key] = state

    def state_bytes(self) -> int:
        """Bytes the optimizer's states take between steps (packed codes, or torch's tensors)."""
        tensors = [t for state in self.optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
        return (sum(t.numel() * t.element_size() for t in tensors) + sum(p.nbytes for p in self._packed.values())
                + sum(run.nbytes for run in self._runs.values()))

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weights' codes while packed (0 without packed weights, or unpacked)."""
        return 0 if self._weights is None else self._weights.nbytes

    def state_dict(self) -> dict:
        """torch's state, the generators, the packed states' codes and, with packed weights, the
        weights' codes (a checkpoint may then leave the parameters out of the model's state)."""
        packed = dict(self._packed)
        for (key, _), run in self._runs.items():
            packed.update({(i, key): p for i, p in run.packed().items()})
        state = {"optimizer": self.optimizer.state_dict(), "generators": self._round.state_dict(),
                 "packed": {f"{i}:{key}": (p.codes, p.scales) for (i, key), p in packed.items()}}
        if self._weights is not None:
            weights = self._weights.codes or {i: encode(p, self.settings.master) for i, p in enumerate(self._params())}
            state["weights"] = {i: (p.codes, p.scales) for i, p in weights.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict``'s state; states saved whole (a checkpoint of FSDP2's shards) are
        sharded as their parameters are."""
        self.optimizer.load_state_dict(state["optimizer"])
        shard_states_like_params(self.optimizer)
        self._round.load_state_dict(state["generators"])
        params = list(self._params())
        self._packed, runs = {}, {}
        for name, (codes, scales) in state.get("packed", {}).items():
            i, key = int(name.split(":")[0]), name.split(":")[1]
            if isinstance(getattr(self.settings, STATE_ROLES[key]), CodebookFormat):
                device = params[i].device
                runs.setdefault((key, device), {})[i] = Packed(codes.to(device), scales.to(device))
            else:
                self._packed[i, key] = Packed(codes, scales)
        self._runs = {(key, device): CodebookStates.from_packed(getattr(self.settings, STATE_ROLES[key]), packed,
                                                                {i: params[i].numel() for i in packed})
                      for (key, device), packed in runs.items()}
        if ("weights" in state) != (self._weights is not None):
            raise MpcompileError("optimizer state: its weights are packed in only one of the checkpoint and this "
                                 "optimizer (optimizer.storage / master differ); resume with the policy it was saved under")
        if self._weights is not None:
            self._weights.load({int(i): Packed(codes, scales) for i, (codes, scales) in state["weights"].items()})


def _codebook_roles(settings: OptimizerSettings) -> list[str]:
    """The state roles (momentum, second_moment) whose format is a block-wise codebook format."""
    return [role for role in ("momentum", "second_moment") if isinstance(getattr(settings, role), CodebookFormat)]


def _check_sharded(optimizer: torch.optim.Optimizer, settings: OptimizerSettings) -> None:
    """FSDP2's parameters are DTensor shards: element and block formats round each shard where it
    lives; packed storage and codebook states hold one run of codes over whole tensors, and are refused."""
    if not any(isinstance(p, DTensor) for group in optimizer.param_groups for p in group["params"]):
        return
    codebooks = _codebook_roles(settings)
    if settings.storage == "packed" or codebooks:
        what = "optimizer.storage: packed" if settings.storage == "packed" else f"optimizer.{codebooks[0]}: " \
               f"{getattr(settings, codebooks[0])}"
        raise MpcompileError(f"{what} is not supported with FSDP2 (the parameters are sharded DTensors): it keeps "
                             f"codes of whole tensors; use storage: emulated and element or block formats, or DDP")


def _check_codebooks(settings: OptimizerSettings) -> None:
    """Codebook formats are for the states, signed for the momentum, and round to nearest only
    (the parser checks a policy's YAML so, at its lines)."""
    for role in ("master", "gradient"):
        if isinstance(getattr(settings, role), CodebookFormat):
            raise PolicyError(f"optimizer.{role}: {getattr(settings, role)} is a block-wise codebook format, for the "
                              f"states only (momentum, second_moment); use a float, fixed-point or block format")
    codebooks = _codebook_roles(settings)
    if "momentum" in codebooks and not settings.momentum.signed:
        raise PolicyError(f"optimizer.momentum: {settings.momentum} is unsigned, but momentum takes negative values "
                          f"(they would round to 0); use blockwise({settings.momentum.codebook[:-1]},"
                          f"{settings.momentum.block_size})")
    if codebooks and settings.update_rounding != "nearest":
        raise PolicyError(f"optimizer.update_rounding: {settings.update_rounding}, but optimizer.{codebooks[0]} "
                          f"({getattr(settings, codebooks[0])}) rounds to the nearest entry only; use nearest")
