"""Exceptions raised by mpcompile; each message says what was wrong, where, and what to do."""

__all__ = ["MpcompileError", "FormatError", "SpecError", "PolicyError", "CompileError", "LoweringError", "first_line"]


class MpcompileError(Exception):
    """Base class of mpcompile's own errors."""


class FormatError(MpcompileError, ValueError):
    """A number-format name or spec that cannot be read or built."""


class SpecError(MpcompileError, ValueError):
    """An arithmetic spec or role format (of an op) that cannot be read or built."""


class PolicyError(MpcompileError, ValueError):
    """A precision policy that cannot be read: the message names file:line:column."""


class CompileError(MpcompileError, ValueError):
    """A model that cannot be captured or compiled; the message says where and what to do."""


class LoweringError(MpcompileError, ValueError):
    """A node that lowering cannot rewrite; the message names the node and its module."""


def first_line(err: BaseException, limit: int | None = None) -> str:
    """An exception's type and the first non-empty line of its text (cut to ``limit`` characters):
    what a message quotes of an error from torch or a compiler, whose texts run to pages."""
    text = next((line.strip() for line in str(err).splitlines() if line.strip()), "")[:limit]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
