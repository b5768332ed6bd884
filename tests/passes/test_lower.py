"""lower: what the roles of non-GEMM ops get: channel scales along the channels (never the
batch), the role's sr_bits, and the backend compile was given, with or without example inputs."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import mpcompile
import mpcompile.rounding as rounding
from mpcompile.backends import current_backend
from mpcompile.ops.roles import quantize_role
from mpcompile.ops.spec import parse_quant


class ConvThenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv1d(3, 4, 1), nn.Linear(5, 6)

    def forward(self, x):
        return torch.relu(self.fc(torch.tanh(self.conv(x))))


def _role_inputs(cm, target_name: str):
    return [n for n in cm.graph_module.graph.nodes if n.op == "call_function" and n.target.__name__ == target_name]


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_channel_scales_of_elementwise_roles_run_along_the_channels(capture):
    torch.manual_seed(0)
    model = ConvThenLinear()
    with torch.no_grad():  # channels of very different ranges: a scale per batch row would flush the small ones
        model.conv.weight *= torch.tensor([1.0, 1e-2, 1e-5, 1e-3]).reshape(4, 1, 1)
        model.conv.bias.zero_()
    policy = "version: 1\nrules:\n  - match: {type: activation}\n    input: fp8_e4m3:channel\n"
    x = torch.randn(2, 3, 5)
    cm = mpcompile.compile(model, policy, (x,), capture=capture)
    with torch.no_grad():
        h = model.conv(x)  # (N, C, L) from a convolution: channels are dim 1
        t = torch.tanh(quantize_role(h, parse_quant("fp8_e4m3:channel"), axis=1, seed=None))
        z = model.fc(t)  # (N, C, F) from a linear layer: features are last
        expected = torch.relu(quantize_role(z, parse_quant("fp8_e4m3:channel"), axis=-1, seed=None))
        assert torch.equal(cm(x), expected)
        batch_axis = torch.tanh(quantize_role(h, parse_quant("fp8_e4m3:channel"), axis=0, seed=None))
        assert not torch.equal(t, batch_axis)


def test_a_role_axis_overrides_the_channel_axis():
    torch.manual_seed(1)
    model = ConvThenLinear()
    x = torch.randn(2, 3, 5)
    policy = ("version: 1\nrules:\n  - match: {type: tanh}\n"
              "    input: {format: fp8_e4m3, scaling: channel, axis: 2}\n")
    cm = mpcompile.compile(model, policy, (x,))
    with torch.no_grad():
        h = model.conv(x)
        expected = model.fc(torch.tanh(quantize_role(h, parse_quant("fp8_e4m3:channel"), axis=2, seed=None))).relu()
        assert torch.equal(cm(x), expected)


def test_sr_bits_of_elementwise_roles_reach_the_rounding():
    torch.manual_seed(2)
    model, x = ConvThenLinear(), torch.randn(2, 3, 5)
    cm = mpcompile.compile(model, "version: 1\nrules:\n  - match: {type: tanh}\n"
                                  "    output: {format: fp8_e4m3, rounding: stochastic, sr_bits: 1}\n", (x,))
    (quant,) = _role_inputs(cm, "quant")
    assert quant.kwargs["sr_bits"] == 1
    with torch.no_grad():  # one random bit: every inexact value rounds up or down with probability 1/2 exactly
        t = torch.tanh(model.conv(torch.randn(64, 3, 200)))
        y = mpcompile.ops.quant(t, "fp8_e4m3", "stochastic", sr_bits=1, seed=3)
        lo = rounding.quantize(t, "fp8_e4m3", "toward_zero")
        assert 0.45 < ((y != lo).sum() / (t != lo).sum()).item() < 0.55


@pytest.mark.parametrize("shaped", [True, False], ids=["with example inputs", "without"])
def test_the_backend_reaches_every_role_quantizer(shaped, monkeypatch):
    seen = []
    select = rounding._select
    monkeypatch.setattr(rounding, "_select", lambda x, plan: seen.append(current_backend()) or select(x, plan))
    x = torch.randn(2, 3, 5)
    policy = ("version: 1\ndefault: {input: fp8_e4m3, weight: fp8_e4m3, grad_output: fp8_e5m2}\n"
              "rules:\n  - match: {type: [activation, elementwise]}\n    input: bf16\n    output: bf16\n")
    cm = mpcompile.compile(ConvThenLinear(), policy, (x,) if shaped else None, backend="torch")
    seen.clear()
    cm(x.requires_grad_()).sum().backward()
    assert len(seen) > 6 and set(seen) == {"torch"}
