"""coverage: GEMM work the model runs where no policy can reach it.

Runs the captured graph once on the example inputs (fp32, as traced) under a
``TorchDispatchMode`` that records every GEMM-like ATen call, node by node. At a node of a GEMM
kind the registry emulates, lowering puts an ``mpc::`` op wherever the policy quantizes. At any
other node (a wrapped function fx kept opaque, a leaf module, an op the registry does not know)
the GEMM work runs in fp32 whatever the policy says: such a node gets ``unemulated`` (the
compiled model then warns, or under ``strict`` refuses, where the policy would quantize it).
Classification sees the GEMM work it knows of; this sees what actually runs. It runs the traced
graph rather than the lowered one: what lowering reaches is decided by the node's kind, and an
fp32 run costs a fraction of an emulated one.

Reads: ``MpcMeta.kind``, ``unemulated`` (classify). Writes: ``unemulated``.
"""
from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..ops.registry import kind_named
from .meta import mpc_meta
from .observe import observe

__all__ = ["GEMM_ATEN", "check_coverage"]

_aten = torch.ops.aten
# what GEMM work reaches the dispatcher as: the composite ops (linear, matmul, einsum...) decompose into these
GEMM_ATEN = frozenset(getattr(_aten, name) for name in (
    "mm", "bmm", "addmm", "baddbmm", "addbmm", "addmv", "mv", "dot", "vdot", "_int_mm", "_scaled_mm",
    "convolution", "_convolution", "convolution_overrideable", "mkldnn_convolution", "cudnn_convolution",
    "cudnn_convolution_transpose", "miopen_convolution", "_slow_conv2d_forward", "slow_conv3d_forward",
    "slow_conv_transpose2d", "slow_conv_transpose3d", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_flash_attention_forward", "_efficient_attention_forward",
    "_native_multi_head_attention") if hasattr(_aten, name))


class _GemmCalls(TorchDispatchMode):
    """Counts GEMM-like ATen calls by name since the last ``take``."""

    def __init__(self):
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in GEMM_ATEN:
            self.calls[f"aten.{func.overloadpacket.__name__}"] += 1
        return func(*args, **(kwargs or {}))

    def take(self) -> Counter[str]:
        calls, self.calls = self.calls, Counter()
        return calls


def check_coverage(gm: torch.fx.GraphModule, example_inputs: tuple) -> None:
    """Record, on ``gm``'s nodes, GEMM work that no policy reaches (see the module docstring).

    Args:
        gm: the classified captured graph.
        example_inputs: its placeholders' values.
    """
    mode, found = _GemmCalls(), {}

    def after(node, args, kwargs, out):
        calls = mode.take()
        if calls:
            found.setdefault(node, Counter()).update(calls)

    with mode:
        observe(gm, [example_inputs], after)
    for node, calls in found.items():
        meta = mpc_meta(node)
        kind = kind_named(meta.kind) if meta is not None else None
        if meta is not None and meta.unemulated is None and not (kind is not None and kind.is_gemm and kind.emulated):
            ran = ", ".join(f"{op} x{n}" if n > 1 else op for op, n in sorted(calls.items()))
            meta.unemulated = f"{ran} run in fp32 inside {meta.op_type}, which lowering does not emulate"
