"""classify: what each call node is, in the terms policies select on, from the op registry.

Reads: nothing. Writes on every call node's ``MpcMeta``: ``op_type``, ``name``, ``group``,
``kind``, ``gemm_index``, ``gemm_count``, ``roles``; and ``unemulated`` where GEMM work runs in
fp32 whatever the policy says (a kind the registry does not emulate, a call of a GEMM-like kind
it refuses, a module torch.fx keeps whole with GEMM-like layers inside), so the compiler can
say so.
"""
from __future__ import annotations

import torch

from ..ops.registry import Call, OpKind, gemm_module_types, lookup, module_kind
from .meta import meta_of

__all__ = ["classify", "op_type", "owner"]

_CALLS = ("call_module", "call_function", "call_method")


def op_type(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str:
    """What a node calls: module class name (``Conv2d``), function or op name (``relu``, ``linear``)."""
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if isinstance(node.target, torch._ops.OpOverload):  # aten.linear.default: "linear", as fx names F.linear
        return node.target.overloadpacket.__name__
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return node.target


def owner(node: torch.fx.Node) -> tuple[str, str] | None:
    """(qualified name, class as ``module.qualname``) of the module whose forward made the node."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, cls = next(reversed(stack.values()))
    return path, cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"


def _module_ops(kinds: dict[torch.fx.Node, OpKind | None]) -> dict[torch.fx.Node, tuple[str, str]]:
    """Nodes that stand for a whole torch.nn module: in an ATen graph, a module fx keeps whole
    (Linear, LayerNorm...) becomes the one op of its own kind inside it. Such a node is named and
    typed as the module (``fc``, ``Linear``), as fx names it, so one policy fits both graphs."""
    found: dict[tuple[str, str], list[torch.fx.Node]] = {}
    for node, kind in kinds.items():
        module = owner(node) if node.op == "call_function" and kind is not None else None
        if module is not None and module_kind(module[1]) is not None and module_kind(module[1]).group == kind.group:
            found.setdefault(module, []).append(node)
    return {nodes[0]: (path, cls.rpartition(".")[2]) for (path, cls), nodes in found.items() if len(nodes) == 1}


def _qualified_name(node: torch.fx.Node) -> str:
    """A module's qualified name; for a function, the module whose forward called it plus the node's name."""
    if node.op == "call_module":
        return node.target
    module = owner(node)
    return f"{module[0]}.{node.name}" if module and module[0] else node.name


def classify(gm: torch.fx.GraphModule) -> None:
    """Record what every call node is (see the module docstring).

    Args:
        gm: the captured model.
    """
    calls = [n for n in gm.graph.nodes if n.op in _CALLS]
    kinds: dict[torch.fx.Node, OpKind | None] = {}
    refused: dict[torch.fx.Node, str] = {}
    for node in calls:
        kind = lookup(gm, node)
        why = kind.refuses(Call(gm, node, node.args, node.kwargs)) if kind is not None and kind.refuses else None
        if why is not None:
            refused[node], kind = why, None
        kinds[node] = kind
    gemms = [n for n in calls if kinds[n] is not None and kinds[n].is_gemm]
    modules = _module_ops(kinds)
    for node in calls:
        kind, meta = kinds[node], meta_of(node)
        meta.name, meta.op_type = modules.get(node) or (_qualified_name(node), op_type(gm, node))
        meta.kind, meta.group = (kind.name, kind.group) if kind is not None else (None, None)
        meta.gemm_index = gemms.index(node) if node in gemms else None
        meta.gemm_count = len(gemms)
        meta.roles = kind.roles_of(Call(gm, node, node.args, node.kwargs)) if kind is not None else ("input", "output")
        meta.unemulated = refused.get(node) or _unemulated(gm, node, kind)


def _unemulated(gm: torch.fx.GraphModule, node: torch.fx.Node, kind: OpKind | None) -> str | None:
    """Why the node is GEMM work that runs in fp32 (None: it is not GEMM work, or it is emulated)."""
    if kind is not None and not kind.emulated:
        return (f"{type(gm.get_submodule(node.target)).__name__} is not emulated" if node.op == "call_module" else
                f"Tensor.{node.target} is not emulated" if node.op == "call_method" else
                f"{op_type(gm, node)} is not emulated")
    if node.op != "call_module" or (kind is not None and kind.is_gemm):
        return None
    inside = [name for name, m in gm.get_submodule(node.target).named_modules()
              if name and isinstance(m, gemm_module_types())]
    if not inside:
        return None
    more = f" and {len(inside) - 3} more" if len(inside) > 3 else ""
    return (f"torch.fx keeps {op_type(gm, node)} whole (a torch.nn module or a leaf module), so the GEMM-like "
            f"layers inside it ({', '.join(inside[:3])}{more}) are not emulated")
