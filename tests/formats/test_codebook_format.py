"""Block-wise codebook formats: bitsandbytes' dynamic maps bit for bit, its portable quantize kernel
bit for bit, its CPU kernel's differences explained exactly, and codes that round-trip."""
from __future__ import annotations

import pytest
import torch

from mpcompile.errors import FormatError
from mpcompile.formats import CodebookFormat, decode, encode, parse
from mpcompile.formats.codebook_codes import block_codes, midpoints, nearest_reference
from mpcompile.rounding import quantize

F = pytest.importorskip("bitsandbytes.functional")

FORMATS = ["blockwise(dynamic8,256)", "blockwise(dynamic8u,256)", "blockwise(dynamic4,256)", "blockwise(dynamic4u,256)"]
# bitsandbytes' pure-torch kernel (CompositeExplicitAutograd), which serves devices without a native one
PORTABLE = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)


def _spread(n: int, signed: bool, seed: int = 0) -> torch.Tensor:
    """Normal values over 25 decades, so that every decade of the map is used."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.logspace(-20, 5, n)[torch.randperm(n, generator=g)].float()
    return x if signed else x.abs()


def _codes(packed: torch.Tensor, fmt: CodebookFormat) -> torch.Tensor:
    """One code per element from code bytes (two 4-bit codes a byte, the first high)."""
    if fmt.bits == 8:
        return packed.long()
    return torch.stack([packed >> 4, packed & 15], -1).view(-1).long()


@pytest.mark.parametrize("signed", [True, False])
def test_codebooks_are_bitsandbytes_dynamic_maps(signed):
    ours = parse("blockwise(dynamic8,256)" if signed else "blockwise(dynamic8u,256)").values()
    assert torch.equal(ours.view(torch.int32), F.create_dynamic_map(signed=signed).view(torch.int32))
    four = parse("blockwise(dynamic4,256)" if signed else "blockwise(dynamic4u,256)").values()
    # with 4 bits bitsandbytes pads its 16 entries to 256 with zeros
    assert torch.equal(four, torch.unique(F.create_dynamic_map(signed=signed, max_exponent_bits=3, total_bits=4)))
    assert four.numel() == 16 and torch.equal(four, four.sort().values)


def test_specs_read_and_print_back():
    for spec in FORMATS + ["blockwise(dynamic4u,64)"]:
        assert str(parse(spec)) == spec and parse(str(parse(spec))) == parse(spec)
    assert parse("blockwise(dynamic8)") == CodebookFormat("dynamic8", 256)
    assert (parse("blockwise(dynamic4,256)").bits, parse("blockwise(dynamic8u,256)").signed) == (4, False)
    for spec, says in [("blockwise(dynamic9,256)", "cannot use the arguments dynamic9"),
                       ("blockwise(256)", "name one codebook"), ("blockwise(dynamic8,255)", "must be even"),
                       ("blockwise(dynamic8,256,axis=0)", "unknown option axis")]:
        with pytest.raises(FormatError, match=says):
            parse(spec)


@pytest.mark.parametrize("spec", FORMATS)
def test_codes_are_the_nearest_entry_by_the_rule(spec):
    """The table kernel against the rule itself (how many float32 midpoints lie below v), on
    random values of every magnitude and on each entry and midpoint and their neighbours."""
    fmt = parse(spec)
    entries = fmt.values()
    near = torch.cat([entries, midpoints(entries)])
    for _ in range(2):
        near = torch.cat([near, torch.nextafter(near, torch.full_like(near, 2.0)),
                          torch.nextafter(near, torch.full_like(near, -2.0))])
    g = torch.Generator().manual_seed(0)
    spread = (torch.rand(50_000, generator=g) * 2 - 1) * torch.exp2(-torch.randint(0, 40, (50_000,), generator=g).float())
    v = torch.cat([spread, near, torch.tensor([0.0, -0.0])]).clamp(-1, 1)
    v = v if fmt.signed else v.abs()
    v = torch.nn.functional.pad(v, (0, (-v.numel()) % 255)).view(-1, 255)
    blocks = torch.cat([torch.ones(v.shape[0], 1), v], 1)  # absmax 1: the kernel sees v itself
    codes = _codes(block_codes(blocks, fmt)[0], fmt).view(-1, 256)[:, 1:]
    assert torch.equal(codes, nearest_reference(v, entries))


@pytest.mark.parametrize("signed", [True, False])
def test_quantize_is_bitsandbytes_portable_kernel_bit_for_bit(signed):
    fmt = parse("blockwise(dynamic8,256)" if signed else "blockwise(dynamic8u,256)")
    x = _spread(100_003, signed)  # a ragged last block
    x[:256], x[256:512] = 0.0, x[256:512].sign() * torch.linspace(1e-39, 3e-39, 256)  # zeros; absmax < 1e-38
    code = F.create_dynamic_map(signed=signed)
    theirs, absmax = torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(PORTABLE, x, code, 256)
    codes, ours_absmax = block_codes(x, fmt)
    assert torch.equal(codes[:x.numel()], theirs) and torch.equal(ours_absmax, absmax)
    values = F.dequantize_blockwise(theirs, absmax=absmax, code=code, blocksize=256)
    assert torch.equal(quantize(x, fmt).view(torch.int32), values.view(torch.int32))


@pytest.mark.parametrize("signed", [True, False])
def test_bitsandbytes_cpu_kernel_differs_only_by_its_lookup_grid(signed):
    """bitsandbytes' CPU kernel (csrc/cpu_ops.cpp, 0.50) first rounds v = x * (1 / absmax) to the
    nearest of 65536 evenly spaced points of [-1, 1] (2 / 65535 apart), then takes the entry
    nearest that point: its codes are the rule applied to the grid point, ours the rule applied
    to v. So they differ where a midpoint lies between v and its grid point, and for |v| below
    half a spacing, 1.5e-5, where the two lowest decades of the map lie: 0 itself gets the code
    of an entry of about 2e-5, so a zero decodes to about 2e-5 x absmax there."""
    fmt = parse("blockwise(dynamic8,256)" if signed else "blockwise(dynamic8u,256)")
    code = F.create_dynamic_map(signed=signed)
    x = _spread(100_003, signed, seed=1)
    theirs, _ = F.quantize_blockwise(x, code=code, blocksize=256)
    codes, absmax = block_codes(x, fmt)
    blocks = torch.nn.functional.pad(x, (0, (-x.numel()) % 256)).view(-1, 256)
    v = (blocks * (1.0 / absmax)[:, None]).view(-1)[:x.numel()]
    index = (((v.clamp(-1, 1) + 1.0) * 0.5 * 65535.0 + 0.5).to(torch.int32)).float()
    grid_point = -1.0 + (2.0 * index) / 65535.0
    assert torch.equal(theirs.long(), nearest_reference(grid_point, code))
    assert torch.equal(codes[:x.numel()].long(), nearest_reference(v, code))
    differ = theirs.long() != codes[:x.numel()].long()
    assert bool(differ.any()) and bool((v[differ].abs() < 1.6e-5).float().mean() > 0.9)
    zero = code[nearest_reference(torch.tensor([-1.0 + 2.0 * 32768 / 65535]), code)]
    assert 1e-5 < float(zero) < 3e-5


@pytest.mark.parametrize("spec", FORMATS)
def test_codes_round_trip_and_take_the_bytes_they_promise(spec):
    fmt = parse(spec)
    x = _spread(3 * 333, fmt.signed, seed=2).view(3, 333).double()  # float64 is read as float32
    if fmt.signed:  # a block whose largest magnitude is negative: its scale is found from the lowest entry
        x[0, :256] = -x[0, :256].abs()
    q = quantize(x, fmt)
    assert q.dtype == torch.float64 and torch.equal(q, quantize(x.float(), fmt).double())
    packed = encode(q, fmt)
    blocks = -(-x.numel() // 256)
    assert packed.nbytes == -(-x.numel() * fmt.bits // 8) + 4 * blocks
    assert torch.equal(decode(packed, fmt, q.shape, torch.float64), q)
    with pytest.raises(FormatError, match="not values of"):
        encode(x, fmt)


def test_special_blocks_and_what_is_refused():
    fmt = parse("blockwise(dynamic8,256)")
    x = torch.randn(4, 256)
    x[0], x[1, 3], x[2, 7] = 0.0, torch.nan, torch.inf
    q = quantize(x, fmt)
    assert torch.equal(q[0], torch.zeros(256)) and bool(q[1:3].isnan().all()) and not bool(q[3].isnan().any())
    back = decode(encode(q, fmt), fmt, q.shape)
    assert torch.equal(back.isnan(), q.isnan()) and torch.equal(back[~q.isnan()], q[~q.isnan()])
    unsigned = quantize(torch.tensor([-3.0, 2.0, 0.0]), "blockwise(dynamic8u,256)")
    assert unsigned.tolist() == [0.0, 2.0, 0.0]  # an unsigned block is scaled by its largest value, not -3
    with pytest.raises(ValueError, match="nearest codebook entry only"):
        quantize(x, fmt, "stochastic")
    with pytest.raises(ValueError, match="apply only to rounding='stochastic'"):
        quantize(x, fmt, sr_bits=4)
    with pytest.raises(ValueError, match="needs the tensor's shape"):
        decode(encode(q[3], fmt), fmt)
