"""LowPrecisionOptimizer steps packed codebook moments with the fused CPU kernel where torch's step
is plain Adam(W), with the same numbers as the decode / torch / encode path, and falls back to
that path (warning once) where the kernel cannot be built."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn as nn

from mpcompile.formats import parse
from mpcompile.ops.observe import observing
from mpcompile.policy import OptimizerSettings
from mpcompile.runtime.optim import LowPrecisionOptimizer, codebook_adam

MOMENTS = ("blockwise(dynamic4,128)", "blockwise(dynamic8u,128)")


def _train(storage: str, optimizer_cls=torch.optim.AdamW, steps: int = 4, observe=(), **options) -> nn.Module:
    """A model with large and small parameters, and one large layer that only some steps use."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"a": nn.Linear(64, 100), "b": nn.Linear(100, 10), "spare": nn.Linear(64, 70)})
    settings = OptimizerSettings(kind="adam", momentum=parse(MOMENTS[0]), second_moment=parse(MOMENTS[1]),
                                 storage=storage)
    optimizer = LowPrecisionOptimizer(optimizer_cls(model.parameters(), lr=1e-2, **options), settings)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        x = torch.randn(16, 64, generator=g)
        out = model["b"](model["a"](x).relu())
        if step % 2 == 0:
            out = out + model["spare"](x)[:, :10]
        optimizer.zero_grad(set_to_none=True)
        out.square().mean().backward()
        with observing(observe[step]) if step < len(observe) and observe[step] else contextlib.nullcontext():
            optimizer.step()
    return model


def _count_kernel_calls(monkeypatch) -> list[int]:
    calls = []
    kernel = codebook_adam.blockwise_adam_step
    monkeypatch.setattr(codebook_adam, "blockwise_adam_step", lambda p, *a: (calls.append(p.numel()), kernel(p, *a)))
    return calls


@pytest.mark.parametrize("optimizer_cls, options", [(torch.optim.AdamW, {"weight_decay": 0.1}),
                                                    (torch.optim.Adam, {"weight_decay": 0.01})])
def test_the_kernel_steps_the_large_parameters_with_the_emulated_numbers(monkeypatch, optimizer_cls, options):
    emulated = _train("emulated", optimizer_cls, **options)
    calls = _count_kernel_calls(monkeypatch)
    packed = _train("packed", optimizer_cls, **options)
    # step 1 packs the states (torch's step); then a.weight (6400) and, on even steps, spare.weight (4480)
    assert calls == [6400, 6400, 4480, 6400]
    for (name, p), q in zip(emulated.named_parameters(), packed.parameters()):
        assert torch.equal(p, q), name


def test_amsgrad_is_left_to_torchs_step(monkeypatch):
    calls = _count_kernel_calls(monkeypatch)
    _train("packed", torch.optim.Adam, amsgrad=True)
    assert calls == []


def test_a_kernel_that_cannot_be_built_falls_back_with_one_warning(monkeypatch):
    emulated = _train("emulated")

    def broken():
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(codebook_adam, "load_kernel", broken)
    monkeypatch.setattr(codebook_adam, "_FAILED", set())
    with pytest.warns(RuntimeWarning, match="fused CPU 8-bit Adam kernel failed.*no C\\+\\+ compiler") as record:
        packed = _train("packed")
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    for p, q in zip(emulated.parameters(), packed.parameters()):
        assert torch.equal(p, q)


def test_observed_steps_take_torchs_path_and_change_no_bit(monkeypatch):
    """A monitored step reads the decoded states, so it decodes and lets torch step; the runs
    then go on through the kernel with the same numbers as a run nobody watched."""
    plain = _train("packed", steps=5)
    seen = []
    calls = _count_kernel_calls(monkeypatch)
    watch = lambda role, raw, rounded, spec, key: seen.append(role)  # noqa: E731
    watched = _train("packed", steps=5, observe=(None, watch, None, watch, None))
    assert calls == [6400, 4480, 6400, 4480]  # steps 3 and 5, spare layer too (1 packs; 2 and 4 are observed)
    assert {"momentum", "second_moment"} <= set(seen)
    for p, q in zip(plain.parameters(), watched.parameters()):
        assert torch.equal(p, q)
