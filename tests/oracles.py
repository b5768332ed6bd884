"""Shared helpers for the rounding oracle tests: gfloat conversion, input grids, bitwise compare."""
from __future__ import annotations

import math
from functools import lru_cache

import gfloat
import numpy as np
import torch
from gfloat import Domain, RoundMode

from mpcompile.formats import FixedFormat, FloatFormat, get, names, p3109

GFLOAT_MODES = {
    "nearest": RoundMode.TiesToEven,
    "nearest_away": RoundMode.TiesToAway,
    "toward_zero": RoundMode.TowardZero,
    "up": RoundMode.TowardPositive,
    "down": RoundMode.TowardNegative,
    "stochastic": RoundMode.Stochastic,
}


def to_gfloat(f: FloatFormat) -> gfloat.FormatInfo:
    """The gfloat FormatInfo with the same value set and special values as ``f``."""
    return gfloat.FormatInfo(
        str(f), k=f.bits, precision=f.man + 1, bias=f.bias, is_signed=f.signed,
        domain=Domain.Extended if f.inf else Domain.Finite, has_nz=bool(f.neg_zero),
        num_high_nans=f.num_high_nans, has_subnormals=f.subnormals, is_twos_complement=False)


def gfloat_round(f: FloatFormat, x: np.ndarray, mode: str, sat: bool,
                 srbits: np.ndarray | None = None, srnumbits: int = 0) -> np.ndarray:
    """gfloat's rounding of ``x`` (in x's own dtype); where gfloat raises because the format has
    neither inf nor NaN for an element, that element is NaN (mpcompile's documented choice)."""
    fi, rnd = to_gfloat(f), GFLOAT_MODES[mode]
    with np.errstate(over="ignore"):
        try:
            return gfloat.round_ndarray(fi, x, rnd, sat, srbits=srbits, srnumbits=srnumbits)
        except ValueError:
            if f.inf or f.has_nan:
                raise
        return _round_raising(f, fi, rnd, x, sat, srbits, srnumbits)


def _round_raising(f, fi, rnd, x, sat, srbits, srnumbits):
    # Elements within [-max, max] never overflow: do them at once, the rest one by one.
    out = np.full_like(x, np.nan)
    safe = np.abs(x) <= f.max
    sub = None if srbits is None else srbits[safe]
    out[safe] = gfloat.round_ndarray(fi, x[safe], rnd, sat, srbits=sub, srnumbits=srnumbits)
    for i in np.flatnonzero(~safe & ~np.isnan(x)):
        try:
            out[i] = gfloat.round_float(fi, float(x[i]), rnd, sat, -1 if srbits is None else int(srbits[i]), srnumbits)
        except ValueError:
            pass  # stays NaN
    return out


def _np(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu()
        return (t.float() if t.dtype in (torch.float16, torch.bfloat16) else t).numpy()
    return np.asarray(t)


def assert_bitwise(x, got, expected, what: str = "", show: int = 6) -> None:
    """Equal values with equal signs of zero, NaN matching NaN; reports the first mismatches."""
    x, got, expected = _np(x), _np(got), _np(expected).astype(_np(got).dtype, copy=False)
    assert got.shape == expected.shape, f"{what}: shape {got.shape} != {expected.shape}"
    same = ((got == expected) & (np.signbit(got) == np.signbit(expected))) | (np.isnan(got) & np.isnan(expected))
    bad = np.flatnonzero(~same.ravel())
    if bad.size:
        xs, gs, es = x.ravel(), got.ravel(), expected.ravel()
        lines = [f"  x={float(xs[i])!r} ({float(xs[i]).hex()}): expected {float(es[i])!r}, got {float(gs[i])!r}"
                 for i in bad[:show]]
        raise AssertionError(f"{what}: {bad.size} of {got.size} mismatch\n" + "\n".join(lines))


# -- input grids --------------------------------------------------------------------------------
def _steps(t: torch.Tensor, n: int) -> list[torch.Tensor]:
    """t moved 1..n ulps (of t's dtype) toward +inf and toward -inf."""
    out, up, dn = [], t, t
    for _ in range(n):
        up = torch.nextafter(up, torch.full_like(up, torch.inf))
        dn = torch.nextafter(dn, torch.full_like(dn, -torch.inf))
        out += [up, dn]
    return out


def grid(f: FloatFormat, dtype: torch.dtype, values: torch.Tensor | None = None, n_random: int = 4096,
         seed: int = 0) -> torch.Tensor:
    """Hard inputs for ``f`` in ``dtype`` (both signs): the format's values (or the given sample of
    them) and their +-1, +-2 ulp neighbours, midpoints of consecutive values and +-1 ulp around
    them, a dense sweep of the subnormal range, the overflow boundary, specials, and random data
    log-uniform over the format's exponent range."""
    v = f.values() if values is None else values.to(torch.float64)
    v = v.abs().unique()  # ascending magnitudes; signs come at the end
    mid = (v[1:] + v[:-1]) / 2
    ulp_max = math.ldexp(1.0, max(math.frexp(f.max)[1] - 1, f.emin) - f.man)  # max's ulp
    nb = min(float(torch.finfo(dtype).max), f.max * 4)
    edge = torch.tensor([f.max, f.max + ulp_max / 2, f.max + ulp_max, 2 * f.max, nb], dtype=torch.float64)
    sub = torch.arange(0, 2 * 16 + 1, dtype=torch.float64) * (f.min_normal / 16)  # subnormal sweep
    base = torch.cat([v, mid, edge, sub]).to(dtype)
    base = base[torch.isfinite(base)]
    mid_t = mid.to(dtype)
    parts = [base, *_steps(base, 2), *_steps(mid_t, 1)]
    g = torch.Generator().manual_seed(seed)
    lo = max(f.min_subnormal / 4, float(torch.finfo(dtype).tiny) * 2.0**-20)
    hi = min(f.max * 4, float(torch.finfo(dtype).max) / 2)
    logs = torch.empty(n_random, dtype=torch.float64).uniform_(np.log2(lo), np.log2(hi), generator=g)
    parts.append((2.0**logs).to(dtype))
    mags = torch.cat(parts + [torch.tensor([0.0, torch.finfo(dtype).max, torch.inf, torch.nan], dtype=dtype)])
    mags = mags[~mags.isnan() & ~(mags < 0)].unique()
    mags = torch.cat([mags, torch.tensor([torch.nan], dtype=dtype)])
    return torch.cat([mags, -mags])


# -- formats under test -------------------------------------------------------------------------
REGISTERED_8 = [f for f in map(get, names()) if isinstance(f, FloatFormat) and f.bits <= 8]
P3109 = [p3109(8, p) for p in (1, 3, 4, 7)] + [p3109(8, p, domain="finite") for p in (1, 3, 7)] + [
    p3109(8, p, signed=False) for p in (1, 4, 8)] + [p3109(8, p, signed=False, domain="finite") for p in (1, 4)] + [
    p3109(6, 3), p3109(4, 2, domain="finite"), p3109(3, 1, domain="finite")]
CUSTOM = [
    FloatFormat(3, 3),                                                # e3m3, IEEE specials
    FloatFormat(4, 3, neg_zero=False),                                # no -0, IEEE otherwise
    FloatFormat(4, 3, bias=5, inf=False, nan="fn"),                   # other bias, fn NaN
    FloatFormat(4, 3, bias=11, inf=False, nan="negzero"),             # ml_dtypes float8_e4m3b11fnuz
    FloatFormat(4, 2, bias=8, nan="negzero"),                         # inf and NaN at -0
    FloatFormat(6, 1, bias=32, inf=False, nan="negzero"),
    FloatFormat(3, 4, inf=False, nan="none"),                         # no inf, no NaN
    FloatFormat(4, 4, signed=False),                                  # unsigned IEEE-like
    FloatFormat(3, 0),                                                # p = 1 with subnormals and inf
    FloatFormat(5, 0, subnormals=False, inf=False, nan="fn", signed=False),  # a small E8M0
    FloatFormat(2, 2, bias=-3, inf=False, nan="fn"),                  # negative bias: no value < 4
    FloatFormat(5, 2, bias=-20),                                      # values ~2**19..2**50
    FloatFormat(8, 3, bias=140),                                      # reaches below float32 normals
    FloatFormat(8, 3, bias=150),                                      # grid finer than float32's
]
WIDE = [get("bf16"), get("fp16")]  # 16 bits: a sample of their values, all subnormals
SMALL_FORMATS = REGISTERED_8 + P3109 + CUSTOM
GFLOAT_FORMATS = SMALL_FORMATS + WIDE
# gfloat cannot describe these: its has_subnormals=False makes exponent field 0 a normal binade
# (we flush it to zero), and it takes the wrong max for a 1-bit exponent field.
NON_GFLOAT = [
    FloatFormat(3, 2, subnormals=False),                              # flush to zero, with inf
    FloatFormat(4, 3, subnormals=False, inf=False, nan="fn"),
    FloatFormat(2, 5, subnormals=False, inf=False, nan="none"),
    FloatFormat(1, 3),                                                # subnormals only
    FloatFormat(1, 2, inf=False, nan="none"),
]
FLOAT_FORMATS = GFLOAT_FORMATS + NON_GFLOAT


def fid(f) -> str:
    """Readable test id: the format's name or spec."""
    return str(f)


DTYPES = [torch.float32, torch.float64]


def did(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


@lru_cache(maxsize=None)
def sample_values(f: FloatFormat, n: int = 300, seed: int = 1) -> torch.Tensor:
    """The values of f that a grid is built around: all of them up to 12 bits, otherwise n
    random ones plus every subnormal and the ends of each binade at the range's edges."""
    v = f.values()
    if f.bits <= 12:
        return v
    g = torch.Generator().manual_seed(seed)
    a = v.abs()
    keep = (a < f.min_normal * 2) | (a >= f.max / 2)
    return torch.cat([v[torch.randint(0, len(v), (n,), generator=g)], v[keep]]).unique()


@lru_cache(maxsize=None)
def inputs(f: FloatFormat, dtype: torch.dtype) -> torch.Tensor:
    """The cached grid of f in dtype (built from sample_values)."""
    return grid(f, dtype, sample_values(f))


_F32_MAX = float(np.finfo(np.float32).max)


# -- hard inputs shared by the rounding, block and backend tests ------------------------------------
@lru_cache(maxsize=None)
def fixed_inputs(f: FixedFormat, dtype: torch.dtype) -> torch.Tensor:
    """Around every value (a sample past 8 bits) and a few past each end: the value and the
    midpoint to the next, each +-1 and +-2 ulp of dtype; specials; random data, uniform over
    1.5x the range and log-uniform magnitudes down to far below the step."""
    if f.wl <= 8:
        k = torch.arange(f.min_int - 3, f.max_int + 4, dtype=torch.float64)
    else:
        g = torch.Generator().manual_seed(f.wl)
        ends = torch.arange(-3, 20, dtype=torch.float64)
        rnd = torch.randint(f.min_int, f.max_int, (100,), generator=g, dtype=torch.int64).double()
        k = torch.cat([f.min_int + ends, -ends, f.max_int - ends, rnd])
    k = k.unique()
    v = torch.cat([k, k + 0.5]) * 2.0**-f.fl
    v = v.to(dtype)
    parts = [v]
    for d in (torch.inf, -torch.inf):
        w = v
        for _ in range(2):
            w = torch.nextafter(w, torch.full_like(w, d))
            parts.append(w)
    g = torch.Generator().manual_seed(7)
    lo, hi = 1.5 * min(f.min, -f.max), 1.5 * f.max
    parts.append((torch.rand(256, dtype=torch.float64, generator=g) * (hi - lo) + lo).to(dtype))
    logs = torch.empty(256, dtype=torch.float64).uniform_(-f.fl - 40, math.log2(f.max) + 2, generator=g)
    parts.append((2.0**logs * torch.where(torch.rand(256, generator=g) < 0.5, -1.0, 1.0)).to(dtype))
    tiny = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    specials = [0.0, -0.0, tiny, -tiny, 2 * tiny, torch.inf, -torch.inf, torch.finfo(dtype).max]
    parts.append(torch.tensor(specials, dtype=dtype))
    x = torch.cat(parts)
    return torch.cat([x[~x.isnan()].unique(), torch.tensor([torch.nan], dtype=dtype)])


@lru_cache(maxsize=None)
def float_inputs(f: FloatFormat, dtype: torch.dtype) -> torch.Tensor:
    """oracles.grid, around fewer values of formats over 8 bits and with less random data."""
    v = sample_values(f)
    if f.bits > 8:
        g = torch.Generator().manual_seed(3)
        a = v.abs()
        v = torch.cat([v[torch.randint(0, len(v), (200,), generator=g)], v[a < f.min_normal * 2][::16],
                       v[a < 8 * f.min_subnormal], v[a >= f.max / 2][::16]])
    return grid(f, dtype, v, n_random=512)


def block_data(seed: int, nblocks: int, bs: int = 32) -> np.ndarray:
    """float64 blocks, all inside float32's range, cycling through block kinds:
    log-uniform blocks centred anywhere in float32's exponent range with spreads of 0 to 40
    binades, small-integer multiples of a power of two (ties for every element grid),
    all-zero blocks (+-0), and blocks whose amax is a float32 subnormal. ~10% zeros."""
    rng = np.random.default_rng(seed)
    out = np.empty((nblocks, bs))
    for b in range(nblocks):
        kind = b % 6
        sign = rng.choice([-1.0, 1.0], bs)
        if kind in (0, 1, 2):
            e0 = rng.integers(-149, 128)
            spread = [0, 3, 40][kind]
            out[b] = sign * np.ldexp(rng.uniform(1, 2, bs), e0 - rng.integers(0, spread + 1, bs))
        elif kind == 3:
            out[b] = np.ldexp(rng.integers(-40, 41, bs).astype(float), rng.integers(-140, 120))
        elif kind == 4:
            out[b] = sign * 0.0
        else:
            out[b] = sign * np.ldexp(rng.integers(0, 2**23, bs).astype(float), -149)
    out = np.clip(out, -_F32_MAX, _F32_MAX)
    out[rng.random(out.shape) < 0.1] = 0.0
    return out.ravel()
