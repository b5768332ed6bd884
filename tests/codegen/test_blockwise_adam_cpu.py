"""The fused CPU step of Adam with codebook states equals, bit for bit, decoding the states,
torch's own Adam / AdamW step and encoding them again (``block_codes``)."""
from __future__ import annotations

import pytest
import torch

from mpcompile.codegen.blockwise_adam_cpu import AdamHyper, blockwise_adam_step
from mpcompile.formats import parse
from mpcompile.formats.codebook_codes import block_codes, block_values

FORMATS = [("blockwise(dynamic8,256)", "blockwise(dynamic8u,256)"),
           ("blockwise(dynamic4,256)", "blockwise(dynamic8u,256)"),
           ("blockwise(dynamic8,6)", "blockwise(dynamic4u,6)")]


def _states(n: int, m_fmt, v_fmt, g: torch.Generator):
    """Codes of a first and second moment spread over many decades (and one all-zero block)."""
    m = torch.randn(n, generator=g) * 10.0 ** torch.randint(-9, 0, (n,), generator=g)
    v = torch.rand(n, generator=g) * 10.0 ** torch.randint(-12, -2, (n,), generator=g)
    m[:m_fmt.block_size] = 0.0
    return block_codes(m, m_fmt), block_codes(v, v_fmt)


def _torch_step(optimizer_cls, p0, grad, m, v, m_fmt, v_fmt, step: int, **options):
    """Decode, torch's step, encode: what ``LowPrecisionOptimizer`` does without the kernel."""
    p = torch.nn.Parameter(p0.clone())
    optimizer = optimizer_cls([p], **options)
    p.grad = grad.clone()
    optimizer.state[p] = {"step": torch.tensor(float(step - 1)),
                          "exp_avg": block_values(*m, m_fmt)[:p.numel()].clone(),
                          "exp_avg_sq": block_values(*v, v_fmt)[:p.numel()].clone()}
    optimizer.step()
    state = optimizer.state[p]
    return p.detach(), block_codes(state["exp_avg"], m_fmt), block_codes(state["exp_avg_sq"], v_fmt)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, NaN for NaN."""
    if a.dtype == torch.uint8:
        return torch.equal(a, b)
    return bool(((a.view(torch.int32) == b.view(torch.int32)) | (a.isnan() & b.isnan())).all())


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("formats", FORMATS)
@pytest.mark.parametrize("optimizer_cls, weight_decay", [(torch.optim.Adam, 0.0), (torch.optim.Adam, 0.01),
                                                         (torch.optim.AdamW, 0.01)])
def test_the_fused_step_is_torchs_step_and_encode(formats, optimizer_cls, weight_decay, threads):
    m_fmt, v_fmt = parse(formats[0]), parse(formats[1])
    g = torch.Generator().manual_seed(0)
    # odd sizes leave torch's vector loops a scalar tail; 70001 spans three of the kernel's chunks
    for n, step in ((37, 1), (4097, 3), (70001, 10)):
        p0, grad = torch.randn(n, generator=g), torch.randn(n, generator=g) * 1e-2
        m, v = _states(n, m_fmt, v_fmt, g)
        options = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
        expected = _torch_step(optimizer_cls, p0, grad, m, v, m_fmt, v_fmt, step, **options)
        p, m, v = p0.clone(), tuple(t.clone() for t in m), tuple(t.clone() for t in v)
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            blockwise_adam_step(p, grad, m, v, m_fmt, v_fmt, AdamHyper(
                1e-3, 0.9, 0.999, 1e-8, weight_decay, optimizer_cls is torch.optim.AdamW, float(step)))
        finally:
            torch.set_num_threads(previous)
        assert _same(p, expected[0]), f"n={n}: parameters differ"
        for got, want, name in ((m, expected[1], "exp_avg"), (v, expected[2], "exp_avg_sq")):
            assert _same(got[0], want[0]) and _same(got[1], want[1]), f"n={n}: {name}'s codes or absmax differ"


def test_non_finite_gradients_give_torchs_codes():
    m_fmt, v_fmt = parse(FORMATS[0][0]), parse(FORMATS[0][1])
    g = torch.Generator().manual_seed(1)
    n = 1024
    p0, grad = torch.randn(n, generator=g), torch.randn(n, generator=g)
    grad[[3, 300, 600]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    m, v = _states(n, m_fmt, v_fmt, g)
    expected = _torch_step(torch.optim.Adam, p0, grad, m, v, m_fmt, v_fmt, 2, lr=1e-3)
    p = p0.clone()
    blockwise_adam_step(p, grad, m, v, m_fmt, v_fmt, AdamHyper(1e-3, 0.9, 0.999, 1e-8, 0.0, False, 2.0))
    assert _same(p, expected[0])
    assert torch.equal(m[0], expected[1][0]) and torch.equal(v[0], expected[2][0])
    assert m[1].isnan().sum() == 1 and v[1].isinf().sum() == 2  # the NaN's block; the infinities' blocks (v: g * g)
    assert _same(m[1], expected[1][1]) and _same(v[1], expected[2][1])


def test_codes_that_do_not_cover_the_parameter_are_refused():
    m_fmt, v_fmt = parse(FORMATS[0][0]), parse(FORMATS[0][1])
    m, v = _states(512, m_fmt, v_fmt, torch.Generator().manual_seed(2))
    hyper = AdamHyper(1e-3, 0.9, 0.999, 1e-8, 0.0, False, 1.0)
    with pytest.raises(ValueError, match="do not cover 1024 elements"):
        blockwise_adam_step(torch.zeros(1024), torch.zeros(1024), m, v, m_fmt, v_fmt, hyper)
    with pytest.raises(ValueError, match="share a block size"):
        blockwise_adam_step(torch.zeros(512), torch.zeros(512), m, v, m_fmt, parse("blockwise(dynamic8u,128)"), hyper)
