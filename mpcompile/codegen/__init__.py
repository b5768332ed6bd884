"""Quantize kernels and emulated GEMMs faster than the eager reference, bit-identically: the
fused CPU path (``fused_cpu``), and generated Triton kernels (``triton_quantize``,
``triton_gemm``, ``triton_round``) of the ``triton`` backend.

Each module registers its kernels when imported. Nothing here imports them: the backend that
needs them loads them on first use (``mpcompile.backends.PLUGINS`` and ``load_plugins``), so that
importing mpcompile, or this package, loads neither triton nor the ops. ``from
mpcompile.codegen import triton_gemm`` imports one directly.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Any

_MODULES = ("fused_cpu", "triton_gemm", "triton_quantize", "triton_round")
# triton is a dependency on Linux only; mpcompile works without it
__all__ = [m for m in _MODULES if not m.startswith("triton") or importlib.util.find_spec("triton")]


def __getattr__(name: str) -> Any:  # mpcompile.codegen.triton_gemm without importing it first
    if name in _MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
