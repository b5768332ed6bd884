"""Number formats: immutable, hashable value sets with their special-value behaviour."""
from .block_format import BlockFloat, BlockFormat, BlockMinifloat, MXFormat
from .fixed_format import FixedFormat
from .float_format import FloatFormat, p3109
from .registry import Format, get, names, parse, register

__all__ = ["Format", "FloatFormat", "FixedFormat", "BlockFormat", "MXFormat", "BlockFloat",
           "BlockMinifloat", "p3109", "get", "parse", "names", "register"]
