"""An ArithSpec's string form: the custom ops take it at every call, so it is kept on the spec."""
from __future__ import annotations

from mpcompile.ops.spec import ArithSpec, parse_arith


def test_an_arith_specs_string_names_its_own_formats():
    """fp16 and e5m10 are equal formats under two names: each spec prints the name it was given
    (a cache keyed by value printed whichever came first), and reads back to an equal spec."""
    named = ArithSpec(mul="fp8_e5m2", acc="fp16", order="chunk(32)")
    bare = ArithSpec(mul="fp8_e5m2", acc="e5m10", order="chunk(32)")
    assert named == bare
    assert str(bare) == "mul=fp8_e5m2 acc=e5m10 order=chunk(32)"
    assert str(named) == "mul=fp8_e5m2 acc=fp16 order=chunk(32)"
    assert str(named) is str(named)  # kept, not rebuilt
    assert parse_arith(str(named)) == named
