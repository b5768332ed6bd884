"""backend="triton" end to end: a compiled small CNN equals backend="torch", forward and
backward, bit for bit, in Triton's interpreter; and the choice of backend is checked."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import mpcompile
from mpcompile.backends import BackendError, resolve_backend
from backend_pairs import DEVICE, NO_TRITON, TRITON_RUNS

needs_triton = pytest.mark.skipif(not TRITON_RUNS, reason=NO_TRITON)

POLICY = """
version: 1
default:
  input: fp8_e4m3
  weight: fp8_e4m3
  grad_output: fp8_e5m2
  grad_input: bf16
  grad_weight: e5m7
  forward: {acc: bf16}
  backward: {acc: e6m9}
"""


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 5)
        self.mix = nn.Parameter(torch.randn(5, 3))

    def forward(self, x):
        return torch.matmul(self.fc(torch.relu(self.conv(x)).flatten(1)), self.mix)


def _run(cm, x):
    torch.manual_seed(7)  # stochastic roles draw their op's seed from torch's generator
    cm.zero_grad()
    y = cm(x)
    y.square().sum().backward()
    return [y.detach()] + [p.grad.clone() for p in cm.parameters()]


STOCHASTIC = POLICY.replace("input: fp8_e4m3", "input: fp8_e4m3:stochastic").replace(
    "weight: fp8_e4m3", "weight: e3m2:stochastic\n  bias: bf16\n  output: fp8_e5m2:stochastic")
# stochastic rounded products and sums: their bits are numbered by the op's output elements
# (the conv's, not its GEMM's layout), the bias's add included
SUMS = POLICY.replace("weight: fp8_e4m3", "weight: fp8_e4m3\n  bias: bf16").replace(
    "forward: {acc: bf16}", "forward: {mul: e5m2, acc: bf16, rounding: stochastic}").replace(
    "backward: {acc: e6m9}", "backward: {acc: e6m9, rounding: stochastic, kahan: true, order: chunk(16)}")


# each GEMM's (operands rounded in its prologue, output role rounded in its epilogue), in call
# order: forward conv, linear, matmul; backward matmul (grad a, grad b), linear (grad bias, grad
# x, grad W), conv (grad bias, grad x, grad W). A bias's gradient sums rounded grad_output
# against ones, unfused. Roles rounded elsewhere are rounded in memory: grad_output where the
# bias's gradient needs it rounded anyway, a stochastic role of conv's input or output (its
# GEMM's operand and result are not laid out as the role's tensor).
_SUM = [(False, False)]
_NEAREST = ([((True, True), False)] * 3 + [((True, True), True)] * 2 + _SUM + [((False, True), True)] * 2 + _SUM
            + [((False, True), True)] * 2)
FUSED = {"nearest": _NEAREST, "stochastic sums": _NEAREST,
         "stochastic roles": [((False, True), False)] + [((True, True), True)] * 4 + _SUM + [((False, True), True)] * 2
                             + _SUM + [((False, False), True)] * 2}


def tiny_equals_torch(monkeypatch, policy: str, batch: int, backend: str, record=lambda args, kwargs: None) -> list:
    """Tiny under ``policy`` on ``backend`` equals it on ``torch``, forward and backward, with no
    fallback to the reference (which would warn). Returns ``record(args, kwargs)`` of each
    ``triton_matmul`` call of the backend's run (torch's run makes none)."""
    import mpcompile.codegen.triton_gemm as triton_gemm

    calls = []
    real = triton_gemm.triton_matmul
    monkeypatch.setattr(triton_gemm, "triton_matmul", lambda *a, **k: calls.append(record(a, k)) or real(*a, **k))
    torch.manual_seed(0)
    model, x = Tiny().to(DEVICE), torch.randn(batch, 3, 6, 6, device=DEVICE)
    reference = _run(mpcompile.compile(copy.deepcopy(model), policy, (x,), backend="torch"), x)
    assert not calls
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to the reference would warn
        cm = mpcompile.compile(model, policy, (x,), backend=backend)
        calls.clear()  # compile's calibration ran the forward once
        got = _run(cm, x)
    for g, want in zip(got, reference):
        assert torch.equal(g, want)
    return calls


@needs_triton
@pytest.mark.parametrize("policy", [POLICY, STOCHASTIC, SUMS], ids=["nearest", "stochastic roles", "stochastic sums"])
def test_a_small_cnn_under_triton_equals_torch_forward_and_backward(monkeypatch, policy, request):
    fused = lambda args, kwargs: (kwargs.get("quantize", True), kwargs.get("out_role") is not None)
    calls = tiny_equals_torch(monkeypatch, policy, 2, "triton", fused)
    assert calls == FUSED[request.node.callspec.id]


class Grouped(nn.Module):
    """A padded grouped conv with bias, and a batched matmul against a broadcast weight."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
        self.mix = nn.Parameter(torch.randn(5, 4))

    def forward(self, x):
        return torch.matmul(self.conv(x).flatten(2).transpose(1, 2)[:, :7, :5], self.mix)


@needs_triton
@pytest.mark.parametrize("roles", [
    "input: e8m0\n  weight: fp8_e4m3\n  output: bf16",  # no zero: the conv's padding must stay 0
    "input: fp8_e5m2:stochastic\n  weight: e3m2:stochastic\n  output: e4m3:stochastic\n  grad_weight: bf16",
], ids=["e8m0 input", "stochastic"])
def test_grouped_padded_conv_and_broadcast_matmul_under_triton_equal_torch(roles):
    policy = f"version: 1\ndefault:\n  {roles}\n  grad_output: fp8_e5m2\n  forward: {{acc: bf16}}\n  backward: {{acc: e6m9}}\n"
    torch.manual_seed(0)
    model, x = Grouped().to(DEVICE), torch.randn(2, 4, 5, 5, device=DEVICE).abs()
    with torch.no_grad():  # E8M0 is unsigned: positive inputs for both ops
        model.conv.weight.abs_(), model.conv.bias.abs_()
    want = _run(mpcompile.compile(copy.deepcopy(model), policy, (x,), backend="torch"), x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = _run(mpcompile.compile(model, policy, (x,), backend="triton"), x)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


class Scores(nn.Module):
    """Attention scores: linears without bias, and a batched matmul of two activations."""

    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(6, 8, bias=False), nn.Linear(6, 8, bias=False)

    def forward(self, x):
        return torch.matmul(self.q(x), self.k(x).transpose(1, 2))


@needs_triton
def test_stochastic_backward_operands_are_rounded_in_the_prologue_with_the_roles_bits(monkeypatch):
    """grad_output is read transposed for the weight's gradient, and matmul's operands for each
    other's: the kernel must still draw each element's bits from its role tensor's flat index."""
    import mpcompile.codegen.triton_gemm as triton_gemm

    policy = ("version: 1\ndefault:\n  input: fp8_e4m3:stochastic\n  weight: e3m2:stochastic\n"
              "  grad_output: fp8_e5m2:stochastic\n  grad_input: bf16:stochastic\n  grad_weight: e5m7\n"
              "  forward: {acc: bf16}\n  backward: {acc: e6m9}\n")
    calls = []
    real = triton_gemm.triton_matmul
    monkeypatch.setattr(triton_gemm, "triton_matmul", lambda *a, **k: calls.append(
        (k.get("quantize", True), k.get("out_role") is not None)) or real(*a, **k))
    torch.manual_seed(0)
    model, x = Scores().to(DEVICE), torch.randn(2, 5, 6, device=DEVICE)
    want = _run(mpcompile.compile(copy.deepcopy(model), policy, (x,), backend="torch"), x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        cm = mpcompile.compile(model, policy, (x,), backend="triton")
        calls.clear()
        got = _run(cm, x)
    assert calls == [((True, True), False)] * 3 + [((True, True), True)] * 6
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@needs_triton
def test_what_the_kernel_does_not_emulate_falls_back_with_one_warning():
    policy = POLICY.replace("forward: {acc: bf16}", "forward: {acc: bf16, rounding: stochastic, order: pairwise}")
    torch.manual_seed(0)
    model, x = Tiny().to(DEVICE), torch.randn(2, 3, 6, 6, device=DEVICE)
    reference = mpcompile.compile(copy.deepcopy(model), policy, (x,), backend="torch")
    with pytest.warns(RuntimeWarning, match="order pairwise is not emulated.*torch reference computes it") as caught:
        cm = mpcompile.compile(model, policy, (x,), backend="triton")
        torch.manual_seed(1)  # the stochastic rounding draws its seed from torch's generator
        got = cm(x)
    assert len([w for w in caught if "pairwise" in str(w.message)]) == 1  # once per arithmetic and roles
    torch.manual_seed(1)
    assert torch.equal(got, reference(x))


@needs_triton
@pytest.mark.parametrize("spec", ["acc=bf16", "acc=fp16 rounding=stochastic", "acc=e5m7 kahan=true order=chunk(16)",
                                  "acc=bf16 rounding=up order=chunk(4)"])
def test_sums_and_means_run_as_triton_gemms_equal_to_torch(monkeypatch, spec):
    """mpc::sum / mean (and a bias's gradient) are GEMMs against ones: float64 products."""
    import mpcompile.codegen.triton_gemm as triton_gemm

    calls = []
    real = triton_gemm.triton_matmul
    monkeypatch.setattr(triton_gemm, "triton_matmul", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = (torch.randn(3, 40, 5) * 2.0 ** torch.arange(0, 10, 2)).to(DEVICE)  # inf - inf warns in the interpreter
    for op in (mpcompile.ops.sum, mpcompile.ops.mean):
        want = op(x, 1, spec=spec, seed=3, backend="torch")
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            got = op(x, 1, spec=spec, seed=3, backend="triton")
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    assert len(calls) == 2


def test_the_torch_backend_rounds_each_role_once(monkeypatch):
    """The fused forwards prepare nothing where no generated GEMM would take it."""
    import mpcompile.ops.bodies as bodies

    rounded = []
    real = bodies.quantize_role
    monkeypatch.setattr(bodies, "quantize_role", lambda x, spec, **k: rounded.append(spec) or real(x, spec, **k))
    formats = {"input": "fp8_e4m3:tensor", "weight": "fp8_e4m3", "bias": "bf16"}
    mpcompile.ops.linear(torch.randn(4, 8), torch.randn(3, 8), torch.randn(3), formats=formats, forward="acc=bf16",
                         backend="torch")
    mpcompile.ops.conv2d(torch.randn(1, 2, 4, 4), torch.randn(3, 2, 3, 3), torch.randn(3), padding=1,
                         formats=formats, forward="acc=bf16", backend="torch")
    assert [str(r) for r in rounded if r is not None] == ["fp8_e4m3:tensor", "fp8_e4m3", "bf16"] * 2


def test_the_backend_is_checked_and_resolved(monkeypatch):
    with pytest.raises(BackendError, match="'cuda' is not one of auto, torch, triton"):
        mpcompile.compile(Tiny(), POLICY, backend="cuda")
    with pytest.raises(BackendError, match="not one of"):
        mpcompile.ops.linear(torch.ones(2, 3), torch.ones(4, 3), backend="gpu")
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "torch" and resolve_backend("torch", cpu) == "torch"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", cpu)
    assert "backend" not in str(mpcompile.compile(Tiny(), POLICY).graph_module.code)  # auto: the ops' default
