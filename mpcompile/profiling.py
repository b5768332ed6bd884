"""Sections of mpcompile's work, named for torch.profiler.

``section(name)`` marks a stretch of an op's work (rounding a role, a GEMM's partial products,
rounding them into the accumulator, building im2col operands) as
``torch.profiler.record_function("mpc.<name>")`` while a profiler records, and costs one check
otherwise. ``benchmarks/profile_train_step.py`` gives every recorded operator's own time to its
innermost section.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

__all__ = ["SECTIONS", "section"]

SECTIONS = {
    "quantize": "rounding a role's tensor to its format",
    "gemm products": "an emulated GEMM's products or exact chunk sums, by torch's GEMM",
    "chunk rounding": "rounding chunk sums into the emulated accumulator",
    "fused gemm": "kernels that form products and sum them in one (the C++ products and implicit-GEMM "
                  "kernels; inductor's steps)",
    "im2col": "a convolution's operands as GEMM operands (patches, padded inputs, upsampled gradients)",
}


def section(name: str) -> ContextManager[None]:
    """``name``'s section (a key of ``SECTIONS``) while torch.profiler records; else nothing."""
    if not torch.autograd._profiler_enabled():
        return contextlib.nullcontext()
    return torch.profiler.record_function(f"mpc.{name}")
