"""coverage (mpcompile/passes/coverage.py): GEMM work that runs in fp32 where no policy reaches it
is found by running the lowered model, not by knowing the modules."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import mpcompile
from mpcompile import CompileError


class Gram(nn.Module):
    """A GEMM no static rule knows of: a plain module whose forward calls torch.mm."""

    def forward(self, x):
        return torch.mm(x, x.t())


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.gram, self.head = nn.Linear(4, 4), Gram(), nn.Linear(5, 2)

    def forward(self, x):
        return self.head(self.gram(self.fc(x)))


def _uncovered(cm) -> dict[str, str]:
    return {m.name: m.unemulated for _, m in cm.annotations() if m.unemulated}


def test_gemm_work_inside_an_opaque_module_is_found_and_named():
    x = torch.randn(5, 4)
    policy = "version: 1\ndefault: {input: fp8_e4m3, weight: fp8_e4m3}\nrules:\n  - match: {last: true}\n    keep: fp32\n"
    with pytest.warns(UserWarning, match=r"node gram \(Gram 'gram'\): runs in fp32: aten\.mm run in fp32 inside Gram"):
        cm = mpcompile.compile(Net(), policy, (x,), leaf_modules=(Gram,))
    assert _uncovered(cm) == {"gram": "aten.mm run in fp32 inside Gram, which lowering does not emulate"}
    assert "head" not in _uncovered(cm)  # an emulated kind the policy keeps in fp32 is what the policy asked
    with pytest.raises(CompileError, match=r"strict: GEMM work runs in fp32 where the policy quantizes it:\n  node "
                                           r"gram \(Gram 'gram'\): aten\.mm run in fp32"):
        mpcompile.compile(Net(), policy + "strict: true\n", (x,), leaf_modules=(Gram,))
    kept = mpcompile.compile(Net(), policy + "  - match: {name: gram}\n    keep: fp32\n", (x,), leaf_modules=(Gram,),
                             strict=True)  # a rule that keeps it in fp32 says this is intended
    assert _uncovered(kept) == _uncovered(cm) and kept.warnings == []


def test_traced_into_the_module_s_gemm_is_emulated():
    x = torch.randn(5, 4)
    cm = mpcompile.compile(Net(), "version: 1\nstrict: true\ndefault: {input: fp8_e4m3, weight: fp8_e4m3}\n", (x,))
    assert _uncovered(cm) == {} and [m.kind for _, m in cm.annotations() if m.group == "gemm"] == ["linear", "matmul",
                                                                                                    "linear"]
