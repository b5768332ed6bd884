"""lower: put ``mpc::`` ops where the assignment quantizes anything.

Reads: ``meta["mpc"]["gemm"]``, ``["roles"]`` (classify) and ``["assignment"]`` (assign).
Writes a new graph whose node standing for a traced node carries its meta plus
``meta["mpc"]["node"]`` (the traced node's name), and on the traced module an amax-history
buffer (``_mpc_amax.<node>``) per op with ``tensor_delayed`` roles, which a recompile reuses, and
a count buffer (``_mpc_counts.<node>``: components computed low, components) per op with
``recompute``, which every lowering starts afresh (not in the state dict: a statistic, not state).

- A GEMM-like node becomes one call of ``mpcompile.ops`` (``linear``, ``conv1d/2d/3d``,
  ``matmul``, ``einsum``: an ``mpc::`` op; ``multi_head_attention``: four;
  ``scaled_dot_product_attention``: two) with its roles and specs as strings.
  With ``recompute`` it also names the activation that consumes it when that is its only user
  and an elementwise function ``ops.kappa`` knows (the estimate then includes kappa_phi).
- Any other node gets ``ops.quant`` on its float tensor inputs and its output (if a float
  tensor) for its ``input`` / ``output`` roles: sizes, integer indices and tuples are not
  rounded (where no example input told the shape pass what a value is, ``quant_floats`` decides
  when it runs). An in-place op's result is copied back into the input it wrote, so that later
  readers of that input see the rounded result, as they would see the op's. A norm also gets
  it on its ``weight`` / ``bias`` (a norm module then runs through
  ``torch.func.functional_call`` with the quantized parameters swapped in; its buffers, such as
  BatchNorm's running statistics, stay its own).
- Nodes without an assignment are copied as they are, so an fp32 policy changes nothing.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..errors import MpcompileError
from ..ops.attention import unsupported_attention
from ..ops.spec import AMAX_HISTORY, ROLES, RoleFormats
from .classify import ATTENTION_KINDS, NORM_PARAMS, einsum_operands

__all__ = ["lower", "LoweringError", "consumer_activation", "quant_floats"]

_OPS = {"linear": ops.linear, "conv1d": ops.conv1d, "conv2d": ops.conv2d, "conv3d": ops.conv3d, "matmul": ops.matmul,
        "sdpa": ops.scaled_dot_product_attention}
_CONV_FIELDS = ("stride", "padding", "dilation", "groups")
# Elementwise activations by module (its exact type), function or method, as ``ops.kappa.ACTIVATIONS``
# names them; those with a parameter: (name, its attribute) of a module, (name, keyword, position,
# default) of a function.
_PHI_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh",
                nn.Hardswish: "hardswish", nn.Hardsigmoid: "hardsigmoid"}
_PHI_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", F.silu: "silu", torch.sigmoid: "sigmoid",
                  F.sigmoid: "sigmoid", torch.tanh: "tanh", F.tanh: "tanh", F.hardswish: "hardswish",
                  F.hardsigmoid: "hardsigmoid"}
_PHI_METHODS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid", "tanh": "tanh",
                "tanh_": "tanh"}
_PHI_MODULE_PARAMETERS = {nn.LeakyReLU: ("leaky_relu", "negative_slope"), nn.ELU: ("elu", "alpha")}
_PHI_FUNCTION_PARAMETERS = {F.leaky_relu: ("leaky_relu", "negative_slope", 1, 0.01), F.elu: ("elu", "alpha", 1, 1.0)}


class LoweringError(MpcompileError, ValueError):
    """A node that lowering cannot rewrite; the message names the node and its module."""


def lower(gm: torch.fx.GraphModule, backend: str = "auto") -> torch.fx.GraphModule:
    """A new GraphModule over the same submodules and parameters, with ``mpc::`` ops in, each
    called with ``backend`` (``mpcompile.backends``; ``auto`` is the ops' default and not written)."""
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    if hasattr(gm, "_mpc_counts"):
        del gm._mpc_counts  # counts start afresh with every lowering
    for node in gm.graph.nodes:
        meta = node.meta.get("mpc", {})
        assignment = meta.get("assignment")
        if assignment is None or not assignment.quantizes:
            env[node] = graph.node_copy(node, lambda n: env[n])
        elif "gemm" in meta:
            env[node] = _gemm(gm, graph, node, meta, env)
        else:
            env[node] = _quantized_io(gm, graph, node, assignment, env)
        env[node].meta = {**node.meta, "mpc": {**node.meta.get("mpc", {}), "node": node.name}}
    if backend != "auto":
        for op in graph.nodes:
            if op.op == "call_function" and getattr(op.target, "__module__", "").startswith("mpcompile.ops."):
                op.kwargs = {**op.kwargs, "backend": backend}
    lowered = torch.fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    if hasattr(gm, "_mpc_amax"):
        lowered._mpc_amax = gm._mpc_amax  # one module: .to() and load_state_dict reach the traced side too
    if hasattr(gm, "_mpc_counts"):
        lowered._mpc_counts = gm._mpc_counts  # GraphModule copied them as persistent buffers
    return lowered


def _delayed(assignment) -> bool:
    return any(s.quant is not None and s.quant.scaling == "tensor_delayed" for _, s in assignment.roles)


def _amax_history(gm: torch.fx.GraphModule, graph: torch.fx.Graph, node: torch.fx.Node) -> torch.fx.Node:
    """The node's amax-history buffer, kept on the traced module (``_mpc_amax.<node>``) so that
    a recompile finds the history where it left it."""
    if not hasattr(gm, "_mpc_amax"):
        gm._mpc_amax = torch.nn.Module()
    if node.name not in gm._mpc_amax._buffers:
        device = next(gm.parameters(), torch.empty(0)).device
        gm._mpc_amax.register_buffer(node.name, torch.zeros(len(ROLES), AMAX_HISTORY, device=device))
    return graph.get_attr(f"_mpc_amax.{node.name}")


def _low_counts(gm: torch.fx.GraphModule, graph: torch.fx.Graph, node: torch.fx.Node) -> torch.fx.Node:
    """The node's count buffer (``_mpc_counts.<node>``, int64: components computed low, components)."""
    if not hasattr(gm, "_mpc_counts"):
        gm._mpc_counts = torch.nn.Module()
    device = next(gm.parameters(), torch.empty(0)).device
    gm._mpc_counts.register_buffer(node.name, torch.zeros(2, dtype=torch.int64, device=device), persistent=False)
    return graph.get_attr(f"_mpc_counts.{node.name}")


def consumer_activation(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str | None:
    """The ``ops.kappa`` name of the elementwise activation that is ``node``'s only user (and
    takes it as its input), e.g. ``relu`` or ``leaky_relu(0.2)``; None if there is none."""
    users = list(node.users)
    if len(users) != 1 or users[0].args[:1] != (node,):
        return None
    user = users[0]
    if user.op == "call_method":
        return _PHI_METHODS.get(user.target)
    if user.op == "call_module":
        module = gm.get_submodule(user.target)
        if type(module) in _PHI_MODULES:
            return _PHI_MODULES[type(module)]
        if isinstance(module, nn.GELU):
            return "gelu_tanh" if module.approximate == "tanh" else "gelu"
        if type(module) in _PHI_MODULE_PARAMETERS:
            name, attribute = _PHI_MODULE_PARAMETERS[type(module)]
            return f"{name}({float(getattr(module, attribute))!r})"
        return None
    if user.op != "call_function":
        return None
    if user.target is F.gelu:
        return "gelu_tanh" if user.kwargs.get("approximate", "none") == "tanh" else "gelu"
    if user.target in _PHI_FUNCTION_PARAMETERS:
        name, keyword, position, default = _PHI_FUNCTION_PARAMETERS[user.target]
        value = user.args[position] if len(user.args) > position else user.kwargs.get(keyword, default)
        return f"{name}({float(value)!r})" if isinstance(value, (int, float)) else None
    return _PHI_FUNCTIONS.get(user.target)


def _strings(assignment) -> dict:
    formats = RoleFormats.of({role: s.quant for role, s in assignment.roles if s.quant is not None})
    return {"formats": str(formats) or None, "forward": str(assignment.forward), "backward": str(assignment.backward)}


def _gemm(gm, graph: torch.fx.Graph, node: torch.fx.Node, meta: dict, env) -> torch.fx.Node:
    kind, kwargs = meta["gemm"], _strings(meta["assignment"])
    recompute = meta["assignment"].recompute
    if recompute is not None and kind not in ATTENTION_KINDS:  # attention: a warning of the compiled model
        kwargs.update(recompute=str(recompute), activation=consumer_activation(gm, node),
                      counts=_low_counts(gm, graph, node))
    if _delayed(meta["assignment"]):
        if kind in ATTENTION_KINDS:
            raise LoweringError(f"node {node.name} (module {meta['facts'].name}): tensor_delayed scaling is not emulated "
                                f"inside attention; use tensor scaling for it with a rule")
        kwargs["amax_history"] = _amax_history(gm, graph, node)
    args = torch.fx.map_arg(node.args, lambda n: env[n])
    call_kwargs = torch.fx.map_arg(node.kwargs, lambda n: env[n])
    if kind == "attention":
        module = gm.get_submodule(node.target)
        why = unsupported_attention(module)
        if why is not None:
            raise LoweringError(f"node {node.name} (module {node.target}, {type(module).__name__}): {why}; keep it "
                                f"in fp32 with a rule (match: {{name: {node.target}}}, keep: fp32)")
        return graph.call_function(ops.multi_head_attention, (graph.get_attr(node.target), *args),
                                   {**call_kwargs, **kwargs})
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        weight = graph.get_attr(f"{node.target}.weight")
        bias = graph.get_attr(f"{node.target}.bias") if module.bias is not None else None
        x = args[0]
        if kind != "linear":
            kwargs.update({f: getattr(module, f) for f in _CONV_FIELDS})
            if module.padding_mode != "zeros":  # as nn.Conv's own forward: pad, then convolve unpadded
                x = graph.call_function(F.pad, (x, module._reversed_padding_repeated_twice),
                                        {"mode": module.padding_mode})
                kwargs["padding"] = 0
        return graph.call_function(_OPS[kind], (x, weight, bias), kwargs)
    if kind == "einsum":
        equation, a, b = einsum_operands(node.args)
        kwargs["spec"] = kwargs.pop("forward")
        return graph.call_function(ops.einsum, (equation, env[a], env[b]), kwargs)
    if kind == "matmul":  # torch.matmul(a, b), a @ b or a.matmul(b)
        kwargs["spec"] = kwargs.pop("forward")
        return graph.call_function(ops.matmul, args[:2], kwargs)
    return graph.call_function(_OPS[kind], args, {**call_kwargs, **kwargs})


def quant_floats(x, fmt: str, rounding: str, scaling: str, saturate: bool):
    """``ops.quant`` of a float tensor; any other value (a size, integer indices, a tuple) as it is."""
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return ops.quant(x, fmt, rounding, scaling=scaling, saturate=saturate)
    return x


def _float_tensor(node: torch.fx.Node) -> bool | None:
    """Whether a traced node's value is a float tensor; None: unknown (the shape pass did not run)."""
    if "type" not in node.meta:  # set by ShapeProp for every node it ran
        return None
    return issubclass(node.meta["type"], torch.Tensor) and node.meta["mpc"].get("dtype", torch.int64).is_floating_point


def _quant(graph: torch.fx.Graph, value: torch.fx.Node, setting, traced: torch.fx.Node | None = None) -> torch.fx.Node:
    """``value`` rounded as ``setting``; ``traced``: the node whose value it is, where that may
    not be a float tensor."""
    q = setting.quant
    if q.scaling == "tensor_delayed":
        raise LoweringError(f"node {value.name}: tensor_delayed scaling is for GEMM operands; use tensor here")
    floats = True if traced is None else _float_tensor(traced)
    if floats is False:
        return value
    return graph.call_function(ops.quant if floats else quant_floats, (value, str(q.fmt), q.rounding),
                               {"scaling": q.scaling, "saturate": q.saturate})


def _call_with(module: torch.nn.Module, params: dict, args: tuple, kwargs: dict):
    """``module(*args, **kwargs)`` with ``params`` in place of its own (fx hands over read-only dicts)."""
    return torch.func.functional_call(module, dict(params), tuple(args), dict(kwargs))


def _quantized_io(gm, graph: torch.fx.Graph, node: torch.fx.Node, assignment, env) -> torch.fx.Node:
    applies = node.meta["mpc"]["roles"]
    roles = {r: s for r, s in assignment.roles if s.quant is not None and r in applies}
    written = _written_in_place(gm, node) if "input" in roles or "output" in roles else None

    def arg(n: torch.fx.Node) -> torch.fx.Node:
        if "input" in roles and n.op != "get_attr":
            return _quant(graph, env[n], roles["input"], n)
        # an in-place op writes into a copy, which autograd may keep; its input is written after the rounding
        return graph.call_method("clone", (env[n],)) if n is written else env[n]

    affine = {r: roles[r] for r in ("weight", "bias") if r in roles}
    if not affine:
        out = graph.node_copy(node, arg)
    elif node.op == "call_module":
        swapped = {r: _quant(graph, graph.get_attr(f"{node.target}.{r}"), s) for r, s in affine.items()}
        out = graph.call_function(_call_with, (graph.get_attr(node.target), swapped,
                                               torch.fx.map_arg(node.args, arg), torch.fx.map_arg(node.kwargs, arg)))
    else:
        args, kwargs = list(torch.fx.map_arg(node.args, arg)), dict(torch.fx.map_arg(node.kwargs, arg))
        for role, setting in affine.items():
            i = NORM_PARAMS[node.target][role]
            if i < len(args):
                args[i] = _quant(graph, args[i], setting)
            else:
                kwargs[role] = _quant(graph, kwargs[role], setting)
        out = graph.call_function(node.target, tuple(args), kwargs)
    out = _quant(graph, out, roles["output"], node) if "output" in roles else out
    # the op wrote into a rounded copy of its input, or a copy whose result is rounded: the input's
    # later readers must see what the op's users see, as they would without formats
    return out if written is None else graph.call_method("copy_", (env[written], out))


def _written_in_place(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.fx.Node | None:
    """The input an in-place op writes into (``relu_``, ``x.add_``, ``inplace=True``); None if it
    writes nothing."""
    first = node.args[0] if node.args else None
    if not isinstance(first, torch.fx.Node):
        return None
    if node.op == "call_module":
        return first if getattr(gm.get_submodule(node.target), "inplace", False) is True else None
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if name.endswith("_") and not name.endswith("__"):
        return first
    normalized = node.normalized_arguments(gm, normalize_to_only_use_kwargs=True) if node.op == "call_function" else None
    return first if normalized is not None and normalized.kwargs.get("inplace") is True else None
