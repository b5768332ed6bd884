"""Python entry points over the ``mpc::`` ops: the same arithmetic without the compiler.

    y = mpcompile.ops.linear(x, w, b, formats={"input": "fp8_e4m3", "weight": "fp8_e4m3",
                                                "grad_output": "fp8_e5m2"},
                             forward=ArithSpec(acc="fp16", order="chunk(32)"))

``linear``, ``conv*d`` and ``matmul`` also take ``recompute=Recompute(tau, high)``: the output
components whose condition number estimate (``ops.kappa.component_kappa``, with the consumer
``activation``) exceeds tau are computed again in ``high``; ``counts`` adds up how many stayed low.

Every GEMM-like entry point takes its forward arithmetic as ``forward=`` and the gradients' as
``backward=``. The public helpers below (``fx_leaf``, ``check_operands``, ``prepare_op``,
``delayed_role_scales``, ``int_tuple``, ``renamed_spec``) are what the entry points of other
files (``einsum``, ``addmm``, ``conv_transpose``, ``attention``) are built from.
"""
from __future__ import annotations

import functools
import warnings
from typing import Callable, Mapping, Sequence

import torch

from ..backends import check_backend
from . import library  # noqa: F401  (registers the mpc:: ops)
from .kappa import activation as parse_activation
from .spec import (AMAX_HISTORY, ROLES, ArithSpec, QuantSpec, Recompute, RoleFormats, SpecError, parse_arith,
                   parse_recompute)

__all__ = ["matmul", "linear", "conv1d", "conv2d", "conv3d", "quant", "sum", "mean", "Formats", "Spec", "High",
           "fx_leaf", "check_operands", "prepare_op", "delayed_role_scales", "int_tuple", "renamed_spec"]

Formats = Mapping[str, object] | RoleFormats | str | None
Spec = ArithSpec | str | None
High = Recompute | str | None


def fx_leaf(fn: Callable) -> Callable:
    """``fn``, recorded as one call_function node when torch.fx traces a model that calls it
    (its argument checks cannot run on proxies), so models written with these ops compile."""
    @functools.wraps(fn)
    def entry(*args, **kwargs):
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.fx.Proxy):
                return a.tracer.create_proxy("call_function", entry, args, kwargs)
        return fn(*args, **kwargs)
    return entry


def _spec(spec: Spec, what: str) -> ArithSpec:
    if spec is None:
        return ArithSpec()
    if isinstance(spec, ArithSpec):
        return spec
    if isinstance(spec, str):
        return parse_arith(spec)
    raise SpecError(f"{what} must be an ArithSpec or its string form, got {type(spec).__name__}")


@torch.compiler.assume_constant_result  # torch.compile runs it once at trace time (args are constants)
def _specs(formats: Formats, forward: Spec, backward: Spec, recompute: High = None) -> tuple[str, str, str, bool]:
    """(roles, forward, backward) as op strings, and whether any rounding is stochastic."""
    roles = RoleFormats.of(formats)
    fwd = _spec(forward, "forward")
    bwd = fwd if backward is None else _spec(backward, "backward")
    arith = (fwd, bwd) + ((_recompute(recompute).forward,) if recompute is not None else ())
    stochastic = any(q.rounding == "stochastic" for _, q in roles.specs) or any(
        "stochastic" in (s.rounding, s.mul_rounding) for s in arith)
    return str(roles), str(fwd), str(bwd), stochastic


def _recompute(recompute: High) -> Recompute:
    if isinstance(recompute, Recompute):
        return recompute
    if isinstance(recompute, str):
        return parse_recompute(recompute)
    raise SpecError(f"recompute must be a Recompute or its string form, got {type(recompute).__name__}")


@torch.compiler.assume_constant_result
def _recompute_args(recompute: High, activation: str | None) -> tuple[str, str]:
    """(high, phi): the op strings of ``recompute`` and of the consumer activation ("" for none)."""
    if activation:
        parse_activation(activation)  # an unknown name fails here, not inside the op
    return str(_recompute(recompute)), activation or ""


def _count(counts: torch.Tensor | None, low: torch.Tensor, y: torch.Tensor) -> None:
    """Add one call's (components left low, components) to ``counts``, in place."""
    if counts is None:
        return
    if not isinstance(counts, torch.Tensor) or counts.dtype != torch.int64 or tuple(counts.shape) != (2,):
        raise ValueError("counts must be an int64 tensor of shape (2,): components computed low, components in all")
    with torch.no_grad():
        counts[0] += low
        counts[1] += y.numel()


def _seed(seed: int | None, stochastic: bool, device) -> torch.Tensor | None:
    """The op's seed tensor: given, drawn from torch's generator when something is stochastic, or None."""
    if seed is not None:
        if not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise ValueError(f"seed={seed!r} must be an integer in [0, 2**32)")
        return torch.tensor(seed, dtype=torch.int64, device=device)
    if not stochastic:
        return None
    return torch.randint(0, 2**32, (), dtype=torch.int64, device=device)


def check_operands(name: str, **tensors) -> torch.device:
    """The device of the op's tensors (None ones skipped), after checking that they are floating
    tensors of one dtype on one device; errors name ``mpcompile.ops.<name>`` and the argument."""
    device = dtype = None
    for arg, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"mpcompile.ops.{name}: {arg} must be a float32/float64/float16/bfloat16 tensor, got {got}")
        if device is not None and t.device != device:
            raise ValueError(f"mpcompile.ops.{name}: {arg} is on {t.device}, the other operands on {device}")
        if dtype is not None and t.dtype != dtype:
            raise TypeError(f"mpcompile.ops.{name}: {arg} is {t.dtype}, the other operands {dtype}; cast them "
                            f"to one dtype (formats are set by the roles, not by the dtype)")
        device, dtype = t.device, t.dtype
    return device


def prepare_op(name, formats, forward, backward, seed, recompute: High = None, **tensors):
    """Checked tensors and specs: (roles, forward, backward, seed tensor) for the op. A chunk
    longer than the reduction is one chunk, as the reduction's last chunk is a short one."""
    device = check_operands(name, **tensors)
    roles, fwd, bwd, stochastic = _specs(formats, forward, backward, recompute)
    return roles, fwd, bwd, _seed(seed, stochastic, device)


def delayed_role_scales(roles: str, history: torch.Tensor | None, x: torch.Tensor,
                        w: torch.Tensor) -> torch.Tensor | None:
    """The scales of the op's ``tensor_delayed`` operands, from ``history``, whose rows then
    take the operands' amaxes (grad_output's is taken in backward)."""
    if history is None:
        return None
    if not isinstance(history, torch.Tensor) or tuple(history.shape) != (len(ROLES), AMAX_HISTORY):
        raise ValueError(f"amax_history must be a tensor of shape ({len(ROLES)}, {AMAX_HISTORY}): one row per role "
                         f"of {', '.join(ROLES)}, newest amax first")
    return torch.ops.mpc.delayed_scales(history, roles, x.detach(), w.detach())


@fx_leaf
def matmul(a: torch.Tensor, b: torch.Tensor, spec: Spec = None, *, formats: Formats = None, forward: Spec = None,
           backward: Spec = None, seed: int | None = None, amax_history: torch.Tensor | None = None,
           recompute: High = None, activation: str | None = None, counts: torch.Tensor | None = None,
           backend: str = "auto") -> torch.Tensor:
    """``torch.matmul(a, b)`` with emulated arithmetic.

    Args:
        a, b: operands (``torch.matmul`` broadcasting); roles ``input`` = a, ``weight`` = b.
        spec: deprecated (positional or keyword): the old name of ``forward``; warns.
        formats: role -> format / ``"fmt[:rounding][:scaling][:sat][:sr_bits=n][:axis=n]"`` / ``QuantSpec``;
            block formats block along the reduction dim K (a conv weight: in_channels x kernel).
        forward: forward arithmetic (``ArithSpec`` or its string); None = native fp32.
        backward: arithmetic of the gradient GEMMs (default: ``forward``).
        seed: seed of every random bit the op draws (default: from torch's generator).
        amax_history: (8, 16) amaxes per role, newest first, of ``tensor_delayed`` roles: read
            for their scales and updated in place (``compile`` gives each op one).
        recompute: ``Recompute(tau, high)`` (or its string): output components whose condition
            number estimate exceeds tau are computed again in ``high`` (see ``ops.kappa``).
        activation: the elementwise activation that consumes the output (``ops.kappa.ACTIVATIONS``,
            e.g. ``"relu"``), whose kappa_phi multiplies the estimate; None: kappa_v alone.
        counts: int64 (2,): (components computed low, components) of every call are added to it
            in place (``compile`` gives each op with ``recompute`` one).
        backend: ``auto``, ``torch`` or ``triton`` (``mpcompile.backends``): which implementation
            computes the op and its backward; the numbers are the same.
    """
    if a.dim() == 0 or b.dim() == 0 or a.shape[-1] != b.shape[-2 if b.dim() > 1 else 0]:
        raise ValueError(f"mpcompile.ops.matmul: shapes {tuple(a.shape)} and {tuple(b.shape)} do not multiply "
                         f"(a's last dim must equal b's {'second-to-last' if b.dim() > 1 else 'only'} dim)")
    forward = renamed_spec("matmul", forward, spec)
    roles, fwd, bwd, s = prepare_op("matmul", formats, forward, backward, seed, recompute, a=a, b=b)
    scales = delayed_role_scales(roles, amax_history, a, b)
    if recompute is None:
        return torch.ops.mpc.matmul(a, b, roles, fwd, bwd, s, scales, amax_history, check_backend(backend))
    y, low = torch.ops.mpc.matmul_recompute(a, b, roles, fwd, bwd, *_recompute_args(recompute, activation), s, scales,
                                            amax_history, check_backend(backend))
    _count(counts, low, y)
    return y


@fx_leaf
def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, *, formats: Formats = None,
           forward: Spec = None, backward: Spec = None, seed: int | None = None,
           amax_history: torch.Tensor | None = None, recompute: High = None, activation: str | None = None,
           counts: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """``F.linear(x, w, b)`` with per-role formats and emulated arithmetic (see ``matmul``, also for
    ``recompute``, ``activation``, ``counts`` and ``backend``)."""
    check_operands("linear", x=x, w=w, b=b)
    if w.dim() != 2 or x.dim() < 1 or x.shape[-1] != w.shape[1] or (b is not None and tuple(b.shape) != (w.shape[0],)):
        raise ValueError(f"mpcompile.ops.linear: x {tuple(x.shape)}, w {tuple(w.shape)}"
                         f"{'' if b is None else f', b {tuple(b.shape)}'} do not fit: w must be (out, in) with "
                         f"in = x.shape[-1], b (out,)")
    roles, fwd, bwd, s = prepare_op("linear", formats, forward, backward, seed, recompute, x=x, w=w, b=b)
    scales = delayed_role_scales(roles, amax_history, x, w)
    if recompute is None:
        return torch.ops.mpc.linear(x, w, b, roles, fwd, bwd, s, scales, amax_history, check_backend(backend))
    y, low = torch.ops.mpc.linear_recompute(x, w, b, roles, fwd, bwd, *_recompute_args(recompute, activation), s,
                                            scales, amax_history, check_backend(backend))
    _count(counts, low, y)
    return y


def int_tuple(value, n: int, what: str, op: str) -> list[int]:
    """An int or n ints as a list of n ints (``stride``, ``padding``, ... of ``mpcompile.ops.<op>``)."""
    out = [value] * n if isinstance(value, int) else list(value)
    if len(out) != n or not all(isinstance(v, int) for v in out):
        raise ValueError(f"mpcompile.ops.{op}: {what}={value!r} must be an int or {n} ints")
    return out


def renamed_spec(op: str, forward: Spec, spec: Spec) -> Spec:
    """``forward``, or the value of the deprecated ``spec`` argument of ``mpcompile.ops.<op>``
    (its old name, kept for one release) with a DeprecationWarning naming the new spelling."""
    if spec is None:
        return forward
    if forward is not None:
        raise TypeError(f"mpcompile.ops.{op}: forward= and its deprecated old name spec= both given; pass forward= "
                        f"only")
    warnings.warn(f"mpcompile.ops.{op}: spec= (or the spec as a positional argument) is deprecated and will be "
                  f"removed in the next release; pass the forward arithmetic as forward=", DeprecationWarning,
                  stacklevel=4)  # renamed_spec <- the op <- fx_leaf's entry <- the caller
    return spec


def _conv(n: int, x, w, b, stride, padding, dilation, groups, formats, forward, backward, seed, amax_history,
          recompute=None, activation=None, counts=None, backend="auto"):
    check_operands(f"conv{n}d", x=x, w=w, b=b)
    if x.dim() != n + 2 or w.dim() != n + 2 or x.shape[1] != w.shape[1] * groups or w.shape[0] % groups:
        raise ValueError(f"mpcompile.ops.conv{n}d: x {tuple(x.shape)} and w {tuple(w.shape)} with groups={groups} "
                         f"do not fit: x must be (N, C, *{n} sizes), w (C_out, C / groups, *kernel), "
                         f"C_out divisible by groups")
    roles, fwd, bwd, s = prepare_op(f"conv{n}d", formats, forward, backward, seed, recompute, x=x, w=w, b=b)
    stride, dilation = int_tuple(stride, n, "stride", f"conv{n}d"), int_tuple(dilation, n, "dilation", f"conv{n}d")
    if isinstance(padding, str):
        x, padding = _pad_same(x, w, stride, dilation, padding)
    scales = delayed_role_scales(roles, amax_history, x, w)
    padding = int_tuple(padding, n, "padding", f"conv{n}d")
    if recompute is None:
        return torch.ops.mpc.conv(x, w, b, stride, padding, dilation, groups, roles, fwd, bwd, s, scales, amax_history,
                                  check_backend(backend))
    y, low = torch.ops.mpc.conv_recompute(x, w, b, stride, padding, dilation, groups, roles, fwd, bwd,
                                          *_recompute_args(recompute, activation), s, scales, amax_history,
                                          check_backend(backend))
    _count(counts, low, y)
    return y


def _pad_same(x: torch.Tensor, w: torch.Tensor, stride: list[int], dilation: list[int], padding: str):
    """(x, padding) for ``padding="valid"`` or ``"same"``, as torch pads: an odd total puts the
    extra zero on the right, padded onto x, and the symmetric rest goes to the convolution."""
    n = len(stride)
    if padding == "valid":
        return x, 0
    if padding != "same":
        raise ValueError(f"mpcompile.ops.conv{n}d: padding={padding!r} must be 'valid', 'same' or numbers")
    if any(s != 1 for s in stride):
        raise ValueError(f"mpcompile.ops.conv{n}d: padding='same' needs stride 1 (as in torch), got {stride}")
    totals = [d * (k - 1) for d, k in zip(dilation, w.shape[2:])]
    extra = [p for t in reversed(totals) for p in (0, t % 2)]  # F.pad lists the last dim first
    return (torch.nn.functional.pad(x, extra) if any(extra) else x), [t // 2 for t in totals]


@fx_leaf
def conv1d(x, w, b=None, stride=1, padding=0, dilation=1, groups=1, *, formats: Formats = None,
           forward: Spec = None, backward: Spec = None, seed: int | None = None,
           amax_history: torch.Tensor | None = None, recompute: High = None, activation: str | None = None,
           counts: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """``F.conv1d`` with per-role formats and emulated arithmetic (see ``conv2d``)."""
    return _conv(1, x, w, b, stride, padding, dilation, groups, formats, forward, backward, seed, amax_history,
                 recompute, activation, counts, backend)


@fx_leaf
def conv2d(x, w, b=None, stride=1, padding=0, dilation=1, groups=1, *, formats: Formats = None,
           forward: Spec = None, backward: Spec = None, seed: int | None = None,
           amax_history: torch.Tensor | None = None, recompute: High = None, activation: str | None = None,
           counts: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """``F.conv2d`` with per-role formats and emulated arithmetic.

    Each output element is a dot product over (input channel of its group, kernel position),
    row-major, padding zeros included; grad_input is the transposed convolution computed the
    same way, grad_weight reduces over (batch, output position). ``recompute``, ``activation``
    and ``counts``: see ``matmul``.
    """
    return _conv(2, x, w, b, stride, padding, dilation, groups, formats, forward, backward, seed, amax_history,
                 recompute, activation, counts, backend)


@fx_leaf
def conv3d(x, w, b=None, stride=1, padding=0, dilation=1, groups=1, *, formats: Formats = None,
           forward: Spec = None, backward: Spec = None, seed: int | None = None,
           amax_history: torch.Tensor | None = None, recompute: High = None, activation: str | None = None,
           counts: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """``F.conv3d`` with per-role formats and emulated arithmetic (see ``conv2d``)."""
    return _conv(3, x, w, b, stride, padding, dilation, groups, formats, forward, backward, seed, amax_history,
                 recompute, activation, counts, backend)


@fx_leaf
def quant(x: torch.Tensor, fmt, rounding: str = "nearest", *, grad_format=None, grad_rounding: str | None = None,
          scaling: str = "none", saturate: bool = False, axis: int = -1, sr_bits: int | None = None,
          seed: int | None = None, backend: str = "auto") -> torch.Tensor:
    """Straight-through quantizer: x rounded to ``fmt`` forward, the gradient to ``grad_format``.

    Args:
        fmt: format (or ``QuantSpec``) of the forward value; None leaves it unchanged.
        grad_format: format (or ``QuantSpec``) of the gradient; None passes it unchanged.
        grad_rounding: the gradient's rounding (default ``rounding``).
        scaling, saturate, sr_bits: as in ``QuantSpec``; ``axis`` is the channel axis of
            ``channel`` scaling (default: the last, features) and the axis of a block format's blocks.
        backend: see ``matmul``.
    """
    check_operands("quant", x=x)
    fwd, grad, stochastic = _quant_specs(fmt, rounding, grad_format, grad_rounding or rounding, scaling, saturate,
                                         sr_bits)
    return torch.ops.mpc.quant(x, fwd, grad, axis, _seed(seed, stochastic, x.device), check_backend(backend))


@torch.compiler.assume_constant_result
def _quant_specs(fmt, rounding, grad_format, grad_rounding, scaling, saturate, sr_bits) -> tuple[str, str, bool]:
    """The op strings of the value's and the gradient's ``QuantSpec`` ("" = unchanged)."""
    specs = [None if f is None else f if isinstance(f, QuantSpec) else QuantSpec(f, r, scaling, saturate, sr_bits)
             for f, r in ((fmt, rounding), (grad_format, grad_rounding))]
    stochastic = any(q is not None and q.rounding == "stochastic" for q in specs)
    return "" if specs[0] is None else str(specs[0]), "" if specs[1] is None else str(specs[1]), stochastic


def _dims(dim) -> list[int]:
    return [] if dim is None else [dim] if isinstance(dim, int) else list(dim)


@fx_leaf
def sum(x: torch.Tensor, dim: int | Sequence[int] | None = None, keepdim: bool = False, *, spec: Spec = None,
        seed: int | None = None, backend: str = "auto") -> torch.Tensor:
    """``x.sum(dim)`` accumulated as ``spec`` says (its acc, order, rounding, kahan; no products)."""
    _, arith, _, s = prepare_op("sum", None, spec, None, seed, x=x)
    return torch.ops.mpc.sum(x, _dims(dim), keepdim, arith, s, check_backend(backend))


@fx_leaf
def mean(x: torch.Tensor, dim: int | Sequence[int] | None = None, keepdim: bool = False, *, spec: Spec = None,
         seed: int | None = None, backend: str = "auto") -> torch.Tensor:
    """``x.mean(dim)``: the emulated sum, then sum / count rounded once to the acc format."""
    _, arith, _, s = prepare_op("mean", None, spec, None, seed, x=x)
    return torch.ops.mpc.mean(x, _dims(dim), keepdim, arith, s, check_backend(backend))
