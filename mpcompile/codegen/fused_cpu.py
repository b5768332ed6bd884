"""The fused CPU quantize kernel: one pass over memory instead of eager torch's one per op.

Float32 plans (elementwise and block formats) go to the C++ kernel of ``quantize_cpu``
(compiled once per rounding mode and path, about 0.3 s) at every size: its call costs about
14 us, eager torch's dozen ops 45 us at 64 values. Float64 plans go to the reference compiled
by torch.compile (inductor), from ``MIN_NUMEL`` elements: a kernel is compiled once per
``QuantPlan`` (format family, rounding mode, dtype) with dynamic shapes, since per-format
numbers arrive as tensors. Under torch.compile's tracing, calls go to the reference, which it
can trace. If compilation fails the call falls back to the reference with a warning.
``mpcompile.backends.load_plugins`` imports this module (and so registers the kernel) the first
time ``quantize`` runs.
"""
from __future__ import annotations

import types

import torch

from ..backends import run_or_fall_back
from ..rounding import QuantParams, QuantPlan, reference_quantize, register_quantize_kernel
from .quantize_cpu import quantize_cpu, takes_plan

__all__ = ["MIN_NUMEL", "fused_quantize", "compiled_kernels"]

MIN_NUMEL = 1 << 20  # below this, inductor's compile time and call overhead outweigh the fusion

_KERNELS: dict[QuantPlan, object] = {}
_FAILED: set[QuantPlan] = set()


def compiled_kernels() -> int:
    """How many inductor kernels have been compiled in this process."""
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


def fused_quantize(x: torch.Tensor, plan: QuantPlan, params: QuantParams, bits: torch.Tensor | None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """``reference_quantize``, compiled; same contract and bit-identical results. Into ``out``
    where given (contiguous, x's shape and the plan's dtype): the C++ kernel writes there, the
    others' results are copied."""
    if takes_plan(plan) and x.device.type == "cpu":
        kernel, what = lambda: quantize_cpu(x, plan, params, bits, out), "the C++ quantize kernel"
    else:
        kernel, what = lambda: _kernel(plan)(x, params, bits), "the inductor quantize kernel"
    y = run_or_fall_back(_FAILED, plan, kernel, lambda: reference_quantize(x, plan, params, bits),
                         f"{what} for {plan}")
    return y if out is None or y is out else out.copy_(y)


def _accepts(x: torch.Tensor, plan: QuantPlan) -> bool:
    return (x.device.type == "cpu" and not torch.compiler.is_compiling()
            and (takes_plan(plan) or x.numel() >= MIN_NUMEL))


register_quantize_kernel("fused", fused_quantize, _accepts, into=fused_quantize)
