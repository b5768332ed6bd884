"""mpcompile.models: shapes, the published ResNet-20 size, fx tracing and fp32 compilation."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import mpcompile
from mpcompile.models import MODELS, build_model, lenet5, logreg, mlp, resnet20

CASES = {  # id -> (factory, kwargs, input shape)
    "lenet5-8": (lenet5, {}, (4, 1, 8, 8)),
    "lenet5-28": (lenet5, {"image_size": 28}, (4, 1, 28, 28)),
    "lenet5-32": (lenet5, {"in_channels": 3, "image_size": 32}, (4, 3, 32, 32)),
    "mlp": (mlp, {}, (4, 1, 8, 8)),
    "logreg": (logreg, {}, (4, 64)),
    "resnet20": (resnet20, {}, (4, 3, 32, 32)),
}


def _make(case: str, seed: int = 0):
    factory, kwargs, shape = CASES[case]
    torch.manual_seed(seed)
    return factory(**kwargs), torch.randn(shape)


@pytest.mark.parametrize("case", CASES)
def test_output_shape(case):
    model, x = _make(case)
    with torch.no_grad():
        y = model.eval()(x)
    assert y.shape == (4, 10) and torch.isfinite(y).all()


def test_num_classes_and_hidden_widths():
    assert lenet5(num_classes=7, image_size=28)(torch.randn(2, 1, 28, 28)).shape == (2, 7)
    assert resnet20(num_classes=100, in_channels=1).eval()(torch.randn(2, 1, 16, 16)).shape == (2, 100)
    widths = [m.out_features for m in mlp(in_features=12, num_classes=3, hidden=(5, 6, 7)) if isinstance(m, nn.Linear)]
    assert widths == [5, 6, 7, 3]
    assert [type(m) for m in mlp(hidden=())] == [nn.Flatten, nn.Linear]


def test_resnet20_size_matches_the_paper():
    model = resnet20()
    n_params = sum(p.numel() for p in model.parameters())
    assert 0.26e6 <= n_params <= 0.28e6
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(convs) == 19 and len(linears) == 1
    assert [c.out_channels for c in convs if c.stride == (2, 2)] == [32, 64]


def test_resnet20_option_a_shortcut_subsamples_and_zero_pads():
    block = resnet20().layers[3]  # first block of stage 2: 16 -> 32 channels, stride 2
    assert not list(block.shortcut.parameters())
    x = torch.randn(2, 16, 8, 8)
    s = block.shortcut(x)
    assert s.shape == (2, 32, 4, 4)
    assert torch.equal(s[:, 8:24], x[:, :, ::2, ::2])
    assert not s[:, :8].any() and not s[:, 24:].any()


def test_lenet5_params_follow_the_layout():
    # conv 6x1x5x5+6, conv 16x6x5x5+16, fc (16*2*2)x120+120, 120x84+84, 84x10+10
    expected = (150 + 6) + (2400 + 16) + (64 * 120 + 120) + (120 * 84 + 84) + (84 * 10 + 10)
    assert sum(p.numel() for p in lenet5().parameters()) == expected


@pytest.mark.parametrize("size", [10, 30, 0])
def test_lenet5_rejects_sizes_not_multiple_of_4(size):
    with pytest.raises(ValueError, match="multiple of 4"):
        lenet5(image_size=size)


@pytest.mark.parametrize("case", CASES)
def test_symbolic_trace_is_bit_identical(case):
    model, x = _make(case)
    model.eval()
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        assert torch.equal(traced(x), model(x))


@pytest.mark.parametrize("case", CASES)
def test_fp32_compile_is_bit_identical_forward_and_backward(case):
    model, x = _make(case)
    model.eval()
    cm = mpcompile.compile(model, {"version": 1, "name": "fp32"})
    with torch.no_grad():
        assert torch.equal(cm(x), model(x))

    def grads(m):
        model.zero_grad()
        y = m(x)
        y.square().sum().backward()
        return y.detach(), [p.grad.clone() for p in model.parameters()]

    y, g = grads(model)
    y_c, g_c = grads(cm)
    assert torch.equal(y, y_c)
    assert len(g) == len(g_c) > 0 and all(torch.equal(a, b) for a, b in zip(g, g_c))


def test_build_model_registry():
    assert set(MODELS) == {"lenet5", "mlp", "logreg", "resnet20"}
    model = build_model("lenet5", image_size=28, num_classes=5)
    assert model(torch.randn(1, 1, 28, 28)).shape == (1, 5)


def test_build_model_unknown_name_suggests_a_close_match():
    with pytest.raises(mpcompile.MpcompileError, match=r"did you mean 'resnet20'.*lenet5, logreg, mlp, resnet20"):
        build_model("resnet2")
    with pytest.raises(mpcompile.MpcompileError) as info:
        build_model("transformer")
    assert "did you mean" not in str(info.value) and "resnet20" in str(info.value)
