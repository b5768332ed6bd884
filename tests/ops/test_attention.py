"""nn.MultiheadAttention decomposed into emulated GEMMs: torch's module to rounding, every
GEMM quantized as its roles say, and lowered by the compiler."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mpcompile
from mpcompile import ops
from mpcompile.passes.lower import LoweringError
from mpcompile.rounding import quantize
from lowered import check_low_precision_run, ops_called

CONFIGS = {  # name: (module kwargs, forward kwargs builder)
    "batch_first": ({"batch_first": True}, lambda x, n, s: {}),
    "seq_first_masks": ({}, lambda x, n, s: {"attn_mask": torch.rand(s, s) > 0.7,
                                             "key_padding_mask": torch.arange(s).expand(n, s) >= s - 1}),
    "float_mask_per_head": ({"batch_first": True}, lambda x, n, s: {"attn_mask": torch.randn(n * 2, s, s),
                                                                    "average_attn_weights": False}),
    "kdim_vdim": ({"batch_first": True, "kdim": 6, "vdim": 3}, lambda x, n, s: {}),
    "no_bias": ({"bias": False}, lambda x, n, s: {"need_weights": False}),
}


def _inputs(module: nn.MultiheadAttention, n: int = 3, s: int = 5):
    shape = lambda e: (n, s, e) if module.batch_first else (s, n, e)
    q = torch.randn(shape(module.embed_dim))
    if module._qkv_same_embed_dim:
        return q, q, q
    return q, torch.randn(shape(module.kdim)), torch.randn(shape(module.vdim))


@pytest.mark.parametrize("name", CONFIGS)
def test_native_arithmetic_is_torchs_module(name):
    kwargs, extra = CONFIGS[name]
    torch.manual_seed(0)
    module = nn.MultiheadAttention(8, 2, **kwargs)
    q, k, v = _inputs(module)
    more = extra(q, 3, 5)
    want, want_w = module(q, k, v, **more)
    got, got_w = ops.multi_head_attention(module, q, k, v, **more)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # bmm vs batched matmul: last bits differ
    if want_w is None:
        assert got_w is None
    else:
        torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)
    got.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_unbatched_input():
    torch.manual_seed(0)
    module, x = nn.MultiheadAttention(8, 4), torch.randn(5, 8)
    want, want_w = module(x, x, x)
    got, got_w = ops.multi_head_attention(module, x, x, x)
    assert got.shape == (5, 8) and got_w.shape == (5, 5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)


def test_every_gemm_takes_the_roles():
    torch.manual_seed(0)
    module, x = nn.MultiheadAttention(8, 2, batch_first=True), torch.randn(2, 4, 8)
    q8 = lambda t: quantize(t.detach(), "fp8_e4m3")
    got, _ = ops.multi_head_attention(module, x, x, x, need_weights=False,
                                      formats={"input": "fp8_e4m3", "weight": "fp8_e4m3", "output": "bf16"})
    qkv = quantize(F.linear(q8(x), q8(module.in_proj_weight), module.in_proj_bias), "bf16")
    q, k, v = (t.unflatten(-1, (2, 4)).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    scores = quantize(torch.matmul(q8(q * math.sqrt(1 / 4)), q8(k.transpose(-2, -1))), "bf16")
    out = quantize(torch.matmul(q8(F.softmax(scores, -1)), q8(v)), "bf16").transpose(1, 2).flatten(2)
    want = quantize(F.linear(q8(out), q8(module.out_proj.weight), module.out_proj.bias), "bf16")
    assert torch.equal(got, want)


class Encoder(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, **kwargs)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        h, _ = self.attn(x, x, x, need_weights=False)
        return self.fc(h + x)


def test_compile_lowers_attention_only_when_the_policy_quantizes_it():
    torch.manual_seed(0)
    model, x = Encoder().eval(), torch.randn(2, 4, 8)
    with torch.no_grad():  # eval without gradients: torch's fused fast path, which an fp32 policy keeps
        assert torch.equal(mpcompile.compile(model, "fp32", (x,))(x), model(x))
    cm = mpcompile.compile(model, "version: 1\ndefault: {input: fp8_e4m3, weight: fp8_e4m3}\n"
                                  "rules:\n  - match: {type: MultiheadAttention}\n    output: bf16\n", (x,))
    calls = [n.target.__name__ for n in cm.graph_module.graph.nodes if n.op == "call_function"
             and n.target.__module__.startswith("mpcompile.ops")]
    assert calls == ["multi_head_attention", "linear"]
    facts = cm.assignments()["attn"]
    assert dict(facts.roles)["output"].quant is not None
    h, _ = ops.multi_head_attention(model.attn, x, x, x, need_weights=False,
                                    formats={"input": "fp8_e4m3", "weight": "fp8_e4m3", "output": "bf16"})
    q8 = lambda t: quantize(t.detach(), "fp8_e4m3")
    assert torch.equal(cm(x), F.linear(q8(h + x), q8(model.fc.weight), model.fc.bias))
    node = cm.annotated.graph.find_nodes(op="call_module", target="attn")[0]
    assert node.meta["mpc"].shape == (2, 4, 8) and math.isfinite(node.meta["mpc"].sqnr_db)


def test_attention_torch_cannot_emulate_is_a_lowering_error():
    model = Encoder(add_bias_kv=True)
    with pytest.raises(LoweringError, match=r"node attn \(module attn, MultiheadAttention\): add_bias_kv"):
        mpcompile.compile(model, "version: 1\ndefault: {input: bf16}\n")
    assert mpcompile.compile(model, "version: 1\ndefault: {input: bf16}\nrules:\n  - match: {name: attn}\n"
                                    "    keep: fp32\n").assignments()["attn"].quantizes is False


@pytest.mark.parametrize("mask", ["none", "causal", "bool", "float", "gqa"])
def test_sdpa_rounds_both_gemms_as_torchs_reference_writes_it(mask):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8)
    kwargs = {"causal": {"is_causal": True}, "bool": {"attn_mask": torch.rand(5, 6) > 0.3},
              "float": {"attn_mask": torch.randn(2, 1, 5, 6), "scale": 0.3}, "gqa": {"enable_gqa": True}}.get(mask, {})
    if mask == "gqa":  # two query heads per key and value head
        k, v = k[:, :2], v[:, :2]
    torch.testing.assert_close(ops.scaled_dot_product_attention(q, k, v, **kwargs),
                               F.scaled_dot_product_attention(q, k, v, **kwargs), rtol=1e-5, atol=1e-6)
    formats = {"input": "fp8_e4m3", "weight": "e3m2", "output": "bf16"}
    got = ops.scaled_dot_product_attention(q, k, v, **kwargs, formats=formats)
    left, right, out = (lambda t, f=f: quantize(t, f) for f in ("fp8_e4m3", "e3m2", "bf16"))
    if mask == "gqa":
        k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    scores = out(torch.matmul(left(q), right(k.transpose(-2, -1)))) * kwargs.get("scale", 1 / math.sqrt(8))
    allowed = torch.ones(5, 6, dtype=torch.bool).tril() if mask == "causal" else kwargs.get("attn_mask")
    if allowed is not None:
        scores = scores.masked_fill(~allowed, -math.inf) if allowed.dtype == torch.bool else scores + allowed
    assert torch.equal(got, out(torch.matmul(left(F.softmax(scores, -1)), right(v))))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(8, 24), nn.Linear(8, 8)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2))


def test_compile_lowers_sdpa_as_a_gemm_like_op():
    torch.manual_seed(0)
    model, x = Block(), torch.randn(2, 5, 8)
    fp8 = "version: 1\ndefault: {input: fp8_e4m3, weight: fp8_e4m3, grad_output: fp8_e5m2, forward: {acc: bf16}}\n"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cm = mpcompile.compile(model, fp8, (x,))
    assert list(cm.assignments()) == ["qkv", "scaled_dot_product_attention", "proj"]
    assert ops_called(cm) == [ops.linear, ops.scaled_dot_product_attention, ops.linear]
    check_low_precision_run(cm, model, (x,))
    with torch.no_grad():
        assert torch.equal(mpcompile.compile(model, "fp32", (x,))(x), model(x))
