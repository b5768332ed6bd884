"""Named formats and the spec language that ``str(fmt)`` writes and ``parse`` reads back.

Grammar: ``NAME`` or ``NAME(arg, ...)``, an argument being a nested spec, an integer, a word,
or ``key=value``::

    fp8_e4m3   e5m10   e4m3fn   e4m3fnuz   e3m2(inf=false,nan=none)   e8m0
    p3109(8,3)   p3109(8,4,unsigned,finite)   fixed(8,4)   fixed(8,8,unsigned)
    mxfp8_e4m3   mx(fp6_e3m2,16)   mx(fixed(8,6),32,axis=0)   bfp(8,16)   bm(2,5,16)
    blockwise(dynamic8,256)   blockwise(dynamic4u,256)
"""
from __future__ import annotations

import functools
import re
from dataclasses import replace
from typing import Union

from ..errors import FormatError
from .block_format import BlockFloat, BlockFormat, BlockMinifloat, MXFormat, block_spec
from .codebook_format import CODEBOOKS, CodebookFormat
from .fixed_format import FixedFormat
from .float_format import FloatFormat, format_spec, p3109
from .table import get, lookup, names, store

__all__ = ["Format", "get", "parse", "names", "register", "format_spec", "block_spec"]

Format = Union[FloatFormat, FixedFormat, MXFormat, BlockFloat, BlockMinifloat, CodebookFormat]


def register(name: str, fmt: Format) -> None:
    """Add ``fmt`` under ``name`` (lower case) so that ``get`` and ``parse`` find it."""
    known = lookup(name)
    if known is not None and known != fmt:
        raise FormatError(f"register: {name!r} already names {known}")
    store(name, replace(fmt, name=name) if isinstance(fmt, FloatFormat) else fmt)
    _parse_spec.cache_clear()  # a new name may change what a spec reads as


# -- parsing ----------------------------------------------------------------------------------
_TOKEN = re.compile(r"\s*(?:(?P<num>-?\d+)|(?P<word>[A-Za-z_][A-Za-z0-9_.]*)|(?P<punct>[(),=]))")
_FLOAT_NAME = re.compile(r"e(\d+)m(\d+)(fn|fnuz)?", re.IGNORECASE)
_BOOL = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


def parse(spec: "str | Format") -> Format:
    """Read a format from a registered name or a spec (see the module docstring).

    Formats pass through unchanged, so ``parse`` can normalise user input.

    Raises:
        FormatError: the spec does not read, names an unknown format, or builds an
            impossible one; the message quotes the spec.
    """
    if not isinstance(spec, str):
        if isinstance(spec, (FloatFormat, FixedFormat, BlockFormat, CodebookFormat)):
            return spec
        raise FormatError(f"expected a format or a format spec string, got {type(spec).__name__}")
    return _parse_spec(spec)


@functools.lru_cache(maxsize=512)
def _parse_spec(spec: str) -> Format:
    tokens = _tokenize(spec)
    try:
        node, rest = _read(tokens, spec)
        if rest:
            raise FormatError(f"format spec {spec!r}: unexpected {rest[0][1]!r} after the format")
        return _build(node, spec)
    except FormatError:
        raise
    except (ValueError, TypeError) as e:
        raise FormatError(f"format spec {spec!r}: {e}") from None


def _tokenize(spec: str) -> list[tuple[str, str]]:
    out, pos, s = [], 0, spec.strip()
    while pos < len(s):
        m = _TOKEN.match(s, pos)
        if not m or m.end() == pos:
            raise FormatError(f"format spec {spec!r}: cannot read {s[pos:]!r} (column {pos + 1})")
        kind = m.lastgroup
        out.append((kind, m.group(kind)))
        pos = m.end()
    if not out:
        raise FormatError("empty format spec")
    return out


def _read(tokens: list, spec: str):
    """Returns (node, remaining tokens); a node is (name, args, kwargs) or an int/word."""
    kind, text = tokens[0]
    if kind == "num":
        return int(text), tokens[1:]
    if kind != "word":
        raise FormatError(f"format spec {spec!r}: expected a name, found {text!r}")
    rest = tokens[1:]
    if not rest or rest[0][1] != "(":
        return (text, None, {}), rest
    args, kwargs, rest = [], {}, rest[1:]
    while rest and rest[0][1] != ")":
        if len(rest) > 2 and rest[0][0] == "word" and rest[1][1] == "=":
            kwargs[rest[0][1].lower()] = rest[2][1]
            rest = rest[3:]
        else:
            arg, rest = _read(rest, spec)
            args.append(arg)
        if rest and rest[0][1] == ",":
            rest = rest[1:]
    if not rest:
        raise FormatError(f"format spec {spec!r}: missing ')'")
    return (text, args, kwargs), rest[1:]


# name: (usage, (min, max) integers, the words it knows, takes an element format first, takes axis=)
_CONSTRUCTORS = {
    "p3109": ("p3109(k, p[, unsigned][, finite])", (2, 2), {"signed", "unsigned", "extended", "finite"}, False, False),
    "fixed": ("fixed(wl, fl[, unsigned])", (2, 2), {"signed", "unsigned"}, False, False),
    "mx": ("mx(element[, block_size][, axis=n])", (0, 1), set(), True, True),
    "bfp": ("bfp(wl, block_size[, axis=n])", (2, 2), set(), False, True),
    "bm": ("bm(exp, man, block_size[, axis=n])", (3, 3), set(), False, True),
    "blockwise": (f"blockwise({'|'.join(CODEBOOKS)}[, block_size])", (0, 1), set(CODEBOOKS), False, False),
}


def _build(node, spec: str) -> Format:
    if not isinstance(node, tuple):
        raise FormatError(f"format spec {spec!r}: expected a format, found {node!r}")
    name, args, kwargs = node
    low = name.lower()
    m = _FLOAT_NAME.fullmatch(low)
    if args is None:
        return _float_from_name(m, {}) if m and lookup(low) is None else get(name)
    if m:
        if args:
            raise FormatError(f"format spec {spec!r}: {name}() takes only key=value options")
        return _float_from_name(m, kwargs)
    if low not in _CONSTRUCTORS:
        raise FormatError(f"format spec {spec!r}: unknown constructor {name}(); use eXmY(key=value, ...) or "
                          + ", ".join(usage for usage, *_ in _CONSTRUCTORS.values()))
    usage, (lo, hi), known_words, takes_element, takes_axis = _CONSTRUCTORS[low]
    bad = lambda why: FormatError(f"format spec {spec!r}: {why}; expected {usage}")
    element = None
    if takes_element:
        if not args or not isinstance(args[0], tuple):
            raise bad("missing the element format")
        element, args = _build(args[0], spec), args[1:]
    ints = [a for a in args if isinstance(a, int)]
    words = [a[0].lower() for a in args if isinstance(a, tuple) and a[1] is None]
    if len(ints) + len(words) != len(args) or set(words) - known_words or not lo <= len(ints) <= hi:
        raise bad(f"cannot use the arguments {', '.join(str(a if isinstance(a, int) else a[0]) for a in args) or '()'}")
    if set(kwargs) - ({"axis"} if takes_axis else set()):
        raise bad(f"unknown option {', '.join(kwargs)}")
    axis = {"axis": int(kwargs["axis"])} if "axis" in kwargs else {}
    if low == "p3109":
        return p3109(*ints, signed="unsigned" not in words, domain="finite" if "finite" in words else "extended")
    if low == "fixed":
        return FixedFormat(*ints, signed="unsigned" not in words)
    if low == "mx":
        return MXFormat(element, *ints, **axis)
    if low == "blockwise":
        if len(words) != 1:
            raise bad("name one codebook")
        return CodebookFormat(words[0], *ints)
    return (BlockFloat if low == "bfp" else BlockMinifloat)(*ints, **axis)


def _float_from_name(m: re.Match, kwargs: dict) -> FloatFormat:
    exp, man, suffix = int(m.group(1)), int(m.group(2)), (m.group(3) or "").lower()
    kw: dict = {}
    if suffix == "fn":
        kw = {"inf": False, "nan": "fn"}
    elif suffix == "fnuz":
        kw = {"inf": False, "nan": "negzero", "bias": 2 ** (exp - 1)}
    for key, value in kwargs.items():
        if key == "bias":
            kw[key] = int(value)
        elif key == "nan":
            kw[key] = value.lower()
        elif key in ("subnormals", "inf", "neg_zero", "signed"):
            if value.lower() not in _BOOL:
                raise ValueError(f"{key}={value!r} is not true or false")
            kw[key] = _BOOL[value.lower()]
        else:
            raise ValueError(f"unknown option {key!r}; expected bias, subnormals, inf, nan, neg_zero, signed")
    return FloatFormat(exp, man, **kw)


# -- the built-in names -----------------------------------------------------------------------------
for _name, _fmt in {
    "fp64": FloatFormat(11, 52),
    "fp32": FloatFormat(8, 23),
    "tf32": FloatFormat(8, 10),
    "bf16": FloatFormat(8, 7),
    "fp16": FloatFormat(5, 10),
    "fp8_e4m3": FloatFormat(4, 3, inf=False, nan="fn"),
    "fp8_e5m2": FloatFormat(5, 2),
    "fp8_e4m3fnuz": FloatFormat(4, 3, bias=8, inf=False, nan="negzero"),
    "fp8_e5m2fnuz": FloatFormat(5, 2, bias=16, inf=False, nan="negzero"),
    "fp8_e3m4": FloatFormat(3, 4),
    "fp6_e3m2": FloatFormat(3, 2, inf=False, nan="none"),
    "fp6_e2m3": FloatFormat(2, 3, inf=False, nan="none"),
    "fp4_e2m1": FloatFormat(2, 1, inf=False, nan="none"),
    "e8m0": FloatFormat(8, 0, subnormals=False, inf=False, nan="fn", signed=False),
}.items():
    register(_name, _fmt)
for _elem in ("fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1"):
    register("mx" + _elem, MXFormat(get(_elem)))
register("mxint8", MXFormat(FixedFormat(8, 6)))
