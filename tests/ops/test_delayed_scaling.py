"""tensor_delayed scaling (Transformer Engine's delayed scaling): the scale of an operand comes
from the largest amax of its last AMAX_HISTORY calls, which compile keeps in a buffer per op."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mpcompile
from mpcompile import ops, quantize
from mpcompile.errors import PolicyError
from mpcompile.ops import SpecError
from mpcompile.ops.spec import AMAX_HISTORY, ROLES

DELAYED = {"input": "fp8_e4m3:tensor_delayed:sat", "weight": "fp8_e4m3:tensor_delayed",
           "grad_output": "fp8_e5m2:tensor_delayed"}
CURRENT = {role: spec.replace("tensor_delayed", "tensor") for role, spec in DELAYED.items()}
ROW = {role: ROLES.index(role) for role in ROLES}


def _scaled(t: torch.Tensor, fmt: str, amax: float, saturate: bool = False) -> torch.Tensor:
    """t on fmt's grid stretched by the power of two that puts ``amax`` in the top binade."""
    s = 2.0 ** math.floor(math.log2(parse_max(fmt) / amax))
    return (quantize(t.detach().double() * s, fmt, saturate=saturate) / s).float()


def parse_max(fmt: str) -> float:
    return mpcompile.formats.parse(fmt).max


def _leaves(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 8, generator=g).requires_grad_(), torch.randn(3, 8, generator=g).requires_grad_()


def test_the_first_call_scales_by_its_own_amax_and_records_it():
    x, w = _leaves()
    history = torch.zeros(len(ROLES), AMAX_HISTORY)
    y = ops.linear(x, w, formats=DELAYED, amax_history=history)
    y0 = ops.linear(x, w, formats=CURRENT)
    g = torch.randn_like(y)
    assert torch.equal(y, y0)
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(y, (x, w), g), torch.autograd.grad(y0, (x, w), g)))
    assert history[ROW["input"], 0] == x.abs().max() and history[ROW["weight"], 0] == w.abs().max()
    assert history[ROW["grad_output"], 0] == g.abs().max()  # recorded by the backward
    assert history[:, 1:].abs().sum() == 0 and history[ROW["output"]].abs().sum() == 0


def test_later_calls_scale_by_the_history_so_a_growing_tensor_saturates():
    x, w = _leaves()
    history = torch.zeros(len(ROLES), AMAX_HISTORY)
    ops.linear(x, w, formats=DELAYED, amax_history=history)
    y = ops.linear(x * 8, w, formats=DELAYED, amax_history=history)
    old = float(x.abs().max())
    want = F.linear(_scaled(x * 8, "fp8_e4m3", old, saturate=True), _scaled(w, "fp8_e4m3", float(w.abs().max())))
    assert torch.equal(y, want) and (x * 8).abs().max() * 2.0 ** math.floor(math.log2(448 / old)) > 448
    assert torch.equal(history[ROW["input"], :2], torch.stack([(x * 8).abs().max(), x.abs().max()]).detach())


def test_the_history_forgets_after_amax_history_calls():
    x, w = _leaves()
    history = torch.zeros(len(ROLES), AMAX_HISTORY)
    ops.linear(x * 1000, w, formats=DELAYED, amax_history=history)
    for _ in range(AMAX_HISTORY):
        ops.linear(x, w, formats=DELAYED, amax_history=history)
    assert history[ROW["input"]].max() == x.abs().max()  # the large amax has left the window
    assert torch.equal(ops.linear(x, w, formats=DELAYED, amax_history=history), ops.linear(x, w, formats=CURRENT))


def test_conv_and_matmul_take_histories_too():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(2, 3, 5, 5, generator=g), torch.randn(4, 3, 3, 3, generator=g)
    a, b = torch.randn(2, 4, 8, generator=g), torch.randn(8, 3, generator=g)
    for call, args in ((ops.conv2d, (x, w)), (ops.matmul, (a, b))):
        history = torch.zeros(len(ROLES), AMAX_HISTORY)
        assert torch.equal(call(*args, formats=DELAYED, amax_history=history), call(*args, formats=CURRENT))
        assert history[ROW["input"], 0] == args[0].abs().max() and history[ROW["weight"], 0] == args[1].abs().max()


def test_delayed_scaling_errors():
    x, w = _leaves()
    with pytest.raises(SpecError, match="tensor_delayed scaling needs an amax history"):
        ops.linear(x, w, formats=DELAYED)
    with pytest.raises(ValueError, match=r"amax_history must be a tensor of shape \(8, 16\)"):
        ops.linear(x, w, formats=DELAYED, amax_history=torch.zeros(3, AMAX_HISTORY))
    with pytest.raises(SpecError, match="tensor_delayed scaling is for the GEMM operands"):
        ops.linear(x, w, formats={"output": "bf16:tensor_delayed"})
    with pytest.raises(PolicyError, match=r"<string>:2:19: default.output: tensor_delayed scaling is for the GEMM"):
        mpcompile.load_policy("version: 1\ndefault: {output: fp8_e4m3:tensor_delayed}\n")


def test_compile_keeps_a_history_per_op_across_recompile_and_calibration():
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), torch.randn(5, 8)
    policy = {"version": 1, "default": DELAYED, "levels": [{"name": "fp8"}, {"name": "bf16", "set": {"input": "bf16"}}]}
    cm = mpcompile.compile(model, policy, (x,))  # calibration runs the lowered model: the histories stay empty
    histories = dict(cm.graph_module._mpc_amax.named_buffers())
    assert sorted(histories) == ["_0", "_2"] and all(h.abs().sum() == 0 for h in histories.values())
    cm(x).sum().backward()
    first = histories["_0"]
    assert first[ROW["input"], 0] == x.abs().max() and first[ROW["grad_output"], 0] > 0
    cm.recompile(level="bf16")
    # kept across the recompile; not in the state dict, whose keys are the source model's
    assert cm.graph_module._mpc_amax._0 is first and cm.state_dict().keys() == model.state_dict().keys()
    before = first.clone()
    cm.table()  # statistics of the new level run on the calibration batch
    assert torch.equal(first, before)
