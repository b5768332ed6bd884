"""mpcompile: a declarative mixed-precision compiler for PyTorch.

Importing mpcompile loads only the number formats and ``quantize``. Everything else (the ops,
the compiler, policies, the runtime, the generated kernels, and with them torch.compile,
torchvision and triton) loads on first use of its name: ``mpcompile.compile``,
``mpcompile.train``, ``mpcompile.ops``, any submodule such as ``mpcompile.models`` (PEP 562's
module ``__getattr__``).
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from . import formats
from .errors import FormatError, MpcompileError, PolicyError, SpecError
from .rounding import ROUNDING_MODES, quantize, set_quantize_backend, set_quantize_kernel

if TYPE_CHECKING:
    from . import codegen, ops, sweep
    from .compiler import CompiledModel, CompileError, compile
    from .policy import load_policy
    from .runtime import memory_report, train

__all__ = ["formats", "quantize", "ROUNDING_MODES", "set_quantize_kernel", "set_quantize_backend", "MpcompileError",
           "FormatError", "SpecError", "PolicyError", "ops", "load_policy", "compile", "CompiledModel",
           "CompileError", "train", "memory_report", "sweep"]

# name -> (module, attribute; None: the module itself), imported on first use
_LAZY: dict[str, tuple[str, str | None]] = {
    "ops": (".ops", None),
    "codegen": (".codegen", None),
    "compile": (".compiler", "compile"),
    "CompiledModel": (".compiler", "CompiledModel"),
    "CompileError": (".compiler", "CompileError"),
    "load_policy": (".policy", "load_policy"),
    "train": (".runtime", "train"),
    "memory_report": (".runtime", "memory_report"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        if name.startswith("_") or importlib.util.find_spec(f"{__name__}.{name}") is None:
            raise AttributeError(f"module 'mpcompile' has no attribute {name!r}")
        return importlib.import_module(f".{name}", __name__)  # a submodule: mpcompile.models, mpcompile.views...
    module, attr = _LAZY[name]
    value = importlib.import_module(module, __name__)
    if attr is not None:
        value = getattr(value, attr)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
