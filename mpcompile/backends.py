"""Which implementation computes an op: the torch reference or generated Triton kernels.

``torch`` is the reference (vectorised torch, with its fused CPU path), the semantics; ``triton``
runs generated kernels, on CUDA tensors or, for tests, on the CPU in Triton's interpreter
(``TRITON_INTERPRET=1``); ``auto`` takes Triton for CUDA tensors and torch elsewhere. Every op
and ``compile`` take ``backend=``; the numbers are the same whichever runs (the Triton kernels
are bit-identical to the reference, or the call falls back to it).
"""
from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

import torch

from .errors import MpcompileError

__all__ = ["BACKENDS", "BackendError", "check_backend", "resolve_backend", "use_backend", "current_backend"]

BACKENDS = ("auto", "torch", "triton")
_current: ContextVar[str] = ContextVar("mpcompile_backend", default="auto")


class BackendError(MpcompileError, ValueError):
    """A backend that does not exist or cannot run here."""


def check_backend(name: str) -> str:
    """``name`` if it is one of ``BACKENDS``, else a BackendError that lists them."""
    if name not in BACKENDS:
        raise BackendError(f"backend {name!r} is not one of {', '.join(BACKENDS)}")
    return name


def resolve_backend(name: str, device: torch.device) -> str:
    """``torch`` or ``triton``: what ``name`` means for tensors on ``device``."""
    if check_backend(name) == "auto":
        name = "triton" if device.type == "cuda" and importlib.util.find_spec("triton") else "torch"
    if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise BackendError(f"backend 'triton' on {device.type} tensors runs only in Triton's interpreter: set "
                           f"TRITON_INTERPRET=1 before importing triton, or use backend 'torch' or 'auto'")
    return name


def current_backend() -> str:
    """The backend of the innermost ``use_backend`` (``auto`` outside any)."""
    return _current.get()


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed ops and quantizations on backend ``name``."""
    token = _current.set(check_backend(name))
    try:
        yield
    finally:
        _current.reset(token)
