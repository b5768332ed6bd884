"""Optimizer states kept as codes of a block-wise codebook format, one run of codes per state.

``LowPrecisionOptimizer`` with ``storage: packed`` keeps a state (``exp_avg``, ...) whose format is
a codebook format (``blockwise(dynamic8,256)``) as bitsandbytes' 8-bit optimizers do: codes and
a float32 absmax per block, for every parameter of at least ``MIN_NUMEL`` elements. The states
of all those parameters live in one flat buffer, each starting on a block boundary, so a step
decodes the buffer once, hands torch views of it, and encodes it once after torch's update:
a handful of tensor operations per step, not per parameter. (Plain Adam on the CPU skips the
decoding: ``codebook_adam`` steps the codes in place.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...formats import CodebookFormat, Packed
from ...formats.codebook_codes import block_codes, block_values

__all__ = ["MIN_NUMEL", "CodebookStates"]

MIN_NUMEL = 4096  # bitsandbytes' min_8bit_size: smaller parameters keep float32 states


@dataclass(frozen=True)
class _Segment:
    """Where one parameter's state lies in the run: elements ``start .. start + numel``."""

    index: int  # the parameter's position in the optimizer's param groups
    start: int  # a multiple of the block size
    numel: int


class CodebookStates:
    """One state of many parameters (on one device) as one run of codes of ``fmt``.

    Args:
        fmt: the state's codebook format.
        segments: each parameter's place in the run, in order.
        codes: the code bytes of the whole run (``formats.codebook_codes`` layout).
        absmax: each block's absmax.
    """

    def __init__(self, fmt: CodebookFormat, segments: list[_Segment], codes: torch.Tensor, absmax: torch.Tensor):
        self.fmt, self.segments, self.codes, self.absmax = fmt, segments, codes, absmax
        self._values: torch.Tensor | None = None  # the decoded run while a step uses it

    @classmethod
    def pack(cls, fmt: CodebookFormat, states: dict[int, torch.Tensor]) -> "CodebookStates":
        """Round ``states`` (parameter index -> float state, all on one device) and pack them."""
        segments, start = [], 0
        for index in sorted(states):
            segments.append(_Segment(index, start, states[index].numel()))
            start += -(-states[index].numel() // fmt.block_size) * fmt.block_size
        flat = torch.zeros(start, dtype=torch.float32, device=next(iter(states.values())).device)
        for seg in segments:
            flat[seg.start:seg.start + seg.numel] = states[seg.index].reshape(-1)
        return cls(fmt, segments, *block_codes(flat, fmt))

    @classmethod
    def from_packed(cls, fmt: CodebookFormat, packed: dict[int, Packed], numels: dict[int, int]) -> "CodebookStates":
        """The run that ``packed()`` gave, from its per-parameter codes (a checkpoint)."""
        segments, codes, absmax, start = [], [], [], 0
        for index in sorted(packed):
            blocks = packed[index].scales.numel()
            segments.append(_Segment(index, start, numels[index]))
            nbytes = blocks * fmt.block_size * fmt.bits // 8
            codes.append(torch.nn.functional.pad(packed[index].codes, (0, nbytes - packed[index].codes.numel())))
            absmax.append(packed[index].scales)
            start += blocks * fmt.block_size
        return cls(fmt, segments, torch.cat(codes), torch.cat(absmax))

    def unpack(self, shapes: dict[int, torch.Size]) -> dict[int, torch.Tensor]:
        """Decode the run: each parameter's state as a float32 view of one buffer, of ``shapes[index]``."""
        self._values = block_values(self.codes, self.absmax, self.fmt)
        return {s.index: self._values[s.start:s.start + s.numel].view(shapes[s.index]) for s in self.segments}

    def repack(self, states: dict[int, torch.Tensor], stepped: set[int]) -> bool:
        """Round and pack the buffer ``unpack`` gave, which torch updated in place through ``states``.

        A parameter torch did not step keeps its codes: rounding a decoded block again can change
        it (a block whose largest magnitude is negative is scaled by 0.99297 of it, the lowest entry
        of ``dynamic8``). Returns False, packing nothing, if ``states`` are not the views
        ``unpack`` gave (a parameter joined, or states were replaced): then ``pack`` them anew.
        """
        values, self._values = self._values, None
        if values is None or sorted(states) != [s.index for s in self.segments]:
            return False
        if any(states[s.index].data_ptr() != values[s.start:].data_ptr() or states[s.index].numel() != s.numel
               for s in self.segments):
            return False
        codes, absmax = block_codes(values, self.fmt, consume=True)
        for s in self.segments:
            if s.index not in stepped:
                code_range, block_range = self.ranges(s)
                codes[code_range], absmax[block_range] = self.codes[code_range], self.absmax[block_range]
        self.codes, self.absmax = codes, absmax
        return True

    def packed(self) -> dict[int, Packed]:
        """Each parameter's codes and absmax, views of the run (as ``formats.encode`` lays them out)."""
        out = {}
        for s in self.segments:
            code_range, block_range = self.ranges(s)
            used = -(-s.numel * self.fmt.bits // 8)
            out[s.index] = Packed(self.codes[code_range][:used], self.absmax[block_range])
        return out

    def ranges(self, s: _Segment) -> tuple[slice, slice]:
        """The slices of ``codes`` and ``absmax`` that hold segment ``s``'s blocks."""
        bs, blocks = self.fmt.block_size, -(-s.numel // self.fmt.block_size)
        per_block = bs * self.fmt.bits // 8
        first = s.start // bs
        return slice(first * per_block, (first + blocks) * per_block), slice(first, first + blocks)

    @property
    def nbytes(self) -> int:
        """Bytes the run takes between steps: codes and absmax."""
        return self.codes.numel() * self.codes.element_size() + self.absmax.numel() * self.absmax.element_size()
