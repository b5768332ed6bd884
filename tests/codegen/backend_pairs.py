"""Helpers of the backend tests: whether Triton can run here, and ``quantize`` with the reference
kernel and with another one, for bit-for-bit comparisons."""
from __future__ import annotations

import os

import torch

from mpcompile import quantize, set_quantize_kernel


TRITON_RUNS = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
# the interpreter runs kernels on CPU tensors; compiled kernels need CUDA tensors
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
NO_TRITON = "Triton kernels need a CUDA device or Triton's interpreter: set TRITON_INTERPRET=1 (make test does)"


def reference_and(kernel: str, x: torch.Tensor, fmt, rounding: str = "nearest", seed: int | None = None, **kw):
    """(reference, kernel) results of ``quantize(x, fmt, rounding, **kw)``; ``seed`` gives each
    call a fresh generator (on x's device) with that seed, so both draw the same random bits."""
    gen = lambda: {} if seed is None else {"generator": torch.Generator(x.device).manual_seed(seed)}
    try:
        set_quantize_kernel("reference")
        ref = quantize(x, fmt, rounding, **kw, **gen())
        set_quantize_kernel(kernel)
        got = quantize(x, fmt, rounding, **kw, **gen())
    finally:
        set_quantize_kernel(None)
    return ref, got
