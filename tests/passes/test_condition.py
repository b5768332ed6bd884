"""The condition pass (mpcompile/passes/condition.py): kappa estimates against direct formulas."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import mpcompile
from mpcompile.errors import PolicyError


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.act = nn.Tanh()

    def forward(self, x):
        return torch.relu(self.act(self.fc(x))) * 2


def _rank_summary(k: torch.Tensor) -> dict:
    k = k.flatten().double().sort().values
    at = lambda q: k[min(k.numel() - 1, int(q * (k.numel() - 1) + 0.5))].item()
    return {"median": at(0.5), "p99": at(0.99), "max": k[-1].item()}


def _kappas(cm) -> dict:
    return {n.name: vars(n.meta["mpc"].kappa) for n in cm.annotated.graph.nodes
            if "mpc" in n.meta and n.meta["mpc"].kappa is not None}


def test_kappa_of_dot_products_and_activations():
    torch.manual_seed(0)
    net, x, x2 = Net(), torch.randn(4, 6), torch.randn(3, 6)
    cm = mpcompile.compile(net, "version: 1\n", (x,), calibration=[x, (x2,)])
    w, b = net.fc.weight, net.fc.bias
    xs = torch.cat([x, x2])
    v = xs @ w.T + b
    assert _kappas(cm)["fc"] == _rank_summary(((xs.abs() @ w.abs().T) + b.abs()) / v.abs())
    t = torch.tanh(v)
    assert _kappas(cm)["act"] == pytest.approx(_rank_summary((v * (1 - t * t)).abs() / t.abs()), rel=1e-6)
    assert _kappas(cm)["relu"]["max"] == 1.0 and _kappas(cm)["relu"]["median"] in (0.0, 1.0)
    assert set(_kappas(cm)) == {"fc", "act", "relu"}  # mul is no dot product and no activation


def test_kappa_rules_select_on_the_p99():
    torch.manual_seed(0)
    net, x = Net(), torch.randn(64, 6)
    cm = mpcompile.compile(net, "version: 1\n", (x,))
    p99 = _kappas(cm)["fc"]["p99"]
    for bound, kept in ((p99 * 0.99, True), (p99 * 1.01, False)):
        policy = f"version: 1\ndefault: {{weight: bf16}}\nrules:\n  - match: {{kappa_above: {bound}}}\n    keep: fp32\n"
        with warnings.catch_warnings():  # the higher bound matches no op: a warning, tested elsewhere
            warnings.simplefilter("ignore")
            assert mpcompile.compile(net, policy, (x,)).assignments()["fc"].quantizes is not kept


def test_kappa_rules_need_data():
    with pytest.raises(PolicyError, match=r"rules\[0\] \(<string>:3:5\): selects on kappa.*calibration="):
        mpcompile.compile(Net(), "version: 1\nrules:\n  - match: {kappa_above: 10}\n    keep: fp32\n")


def test_in_place_activations_see_their_input():
    torch.manual_seed(0)
    net, x = nn.Sequential(nn.Linear(6, 50), nn.ReLU(inplace=True)), torch.randn(8, 6)
    cm = mpcompile.compile(net, "version: 1\n", (x,))
    kappa = _kappas(cm)["_1"]  # 1 where the input is positive, 0 where negative: the median says which is more
    positive = (net[0](x) > 0).double().mean().item()
    assert kappa["max"] == 1.0 and kappa["median"] == (1.0 if positive > 0.5 else 0.0) and 0.2 < positive < 0.8


class FunctionalConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, 3, 3))

    def forward(self, x):
        return torch.nn.functional.conv2d(x, self.w, None, 2, 1)  # stride and padding given positionally


def test_kappa_of_a_functional_conv_with_positional_settings():
    torch.manual_seed(0)
    net, x = FunctionalConv(), torch.randn(2, 3, 9, 9)
    cm = mpcompile.compile(net, "version: 1\n", (x,))
    f = torch.nn.functional.conv2d
    want = f(x.abs(), net.w.abs(), None, 2, 1) / f(x, net.w, None, 2, 1).abs()
    assert _kappas(cm)["conv2d"] == _rank_summary(want)
