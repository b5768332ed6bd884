"""torchvision classification models through mpcompile.compile (slow: the model zoo)."""
from __future__ import annotations

import pytest
import torch
import torchvision

import mpcompile

MODELS = {  # name -> (constructor kwargs, input size): small inputs keep the suite fast
    "resnet18": ({}, 32), "mobilenet_v3_small": ({}, 32), "efficientnet_b0": ({}, 32),
    "regnet_y_400mf": ({}, 32), "squeezenet1_0": ({}, 64), "shufflenet_v2_x0_5": ({}, 32),
    "densenet121": ({}, 32), "convnext_tiny": ({}, 32), "vit_b_16": ({"image_size": 32}, 32),
}
ROLES_ONLY_FP8 = "version: 1\ndefault: {input: fp8_e4m3, weight: fp8_e4m3}\n"


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_fp32_is_bit_identical_and_fp8_changes_every_gemm(name):
    kwargs, size = MODELS[name]
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10, **kwargs).eval()
    with torch.no_grad():  # ViT's head starts at zero, which would hide every change
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    x = torch.randn(2, 3, size, size)
    cm = mpcompile.compile(model, "version: 1\n", (x,))
    with torch.no_grad():
        assert torch.equal(cm(x), model(x))
        fp8 = mpcompile.compile(model, ROLES_ONLY_FP8)
        gemms = [n for n in fp8.graph_module.graph.nodes if n.op == "call_function"
                 and n.target.__module__ in ("mpcompile.ops.api", "mpcompile.ops.attention")]
        assert len(gemms) == len(fp8.assignments()) > 0
        y = fp8(x)
        assert y.shape == (2, 10) and torch.isfinite(y).all() and not torch.equal(y, model(x))
