"""Which implementation computes an op: the torch reference or generated Triton kernels.

``torch`` is the reference (vectorised torch, with its fused CPU path), the semantics; ``triton``
runs generated kernels, on CUDA tensors or, for tests, on the CPU in Triton's interpreter
(``TRITON_INTERPRET=1``); ``auto`` takes Triton for CUDA tensors and torch elsewhere. Every op
and ``compile`` take ``backend=``; the numbers are the same whichever runs (the Triton kernels
are bit-identical to the reference, or the call falls back to it).

Plug-ins. The implementations faster than the eager reference live above the ops, in
``mpcompile/codegen/``, and register themselves when imported: the fused CPU quantize
(``rounding.register_quantize_kernel``), the CPU chunk fold and im2col
(``ops.emulate.register_chunk_fold``, ``ops.im2col.register_patch_rows``) and the Triton
quantize and GEMM kernels (also ``ops.gemm_backends.register_gemm_backend``). Importing them with mpcompile would load triton
and point imports up the layers, so ``PLUGINS`` names them per backend, as strings, and
``load_plugins`` imports a backend's modules (importlib) the first time ``resolve_backend``
picks that backend, before anything runs on it. The numbers do not depend on when they load.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Hashable, Iterator, TypeVar

import torch

from .errors import MpcompileError, first_line

__all__ = ["BACKENDS", "PLUGINS", "BackendError", "check_backend", "resolve_backend", "use_backend", "current_backend",
           "load_plugins", "run_or_fall_back"]

BACKENDS = ("auto", "torch", "triton")
_current: ContextVar[str] = ContextVar("mpcompile_backend", default="auto")

# The modules that register a backend's kernels when imported (see the module docstring), and
# the top-level packages they need: a backend whose packages are not installed loads nothing.
PLUGINS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "torch": (("mpcompile.codegen.fused_cpu", "mpcompile.codegen.chunk_fold_cpu", "mpcompile.codegen.im2col_cpu"), ()),
    "triton": (("mpcompile.codegen.triton_quantize", "mpcompile.codegen.triton_gemm"), ("triton",)),
}
_loaded: set[str] = set()


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
    load_plugins(name)
    return name


def load_plugins(name: str) -> None:
    """Import the plug-in modules of backend ``name`` (``PLUGINS``) once; nothing where the
    packages they need are missing (triton off Linux). An import that fails raises, and is
    tried again on the next call."""
    if name in _loaded:
        return
    # marked first, so that a plug-in that resolves a backend while it loads does not recurse; a
    # thread that resolves it meanwhile may run one call without the plug-in, on the reference:
    # slower, the same numbers
    _loaded.add(name)
    modules, needs = PLUGINS.get(name, ((), ()))
    if not all(importlib.util.find_spec(package) for package in needs):
        return
    try:
        for module in modules:
            importlib.import_module(module)
    except BaseException:
        _loaded.discard(name)
        raise


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


T = TypeVar("T")


def run_or_fall_back(failed: set, key: Hashable, kernel: Callable[[], T], fallback: Callable[[], T], what: str,
                     stacklevel: int = 4) -> T:
    """``kernel()``, or ``fallback()`` (the reference, same numbers) where it raises: a kernel
    that fails to compile or launch must not cost the user the result. The first failure of a
    ``key`` is added to ``failed`` and warned about once, naming ``what`` failed; that key then
    goes straight to the fallback.

    Args:
        failed: the caller's set of keys whose kernel failed.
        key: what a kernel is compiled for (a plan, a spec and formats).
        kernel, fallback: the two ways to the result.
        what: the kernel, as the warning names it (``"the Triton quantize kernel for e4m3 ..."``).
        stacklevel: ``warnings.warn``'s, counted from the caller of ``run_or_fall_back``.
    """
    if key not in failed:
        try:
            return kernel()
        except Exception as err:  # noqa: BLE001 (any compiler or launch failure)
            failed.add(key)
            warnings.warn(f"mpcompile: {what} failed to compile or run; the reference computes it from now on "
                          f"(same numbers) ({first_line(err, limit=300)})", RuntimeWarning, stacklevel=stacklevel)
    return fallback()
