"""This process's place in a data-parallel run, and the model wrapped for it (torch's DDP).

A run under torchrun (or ``mpcompile train --nproc N``) has ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` in its environment; ``DataParallel.from_env`` joins the process group (gloo on
the CPU, nccl on CUDA) with a timeout on every collective, so a rank that dies ends the others
instead of hanging them. Every rank sees every global batch and trains on its strided share of
it (examples rank, rank + world, ..., as torch's DistributedSampler deals them), its mean loss
weighted by its share of the batch: DDP's average of the ranks' gradients is then the gradient
of the global batch's mean loss, also for an uneven last batch.

Sharded (``shard``, ``mpcompile train --fsdp``), the model is one FSDP2 unit instead of under
DDP: each rank keeps a shard of every parameter, gathered (in ``param_dtype``) around each
forward and backward, and FSDP2 reduce-scatters the gradients in fp32, which averages them as
DDP does. FSDP2 leaves buffers to each rank; ``broadcast_buffers`` sends rank 0's before each
training forward, as DDP does, so both train the same model.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ...errors import MpcompileError
from ...policy import CommunicationSettings
from .comm_hook import QuantizedGradients, Traffic, quantized_allreduce_hook

__all__ = ["DataParallel", "TIMEOUT", "PARAM_DTYPES"]

TIMEOUT = datetime.timedelta(seconds=float(os.environ.get("MPCOMPILE_COLLECTIVE_TIMEOUT", 300)))
# --fsdp's choices: the dtype FSDP2 gathers the parameters in (None: as they are, fp32)
PARAM_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class DataParallel:
    """One rank of a data-parallel run.

    Attributes:
        rank, world: this process's rank and the number of ranks.
        device: the device it trains on (``cuda:LOCAL_RANK`` on CUDA).
        hook: the communication hook's state, where gradients travel in a format.
        sharded: the model is sharded by FSDP2 (``shard``), not under DDP.
        owns_group: ``from_env`` joined the process group, so ``close`` ends it.
    """

    rank: int
    world: int
    device: torch.device
    hook: QuantizedGradients | None = None
    sharded: bool = False
    owns_group: bool = False

    @classmethod
    def from_env(cls, device: torch.device) -> "DataParallel | None":
        """The run torchrun's environment describes (joining its process group), or None for one process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        owns = not dist.is_initialized()
        if owns:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
        return cls(dist.get_rank(), dist.get_world_size(), device, owns_group=owns)

    def close(self) -> None:
        """Leave the process group ``from_env`` joined, once every rank is done with it: a group
        left to the interpreter's exit can abort a rank while another still tears its own down."""
        if self.owns_group and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
            self.owns_group = False

    @property
    def leader(self) -> bool:
        """Rank 0: the one that writes the run folder and shows progress."""
        return self.rank == 0

    def wrap(self, model: nn.Module, communication: CommunicationSettings | None, seed: int) -> nn.Module:
        """``model`` under DDP; gradients sent in ``communication``'s format where it has one."""
        ddp = DistributedDataParallel(model, device_ids=[self.device] if self.device.type == "cuda" else None)
        if communication is not None:
            self.hook = QuantizedGradients(communication, list(model.parameters()), seed)
            ddp.register_comm_hook(self.hook, quantized_allreduce_hook)
        return ddp

    def shard(self, model: nn.Module, param_dtype: str) -> None:
        """Shard ``model`` in place as one FSDP2 unit: parameters gathered in ``param_dtype`` (a
        key of ``PARAM_DTYPES``), gradients reduce-scattered in fp32, outputs in fp32 (the loss is
        computed outside the policy's formats).

        Raises:
            MpcompileError: a batch norm this device cannot run with its weights in ``param_dtype``
                and its running statistics as they are (FSDP2 casts parameters, not buffers).
        """
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        dtype = PARAM_DTYPES[param_dtype]
        if dtype is not None:
            _check_batch_norms(model, param_dtype, self.device)
        mesh = init_device_mesh(self.device.type, (self.world,))
        fully_shard(model, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32,
                                                                     output_dtype=torch.float32))
        self.sharded = True

    @torch.no_grad()
    def broadcast_buffers(self, model: nn.Module) -> None:
        """Rank 0's buffers (batch-norm statistics) on every rank, one broadcast per dtype."""
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for b in model.buffers():
            by_dtype.setdefault(b.dtype, []).append(b)
        for buffers in by_dtype.values():
            flat = torch.cat([b.reshape(-1) for b in buffers])
            dist.broadcast(flat, src=0)
            for b, part in zip(buffers, flat.split([b.numel() for b in buffers])):
                b.copy_(part.view_as(b))

    def share(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """This rank's examples of a global batch, and the weight of their mean loss."""
        local_x, local_y = x[self.rank::self.world], y[self.rank::self.world]
        return local_x, local_y, len(local_y) * self.world / len(y)

    def total(self, *values: float) -> list[float]:
        """Each value summed over the ranks."""
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def traffic(self) -> Traffic | None:
        """The bytes this rank sent since the last call (None where gradients travel in fp32)."""
        return self.hook.traffic.reset() if self.hook is not None else None

    def gather(self, state: object) -> list[object]:
        """Every rank's ``state``, in rank order."""
        out: list[object] = [None] * self.world
        dist.all_gather_object(out, state)
        return out


def _check_batch_norms(model: nn.Module, param_dtype: str, device: torch.device) -> None:
    """Refuse batch norms that ``device`` cannot run with ``param_dtype`` weights and running
    statistics in their buffers' dtype (torch's CPU kernel takes neither bf16 weights with fp32
    statistics nor the reverse): asked of torch once, on a tiny input."""
    dtype = PARAM_DTYPES[param_dtype]
    norms = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and m.running_mean is not None]
    if not norms:
        return
    name, norm = norms[0]
    stats = norm.running_mean.dtype
    try:
        F.batch_norm(torch.zeros(2, 1, device=device, dtype=dtype), torch.zeros(1, device=device, dtype=stats),
                     torch.ones(1, device=device, dtype=stats), torch.ones(1, device=device, dtype=dtype),
                     torch.zeros(1, device=device, dtype=dtype), training=True)
    except RuntimeError as err:
        more = f" and {len(norms) - 1} more batch norms" if len(norms) > 1 else ""
        raise MpcompileError(f"--fsdp {param_dtype}: {name} ({type(norm).__name__}){more} would run with "
                             f"{param_dtype} weights (FSDP2 casts parameters) and "
                             f"{str(stats).removeprefix('torch.')} running statistics (it does not cast buffers), "
                             f"which torch's {device.type} batch norm does not take ({err}); use --fsdp fp32") from None
