"""torch's Adam(W) step for parameters whose moments are codebook codes, by the fused CPU kernel.

``LowPrecisionOptimizer`` with both moments in block-wise codebook formats, packed, would decode
both runs, let torch step and encode them again (``codebook_states``). Where the step is plain
``torch.optim.Adam`` / ``AdamW`` on float32 CPU parameters, ``codegen.blockwise_adam_cpu`` does
all of it block by block instead, bit-identical, without decoding the runs; torch still steps
the parameters that keep float32 states. Anything else (another optimizer, amsgrad, foreach,
CUDA, monitoring that reads the decoded states, a parameter new to the runs) takes torch's path.
"""
from __future__ import annotations

import torch

from ...backends import run_or_fall_back
from ...codegen.blockwise_adam_cpu import AdamHyper, blockwise_adam_step, load_kernel, takes_formats
from .codebook_states import CodebookStates

__all__ = ["fused_segments", "step_fused"]

_FAILED: set[str] = set()
# group options under which torch's single-tensor step is the one the kernel mirrors
_PLAIN = {"amsgrad": False, "maximize": False, "capturable": False, "differentiable": False}


def _plain(optimizer: torch.optim.Optimizer) -> bool:
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):  # a subclass may step otherwise
        return False
    return all(all(group.get(k, v) == v for k, v in _PLAIN.items()) and not group.get("foreach")
               and not group.get("fused") and all(isinstance(x, (int, float)) for x in _numbers(group))
               for group in optimizer.param_groups)


def _numbers(group: dict) -> list:
    """The group's hyper-parameters, which the kernel takes as numbers (not tensors)."""
    return [group["lr"], group["eps"], group["weight_decay"], *group["betas"]]


def fused_segments(optimizer: torch.optim.Optimizer, runs: dict[tuple[str, torch.device], CodebookStates],
                   params: list[torch.Tensor], large: list[int]) -> list[int] | None:
    """The parameters (indices) the kernel steps now, or None where torch must step them all.

    Args:
        optimizer: the wrapped optimizer.
        runs: the packed runs, by (state name, device).
        params: the optimizer's parameters, in order.
        large: the indices (in order) of the parameters whose states are codebook codes.
    """
    m, v = runs.get(("exp_avg", torch.device("cpu"))), runs.get(("exp_avg_sq", torch.device("cpu")))
    if m is None or v is None or len(runs) != 2 or not _plain(optimizer):
        return None
    indices = [s.index for s in m.segments]
    if indices != [s.index for s in v.segments] or not takes_formats(m.fmt, v.fmt):
        return None
    stepped = [i for i in large if params[i].grad is not None]
    if not set(stepped) <= set(indices):  # a parameter new to the runs: torch starts its states
        return None
    for i in stepped:
        p, g = params[i], params[i].grad
        if not (p.dtype == g.dtype == torch.float32 and p.is_contiguous() and g.is_contiguous()
                and g.layout == torch.strided and "step" in optimizer.state.get(p, {})):
            return None
    if not run_or_fall_back(_FAILED, "kernel", lambda: load_kernel() or True, lambda: False,
                            "the fused CPU 8-bit Adam kernel"):
        return None
    return stepped


def step_fused(optimizer: torch.optim.Optimizer, runs: dict[tuple[str, torch.device], CodebookStates],
               params: list[torch.Tensor], fused: list[int]) -> None:
    """torch's step for every parameter but ``fused``, and the kernel's for those (``fused_segments``)."""
    grads = {i: params[i].grad for i in fused}
    for i in fused:  # torch skips a parameter without a gradient
        params[i].grad = None
    try:
        optimizer.step()
    finally:
        for i, g in grads.items():
            params[i].grad = g
    groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    m, v = runs["exp_avg", torch.device("cpu")], runs["exp_avg_sq", torch.device("cpu")]
    m_segments, v_segments = {s.index: s for s in m.segments}, {s.index: s for s in v.segments}
    for i in fused:
        p, group, state = params[i], groups[id(params[i])], optimizer.state[params[i]]
        state["step"] += 1
        beta1, beta2 = group["betas"]
        hyper = AdamHyper(group["lr"], beta1, beta2, group["eps"], group["weight_decay"],
                          group.get("decoupled_weight_decay", type(optimizer) is torch.optim.AdamW),
                          state["step"].item())
        (m_codes, m_blocks), (v_codes, v_blocks) = m.ranges(m_segments[i]), v.ranges(v_segments[i])
        blockwise_adam_step(p.data, grads[i], (m.codes[m_codes], m.absmax[m_blocks]),
                            (v.codes[v_codes], v.absmax[v_blocks]), m.fmt, v.fmt, hyper)
