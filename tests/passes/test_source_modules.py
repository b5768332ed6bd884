"""bind_source_modules: the lowered graph reads parameters through the source's own modules, so a
swap of a module's parameter (what FSDP2 does around each forward) is what it computes with."""
from __future__ import annotations

import torch
from torch import nn

import mpcompile
from mpcompile.models import build_model
from mpcompile.passes.source_modules import bind_source_modules, stale_reads


class _Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([2.0, 3.0]))

    def forward(self, x):
        return x * self.scale  # traced through: a get_attr on a holder fx makes


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.block, self.other = _Scaled(), _Scaled()
        self.other.scale = self.block.scale  # one parameter, two owners

    def forward(self, x):
        return self.block(x) + self.other(x)


def test_a_traced_holder_is_stale_until_bound_and_then_reads_the_swapped_parameter():
    model = _Tied()
    gm = torch.fx.symbolic_trace(model)
    assert stale_reads(gm, model) == ["block.scale"]  # fx's holder, not the source's _Scaled
    bind_source_modules(gm, model)
    assert stale_reads(gm, model) == [] and gm.block is model.block
    x = torch.ones(2)
    model.block._parameters["scale"] = nn.Parameter(torch.tensor([5.0, 7.0]))  # as FSDP2 swaps it
    assert torch.equal(gm(x), torch.tensor([10.0, 14.0]))


def test_a_holder_that_holds_something_else_is_not_replaced():
    model = _Tied()
    gm = torch.fx.symbolic_trace(model)
    gm.block.register_buffer("extra", torch.zeros(1))  # not the source module's: binding would lose it
    bind_source_modules(gm, model)
    assert gm.block is not model.block and stale_reads(gm, model) == ["block.scale"]


def test_a_compiled_model_computes_with_the_parameter_its_module_holds_now():
    torch.manual_seed(0)
    cm = mpcompile.compile(build_model("lenet5"), "fp8_e4m3", (torch.randn(2, 1, 8, 8),))
    x = torch.randn(4, 1, 8, 8)
    conv = cm.source.features[0]
    conv._parameters["weight"] = nn.Parameter(conv.weight.detach() * 2)  # a new tensor object, as FSDP2 gathers
    fresh = mpcompile.compile(cm.source, "fp8_e4m3", (torch.randn(2, 1, 8, 8),))
    assert torch.equal(cm(x), fresh(x))
    assert stale_reads(cm.graph_module, cm.source) == []
