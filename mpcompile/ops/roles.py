"""Quantization of one role's tensor (input, weight, grad_output, ...), with optional scaling.

Scaled roles divide by a scale from the current amax before rounding and multiply back after,
so ``x`` is quantized on the grid of ``fmt`` stretched to x's range: per tensor, or per index
along the role's channel axis. Power-of-two scales (``tensor``, ``channel``) add no rounding.
"""
from __future__ import annotations

import torch

from ..formats import BlockFormat
from ..random_bits import COUNTER_BITS, counter_bits, stream_seed
from ..rounding import default_sr_bits, quantize
from .spec import QuantSpec, SpecError

__all__ = ["quantize_role", "op_seed", "SEED_STREAM"]

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
    ok = (amax > 0) & torch.isfinite(amax)
    ratio = torch.where(ok, top / torch.where(ok, amax, 1.0), 1.0)
    if spec.scaling.endswith("_amax"):
        return ratio
    s = torch.ldexp(torch.ones_like(ratio), torch.frexp(ratio).exponent - 1)  # largest 2**k <= ratio
    return torch.where(ok & (amax * s > top), s * 0.5, s)


def quantize_role(x: torch.Tensor | None, spec: QuantSpec | None, *, axis: int, seed: int | None) -> torch.Tensor | None:
    """x rounded as ``spec`` says (x itself if spec is None).

    Args:
        x: the role's tensor (or None for an absent bias).
        spec: the role's quantization.
        axis: the channel axis for ``channel`` scaling.
        seed: 32-bit seed of the random bits for stochastic rounding (the bits are
            ``counter_bits(seed)``); None draws one from torch's generator.
    """
    if x is None or spec is None:
        return x
    bits = n = None
    if spec.rounding == "stochastic" and seed is not None:
        n = min(default_sr_bits(spec.fmt, x.dtype), COUNTER_BITS)
        bits = counter_bits(torch.tensor(seed, dtype=torch.int64, device=x.device), x.shape)
    if spec.scaling == "none":
        return quantize(x, spec.fmt, spec.rounding, saturate=spec.saturate, sr_bits=n, random_bits=bits)
    if isinstance(spec.fmt, BlockFormat):
        raise SpecError(f"role format {spec}: block formats carry their own scales; use scaling none")
    s = _scale(x, spec, axis)
    y = quantize(x.to(torch.float64) * s, spec.fmt, spec.rounding, saturate=spec.saturate, sr_bits=n, random_bits=bits)
    return (y / s).to(x.dtype)
