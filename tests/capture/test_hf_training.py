"""Transformers models train under low-precision policies once compiled through torch.export:
forward and backward through the mpc ops, the loss falls."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mpcompile
from zoo import HF


@pytest.mark.parametrize("policy", ["fp8_e4m3", "mxfp8"])
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_a_causal_language_model_learns_a_batch_under_low_precision(name, policy):
    z = HF[name]
    model = z.build().train()
    ids = z.kwargs()["input_ids"]
    cm = mpcompile.compile(model, policy, (ids,), calibration=[], strict=True)
    assert cm.capture == "export" and sum(m.group == "gemm" and m.assignment.quantizes for _, m in cm.annotations()) > 4
    optimizer = torch.optim.AdamW(cm.parameters(), lr=1e-2)
    losses = []
    for _ in range(12):
        logits = cm(ids).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
