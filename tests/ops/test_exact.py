"""Exact float64 rounding (ops/exact.py) against quantize and against exact rationals."""
from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from mpcompile.formats import parse
from mpcompile.ops.exact import grid_of, round_exact, round_float, two_prod, two_sum
from mpcompile.ops.reference import round_rational
from mpcompile.rounding import ROUNDING_MODES, quantize

from test_emulate import assert_bitwise

FORMATS = ["fp8_e5m2", "fp8_e4m3", "e5m10", "bf16", "fp32", "fp8_e4m3fnuz", "fp4_e2m1", "e8m0",
           "e3m2(subnormals=false)", "e5m2(signed=false)"]
SPECIAL = [0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e300, -1e-300, 448.0, 464.0, 480.0, 65504.0,
           65520.0, 57344.0, 61440.0, 3.4e38]


def _values(fmt, g):
    n = 20000
    x = torch.randn(n, dtype=torch.float64, generator=g) * torch.exp2(torch.randint(-30, 30, (n,), generator=g)).double()
    grid = fmt.values().double() if fmt.bits <= 16 else quantize(x[:2000], fmt)
    grid = grid[torch.isfinite(grid)].unique()
    mids = (grid[:-1] + grid[1:]) / 2
    return torch.cat([x, torch.tensor(SPECIAL, dtype=torch.float64), grid, mids, -mids])


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("mode", ROUNDING_MODES)
def test_round_float_equals_quantize(name, mode):
    fmt, g = parse(name), torch.Generator().manual_seed(0)
    x = _values(fmt, g)
    n = min(32, 51 - fmt.man)
    bits = torch.randint(0, 2**32, x.shape, generator=g) if mode == "stochastic" else None
    want = quantize(x, fmt, mode, sr_bits=n if bits is not None else None, random_bits=bits)
    assert_bitwise(round_float(x, grid_of(fmt, mode, n), mode, bits, n), want)


@pytest.mark.parametrize("name", ["fp8_e5m2", "e5m10", "bf16", "fp32", "e3m2(subnormals=false)"])
@pytest.mark.parametrize("mode", ROUNDING_MODES)
def test_round_exact_of_sums_and_products_equals_rationals(name, mode):
    """Midpoints and grid values of the format plus a tiny remainder of either sign: the float64
    sum alone would round wrongly; the pair (s, e) must not."""
    fmt, g = parse(name), torch.Generator().manual_seed(1)
    base = _values(fmt, g)
    base = base[torch.isfinite(base) & (base.abs() < 2.0**100) & (base.abs() > 2.0**-100)][:3000]
    tiny = base * torch.where(torch.rand(base.shape, generator=g) < 0.5, -1.0, 1.0).double() * 2.0**-60
    n = min(32, 51 - fmt.man)
    bits = torch.randint(0, 2**32, base.shape, generator=g)
    grid = grid_of(fmt, mode, n)
    s, e = two_sum(base, tiny)
    got = round_exact(s, e, grid, mode, bits, n)
    want = [round_rational(Fraction(u) + Fraction(v), u + v < 0, fmt, mode, int(w), n)
            for u, v, w in zip(base.tolist(), tiny.tolist(), bits.tolist())]
    assert_bitwise(got, torch.tensor(want, dtype=torch.float64))
    a = base[:500] * (1 + 2.0**-30)
    p, pe = two_prod(a, base[500:1000])
    got = round_exact(p, pe, grid, mode, bits[:500], n)
    want = [round_rational(Fraction(u) * Fraction(v), u * v < 0, fmt, mode, int(w), n)
            for u, v, w in zip(a.tolist(), base[500:1000].tolist(), bits[:500].tolist())]
    assert_bitwise(got, torch.tensor(want, dtype=torch.float64))


@pytest.mark.parametrize("name", ["fp8_e5m2", "fp8_e4m3fnuz"])
@pytest.mark.parametrize("mode", ["nearest", "down", "stochastic"])
def test_compiled_rounding_keeps_zero_signs_and_specials(name, mode):
    """Inductor builds with -fno-signed-zeros; the rounding's selects must still give -0, +-inf
    and NaN where eager code does (signs of zero are compared bit for bit)."""
    fmt, g = parse(name), torch.Generator().manual_seed(2)
    x = _values(fmt, g)
    x = torch.cat([x, -x, x * 2.0**-20])
    bits = torch.randint(0, 2**32, x.shape, generator=g)
    s, e = two_sum(x, x * 2.0**-60)
    grid = grid_of(fmt, mode, 20)

    def both(x, s, e, bits):
        return round_float(x, grid, mode, bits, 20), round_exact(s, e, grid, mode, bits, 20)

    for got, want in zip(torch.compile(both, fullgraph=True)(x, s, e, bits), both(x, s, e, bits)):
        assert_bitwise(got, want)
