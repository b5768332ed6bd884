"""This process's place in a data-parallel run, and the model wrapped for it (torch's DDP).

A run under torchrun (or ``mpcompile train --nproc N``) has ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` in its environment; ``DataParallel.from_env`` joins the process group (gloo on
the CPU, nccl on CUDA) with a timeout on every collective, so a rank that dies ends the others
instead of hanging them. Every rank sees every global batch and trains on its strided share of
it (examples rank, rank + world, ..., as torch's DistributedSampler deals them), its mean loss
weighted by its share of the batch: DDP's average of the ranks' gradients is then the gradient
of the global batch's mean loss, also for an uneven last batch.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ...policy import CommunicationSettings
from .comm_hook import QuantizedGradients, Traffic, quantized_allreduce_hook

__all__ = ["DataParallel", "TIMEOUT"]

TIMEOUT = datetime.timedelta(seconds=float(os.environ.get("MPCOMPILE_COLLECTIVE_TIMEOUT", 300)))


@dataclass
class DataParallel:
    """One rank of a data-parallel run.

    Attributes:
        rank, world: this process's rank and the number of ranks.
        device: the device it trains on (``cuda:LOCAL_RANK`` on CUDA).
        hook: the communication hook's state, where gradients travel in a format.
    """

    rank: int
    world: int
    device: torch.device
    hook: QuantizedGradients | None = None

    @classmethod
    def from_env(cls, device: torch.device) -> "DataParallel | None":
        """The run torchrun's environment describes (joining its process group), or None for one process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
        return cls(dist.get_rank(), dist.get_world_size(), device)

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
