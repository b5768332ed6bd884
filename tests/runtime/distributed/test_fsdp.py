"""FSDP2 and a compiled model: refused with an error, not trained on stale weights (2 gloo ranks,
spawned by the test, collectives under a timeout)."""
from __future__ import annotations

import datetime

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank(rank: int, init: str, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    import mpcompile
    from mpcompile.models import build_model

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    said = []
    try:
        mesh = init_device_mesh("cpu", (2,))
        whole = mpcompile.compile(build_model("lenet5"), "bf16", (torch.randn(2, 1, 8, 8),))
        try:
            fully_shard(whole, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                                        reduce_dtype=torch.float32))
        except mpcompile.CompileError as err:
            said.append(str(err))
        layer = mpcompile.compile(build_model("lenet5"), "bf16", (torch.randn(2, 1, 8, 8),))
        fully_shard(next(layer.source.children()), mesh=mesh)  # one layer sharded, the model compiled
        try:
            layer(torch.randn(2, 1, 8, 8))
        except mpcompile.CompileError as err:
            said.append(str(err))
    finally:
        dist.destroy_process_group()
    if rank == 0:
        torch.save(said, out)


def test_fully_shard_of_a_compiled_model_is_refused(tmp_path):
    out = str(tmp_path / "said.pt")
    mp.spawn(_rank, args=(f"file://{tmp_path / 'store'}", out), nprocs=2, join=True)
    said = torch.load(out)
    assert len(said) == 2 and all(s.startswith("FSDP2 (fully_shard) does not compose with a CompiledModel") for s in said)
