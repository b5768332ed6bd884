"""Number formats: immutable, hashable value sets with their special-value behaviour.

Inside, imports point one way: ``table`` (the named formats) <- ``float_format``,
``fixed_format`` <- ``block_format`` <- ``registry`` (``register``, ``parse``); ``codebook_format``
<- ``codebook_codes`` (block-wise codebooks and their rounding); ``packing`` (codes and scales)
reads the types.
"""
from .block_format import BlockFloat, BlockFormat, BlockMinifloat, MXFormat
from .codebook_format import CODEBOOKS, CodebookFormat
from .dtype_fit import fits_dtype
from .fixed_format import FixedFormat
from .float_format import FloatFormat, p3109
from .packing import Packed, code_values, decode, encode, torch_dtype, widen
from .registry import Format, get, names, parse, register

__all__ = ["fits_dtype", "Format", "FloatFormat", "FixedFormat", "BlockFormat", "MXFormat", "BlockFloat",
           "BlockMinifloat", "CodebookFormat", "CODEBOOKS", "p3109", "get", "parse", "names", "register", "Packed", "encode", "decode", "code_values",
           "torch_dtype", "widen"]
