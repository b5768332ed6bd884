"""The table of named formats: the lowest module of ``formats``, below the format types.

``registry.register`` fills it (the built-in names, then the user's); ``get`` and ``names`` read
it; the types' ``str()`` looks names up in it, so that a registered format prints as its name
and a spec that a registered name would shadow is written so that it reads back as itself. It
holds formats without knowing their types, so that the types can read it and the registry,
which builds them, can fill it: the imports inside ``formats`` point one way.
"""
from __future__ import annotations

import difflib

from ..errors import FormatError

__all__ = ["ALIASES", "get", "names", "lookup", "entries", "store"]

_TABLE: dict[str, object] = {}  # lower-case name -> format, in registration order
ALIASES = {"fp8_e4m3fn": "fp8_e4m3", "fp6_e3m2fn": "fp6_e3m2", "fp6_e2m3fn": "fp6_e2m3",
           "fp4_e2m1fn": "fp4_e2m1", "fp8_e8m0": "e8m0", "e8m0fnu": "e8m0", "float32": "fp32",
           "float64": "fp64", "float16": "fp16", "bfloat16": "bf16", "half": "fp16"}


def names() -> list[str]:
    """Registered names, in registration order."""
    return list(_TABLE)


def lookup(name: str):
    """The format registered as ``name`` (case-insensitive, aliases not followed), or None."""
    return _TABLE.get(name.lower())


def entries() -> list[tuple[str, object]]:
    """(name, format) pairs, in registration order."""
    return list(_TABLE.items())


def store(name: str, fmt) -> None:
    """Put ``fmt`` under ``name`` (lower-cased). ``registry.register`` checks it first."""
    _TABLE[name.lower()] = fmt


def get(name: str):
    """The registered format called ``name`` (case-insensitive, aliases followed).

    Raises:
        FormatError: unknown name; the message lists the closest registered names.
    """
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key in _TABLE:
        return _TABLE[key]
    close = difflib.get_close_matches(key, list(_TABLE) + list(ALIASES), n=4, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise FormatError(
        f"unknown format {name!r}{hint} Known: {', '.join(_TABLE)}; or a spec such as "
        "'e5m10', 'p3109(8,3)', 'fixed(8,4)', 'mx(fp8_e4m3,32)'"
    )
