"""Backends that run ``quantize`` and the emulated GEMMs faster than the eager reference,
bit-identically: the fused CPU path, and generated Triton kernels (``backend="triton"``)."""
from . import fused_cpu

__all__ = ["fused_cpu"]

try:
    import triton  # noqa: F401  (a dependency on Linux only; mpcompile works without it)
except ImportError:
    pass
else:
    from . import triton_gemm, triton_quantize

    __all__ += ["triton_gemm", "triton_quantize"]
