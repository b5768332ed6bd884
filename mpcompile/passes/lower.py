"""lower: put ``mpc::`` ops where the assignment quantizes anything.

Reads: ``MpcMeta.kind``, ``roles`` (classify) and ``assignment`` (assign). Writes a new graph
whose node standing for a traced node carries a copy of its ``MpcMeta`` with ``source`` (the
traced node's name), and on the traced module an amax-history
buffer (``_mpc_amax.<node>``) per op with ``tensor_delayed`` roles, which a recompile reuses, and
a count buffer (``_mpc_counts.<node>``: components computed low, components) per op with
``recompute``, which every lowering starts afresh (not in the state dict: a statistic, not state).

- A GEMM-like node becomes one call of its registry entry's op (``mpcompile.ops.linear``,
  ``conv2d``, ``matmul``... an ``mpc::`` op each; ``multi_head_attention``: four;
  ``scaled_dot_product_attention``: two) with its roles and specs as strings.
  With ``recompute`` it also names the activation that consumes it when that is its only user
  and an elementwise function ``ops.kappa`` knows (the estimate then includes kappa_phi).
- Any other node gets ``ops.quant`` on its float tensor inputs and its output (if a float
  tensor) for its ``input`` / ``output`` roles: sizes, integer indices and tuples are not
  rounded (where no example input told the shape pass what a value is, ``quant_floats`` decides
  when it runs); ``channel`` scales run along ``channel_axis`` (never the batch) unless the
  role names an ``axis``. An in-place op's result is copied back into the input it wrote, so that later
  readers of that input see the rounded result, as they would see the op's. A norm also gets
  it on its ``weight`` / ``bias`` (a norm module then runs through
  ``torch.func.functional_call`` with the quantized parameters swapped in; its buffers, such as
  BatchNorm's running statistics, stay its own).
- Nodes without an assignment are copied as they are, so an fp32 policy changes nothing.
"""
from __future__ import annotations

import copy
import re
from dataclasses import replace

import torch

from .. import ops
from ..ops.registry import Call, LoweringError, activation_name, kind_named, lower_call
from ..ops.spec import AMAX_HISTORY, ROLES, RoleFormats
from .meta import MpcMeta, mpc_meta

__all__ = ["lower", "LoweringError", "consumer_activation", "quant_floats", "channel_axis"]

def lower(gm: torch.fx.GraphModule, backend: str = "auto") -> torch.fx.GraphModule:
    """A new GraphModule over the same submodules and parameters, with ``mpc::`` ops in, each
    called with ``backend`` (``mpcompile.backends``; ``auto`` is the ops' default and not written)."""
    graph = torch.fx.Graph()
    graph.set_codegen(copy.deepcopy(gm.graph._codegen))  # an exported graph's pytree inputs and outputs
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    if hasattr(gm, "_mpc_counts"):
        del gm._mpc_counts  # counts start afresh with every lowering
    for node in gm.graph.nodes:
        meta = mpc_meta(node) or MpcMeta()
        if meta.assignment is None or not meta.assignment.quantizes:
            env[node] = graph.node_copy(node, lambda n: env[n])
        elif meta.group == "gemm":
            env[node] = _gemm(gm, graph, node, meta, env)
        else:
            env[node] = _quantized_io(gm, graph, node, meta, env)
        env[node].meta = {**node.meta, "mpc": replace(meta, source=node.name)}
    if backend != "auto":
        for op in graph.nodes:
            if op.op == "call_function" and (op.target is quant_floats
                                             or getattr(op.target, "__module__", "").startswith("mpcompile.ops.")):
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
    return activation_name(gm, users[0])


def _strings(assignment) -> dict:
    formats = RoleFormats.of({role: s.quant for role, s in assignment.roles if s.quant is not None})
    return {"formats": str(formats) or None, "forward": str(assignment.forward), "backward": str(assignment.backward)}


def _gemm(gm, graph: torch.fx.Graph, node: torch.fx.Node, meta: MpcMeta, env) -> torch.fx.Node:
    kind, assignment = kind_named(meta.kind), meta.assignment
    spec = _strings(assignment)
    if assignment.recompute is not None and kind.recomputes:  # elsewhere: a warning of the compiled model
        spec.update(recompute=str(assignment.recompute), activation=consumer_activation(gm, node),
                    counts=_low_counts(gm, graph, node))
    if _delayed(assignment):
        if not kind.bilinear:
            raise LoweringError(f"node {node.name} (module {meta.name}): tensor_delayed scaling is not emulated "
                                f"inside attention; use tensor scaling for it with a rule")
        spec["amax_history"] = _amax_history(gm, graph, node)
    call = Call(gm, node, torch.fx.map_arg(node.args, lambda n: env[n]), torch.fx.map_arg(node.kwargs, lambda n: env[n]))
    return lower_call(kind, call, graph, spec)


def quant_floats(x, fmt: str, rounding: str, **options):
    """``ops.quant`` of a float tensor; any other value (a size, integer indices, a tuple) as it is."""
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return ops.quant(x, fmt, rounding, **options)
    return x


# op types whose tensors are laid out (N, C, ...): a convolution's, a pooling's, a batch norm's
_CHANNELS_FIRST = re.compile(r"conv|pool|batch_?norm|instance_?norm|group_?norm|local_response", re.I)
_FEATURES_LAST = re.compile(r"linear|matmul|mm$|einsum|layer_?norm|rms_?norm|embedding|attention|sdpa", re.I)


def channel_axis(value: torch.fx.Node) -> int:
    """The channel axis of ``channel`` scaling for ``value``, a non-GEMM op's input or output:
    never the batch. A tensor of 3 or more dims is (N, C, ...) when the nearest op at or above
    it that fixes a layout is a convolution, pooling or batch-like norm, and features-last
    (..., C) when it is a linear, matmul, layer norm, embedding or attention, as any tensor of 2
    dims is; where no op decides, 4 or more dims are (N, C, ...)."""
    shape = getattr(mpc_meta(value), "shape", None)
    if shape is not None and len(shape) < 3:
        return -1
    at, seen = value, 0
    while isinstance(at, torch.fx.Node) and seen < 64:
        op_type = getattr(mpc_meta(at), "op_type", None) or ""
        if _CHANNELS_FIRST.search(op_type):
            return 1
        if _FEATURES_LAST.search(op_type):
            return -1
        at, seen = next((a for a in at.all_input_nodes if a.op != "get_attr"), None), seen + 1
    return 1 if shape is not None and len(shape) >= 4 else -1


def _float_tensor(node: torch.fx.Node) -> bool | None:
    """Whether a traced node's value is a float tensor; None: unknown (the shape pass did not run)."""
    if "type" not in node.meta:  # set by ShapeProp for every node it ran
        return None
    dtype = getattr(mpc_meta(node), "dtype", None)
    return issubclass(node.meta["type"], torch.Tensor) and dtype is not None and dtype.is_floating_point


def _quant(graph: torch.fx.Graph, value: torch.fx.Node, setting, axis: int,
           traced: torch.fx.Node | None = None) -> torch.fx.Node:
    """``value`` rounded as ``setting`` (channel axis ``axis`` unless the role names one);
    ``traced``: the node whose value it is, where that may not be a float tensor."""
    q = setting.quant
    if q.scaling == "tensor_delayed":
        raise LoweringError(f"node {value.name}: tensor_delayed scaling is for GEMM operands; use tensor here")
    floats = True if traced is None else _float_tensor(traced)
    if floats is False:
        return value
    options = {"scaling": q.scaling, "saturate": q.saturate, "axis": axis if q.axis is None else q.axis}
    options |= {"sr_bits": q.sr_bits} if q.sr_bits is not None else {}
    return graph.call_function(ops.quant if floats else quant_floats, (value, str(q.fmt), q.rounding), options)


def _call_with(module: torch.nn.Module, params: dict, args: tuple, kwargs: dict):
    """``module(*args, **kwargs)`` with ``params`` in place of its own (fx hands over read-only dicts)."""
    return torch.func.functional_call(module, dict(params), tuple(args), dict(kwargs))


def _quantized_io(gm, graph: torch.fx.Graph, node: torch.fx.Node, meta: MpcMeta, env) -> torch.fx.Node:
    roles = {r: s for r, s in meta.assignment.roles if s.quant is not None and r in meta.roles}
    written = _written_in_place(gm, node) if "input" in roles or "output" in roles else None

    def arg(n: torch.fx.Node) -> torch.fx.Node:
        if "input" in roles and n.op != "get_attr":
            return _quant(graph, env[n], roles["input"], channel_axis(n), n)
        # an in-place op writes into a copy, which autograd may keep; its input is written after the rounding
        return graph.call_method("clone", (env[n],)) if n is written else env[n]

    affine = {r: roles[r] for r in ("weight", "bias") if r in roles}
    if not affine:
        out = graph.node_copy(node, arg)
    elif node.op == "call_module":
        swapped = {r: _quant(graph, graph.get_attr(f"{node.target}.{r}"), s, -1) for r, s in affine.items()}
        out = graph.call_function(_call_with, (graph.get_attr(node.target), swapped,
                                               torch.fx.map_arg(node.args, arg), torch.fx.map_arg(node.kwargs, arg)))
    else:
        args, kwargs = list(torch.fx.map_arg(node.args, arg)), dict(torch.fx.map_arg(node.kwargs, arg))
        for role, setting in affine.items():
            i, keyword = kind_named(meta.kind).params[role]
            if i < len(args):
                args[i] = _quant(graph, args[i], setting, -1)
            else:
                kwargs[keyword] = _quant(graph, kwargs[keyword], setting, -1)
        out = graph.call_function(node.target, tuple(args), kwargs)
    out = _quant(graph, out, roles["output"], channel_axis(node), node) if "output" in roles else out
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
    if node.op != "call_function":
        return None
    try:
        normalized = node.normalized_arguments(gm, normalize_to_only_use_kwargs=True)
    except RuntimeError:  # torch.tanh & co. have several schemas (Tensor, int, float...) and no inplace
        return None
    return first if normalized is not None and normalized.kwargs.get("inplace") is True else None
