"""Role quantization as the ops do it: a role's ``sr_bits`` reaches the rounding, block formats
block along the reduction dim of the GEMM a role tensor feeds (a conv weight: in_channels x
kernel elements in im2col order; a matmul's b: K), and a role's ``axis`` overrides both."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mpcompile import ops
from mpcompile.ops.roles import op_seed, quantize_role
from mpcompile.ops.spec import ROLES, QuantSpec, parse_quant
from mpcompile.random_bits import counter_bits
from mpcompile.rounding import quantize

MX = "mxfp8_e4m3"


def _bits(seed: int, shape) -> torch.Tensor:
    return counter_bits(torch.tensor(seed, dtype=torch.int64), torch.Size(shape))


def test_sr_bits_reach_the_rounding():
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    spec = parse_quant("fp8_e5m2:stochastic:sr_bits=3")
    y = quantize_role(x, spec, axis=0, seed=11)
    expected = quantize(x, "fp8_e5m2", "stochastic", sr_bits=3, random_bits=_bits(11, x.shape))
    assert torch.equal(y, expected)
    default = quantize_role(x, parse_quant("fp8_e5m2:stochastic"), axis=0, seed=11)
    assert not torch.equal(y, default)


def test_sr_bits_of_a_gradient_role_reach_the_backward():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(8, 16, generator=g, requires_grad=True), torch.randn(4, 16, generator=g)
    grad = torch.randn(8, 4, generator=g)
    ops.linear(x, w, formats={"grad_output": "fp8_e5m2:stochastic:sr_bits=2"}, seed=5).backward(grad)
    gq = quantize(grad, "fp8_e5m2", "stochastic", sr_bits=2,
                  random_bits=_bits(op_seed(5, 16 + ROLES.index("grad_output")), grad.shape))
    assert torch.equal(x.grad, gq @ w)


def test_quant_spec_string_round_trips_sr_bits_and_axis():
    spec = QuantSpec("fp8_e4m3", "stochastic", "channel", True, sr_bits=12, axis=1)
    assert parse_quant(str(spec)) == spec
    with pytest.raises(Exception, match="sr_bits"):
        QuantSpec("fp8_e4m3", sr_bits=40)


def test_conv_weight_blocks_run_along_in_channels_and_kernel():
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(2, 8, 9, 9, generator=g), torch.randn(6, 8, 3, 3, generator=g)
    w[:, :4] *= 1e3  # blocks along the kernel width alone would not mix these channels with the others
    y = ops.conv2d(x, w, padding=1, formats={"weight": MX})
    rows = quantize(w.reshape(6, -1), MX).reshape(w.shape)  # im2col order: (in_channel, kh, kw)
    assert torch.equal(y, F.conv2d(x, rows, padding=1))
    assert not torch.equal(rows, quantize(w, MX))  # what blocks along the last axis give


def test_conv_input_and_output_blocks_run_along_channels():
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(2, 40, 5, 5, generator=g), torch.randn(4, 40, 1, 1, generator=g)
    y = ops.conv2d(x, w, formats={"input": MX, "output": MX})
    xq = quantize(x.movedim(1, -1), MX).movedim(-1, 1)
    expected = F.conv2d(xq, w)
    assert torch.equal(y, quantize(expected.movedim(1, -1), MX).movedim(-1, 1))


def test_conv_grad_weight_blocks_like_the_weight():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 8, 6, 6, generator=g)
    w = torch.randn(4, 8, 3, 3, generator=g, requires_grad=True)
    grad = torch.randn(2, 4, 4, 4, generator=g)
    ops.conv2d(x, w, formats={"grad_weight": MX}).backward(grad)
    gw = torch.nn.grad.conv2d_weight(x, w.shape, grad)
    assert torch.equal(w.grad, quantize(gw.reshape(4, -1), MX).reshape(w.shape))


def test_matmul_second_operand_blocks_along_k():
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(3, 64, generator=g), torch.randn(64, 5, generator=g)
    y = ops.matmul(a, b, formats={"weight": MX})
    assert torch.equal(y, a @ quantize(b, MX.replace("mxfp8_e4m3", "mx(fp8_e4m3,32,axis=0)")))


def test_axis_overrides_the_block_axis_and_the_channel_axis():
    g = torch.Generator().manual_seed(6)
    x, w = torch.randn(2, 8, 9, 9, generator=g), torch.randn(6, 8, 3, 3, generator=g)
    y = ops.conv2d(x, w, formats={"weight": MX + ":axis=-1"})
    assert torch.equal(y, F.conv2d(x, quantize(w, MX)))
    t = torch.randn(4, 3, 5, generator=g) * torch.tensor([1.0, 1e3, 1e-3]).reshape(1, 3, 1)
    per_channel = quantize_role(t, parse_quant("fp8_e4m3:channel:axis=1"), axis=0, seed=None)
    assert torch.equal(per_channel, torch.cat([quantize_role(t[:, i:i + 1], parse_quant("fp8_e4m3:tensor"), axis=0,
                                                             seed=None) for i in range(3)], dim=1))


def test_an_axis_the_tensor_does_not_have_is_an_error():
    x = torch.randn(4, 3)
    for spec in ("fp8_e4m3:channel:axis=2", "mxfp8_e4m3:axis=-3"):
        with pytest.raises(Exception, match="is not a dim of the role's 2-dim tensor"):
            quantize_role(x, parse_quant(spec), axis=0, seed=None)
