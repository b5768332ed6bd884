"""mpcompile: a declarative mixed-precision compiler for PyTorch."""
from . import codegen, formats
from .errors import FormatError, MpcompileError
from .rounding import ROUNDING_MODES, quantize, set_quantize_backend

__all__ = ["formats", "quantize", "ROUNDING_MODES", "set_quantize_backend", "MpcompileError", "FormatError"]
