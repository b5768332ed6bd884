"""Per-component recomputation (ops with ``recompute=Recompute(tau, high)``): tau = inf is the low
op and tau < 1 the high op, to the bit; in between every component is the high op's exactly
where an independently computed kappa estimate exceeds tau; the counts; the plain gradients;
``compile`` end to end."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mpcompile
from mpcompile import ops
from mpcompile.formats import parse
from mpcompile.ops import ArithSpec, Recompute, SpecError
from mpcompile.ops.spec import parse_recompute
from mpcompile.rounding import quantize

FORMATS = {"input": "fp8_e4m3", "weight": "bf16", "bias": "bf16", "output": "e5m10", "grad_output": "fp8_e5m2"}
LOW = ArithSpec(acc="e5m2")
HIGH = ArithSpec(acc="bf16", order="chunk(4)")
BWD = ArithSpec(acc="e5m10", order="pairwise")
PHIS = {None: None, "relu": F.relu, "tanh": torch.tanh, "leaky_relu(0.1)": lambda v: F.leaky_relu(v, 0.1)}


def _leaves(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).requires_grad_() for s in shapes]


def _q(t: torch.Tensor | None, role: str) -> torch.Tensor | None:
    """The operand as the op's role rounds it (the reference quantizer)."""
    return None if t is None else quantize(t.detach(), parse(FORMATS[role]), "nearest")


# Each case: the op, its operands, and |W||x| + |b| of the rounded operands, written out directly.
def _linear_case():
    x, w, b = _leaves((6, 5, 24), (7, 24), (7,))
    return (ops.linear, (x, w, b), {},
            lambda: F.linear(_q(x, "input").abs(), _q(w, "weight").abs(), _q(b, "bias").abs()))


def _conv_case():
    x, w, b = _leaves((2, 3, 7, 7), (5, 3, 3, 3), (5,), seed=1)
    conv = {"stride": 2, "padding": 1}
    return (ops.conv2d, (x, w, b), conv,
            lambda: F.conv2d(_q(x, "input").abs(), _q(w, "weight").abs(), _q(b, "bias").abs(), **conv))


def _matmul_case():
    a, b = _leaves((3, 5, 16), (16, 6), seed=2)
    return (ops.matmul, (a, b), {}, lambda: torch.matmul(_q(a, "input").abs(), _q(b, "weight").abs()))


CASES = {"linear": _linear_case, "conv2d": _conv_case, "matmul": _matmul_case}


def _call(op, args, kwargs, spec: ArithSpec, formats=FORMATS, **extra) -> torch.Tensor:
    """The op with forward arithmetic ``spec``."""
    return op(*args, formats=formats, forward=spec, backward=BWD, **kwargs, **extra)


def _estimate(magnitude: torch.Tensor, v: torch.Tensor, phi) -> torch.Tensor:
    """kappa_v * kappa_phi = |phi'(v)| (|W||x| + |b|) / |phi(v)| in float64; 0 where the numerator
    is 0, inf where v is not finite."""
    if phi is None:
        y, slope = v, torch.ones_like(v)
    else:
        with torch.enable_grad():
            vv = v.detach().clone().requires_grad_()
            y = phi(vv)
            (slope,) = torch.autograd.grad(y.sum(), vv)
    top = magnitude.double() * slope.double().abs()
    kappa = torch.where(top == 0, 0.0, top / y.detach().double().abs())
    return torch.where(v.isfinite(), kappa, math.inf)


@pytest.mark.parametrize("kind", CASES)
@pytest.mark.parametrize("seed", [None, 11])
def test_tau_inf_is_the_low_op_and_tau_below_one_the_high_op(kind, seed):
    op, args, kwargs, _ = CASES[kind]()
    low, high = LOW, HIGH
    if seed is not None:  # stochastic: both sides draw their bits from the same seed
        low, high = ArithSpec(acc="e5m2", rounding="stochastic"), ArithSpec(acc="bf16", rounding="stochastic")
    with torch.no_grad():
        y_low = _call(op, args, kwargs, low, seed=seed)
        y_high = _call(op, args, kwargs, high, seed=seed)
        assert not torch.equal(y_low, y_high)
        for tau, want, low_count in ((math.inf, y_low, y_low.numel()), (0.5, y_high, 0)):
            counts = torch.zeros(2, dtype=torch.int64)
            y = _call(op, args, kwargs, low, seed=seed, recompute=Recompute(tau, high), activation="relu",
                      counts=counts)
            assert torch.equal(y, want) and counts.tolist() == [low_count, y.numel()]


@pytest.mark.parametrize("kind", CASES)
@pytest.mark.parametrize("activation", PHIS)
def test_components_above_tau_are_the_high_ops(kind, activation):
    op, args, kwargs, magnitude = CASES[kind]()
    with torch.no_grad():
        y_low, y_high = _call(op, args, kwargs, LOW), _call(op, args, kwargs, HIGH)
        v = _call(op, args, kwargs, LOW, formats={k: f for k, f in FORMATS.items() if k != "output"})
        estimate = _estimate(magnitude(), v, PHIS[activation])
        values = estimate[(estimate > 1) & estimate.isfinite()].unique()  # sorted
        for k in (len(values) // 4, len(values) // 2, 3 * len(values) // 4):
            tau = float((values[k - 1] + values[k]) / 2)  # strictly between two estimates
            hot = estimate > tau
            counts = torch.zeros(2, dtype=torch.int64)
            y = _call(op, args, kwargs, LOW, recompute=Recompute(tau, HIGH), activation=activation, counts=counts)
            assert torch.equal(y, torch.where(hot, y_high, y_low))
            assert counts.tolist() == [int((~hot).sum()), y.numel()] and 0 < hot.sum() < y.numel()
            assert (y != y_low).any() and (y != y_high).any()


def test_an_overflowed_low_sum_is_recomputed_whatever_tau():
    x, w = torch.full((1, 4), 300.0), torch.full((2, 4), 100.0)  # 120000 overflows e5m2 (max 57344)
    assert ops.linear(x, w, forward=LOW).isinf().all()
    counts = torch.zeros(2, dtype=torch.int64)
    y = ops.linear(x, w, forward=LOW, recompute=Recompute(1e30), counts=counts)
    assert y.tolist() == [[120000.0, 120000.0]] and counts.tolist() == [0, 2]


@pytest.mark.parametrize("kind", CASES)
def test_gradients_are_the_plain_ops(kind):
    op, args, kwargs, _ = CASES[kind]()
    y = _call(op, args, kwargs, LOW, recompute=Recompute(3.0, HIGH), activation="tanh")
    y0 = _call(op, args, kwargs, LOW)
    g = torch.randn_like(y0)
    inputs = [t for t in args if t is not None]
    got, want = torch.autograd.grad(y, inputs, g), torch.autograd.grad(y0, inputs, g)
    assert all(torch.equal(a, b) and a.abs().sum() > 0 for a, b in zip(got, want))


@pytest.mark.parametrize("activation", ["tanh", "relu", "gelu", "silu", "elu(0.5)"])
def test_compiled_fullgraph_matches_eager(activation):
    x, w, b = _leaves((8, 16), (6, 16), (6,))
    counts, high = torch.zeros(2, dtype=torch.int64), Recompute(5.0)  # specs are built outside compiled code

    def run(fn):
        out = fn(x, w, b)
        return out, torch.autograd.grad(out.sum(), w)[0], counts.tolist()

    def f(x, w, b):
        return ops.linear(x, w, b, forward=LOW, recompute=high, activation=activation, counts=counts)

    eager = run(f)
    counts.zero_()
    compiled = run(torch.compile(f, fullgraph=True, backend="aot_eager"))
    assert torch.equal(compiled[0], eager[0]) and torch.equal(compiled[1], eager[1]) and compiled[2] == eager[2]
    assert 0 < eager[2][0] < eager[2][1]


def test_counts_add_up_over_calls_and_need_an_int64_pair():
    x, w, b = _leaves((4, 8), (3, 8), (3,))
    counts = torch.zeros(2, dtype=torch.int64)
    for _ in range(3):
        ops.linear(x, w, b, forward=LOW, recompute=Recompute(math.inf), counts=counts)
    assert counts.tolist() == [36, 36]
    with pytest.raises(ValueError, match=r"counts must be an int64 tensor of shape \(2,\)"):
        ops.linear(x, w, b, forward=LOW, recompute=Recompute(10.0), counts=torch.zeros(2))


def test_recompute_specs_and_their_errors():
    r = Recompute(100, HIGH)
    assert str(r) == "tau=100.0 acc=bf16 order=chunk(4)" and parse_recompute(str(r)) == r
    assert parse_recompute("tau=inf acc=fp32") == Recompute(math.inf) and Recompute(math.inf).keeps_all_low
    assert Recompute(0.5).recomputes_all and not Recompute(1.0).recomputes_all
    for tau in (0, -1.0, math.nan, True, "10"):
        with pytest.raises(SpecError, match="must be a positive number"):
            Recompute(tau)
    with pytest.raises(SpecError, match="must start with tau=<number>"):
        parse_recompute("acc=fp32")
    x, w = _leaves((2, 4), (3, 4))
    with pytest.raises(SpecError, match="activation 'swish' is not one of relu, relu6"):
        ops.linear(x, w, forward=LOW, recompute=r, activation="swish")
    with pytest.raises(SpecError, match="only leaky_relu and elu take an argument"):
        ops.linear(x, w, forward=LOW, recompute=r, activation="relu(2)")


# -- compile -------------------------------------------------------------------------------------
class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.act = nn.Tanh()
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        return F.leaky_relu(self.fc(self.act(self.conv(x)).flatten(1)), 0.2)


def _policy(tau) -> str:
    return f"""
version: 1
default:
  input: fp8_e4m3
  weight: bf16
  forward: {{acc: e5m2}}
  recompute: {{tau: {tau}, forward: {{acc: bf16, order: chunk(4)}}}}
"""


# GEMM node -> (the activation lowering names for its estimate, output components per example)
MLP_NODES = {"_1": ("relu", 16), "_3": ("relu", 16), "_5": (None, 10)}
CONV_NODES = {"conv": ("tanh", 4 * 6 * 6), "fc": ("leaky_relu(0.2)", 5)}


def _models():
    torch.manual_seed(0)
    mlp = mpcompile.models.mlp(in_features=12, hidden=(16, 16))
    return [(mlp, torch.randn(8, 12), MLP_NODES), (ConvNet(), torch.randn(3, 1, 6, 6), CONV_NODES)]


@pytest.mark.parametrize("which", [0, 1])
def test_compile_end_to_end(which):
    model, x, nodes = _models()[which]
    low = mpcompile.compile(model, _policy(1.0).replace("  recompute", "  # recompute"), (x,))
    high = mpcompile.compile(model, _policy(1.0).replace("acc: e5m2", "acc: bf16, order: chunk(4)")
                             .replace("  recompute", "  # recompute"), (x,))
    for tau, want in (("inf", low(x)), (0.5, high(x))):
        cm = mpcompile.compile(model, _policy(tau), (x,))
        assert torch.equal(cm(x), want)
    cm = mpcompile.compile(model, _policy(10.0), (x,), calibration=[x])
    calls = {n.meta["mpc"].source: n.kwargs for n in cm.graph_module.graph.nodes if "counts" in n.kwargs}
    assert {name: kw["activation"] for name, kw in calls.items()} == {n: phi for n, (phi, _) in nodes.items()}
    assert {name: kw["recompute"] for name, kw in calls.items()} == \
        dict.fromkeys(nodes, "tau=10.0 acc=bf16 order=chunk(4)")
    assert cm.low_precision_counts() == {name: (0, 0) for name in nodes}
    assert "% low" not in cm.table()  # calibration runs (stats) do not count
    y = cm(x)
    y.square().sum().backward()  # gradients flow to every parameter
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    cm(x[:2])
    counts = cm.low_precision_counts()
    assert {name: total for name, (_, total) in counts.items()} == \
        {n: size * (len(x) + 2) for n, (_, size) in nodes.items()}
    assert all(0 < low < total for low, total in counts.values())
    assert cm.low_precision_fraction() == {name: low / total for name, (low, total) in counts.items()}
    assert f"({100 * cm.low_precision_fraction()[next(iter(nodes))]:.1f}% low)" in cm.table()
    cm.recompile()  # counts start afresh with every lowering
    assert cm.low_precision_counts() == {name: (0, 0) for name in nodes}
    cm(x)
    cm.reset_low_precision_counts()
    assert cm.low_precision_counts() == {name: (0, 0) for name in nodes}
    assert not any("_mpc_counts" in k for k in cm.state_dict())


def test_compiled_counts_equal_the_ops_own():
    model, x, nodes = _models()[0]
    cm = mpcompile.compile(model, _policy(10.0), (x,))
    with torch.no_grad():
        cm(x)
        h, want = x, {}
        for i, name in ((1, "_1"), (3, "_3"), (5, "_5")):
            counts = torch.zeros(2, dtype=torch.int64)
            layer = model[i]
            h = ops.linear(h, layer.weight, layer.bias, formats={"input": "fp8_e4m3", "weight": "bf16"}, forward=LOW,
                           recompute=Recompute(10.0, HIGH), activation=nodes[name][0], counts=counts)
            want[name] = tuple(counts.tolist())
            h = F.relu(h) if nodes[name][0] else h
    assert cm.low_precision_counts() == want and torch.equal(cm(x), h)


def test_the_lock_keeps_recompute_and_non_gemm_ops_warn():
    model, x, _ = _models()[1]
    cm = mpcompile.compile(model, _policy("inf"), (x,))
    again = mpcompile.compile(model, cm.to_json())
    assert again.assignments()["fc"].recompute == Recompute(math.inf, HIGH)
    assert torch.equal(again(x), cm(x))
    with pytest.warns(UserWarning, match=r"node act \(Tanh 'act'\): recompute not applied: it is for linear, conv"):
        mpcompile.compile(model, _policy(10) + "rules:\n  - match: {type: Tanh}\n    recompute: {tau: 3}\n", (x,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mpcompile.compile(model, _policy(10), (x,))


class Consumers(nn.Module):
    """One Linear per way an activation can follow it."""

    def __init__(self):
        super().__init__()
        self.fcs = nn.ModuleList(nn.Linear(4, 4) for _ in range(9))
        self.gelu, self.elu, self.leaky = nn.GELU(approximate="tanh"), nn.ELU(0.5), nn.LeakyReLU(0.3)

    def forward(self, x):
        f = self.fcs
        shared = f[6](x)
        return (self.gelu(f[0](x)) + self.elu(f[1](x)) + self.leaky(f[2](x)) + f[3](x).sigmoid()
                + F.gelu(f[4](x)) + F.elu(f[5](x), alpha=2.0) + torch.relu(shared) + shared
                + torch.softmax(f[7](x), -1) + F.leaky_relu(f[8](x), 0.1))


def test_lowering_names_the_consumer_activation():
    x = torch.randn(3, 4)
    cm = mpcompile.compile(Consumers(), _policy(10), (x,))
    phis = {n.meta["mpc"].source: n.kwargs["activation"] for n in cm.graph_module.graph.nodes if "counts" in n.kwargs}
    assert phis == {"fcs_0": "gelu_tanh", "fcs_1": "elu(0.5)", "fcs_2": "leaky_relu(0.3)", "fcs_3": "sigmoid",
                    "fcs_4": "gelu", "fcs_5": "elu(2.0)", "fcs_6": None, "fcs_7": None, "fcs_8": "leaky_relu(0.1)"}
    assert cm(x).shape == (3, 4) and set(cm.low_precision_fraction()) == set(phis)
    assert "recompute tau=10: acc=bf16 order=chunk(4)" in cm.explain("fcs.0")
