"""Checkpoints of a model sharded by FSDP2: whole tensors in the file, shards in the processes.

A checkpoint holds every tensor whole, as one process holds it (``full_tensors``, a collective
that every rank calls in the same order), so the file reads the same whatever sharded it. On
resume each rank takes its own shard of a whole tensor (``shard_like``) without communicating:
every rank reads the same file.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

__all__ = ["full_tensors", "shard_like", "shard_states_like_params"]


def full_tensors(state: Any) -> Any:
    """``state`` (dicts, lists, tuples of tensors and values) with every DTensor gathered whole."""
    if isinstance(state, DTensor):
        return state.full_tensor()
    if isinstance(state, dict):
        return {k: full_tensors(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(full_tensors(v) for v in state)
    return state


def shard_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's shard of the whole tensor ``value``, placed as ``like`` is (``value`` itself
    where ``like`` is not a DTensor, or ``value`` already is one)."""
    if not isinstance(like, DTensor) or isinstance(value, DTensor):
        return value
    if value.shape != like.shape:
        raise ValueError(f"a saved tensor of shape {tuple(value.shape)} cannot be sharded as one of shape "
                         f"{tuple(like.shape)}")
    return distribute_tensor(value.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def shard_states_like_params(optimizer: torch.optim.Optimizer) -> None:
    """A torch optimizer's per-parameter states, loaded whole from a checkpoint, sharded as their
    parameters are (a state of another shape, a step count say, stays as it is)."""
    for param, state in optimizer.state.items():
        if isinstance(param, DTensor):
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    state[key] = shard_like(value, param)
