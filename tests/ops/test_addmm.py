"""ops.addmm / ops.baddbmm: torch's ops to the bit in fp32; in low precision, the same numbers as
already-tested ops that round the same values in the same order (linear, per-row linear)."""
from __future__ import annotations

import os
import warnings

import pytest
import torch

from mpcompile import ops

from test_emulate import assert_bitwise

NEAREST = dict(formats={"input": "fp8_e4m3", "weight": "fp8_e4m3", "bias": "bf16", "output": "bf16",
                        "grad_output": "fp8_e5m2", "grad_input": "bf16", "grad_weight": "e5m7", "grad_bias": "bf16"},
               forward="acc=e6m9 order=chunk(4)", backward="acc=e6m9 order=chunk(4)")
# no output role here: rounding the output coarser than the accumulator would hide the sums' bits
STOCHASTIC = dict(formats={"input": "fp8_e4m3:stochastic", "weight": "e3m2:stochastic", "bias": "bf16:stochastic",
                           "grad_output": "fp8_e5m2:stochastic", "grad_weight": "bf16:stochastic"},
                  forward="mul=e5m2 acc=e6m9 rounding=stochastic",
                  backward="acc=e6m9 rounding=stochastic order=chunk(4)", seed=5)
CASES = {"nearest": NEAREST, "stochastic": STOCHASTIC}


def _leaves(*shapes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in shapes]


def _run(fn, leaves, grad):
    """fn(*leaves) and the gradients of ``grad`` through it, every leaf's."""
    y = fn(*leaves)
    return [y.detach(), *torch.autograd.grad(y, leaves, grad)]


def _assert_all_equal(got, want):
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        assert_bitwise(g, w)


# -- (i) fp32 specs and no formats: torch, forward and backward, to the bit ------------------------
@pytest.mark.parametrize("bias", [(5,), (3, 5), (3, 1), (1, 5), ()])
def test_addmm_native_is_torch(bias):
    leaves = _leaves(bias, (3, 4), (4, 5))
    g = torch.randn(3, 5)
    _assert_all_equal(_run(ops.addmm, leaves, g), _run(torch.addmm, leaves, g))


@pytest.mark.parametrize("bias", [(5,), (2, 3, 5), (2, 1, 5), (3, 5), (1, 1, 1)])
def test_baddbmm_native_is_torch(bias):
    leaves = _leaves(bias, (2, 3, 4), (2, 4, 5))
    g = torch.randn(2, 3, 5)
    _assert_all_equal(_run(ops.baddbmm, leaves, g), _run(torch.baddbmm, leaves, g))


def test_gradcheck_float64_native():
    assert torch.autograd.gradcheck(ops.addmm, _leaves((3, 1), (3, 4), (4, 2), dtype=torch.float64))
    assert torch.autograd.gradcheck(ops.baddbmm, _leaves((2, 1, 2), (2, 3, 4), (2, 4, 2), dtype=torch.float64))


# -- (ii) low precision: the decompositions --------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("bias", [(5,), (1, 5)])
def test_addmm_is_linear_with_the_transposed_weight(case, bias):
    """The weight role is mat2ᵀ (linear's (N, K)), the addend is linear's bias: the same rounded
    values, the same sums over k, the same one rounded add of the bias, the same bias gradient
    over the rows, and the same sub-seeds and element numbers for every random bit. A (1, N)
    addend takes the general path (not linear's body) and must still be linear to the bit."""
    kw = CASES[case]
    b, x, w = _leaves(bias, (12, 8), (8, 5), seed=1)
    g = torch.randn(12, 5, generator=torch.Generator().manual_seed(2))
    got = _run(lambda b, x, w: ops.addmm(b, x, w, **kw), (b, x, w), g)
    want = _run(lambda b, x, w: ops.linear(x, w.t(), b.reshape(5), **kw), (b, x, w), g)
    _assert_all_equal(got, want)


def test_an_addend_of_the_outputs_shape_is_each_rows_linear_bias():
    """Row m of addmm(B, x, W) with B (M, N) is linear(x[m], Wᵀ, B[m]) (deterministic roles round
    elementwise, so row by row is the same rounding); its bias gradient is a sum of one term per
    element, grad_output rounded once to the accumulator, as linear's over one row. The input and
    weight gradients do not depend on the addend: linear's with any bias."""
    b, x, w = _leaves((3, 5), (3, 8), (8, 5), seed=3)
    g = torch.randn(3, 5, generator=torch.Generator().manual_seed(4))
    y, gb, gx, gw = _run(lambda b, x, w: ops.addmm(b, x, w, **NEAREST), (b, x, w), g)
    rows = [_run(lambda b, x, w: ops.linear(x, w.t(), b, **NEAREST), (b[m], x[m:m + 1], w), g[m:m + 1])
            for m in range(3)]
    assert_bitwise(y, torch.cat([r[0] for r in rows]))
    assert_bitwise(gb, torch.stack([r[1] for r in rows]))
    assert_bitwise(gx, torch.cat([r[2] for r in rows]))
    bias_free = _run(lambda x, w: ops.linear(x, w.t(), **NEAREST), (x, w), g)
    assert_bitwise(gx, bias_free[1])
    assert_bitwise(gw, bias_free[2])
    for case in CASES.values():  # stochastic too: the same sub-seeds, the same numbering
        got = _run(lambda b, x, w: ops.addmm(b, x, w, **case), (b, x, w), g)
        want = _run(lambda x, w: ops.linear(x, w.t(), **case), (x, w), g)
        _assert_all_equal(got[2:], want[1:])


@pytest.mark.parametrize("case", CASES)
def test_baddbmm_of_one_batch_is_addmm(case):
    kw = CASES[case]
    b, x, w = _leaves((5,), (3, 8), (8, 5), seed=5)
    g = torch.randn(3, 5, generator=torch.Generator().manual_seed(6))
    got = _run(lambda b, x, w: ops.baddbmm(b, x[None], w[None], **kw), (b, x, w), g[None])
    _assert_all_equal([got[0][0], *got[1:]], _run(lambda b, x, w: ops.addmm(b, x, w, **kw), (b, x, w), g))


def test_baddbmm_with_a_shared_weight_is_linear_over_all_rows():
    """Element (i, m, n) is row i*M + m of the flattened input, numbered alike; the addend's
    gradient sums over (batch, row) in one reduction, as linear's over the flattened rows. The
    weight's role is rounded per batch (a stochastic one would draw other bits): nearest here."""
    kw = dict(NEAREST, forward="mul=e5m2 acc=e6m9 rounding=stochastic", seed=9)
    kw["formats"] = dict(kw["formats"], input="fp8_e4m3:stochastic")
    b, x, w = _leaves((5,), (2, 3, 8), (8, 5), seed=7)
    g = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(8))
    y, gb, gx = _run(lambda b, x: ops.baddbmm(b, x, w.detach().expand(2, 8, 5), **kw), (b, x), g)
    y0, gx0, gb0 = _run(lambda x, b: ops.linear(x.reshape(6, 8), w.detach().t(), b, **kw), (x, b), g.reshape(6, 5))
    _assert_all_equal([y.reshape(6, 5), gb, gx], [y0, gb0, gx0])


# -- arguments -------------------------------------------------------------------------------------
def test_alpha_and_beta_other_than_one_are_refused():
    b, x, w = torch.randn(5), torch.randn(3, 4), torch.randn(4, 5)
    assert torch.equal(ops.addmm(b, x, w, beta=1.0, alpha=1), torch.addmm(b, x, w))
    with pytest.raises(ValueError, match=r"addmm: beta=0\.5 is not emulated: only alpha = beta = 1"):
        ops.addmm(b, x, w, beta=0.5)
    with pytest.raises(ValueError, match=r"baddbmm: alpha=2 is not emulated"):
        ops.baddbmm(b, x[None], w[None], alpha=2)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match=r"mat1 \(3, 4\) and mat2 \(3, 5\) do not multiply"):
        ops.addmm(torch.randn(5), torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"input \(4,\) does not broadcast to the product's shape \(3, 5\)"):
        ops.addmm(torch.randn(4), torch.randn(3, 4), torch.randn(4, 5))
    with pytest.raises(ValueError, match=r"input \(1, 3, 5\) does not broadcast"):
        ops.addmm(torch.randn(1, 3, 5), torch.randn(3, 4), torch.randn(4, 5))
    with pytest.raises(ValueError, match=r"batch1 \(2, 3, 4\) and batch2 \(3, 4, 5\) do not multiply"):
        ops.baddbmm(torch.randn(5), torch.randn(2, 3, 4), torch.randn(3, 4, 5))


def test_the_fake_implementations_and_autograd_registrations_pass_opcheck():
    b, x, w = torch.randn(5), torch.randn(3, 4), torch.randn(4, 5)
    for op, args in ((torch.ops.mpc.addmm, (b, x, w)), (torch.ops.mpc.baddbmm, (b, x[None], w[None]))):
        torch.library.opcheck(op, (*args, "input=fp8_e4m3", "acc=bf16", "acc=bf16", None),
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


# -- (iv) the Triton backend in its interpreter: the same numbers ----------------------------------
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="Triton kernels need a CUDA device or Triton's interpreter (TRITON_INTERPRET=1)")
@pytest.mark.parametrize("bias", [(5,), (3, 1)], ids=["linear's kernels", "the general path"])
def test_the_triton_backend_gives_the_torch_backends_numbers(bias):
    device = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    leaves = [t.detach().to(device).requires_grad_() for t in _leaves(bias, (3, 8), (8, 5), seed=10)]
    g = torch.randn(3, 5, generator=torch.Generator().manual_seed(11)).to(device)
    want = _run(lambda *t: ops.addmm(*t, **STOCHASTIC, backend="torch"), leaves, g)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to the reference would warn
        got = _run(lambda *t: ops.addmm(*t, **STOCHASTIC, backend="triton"), leaves, g)
    _assert_all_equal(got, want)
