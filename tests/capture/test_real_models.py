"""Real models compile without edits (mpcompile/capture/): Hugging Face transformers through
torch.export, timm and torchvision through fx or export. fp32 changes nothing, a quantizing policy
reaches every GEMM (under ``strict``), and each mode runs its own code."""
from __future__ import annotations

import pytest
import torch
from torch.utils._pytree import tree_leaves

import mpcompile
from zoo import HF, TIMM, TORCHVISION, ZooModel

ALL = {**{f"hf-{k}": v for k, v in HF.items()}, **{f"timm-{k}": v for k, v in TIMM.items()},
       **{f"torchvision-{k}": v for k, v in TORCHVISION.items()}}
EVERY_GEMM = "version: 1\nstrict: true\ndefault: {input: fp8_e4m3, weight: fp8_e4m3, output: bf16}\n"


def _outputs(out) -> list[torch.Tensor]:
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def _run(model, z: ZooModel, seed: int = 0):
    torch.manual_seed(seed)  # dropout draws from torch's generator: the same seed, the same masks
    return _outputs(model(*z.args(), **z.kwargs()))


@pytest.mark.parametrize("name", sorted(HF))
def test_a_transformers_model_compiles_through_export_and_fp32_changes_nothing(name):
    z = HF[name]
    model = z.build().eval()
    cm = mpcompile.compile(model, "fp32", z.args(), example_kwargs=z.kwargs())
    assert cm.capture == "export" and cm.warnings == []
    want, got = _run(model, z), _run(cm, z)
    assert len(got) == len(want) and all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("name", sorted(ALL))
def test_a_quantizing_policy_reaches_every_gemm(name):
    z = ALL[name]
    model = z.build().eval()
    cm = mpcompile.compile(model, EVERY_GEMM, z.args(), example_kwargs=z.kwargs(), calibration=[])
    gemms = [meta for _, meta in cm.annotations() if meta.group == "gemm"]
    assert all(meta.assignment.quantizes for meta in gemms)
    assert not [meta.name for _, meta in cm.annotations() if meta.unemulated]
    if cm.capture == "export":  # the zoo counts the GEMM-like calls of the export graph
        assert len(gemms) == z.gemms
    out = _run(cm, z)
    assert all(torch.isfinite(t).all() for t in out if t.is_floating_point())
    assert not all(torch.equal(g, w) for g, w in zip(out, _run(model, z)))  # rounded: not the fp32 numbers


@pytest.mark.parametrize("name", ["hf-bert", "hf-llama", "timm-resnet", "timm-efficientnet", "timm-convnext",
                                  "timm-vit", "torchvision-swin_t", "torchvision-vit", "torchvision-maxvit",
                                  "torchvision-regnet"])
def test_each_mode_runs_its_own_code(name):
    z = ALL[name]
    model = z.build().train()
    cm = mpcompile.compile(model, "fp32", z.args(), example_kwargs=z.kwargs(), calibration=[])
    assert cm.modes == ("train",)
    for mode in (False, True, False):
        model.train(mode)  # what cm.train(mode) does to it
        assert cm.train(mode) is cm and model.training is mode and cm.training is mode
        want, got = _run(model, z, seed=1), _run(cm, z, seed=1)
        assert all(torch.equal(g, w) for g, w in zip(got, want)), f"{'train' if mode else 'eval'} mode differs"
    assert cm.modes == ("train", "eval")
    assert not all(torch.equal(a, b) for a, b in zip(_run(cm.train(), z, seed=1), _run(cm.eval(), z, seed=1)))
