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


@needs_triton
@pytest.mark.parametrize("policy", [POLICY, STOCHASTIC], ids=["nearest", "stochastic roles"])
def test_a_small_cnn_under_triton_equals_torch_forward_and_backward(monkeypatch, policy):
    import mpcompile.codegen.triton_gemm as triton_gemm

    calls = []
    real = triton_gemm.triton_matmul
    monkeypatch.setattr(triton_gemm, "triton_matmul",
                        lambda *a, **k: calls.append(k.get("quantize", True)) or real(*a, **k))
    torch.manual_seed(0)
    model, x = Tiny().to(DEVICE), torch.randn(2, 3, 6, 6, device=DEVICE)
    reference = _run(mpcompile.compile(copy.deepcopy(model), policy, (x,), backend="torch"), x)
    assert not calls
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to the reference would warn
        cm = mpcompile.compile(model, policy, (x,), backend="triton")
        calls.clear()  # compile's calibration ran the forward once
        triton = _run(cm, x)
    # conv, linear and matmul: a forward GEMM and two backward GEMMs each (grad_input, grad_weight);
    # the linear's forward is one kernel: operands rounded in its prologue, bias and output in its epilogue
    assert len(calls) == 9 and calls.count(True) == 1
    for got, want in zip(triton, reference):
        assert torch.equal(got, want)


@needs_triton
def test_what_the_kernel_does_not_emulate_falls_back_with_one_warning():
    policy = POLICY.replace("forward: {acc: bf16}", "forward: {acc: bf16, rounding: stochastic}")
    torch.manual_seed(0)
    model, x = Tiny().to(DEVICE), torch.randn(2, 3, 6, 6, device=DEVICE)
    reference = mpcompile.compile(copy.deepcopy(model), policy, (x,), backend="torch")
    with pytest.warns(RuntimeWarning, match="deterministic accumulator rounding.*torch reference computes it"):
        cm = mpcompile.compile(model, policy, (x,), backend="triton")
    torch.manual_seed(1)  # the stochastic rounding draws its seed from torch's generator
    want = reference(x)
    torch.manual_seed(1)
    assert torch.equal(cm(x), want)


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
