"""Block-scaled formats (MX, BlockFloat, BlockMinifloat) against independent oracles.

Oracles: ``gfloat.quantize_block`` with ``gfloat.compute_scale_amax`` for the OCP MX formats
(deterministic modes), ``gfloat.round_ndarray`` on ``x / 2**s`` for stochastic MX and for
block minifloat elements, and a few lines of numpy (below) for block floating point.
Every comparison is bitwise: values, sign of zero, NaN == NaN.
"""
from __future__ import annotations

import math

import gfloat
import gfloat.formats as gf
import numpy as np
import pytest
import torch

import mpcompile
from mpcompile.formats import BlockFloat, BlockMinifloat, FloatFormat, MXFormat, get
from oracles import block_data

MX_NAMES = ["mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4_e2m1", "mxint8"]
GF_MODE = {
    "nearest": gfloat.RoundMode.TiesToEven,
    "nearest_away": gfloat.RoundMode.TiesToAway,
    "toward_zero": gfloat.RoundMode.TowardZero,
    "up": gfloat.RoundMode.TowardPositive,
    "down": gfloat.RoundMode.TowardNegative,
}
DET_MODES = list(GF_MODE)


# -- helpers ----------------------------------------------------------------------------------
def assert_bitwise(got, want, x=None):
    """Equal values, equal sign of zero, NaN where and only where the other is NaN."""
    got = np.asarray(got.numpy() if isinstance(got, torch.Tensor) else got, dtype=np.float64).ravel()
    want = np.asarray(want, dtype=np.float64).ravel()
    assert got.shape == want.shape
    same = (got == want) & (np.signbit(got) == np.signbit(want)) | (np.isnan(got) & np.isnan(want))
    if not same.all():
        idx = np.flatnonzero(~same)[:8]
        xs = [] if x is None else np.asarray(x, dtype=np.float64).ravel()[idx]
        rows = [f"  [{i}] x={xs[k] if len(xs) else '?'!r} got={got[i]!r} want={want[i]!r}" for k, i in enumerate(idx)]
        raise AssertionError(f"{(~same).sum()} of {got.size} differ:\n" + "\n".join(rows))


def gfloat_mx(name: str, x: np.ndarray, mode: str, bs: int = 32) -> np.ndarray:
    fi = getattr(gf, f"format_info_{name}")
    blocks = np.asarray(x, dtype=np.float64).reshape(-1, bs)
    return np.concatenate([gfloat.quantize_block(fi, b, gfloat.compute_scale_amax, GF_MODE[mode]) for b in blocks])


def scale_exp(blocks: np.ndarray, emax: int) -> np.ndarray:
    """s = clip(floor(log2(amax)) - emax, -127, 127) per row, -127 for all-zero rows, 127 for inf."""
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    with np.errstate(all="ignore"):
        e = np.frexp(np.where(np.isfinite(amax) & (amax > 0), amax, 1.0))[1] - 1
    s = np.clip(e - emax, -127, 127)
    s = np.where(amax == 0, -127, s)
    return np.where(np.isinf(amax), 127, s)


def gfloat_info(fmt: FloatFormat) -> gfloat.FormatInfo:
    """gfloat FormatInfo of a BlockMinifloat element (no inf, no NaN, with subnormals and -0)."""
    assert not fmt.inf and fmt.nan == "none" and fmt.subnormals and fmt.signed
    return gfloat.FormatInfo(f"e{fmt.exp}m{fmt.man}", k=1 + fmt.exp + fmt.man, precision=fmt.man + 1,
                             bias=2 ** (fmt.exp - 1) - 1, is_signed=True, domain=gfloat.Domain.Finite,
                             has_nz=True, num_high_nans=0, has_subnormals=True, is_twos_complement=False)


def ref_block_float(x: np.ndarray, wl: int, bs: int, mode: str) -> np.ndarray:
    """BlockFloat: integers k * 2**(s - (wl-2)), k clamped to the wl-bit two's complement range."""
    emax = math.frexp((2 ** (wl - 1) - 1) / 2 ** (wl - 2))[1] - 1
    blocks = x.reshape(-1, bs)
    q = np.ldexp(1.0, scale_exp(blocks, emax) - (wl - 2))
    y = blocks / q
    k = {"nearest": np.round, "toward_zero": np.trunc, "up": np.ceil, "down": np.floor,
         "nearest_away": lambda v: np.sign(v) * np.floor(np.abs(v) + 0.5)}[mode](y)
    r = np.clip(k, -(2 ** (wl - 1)), 2 ** (wl - 1) - 1) * q
    return np.where(r == 0, 0.0, r).ravel()  # fixed point has no -0


def ref_block_minifloat(x: np.ndarray, exp: int, man: int, bs: int, mode: str) -> np.ndarray:
    fi = gfloat_info(BlockMinifloat(exp, man, bs).element)
    blocks = x.reshape(-1, bs)
    q = np.ldexp(1.0, scale_exp(blocks, fi.emax))
    return (gfloat.round_ndarray(fi, blocks / q, GF_MODE[mode], sat=True) * q).ravel()


# -- MX against gfloat.quantize_block ---------------------------------------------------------
@pytest.mark.parametrize("mode", DET_MODES)
@pytest.mark.parametrize("name", MX_NAMES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_mx_matches_gfloat(name, mode, dtype):
    x = block_data(seed=MX_NAMES.index(name), nblocks=36)
    x = torch.tensor(x, dtype=dtype)
    want = gfloat_mx(name, x.double().numpy(), mode)
    assert_bitwise(mpcompile.quantize(x, name, mode), want, x)


@pytest.mark.parametrize("mode", DET_MODES)
@pytest.mark.parametrize("name", MX_NAMES)
def test_mx_blocks_with_inf_match_gfloat(name, mode):
    """inf makes amax = inf, s = 127; the inf saturates to +-max * 2**127 (finite in float64)."""
    rng = np.random.default_rng(7)
    x = block_data(seed=11, nblocks=6).reshape(6, 32)
    x[:3] *= 2.0**-90  # small neighbours: flushed to zero by the 2**127 scale
    x[3:] = np.ldexp(rng.uniform(1, 2, (3, 32)), rng.integers(110, 128, (3, 32))) * rng.choice([-1, 1], (3, 32))
    x[np.arange(6), rng.integers(0, 32, 6)] = [np.inf, -np.inf, np.inf, -np.inf, np.inf, -np.inf]
    x[5, 0] = np.inf  # +inf and -inf in one block
    want = gfloat_mx(name, x, mode)
    got = mpcompile.quantize(torch.tensor(x), name, mode)
    assert_bitwise(got, want, x)
    assert np.isfinite(want).all()


@pytest.mark.parametrize("name", MX_NAMES)
def test_mx_inf_in_float32_overflows_to_inf(name):
    """Same rule in float32: +-max * 2**127 is beyond float32, so the inf stays inf."""
    x = np.ldexp(np.linspace(1, 1.9, 32), np.arange(96, 128)) * np.resize([1, -1], 32)
    x[[3, 20]] = [np.inf, -np.inf]
    got = mpcompile.quantize(torch.tensor(x, dtype=torch.float32), name)
    with np.errstate(over="ignore"):
        want = gfloat_mx(name, x.astype(np.float32).astype(np.float64), "nearest").astype(np.float32)
    assert_bitwise(got, want, x)
    elem = get(name).element  # +-inf -> +-max * 2**127 (int8: -2 * 2**127 on the negative side), rounded to float32
    with np.errstate(over="ignore"):
        hi, lo = np.float32(elem.max * 2.0**127), np.float32(getattr(elem, "min", -elem.max) * 2.0**127)
    assert got[3].item() == hi and got[20].item() == lo
    assert (hi == np.inf) == (name != "mxint8")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", MX_NAMES)
def test_mx_nan_poisons_its_block_only(name, dtype):
    x = block_data(seed=3, nblocks=6).reshape(6, 32)[[0, 1, 2, 3, 4, 0]] * 2.0**-20
    x[1, 5] = np.nan
    x[4, :] = np.nan
    got = mpcompile.quantize(torch.tensor(x, dtype=dtype), name).double().numpy()
    assert np.isnan(got[[1, 4]]).all()
    clean = [0, 2, 3, 5]
    assert_bitwise(got[clean], gfloat_mx(name, x[clean].astype(dtype_np(dtype)).astype(np.float64), "nearest"))
    if getattr(gf, f"format_info_{name}").etype.num_nans > 0:  # gfloat agrees where the element has NaN
        assert_bitwise(got, gfloat_mx(name, x.astype(dtype_np(dtype)).astype(np.float64), "nearest"))
    else:
        with pytest.raises(ValueError):
            gfloat_mx(name, x[1], "nearest")


def dtype_np(dtype):
    return {torch.float64: np.float64, torch.float32: np.float32}[dtype]


def test_mx_all_zero_and_subnormal_blocks():
    """All-zero blocks keep their signs of zero (s = -127); a block of float32 subnormals
    is scaled by 2**-127 and keeps as much as the element grid allows."""
    x = np.zeros((3, 32))
    x[0] = np.resize([0.0, -0.0], 32)
    x[1] = np.ldexp(np.arange(1, 33, dtype=float), -149)
    x[2] = -np.ldexp(np.arange(1, 33, dtype=float), -140)
    for dtype in (torch.float32, torch.float64):
        got = mpcompile.quantize(torch.tensor(x, dtype=dtype), "mxfp8_e4m3")
        assert_bitwise(got, gfloat_mx("mxfp8_e4m3", x, "nearest"), x)
        assert_bitwise(got[0], x[0])


# -- stochastic MX against gfloat.round_ndarray on x / 2**s ------------------------------------------
@pytest.mark.parametrize("sr_bits", [None, 3, 8], ids=["sr_default", "sr3", "sr8"])
@pytest.mark.parametrize("name", MX_NAMES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_mx_stochastic_matches_gfloat_round_ndarray(name, dtype, sr_bits):
    fmt = get(name)
    n = sr_bits if sr_bits is not None else mpcompile.rounding.default_sr_bits(fmt, dtype)
    x = torch.tensor(block_data(seed=20 + MX_NAMES.index(name), nblocks=24), dtype=dtype)
    bits = torch.randint(0, 2**n, x.shape, generator=torch.Generator().manual_seed(n), dtype=torch.int64)
    got = mpcompile.quantize(x, fmt, "stochastic", sr_bits=sr_bits, random_bits=bits)

    fi = getattr(gf, f"format_info_{name}").etype
    blocks = x.double().numpy().reshape(-1, 32)
    q = np.ldexp(1.0, scale_exp(blocks, fi.emax))
    want = gfloat.round_ndarray(fi, blocks / q, gfloat.RoundMode.Stochastic, sat=True,
                                srbits=bits.numpy().reshape(-1, 32), srnumbits=n) * q
    assert_bitwise(got, want, x)


# -- BlockFloat and BlockMinifloat against the references above ------------------------------------
@pytest.mark.parametrize("mode", DET_MODES)
@pytest.mark.parametrize("wl,bs", [(2, 8), (3, 16), (4, 32), (8, 16), (12, 32), (16, 4), (24, 32), (32, 8)])
def test_block_float_matches_reference(wl, bs, mode):
    x = block_data(seed=wl, nblocks=96 // bs * 4, bs=bs)
    got = mpcompile.quantize(torch.tensor(x), BlockFloat(wl, bs), mode)
    assert_bitwise(got, ref_block_float(x, wl, bs, mode), x)


@pytest.mark.parametrize("wl", [4, 8, 16])
def test_block_float_float32_input(wl):
    x = block_data(seed=40 + wl, nblocks=24, bs=16).astype(np.float32)
    got = mpcompile.quantize(torch.tensor(x), BlockFloat(wl, 16))
    assert got.dtype == torch.float32
    assert_bitwise(got, ref_block_float(x.astype(np.float64), wl, 16, "nearest"), x)


@pytest.mark.parametrize("mode", DET_MODES)
@pytest.mark.parametrize("exp,man,bs", [(1, 2, 8), (2, 1, 16), (2, 5, 16), (3, 0, 8), (4, 3, 32), (5, 2, 32), (3, 8, 4)])
def test_block_minifloat_matches_reference(exp, man, bs, mode):
    x = block_data(seed=10 * exp + man, nblocks=128 // bs * 3, bs=bs)
    got = mpcompile.quantize(torch.tensor(x), BlockMinifloat(exp, man, bs), mode)
    assert_bitwise(got, ref_block_minifloat(x, exp, man, bs, mode), x)


def test_man0_element_ties_follow_the_element_code_parity():
    """e3m0 elements: 6 in a block scaled by 2**1 is the element 3, a tie between the codes of
    2 (even) and 4 (odd); ties-to-even gives 2, i.e. 4 after scaling (gfloat: same)."""
    x = torch.tensor([32.0, 6.0, 64.0, 12.0], dtype=torch.float64)
    assert_bitwise(mpcompile.quantize(x, BlockMinifloat(3, 0, 2)), [32.0, 4.0, 64.0, 8.0])
    assert_bitwise(mpcompile.quantize(x, BlockMinifloat(3, 0, 2)), ref_block_minifloat(x.numpy(), 3, 0, 2, "nearest"))


@pytest.mark.parametrize("exp,man", [(2, 5), (4, 3)])
def test_block_minifloat_float32_input(exp, man):
    x = block_data(seed=50 + exp, nblocks=24, bs=16).astype(np.float32)
    got = mpcompile.quantize(torch.tensor(x), BlockMinifloat(exp, man, 16))
    assert_bitwise(got, ref_block_minifloat(x.astype(np.float64), exp, man, 16, "nearest"), x)


@pytest.mark.parametrize("mode", DET_MODES + ["stochastic"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_bfp8_is_mxint8(dtype, mode):
    x = torch.tensor(block_data(seed=5, nblocks=30), dtype=dtype)
    kw = {}
    if mode == "stochastic":
        kw["random_bits"] = torch.randint(0, 2**10, x.shape, generator=torch.Generator().manual_seed(1))
        kw["sr_bits"] = 10
    assert BlockFloat(8, 32).element == get("mxint8").element
    assert_bitwise(mpcompile.quantize(x, BlockFloat(8, 32), mode, **kw), mpcompile.quantize(x, "mxint8", mode, **kw))


# -- layout: axis, tail blocks, block size 1 ----------------------------------------------------------
LAYOUT_FORMATS = {
    "mxfp8_e4m3": lambda bs, axis: MXFormat(get("fp8_e4m3"), bs, axis),
    "mxint8": lambda bs, axis: MXFormat(get("mxint8").element, bs, axis),
    "bfp6": lambda bs, axis: BlockFloat(6, bs, axis),
    "bm_e2m3": lambda bs, axis: BlockMinifloat(2, 3, bs, axis),
}


def rand_tensor(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64) * torch.exp2(torch.randint(-30, 30, shape, generator=g))


@pytest.mark.parametrize("make", LAYOUT_FORMATS.values(), ids=LAYOUT_FORMATS.keys())
@pytest.mark.parametrize("shape,axis", [((64, 5), 0), ((48, 3, 4), 0), ((3, 40, 2), 1), ((2, 3, 48), -1), ((5, 64), -2)],
                         ids=["2d_axis0", "3d_axis0", "3d_axis1", "3d_axis-1", "2d_axis-2"])
def test_axis_equals_moving_that_axis_last(make, shape, axis):
    x = rand_tensor(shape, seed=len(shape) + axis)
    got = mpcompile.quantize(x, make(16, axis))
    want = mpcompile.quantize(x.movedim(axis, -1).contiguous(), make(16, -1)).movedim(-1, axis)
    assert_bitwise(got, want.contiguous())


def test_axis_0_on_2d_equals_transpose():
    x = rand_tensor((96, 7), seed=1)
    assert_bitwise(mpcompile.quantize(x, "mx(fp8_e4m3,32,axis=0)"), mpcompile.quantize(x.T.contiguous(), "mxfp8_e4m3").T.contiguous())


@pytest.mark.parametrize("make", LAYOUT_FORMATS.values(), ids=LAYOUT_FORMATS.keys())
@pytest.mark.parametrize("n", [1, 5, 37, 70])
def test_tail_block_is_quantized_on_its_own(make, n):
    x = rand_tensor((3, n), seed=n)
    x[:, -1] *= 2.0**20  # the tail's amax differs from the last full block's
    got = mpcompile.quantize(x, make(32, -1))
    full = n // 32 * 32
    if full:
        assert_bitwise(got[:, :full], mpcompile.quantize(x[:, :full].contiguous(), make(32, -1)))
    assert_bitwise(got[:, full:], mpcompile.quantize(x[:, full:].contiguous(), make(32, -1)))


@pytest.mark.parametrize("name", ["mxfp8_e4m3", "mxfp4_e2m1", "mxint8"])
def test_block_size_1_matches_gfloat_per_element(name):
    x = block_data(seed=9, nblocks=8)
    fmt = MXFormat(get(name).element, 1)
    got = mpcompile.quantize(torch.tensor(x), fmt)
    assert_bitwise(got, gfloat_mx(name, x, "nearest", bs=1), x)


@pytest.mark.parametrize("mode", ["nearest", "up"])
def test_block_size_1_block_float_and_minifloat(mode):
    x = block_data(seed=2, nblocks=8)
    assert_bitwise(mpcompile.quantize(torch.tensor(x), BlockFloat(5, 1), mode), ref_block_float(x, 5, 1, mode), x)
    assert_bitwise(mpcompile.quantize(torch.tensor(x), BlockMinifloat(3, 2, 1), mode),
                   ref_block_minifloat(x, 3, 2, 1, mode), x)


@pytest.mark.parametrize("bs", [8, 16, 64])
def test_mx_other_block_sizes_match_gfloat(bs):
    x = block_data(seed=bs, nblocks=512 // bs, bs=bs)
    got = mpcompile.quantize(torch.tensor(x), MXFormat(get("fp6_e3m2"), bs))
    assert_bitwise(got, gfloat_mx("mxfp6_e3m2", x, "nearest", bs=bs), x)
