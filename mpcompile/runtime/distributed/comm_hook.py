"""A DDP communication hook that sends each gradient bucket in the policy's ``communication`` format.

Each rank adds its error-feedback residual (where on), divides each parameter's gradient by
its power-of-two scales (one per parameter, or one per block of it; where ``shared_scale``, the
largest rank's, after one all-reduce of the amaxes), rounds it to the format (nearest, or
stochastic from a generator per rank and parameter), and packs it: a format with a torch dtype
(bf16, fp16, the OCP fp8s, and MX formats whose element has one, with OCP's E8M0 exponents) by
a clamped cast, one byte or two a code; any other through ``formats.encode`` (uint8 codes for
formats of at most 8 bits, int16 up to 16; MX / BFP with their E8M0 block scales). The codes
and scales are all-gathered, every rank decodes all of them, and the mean of the ranks'
gradients is taken in fp32 in rank order, so every rank holds the same bytes. A scale is a
power of two from ``ceil(log2(amax / max))``: dividing by it is exact and no element passes the
format's largest value; it travels as its int8 exponent. Bytes sent per rank are counted
(``Traffic``) against the nominal bits. The cast path keeps its scratch buffers from step to
step; on the CPU the rounding to a torch dtype (with its residual), the ranks' sum and the
blocks' amaxes are fused C++ kernels (``codegen/comm_hook_cpu.py``), one pass over the bucket
each and bit-identical to the torch operations they replace, which run piece by piece in cache
elsewhere (benchmarks/comm.py, docs/distributed.md).
"""
import itertools
import math  # no `from __future__ import annotations`: DDP reads the hook's annotations as types
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ...backends import run_or_fall_back
from ...codegen.comm_hook_cpu import CODE_DTYPES, accumulate_codes_, block_amax, load_kernel, quantize_codes_
from ...formats import BlockFormat, MXFormat, Packed, decode, encode, torch_dtype, widen
from ...formats.block_format import SCALE_EXP_MAX, SCALE_EXP_MIN
from ...policy import CommunicationSettings
from ...rounding import quantize

__all__ = ["Traffic", "QuantizedGradients", "quantized_allreduce_hook"]

_PIECE = 1 << 17  # elements: 512 KB of fp32, which stay in a core's cache between the passes over them
_FAILED: set[str] = set()  # "cpu" once the CPU kernels failed to build: torch's operations from then on


@dataclass
class Traffic:
    """Bytes one rank sent since the last ``reset``: as sent, at the format's nominal bits, and in fp32."""

    sent: int = 0
    nominal: int = 0
    fp32: int = 0

    def reset(self) -> "Traffic":
        """The counts so far; the counters start again from 0."""
        counts = Traffic(self.sent, self.nominal, self.fp32)
        self.sent = self.nominal = self.fp32 = 0
        return counts


class QuantizedGradients:
    """The state of ``quantized_allreduce_hook`` on one rank.

    Args:
        settings: the policy's ``communication`` section.
        params: the model's parameters (residuals are kept per parameter).
        seed: the run's seed; stochastic rounding draws from a generator per parameter, seeded with
            it, the rank and the parameter's index.
        group: the process group (None: the default one).
    """

    def __init__(self, settings: CommunicationSettings, params: list[torch.nn.Parameter], seed: int = 0,
                 group: dist.ProcessGroup | None = None):
        self.settings, self.group = settings, group
        self.index = {id(p): i for i, p in enumerate(params)}  # a parameter's key: its place in the model
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.seed = seed
        self.residuals: dict[int, torch.Tensor] = {}  # parameter index -> what rounding took from it last step
        self.generators: dict[int, torch.Generator] = {}  # parameter index -> its stochastic rounding's stream
        self.traffic = Traffic()
        self._device = params[0].device if params else torch.device("cpu")
        self._buffers: dict[str, torch.Tensor] = {}

    def generator(self, key: int, device: torch.device) -> torch.Generator:
        """Parameter ``key``'s generator on this rank (seeded with the seed, the rank and the key)."""
        if key not in self.generators:
            seed = (self.seed * 1_000_003 + self.rank) * 1_000_003 + key
            self.generators[key] = torch.Generator(device).manual_seed(seed % 2**63)
        return self.generators[key]

    def state_dict(self) -> dict:
        """The residuals and generator states of this rank."""
        return {"residuals": {i: r.cpu() for i, r in self.residuals.items()},
                "generators": {k: (str(g.device), g.get_state()) for k, g in self.generators.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.residuals = dict(state["residuals"])
        self.generators = {}
        for key, (device, rng) in state["generators"].items():
            self.generator(key, torch.device(device)).set_state(rng)

    def buffer(self, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A scratch tensor kept from step to step: a bucket's worth of fresh memory costs more in
        page faults than the pass that fills it. Its contents are garbage."""
        held = self._buffers.get(name)
        if held is None or held.numel() < numel or held.dtype != dtype:
            held = self._buffers[name] = torch.empty(numel, dtype=dtype, device=self._device)
        return held[:numel]

    @property
    def element(self):
        fmt = self.settings.format
        return fmt.element if isinstance(fmt, BlockFormat) else fmt


def _add_residuals_(x: torch.Tensor, residuals: "list[torch.Tensor | None]", sizes: list[int], padded: list[int],
                    amax: bool) -> torch.Tensor | None:
    """Each parameter's residual (where it has one) added to its stretch of ``x``, in place; with
    ``amax``, each parameter's largest magnitude (NaN if it holds one), from the same pass while a
    piece is in cache (aminmax: no |x| copy; linalg's inf-norm is ten times slower)."""
    starts = [0, *itertools.accumulate(padded)]
    ends: list[list[torch.Tensor]] = [[] for _ in padded]
    for piece, i in _pieces(padded, None, per_parameter=True):
        first, stop = piece.start - starts[i], min(piece.stop - starts[i], sizes[i])  # within the parameter
        if residuals[i] is not None and first < stop:
            x[piece.start:piece.start + stop - first].add_(residuals[i][first:stop].to(x.device))
        if amax:
            ends[i].append(torch.stack(torch.aminmax(x[piece])))
    if not amax:
        return None
    lo_hi = [torch.stack(e) if e else x.new_zeros(1, 2) for e in ends]  # a parameter of no elements: 0
    return torch.stack([torch.maximum(t[:, 1].max(), -t[:, 0].min()) for t in lo_hi])


def _exponents(state: "QuantizedGradients", amax: torch.Tensor, fmt_max: float) -> torch.Tensor:
    """The int8 exponent e of each scale 2**e that brings an ``amax`` to at most ``fmt_max`` (0 for
    an all-zero or non-finite one); with ``shared_scale``, of the ranks' largest amax (its
    all-reduce counted as sent, fp32)."""
    if state.settings.shared_scale:
        dist.all_reduce(amax, dist.ReduceOp.MAX, group=state.group)
        state.traffic.sent += amax.numel() * amax.element_size()
    finite = torch.where(torch.isfinite(amax) & (amax > 0), amax, torch.ones_like(amax))
    return torch.ceil(torch.log2(finite / fmt_max)).clamp(-126, 127).to(torch.int8)


def _mx_exponents(amax: torch.Tensor, elem_emax: int) -> torch.Tensor:
    """OCP MX's E8M0 scale exponents as int8, as ``quantize`` takes them: floor(log2(amax)) - the
    element's emax, clipped to [-127, 127]; an all-zero block -127, an infinite one 127 (a NaN
    one: any, its elements are NaN)."""
    log2 = torch.frexp(amax).exponent - 1  # exact, subnormal amax too
    e = (log2 - elem_emax).clamp_(SCALE_EXP_MIN, SCALE_EXP_MAX)
    e = torch.where(amax == 0, SCALE_EXP_MIN, torch.where(torch.isinf(amax), SCALE_EXP_MAX, e))
    return e.to(torch.int8)


def _scale_(x: torch.Tensor, exponents: torch.Tensor | None, padded: list[int], unit: int | None,
            sign: int) -> torch.Tensor:
    """``x`` times 2**(sign * e) in place, e each parameter's (``padded`` lengths) or each block's
    (``unit`` elements) exponent; x unchanged without exponents."""
    per_parameter = exponents is not None and unit is None
    factors = _factors(exponents, per_parameter, sign)
    if factors is not None:
        for piece, which in _pieces(padded, unit, per_parameter):
            _scale_piece_(x[piece], factors[which], unit)
    return x


def _cast_in_pieces(x: torch.Tensor, codes: torch.Tensor, left: torch.Tensor | None, exponents: torch.Tensor | None,
                    padded: list[int], unit: int | None, bound: float | None, scratch: torch.Tensor) -> None:
    """``codes`` (a torch dtype) = ``x / 2**e`` cast, clamped to +-``bound`` first where set; with
    ``left``, the residual ``(x / 2**e - q) * 2**e`` too. Piece by piece through ``scratch``: x is
    read from memory once, and the scaled piece stays in cache for the cast and the residual. On
    the CPU the fused kernel takes each stretch of one scale in one pass."""
    per_parameter = exponents is not None and unit is None
    down, up = _factors(exponents, per_parameter, -1), _factors(exponents, per_parameter, 1)
    fused = codes.dtype in CODE_DTYPES and codes.device.type == "cpu" and _cpu_kernels()
    for piece, which in _pieces(padded, unit, per_parameter, None if fused else _PIECE):
        if fused:
            quantize_codes_(x[piece], codes[piece], None if left is None else left[piece],
                            _factor_tensor(down, which), _factor_tensor(up, which), unit, bound)
            continue
        scaled = scratch[:piece.stop - piece.start].copy_(x[piece])
        _scale_piece_(scaled, _factor(down, which), unit)
        cast = codes[piece].copy_(scaled if bound is None else scaled.clamp(-bound, bound))
        if left is not None:
            residual = torch.sub(scaled, left[piece].copy_(cast), out=left[piece])
            _scale_piece_(residual, _factor(up, which), unit)


def _cpu_kernels() -> bool:
    """Whether the fused CPU kernels run here (a build failure is warned about once)."""
    return run_or_fall_back(_FAILED, "cpu", lambda: load_kernel() is not None, lambda: False,
                            "the communication hook's CPU kernels (codegen/comm_hook_cpu.py)")


def _factors(exponents: torch.Tensor | None, per_parameter: bool, sign: int) -> "list[float] | torch.Tensor | None":
    """2**(sign * e): a float per parameter, or a (blocks, 1) tensor per block, or None."""
    if exponents is None:
        return None
    factors = torch.exp2(sign * exponents.float())
    return factors.tolist() if per_parameter else factors[:, None]


def _factor(factors: "list[float] | torch.Tensor | None", which: Any) -> "float | torch.Tensor | None":
    """The factor(s) of one piece (``_pieces``' ``which``) of what ``_factors`` gave."""
    return None if factors is None else factors[which]


def _factor_tensor(factors: "list[float] | torch.Tensor | None", which: Any) -> torch.Tensor | None:
    """``_factor`` as the fused kernels take it: a float32 tensor of one factor, or of one per block."""
    f = _factor(factors, which)
    if isinstance(f, float):
        return torch.tensor([f], dtype=torch.float32)
    return None if f is None else f.reshape(-1)


def _sum_ranks_(total: torch.Tensor, spare: torch.Tensor, values: list[torch.Tensor], exponents: list,
                padded: list[int], unit: int | None) -> torch.Tensor:
    """``total`` overwritten with the mean of the ranks' ``values`` times their scales 2**e: summed
    in rank order (every rank sums alike), then divided by the number of ranks. Piece by piece: a
    piece's partial sum stays in cache while each rank's values are cast into ``spare`` and added
    (``values``: decoded floats, or codes as a torch dtype). The products are exact, so this is
    the mean of the rescaled values, in fewer passes over memory."""
    per_parameter = exponents[0] is not None and unit is None
    factors = [_factors(e, per_parameter, 1) for e in exponents]
    fused = values[0].dtype in CODE_DTYPES and total.device.type == "cpu" and _cpu_kernels()
    for piece, which in _pieces(padded, unit, per_parameter, None if fused else _PIECE):
        t = total[piece]
        if fused:  # widen, scale, sum and divide in one pass over the piece
            accumulate_codes_([v[piece] for v in values], t, [_factor_tensor(f, which) for f in factors], unit)
            continue
        for rank, (v, rank_factors) in enumerate(zip(values, factors)):
            f = _factor(rank_factors, which)
            if rank == 0:
                _scale_piece_(widen(v[piece], t), f, unit)
                continue
            part = widen(v[piece], spare[:t.numel()])
            if f is None:
                t.add_(part)
            elif isinstance(f, float):
                t.add_(part, alpha=f)
            else:
                t.view(-1, unit).addcmul_(part.view(-1, unit), f)
        t.div_(len(values))
    return total


def _pieces(padded: list[int], unit: int | None, per_parameter: bool,
            limit: int | None = _PIECE) -> Iterator[tuple[slice, Any]]:
    """The bucket in pieces of at most ``limit`` elements (None: as large as the scales allow)
    and what scales each: with a scale per parameter, pieces within one parameter and its index;
    with one per block, pieces of whole blocks and their block slice; with none, None. The fused
    kernels take whole stretches: they make one pass whatever the length."""
    start, total = 0, sum(padded)
    if per_parameter:
        for i, n in enumerate(padded):
            for s in range(start, start + n, limit or max(n, 1)):
                yield slice(s, min(s + (limit or n), start + n)), i
            start += n
        return
    step = max(total, 1) if limit is None else limit if unit is None else max(limit // unit, 1) * unit
    for s in range(0, total, step):
        e = min(s + step, total)
        yield slice(s, e), None if unit is None else slice(s // unit, e // unit)


def _scale_piece_(t: torch.Tensor, factor, unit: int | None) -> None:
    if isinstance(factor, float):
        t.mul_(factor)
    elif factor is not None:
        t.view(-1, unit).mul_(factor)


def _gather(state: QuantizedGradients, tensor: torch.Tensor, buffer: str | None = None) -> list[torch.Tensor]:
    """Every rank's ``tensor``, in rank order, into the state's ``buffer`` if named; sent as its
    bytes (gloo has no int16), into one tensor (a list of outputs costs gloo a copy of them all)."""
    raw = tensor.contiguous().view(torch.uint8).reshape(-1)
    numel = raw.numel() * state.world
    out = torch.empty(numel, dtype=torch.uint8, device=raw.device) if buffer is None else \
        state.buffer(buffer, numel, torch.uint8)
    dist.all_gather_single(out, raw, group=state.group)
    state.traffic.sent += raw.numel()
    return [t.view(tensor.dtype).view(tensor.shape) for t in out.view(state.world, -1).unbind()]


def quantized_allreduce_hook(state: QuantizedGradients, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average the bucket's gradients over the ranks, each sent in the format (see the module).

    Scales, blocks and residuals belong to parameters, not to the bucket's layout (which DDP
    rebuilds after the first step), so a resumed run rounds as the uninterrupted one.
    """
    s, grad = state.settings, bucket.buffer()
    fmt, element = s.format, state.element
    keys = [state.index[id(p)] for p in bucket.parameters()]
    sizes = [p.numel() for p in bucket.parameters()]
    unit = s.block_size if s.scaling == "block" else fmt.block_size if isinstance(fmt, BlockFormat) else None
    if grad.dtype == torch.float32 and (unit is None or all(n % unit == 0 for n in sizes)):
        x = grad  # scaled and rounded in place: the bucket is overwritten with the mean anyway
    else:
        segments = list(grad.float().split(sizes))
        if unit is not None:  # no block straddles two parameters
            segments = [F.pad(g, (0, -g.numel() % unit)) for g in segments]
        x = torch.cat(segments)  # a copy: scaled in place from here on
    padded = [-(-n // unit) * unit for n in sizes] if unit is not None else sizes
    residuals = [state.residuals.get(k) if s.error_feedback else None for k in keys]
    amax = _add_residuals_(x, residuals, sizes, padded, s.scaling == "tensor")
    exponents = None
    dtype = torch_dtype(element if isinstance(fmt, MXFormat) else fmt) if s.rounding == "nearest" else None
    mx = isinstance(fmt, MXFormat) and dtype is not None  # OCP MX: its own scale per block, cast as the rest
    if s.scaling == "block" or mx:
        blocks = x.view(-1, unit)
        amax = block_amax(x, unit) if x.device.type == "cpu" and _cpu_kernels() else \
            torch.maximum(blocks.amax(1), blocks.amin(1).neg_())
    if s.scaling in ("tensor", "block"):
        exponents = _exponents(state, amax, element.max)  # amax: the ranks' largest, with shared_scale
    elif mx:
        exponents = _mx_exponents(amax, element.emax)
        if bool(amax.isnan().any()):  # MX: a block holding a NaN is all NaN
            blocks[amax.isnan()] = torch.nan
    left = state.buffer(f"residuals of {keys[0]}+{len(keys)}", x.numel(), torch.float32) if s.error_feedback else None
    if dtype is not None:  # torch's cast rounds to nearest even: it is the code, clamped first to saturate
        fits = exponents is not None and bool((amax * torch.exp2(-exponents.float()) <= element.max).all())
        fits = fits and not mx  # MX scales floor log2(amax): its elements may pass max
        cast = state.buffer("codes", x.numel(), dtype)
        _cast_in_pieces(x, cast, left, exponents, padded, unit, None if fits else element.max,
                        state.buffer("piece", _PIECE, torch.float32))
        packed = Packed(cast.view(torch.uint8 if element.bits <= 8 else torch.int16))
    else:
        _scale_(x, exponents, padded, unit, -1)
        if s.rounding == "stochastic":  # each parameter draws from its own stream, whatever bucket it is in
            q = torch.cat([quantize(part, fmt, "stochastic", saturate=True, generator=state.generator(k, x.device))
                           for part, k in zip(x.split(padded), keys)])
        else:
            q = quantize(x, fmt, "nearest", saturate=True)
        if left is not None:  # (x / s - q) * s is x - q * s exactly: s is a power of two
            _scale_(torch.sub(x, left.copy_(q), out=left), exponents, padded, unit, 1)
        packed = encode(q, fmt)
    if left is not None:  # last step's residuals were added to x: their buffer was free to overwrite
        state.residuals.update({k: r[:n] for k, r, n in zip(keys, left.split(padded), sizes)})
    codes = _gather(state, packed.codes, "gathered codes")
    block_scales = _gather(state, packed.scales) if packed.scales is not None else [None] * state.world
    shared = exponents is None or s.shared_scale and not mx
    rank_exponents = [exponents] * state.world if shared else _gather(state, exponents)
    values = [c.view(dtype) if dtype is not None else decode(Packed(c, b), fmt, x.shape, torch.float32)
              for c, b in zip(codes, block_scales)]
    total = _sum_ranks_(x, state.buffer("piece", _PIECE, torch.float32), values, rank_exponents, padded, unit)
    if total is not grad:
        for g, t, n in zip(grad.split(sizes), total.split(padded), sizes):
            g.copy_(t[:n])
    numel = sum(padded)
    bits = element.bits * numel + (8 * (numel // fmt.block_size) if isinstance(fmt, BlockFormat) else 0)
    scale_bytes = 0 if shared or mx else exponents.numel()  # MX's are in ``bits``
    state.traffic.nominal += math.ceil(bits / 8) + scale_bytes
    state.traffic.fp32 += 4 * sum(sizes)
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    future.set_result(grad)
    return future
