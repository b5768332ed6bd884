"""``torch.addmm`` and ``torch.baddbmm`` with per-role formats and emulated arithmetic.

``addmm(input, mat1, mat2)`` is ``input + mat1 @ mat2`` with mat1 (M, K), mat2 (K, N) and the
addend ``input`` any shape that broadcasts to (M, N); ``baddbmm`` is the same per batch, with
batch1 (B, M, K), batch2 (B, K, N) and ``input`` broadcasting to (B, M, N). Hugging Face
GPT-2's ``Conv1D`` is ``torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)`` with
the weight stored (in, out).

What the op computes (alpha = beta = 1; other values are refused, not emulated):

- Roles: ``input`` = mat1 (channel axis -1, as ``linear``'s input); ``weight`` = mat2
  transposed, i.e. the (N, K) matrix (per batch: (B, N, K)) that ``linear`` calls its
  weight: its channel axis is the output column N, block formats' blocks run along the
  reduction dim K, and stochastic rounding numbers its bits by that transpose's row-major
  index; ``bias`` = torch's addend ``input``, rounded as it is given (channel axis -1, bits
  by its own flat index), then broadcast; ``output``, ``grad_output``, ``grad_input`` (mat1's
  gradient), ``grad_weight`` (mat2's, rounded in the same transposed layout as the weight),
  ``grad_bias`` (the addend's) as in ``linear``.
- Forward: each output element is the dot product of its row of mat1 and column of mat2 in
  the forward spec (products and sums rounded as ``matmul`` rounds them, over k = 0, 1, ...,
  random bits numbered by the output element's flat index), then the addend, broadcast, is
  added into the accumulator as one more rounded add (the exact sum rounded once), as
  ``linear`` adds its bias; then the output role.
- Backward, in the backward spec: grad_input = grad_output @ mat2ᵀ (reduction over N),
  grad_weight = (grad_outputᵀ @ mat1)ᵀ (reduction over M, per batch), grad_bias = grad_output
  summed over the dims the addend was broadcast over (one reduction over them, row-major; a
  sum of one term is that term rounded to the accumulator), as ``linear``'s bias gradient.

So ``addmm(b, x, W)`` with a 1-d ``b`` of size N is ``linear(x, W.t(), b)`` to the bit
(stochastic rounding included), and runs as that (its fused kernels included);
``baddbmm`` with B = 1 is ``addmm``. With fp32 specs and no formats both are torch's own ops,
forward and backward, to the bit.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..backends import check_backend, use_backend
from . import bodies
from .api import Formats, Spec, check_operands, delayed_role_scales, fx_leaf, prepare_op
from .bodies import RoleTensor, add_bias, backward_gemm, emulated, round_role, sum_rows
from .library import backward_scales, dense, gradients, inputs_of, mpc_op, save_gemm, seed_value
from .roles import op_seed
from .spec import ArithSpec, RoleFormats, parse_arith, parse_roles

__all__ = ["addmm", "baddbmm", "addmm_forward", "addmm_backward"]


# -- body -----------------------------------------------------------------------------------------
def _as_linear(bias_shape, a: torch.Tensor, b: torch.Tensor, spec: ArithSpec) -> bool:
    """Whether the call is ``linear(a, b.t(), bias)``: 2-d, a 1-d bias of size N, emulated."""
    return a.dim() == 2 and tuple(bias_shape) == (b.shape[1],) and not spec.is_native


def _batched(t: torch.Tensor) -> torch.Tensor:
    """A matrix as a batch of one (the GEMMs run batched); a batch as it is."""
    return t if t.dim() == 3 else t[None]


def addmm_forward(bias, a, b, roles: RoleFormats, fwd: ArithSpec, seed: int | None, scales=None) -> torch.Tensor:
    """bias + a @ b (a, b 2-d: addmm; 3-d: baddbmm), as the module docstring says."""
    if _as_linear(bias.shape, a, b, fwd):
        return bodies.linear_forward(a, b.t(), bias, roles, fwd, seed, scales)
    aq = round_role(roles, "input", a, -1, seed, scales)
    wq = round_role(roles, "weight", b.mT, -2, seed, scales).mT
    bq = round_role(roles, "bias", bias, -1, seed, scales)
    if fwd.is_native:
        y = (torch.addmm if a.dim() == 2 else torch.baddbmm)(bq, aq, wq)
    else:
        y = emulated(_batched(aq), _batched(wq), fwd, op_seed(seed, 0), (roles.get("input"), roles.get("weight")))
        y = add_bias(y.reshape(*a.shape[:-1], b.shape[-1]), bq, fwd, op_seed(seed, 0)).to(a.dtype)
    return round_role(roles, "output", y, -1, seed, scales)


def _bias_grad(gq: torch.Tensor, bias_shape: list[int], spec: ArithSpec, seed: int | None) -> torch.Tensor:
    """gq summed over the dims a ``bias_shape`` addend was broadcast over, in ``spec``'s
    accumulator: one reduction over those dims, row-major (``sum_rows``)."""
    padded = (1,) * (gq.dim() - len(bias_shape)) + tuple(bias_shape)
    reduced = [d for d in range(gq.dim()) if padded[d] == 1]
    kept = [d for d in range(gq.dim()) if padded[d] != 1]
    rows = gq.permute(*reduced, *kept).reshape(math.prod(gq.shape[d] for d in reduced), -1)
    return sum_rows(rows, spec, seed).reshape(bias_shape)


def addmm_backward(grad, a, b, bias_shape: list[int], roles: RoleFormats, fwd: ArithSpec, bwd: ArithSpec,
                   seed: int | None, scales=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad a, grad b, grad bias) of ``addmm_forward``, as the module docstring says."""
    if _as_linear(bias_shape, a, b, bwd):
        ga, gw, gb = bodies.linear_backward(grad, a, b.t(), True, roles, fwd, bwd, seed, scales)
        return ga, gw.t(), gb
    g, xs, ws = (RoleTensor(roles, "grad_output", grad, -1, seed, scales),
                 RoleTensor(roles, "input", a, -1, seed, scales), RoleTensor(roles, "weight", b.mT, -2, seed, scales))
    if bwd.is_native:  # torch's own backward (its layouts too: b as it was given, where no role rounds it)
        fn = torch.addmm if a.dim() == 2 else torch.baddbmm
        with torch.enable_grad():
            _, vjp = torch.func.vjp(fn, grad.new_zeros(bias_shape), xs.rounded, ws.rounded.mT)
            gb, ga, gw = vjp(g.rounded)
        gw = gw.mT
    else:
        gb = _bias_grad(g.rounded, bias_shape, bwd, op_seed(seed, 3))
        ga = backward_gemm(g, ws, lambda gt, wt: (_batched(gt), _batched(wt), lambda y: y.reshape(a.shape), None),
                           bwd, op_seed(seed, 1), "grad_input", -1)
        gw = backward_gemm(g, xs, lambda gt, xt: (_batched(gt).mT, _batched(xt), lambda y: y.reshape(b.mT.shape),
                                                  None),
                           bwd, op_seed(seed, 2), "grad_weight", -2, transposed=(True, False))
        return ga, gw.mT, round_role(roles, "grad_bias", gb, -1, seed, scales)
    return (round_role(roles, "grad_input", ga, -1, seed, scales),
            round_role(roles, "grad_weight", gw, -2, seed, scales).mT,
            round_role(roles, "grad_bias", gb, -1, seed, scales))


# -- mpc:: ops --------------------------------------------------------------------------------------
def _forward(bias, a, b, roles, fwd, seed, scales, backend) -> torch.Tensor:
    with use_backend(backend):
        y = addmm_forward(bias, a, b, parse_roles(roles), parse_arith(fwd), seed_value(seed), scales)
    return y.contiguous()


@mpc_op("addmm")
def addmm_op(input: torch.Tensor, mat1: torch.Tensor, mat2: torch.Tensor, roles: str, fwd: str, bwd: str,
             seed: Optional[torch.Tensor], scales: Optional[torch.Tensor] = None,
             history: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """input + mat1 @ mat2 (2-d) with per-role formats and the forward arithmetic ``fwd``."""
    return _forward(input, mat1, mat2, roles, fwd, seed, scales, backend)


@mpc_op("baddbmm")
def baddbmm_op(input: torch.Tensor, batch1: torch.Tensor, batch2: torch.Tensor, roles: str, fwd: str, bwd: str,
               seed: Optional[torch.Tensor], scales: Optional[torch.Tensor] = None,
               history: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """input + batch1 @ batch2 (3-d) with per-role formats and the forward arithmetic ``fwd``."""
    return _forward(input, batch1, batch2, roles, fwd, seed, scales, backend)


@addmm_op.register_fake
def _(input, mat1, mat2, roles, fwd, bwd, seed, scales=None, history=None, backend="auto"):
    return mat1.new_empty(mat1.shape[0], mat2.shape[1])


@baddbmm_op.register_fake
def _(input, batch1, batch2, roles, fwd, bwd, seed, scales=None, history=None, backend="auto"):
    return batch1.new_empty(batch1.shape[0], batch1.shape[1], batch2.shape[2])


@mpc_op("addmm_backward")
def addmm_backward_op(grad: torch.Tensor, mat1: torch.Tensor, mat2: torch.Tensor, bias_shape: list[int], roles: str,
                      fwd: str, bwd: str, seed: Optional[torch.Tensor], scales: Optional[torch.Tensor] = None,
                      backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of ``addmm`` (2-d mats) or ``baddbmm`` (3-d): mat1's, mat2's, the addend's."""
    with use_backend(backend):
        g1, g2, gb = addmm_backward(grad, mat1, mat2, bias_shape, parse_roles(roles), parse_arith(fwd),
                                    parse_arith(bwd), seed_value(seed), scales)
    if gb.untyped_storage().data_ptr() == grad.untyped_storage().data_ptr():
        gb = gb.clone()  # an addend of the output's shape: torch's gradient is grad itself, and an op returns no alias
    return dense(g1, g2, gb, mat2)


@addmm_backward_op.register_fake
def _(grad, mat1, mat2, bias_shape, roles, fwd, bwd, seed, scales=None, backend="auto"):
    return mat1.new_empty(mat1.shape), mat2.new_empty(mat2.shape), mat2.new_empty(bias_shape)


def _register_autograd(op, first: str, second: str) -> None:
    """The autograd of ``op`` (addmm or baddbmm, whose mats are named ``first``, ``second``)."""
    def setup(ctx, inputs, output):
        args = inputs_of(op, inputs)
        save_gemm(ctx, args, first, second)
        ctx.bias_shape = list(args.input.shape)

    def backward(ctx, grad):
        a, b, seed = ctx.saved_tensors
        ga, gb, gbias = torch.ops.mpc.addmm_backward(grad, a, b, ctx.bias_shape, ctx.roles, ctx.fwd, ctx.bwd, seed,
                                                     backward_scales(ctx, grad), ctx.backend)
        return gradients(op, input=gbias, **{first: ga, second: gb})

    op.register_autograd(backward, setup_context=setup)


_register_autograd(addmm_op, "mat1", "mat2")
_register_autograd(baddbmm_op, "batch1", "batch2")


# -- entry points -----------------------------------------------------------------------------------
def _check(name: str, input, a, b, rank: int, beta, alpha) -> None:
    for what, value in (("beta", beta), ("alpha", alpha)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != 1:
            raise ValueError(f"mpcompile.ops.{name}: {what}={value!r} is not emulated: only alpha = beta = 1 (the "
                             f"product and the addend added as they are); scale an operand yourself, or keep the "
                             f"op in fp32 (torch.{name})")
    names = ("batch1", "batch2") if rank == 3 else ("mat1", "mat2")
    check_operands(name, input=input, **dict(zip(names, (a, b))))
    if a.dim() != rank or b.dim() != rank or a.shape[-1] != b.shape[-2] or a.shape[:-2] != b.shape[:-2]:
        shapes = "(B, M, K) and (B, K, N)" if rank == 3 else "(M, K) and (K, N)"
        raise ValueError(f"mpcompile.ops.{name}: {names[0]} {tuple(a.shape)} and {names[1]} {tuple(b.shape)} do not "
                         f"multiply: they must be {shapes}")
    out = (*a.shape[:-1], b.shape[-1])
    try:
        fits = input.dim() <= rank and torch.broadcast_shapes(input.shape, out) == out
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"mpcompile.ops.{name}: input {tuple(input.shape)} does not broadcast to the product's shape "
                         f"{out}")


def _call(op, name: str, input, a, b, formats, forward, backward, seed, amax_history, backend) -> torch.Tensor:
    roles, fwd, bwd, s = prepare_op(name, formats, forward, backward, seed, input=input, a=a, b=b)
    scales = delayed_role_scales(roles, amax_history, a, b)
    return op(input, a, b, roles, fwd, bwd, s, scales, amax_history, check_backend(backend))


@fx_leaf
def addmm(input: torch.Tensor, mat1: torch.Tensor, mat2: torch.Tensor, *, beta=1, alpha=1, formats: Formats = None,
          forward: Spec = None, backward: Spec = None, seed: int | None = None,
          amax_history: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """``torch.addmm(input, mat1, mat2)`` with per-role formats and emulated arithmetic (the
    semantics: this module's docstring).

    Args:
        input: the addend (role ``bias``), any shape that broadcasts to (M, N).
        mat1, mat2: (M, K) and (K, N); roles ``input`` = mat1, ``weight`` = mat2ᵀ (linear's (N, K)).
        beta, alpha: must be 1 (anything else is not emulated: a ValueError).
        formats, forward, backward, seed, amax_history, backend: as ``linear``'s.
    """
    _check("addmm", input, mat1, mat2, 2, beta, alpha)
    return _call(torch.ops.mpc.addmm, "addmm", input, mat1, mat2, formats, forward, backward, seed, amax_history,
                 backend)


@fx_leaf
def baddbmm(input: torch.Tensor, batch1: torch.Tensor, batch2: torch.Tensor, *, beta=1, alpha=1,
            formats: Formats = None, forward: Spec = None, backward: Spec = None, seed: int | None = None,
            amax_history: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """``torch.baddbmm(input, batch1, batch2)``: ``addmm`` per batch (the same roles and sums).

    Args:
        input: the addend (role ``bias``), any shape that broadcasts to (B, M, N).
        batch1, batch2: (B, M, K) and (B, K, N); roles ``input`` = batch1, ``weight`` = batch2ᵀ.
        beta, alpha: must be 1 (anything else is not emulated: a ValueError).
        formats, forward, backward, seed, amax_history, backend: as ``linear``'s.
    """
    _check("baddbmm", input, batch1, batch2, 3, beta, alpha)
    return _call(torch.ops.mpc.baddbmm, "baddbmm", input, batch1, batch2, formats, forward, backward, seed,
                 amax_history, backend)
