"""The op registry (mpcompile/ops/registry.py): one entry per op kind, found in fx and ATen graphs."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mpcompile
from lowered import ops_called
from mpcompile.capture import capture_fx
from mpcompile.ops.registry import KINDS, lookup
from mpcompile.passes.classify import classify


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc = nn.Linear(12, 4)
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        h = F.relu(self.conv(x)).flatten(1)[:, :12]
        y = self.norm(self.fc(h))
        return y @ y.t() + 1


def _classified(gm: torch.fx.GraphModule) -> list[tuple[str | None, str | None]]:
    """(kind, group) of every call node the registry knows, in graph order."""
    classify(gm)
    return [(m.kind, m.group) for n in gm.graph.nodes if (m := n.meta.get("mpc")) is not None and m.kind]


def test_no_target_belongs_to_two_kinds():
    for field in ("modules", "functions", "methods", "aten"):
        targets = [t for k in KINDS for t in getattr(k, field)]
        assert len(targets) == len(set(targets)), field


def test_an_fx_graph_and_a_torch_export_graph_are_recognised_alike():
    model, x = Mixed(), torch.randn(2, 2, 4, 4)
    fx = _classified(torch.fx.symbolic_trace(model))
    aten = _classified(torch.export.export(model, (x,), strict=False).module())
    assert [g for _, g in fx] == ["gemm", "activation", "gemm", "norm", "gemm", "elementwise"]
    assert [g for _, g in aten] == [g for _, g in fx]  # ATen spells a LayerNorm module as layer_norm, relu as relu
    assert [k for k, g in aten if g == "gemm"] == [k for k, g in fx if g == "gemm"] == ["conv2d", "linear", "matmul"]


def test_an_exported_aten_graph_compiles_to_the_same_numbers_as_the_fx_trace():
    torch.manual_seed(0)
    model, x = Mixed(), torch.randn(2, 2, 4, 4)
    policy = ("version: 1\ndefault: {input: fp8_e4m3, weight: fp8_e4m3, forward: {acc: e6m9, order: chunk(4)}}\n"
              "rules:\n  - match: {type: activation}\n    output: bf16\n")
    traced = mpcompile.compile(model, policy, (x,))
    exported = mpcompile.compile(torch.export.export(model, (x,), strict=False).module(), policy, (x,))
    assert [f.__name__ for f in ops_called(exported)] == [f.__name__ for f in ops_called(traced)] == \
        ["conv2d", "quant", "linear", "matmul"]
    assert torch.equal(exported(x), traced(x)) and not torch.equal(traced(x), model(x))


def test_aten_gemm_work_that_is_not_emulated_warns():
    class Decomposed(nn.Module):  # what run_decompositions() leaves of a convolution
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 2, 3, 3))

        def forward(self, x):
            return torch.ops.aten.convolution.default(x, self.w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1)

    x = torch.randn(1, 2, 5, 5)
    with pytest.warns(UserWarning, match=r"runs in fp32: convolution is not emulated, so the policy's input, "
                                         r"weight for it are not applied"):
        mpcompile.compile(Decomposed(), "version: 1\ndefault: {input: fp8_e4m3, weight: fp8_e4m3}\n", (x,))


def test_a_subclass_is_its_base_kind_and_unknown_calls_have_none():
    class MyLinear(nn.Linear):
        pass

    gm = capture_fx(nn.Sequential(MyLinear(3, 3), nn.Flatten()), leaf_modules=(MyLinear,))
    found = {n.target: lookup(gm, n) for n in gm.graph.nodes if n.op == "call_module"}
    assert found["0"].name == "linear" and found["1"] is None


class Conv1D(nn.Module):
    """Hugging Face GPT-2's Conv1D: a linear layer with its weight stored (in, out), as addmm."""

    def __init__(self, nx: int, nf: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.weight.shape[1],)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class NewKinds(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1)
        self.proj = Conv1D(3, 4)

    def forward(self, x, scores, values):
        h = self.proj(self.up(x).permute(0, 2, 3, 1).contiguous())
        return h.sum() + torch.baddbmm(scores, values, values.transpose(1, 2)).sum()


POLICY = ("version: 1\ndefault: {input: fp8_e4m3, weight: fp8_e4m3, grad_output: fp8_e5m2,\n"
          "          forward: {acc: e6m9, order: chunk(4)}, backward: {acc: e6m9, order: chunk(4)}}\n")


def test_added_kinds_lower_every_role_and_equal_their_ops():
    from mpcompile import ops

    torch.manual_seed(0)
    model = NewKinds()
    inputs = (torch.randn(2, 2, 3, 3), torch.randn(2, 5, 5), torch.randn(2, 5, 6))
    cm = mpcompile.compile(model, POLICY, inputs)
    assert [f.__name__ for f in ops_called(cm)] == ["conv_transpose2d", "addmm", "baddbmm"]
    kinds = {m.name: m.kind for n in cm.annotated.graph.nodes if (m := n.meta.get("mpc")) is not None and m.kind}
    assert {"up": "conv_transpose2d", "proj.addmm": "addmm"}.items() <= kinds.items()
    spec = dict(formats={"input": "fp8_e4m3", "weight": "fp8_e4m3", "grad_output": "fp8_e5m2"},
                forward="acc=e6m9 order=chunk(4)", backward="acc=e6m9 order=chunk(4)")
    x, scores, values = inputs
    up = ops.conv_transpose2d(x, model.up.weight, model.up.bias, 2, 1, 1, **spec)
    flat = up.permute(0, 2, 3, 1).contiguous()
    h = ops.addmm(model.proj.bias, flat.reshape(-1, 3), model.proj.weight, **spec).view(*flat.shape[:-1], -1)
    want = h.sum() + ops.baddbmm(scores, values, values.transpose(1, 2), **spec).sum()
    assert torch.equal(cm(*inputs), want)
    with torch.no_grad():
        assert torch.equal(mpcompile.compile(model, "fp32", inputs)(*inputs), model(*inputs))


def test_scaled_addmm_is_refused_and_warned():
    class Scaled(nn.Module):
        def forward(self, b, x, w):
            return torch.addmm(b, x, w, alpha=0.5)

    inputs = (torch.randn(3), torch.randn(2, 4), torch.randn(4, 3))
    with pytest.warns(UserWarning, match=r"node addmm .*runs in fp32: addmm with alpha or beta other than 1"):
        cm = mpcompile.compile(Scaled(), POLICY, inputs)
    assert torch.equal(cm(*inputs), Scaled()(*inputs))
