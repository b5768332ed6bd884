"""ops.conv_transpose1d/2d/3d: torch's transposed convolutions to the bit in fp32; in low
precision, the same numbers as ops.conv2d over the operands a transposed convolution is made of
(the zero-upsampled input and the flipped, channel-swapped kernel; grad_output and the kernel)."""
from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn.functional as F

from mpcompile import ops
from mpcompile.ops.reference import dot
from mpcompile.ops.roles import op_seed, quantize_role
from mpcompile.ops.spec import ROLES, parse_arith, parse_quant

from test_emulate import assert_bitwise

FMT = {"input": "fp8_e4m3", "weight": "fp8_e4m3", "bias": "bf16", "output": "bf16", "grad_output": "fp8_e5m2",
       "grad_input": "bf16", "grad_weight": "e5m7", "grad_bias": "bf16"}
NEAREST = dict(formats=FMT, forward="acc=e6m9 order=chunk(4)", backward="acc=e6m9 order=chunk(4)")
STOCHASTIC = dict(formats=dict(FMT, input="fp8_e4m3:stochastic", weight="e3m2:stochastic", bias="bf16:stochastic",
                               output="e4m3:stochastic", grad_output="fp8_e5m2:stochastic",
                               grad_weight="bf16:stochastic"),
                  forward="mul=e5m2 acc=e6m9 rounding=stochastic",
                  backward="acc=e6m9 rounding=stochastic order=chunk(4)", seed=5)

# (nd, stride, padding, output_padding, dilation, groups)
CONVS = [(1, 1, 0, 0, 1, 1), (2, 2, 1, 1, 1, 2), (2, 1, 2, 1, 2, 1), (2, (2, 3), (0, 2), (1, 2), (1, 2), 1),
         (3, 2, 1, 1, 1, 1)]


def _leaves(*shapes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in shapes]


def _operands(nd, groups, seed=0, bias=True, size=4):
    """(x, w[, b]) of a transposed convolution: 4 input channels, 6 output channels."""
    return _leaves((2, 4, *[size] * nd), (4, 6 // groups, *[3, 2, 2][:nd]), *[(6,)] * bias, seed=seed)


def _run(fn, leaves, grad=None, seed=1):
    """fn(*leaves) and the gradients through it (of ``grad``, or of a random one), every leaf's."""
    y = fn(*leaves)
    if grad is None:
        grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed))
    return [y.detach(), *torch.autograd.grad(y, leaves, grad)]


# -- (i) fp32 specs and no formats: torch, forward and backward, to the bit ------------------------
@pytest.mark.parametrize("nd,stride,padding,output_padding,dilation,groups", CONVS)
def test_native_is_torch(nd, stride, padding, output_padding, dilation, groups):
    args = (stride, padding, output_padding, groups, dilation)
    for bias in (True, False):
        leaves = _operands(nd, groups, bias=bias)
        ours, theirs = getattr(ops, f"conv_transpose{nd}d"), getattr(F, f"conv_transpose{nd}d")
        got = _run(lambda x, w, b=None: ours(x, w, b, *args), leaves)
        want = _run(lambda x, w, b=None: theirs(x, w, b, *args), leaves)
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def test_gradcheck_float64_native():
    leaves = _leaves((1, 2, 3, 3), (2, 2, 2, 2), (4,), dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *t: ops.conv_transpose2d(*t, stride=2, padding=1, output_padding=1,
                                                                    groups=2), leaves)


# -- (ii) low precision: ops.conv2d over the operands, by hand -------------------------------------
def _rounded(t: torch.Tensor, kw: dict, role: str, axis: int) -> torch.Tensor:
    """t rounded to ``role`` as the op rounds it: the role's format, the op's sub-seed of the role."""
    spec = parse_quant(kw["formats"][role])
    return quantize_role(t.detach(), spec, axis=axis, seed=op_seed(kw.get("seed"), 16 + ROLES.index(role)))


def _upsampled(xq, w, stride, padding, output_padding, dilation):
    """xq with stride - 1 zeros between its elements, padded by dilation * (k - 1) - padding on
    the left and that plus output_padding on the right (a negative pad crops)."""
    n, c, *sizes = xq.shape
    up = xq.new_zeros(n, c, *[(s - 1) * st + 1 for s, st in zip(sizes, stride)])
    up[(slice(None), slice(None), *(slice(None, None, st) for st in stride))] = xq
    pads = []
    for d in reversed(range(len(sizes))):
        left = dilation[d] * (w.shape[2 + d] - 1) - padding[d]
        pads += [left, left + output_padding[d]]
    return F.pad(up, pads)


def _swapped(wq, groups):
    """(C_in, C_out / G, *k) -> the convolution's (C_out, C_in / G, *k), kernel flipped."""
    c_in, c_og, *k = wq.shape
    swapped = wq.reshape(groups, c_in // groups, c_og, *k).transpose(1, 2).reshape(groups * c_og, c_in // groups, *k)
    return swapped.flip(list(range(2, wq.dim())))


@pytest.mark.parametrize("case", ["nearest", "stochastic"])
def test_forward_and_grad_bias_are_conv2d_of_the_upsampled_input_and_the_flipped_kernel(case):
    """ops.conv2d with padding 0 over the upsampled, padded input reads the same patches, zeros
    included, and reduces them in the same order; its outputs are numbered like ours (N, C_out,
    *O), its forward GEMM and bias gradient take the same sub-seeds of the op's seed, and the roles
    it is given (bias, output, grad_output) round the same tensors with the same bits. The input
    and weight are rounded by hand as the op rounds them (their sub-seeds, their flat indices)."""
    kw = NEAREST if case == "nearest" else STOCHASTIC
    stride, padding, output_padding, dilation, groups = (2, 1), (1, 0), (1, 0), (1, 2), 2
    x, w, b = _operands(2, groups, seed=2, size=3)
    args = (stride, padding, output_padding, groups, dilation)
    y, gx, gw, gb = _run(lambda x, w, b: ops.conv_transpose2d(x, w, b, *args, **kw), (x, w, b))
    up = _upsampled(_rounded(x, kw, "input", 1), w, stride, padding, output_padding, dilation)
    wt = _swapped(_rounded(w, kw, "weight", 1), groups)
    hand = dict(kw, formats={r: kw["formats"][r] for r in ("bias", "output", "grad_output", "grad_bias")})
    y0, gb0 = _run(lambda b: ops.conv2d(up, wt, b, 1, 0, dilation, groups, **hand), (b,))
    assert_bitwise(y, y0)
    assert_bitwise(gb, gb0)


@pytest.mark.parametrize("case", ["nearest", "stochastic"])
def test_grad_weight_is_conv2ds_weight_gradient_with_the_roles_of_input_and_grad_output_swapped(case):
    """A transposed convolution's weight gradient is the weight gradient of the convolution with
    the same weight, stride, padding, dilation and groups whose input is grad_output and whose
    grad_output is x: the same products, reduced over (batch, position of x) in the same order,
    numbered by w's flat index, with the same sub-seed (the weight gradient's) of the op's seed."""
    kw = NEAREST if case == "nearest" else STOCHASTIC
    stride, padding, output_padding, dilation, groups = (2, 1), (1, 0), (1, 0), (1, 2), 2
    x, w = _operands(2, groups, seed=3, bias=False, size=3)
    y, gx, gw = _run(lambda x, w: ops.conv_transpose2d(x, w, None, stride, padding, output_padding, groups, dilation,
                                                       **kw), (x, w), seed=4)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(4))
    gq, xq = _rounded(g, kw, "grad_output", 1), _rounded(x, kw, "input", 1)
    hand = dict(kw, formats={"grad_weight": kw["formats"]["grad_weight"]})
    w0 = w.detach().requires_grad_()
    (gw0,) = torch.autograd.grad(ops.conv2d(gq, w0, None, stride, padding, dilation, groups, **hand), w0, xq)
    assert_bitwise(gw, gw0)


@pytest.mark.parametrize("nd,stride,padding,output_padding,dilation,groups", CONVS[:4])
def test_grad_input_is_conv2d_of_grad_output_with_the_kernel(nd, stride, padding, output_padding, dilation, groups):
    """grad_input is the ordinary convolution of the rounded grad_output with the rounded kernel
    (stride, padding, dilation, groups of the op) in the backward arithmetic, rounded to the
    grad_input role: ops.conv2d's forward with the backward spec (nearest: ops.conv2d's forward
    takes another sub-seed than our input gradient). A one-dimensional op is conv2d of height 1.
    Where output_padding reaches the stride, conv2d's symmetric padding gives more outputs than x
    has: the first ones are x's (the same windows)."""
    x, w, b = _operands(nd, groups, seed=6)
    convt = getattr(ops, f"conv_transpose{nd}d")
    y, gx, gw, gb = _run(lambda x, w, b: convt(x, w, b, stride, padding, output_padding, groups, dilation, **NEAREST),
                         (x, w, b), seed=7)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    gq, wq = _rounded(g, NEAREST, "grad_output", 1), _rounded(w, NEAREST, "weight", 1)
    one = lambda v: (1, v) if isinstance(v, int) else v
    if nd == 1:
        gq, wq, stride, padding, dilation = gq[:, :, None], wq[:, :, None], one(stride), (0, padding), one(dilation)
    want = ops.conv2d(gq, wq, None, stride, padding, dilation, groups, formats={"output": FMT["grad_input"]},
                      forward=NEAREST["backward"])
    want = want.reshape(*want.shape[:2], *want.shape[4 - nd:])  # a 1-d op's unit height dropped
    assert_bitwise(gx, want[(slice(None), slice(None), *(slice(0, s) for s in gx.shape[2:]))])


def test_stochastic_grad_input_is_the_scalar_reference_numbered_by_xs_elements():
    """Each element (n, c, s) of grad_input is one dot product over (output channel of its group,
    kernel position) of the rounded grad_output at s * stride - padding + k * dilation (0 outside)
    and the rounded kernel, its random bits those of element number ((n * C) + c) * S + s under the
    op's input-gradient sub-seed (``op_seed(seed, 1)``)."""
    stride, padding, output_padding, dilation, groups = 2, 1, 1, 2, 2
    x, w = _leaves((1, 4, 3), (4, 4, 3), seed=12)
    kw = dict(STOCHASTIC, formats={r: STOCHASTIC["formats"][r] for r in ("weight", "grad_output")},
              backward="acc=e5m4 rounding=stochastic")  # short sums: an accumulator they do not fit
    y, gx, _ = _run(lambda x, w: ops.conv_transpose1d(x, w, None, stride, padding, output_padding, groups, dilation,
                                                      **kw), (x, w), seed=13)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(13))
    gq, wq = _rounded(g, kw, "grad_output", 1), _rounded(w, kw, "weight", 1)
    n, c, size = x.shape
    c_og, k = w.shape[1], w.shape[2]
    at = lambda b, ch, i: gq[b, ch, i].item() if 0 <= i < y.shape[2] else 0.0
    want = torch.empty(x.shape, dtype=torch.float64)
    for b in range(n):
        for ci in range(c):
            grp = ci // (c // groups)
            for i in range(size):
                terms = [at(b, grp * c_og + o, i * stride - padding + u * dilation)
                         for o in range(c_og) for u in range(k)]
                want[b, ci, i] = dot(terms, wq[ci].reshape(-1).tolist(), parse_arith(kw["backward"]),
                                     seed=op_seed(kw["seed"], 1), element=(b * c + ci) * size + i)
    assert_bitwise(gx, want)


def test_one_dimension_is_two_with_a_unit_height():
    """The same reductions in the same order, so the same bits, stochastic ones included."""
    x, w, b = _operands(1, 1, seed=8, size=5)
    args = dict(stride=2, padding=1, output_padding=1, dilation=1, groups=1)
    y1, *g1 = _run(lambda x, w, b: ops.conv_transpose1d(x, w, b, **args, **STOCHASTIC), (x, w, b), seed=9)
    unit = dict(stride=(1, 2), padding=(0, 1), output_padding=(0, 1), dilation=1, groups=1)
    y2, *g2 = _run(lambda x, w, b: ops.conv_transpose2d(x[:, :, None], w[:, :, None], b, **unit, **STOCHASTIC),
                   (x, w, b), grad=torch.randn(y1.shape, generator=torch.Generator().manual_seed(9))[:, :, None])
    assert_bitwise(y1, y2[:, :, 0])
    for u, v in zip(g1, g2, strict=True):
        assert_bitwise(u, v)


# -- arguments -------------------------------------------------------------------------------------
def test_arguments_are_checked():
    x, w = torch.randn(1, 4, 3, 3), torch.randn(4, 3, 2, 2)
    with pytest.raises(ValueError, match=r"conv_transpose2d: x \(1, 4, 3, 3\), w \(4, 3, 2, 2\), b \(4,\) with "
                                         r"groups=1 do not fit"):
        ops.conv_transpose2d(x, w, torch.randn(4))
    with pytest.raises(ValueError, match=r"output_padding \[2, 2\] must be smaller than the stride \[2, 2\] or the "
                                         r"dilation \[1, 1\]"):
        ops.conv_transpose2d(x, w, stride=2, output_padding=2)
    with pytest.raises(ValueError, match=r"conv_transpose2d: padding='same' must be an int or 2 ints"):
        ops.conv_transpose2d(x, w, padding="same")
    with pytest.raises(ValueError, match=r"output size \[-2, -2\] is not positive"):
        ops.conv_transpose2d(x, w, padding=3)


def test_the_fake_implementations_and_autograd_registrations_pass_opcheck():
    x, w, b = _operands(2, 2)
    torch.library.opcheck(torch.ops.mpc.conv_transpose,
                          (x, w, b, [2, 1], [1, 0], [1, 0], 2, [1, 2], "input=fp8_e4m3", "acc=bf16", "acc=bf16", None),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


# -- (iv) the Triton backend in its interpreter: the same numbers ----------------------------------
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="Triton kernels need a CUDA device or Triton's interpreter (TRITON_INTERPRET=1)")
def test_the_triton_backend_gives_the_torch_backends_numbers():
    device = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    leaves = [t.detach().to(device).requires_grad_() for t in _operands(2, 2, seed=10, size=3)]
    args = ((2, 1), (1, 0), (1, 0), 2, (1, 2))
    g = torch.randn(2, 6, 6, 5, generator=torch.Generator().manual_seed(11)).to(device)
    want = _run(lambda *t: ops.conv_transpose2d(*t, *args, **STOCHASTIC, backend="torch"), leaves, g)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to the reference would warn
        got = _run(lambda *t: ops.conv_transpose2d(*t, *args, **STOCHASTIC, backend="triton"), leaves, g)
    for u, v in zip(got, want, strict=True):
        assert_bitwise(u, v)
