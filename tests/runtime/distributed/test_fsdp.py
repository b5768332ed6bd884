"""FSDP2 and a compiled model (2 gloo ranks, spawned by the test, collectives under a timeout):
``fully_shard(cm, mp_policy=MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32))`` trains
bit for bit as one process that runs each rank's share on bf16 copies of the weights and averages
the fp32 gradients; the loss scaler's ranks agree on skipping a step that overflowed in one
shard; ``mpcompile train --nproc 2 --fsdp`` trains as DDP does and resumes bit for bit; what does
not compose is refused with an error that says why."""
from __future__ import annotations

import copy
import datetime
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import mpcompile
from mpcompile.cli import main
from mpcompile.formats import parse
from mpcompile.models import build_model
from mpcompile.policy import OptimizerSettings
from mpcompile.runtime.distributed import DataParallel
from mpcompile.runtime.optim import LowPrecisionOptimizer
from mpcompile.runtime.scaling import DynamicLossScaler
from mpcompile.runtime.trainer import TrainConfig, Trainer

POLICY, STEPS, BATCH = "fp8_e4m3", 3, 16
SETTINGS = OptimizerSettings(kind="sgd", master=parse("bf16"), momentum=parse("bf16"))


def _compiled() -> mpcompile.CompiledModel:
    torch.manual_seed(0)
    return mpcompile.compile(build_model("lenet5"), POLICY, (torch.randn(2, 1, 8, 8),))


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 1, 8, 8, generator=g), torch.randint(0, 10, (BATCH,), generator=g)) for _ in range(STEPS)]


def _optimizer(cm) -> LowPrecisionOptimizer:
    return LowPrecisionOptimizer(torch.optim.SGD(cm.parameters(), lr=0.1, momentum=0.9), SETTINGS)


def _rank(rank: int, init: str, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    said = {}
    try:
        mesh = init_device_mesh("cpu", (2,))
        cm = _compiled()
        fully_shard(cm, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
        optimizer = _optimizer(cm)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for x, y in _batches():
                optimizer.zero_grad()
                F.cross_entropy(cm(x[rank::2]), y[rank::2]).backward()
                optimizer.step()
        said["warnings"] = [str(w.message) for w in caught if "mpcompile" in str(w.message)]
        said["weights"] = {n: p.full_tensor() for n, p in cm.named_parameters()}
        said["skipped"] = [_skips(cm, overflow_on=None), _skips(cm, overflow_on=rank)]
        said["buffers"] = _broadcast_buffers(rank)
        try:
            LowPrecisionOptimizer(torch.optim.Adam(cm.parameters()), OptimizerSettings(
                kind="adam", momentum=parse("blockwise(dynamic8,256)")))
        except mpcompile.MpcompileError as err:
            said["codebook"] = str(err)
        layered = _compiled()
        fully_shard(layered.source.features[0], mesh=mesh)  # a layer as its own unit, then the model
        fully_shard(layered, mesh=mesh)
        try:
            layered(torch.randn(2, 1, 8, 8))
        except mpcompile.CompileError as err:
            said["layer"] = str(err)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        torch.save(said, out)


def _skips(cm, overflow_on: int | None) -> list[bool]:
    """Every rank's loss-scaler answer where rank ``overflow_on``'s shard alone holds an inf."""
    for p in cm.parameters():
        p.grad = torch.ones_like(p)  # a DTensor, sharded as p
    if overflow_on == dist.get_rank():
        next(p for p in cm.parameters() if p.grad.to_local().numel()).grad.to_local().view(-1)[0] = torch.inf
    answers = [None, None]
    dist.all_gather_object(answers, DynamicLossScaler().unscale_(cm.parameters()))
    return answers


def _broadcast_buffers(rank: int) -> list[list[float]]:
    """Every rank's batch-norm statistics after ``broadcast_buffers``, each rank's own before it."""
    norm = torch.nn.BatchNorm1d(3)
    norm.running_mean.fill_(rank + 1.0)
    norm.num_batches_tracked.fill_(rank + 5)
    DataParallel(rank, 2, torch.device("cpu")).broadcast_buffers(norm)
    answers = [None, None]
    dist.all_gather_object(answers, [*norm.running_mean.tolist(), float(norm.num_batches_tracked)])
    return answers


def _one_process() -> dict[str, torch.Tensor]:
    """Each rank's share on a bf16 copy of the weights (FSDP2 gathers them so), its bf16 gradient
    in fp32, the two averaged (FSDP2's reduce-scatter in reduce_dtype), the optimizer's step."""
    cm = _compiled()
    optimizer, params = _optimizer(cm), list(cm.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for x, y in _batches():
            grads = []
            for rank in range(2):
                low = copy.deepcopy(cm).to(torch.bfloat16)
                F.cross_entropy(low(x[rank::2].to(torch.bfloat16)), y[rank::2]).backward()
                grads.append([p.grad.float() for p in low.parameters()])
            for p, g0, g1 in zip(params, *grads):
                p.grad = (g0 + g1) / 2
            optimizer.step()
    return {n: p.detach() for n, p in cm.named_parameters()}


def test_fully_shard_trains_a_compiled_model_as_one_process_does(tmp_path):
    out = str(tmp_path / "said.pt")
    mp.spawn(_rank, args=(f"file://{tmp_path / 'store'}", out), nprocs=2, join=True)
    said = torch.load(out)
    expected = _one_process()
    assert said["weights"].keys() == expected.keys()
    for name, weight in said["weights"].items():
        assert torch.equal(weight, expected[name]), name
    # fp8_e4m3 keeps its GEMMs' roles within bf16 but leaves other ops in fp32: the warning says so, once
    assert len(said["warnings"]) == 1 and "the parameters are bfloat16 at this call" in said["warnings"][0]
    assert "ops the policy leaves in fp32" in said["warnings"][0]
    assert "not supported with FSDP2" in said["codebook"] and "blockwise(dynamic8,256)" in said["codebook"]
    # rank 0 alone sees an inf: both ranks skip, or rank 1 would step and wait in FSDP2's next gather
    assert said["skipped"] == [[False, False], [True, True]]
    assert said["buffers"] == [[1.0, 1.0, 1.0, 5.0]] * 2  # rank 0's, float and integer buffers both
    assert "features.0 (FSDPConv2d) is sharded as its own FSDP2 unit" in said["layer"]
    assert "fully_shard(cm, ...)" in said["layer"]


def _train(tmp_path, name: str, *extra: str) -> list[str]:
    return ["train", "--model", "lenet5", "--data", "digits", "--policy", "fp8_e4m3", "--optimizer", "adam",
            "--lr", "0.01", "--batch-size", "64", "--schedule", "constant", "--epochs", "1", "--nproc", "2",
            "--out", str(tmp_path / name), *extra]


def _checkpoint(tmp_path, name: str) -> dict:
    return torch.load(tmp_path / name / "checkpoint.pt", weights_only=False)


def _equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return type(a) is type(b) is torch.Tensor and torch.equal(a, b)  # whole tensors, not shards
    return a == b


def test_fsdp_from_the_cli_trains_as_ddp_and_resumes_bit_identically(tmp_path, monkeypatch):
    monkeypatch.setenv("MPCOMPILE_COLLECTIVE_TIMEOUT", "60")
    # fp32 parameters: FSDP2's reduce-scatter and DDP's all-reduce both halve g0 + g1 (exactly), so
    # model and Adam's states agree bit for bit; the checkpoint holds whole tensors
    assert main(_train(tmp_path, "ddp")) == 0
    assert main(_train(tmp_path, "fsdp", "--fsdp", "fp32")) == 0
    ddp, fsdp = _checkpoint(tmp_path, "ddp"), _checkpoint(tmp_path, "fsdp")
    assert _equal(ddp["model"], fsdp["model"]) and _equal(ddp["optimizer"], fsdp["optimizer"])
    assert fsdp["scaler"]["kind"] == "dynamic"  # fp8 rounds the gradients: the scaler checks the shards
    assert '"fsdp": "fp32"' in (tmp_path / "fsdp" / "summary.json").read_text()  # sharded, not DDP
    # bf16 parameters (the warning says what they change), resumed after an epoch: as one run straight through
    assert main(_train(tmp_path, "straight", "--fsdp", "--epochs", "2")) == 0
    assert main(_train(tmp_path, "split", "--fsdp")) == 0
    assert main(["train", "--resume", str(tmp_path / "split"), "--epochs", "2", "--nproc", "2"]) == 0
    straight, split = _checkpoint(tmp_path, "straight"), _checkpoint(tmp_path, "split")
    assert _equal(straight["model"], split["model"]) and _equal(straight["optimizer"], split["optimizer"])
    untimed = lambda history: [{k: v for k, v in h.items() if k != "seconds"} for h in history]  # noqa: E731
    assert untimed(straight["history"]) == untimed(split["history"]) and len(split["history"]) == 2
    assert not _equal(straight["model"], fsdp["model"])  # bf16 gathers are not fp32's
    summary = (tmp_path / "split" / "summary.json").read_text()
    assert '"fsdp": "bf16"' in summary and '"ranks": 2' in summary


def test_what_fsdp_cannot_do_is_refused_before_training(tmp_path, monkeypatch, capsys):
    assert main(["train", "--fsdp", "--epochs", "1", "--out", str(tmp_path / "one")]) == 2
    assert "this run has one process: add --nproc N (N >= 2)" in capsys.readouterr().err
    # a rank's refusals come before any collective: one process posing as rank 0 of 2 shows them
    monkeypatch.setattr(DataParallel, "from_env", classmethod(lambda cls, device: DataParallel(0, 2, device)))
    policy = "version: 1\ncommunication: {format: fp8_e5m2}\n"
    with pytest.raises(mpcompile.MpcompileError, match="under --fsdp FSDP2 reduce-scatters the gradients in fp32"):
        Trainer(TrainConfig(model="logreg", policy=policy, fsdp="bf16", out=str(tmp_path)), progress=False)
    with pytest.raises(mpcompile.MpcompileError, match="does not support a trust_region section"):
        Trainer(TrainConfig(model="logreg", policy="trust_region", fsdp="fp32", out=str(tmp_path)), progress=False)
    cm = mpcompile.compile(build_model("resnet20", in_channels=1), "fp32", (torch.randn(2, 1, 8, 8),))
    with pytest.raises(mpcompile.MpcompileError) as refused:
        DataParallel(0, 2, torch.device("cpu")).shard(cm, "bf16")
    assert "--fsdp bf16: bn1 (BatchNorm2d) and 18 more batch norms would run with bf16 weights" in str(refused.value)
    assert "use --fsdp fp32" in str(refused.value)
