"""Data-parallel training with real processes: 2 gloo ranks on loopback, spawned by the test,
every collective under a timeout (MPCOMPILE_COLLECTIVE_TIMEOUT), every process ended by it.

- 2 ranks with fp32 gradients train as one process on the same global batches. Tolerance:
  DDP averages (g0 + g1) / 2 in fp32 where one process computes the mean over the whole batch
  in one reduction; the two differ by fp32 rounding (~1e-7 relative) per step, summed over the
  steps, so the weights agree to 1e-5.
- The hook in bf16 / fp8 / MX, with error feedback and shared block scales, equals a one-process
  emulation that rounds each rank's gradient (the same scale, format and rounding) and averages
  in fp32, bit for bit, also on MX's edge blocks (zero, subnormal, infinite, NaN); stochastic
  rounding is reproducible from the seed, per rank.
- A rank that raises ends the job, with its error reported by the launcher, and no hang.
"""
from __future__ import annotations

import json
import os
import re

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from mpcompile.cli import main
from mpcompile.formats import BlockFormat, parse
from mpcompile.policy import CommunicationSettings
from mpcompile.rounding import quantize
from mpcompile.runtime.distributed import DataParallel, QuantizedGradients, quantized_allreduce_hook

TIMEOUT_S = "60"
X, Y = torch.randn(24, 16, generator=torch.Generator().manual_seed(1)), torch.arange(24) % 4


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def _ranks(rank: int, world: int, init: str, settings: CommunicationSettings, out: str, steps: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1")
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=__import__("datetime").timedelta(seconds=float(TIMEOUT_S)))
    try:
        parallel = DataParallel(rank, world, torch.device("cpu"))
        net = _net()
        ddp = parallel.wrap(net, settings, seed=3)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        for _ in range(steps):
            x, y, weight = parallel.share(X, Y)
            opt.zero_grad()
            (F.cross_entropy(ddp(x), y) * weight).backward()
            opt.step()
        if rank == 0:
            torch.save({"params": [p.detach() for p in net.parameters()],
                        "traffic": parallel.traffic()}, out)
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, settings, steps=3, name="out.pt"):
    out = str(tmp_path / name)
    init = f"file://{tmp_path / (name + '.store')}"
    mp.spawn(_ranks, args=(2, init, settings, out, steps), nprocs=2, join=True)
    return torch.load(out, weights_only=False)


def _emulated(settings: CommunicationSettings, steps: int = 3) -> list[torch.Tensor]:
    """One process: each rank's gradient (its share, weighted) rounded as the hook rounds it (with
    its residual from the last step, under error feedback), averaged."""
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    fmt, unit = settings.format, settings.block_size
    residuals: dict[tuple[int, int], torch.Tensor] = {}
    for _ in range(steps):
        grads = []
        for rank in range(2):
            x, y = X[rank::2], Y[rank::2]
            net.zero_grad()
            (F.cross_entropy(net(x), y) * (len(y) * 2 / len(Y))).backward()
            grads.append([p.grad.reshape(-1) + residuals.get((rank, i), 0) for i, p in enumerate(net.parameters())])
        for i, p in enumerate(net.parameters()):
            rounded = []
            for rank, g in enumerate(gs[i] for gs in grads):
                if isinstance(fmt, BlockFormat):  # MX: its own blocks, from each parameter's first element
                    flat = F.pad(g, (0, -g.numel() % fmt.block_size))
                    rounded.append(quantize(flat, fmt, "nearest", saturate=True)[:g.numel()])
                    continue
                if settings.scaling == "block":  # a scale per block of the parameter, the ranks' largest amax
                    amax = torch.stack([F.pad(gs[i], (0, -g.numel() % unit)).view(-1, unit).abs().amax(1)
                                        for gs in grads]).amax(0)
                    scale = torch.exp2(torch.ceil(torch.log2(amax / fmt.max))).repeat_interleave(unit)[:g.numel()]
                else:  # one per parameter and rank
                    scale = torch.exp2(torch.ceil(torch.log2(g.abs().amax() / fmt.max)))
                rounded.append(quantize(g / scale, fmt, "nearest", saturate=True) * scale)
                if settings.error_feedback:
                    residuals[rank, i] = g - rounded[-1]
            p.grad = ((rounded[0] + rounded[1]) / 2).view_as(p)
        opt.step()
    return [p.detach() for p in net.parameters()]


@pytest.fixture(autouse=True)
def _timeout(monkeypatch):
    monkeypatch.setenv("MPCOMPILE_COLLECTIVE_TIMEOUT", TIMEOUT_S)


@pytest.mark.parametrize("fmt", ["bf16", "fp8_e5m2", "e3m2", "mxfp8_e4m3"])
def test_the_hook_equals_rounding_each_ranks_gradient_then_averaging(tmp_path, fmt):
    settings = CommunicationSettings(format=parse(fmt), scaling="none" if fmt.startswith("mx") else "tensor")
    got = _spawn(tmp_path, settings)
    for a, b in zip(got["params"], _emulated(settings)):
        assert torch.equal(a, b)
    params, element = list(_net().parameters()), parse(fmt)
    numel = sum(p.numel() for p in params)
    if isinstance(element, BlockFormat):  # each parameter padded to blocks of 32: a code byte each, a scale byte a block
        blocks = sum(-(-p.numel() // 32) for p in params)
        sent = nominal = 33 * blocks
    else:  # codes (a byte each, two above 8 bits), and an int8 scale exponent per parameter tensor
        sent = numel * (1 if element.bits <= 8 else 2) + len(params)
        nominal = -(-numel * element.bits // 8) + len(params)
    traffic = got["traffic"]  # of 3 steps
    assert (traffic.sent, traffic.nominal, traffic.fp32) == (3 * sent, 3 * nominal, 3 * 4 * numel)


@pytest.mark.parametrize("settings", [
    CommunicationSettings(format=parse("fp8_e5m2"), error_feedback=True),
    CommunicationSettings(format=parse("e3m2"), error_feedback=True),
    CommunicationSettings(format=parse("fp8_e4m3"), scaling="block", block_size=32, shared_scale=True)],
    ids=["fp8_e5m2 error feedback", "e3m2 error feedback", "fp8_e4m3 block(32) shared"])
def test_error_feedback_and_shared_block_scales_equal_their_one_process_emulation(tmp_path, settings):
    got = _spawn(tmp_path, settings)
    for a, b in zip(got["params"], _emulated(settings)):
        assert torch.equal(a, b)


def _edge_bucket(rank: int) -> torch.Tensor:
    """Blocks of 32 that test MX's scale rule: zeros, a subnormal amax, fp32's largest values, an
    infinity, a NaN, a value at the element's max times a power of two, and normal values."""
    g = torch.Generator().manual_seed(rank)
    blocks = [torch.zeros(32), torch.full((32,), 1e-40) * torch.rand(32, generator=g),
              torch.full((32,), 3e38) * torch.rand(32, generator=g), torch.tensor([float("inf")] + [1.0] * 31),
              torch.tensor([float("nan")] + [1.0] * 31), torch.tensor([57344.0 * 2**-20] * 32),
              torch.randn(32 * 4, generator=g) * 10.0 ** (rank - 3)]
    return torch.cat(blocks)


class _OneParameterBucket:
    def __init__(self, buffer: torch.Tensor, param: nn.Parameter):
        self._buffer, self._param = buffer, param

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def parameters(self) -> list[nn.Parameter]:
        return [self._param]


def _hook_ranks(rank: int, init: str, fmt: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2,
                            timeout=__import__("datetime").timedelta(seconds=float(TIMEOUT_S)))
    try:
        bucket = _edge_bucket(rank)
        param = nn.Parameter(torch.empty_like(bucket))
        state = QuantizedGradients(CommunicationSettings(format=parse(fmt), scaling="none"), [param])
        mean = quantized_allreduce_hook(state, _OneParameterBucket(bucket, param)).wait()
        if rank == 0:
            torch.save(mean, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("fmt", ["mxfp8_e5m2", "mxfp8_e4m3"])
def test_mx_blocks_at_the_edges_of_the_scale_rule_equal_quantize(tmp_path, fmt):
    out = str(tmp_path / "mean.pt")
    mp.spawn(_hook_ranks, args=(f"file://{tmp_path / 'store'}", fmt, out), nprocs=2, join=True)
    q0, q1 = (quantize(_edge_bucket(r), parse(fmt), "nearest", saturate=True) for r in range(2))
    expected, got = (q0 + q1) / 2, torch.load(out)
    assert torch.equal(got.isnan(), expected.isnan()) and bool(got.isnan()[32 * 4])
    assert torch.equal(got.nan_to_num(), expected.nan_to_num())


def test_stochastic_rounding_and_error_feedback_are_reproducible_per_rank(tmp_path):
    settings = CommunicationSettings(format=parse("fp8_e5m2"), rounding="stochastic", error_feedback=True,
                                     scaling="block", block_size=32, shared_scale=True)
    first, again = _spawn(tmp_path, settings, name="a.pt"), _spawn(tmp_path, settings, name="b.pt")
    assert all(torch.equal(a, b) for a, b in zip(first["params"], again["params"]))
    nearest = _spawn(tmp_path, CommunicationSettings(format=parse("fp8_e5m2")), name="c.pt")
    assert not all(torch.equal(a, b) for a, b in zip(first["params"], nearest["params"]))


def _train(tmp_path, name, policy, *extra, model="logreg"):
    return ["train", "--model", model, "--data", "digits", "--policy", policy, "--epochs", "1",
            "--batch-size", "64", "--schedule", "constant", "--out", str(tmp_path / name), *extra]


def test_two_ranks_in_fp32_train_as_one_process_and_resume_bit_identically(tmp_path, capsys):
    policy = tmp_path / "p.yaml"
    policy.write_text("version: 1\ndefault: {input: 'fp8_e4m3:tensor_delayed:sat', weight: fp8_e4m3}\n"
                      "communication: {format: fp8_e5m2, rounding: stochastic, error_feedback: true}\n")
    assert main(_train(tmp_path, "one", "fp32")) == 0
    assert main(_train(tmp_path, "two", "fp32", "--nproc", "2")) == 0
    one = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=False)["model"]
    two = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.allclose(one[k], two[k], rtol=0, atol=1e-5) for k in one)
    # a quantized run resumed equals one run straight through, on every rank (residuals, generators,
    # the amax histories of its delayed scaling)
    assert main(_train(tmp_path, "straight", str(policy), "--nproc", "2", "--epochs", "2", model="mlp")) == 0
    assert main(_train(tmp_path, "split", str(policy), "--nproc", "2", model="mlp")) == 0
    assert main(["train", "--resume", str(tmp_path / "split"), "--epochs", "2", "--nproc", "2"]) == 0
    straight = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    split = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)
    assert all(torch.equal(straight["model"][k], split["model"][k]) for k in straight["model"])
    assert len(split["comm"]) == 2 and split["comm"][1]["residuals"]
    # each rank's amax histories are of its own activations, and resume gives each its own back
    assert len(split["graph"]) == 2 and not all(torch.equal(split["graph"][0][k], split["graph"][1][k])
                                                for k in split["graph"][0])
    assert all(torch.equal(a[k], b[k]) for a, b in zip(straight["graph"], split["graph"]) for k in a)
    assert main(["train", "--resume", str(tmp_path / "split"), "--epochs", "3"]) == 2  # one process, not 2 ranks
    assert "the run was saved by 2 rank(s) and this one has 1; resume it with --nproc 2" in capsys.readouterr().err
    steps = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    sent = [s["comm_bytes_sent"] for s in steps if "step" in s]
    assert sent and all(b == sent[0] for b in sent) and sent[0] == steps[0]["comm_bytes_fp32"] // 4 + len(straight["model"])  # + a scale a tensor


def failing_on_rank_1(num_classes: int = 10) -> nn.Module:
    """A model factory that raises on rank 1, as a bug on one machine would."""
    if os.environ.get("RANK") == "1":
        raise RuntimeError("rank 1 cannot build its model")
    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))


def test_a_rank_that_raises_ends_the_job_with_its_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.path.dirname(__file__))  # each rank imports the factory's module
    args = _train(tmp_path, "fail", "fp32", "--nproc", "2")
    args[args.index("logreg")] = "test_data_parallel:failing_on_rank_1"
    assert main(args) == 2
    assert "rank 1 of 2 failed: RuntimeError: rank 1 cannot build its model" in capsys.readouterr().err


def test_a_one_process_run_says_its_communication_section_is_not_read(tmp_path):
    from mpcompile.runtime.trainer import TrainConfig, Trainer

    policy = "version: 1\ncommunication: {format: fp8_e5m2}\n"
    with pytest.warns(UserWarning, match="communication section .* is read by data-parallel runs only"):
        Trainer(TrainConfig(model="logreg", data="digits", policy=policy, out=str(tmp_path)), progress=False)


def test_what_data_parallel_training_does_not_do_is_refused_on_every_rank(tmp_path, capfd):
    assert main(_train(tmp_path, "monitored", "fp32", "--nproc", "2", "--monitor", "5")) == 2
    err = capfd.readouterr().err
    # every rank refuses: the launcher reports whichever failed first
    assert re.search(r"rank [01] of 2 failed", err) and "data-parallel training (2 ranks) does not support monitoring" in err
