"""The CPU im2col kernel lays out a 2-D convolution's patches as torch's copy of the unfolded
view does, bit for bit (NaN payloads and -0 included), for strides, paddings, dilations and
kernels of every shape; the GEMM operands fall back to torch's copy where it cannot be built."""
from __future__ import annotations

import pytest
import torch

import mpcompile.ops.im2col as im2col
from mpcompile.codegen.im2col_cpu import patch_rows
from mpcompile.ops.im2col import conv_as_gemm_operands, patches, phased_input

CASES = [  # (N, C, H, W), kernel, stride, padding, dilation
    ((2, 3, 7, 9), (3, 3), (1, 1), (1, 1), (1, 1)),
    ((1, 2, 8, 5), (2, 3), (2, 1), (0, 2), (1, 1)),
    ((3, 1, 9, 9), (3, 2), (2, 3), (3, 1), (2, 3)),
    ((1, 4, 3, 3), (3, 3), (1, 1), (0, 0), (1, 1)),  # one output position
    ((2, 2, 5, 6), (1, 1), (1, 1), (0, 0), (1, 1)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape, kernel, stride, padding, dilation", CASES)
def test_patch_rows_are_torchs_patches(dtype, shape, kernel, stride, padding, dilation):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    x.view(-1)[:4] = torch.tensor([-0.0, float("nan"), float("inf"), -float("nan")], dtype=dtype)
    expected = patches(x, kernel, stride, padding, dilation)
    rows = patch_rows(x, kernel, stride, padding, dilation)
    bits = torch.int32 if dtype == torch.float32 else torch.int64
    assert torch.equal(rows.view(bits), expected.reshape(rows.shape).view(bits))


def test_operands_fall_back_to_torchs_copy_with_one_warning(monkeypatch):
    x, w = torch.randn(2, 4, 6, 6), torch.randn(6, 2, 3, 3)
    fast = conv_as_gemm_operands(x, w, (1, 1), (1, 1), (1, 1), 2)[0]

    def broken(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setitem(im2col._PATCH_ROWS, torch.float32, broken)
    monkeypatch.setattr(im2col, "_FAILED", set())
    with pytest.warns(RuntimeWarning, match="im2col kernel.*no C\\+\\+ compiler"):
        slow = conv_as_gemm_operands(x, w, (1, 1), (1, 1), (1, 1), 2)[0]
    assert torch.equal(fast, slow) and fast.shape == (2, 72, 18)


def test_successive_convolutions_reuse_the_rows_memory_without_mixing_them():
    """Each call's operand is its own convolution's patches while its GEMM runs, however the
    memory is reused; an empty batch has none."""
    x1, x2, w = torch.randn(2, 3, 6, 6), torch.randn(1, 3, 9, 9), torch.randn(4, 3, 3, 3)
    a1 = conv_as_gemm_operands(x1, w, (1, 1), (1, 1), (1, 1), 1)[0].clone()
    a2 = conv_as_gemm_operands(x2, w, (2, 2), (0, 0), (1, 1), 1)[0]
    assert torch.equal(a1[0], patches(x1, (3, 3), (1, 1), (1, 1), (1, 1)).reshape(72, 27))
    assert torch.equal(a2[0], patches(x2, (3, 3), (2, 2), (0, 0), (1, 1)).reshape(16, 27))
    assert conv_as_gemm_operands(x1[:0], w, (1, 1), (1, 1), (1, 1), 1)[0].shape == (1, 0, 27)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape, kernel, stride, padding, dilation", CASES)
def test_phased_rows_are_torchs_padded_phases(monkeypatch, dtype, shape, kernel, stride, padding, dilation):
    """The padded input split into stride phases, converted, with 8 zeros after it: as torch's pad
    and transposed copy lay it out, NaN payloads and -0 included; and again from that copy where
    the kernel cannot be built."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    x.view(-1)[:4] = torch.tensor([-0.0, float("nan"), float("inf"), -float("nan")])
    got = phased_input(x, padding, stride, dtype, "test").clone()
    n, c, h, w = shape
    wq = -(-(w + 2 * padding[1]) // stride[1])
    padded = torch.nn.functional.pad(x, (padding[1], wq * stride[1] - w - padding[1], padding[0], padding[0]))
    want = torch.cat([padded.view(n, c, h + 2 * padding[0], wq, stride[1]).transpose(-1, -2).reshape(-1),
                      torch.zeros(8)]).to(dtype)
    bits = torch.int32 if dtype == torch.float32 else torch.int64
    assert torch.equal(got.view(bits), want.view(bits))

    def broken(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(im2col, "_PHASED_ROWS", [broken])
    monkeypatch.setattr(im2col, "_FAILED", set())
    with pytest.warns(RuntimeWarning, match="padded input.*no C\\+\\+ compiler"):
        copied = phased_input(x, padding, stride, dtype, "test")
    assert torch.equal(copied.view(bits), want.view(bits))
