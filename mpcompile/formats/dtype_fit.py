"""Whether a format's values are values of a torch dtype (where it holds them anyway)."""
from __future__ import annotations

import functools

import torch

__all__ = ["fits_dtype"]


@functools.lru_cache(maxsize=None)
def fits_dtype(fmt, dtype: torch.dtype) -> bool:
    """Whether every finite value of ``fmt`` within ``dtype``'s normal range is a value of ``dtype``:
    then a tensor of ``dtype`` holds ``fmt``'s values exactly (range aside: a block format's
    extreme scales reach past bf16's largest and smallest values, and those are not counted).

    Args:
        fmt: any format with ``values()`` (one of more than 16 bits never fits: it is not enumerated).
        dtype: a floating-point torch dtype.
    """
    if getattr(fmt, "bits", 32) > 16:
        return False
    values = fmt.values().to(torch.float64)
    info = torch.finfo(dtype)
    magnitude = values.abs()
    values = values[values.isfinite() & (magnitude <= info.max) & ((magnitude >= info.tiny) | (values == 0))]
    return bool((values.to(dtype).to(torch.float64) == values).all())
