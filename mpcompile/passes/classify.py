"""classify: what each node is, in the terms policies select on.

Reads: nothing. Writes: ``meta["mpc"]["facts"]`` (a ``NodeFacts``) and ``["roles"]`` (the
tensor roles the node has, which lowering can quantize) for every call node and, for GEMM-like
nodes, ``meta["mpc"]["gemm"]``: ``linear``, ``conv1d``/``conv2d``/``conv3d``, ``matmul``,
``einsum`` (two operands that ``ops.einsum_plan`` lays out as a matrix product), ``attention``
(an ``nn.MultiheadAttention``: four GEMMs under one assignment) or ``sdpa``
(``F.scaled_dot_product_attention``: two). GEMM-like ops have every role; norms ``input``,
``output`` and the ``weight`` / ``bias`` they have; other ops ``input`` and ``output``. GEMM
work that is not emulated (a transposed conv, an RNN, another ``einsum``, a torch.nn module
torch.fx keeps whole with Linear layers inside) gets ``meta["mpc"]["unemulated"]``: why it
runs in fp32, so that the compiler can say so.
"""
from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.einsum import einsum_plan
from ..ops.spec import ROLES
from ..policy import NodeFacts

__all__ = ["classify", "einsum_operands", "GEMM_KINDS", "ATTENTION_KINDS", "NORM_PARAMS"]

GEMM_KINDS = ("linear", "conv1d", "conv2d", "conv3d", "matmul", "einsum", "attention", "sdpa")
ATTENTION_KINDS = ("attention", "sdpa")  # several GEMMs and a softmax under one assignment
_GEMM_MODULES = {nn.Linear: "linear", nn.Conv1d: "conv1d", nn.Conv2d: "conv2d", nn.Conv3d: "conv3d",
                 nn.MultiheadAttention: "attention"}
_GEMM_FUNCTIONS = {F.linear: "linear", F.conv1d: "conv1d", F.conv2d: "conv2d", F.conv3d: "conv3d",
                   torch.matmul: "matmul", torch.mm: "matmul", torch.bmm: "matmul", operator.matmul: "matmul",
                   F.scaled_dot_product_attention: "sdpa"}
_GEMM_METHODS = {"matmul": "matmul", "mm": "matmul", "bmm": "matmul"}
# GEMM-like work that lowering does not emulate: it runs in fp32 whatever the policy says.
_UNEMULATED_MODULES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.RNNBase, nn.RNNCellBase,
                       nn.Bilinear)
_UNEMULATED_FUNCTIONS = (torch.addmm, torch.baddbmm, torch.addbmm, torch.addmv, torch.addr, torch.mv, torch.dot,
                         torch.inner, torch.outer, torch.einsum, torch.tensordot, torch.linalg.multi_dot,
                         torch.chain_matmul, F.bilinear, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)
_UNEMULATED_METHODS = ("addmm", "baddbmm", "addbmm", "addmv", "addr", "mv", "dot", "inner", "outer")
_GROUPS = {
    "activation": (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
                   nn.LeakyReLU, nn.ELU, nn.Softmax, F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid,
                   F.leaky_relu, F.elu, F.softmax, torch.relu, torch.sigmoid, torch.tanh, torch.softmax,
                   "relu", "sigmoid", "tanh", "softmax", "gelu"),
    "norm": (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm,
             nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LocalResponseNorm, F.batch_norm,
             F.layer_norm, F.group_norm, F.rms_norm, F.instance_norm, F.local_response_norm),
    "pool": (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
             nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, F.max_pool2d, F.avg_pool2d,
             F.adaptive_avg_pool2d, "mean"),
    "elementwise": (operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul,
                    torch.div, "add", "sub", "mul", "div", "add_", "mul_"),
}

# Where a functional norm takes its affine parameters (the modules hold them as .weight / .bias).
NORM_PARAMS = {F.batch_norm: {"weight": 3, "bias": 4}, F.instance_norm: {"weight": 3, "bias": 4},
               F.layer_norm: {"weight": 2, "bias": 3}, F.group_norm: {"weight": 2, "bias": 3},
               F.rms_norm: {"weight": 2}}


def _target(gm: torch.fx.GraphModule, node: torch.fx.Node):
    """(what the node calls, its op type name, its qualified name)."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return type(module), type(module).__name__, node.target
    if node.op == "call_function":
        return node.target, getattr(node.target, "__name__", str(node.target)), _module_of(node)
    return node.target, node.target, _module_of(node)


def _module_of(node: torch.fx.Node) -> str:
    """A function node's qualified name: the module whose forward called it, plus the node's name."""
    stack = node.meta.get("nn_module_stack")
    owner = next(reversed(stack.values()))[0] if stack else ""
    return f"{owner}.{node.name}" if owner else node.name


def classify(gm: torch.fx.GraphModule) -> None:
    """Record ``NodeFacts`` (op type, group, qualified name, GEMM position) on every call node."""
    calls = [n for n in gm.graph.nodes if n.op in ("call_module", "call_function", "call_method")]
    kinds = {}
    for node in calls:
        target, _, _ = _target(gm, node)
        kind = (next((_GEMM_MODULES[c] for c in target.__mro__ if c in _GEMM_MODULES), None)
                if node.op == "call_module" else
                _GEMM_METHODS.get(target) if node.op == "call_method" else _GEMM_FUNCTIONS.get(target))
        if target is torch.einsum and not node.kwargs and einsum_operands(node.args) is not None:
            kind = "einsum"
        if kind is not None:
            kinds[node] = kind
    gemms = [n for n in calls if n in kinds]
    for node in calls:
        target, op_type, name = _target(gm, node)
        types = target.__mro__ if node.op == "call_module" else (target,)  # a subclass is its base's kind
        group = "gemm" if node in kinds else next((g for g, members in _GROUPS.items()
                                                   if any(t in members for t in types)), None)
        meta = node.meta.setdefault("mpc", {})
        index = gemms.index(node) if node in kinds else None
        meta["facts"] = NodeFacts(op_type, name, group, index, len(gemms), meta.get("kappa"))
        meta["roles"] = ROLES if node in kinds else ("input", "output", *_affine(gm, node, target)) \
            if group == "norm" else ("input", "output")
        if node in kinds:
            meta["gemm"] = kinds[node]
        else:
            why = _unemulated(gm, node, target)
            if why is not None:
                meta["unemulated"] = why


def einsum_operands(args: tuple) -> tuple | None:
    """(equation, a, b) from ``torch.einsum``'s arguments (nodes, or their values), where
    ``ops.einsum`` emulates them; None otherwise."""
    equation, *operands = args
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):  # torch.einsum(eq, [a, b])
        operands = list(operands[0])
    if not isinstance(equation, str) or len(operands) != 2 or einsum_plan(equation) is None:
        return None
    return equation, *operands


def _unemulated(gm: torch.fx.GraphModule, node: torch.fx.Node, target) -> str | None:
    """Why the node is GEMM work that runs in fp32 (None: it is not GEMM work, or it is emulated)."""
    if node.op == "call_function" and target is torch.einsum:
        return f"einsum {node.args[0]!r} is not emulated: only two operands whose product is a matrix product"
    if node.op == "call_function" and target in _UNEMULATED_FUNCTIONS:
        return f"{getattr(target, '__name__', target)} is not emulated"
    if node.op == "call_method" and target in _UNEMULATED_METHODS:
        return f"Tensor.{target} is not emulated"
    if node.op != "call_module":
        return None
    module = gm.get_submodule(node.target)
    if isinstance(module, _UNEMULATED_MODULES):
        return f"{type(module).__name__} is not emulated"
    inside = [name for name, m in module.named_modules()
              if name and isinstance(m, (*_GEMM_MODULES, *_UNEMULATED_MODULES))]
    if not inside:
        return None
    more = f" and {len(inside) - 3} more" if len(inside) > 3 else ""
    return (f"torch.fx keeps {type(module).__name__} whole (a torch.nn module or a leaf module), so the GEMM-like "
            f"layers inside it ({', '.join(inside[:3])}{more}) are not emulated")


def _affine(gm: torch.fx.GraphModule, node: torch.fx.Node, target) -> tuple[str, ...]:
    """The affine parameters a norm node has: ``weight`` / ``bias`` where they are not None."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return tuple(r for r in ("weight", "bias") if getattr(module, r, None) is not None)
    given = lambda i, r: (node.args[i] if i < len(node.args) else node.kwargs.get(r)) is not None
    return tuple(r for r, i in NORM_PARAMS.get(target, {}).items() if given(i, r))
