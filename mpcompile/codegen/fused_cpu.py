"""The fused CPU quantize kernel: the reference kernel compiled by torch.compile (inductor).

Eager torch makes one pass over memory per op; compiled, the dozen ops of a quantization
become one loop. A kernel is compiled once per ``QuantPlan`` (format family, rounding mode,
dtype) with dynamic shapes, since per-format numbers arrive as tensors. Used for CPU tensors
of at least ``MIN_NUMEL`` elements; if compilation fails the call falls back to the reference
with a warning. ``mpcompile.backends.load_plugins`` imports this module (and so registers the
kernel) the first time ``quantize`` runs.
"""
from __future__ import annotations

import types

import torch

from ..backends import run_or_fall_back
from ..rounding import QuantParams, QuantPlan, reference_quantize, register_quantize_kernel

__all__ = ["MIN_NUMEL", "fused_quantize", "compiled_kernels"]

MIN_NUMEL = 1 << 20  # below this, compile time and call overhead outweigh the fusion

_KERNELS: dict[QuantPlan, object] = {}
_FAILED: set[QuantPlan] = set()


def compiled_kernels() -> int:
    """How many kernels have been compiled in this process."""
    return len(_KERNELS)


def _kernel(plan: QuantPlan):
    kernel = _KERNELS.get(plan)
    if kernel is None:
        def run(x: torch.Tensor, params: QuantParams, bits: torch.Tensor | None) -> torch.Tensor:
            return reference_quantize(x, plan, params, bits)

        # dynamo caches per code object, up to a small recompile limit; a code object of its
        # own per plan keeps many formats and modes from sharing (and exhausting) one cache
        code = run.__code__.replace(co_name=f"quantize_plan_{len(_KERNELS)}")
        run = types.FunctionType(code, run.__globals__, code.co_name, None, run.__closure__)
        kernel = _KERNELS[plan] = torch.compile(run, dynamic=True, fullgraph=True)
    return kernel


def fused_quantize(x: torch.Tensor, plan: QuantPlan, params: QuantParams, bits: torch.Tensor | None) -> torch.Tensor:
    """``reference_quantize``, compiled; same contract and bit-identical results."""
    return run_or_fall_back(_FAILED, plan, lambda: _kernel(plan)(x, params, bits),
                            lambda: reference_quantize(x, plan, params, bits), f"fused quantize for {plan}")


register_quantize_kernel("fused", fused_quantize, lambda x, plan: x.device.type == "cpu" and x.numel() >= MIN_NUMEL)
