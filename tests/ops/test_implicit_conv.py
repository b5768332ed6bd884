"""Emulated convolutions without patches (``ops.implicit_conv``) equal the emulated GEMM over
patches bit for bit (zeros' signs, infinities and NaN included) for strides, paddings, dilations,
kernels and widths that are not multiples of the vector, forward and weight gradient, exact or
rounded products, in one block of reduction steps or many, and the reference dot product; ``ops.conv2d``'s gradients are
the same with and without them; what they do not serve falls to the patches."""
from __future__ import annotations

import pytest
import torch

from mpcompile import ops
from mpcompile.codegen import chunk_fold_cpu
from mpcompile.ops import implicit_conv, reference
from mpcompile.ops.bodies import channel_rows
from mpcompile.ops.emulate import emulated_matmul
from mpcompile.ops.im2col import conv_as_gemm_operands, patches
from mpcompile.ops.spec import parse_arith

CASES = [  # (N, C, H, W), (C_out, kh, kw), stride, padding, dilation
    ((2, 3, 9, 11), (5, 3, 3), (1, 1), (1, 1), (1, 1)),
    ((2, 4, 10, 13), (9, 3, 3), (2, 2), (1, 1), (1, 1)),
    ((1, 2, 12, 12), (17, 5, 5), (3, 3), (2, 2), (2, 2)),
    ((2, 5, 7, 9), (3, 1, 1), (1, 1), (0, 0), (1, 1)),
    ((1, 3, 6, 20), (8, 2, 3), (1, 2), (0, 1), (2, 1)),
    ((1, 2, 3, 3), (4, 3, 3), (1, 1), (0, 0), (1, 1)),  # one output position
]
SPECS = ["acc=e6m9 order=chunk(64)", "acc=e5m10 order=chunk(7)", "acc=bf16", "acc=fp8_e5m2 order=chunk(4)",
         "mul=fp8_e5m2 acc=e5m10 order=chunk(5)", "mul=fp16 acc=e6m9", "mul=bf16 acc=fp16 order=chunk(3)"]


def _spread(shape, seed: int) -> torch.Tensor:
    """float32 values over many binades (sums that overflow, or round to zero), the first a tiny
    negative (an accumulator of -0 where it meets a 1) and its next two zeros of both signs."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-12, 10, shape, generator=g).float())
    t.view(-1)[:3] = torch.tensor([-2.0**-40, -0.0, 0.0])
    return t


def _operands(x_shape, w_shape, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``_spread`` x and w, w's first filter starting 1, 1, -0 (a -0 accumulator and its -0
    successors), an inf in the middle of x (every case's windows reach it) and a NaN last in w."""
    x, w = _spread(x_shape, seed), _spread(w_shape, seed + 1)
    w[0].view(-1)[:3] = torch.tensor([1.0, 1.0, -0.0])
    x[0, 0, x_shape[2] // 2, x_shape[3] // 2] = float("inf")
    w.view(-1)[-1] = float("nan")
    return x, w


def _same(got: torch.Tensor, want: torch.Tensor) -> bool:
    return got.shape == want.shape and bool(((got.view(torch.int64) == want.view(torch.int64))
                                             | (got.isnan() & want.isnan())).all())


def _over_patches(x, w, stride, padding, dilation, spec) -> torch.Tensor:
    a, b, _, to_output = conv_as_gemm_operands(x, w, stride, padding, dilation, 1)
    return to_output(emulated_matmul(a, b, spec))


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("x_shape, w_shape, stride, padding, dilation", CASES)
def test_forward_sums_are_the_patches_gemms(spec, x_shape, w_shape, stride, padding, dilation):
    spec = parse_arith(spec)
    x, w = _operands(x_shape, (w_shape[0], x_shape[1], *w_shape[1:]), seed=sum(x_shape))
    got = implicit_conv.conv_sums(x, w, stride, padding, dilation, 1, spec)
    assert _same(got, _over_patches(x, w, stride, padding, dilation, spec))
    assert got.isnan().any() and got.isinf().any()


@pytest.mark.parametrize("block", [None, 16])  # one block of steps, or blocks of 16 // k * k steps
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("x_shape, w_shape, stride, padding, dilation", CASES)
def test_weight_gradient_sums_are_the_patches_gemms(monkeypatch, block, spec, x_shape, w_shape, stride, padding,
                                                    dilation):
    if block is not None:
        monkeypatch.setattr(chunk_fold_cpu, "_BLOCK_STEPS", block)
    spec = parse_arith(spec)
    x, w = _operands(x_shape, (w_shape[0], x_shape[1], *w_shape[1:]), seed=len(x_shape))
    y_shape = _over_patches(x, w, stride, padding, dilation, spec).shape
    g = _spread(y_shape, seed=3)
    patch_rows = conv_as_gemm_operands(x, w, stride, padding, dilation, 1)[0]
    want = emulated_matmul(channel_rows(g, 1), patch_rows, spec).reshape(w.shape)
    got = implicit_conv.weight_grad_sums(g, x, w.shape, stride, padding, dilation, 1, spec)
    assert _same(got, want)


@pytest.mark.parametrize("spec", ["acc=e5m10 order=chunk(5)", "mul=fp8_e4m3 acc=e5m10 order=chunk(3)"])
@pytest.mark.parametrize("threads", [1, 2])
def test_sums_are_the_reference_dot_products(spec, threads):
    """Every output element of a strided, dilated convolution of FP8 values against ``reference.dot``
    over its window (chunk sums of FP8 products are exact: one answer for every order)."""
    spec = parse_arith(spec)
    x, w = (t.to(torch.float8_e4m3fn).float() for t in _operands((2, 3, 7, 8), (4, 3, 2, 3), seed=5))
    x.view(-1)[:3] = torch.tensor([-2.0**-9, -0.0, -0.0])  # e4m3's smallest: its products round acc to -0
    stride, padding, dilation = (2, 1), (1, 2), (2, 1)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = implicit_conv.conv_sums(x, w, stride, padding, dilation, 1, spec)
    finally:
        torch.set_num_threads(previous)
    windows = patches(x, (2, 3), stride, padding, dilation)  # (N, Ho, Wo, C, kh, kw)
    want = torch.tensor([[[[reference.dot(windows[n, i, j].reshape(-1).tolist(), w[c].reshape(-1).tolist(), spec)
                            for j in range(got.shape[3])] for i in range(got.shape[2])] for c in range(4)]
                         for n in range(2)], dtype=torch.float64)
    assert _same(got, want) and bool(torch.signbit(got[0, :, 0, 0]).any())


@pytest.mark.parametrize("case", ["groups", "float64", "stochastic", "stochastic products", "kahan", "pairwise"])
def test_what_is_not_served_is_left_to_the_patches(case):
    spec = {"stochastic": "acc=e6m9 rounding=stochastic", "kahan": "acc=e6m9 kahan=true",
            "stochastic products": "mul=fp8_e5m2 acc=e6m9 mul_rounding=stochastic order=chunk(4)",
            "pairwise": "acc=e6m9 order=pairwise"}.get(case, "acc=e6m9 order=chunk(4)")
    x, w = torch.randn(1, 4, 5, 5), torch.randn(2, 2 if case == "groups" else 4, 3, 3)
    if case == "float64":
        x, w = x.double(), w.double()
    groups = 2 if case == "groups" else 1
    spec = parse_arith(spec)
    assert implicit_conv.conv_sums(x, w, (1, 1), (1, 1), (1, 1), groups, spec) is None
    assert implicit_conv.weight_grad_sums(torch.randn(1, 2, 5, 5).to(x.dtype), x, w.shape, (1, 1), (1, 1), (1, 1),
                                          groups, spec) is None


@pytest.mark.parametrize("spec", ["acc=e6m9 order=chunk(16)", "mul=bf16 acc=fp16 order=chunk(4)"])  # no overflow
@pytest.mark.parametrize("stride", [1, 2])
def test_conv2d_gradients_are_the_same_without_patches(monkeypatch, spec, stride):
    """``ops.conv2d`` forward and backward (the input gradient as a convolution of the upsampled
    gradient, the weight gradient over positions) with and without the implicit GEMMs."""
    spec = parse_arith(spec)
    x0, w0 = _operands((2, 3, 9, 10), (5, 3, 3, 3), seed=11)
    x0[0, 0, 4, 5] = w0.view(-1)[-1] = 1.0  # finite gradients

    def run():
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        y = ops.conv2d(x, w, None, stride=stride, padding=1, forward=spec, backward=spec)
        y.backward(torch.linspace(-3, 3, y.numel()).view(y.shape))
        return y.detach(), x.grad, w.grad

    direct = run()
    calls = []
    monkeypatch.setattr(implicit_conv, "_served", lambda *args: calls.append(args) and None)
    over_patches = run()
    assert len(calls) == 3  # forward, input and weight gradients each asked, and were refused
    for got, want in zip(direct, over_patches):
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_zero_products_keep_their_signs():
    """A tiny negative first product rounds the accumulator to -0 and the -0 products after it keep
    it there (IEEE: -0 + -0 = -0): the scalar side's -0 (the weight forward, the input for the
    weight gradient) must reach the product as -0."""
    spec = parse_arith("acc=e5m10")
    signed = torch.tensor([-2.0**-30] + [-0.0] * 8).view(1, 1, 3, 3)
    ones = torch.ones(1, 1, 3, 3)
    forward = implicit_conv.conv_sums(ones, signed, (1, 1), (0, 0), (1, 1), 1, spec)
    weight_grad = implicit_conv.weight_grad_sums(ones, signed, (1, 1, 1, 1), (1, 1), (0, 0), (1, 1), 1, spec)
    assert reference.dot(signed.view(-1).tolist(), [1.0] * 9, spec) == 0.0
    for got in (forward, weight_grad):
        assert got.numel() == 1 and got.item() == 0.0 and bool(torch.signbit(got).all())


def test_other_ranks_and_empty_outputs_are_left_to_the_patches():
    spec = parse_arith("acc=e6m9 order=chunk(4)")
    assert implicit_conv.conv_sums(torch.randn(1, 2, 7), torch.randn(3, 2, 3), (1,), (1,), (1,), 1, spec) is None
    assert implicit_conv.conv_sums(torch.randn(1, 2, 2, 2), torch.randn(3, 2, 3, 3), (1, 1), (0, 0), (1, 1), 1,
                                   spec) is None
    assert implicit_conv.weight_grad_sums(torch.randn(1, 3, 7), torch.randn(1, 2, 7), (3, 2, 3), (1,), (1,), (1,), 1,
                                          spec) is None


def test_an_empty_batch_has_an_empty_output_and_a_zero_weight_gradient(monkeypatch):
    spec = parse_arith("acc=e6m9 order=chunk(16)")

    def run():
        x, w = torch.randn(0, 3, 6, 6, requires_grad=True), torch.randn(4, 3, 3, 3, requires_grad=True)
        y = ops.conv2d(x, w, None, padding=1, forward=spec, backward=spec)
        y.sum().backward()
        return y.detach(), x.grad, w.grad

    direct = run()
    monkeypatch.setattr(implicit_conv, "_served", lambda *args: None)
    for got, want in zip(direct, run()):  # over patches: channel_rows of an empty batch
        assert torch.equal(got, want)
    assert direct[0].shape == (0, 4, 6, 6) and torch.equal(direct[2], torch.zeros(4, 3, 3, 3))
    assert not torch.signbit(direct[2]).any()
