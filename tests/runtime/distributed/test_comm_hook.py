"""The hook's fused CPU kernels give the torch path's bytes, and a kernel that cannot be built
falls back to it with one warning. One gloo process (world size 1) in the test's own process,
its group destroyed by the test."""
from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
from torch import nn

import mpcompile.runtime.distributed.comm_hook as comm_hook
from mpcompile.formats import parse
from mpcompile.policy import CommunicationSettings
from mpcompile.runtime.distributed import QuantizedGradients, quantized_allreduce_hook

SETTINGS = {
    "fp8_e5m2 + error feedback": CommunicationSettings(format=parse("fp8_e5m2"), error_feedback=True),
    "fp8_e4m3 block(32) shared": CommunicationSettings(format=parse("fp8_e4m3"), scaling="block", block_size=32,
                                                       shared_scale=True),
    "mxfp8_e5m2": CommunicationSettings(format=parse("mxfp8_e5m2"), scaling="none"),
    "fp8_e4m3 saturating, tensor scale": CommunicationSettings(format=parse("fp8_e4m3")),
    "bf16": CommunicationSettings(format=parse("bf16")),
    "fp16 + error feedback, no scale": CommunicationSettings(format=parse("fp16"), scaling="none", error_feedback=True),
}


class _Bucket:
    def __init__(self, buffer: torch.Tensor, params: list[nn.Parameter]):
        self._buffer, self._params = buffer, params

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def parameters(self) -> list[nn.Parameter]:
        return self._params


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        yield
    finally:
        dist.destroy_process_group()


def _steps(settings: CommunicationSettings, steps: int = 3) -> list[torch.Tensor]:
    """The hook's means over a few steps of a bucket of three parameters (sizes with tails),
    with infinities, a NaN and magnitudes over many binades."""
    params = [nn.Parameter(torch.empty(n)) for n in (4096, 1000, 96)]
    state = QuantizedGradients(settings, params, seed=0)
    g = torch.Generator().manual_seed(0)
    means = []
    for _ in range(steps):
        bucket = torch.randn(sum(p.numel() for p in params), generator=g)
        bucket *= torch.exp2(torch.randint(-20, 20, bucket.shape, generator=g).float())
        bucket[[5, 4200]] = torch.tensor([float("inf"), float("nan")])
        means.append(quantized_allreduce_hook(state, _Bucket(bucket, params)).wait().clone())
    return means


@pytest.mark.parametrize("name", list(SETTINGS))
def test_the_kernels_give_the_torch_paths_means(one_process_group, monkeypatch, name):
    calls = []
    for kernel in ("quantize_codes_", "accumulate_codes_"):
        wrapped = getattr(comm_hook, kernel)
        monkeypatch.setattr(comm_hook, kernel, lambda *a, _k=kernel, _f=wrapped, **kw: (calls.append(_k), _f(*a, **kw))[1])
    fused = _steps(SETTINGS[name])
    assert {"quantize_codes_", "accumulate_codes_"} <= set(calls)
    monkeypatch.setattr(comm_hook, "_cpu_kernels", lambda: False)
    reference = _steps(SETTINGS[name])
    for a, b in zip(fused, reference):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_kernels_that_cannot_be_built_fall_back_with_one_warning(one_process_group, monkeypatch):
    settings = SETTINGS["fp8_e5m2 + error feedback"]
    fused = _steps(settings)

    def broken():
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(comm_hook, "load_kernel", broken)
    monkeypatch.setattr(comm_hook, "_FAILED", set())
    with pytest.warns(RuntimeWarning, match="communication hook's CPU kernels.*no C\\+\\+ compiler") as record:
        fallen_back = _steps(settings)
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    for a, b in zip(fused, fallen_back):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))
