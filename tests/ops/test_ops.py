"""The mpc:: ops: native specs equal torch, emulated ones equal the scalar reference, forward
and backward; graphs, compile and export; errors."""
from __future__ import annotations

from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from mpcompile import ops
from mpcompile.formats import parse
from mpcompile.ops import ArithSpec, SpecError
from mpcompile.ops.reference import dot, round_rational
from mpcompile.ops.roles import op_seed
from mpcompile.rounding import quantize

from test_emulate import assert_bitwise

SEQ = ArithSpec(mul="fp8_e5m2", acc="e5m10", rounding="stochastic", mul_rounding="nearest")
BWD = ArithSpec(mul="fp8_e4m3", acc="bf16", order="pairwise", rounding="toward_zero")
SUM = ArithSpec(acc="e5m10", order="chunk(3)", rounding="stochastic")


def _grads(out, inputs, grad):
    return torch.autograd.grad(out, [t for t in inputs if t is not None], grad)


def _leaves(*shapes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=dtype).requires_grad_() for s in shapes]


# -- native specs are torch, to the bit ------------------------------------------------------------
def test_linear_native_equals_torch():
    x, w, b = _leaves((2, 5, 7), (3, 7), (3,))
    g = torch.randn(2, 5, 3)
    y, y0 = ops.linear(x, w, b), F.linear(x, w, b)
    assert torch.equal(y, y0)
    for got, want in zip(_grads(y, (x, w, b), g), _grads(y0, (x, w, b), g)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("shapes", [((4, 5), (5, 3)), ((2, 1, 4, 5), (3, 5, 2)), ((5,), (2, 5, 3)), ((2, 4, 5), (5,))])
def test_matmul_native_equals_torch(shapes):
    a, b = _leaves(*shapes)
    y, y0 = ops.matmul(a, b), torch.matmul(a, b)
    g = torch.randn_like(y0)
    assert torch.equal(y, y0)
    for got, want in zip(_grads(y, (a, b), g), _grads(y0, (a, b), g)):
        assert torch.equal(got, want)


CONVS = [(1, 1, 0, 1, 1), (2, 2, 1, 1, 2), (2, 1, 2, 2, 1), (3, 2, 1, 2, 2), (2, 3, 1, 1, 4)]


@pytest.mark.parametrize("nd,stride,padding,dilation,groups", CONVS)
def test_conv_native_equals_torch(nd, stride, padding, dilation, groups):
    x, w, b = _leaves((2, 4, *[7] * nd), (8, 4 // groups, *[3] * nd), (8,))
    conv, conv0 = getattr(ops, f"conv{nd}d"), getattr(F, f"conv{nd}d")
    y, y0 = conv(x, w, b, stride, padding, dilation, groups), conv0(x, w, b, stride, padding, dilation, groups)
    g = torch.randn_like(y0)
    assert torch.equal(y, y0)
    for got, want in zip(_grads(y, (x, w, b), g), _grads(y0, (x, w, b), g)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("nd,kernel,dilation,padding", [(2, 3, 1, "same"), (2, 4, 1, "same"), (1, 4, 3, "same"),
                                                         (3, 2, 1, "same"), (2, 3, 2, "valid")])
def test_string_padding_pads_as_torch(nd, kernel, dilation, padding):
    x, w = _leaves((2, 3, *[6] * nd), (4, 3, *[kernel] * nd))
    conv, conv0 = getattr(ops, f"conv{nd}d"), getattr(F, f"conv{nd}d")
    y, y0 = conv(x, w, padding=padding, dilation=dilation), conv0(x, w, padding=padding, dilation=dilation)
    g = torch.randn_like(y0)
    assert torch.equal(y, y0)  # an even kernel pads one more zero on the right, as torch does
    for got, want in zip(_grads(y, (x, w), g), _grads(y0, (x, w), g)):
        assert torch.equal(got, want)
    q8 = lambda t: quantize(t.detach(), "fp8_e4m3")
    y8 = conv(x, w, padding=padding, dilation=dilation, formats={"input": "fp8_e4m3", "weight": "fp8_e4m3"})
    assert torch.equal(y8, conv0(q8(x), q8(w), padding=padding, dilation=dilation))


def test_string_padding_errors():
    x, w = _leaves((1, 2, 5, 5), (2, 2, 3, 3))
    with pytest.raises(ValueError, match="padding='same' needs stride 1"):
        ops.conv2d(x, w, stride=2, padding="same")
    with pytest.raises(ValueError, match="padding='full' must be 'valid', 'same' or numbers"):
        ops.conv2d(x, w, padding="full")


def test_gradcheck_float64_native():
    x, w, b = _leaves((3, 4), (2, 4), (2,), dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *t: ops.linear(*t), (x, w, b))
    a, c = _leaves((2, 3, 4), (4, 2), dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *t: ops.matmul(*t), (a, c))
    xc, wc, bc = _leaves((1, 2, 5, 5), (4, 1, 3, 3), (4,), dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *t: ops.conv2d(*t, stride=2, padding=1, groups=2), (xc, wc, bc))
    assert torch.autograd.gradcheck(lambda t: ops.sum(t, 1) + ops.mean(t, 0).sum(), (a,))
    assert torch.autograd.gradcheck(lambda t: ops.quant(t, None), (a,))


# -- emulated specs are the reference, forward and backward ----------------------------------------
def _q(t, fmt, rounding="nearest"):
    return quantize(t.detach(), fmt, rounding) if fmt else t.detach()


def _round_acc(value: Fraction, spec: ArithSpec) -> float:
    return round_rational(value, value < 0, spec.acc, spec.rounding)


def test_linear_forward_backward_equal_reference():
    x, w, b = _leaves((2, 3, 6), (4, 6), (4,), seed=1)
    g = torch.randn(2, 3, 4)
    formats = {"input": "fp8_e4m3", "weight": "fp8_e4m3", "grad_output": "fp8_e5m2"}
    fwd = ArithSpec(mul="fp8_e5m2", acc="e5m10")
    y = ops.linear(x, w, b, formats=formats, forward=fwd, backward=BWD, seed=42)
    gx, gw, gb = _grads(y, (x, w, b), g)
    xq, wq, gq = _q(x, "fp8_e4m3").reshape(6, 6), _q(w, "fp8_e4m3"), _q(g, "fp8_e5m2").reshape(6, 4)
    s0, s1, s2, s3 = (op_seed(42, i) for i in range(4))
    want_y = torch.tensor([[_round_acc(Fraction(dot(xq[r], wq[j], fwd, seed=s0, element=r * 4 + j)) + Fraction(b[j].item()), fwd) for j in range(4)] for r in range(6)])
    assert_bitwise(y.reshape(6, 4), want_y)
    assert_bitwise(gx.reshape(6, 6), torch.tensor([[dot(gq[r], wq[:, k], BWD, seed=s1, element=r * 6 + k)
                                                   for k in range(6)] for r in range(6)]))
    assert_bitwise(gw, torch.tensor([[dot(gq[:, j], xq[:, k], BWD, seed=s2, element=j * 6 + k) for k in range(6)]
                                    for j in range(4)]))
    sum_spec = ArithSpec(acc=BWD.acc, order=BWD.order, rounding=BWD.rounding)
    assert_bitwise(gb, torch.tensor([dot(gq[:, j], [1.0] * 6, sum_spec, seed=s3, element=j) for j in range(4)]))


def test_matmul_broadcast_backward_reduces_over_batch_in_one_sum():
    a, b = _leaves((3, 2, 5), (5, 4), seed=2)
    g = torch.randn(3, 2, 4)
    spec = ArithSpec(mul="fp8_e5m2", acc="e5m10")
    y = ops.matmul(a, b, forward=spec, seed=3)
    ga, gb = _grads(y, (a, b), g)
    s2 = op_seed(3, 2)
    flat_a, flat_g = a.detach().reshape(6, 5), g.reshape(6, 4)  # the reduction runs over (batch, row)
    assert_bitwise(gb, torch.tensor([[dot(flat_a[:, k], flat_g[:, n], spec, seed=s2, element=k * 4 + n)
                                      for n in range(4)] for k in range(5)]))
    s1 = op_seed(3, 1)
    assert_bitwise(ga, torch.tensor([[[dot(g[i, r], b.detach()[k], spec, seed=s1, element=(i * 2 + r) * 5 + k)
                                       for k in range(5)] for r in range(2)] for i in range(3)]))


def _conv_reference(x, w, stride, padding, dilation, groups, spec, seed):
    """Each output's dot product over (input channel of the group, kernel position), padding zeros in."""
    n, c, h, wd = x.shape
    co, cg, kh, kw = w.shape
    oh = (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    ow = (wd + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    out = torch.empty(n, co, oh, ow, dtype=torch.float64)

    def at(img, ch, i, j):
        return img[ch, i, j].item() if 0 <= i < h and 0 <= j < wd else 0.0

    for b in range(n):
        for o in range(co):
            grp = o // (co // groups)
            for i in range(oh):
                for j in range(ow):
                    terms = [at(x[b], grp * cg + ci, i * stride - padding + u * dilation, j * stride - padding + v * dilation)
                             for ci in range(cg) for u in range(kh) for v in range(kw)]
                    e = ((b * co + o) * oh + i) * ow + j
                    out[b, o, i, j] = dot(terms, w[o].reshape(-1).tolist(), spec, seed=seed, element=e)
    return out


def _conv_input_grad_reference(g, w, input_shape, stride, padding, dilation, groups, spec, seed):
    """The transposed convolution: grad upsampled by the stride, padded by dilation*(k-1) - padding,
    against the flipped kernel; reduction over (output channel of the group, kernel position)."""
    n, c, h, wd = input_shape
    co, cg, kh, kw = w.shape
    _, _, oh, ow = g.shape
    out = torch.empty(input_shape, dtype=torch.float64)

    def up(b, ch, i, j):  # the upsampled, padded grad at (i, j)
        i, j = i - (dilation * (kh - 1) - padding), j - (dilation * (kw - 1) - padding)
        if i % stride or j % stride or not (0 <= i // stride < oh and 0 <= j // stride < ow) or i < 0 or j < 0:
            return 0.0
        return g[b, ch, i // stride, j // stride].item()

    cog = co // groups
    for b in range(n):
        for ci in range(c):
            grp = ci // cg
            for i in range(h):
                for j in range(wd):
                    terms, weights = [], []
                    for o in range(cog):
                        for u in range(kh):
                            for v in range(kw):
                                terms.append(up(b, grp * cog + o, i + u * dilation, j + v * dilation))
                                weights.append(w[grp * cog + o, ci - grp * cg, kh - 1 - u, kw - 1 - v].item())
                    out[b, ci, i, j] = dot(terms, weights, spec, seed=seed, element=((b * c + ci) * h + i) * wd + j)
    return out


@pytest.mark.parametrize("stride,padding,dilation,groups", [(1, 1, 1, 1), (2, 1, 1, 2), (2, 0, 2, 1)])
def test_conv2d_forward_backward_equal_reference(stride, padding, dilation, groups):
    x, w = _leaves((2, 4, 6, 5), (4, 4 // groups, 3, 2), seed=4)
    fwd = ArithSpec(mul="fp8_e5m2", acc="e5m10", order="chunk(4)")
    y = ops.conv2d(x, w, None, stride, padding, dilation, groups, forward=fwd, backward=SEQ, seed=9)
    g = torch.randn_like(y)
    gx, gw = _grads(y, (x, w), g)
    xd, wd, gd = x.detach(), w.detach(), g.detach()
    assert_bitwise(y, _conv_reference(xd, wd, stride, padding, dilation, groups, fwd, op_seed(9, 0)))
    assert_bitwise(gx, _conv_input_grad_reference(gd, wd, x.shape, stride, padding, dilation, groups, SEQ, op_seed(9, 1)))
    # grad_weight: over (batch, output position) of grad times the input under the kernel tap
    co, cg, kh, kw = w.shape
    oh, ow = y.shape[2:]
    pad = F.pad(xd, (padding,) * 4)
    want = torch.empty(w.shape, dtype=torch.float64)
    for o in range(co):
        grp = o // (co // groups)
        for ci in range(cg):
            for u in range(kh):
                for v in range(kw):
                    taps = pad[:, grp * cg + ci, u * dilation:u * dilation + (oh - 1) * stride + 1:stride,
                               v * dilation:v * dilation + (ow - 1) * stride + 1:stride]
                    e = ((o * cg + ci) * kh + u) * kw + v
                    want[o, ci, u, v] = dot(gd[:, o].reshape(-1).tolist(), taps.reshape(-1).tolist(), SEQ,
                                            seed=op_seed(9, 2), element=e)
    assert_bitwise(gw, want)


def test_sum_and_mean_equal_reference():
    x = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(6)) * 40
    got = ops.sum(x, (0, 2), spec=SUM, seed=11)
    rows = x.permute(1, 0, 2).reshape(5, 12)
    want = [dot(rows[i], [1.0] * 12, SUM, seed=11, element=i) for i in range(5)]
    assert_bitwise(got, torch.tensor(want))
    spec = ArithSpec(acc="e5m10", order="pairwise", rounding="up")
    mean = ops.mean(x, (0, 2), keepdim=True, spec=spec)
    sums = [dot(rows[i], [1.0] * 12, spec) for i in range(5)]
    want = [round_rational(Fraction(s) / 12, s < 0, spec.acc, "up") for s in sums]
    assert mean.shape == (1, 5, 1)
    assert_bitwise(mean.reshape(5), torch.tensor(want))


def test_sum_of_ones_stagnates_sequentially_and_not_with_kahan():
    ones = torch.ones(4096)
    assert ops.sum(ones, spec=ArithSpec(acc="e5m10")).item() == 2048.0
    assert ops.sum(ones, spec=ArithSpec(acc="e5m10", kahan=True)).item() == 4096.0


# -- quant ------------------------------------------------------------------------------------------
def test_quant_forward_and_gradient_formats():
    x = (torch.randn(64, generator=torch.Generator().manual_seed(8)) * 3).requires_grad_()
    g = torch.randn(64) * 1e-3
    y = ops.quant(x, "fp8_e4m3", grad_format="fp8_e5m2")
    (gx,) = torch.autograd.grad(y, x, g)
    assert torch.equal(y, quantize(x.detach(), "fp8_e4m3"))
    assert torch.equal(gx, quantize(g, "fp8_e5m2"))


def test_quant_stochastic_is_reproducible_by_seed():
    x = torch.randn(1000)
    a = ops.quant(x, "fp8_e4m3", "stochastic", seed=5)
    assert torch.equal(a, ops.quant(x, "fp8_e4m3", "stochastic", seed=5))
    assert not torch.equal(a, ops.quant(x, "fp8_e4m3", "stochastic", seed=6))


@pytest.mark.parametrize("scaling", ["tensor", "channel"])
def test_power_of_two_scaling_adds_no_rounding(scaling):
    w = torch.randn(6, 10, generator=torch.Generator().manual_seed(2)) * torch.tensor([1e-3, 1e-1, 1, 10, 1e2, 1e4])[:, None]
    y = ops.quant(w, "fp8_e4m3", scaling=scaling, axis=0)
    amax = w.abs().amax() if scaling == "tensor" else w.abs().amax(1, keepdim=True)
    s = torch.exp2(torch.floor(torch.log2(448 / amax)))
    assert torch.equal(y, quantize(w * s, "fp8_e4m3") / s)
    if scaling == "channel":  # every channel uses the top binade: relative error of e4m3 at most 2**-4
        assert ((y - w).abs() <= w.abs() * 2.0**-4).all()
    else:  # one scale: the small rows flush, the largest row keeps e4m3's relative accuracy
        assert ((y - w).abs()[-1] <= w.abs()[-1] * 2.0**-4).all() and (y[0] == 0).all()


# -- graphs -------------------------------------------------------------------------------------------
class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4 * 6 * 6, 5)
        self.arith = ArithSpec(mul="fp8_e5m2", acc="fp16", order="chunk(8)")

    def forward(self, x):
        x = ops.quant(x, "fp8_e4m3", grad_format="fp8_e5m2")
        x = ops.conv2d(x, self.conv.weight, self.conv.bias, padding=1, formats={"weight": "fp8_e4m3"},
                       forward=self.arith)
        x = torch.relu(x).flatten(1)
        x = ops.linear(x, self.fc.weight, self.fc.bias, formats={"input": "bf16"}, forward=self.arith)
        return ops.mean(x, 1, spec="acc=fp16 rounding=stochastic")


def test_compile_fullgraph_matches_eager_forward_and_backward():
    torch.manual_seed(0)
    model = Small()
    x = torch.randn(2, 3, 6, 6)

    def run(m):
        torch.manual_seed(1)  # the stochastic mean draws its seed from torch's generator
        out = m(x)
        return out, torch.autograd.grad(out.sum(), model.fc.weight)[0]

    eager, g_eager = run(model)
    out, g_comp = run(torch.compile(model, fullgraph=True, backend="aot_eager"))
    assert torch.equal(out, eager) and torch.equal(g_comp, g_eager)
    torch.manual_seed(1)
    assert not torch.equal(out, Small()(x))  # a different model differs: the check has teeth
    with torch._inductor.config.patch(fallback_random=True):  # inductor draws the seed as eager does
        assert torch.equal(run(torch.compile(model, fullgraph=True))[0], eager)


def test_spec_built_inside_a_compiled_function_is_an_error():
    def f(t):
        return ops.sum(t, spec=ArithSpec(acc="fp16"))

    with pytest.raises(Exception, match="inside a torch.compile'd function"):
        torch.compile(f, fullgraph=True)(torch.ones(3))


def test_export_shows_one_node_per_op():
    exported = torch.export.export(Small(), (torch.randn(2, 3, 6, 6),))
    targets = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    mpc = [t for t in targets if t.startswith("mpc.")]
    assert mpc == ["mpc.quant.default", "mpc.conv.default", "mpc.linear.default", "mpc.mean.default"]
    printed = str(exported.graph)
    assert "mul=fp8_e5m2 acc=fp16 order=chunk(8)" in printed and "weight=fp8_e4m3" in printed


# -- errors -----------------------------------------------------------------------------------------
def test_errors_name_the_argument():
    a, b = torch.randn(3, 4), torch.randn(5, 2)
    with pytest.raises(ValueError, match="shapes"):
        ops.matmul(a, b)
    with pytest.raises(TypeError, match="x must be a float"):
        ops.linear(torch.ones(2, 3, dtype=torch.int64), torch.randn(4, 3))
    with pytest.raises(TypeError, match="w is torch.bfloat16"):
        ops.linear(torch.randn(2, 3), torch.randn(4, 3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="w must be"):
        ops.linear(torch.randn(2, 3), torch.randn(4, 5))
    with pytest.raises(SpecError, match="acc=fixed"):
        ArithSpec(acc="fixed(8,4)")
    with pytest.raises(SpecError, match="mul=mxfp8_e4m3"):
        ArithSpec(mul="mxfp8_e4m3")
    with pytest.raises(SpecError, match="order"):
        ArithSpec(order="chunk(0)")
    with pytest.raises(SpecError, match="fma"):
        ArithSpec(mul="fp8_e5m2", fma=True)
    with pytest.raises(SpecError, match="unknown role"):
        ops.linear(torch.randn(2, 3), torch.randn(4, 3), formats={"activation": "fp8_e4m3"})
    with pytest.raises(SpecError, match="float64 operands need a mul format"):
        ops.matmul(torch.randn(2, 3, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64),
                   forward=ArithSpec(acc="fp16"))
    with pytest.raises(ValueError, match="groups"):
        ops.conv2d(torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3), groups=2)


def test_the_deprecated_spec_spelling_of_matmul_and_einsum_warns_and_gives_the_same_result():
    a, b = _leaves((3, 5), (5, 4))
    spec, formats = "mul=fp8_e5m2 acc=e5m10 rounding=stochastic", {"input": "fp8_e4m3"}
    want = ops.matmul(a, b, formats=formats, forward=spec, seed=3)
    for old in (lambda: ops.matmul(a, b, spec=spec, formats=formats, seed=3),
                lambda: ops.matmul(a, b, spec, formats=formats, seed=3),
                lambda: ops.einsum("ij,jk->ik", a, b, spec=spec, formats=formats, seed=3)):
        with pytest.warns(DeprecationWarning, match=r"spec= .* is deprecated .* pass the forward arithmetic as forward="):
            assert torch.equal(old(), want)
    with pytest.raises(TypeError, match="forward= and its deprecated old name spec= both given"):
        ops.matmul(a, b, spec=spec, forward=spec)


@pytest.mark.parametrize("shapes", [((5,), (5,)), ((0, 5), (5, 3)), ((2, 0), (0, 3)), ((2, 3, 0, 5), (5, 4))])
def test_matmul_edge_shapes_match_torch(shapes):
    a, b = _leaves(*shapes)
    spec = ArithSpec(acc="e8m23", order="pairwise")  # fp32 adds in a tree: close to torch, not equal
    y, y0 = ops.matmul(a, b, forward=spec), torch.matmul(a, b)
    g = torch.randn_like(y0)
    assert y.shape == y0.shape
    torch.testing.assert_close(y, y0)
    for got, want in zip(_grads(y, (a, b), g), _grads(y0, (a, b), g)):
        torch.testing.assert_close(got, want)


def test_spec_strings_round_trip():
    from mpcompile.ops.spec import parse_arith, parse_roles
    for spec in [ArithSpec(), SEQ, BWD, SUM, ArithSpec(mul="e4m3fnuz", acc="e6m9", kahan=True, sr_bits=12, rounding="stochastic")]:
        assert parse_arith(str(spec)) == spec
    roles = ops.RoleFormats.of({"weight": "fp8_e4m3:stochastic:channel:sat", "input": parse("bf16")})
    assert str(roles) == "input=bf16 weight=fp8_e4m3:stochastic:channel:sat"
    assert parse_roles(str(roles)) == roles
    assert ArithSpec(order=("chunk", 32)).order == "chunk(32)"


@pytest.mark.parametrize("stride,padding,dilation,groups", [(1, 1, 1, 1), (2, 2, 2, 2)])
def test_conv1d_and_conv3d_are_conv2d_with_unit_dims(stride, padding, dilation, groups):
    """The same reductions in the same order, so the same bits (stochastic ones included)."""
    x, w, b = _leaves((2, 4, 9), (6, 4 // groups, 3), (6,), seed=7)
    spec = ArithSpec(mul="fp8_e5m2", acc="e5m10", rounding="stochastic", order="chunk(4)")
    kw = dict(forward=spec, backward=spec, seed=3, formats={"grad_output": "fp8_e5m2"})
    y1 = ops.conv1d(x, w, b, stride, padding, dilation, groups, **kw)
    y2 = ops.conv2d(x[:, :, None], w[:, :, None], b, (1, stride), (0, padding), (1, dilation), groups, **kw)
    y3 = ops.conv3d(x[:, :, None, None], w[:, :, None, None], b, (1, 1, stride), (0, 0, padding),
                    (1, 1, dilation), groups, **kw)
    assert_bitwise(y1, y2.squeeze(2))
    assert_bitwise(y1, y3.squeeze(2).squeeze(2))
    g = torch.randn_like(y1)
    g1 = _grads(y1, (x, w, b), g)
    g2 = _grads(y2, (x, w, b), g[:, :, None])
    g3 = _grads(y3, (x, w, b), g[:, :, None, None])
    for u, v, t in zip(g1, g2, g3):
        assert_bitwise(u, v)
        assert_bitwise(u, t)


def test_a_chunk_longer_than_the_reduction_is_one_chunk():
    x, w = _leaves((3, 5), (4, 5))
    one = ArithSpec(acc="bf16", order="chunk(5)")
    assert torch.equal(ops.linear(x, w, forward=ArithSpec(acc="bf16", order="chunk(64)")), ops.linear(x, w, forward=one))
    assert torch.equal(ops.sum(x, 1, spec="acc=bf16 order=chunk(64)"), ops.sum(x, 1, spec=one))


@pytest.mark.parametrize("op", ["conv2d", "linear", "matmul"])
def test_rounded_operands_in_held_memory_do_not_leak_between_calls(op):
    """GEMM operands are rounded into memory each thread keeps from call to call: a second call
    of another shape and values in between leaves the first call's output, and its backward (which
    rounds the raw operands again), equal to the reference of fresh rounding."""
    from mpcompile.ops import im2col

    formats = {"input": "fp8_e4m3", "weight": "fp8_e4m3", "grad_output": "fp8_e5m2"}
    call = {"conv2d": lambda x, w: ops.conv2d(x, w, padding=1, formats=formats),
            "linear": lambda x, w: ops.linear(x, w, formats=formats),
            "matmul": lambda x, w: ops.matmul(x, w, formats=formats)}[op]
    torch_op = {"conv2d": lambda x, w: F.conv2d(x, w, padding=1), "linear": F.linear, "matmul": torch.matmul}[op]
    shapes = {"conv2d": ((2, 3, 6, 6), (4, 3, 3, 3)), "linear": ((5, 7), (6, 7)), "matmul": ((5, 7), (7, 6))}[op]
    g = torch.Generator().manual_seed(1)
    x, w = (torch.randn(s, generator=g, requires_grad=True) for s in shapes)
    y = call(x, w)
    other = [(torch.randn(*(2 * d for d in s), generator=g) * 100).requires_grad_() for s in shapes]  # a larger call
    call(*other).sum().backward()
    gy = torch.randn(y.shape, generator=g)
    gx, gw = torch.autograd.grad(y, (x, w), gy)
    xq, wq = (quantize(t.detach(), "fp8_e4m3").requires_grad_() for t in (x, w))
    y_ref = torch_op(xq, wq)
    gx_ref, gw_ref = torch.autograd.grad(y_ref, (xq, wq), quantize(gy, "fp8_e5m2"))
    assert torch.equal(y, y_ref) and torch.equal(gx, gx_ref) and torch.equal(gw, gw_ref)
    assert ("rounded input", torch.float32) in im2col._HELD.__dict__  # the operands went there
