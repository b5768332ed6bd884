"""mpcompile: a declarative mixed-precision compiler for PyTorch."""
from . import codegen, formats, ops
from .errors import FormatError, MpcompileError, PolicyError, SpecError
from .compiler import CompiledModel, CompileError, compile
from .policy import load_policy
from .rounding import ROUNDING_MODES, quantize, set_quantize_backend
from .runtime import train

__all__ = ["formats", "quantize", "ROUNDING_MODES", "set_quantize_backend", "MpcompileError", "FormatError", "SpecError",
           "PolicyError", "ops", "load_policy", "compile", "CompiledModel", "CompileError",
           "train"]
