"""The precisions a sweep trains in, and how each one runs: natively, emulated, or both.

A precision is a name. Where torch has a dtype for it (fp64, fp32, bf16, fp16) it runs
``native``: model, data and arithmetic in that dtype, so the time is the hardware's (on CUDA
bf16 and fp16 are autocast, and the fp8 formats run fp8 GEMMs where the device has them:
``sweep.native``). Where
mpcompile has a format for it, it runs ``emulated``: a network under a policy, a classical
solver with every result rounded to the format (``Arithmetic``), so the accuracy is the
format's and the time is the cost of emulating it.

The emulated policy of a format with a native dtype mirrors native training: every role of
every op in the format (fp32 accumulation, as torch's CPU and GPU kernels accumulate half
precision), and the weights and momentum stored in it, so native and emulated accuracy should
agree within seed noise. A name that is a shipped policy and no native dtype (``fp8_e4m3``,
``hfp8``, ``mxfp8``) is that recipe; any other format name (``e5m2``, ``fixed(8,4)``) gets the
mirroring policy. fp32 and fp64 run natively only: emulating them is the identity.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import FormatError, MpcompileError
from ..formats import FixedFormat, FloatFormat, parse
from ..policy import Policy, load_policy, shipped_policies

__all__ = ["Precision", "resolve_precision", "mirroring_policy"]

_NATIVE = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_ROLES = ("input", "weight", "bias", "output", "grad_output", "grad_input", "grad_weight")


@dataclass(frozen=True)
class Precision:
    """One precision of a sweep.

    Attributes:
        name: as the user wrote it (``fp16``, ``hfp8``).
        dtype: the native torch dtype, or None (emulated only).
        fmt: the one format a classical solver computes in when emulated, or None (a policy of
            several formats, such as hfp8, has no single format).
        policy: the policy a network trains under when emulated, or None (native only).
    """

    name: str
    dtype: torch.dtype | None
    fmt: object | None
    policy: Policy | None



def resolve_precision(name: str) -> Precision:
    """The ``Precision`` called ``name``.

    Args:
        name: fp64, fp32, bf16, fp16, a shipped policy's name (fp8_e4m3, hfp8, mxfp8, ...) or a
            format ``mpcompile.formats.parse`` reads (e4m3, fixed(8,4), ...).

    Raises:
        MpcompileError: a name that is neither.
    """
    dtype = _NATIVE.get(name)
    if dtype in (torch.float32, torch.float64):
        return Precision(name, dtype, None, None)
    fmt = _element_format(name)
    if name in shipped_policies() and dtype is None:
        return Precision(name, None, fmt, load_policy(name))
    if fmt is None:
        raise MpcompileError(f"precision {name!r}: not fp64/fp32/bf16/fp16, a shipped policy ({', '.join(shipped_policies())}) "
                             f"or a number format (e4m3, fixed(8,4), ...)")
    return Precision(name, dtype, fmt, mirroring_policy(name, fmt))


def mirroring_policy(name: str, fmt) -> Policy:
    """Every role of every op in ``fmt`` with fp32 accumulation, weights and momentum stored in
    it: native training in ``fmt``'s dtype, emulated."""
    text = str(fmt)
    return load_policy({"version": 1, "name": f"{name} (every tensor)",
                        "default": {**{role: text for role in _ROLES}, "forward": {"acc": "fp32"},
                                    "backward": {"acc": "fp32"}},
                        "optimizer": {"master": text, "momentum": text}})


def _element_format(name: str):
    """The per-value (float or fixed-point) format called ``name``, or None."""
    try:
        fmt = parse(name)
    except FormatError:
        return None
    return fmt if isinstance(fmt, (FloatFormat, FixedFormat)) else None
