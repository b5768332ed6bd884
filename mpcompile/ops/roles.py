"""Quantization of one role's tensor (input, weight, grad_output, ...), with optional scaling.

Scaled roles divide by a scale from the current amax before rounding and multiply back after,
so ``x`` is quantized on the grid of ``fmt`` stretched to x's range: per tensor, or per index
along the role's channel axis. Power-of-two scales (``tensor``, ``channel``) add no rounding.
``tensor_delayed`` scales come from outside (``delayed_scale`` over an amax history that the
caller keeps with ``record_amax``): Transformer Engine's delayed scaling.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from ..formats import BlockFormat
from ..random_bits import COUNTER_BITS, counter_bits, stream_seed
from ..rounding import default_sr_bits, quantize
from .spec import QuantSpec, SpecError

__all__ = ["quantize_role", "delayed_scale", "record_amax", "op_seed", "SEED_STREAM"]

SEED_STREAM = 7  # stream of stream_seed that derives an op's sub-seeds from its seed


def op_seed(seed: int | None, purpose: int) -> int | None:
    """Sub-seed of an op: 0 forward GEMM, 1 grad_input GEMM, 2 grad_weight GEMM, 3 grad_bias
    reduction, 16 + i the i-th role of ``ROLES``."""
    return None if seed is None else stream_seed(seed, SEED_STREAM, purpose)


def _scale(x: torch.Tensor, spec: QuantSpec, axis: int) -> torch.Tensor:
    """The factor x is multiplied by before rounding (float64, broadcastable to x)."""
    top = spec.fmt.max
    x64 = x.detach().to(torch.float64).abs()
    if spec.scaling.startswith("channel"):
        dims = [d for d in range(x.dim()) if d != axis % max(x.dim(), 1)]
        amax = x64.amax(dim=dims, keepdim=True) if dims else x64
    else:
        amax = x64.amax()
    if spec.scaling.endswith("_amax"):
        ok = (amax > 0) & torch.isfinite(amax)
        return torch.where(ok, top / torch.where(ok, amax, 1.0), 1.0)
    return _power_of_two(top, amax)


def _power_of_two(top: float, amax: torch.Tensor) -> torch.Tensor:
    """The largest 2**k with amax * 2**k <= top (1 where amax is 0 or not finite), float64."""
    ok = (amax > 0) & torch.isfinite(amax)
    ratio = torch.where(ok, top / torch.where(ok, amax, 1.0), 1.0)
    s = torch.ldexp(torch.ones_like(ratio), torch.frexp(ratio).exponent - 1)  # largest 2**k <= ratio
    return torch.where(ok & (amax * s > top), s * 0.5, s)


def delayed_scale(spec: QuantSpec, history: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The power-of-two factor of a ``tensor_delayed`` role: from the largest amax in
    ``history`` (earlier calls), or from x's own amax while the history is empty."""
    past = history.detach().to(torch.float64).amax()
    current = x.detach().to(torch.float64).abs().amax()
    return _power_of_two(spec.fmt.max, torch.where(past > 0, past, current))


def record_amax(history: torch.Tensor, x: torch.Tensor) -> None:
    """Push x's amax in front of ``history`` (newest first), dropping the oldest, in place."""
    with torch.no_grad():
        amax = x.detach().abs().amax().to(history.dtype).reshape(1)
        history.copy_(torch.cat([amax, history[:-1]]))


def quantize_role(x: torch.Tensor | None, spec: QuantSpec | None, *, axis: int, seed: int | None,
                  scale: torch.Tensor | None = None, blocks: tuple[int, ...] = (-1,),
                  out: torch.Tensor | None = None) -> torch.Tensor | None:
    """x rounded as ``spec`` says (x itself if spec is None).

    Args:
        x: the role's tensor (or None for an absent bias).
        spec: the role's quantization; its ``axis``, where given, replaces ``axis`` and ``blocks``.
        axis: the channel axis for ``channel`` scaling.
        seed: 32-bit seed of the random bits for stochastic rounding (the bits are
            ``counter_bits(seed)``); None draws one from torch's generator.
        scale: the factor of a ``tensor_delayed`` role (``delayed_scale``).
        blocks: the dims a block format's blocks run along, flattened in this order: the
            reduction dims of the GEMM the tensor feeds (a conv weight's in_channels and kernel
            elements, in im2col order). A block format with an axis of its own keeps it.
        out: memory the result may be written into (contiguous, x's shape and dtype): where the
            format is elementwise and unscaled it is (``quantize``'s out); use what is returned.
    """
    if x is None or spec is None:
        return x
    if spec.scaling == "tensor_delayed" and scale is None:
        raise SpecError(f"role format {spec}: tensor_delayed scaling needs an amax history; compile() gives each op "
                        f"one, and a direct call of an op takes amax_history=")
    bits = n = None
    if spec.rounding == "stochastic":
        n = spec.sr_bits
        if seed is not None:
            n = n or min(default_sr_bits(spec.fmt, x.dtype), COUNTER_BITS)
            bits = counter_bits(torch.tensor(seed, dtype=torch.int64, device=x.device), x.shape)
    if spec.axis is not None:
        if not -max(x.dim(), 1) <= spec.axis < max(x.dim(), 1):
            raise SpecError(f"role format {spec}: axis {spec.axis} is not a dim of the role's {x.dim()}-dim tensor")
        axis, blocks = spec.axis, (spec.axis,)
    if isinstance(spec.fmt, BlockFormat):  # unscaled (QuantSpec refuses a scaling)
        if spec.fmt.axis != -1 and spec.axis is None:
            blocks = (spec.fmt.axis,)
        return _blocked(x, spec, blocks, n, bits)
    if spec.scaling == "none":
        return quantize(x, spec.fmt, spec.rounding, saturate=spec.saturate, sr_bits=n, random_bits=bits, out=out)
    s = scale.to(torch.float64) if spec.scaling == "tensor_delayed" else _scale(x, spec, axis)
    y = quantize(x.to(torch.float64) * s, spec.fmt, spec.rounding, saturate=spec.saturate, sr_bits=n, random_bits=bits)
    return (y / s).to(x.dtype)


def _blocked(x: torch.Tensor, spec: QuantSpec, blocks: tuple[int, ...], n: int | None,
             bits: torch.Tensor | None) -> torch.Tensor:
    """x in a block format whose blocks run along ``blocks``, flattened in that order."""
    nd = max(x.dim(), 1)
    if not all(-nd <= d < nd for d in blocks):
        raise SpecError(f"role format {spec}: blocks run along dims {blocks}, but the tensor has {x.dim()} dims")
    dims = [d % nd for d in blocks] if x.dim() else []
    if len(dims) <= 1:
        fmt = replace(spec.fmt, axis=dims[0] if dims else -1)
        return quantize(x, fmt, spec.rounding, saturate=spec.saturate, sr_bits=n, random_bits=bits)
    order = [d for d in range(nd) if d not in dims] + dims
    moved = x.permute(order)
    rows = moved.shape[:nd - len(dims)]
    flat = (lambda t: t.permute(order).reshape(*rows, -1))
    y = quantize(flat(x), replace(spec.fmt, axis=-1), spec.rounding, saturate=spec.saturate, sr_bits=n,
                 random_bits=None if bits is None else flat(bits))
    return y.reshape(moved.shape).permute(torch.argsort(torch.tensor(order)).tolist())
