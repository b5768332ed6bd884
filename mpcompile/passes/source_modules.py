"""Make a lowered graph read its parameters through the source model's own modules.

``torch.fx.GraphModule`` copies each ``get_attr`` target (``features.0.weight``) onto a new,
empty holder module, so the graph keeps the tensor it was built with. A wrapper that swaps a
module's parameter between calls, as FSDP2 does (a sharded DTensor between steps, the gathered
tensor during forward and backward), would then go unseen: the graph trains on stale weights.
``bind_source_modules`` puts the source's module in place of each holder that holds nothing but
that module's own parameters, buffers and children, so ``getattr(self.features, "0").weight``
reads ``source.features[0]``'s current attribute; what the graph computes is unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["bind_source_modules", "stale_reads"]


def bind_source_modules(gm: torch.fx.GraphModule, source: nn.Module) -> None:
    """Replace ``gm``'s holder modules of ``get_attr`` targets by the source's modules of the same
    path wherever that is the same thing (every tensor and child the holder has is the source
    module's, by identity). Holders that differ (a capture that renamed or copied tensors) stay.

    Args:
        gm: the lowered graph module (changed in place).
        source: the model it was captured from.
    """
    for path in sorted({n.target.rpartition(".")[0] for n in gm.graph.nodes if n.op == "get_attr"} - {""}):
        holder, real = _module_at(gm, path), _module_at(source, path)
        if holder is None or real is None or holder is real or not _same_contents(holder, real):
            continue
        parent, _, name = path.rpartition(".")
        _module_at(gm, parent)._modules[name] = real


def stale_reads(gm: torch.fx.GraphModule, source: nn.Module) -> list[str]:
    """The ``get_attr`` targets that read one of ``source``'s parameters through a module that is
    not the parameter's owner in ``source``: reads a parameter swap would not reach."""
    owners: dict[int, list[nn.Module]] = {}  # a tied parameter has several
    for m in source.modules():
        for p in m._parameters.values():
            if p is not None:
                owners.setdefault(id(p), []).append(m)
    stale = []
    for node in (n for n in gm.graph.nodes if n.op == "get_attr"):
        path, _, field = node.target.rpartition(".")
        holder = _module_at(gm, path)
        value = None if holder is None else holder._parameters.get(field)
        if value is not None and id(value) in owners and not any(m is holder for m in owners[id(value)]):
            stale.append(node.target)
    return stale


def _module_at(root: nn.Module, path: str) -> nn.Module | None:
    module = root
    for name in path.split(".") if path else ():
        module = module._modules.get(name)
        if module is None:
            return None
    return module


def _same_contents(holder: nn.Module, real: nn.Module) -> bool:
    return all(name in store_real and store_real[name] is value
               for store, store_real in ((holder._parameters, real._parameters), (holder._buffers, real._buffers),
                                         (holder._modules, real._modules))
               for name, value in store.items())
