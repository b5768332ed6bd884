"""A quantization's plan and format numbers as one set of Python values: what a generated
kernel is specialised for. Triton's (``triton_round``) takes the whole spec as a constexpr, so
that every format, rounding mode and saturation flag gets its own code with all constants
folded; the C++ one (``quantize_cpu``) compiles in the rounding mode and path and takes the rest
as arguments.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..rounding import QuantParams, QuantPlan

__all__ = ["RoundSpec", "round_spec"]


class RoundSpec(NamedTuple):
    """A format, rounding mode and saturation as compile-time constants of a kernel.

    The flags are ``QuantPlan``'s; the numbers are ``QuantParams``' values, the float ones as
    the bit patterns of their float32 values (exact, and free of Triton's typing of float
    literals). ``nearest_even`` and ``stochastic_carry`` name the short paths that serve the format.
    """

    fixed: bool
    rounding: str
    saturate: bool
    signed: bool
    has_inf: bool
    has_zero: bool
    has_nz: bool
    ftz: bool
    parity_by_exponent: bool
    man: int
    emin: int
    bias: int
    max_bits: int
    neg_max_bits: int
    min_pos_bits: int
    elem_emax: int
    sr_bits: int
    nearest_even: bool  # ``_nearest_even`` rounds this format (a fast path of round_to_format)
    stochastic_carry: bool  # ``_stochastic_carry`` rounds this format (another)


_SPECS: dict[tuple[int, QuantPlan], tuple[QuantParams, RoundSpec]] = {}
_MAX_SPECS = 4096


def round_spec(plan: QuantPlan, params: QuantParams) -> RoundSpec:
    """The constexpr spec of a float32 plan and its per-format numbers.

    Reading the numbers copies them to the host (a synchronisation on CUDA), so specs are
    cached per params object: ``plan_quantize`` returns the same object for the same format,
    and the cache holds it, so its id cannot be reused by another while cached.

    Args:
        plan: a plan of ``plan_quantize`` with ``dtype`` float32.
        params: the plan's numbers.
    """
    if plan.dtype != torch.float32:
        raise ValueError(f"round_spec: the generated kernels round float32 values; this plan works in {plan.dtype}")
    key = (id(params), plan)
    hit = _SPECS.get(key)
    if hit is not None and hit[0] is params:
        return hit[1]
    floats = torch.stack([params.max, params.neg_max, params.min_pos]).view(torch.int32).tolist()
    ints = torch.stack([params.man, params.emin, params.bias, params.elem_emax, params.sr_bits.int()]).tolist()
    spec = RoundSpec(
        fixed=plan.kind == "fixed", rounding=plan.rounding, saturate=plan.saturate, signed=plan.signed,
        has_inf=plan.has_inf, has_zero=plan.has_zero, has_nz=plan.has_nz, ftz=plan.ftz,
        parity_by_exponent=plan.parity_by_exponent, man=ints[0], emin=ints[1], bias=ints[2],
        max_bits=floats[0], neg_max_bits=floats[1], min_pos_bits=floats[2], elem_emax=ints[3],
        sr_bits=ints[4],
        nearest_even=(plan.kind == "float" and plan.rounding == "nearest" and not plan.parity_by_exponent
                      and not plan.ftz and ints[0] <= 22
                      and (ints[1] == -126 or ints[1] > -126 and ints[1] - ints[0] >= -125)),
        stochastic_carry=(plan.kind == "float" and plan.rounding == "stochastic" and not plan.parity_by_exponent
                          and not plan.ftz and ints[0] <= 22 and ints[4] == 23 - ints[0]
                          and (ints[1] == -126 or -104 <= ints[1] <= 127)))
    if len(_SPECS) >= _MAX_SPECS:
        _SPECS.clear()
    _SPECS[key] = (params, spec)
    return spec
