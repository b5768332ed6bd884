"""Op bodies: forward and backward of the emulated ops on plain tensors, with parsed specs.

These are the bodies of the ``mpc::`` custom ops (``library``; ``addmm``, ``conv_transpose``
hold their own ops and bodies, built from the public helpers here). Each GEMM runs torch's own
kernel when its spec is native and ``emulate.emulated_matmul`` otherwise; backward GEMMs
(grad_input = grad_output W, grad_weight = grad_output^T X) use the backward spec on the
operands as the forward quantized them (re-quantized from the same seed, not stored).
Where the op's backend has a generated GEMM (``gemm_backends``), role rounding moves into
its prologue and epilogue as far as the layouts allow, with the same numbers.
The ``*_recompute`` forwards (``Recompute``) compute every output component in the forward
spec, then those whose condition number estimate exceeds tau again in the high spec; their
backward is the plain op's, which never reads the forward's output.
Native passes go through ``torch.func.vjp`` of torch's function, so that an fp32 spec gives
torch's gradients to the bit.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F

from ..random_bits import counter_words, stream_seed
from ..profiling import section
from .emulate import emulated_matmul, rounded_add_
from .exact import grid_of, round_exact, two_prod, two_sum
from .gemm_backends import GemmFusion, backend_gemm, has_gemm_backend, rounds_in_kernel
from .im2col import conv_as_gemm_operands, held_memory, transposed_conv_operands
from .implicit_conv import conv_sums, serves, weight_grad_sums
from .kappa import activation, component_kappa, magnitudes
from .observe import notify
from .roles import op_seed, quantize_role
from .spec import ROLES, STREAM_BIAS, STREAM_DIV, ArithSpec, QuantSpec, Recompute, RoleFormats

__all__ = ["gemm", "emulated", "round_role", "kernel_dims", "k_dim", "RoleTensor", "backward_gemm", "add_bias", "sum_rows", "conv_index",
           "channel_rows",
           "native_grads", "linear_forward", "linear_backward", "matmul_forward", "matmul_backward", "conv_forward",
           "conv_backward", "linear_recompute", "matmul_recompute", "conv_recompute", "reduce_sum", "reduce_mean"]


def round_role(roles: RoleFormats, name: str, x, axis: int, seed: int | None, scales: torch.Tensor | None,
               blocks: tuple[int, ...] = (-1,), *, operand: bool = False):
    """x rounded to role ``name`` of ``roles`` (channel axis ``axis``, block formats' blocks along
    ``blocks``), with the op's sub-seed and delayed scale of that role; x itself where the role
    has no format. ``operand``: the result is dead once the op's GEMMs have run (it is no output
    and nothing keeps it), so it may be written into this thread's held memory of the role
    (``im2col.held_memory``) instead of fresh memory faulted in page by page at every call."""
    i = ROLES.index(name)
    spec = roles.get(name)
    out = None
    if operand and spec is not None and x.device.type == "cpu":
        out = held_memory(x.numel(), x.dtype, f"rounded {name}").view(x.shape)
    with section("quantize"):
        y = quantize_role(x, spec, axis=axis, seed=op_seed(seed, 16 + i), scale=None if scales is None else scales[i],
                          blocks=blocks, out=out)
    if spec is not None:
        notify(name, x, y, spec)
    return y


def kernel_dims(w: torch.Tensor, first: int = 1) -> tuple[int, ...]:
    """A convolution weight's reduction dims from ``first`` on: its in_channels and kernel
    elements, in the im2col order of ``im2col.patches``."""
    return tuple(range(first, w.dim()))


def emulated(a: torch.Tensor, b: torch.Tensor, spec: ArithSpec, seed: int | None,
             roles: tuple[QuantSpec | None, QuantSpec | None] = (None, None), *,
             index: torch.Tensor | None = None, exact_products: bool = False,
             dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``emulated_matmul`` (float64 holding acc values, or them rounded to ``dtype``), by the op's
    backend where it emulates it."""
    y = backend_gemm(a, b, spec, roles, seed=seed, index=index)
    if y is not None:
        return y.to(dtype)  # y (float32 or float64) converts to float64 exactly: one rounding, as through float64
    return emulated_matmul(a, b, spec, seed=seed, index=index, exact_products=exact_products, dtype=dtype)


def gemm(a: torch.Tensor, b: torch.Tensor, spec: ArithSpec, seed: int | None, *, exact_products: bool = False,
         index: torch.Tensor | None = None,
         roles: tuple[QuantSpec | None, QuantSpec | None] = (None, None)) -> torch.Tensor:
    """Batched (B, M, K) @ (B, K, N) in a's dtype: torch's kernel if native, else emulated.
    ``roles``: the formats a and b were rounded to, which a generated kernel may rely on."""
    if spec.is_native:
        return torch.matmul(a, b)
    return emulated(a, b, spec, seed, roles, index=index, exact_products=exact_products, dtype=a.dtype)


def _seed_of(role: str, seed: int | None) -> int:
    """The seed ``round_role`` rounds role ``role`` with, as a kernel takes it."""
    return op_seed(seed, 16 + ROLES.index(role)) or 0


def _fuses(fwd: ArithSpec, scales, device: torch.device) -> bool:
    """Whether a GEMM may run as one fused kernel of the op's backend: checked before any
    operand is rounded for it, so that the torch backend does no work twice."""
    return not fwd.is_native and scales is None and has_gemm_backend(device)


@dataclass
class RoleTensor:
    """A role's tensor as an op's GEMMs take it: raw, and rounded in memory (once) where
    something needs it so."""

    roles: RoleFormats
    name: str
    raw: torch.Tensor
    axis: int
    seed: int | None
    scales: torch.Tensor | None
    blocks: tuple[int, ...] = (-1,)

    @functools.cached_property
    def rounded(self) -> torch.Tensor:  # an operand of the op's GEMMs: in held memory
        return round_role(self.roles, self.name, self.raw, self.axis, self.seed, self.scales, self.blocks, operand=True)

    def for_kernel(self, plain: bool = True, padded: bool = False) -> tuple[torch.Tensor, bool]:
        """(the tensor, whether the kernel rounds it as it loads it): raw where it may
        (``rounds_in_kernel``), unless rounded already."""
        if "rounded" not in self.__dict__ and rounds_in_kernel(self.roles.get(self.name), self.raw.device, plain,
                                                                 padded=padded):
            return self.raw, True
        return self.rounded, False


# a backward GEMM's (a, b, finish, index) from its two role tensors: finish takes the GEMM's
# result to the gradient's shape; index as ``gemm`` takes it
_GemmOperands = Callable[[torch.Tensor, torch.Tensor],
                         tuple[torch.Tensor, torch.Tensor, Callable, "torch.Tensor | None"]]


def backward_gemm(left: RoleTensor, right: RoleTensor, operands: _GemmOperands, spec: ArithSpec, gemm_seed,
                  out: str, axis: int, *, plain: tuple[bool, bool, bool] = (True, True, True),
                  padded: tuple[bool, bool] = (False, False),
                  transposed: tuple[bool, bool] = (False, False), out_blocks: tuple[int, ...] = (-1,),
                  direct: Callable[[torch.Tensor, torch.Tensor], "torch.Tensor | None"] | None = None) -> torch.Tensor:
    """The GEMM of role tensors ``left`` and ``right`` (``operands``), rounded to role ``out``.

    Where the op's backend has a generated GEMM, the roles are rounded in its prologue and
    epilogue as far as ``rounds_in_kernel`` allows, else in memory. ``plain``: whether a's,
    b's and the result's flat index is their role tensor's (``transposed``: a's or b's is its
    transpose's); ``padded``: whether a or b holds zeros an unfold padded in; ``out_blocks``:
    the dims a block format's blocks of role ``out`` run along; ``direct``: the emulated GEMM
    (float64, finished) of the rounded role tensors without laying out operands, or None where it
    does not serve (``implicit_conv``), tried where the backend has no generated GEMM.
    """
    roles, seed, scales = left.roles, left.seed, left.scales
    operand_roles = (roles.get(left.name), roles.get(right.name))
    if _fuses(spec, scales, left.raw.device):
        lt, round_a = left.for_kernel(plain[0], padded[0])
        rt, round_b = right.for_kernel(plain[1], padded[1])
        a, b, finish, index = operands(lt, rt)
        out_role = roles.get(out) if rounds_in_kernel(roles.get(out), a.device, plain[2]) else None
        fusion = GemmFusion(round_a=round_a, round_b=round_b, seed_a=_seed_of(left.name, seed),
                            seed_b=_seed_of(right.name, seed), a_transposed=transposed[0],
                            b_transposed=transposed[1], out_role=out_role, seed_out=_seed_of(out, seed))
        y = backend_gemm(a, b, spec, operand_roles, fusion, seed=gemm_seed, index=index)
        if y is not None:
            y = finish(y.to(a.dtype))
            return y if out_role is not None else round_role(roles, out, y, axis, seed, None, out_blocks)
    y = None if direct is None or spec.is_native else direct(left.rounded, right.rounded)
    if y is not None:
        return round_role(roles, out, y.to(left.rounded.dtype), axis, seed, scales, out_blocks)
    a, b, finish, index = operands(left.rounded, right.rounded)
    y = gemm(a, b, spec, gemm_seed, roles=operand_roles, index=index)
    return round_role(roles, out, finish(y), axis, seed, scales, out_blocks)


def _round_acc(s: torch.Tensor, e: torch.Tensor, spec: ArithSpec, seed: int | None, stream: int) -> torch.Tensor:
    """The exact s + e rounded once to the accumulator format (step 0 of ``stream``)."""
    n = spec.sr_bits_for(spec.acc)
    bits = None
    if spec.rounding == "stochastic":
        index = torch.arange(s.numel(), device=s.device).view(s.shape)
        bits = counter_words(index, stream_seed(seed, stream, 0))
    return round_exact(s, e, grid_of(spec.acc, spec.rounding, n), spec.rounding, bits, n)


def add_bias(y64: torch.Tensor, bias: torch.Tensor, spec: ArithSpec, seed: int | None) -> torch.Tensor:
    """One more rounded add into the accumulator: y + bias (broadcast to y), from the exact sum;
    a stochastic rounding's bits are numbered by y's flat index. y64 (the op's own sums) may be
    overwritten: the fold kernel adds in place where it serves."""
    if rounded_add_(y64, bias, spec):
        return y64
    return _round_acc(*two_sum(y64, bias.to(torch.float64)), spec, seed, STREAM_BIAS)


def native_grads(fn: Callable, xq, wq, has_bias: bool, grad: torch.Tensor) -> tuple:
    """Torch's own gradients of ``fn(x, w, bias)``: (grad x, grad w, grad bias or None)."""
    bias = torch.zeros(wq.shape[0], dtype=xq.dtype, device=xq.device) if has_bias else None
    with torch.enable_grad():
        if has_bias:
            _, vjp = torch.func.vjp(fn, xq, wq, bias)
            return vjp(grad)
        _, vjp = torch.func.vjp(lambda x, w: fn(x, w, None), xq, wq)
        return (*vjp(grad), None)


# -- linear ---------------------------------------------------------------------------------------
def _linear_operands(x, w, b, roles: RoleFormats, seed, scales):
    return (round_role(roles, "input", x, -1, seed, scales, operand=True),
            round_role(roles, "weight", w, 0, seed, scales, operand=True), round_role(roles, "bias", b, 0, seed, scales))


def _linear_sums(xq, wq, bq, fwd: ArithSpec, seed: int | None, roles: RoleFormats) -> torch.Tensor:
    """x W^T + b of the quantized operands in ``fwd``, before the output role."""
    if fwd.is_native:
        return F.linear(xq, wq, bq)
    rows = xq.reshape(1, _rows(xq), xq.shape[-1])
    y = emulated(rows, wq.t()[None], fwd, op_seed(seed, 0), (roles.get("input"), roles.get("weight")))
    if bq is not None:
        y = add_bias(y, bq, fwd, op_seed(seed, 0))
    return y.to(xq.dtype).reshape(*xq.shape[:-1], wq.shape[0])


def _fused_linear(x, w, b, roles: RoleFormats, fwd: ArithSpec, seed: int | None, scales) -> torch.Tensor | None:
    """``linear_forward`` as one kernel of the op's backend: input and weight rounded in its
    prologue (where ``rounds_in_kernel``), bias and output role in its epilogue; None where the
    backend has no such kernel for these roles and arithmetic."""
    if not _fuses(fwd, scales, x.device):
        return None
    xr, round_x = RoleTensor(roles, "input", x, -1, seed, None).for_kernel()
    wr, round_w = RoleTensor(roles, "weight", w, 0, seed, None).for_kernel()
    out = roles.get("output") if rounds_in_kernel(roles.get("output"), x.device, True) else None
    fusion = GemmFusion(round_a=round_x, round_b=round_w, seed_a=_seed_of("input", seed),
                        seed_b=_seed_of("weight", seed), b_transposed=True,
                        bias=round_role(roles, "bias", b, 0, seed, None), out_role=out,
                        seed_out=_seed_of("output", seed))
    y = backend_gemm(xr.reshape(1, _rows(x), x.shape[-1]), wr.t()[None], fwd,
                     (roles.get("input"), roles.get("weight")), fusion, seed=op_seed(seed, 0))
    if y is None:
        return None
    y = y.to(x.dtype).reshape(*x.shape[:-1], w.shape[0])
    return y if out is not None else round_role(roles, "output", y, -1, seed, None)


def linear_forward(x, w, b, roles: RoleFormats, fwd: ArithSpec, seed: int | None, scales=None) -> torch.Tensor:
    y = _fused_linear(x, w, b, roles, fwd, seed, scales)
    if y is not None:
        return y
    xq, wq, bq = _linear_operands(x, w, b, roles, seed, scales)
    return round_role(roles, "output", _linear_sums(xq, wq, bq, fwd, seed, roles), -1, seed, scales)


def linear_recompute(x, w, b, roles: RoleFormats, fwd: ArithSpec, high: Recompute, phi: str, seed: int | None,
                     scales=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``linear_forward`` with the components ``high`` selects recomputed; and how many stayed low."""
    xq, wq, bq = _linear_operands(x, w, b, roles, seed, scales)
    y, low = _recomputed(lambda spec: _linear_sums(xq, wq, bq, spec, seed, roles),
                         lambda: magnitudes("linear", xq, wq, bq), fwd, high, phi)
    return round_role(roles, "output", y, -1, seed, scales), low


def linear_backward(grad, x, w, has_bias: bool, roles: RoleFormats, fwd: ArithSpec, bwd: ArithSpec, seed,
                    scales=None):
    g, xs, ws = (RoleTensor(roles, "grad_output", grad, -1, seed, scales),
                 RoleTensor(roles, "input", x, -1, seed, scales), RoleTensor(roles, "weight", w, 0, seed, scales))
    if bwd.is_native:
        gx, gw, gb = native_grads(F.linear, xs.rounded, ws.rounded, has_bias, g.rounded)
        return (round_role(roles, "grad_input", gx, -1, seed, scales),
                round_role(roles, "grad_weight", gw, 0, seed, scales),
                round_role(roles, "grad_bias", gb, 0, seed, scales))
    rows = lambda t: t.reshape(1, _rows(x), w.shape[0])
    gb = sum_rows(rows(g.rounded)[0], bwd, op_seed(seed, 3)) if has_bias else None
    gx = backward_gemm(g, ws, lambda gt, wt: (rows(gt), wt[None], lambda y: y.reshape(x.shape), None), bwd,
                       op_seed(seed, 1), "grad_input", -1)
    gw = backward_gemm(g, xs, lambda gt, xt: (rows(gt).transpose(1, 2), xt.reshape(1, _rows(x), x.shape[-1]),
                                              lambda y: y[0], None),
                       bwd, op_seed(seed, 2), "grad_weight", 0, transposed=(True, False))
    return gx, gw, round_role(roles, "grad_bias", gb, 0, seed, scales)


def _recomputed(sums: Callable[[ArithSpec], torch.Tensor], magnitude: Callable[[], torch.Tensor], fwd: ArithSpec,
                high: Recompute, phi: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``sums(fwd)`` with every component whose ``component_kappa`` exceeds ``high.tau`` taken
    from ``sums(high.forward)``, and the number of components left low (an int64 0-d tensor).

    Both sums see the same quantized operands and seed, so a recomputed component equals the
    one a plain op in ``high.forward`` gives, to the bit. The high sums are formed for every
    component (emulation has no cheaper way to a subset), only when some component needs them.
    """
    if high.recomputes_all:
        y = sums(high.forward)
        return y, torch.zeros((), dtype=torch.int64, device=y.device)
    y = sums(fwd)
    if high.keeps_all_low:
        return y, torch.tensor(y.numel(), dtype=torch.int64, device=y.device)
    hot = component_kappa(magnitude(), y, activation(phi) if phi else None) > high.tau
    low = y.numel() - hot.sum()
    return (torch.where(hot, sums(high.forward), y) if bool(hot.any()) else y), low


def _rows(x: torch.Tensor) -> int:
    """The number of rows of x seen as (rows, x.shape[-1]), also when something is empty."""
    return _numel(x.shape, range(x.dim() - 1))


def sum_rows(g: torch.Tensor, spec: ArithSpec, seed) -> torch.Tensor:
    """Sum over dim 0 of a (R, C) tensor with the spec's accumulator (no products are rounded)."""
    if _sum_spec(spec).is_native:
        return g.sum(0)
    ones = torch.ones(1, g.shape[0], 1, dtype=g.dtype, device=g.device)
    return emulated(g.t()[None], ones, _sum_spec(spec), seed, exact_products=True)[0, :, 0].to(g.dtype)


def _sum_spec(spec: ArithSpec) -> ArithSpec:
    return replace(spec, mul=None, fma=False)


# -- matmul ---------------------------------------------------------------------------------------
def _as_matrices(a, b):
    """torch.matmul's broadcasting: (batch, M, K) and (batch, K, N) views, and how to undo it."""
    va = a.unsqueeze(0) if a.dim() == 1 else a
    vb = b.unsqueeze(-1) if b.dim() == 1 else b
    batch = va.shape[:-2]
    if vb.shape[:-2] != batch:  # torch.broadcast_shapes takes 20 us
        batch = torch.broadcast_shapes(batch, vb.shape[:-2])
    return va.expand(*batch, *va.shape[-2:]), vb.expand(*batch, *vb.shape[-2:]), batch


def _matmul_sums(aq, bq, fwd: ArithSpec, seed, roles: RoleFormats) -> torch.Tensor:
    """aq @ bq in ``fwd``, before the output role."""
    if fwd.is_native:
        return torch.matmul(aq, bq)
    ea, eb, batch = _as_matrices(aq, bq)
    nb = _numel(batch, range(len(batch)))
    y = gemm(ea.reshape(nb, *ea.shape[-2:]), eb.reshape(nb, *eb.shape[-2:]), fwd, op_seed(seed, 0),
             roles=(roles.get("input"), roles.get("weight")))
    return _matmul_result(y, aq, bq, batch)


def _fused_matmul(a, b, roles: RoleFormats, fwd: ArithSpec, seed, scales) -> torch.Tensor | None:
    """``matmul_forward`` as one kernel of the op's backend (operands rounded in its prologue,
    where ``rounds_in_kernel``; output role in its epilogue); None where it has none."""
    if not _fuses(fwd, scales, a.device):
        return None
    ea, eb, batch = _as_matrices(a, b)
    own = lambda x: (x.shape[:-2] if x.dim() > 1 else ()) == batch  # not broadcast: its own flat index
    ar, round_a = RoleTensor(roles, "input", a, -1, seed, None).for_kernel(plain=own(a))
    br, round_b = RoleTensor(roles, "weight", b, -1, seed, None, k_dim(b)).for_kernel(plain=own(b))
    ea, eb, _ = _as_matrices(ar, br)
    nb = _numel(batch, range(len(batch)))
    out = roles.get("output") if rounds_in_kernel(roles.get("output"), a.device, True) else None
    fusion = GemmFusion(round_a=round_a, round_b=round_b, seed_a=_seed_of("input", seed),
                        seed_b=_seed_of("weight", seed), out_role=out, seed_out=_seed_of("output", seed))
    y = backend_gemm(ea.reshape(nb, *ea.shape[-2:]), eb.reshape(nb, *eb.shape[-2:]), fwd,
                     (roles.get("input"), roles.get("weight")), fusion, seed=op_seed(seed, 0))
    if y is None:
        return None
    y = _matmul_result(y.to(a.dtype), a, b, batch)
    return y if out is not None else round_role(roles, "output", y, -1, seed, None)


def k_dim(b: torch.Tensor) -> tuple[int]:
    """The reduction dim of matmul's second operand, which block formats' blocks run along."""
    return (-2,) if b.dim() > 1 else (-1,)


def _matmul_result(y, a, b, batch) -> torch.Tensor:
    """The (batch, M, N) product of ``_as_matrices`` operands in torch.matmul's shape."""
    y = y.reshape(*batch, *y.shape[-2:])
    if a.dim() == 1:
        y = y.squeeze(-2)
    if b.dim() == 1:
        y = y.squeeze(-1)
    return y


def matmul_forward(a, b, roles: RoleFormats, fwd: ArithSpec, seed, scales=None) -> torch.Tensor:
    y = _fused_matmul(a, b, roles, fwd, seed, scales)
    if y is not None:
        return y
    aq = round_role(roles, "input", a, -1, seed, scales, operand=True)
    bq = round_role(roles, "weight", b, -1, seed, scales, k_dim(b), operand=True)
    return round_role(roles, "output", _matmul_sums(aq, bq, fwd, seed, roles), -1, seed, scales)


def matmul_recompute(a, b, roles: RoleFormats, fwd: ArithSpec, high: Recompute, phi: str, seed,
                     scales=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``matmul_forward`` with the components ``high`` selects recomputed; and how many stayed low."""
    aq = round_role(roles, "input", a, -1, seed, scales, operand=True)
    bq = round_role(roles, "weight", b, -1, seed, scales, k_dim(b), operand=True)
    y, low = _recomputed(lambda spec: _matmul_sums(aq, bq, spec, seed, roles), lambda: magnitudes("matmul", aq, bq),
                         fwd, high, phi)
    return round_role(roles, "output", y, -1, seed, scales), low


def _reduced_operands(left, right, target_shape):
    """left (batch, M, J) @ right (batch, J, K) as one batched GEMM whose result, reshaped to
    ``target_shape``, is summed over the batch dims where that operand was broadcast (those dims
    join the reduction, before J): (lo, ro)."""
    nb = left.dim() - 2
    target = (1,) * (nb + 2 - len(target_shape)) + tuple(target_shape)
    red = [i for i in range(nb) if target[i] == 1 and left.shape[i] != 1]
    keep = [i for i in range(nb) if i not in red]
    m, j, k = left.shape[-2], left.shape[-1], right.shape[-1]
    kept = _numel(left.shape, keep)
    lo = left.permute(*keep, nb, *red, nb + 1).reshape(kept, m, _numel(left.shape, red) * j)
    ro = right.permute(*keep, *red, nb, nb + 1).reshape(kept, _numel(right.shape, red) * j, k)
    return lo, ro


def _numel(shape, dims) -> int:
    n = 1
    for d in dims:
        n *= shape[d]
    return n


def matmul_backward(grad, a, b, roles: RoleFormats, fwd: ArithSpec, bwd: ArithSpec, seed, scales=None):
    g, as_, bs = (RoleTensor(roles, "grad_output", grad, -1, seed, scales),
                  RoleTensor(roles, "input", a, -1, seed, scales),
                  RoleTensor(roles, "weight", b, -1, seed, scales, k_dim(b)))
    if bwd.is_native:
        with torch.enable_grad():
            ga, gb = torch.func.vjp(torch.matmul, as_.rounded, bs.rounded)[1](g.rounded)
        return (round_role(roles, "grad_input", ga, -1, seed, scales),
                round_role(roles, "grad_weight", gb, -1, seed, scales, k_dim(b)))
    batch = _as_matrices(a, b)[2]
    a_shape = a.shape if a.dim() > 1 else (1, a.shape[0])
    b_shape = b.shape if b.dim() > 1 else (b.shape[0], 1)
    # a broadcast operand's gradient sums over the batch dims it was broadcast over: its GEMM's
    # operands are permuted views, whose flat index is no role tensor's
    plain = tuple(a_shape[:-2]) == tuple(batch) and tuple(b_shape[:-2]) == tuple(batch)

    grad2 = lambda gt: gt.reshape(*batch, a_shape[-2], b_shape[-1])

    def ga_operands(gt, bt):
        eb = _as_matrices(a, bt)[1]
        return (*_reduced_operands(grad2(gt), eb.transpose(-1, -2), a_shape), lambda y: y.reshape(a.shape), None)

    def gb_operands(at, gt):
        ea = _as_matrices(at, b)[0]
        return (*_reduced_operands(ea.transpose(-1, -2), grad2(gt), b_shape), lambda y: y.reshape(b.shape), None)

    ga = backward_gemm(g, bs, ga_operands, bwd, op_seed(seed, 1), "grad_input", -1, plain=(plain,) * 3,
                       transposed=(False, True))
    gb = backward_gemm(as_, g, gb_operands, bwd, op_seed(seed, 2), "grad_weight", -1, plain=(plain,) * 3,
                       transposed=(True, False), out_blocks=k_dim(b))
    return ga, gb


# -- conv -----------------------------------------------------------------------------------------
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def conv_index(spec: ArithSpec, a: torch.Tensor, out_shape: tuple, groups: int) -> torch.Tensor | None:
    """For a stochastic accumulator, the output elements' numbers (which count the random bits)
    in the layout of the GEMM over patches ``a``; None otherwise."""
    if not spec.stochastic:
        return None
    n = out_shape[0]
    index = torch.arange(_numel(out_shape, range(len(out_shape))), device=a.device)
    return index.view(n, groups, -1, a.shape[1] // n).permute(1, 0, 3, 2).reshape(groups, a.shape[1], -1)


def channel_rows(t: torch.Tensor, groups: int) -> torch.Tensor:
    """(N, C, *S) as a weight gradient's left operand: (groups, C / groups, N * prod(S)), each
    channel's values over (sample, position) in row-major order."""
    n, c = t.shape[:2]
    positions = _numel(t.shape, range(2, t.dim()))  # not -1: an empty batch has no size to infer
    return t.reshape(n, groups, c // groups, positions).permute(1, 2, 0, 3).reshape(groups, c // groups, n * positions)


def _conv_gemm(x, w, stride, padding, dilation, groups, spec, seed, roles=(None, None)):
    """An emulated convolution without bias: float64 accumulator values, (N, C_out, *O)."""
    y = conv_sums(x, w, stride, padding, dilation, groups, spec)
    if y is not None:
        return y
    with section("im2col"):
        a, b, out_shape, to_output = conv_as_gemm_operands(x, w, stride, padding, dilation, groups)
    return to_output(emulated(a, b, spec, seed, roles, index=conv_index(spec, a, out_shape, groups)))


def _conv_sums(xq, wq, bq, stride, padding, dilation, groups, fwd: ArithSpec, seed,
               roles: tuple[QuantSpec | None, QuantSpec | None] = (None, None)) -> torch.Tensor:
    """The convolution of the quantized operands in ``fwd``, before the output role."""
    if fwd.is_native:
        return _CONV[wq.dim() - 2](xq, wq, bq, stride, padding, dilation, groups)
    y = _conv_gemm(xq, wq, stride, padding, dilation, groups, fwd, op_seed(seed, 0), roles)
    if bq is not None:
        y = add_bias(y, bq.reshape((1, -1) + (1,) * (y.dim() - 2)), fwd, op_seed(seed, 0))
    return y.to(xq.dtype)


def _conv_operands(x, w, b, roles: RoleFormats, seed, scales):
    return (round_role(roles, "input", x, 1, seed, scales, (1,), operand=True),
            round_role(roles, "weight", w, 0, seed, scales, kernel_dims(w), operand=True),
            round_role(roles, "bias", b, 0, seed, scales))


def _fused_conv(x, w, b, conv: tuple, roles: RoleFormats, fwd: ArithSpec, seed, scales) -> torch.Tensor | None:
    """``conv_forward`` as one kernel of the op's backend over the patches: the weight, and a
    deterministic input role, rounded in its prologue; bias, and a deterministic output role
    (the output's layout is not the GEMM's), in its epilogue; None where it has none."""
    if not _fuses(fwd, scales, x.device):
        return None
    xr, round_x = RoleTensor(roles, "input", x, 1, seed, None, (1,)).for_kernel(plain=False, padded=True)
    # the GEMM reads w as (G, C_g*K, C_out/G): its transpose per group
    wr, round_w = RoleTensor(roles, "weight", w, 0, seed, None, kernel_dims(w)).for_kernel()
    a, bm, out_shape, to_output = conv_as_gemm_operands(xr, wr, *conv)
    out = roles.get("output") if rounds_in_kernel(roles.get("output"), x.device, False) else None
    bq = round_role(roles, "bias", b, 0, seed, None)
    fusion = GemmFusion(round_a=round_x, round_b=round_w, seed_a=_seed_of("input", seed),
                        seed_b=_seed_of("weight", seed), b_transposed=True,
                        bias=None if bq is None else bq.reshape(conv[-1], -1), out_role=out,
                        seed_out=_seed_of("output", seed))
    y = backend_gemm(a, bm, fwd, (roles.get("input"), roles.get("weight")), fusion, seed=op_seed(seed, 0),
                     index=conv_index(fwd, a, out_shape, conv[-1]))
    if y is None:
        return None
    y = to_output(y.to(x.dtype))
    return y if out is not None else round_role(roles, "output", y, 1, seed, None, (1,))


def conv_forward(x, w, b, stride, padding, dilation, groups, roles: RoleFormats, fwd: ArithSpec, seed, scales=None):
    y = _fused_conv(x, w, b, (stride, padding, dilation, groups), roles, fwd, seed, scales)
    if y is not None:
        return y
    xq, wq, bq = _conv_operands(x, w, b, roles, seed, scales)
    operands = (roles.get("input"), roles.get("weight"))
    y = _conv_sums(xq, wq, bq, stride, padding, dilation, groups, fwd, seed, operands)
    return round_role(roles, "output", y, 1, seed, scales, (1,))


def conv_recompute(x, w, b, stride, padding, dilation, groups, roles: RoleFormats, fwd: ArithSpec, high: Recompute,
                   phi: str, seed, scales=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``conv_forward`` with the components ``high`` selects recomputed; and how many stayed low."""
    xq, wq, bq = _conv_operands(x, w, b, roles, seed, scales)
    conv = (stride, padding, dilation, groups)
    operands = (roles.get("input"), roles.get("weight"))
    y, low = _recomputed(lambda spec: _conv_sums(xq, wq, bq, *conv, spec, seed, operands),
                         lambda: magnitudes(f"conv{wq.dim() - 2}d", xq, wq, bq, *conv), fwd, high, phi)
    return round_role(roles, "output", y, 1, seed, scales, (1,)), low


def conv_backward(grad, x, w, has_bias, stride, padding, dilation, groups, roles: RoleFormats,
                  fwd: ArithSpec, bwd: ArithSpec, seed, scales=None):
    g, xs, ws = (RoleTensor(roles, "grad_output", grad, 1, seed, scales, (1,)),
                 RoleTensor(roles, "input", x, 1, seed, scales, (1,)),
                 RoleTensor(roles, "weight", w, 0, seed, scales, kernel_dims(w)))
    if bwd.is_native:  # the kernel torch's autograd calls for a convolution, without a forward to record
        gx, gw, gb = torch.ops.aten.convolution_backward(g.rounded, xs.rounded, ws.rounded,
                                                         [w.shape[0]] if has_bias else None, stride, padding,
                                                         dilation, False, [0] * (w.dim() - 2), groups,
                                                         [True, True, has_bias])
        return (round_role(roles, "grad_input", gx, 1, seed, scales, (1,)),
                round_role(roles, "grad_weight", gw, 0, seed, scales, kernel_dims(w)),
                round_role(roles, "grad_bias", gb, 0, seed, scales))
    c_out = grad.shape[1]
    gb = sum_rows(g.rounded.transpose(0, 1).reshape(c_out, -1).t(), bwd, op_seed(seed, 3)) if has_bias else None

    def gx_operands(gt, wt):  # grad_input: a stride-1 convolution of the upsampled gradient
        with section("im2col"):
            a, b, x_shape, to_input = conv_as_gemm_operands(
                *transposed_conv_operands(gt, wt, x.shape, stride, padding, dilation, groups), groups)
        return a, b, to_input, conv_index(bwd, a, x_shape, groups)

    def gw_operands(gt, xt):  # grad_weight: grad_output's rows against the input's patches
        with section("im2col"):
            patches = conv_as_gemm_operands(xt, w, stride, padding, dilation, groups)[0]
            rows = channel_rows(gt, groups)
        return rows, patches, lambda y: y.reshape(w.shape), None

    def gx_direct(gt, wt):
        if not serves(bwd, gt, wt, groups):
            return None
        with section("im2col"):
            operands = transposed_conv_operands(gt, wt, x.shape, stride, padding, dilation, groups)
        return conv_sums(*operands, groups, bwd)

    def gw_direct(gt, xt):
        return weight_grad_sums(gt, xt, w.shape, stride, padding, dilation, groups, bwd)

    # the unfolded and permuted operands are not laid out as their role tensors, and hold padding zeros
    gx = backward_gemm(g, ws, gx_operands, bwd, op_seed(seed, 1), "grad_input", 1, plain=(False, False, False),
                       padded=(True, False), out_blocks=(1,), direct=gx_direct)
    gw = backward_gemm(g, xs, gw_operands, bwd, op_seed(seed, 2), "grad_weight", 0, plain=(False, False, True),
                       padded=(False, True), out_blocks=kernel_dims(w), direct=gw_direct)
    return gx, gw, round_role(roles, "grad_bias", gb, 0, seed, scales)


# -- reductions -----------------------------------------------------------------------------------
def _reduce(x, dims, keepdim, spec, seed):
    """(float64 sums holding acc values, output shape, count) of x over dims."""
    nd = x.dim()
    dims = sorted({d % max(nd, 1) for d in dims}) if dims else list(range(nd))
    kept = [d for d in range(nd) if d not in dims]
    count = _numel(x.shape, dims)
    rows = x.permute(*kept, *dims).reshape(1, _numel(x.shape, kept), count)
    ones = torch.ones(1, count, 1, dtype=x.dtype, device=x.device)
    s = emulated(rows, ones, _sum_spec(spec), seed, exact_products=True)
    shape = [1 if d in dims else x.shape[d] for d in range(nd)] if keepdim else [x.shape[d] for d in kept]
    return s.reshape(shape), count


def reduce_sum(x, dims, keepdim, spec: ArithSpec, seed) -> torch.Tensor:
    if _sum_spec(spec).is_native:
        return x.sum(dim=dims or None, keepdim=keepdim)
    return _reduce(x, dims, keepdim, spec, seed)[0].to(x.dtype)


def reduce_mean(x, dims, keepdim, spec: ArithSpec, seed) -> torch.Tensor:
    """The sum, then one rounding of the exact quotient sum / count to the acc format."""
    if _sum_spec(spec).is_native:
        return x.mean(dim=dims or None, keepdim=keepdim)
    s, count = _reduce(x, dims, keepdim, spec, seed)
    q = s / count
    hi, lo = two_prod(q, torch.full_like(q, float(count)))
    residual = (s - hi) - lo  # exact: the remainder of a correctly rounded quotient is a float
    # residual / count has the sign and zeroness of the exact remainder, all rounding looks at
    return _round_acc(q, residual / count, spec, seed, STREAM_DIV).to(x.dtype)
