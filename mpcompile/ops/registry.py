"""The op registry: one ``OpKind`` per kind of op the passes know, and nowhere else a table.

An entry says how to recognise the op in a traced graph (``call_module`` types, ``call_function``
targets, ``call_method`` names and ATen overloads, so a torch.export graph is recognised too),
its group, where its role tensors sit, how to estimate its condition number and how to lower
it to ``mpcompile.ops``. classify, condition, stats, lower and the views ask ``lookup``.

To add a GEMM-like op kind: write its op body (an ``mpcompile.ops`` entry point over ``mpc::``
ops) and add one ``OpKind`` to ``KINDS`` below.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import LoweringError
from . import api
from .addmm import addmm, baddbmm
from .attention import multi_head_attention, scaled_dot_product_attention, unsupported_attention
from .conv_transpose import conv_transpose1d, conv_transpose2d, conv_transpose3d
from .einsum import einsum, einsum_plan
from .spec import ROLES

__all__ = ["OpKind", "Call", "LoweringError", "KINDS", "lookup", "module_kind", "gemm_module_types", "role_values",
           "einsum_operands", "activation_name", "lower_call", "kind_named", "GEMM"]

aten = torch.ops.aten
GEMM = "gemm"


@dataclass
class Call:
    """One traced call, as an entry's functions see it.

    Attributes:
        gm: the traced module; node: the call; args, kwargs: its arguments (values when the
        model runs, lowered nodes when lowering).
    """

    gm: torch.fx.GraphModule
    node: torch.fx.Node
    args: tuple
    kwargs: dict

    @property
    def module(self) -> nn.Module:
        return self.gm.get_submodule(self.node.target)

    def arg(self, position: int, keyword: str, default: Any = None) -> Any:
        """The argument at ``position`` or named ``keyword``."""
        return self.args[position] if position < len(self.args) else self.kwargs.get(keyword, default)


@dataclass(frozen=True)
class OpKind:
    """One kind of op.

    Attributes:
        name: the kind (``linear``, ``conv2d``, ``matmul``...).
        group: what policies select with ``type:`` (``gemm``, ``norm``, ``activation``, ``pool``,
            ``elementwise``); None for GEMM work that is not emulated.
        modules, functions, methods, aten: how the op appears in a graph (a module subclass is
            its base's kind).
        params: where a function call takes its role tensors: role -> (position, keyword); a
            module holds them as attributes of the role's name.
        refuses: why a recognised call of a GEMM-like kind is not emulated (None: it is).
        emulated: False for GEMM work that lowering does not emulate (it runs in fp32).
        op: the ``mpcompile.ops`` entry point lowering calls; ``lower`` builds the call
            (default: ``op`` over a module's parameters, or over the call's own arguments).
        bilinear: kappa_v is the op on absolute values over |output| (a dot product per output).
        recomputes: ``op`` takes ``recompute`` (its output components recomputed by kappa).
        module_fields: attributes of the module passed to ``op`` as keywords.
    """

    name: str
    group: str | None
    modules: tuple[type, ...] = ()
    functions: tuple[Callable, ...] = ()
    methods: tuple[str, ...] = ()
    aten: tuple[Any, ...] = ()
    params: dict[str, tuple[int, str]] | None = None
    refuses: Callable[[Call], str | None] | None = None
    emulated: bool = True
    op: Callable | None = None
    lower: Callable[["OpKind", Call, torch.fx.Graph, dict], torch.fx.Node] | None = None
    bilinear: bool = False
    recomputes: bool = False
    module_fields: tuple[str, ...] = ()

    @property
    def is_gemm(self) -> bool:
        return self.group == GEMM

    def roles_of(self, call: Call) -> tuple[str, ...]:
        """The roles lowering can round at this call: every role of a GEMM; a norm's input,
        output and the affine parameters it has; input and output elsewhere."""
        if self.is_gemm:
            return ROLES
        if self.group != "norm":
            return ("input", "output")
        if call.node.op == "call_module":
            affine = [r for r in ("weight", "bias") if getattr(call.module, r, None) is not None]
        else:
            affine = [r for r, (i, k) in (self.params or {}).items() if call.arg(i, k) is not None]
        return ("input", "output", *affine)


# -- how GEMM-like kinds lower ----------------------------------------------------------------------
def lower_call(kind: OpKind, call: Call, graph: torch.fx.Graph, spec: dict) -> torch.fx.Node:
    """The kind's op in place of ``call``, with the op keywords ``spec`` (formats, arithmetic...)."""
    if kind.lower is not None:
        return kind.lower(kind, call, graph, spec)
    if call.node.op != "call_module":
        return graph.call_function(kind.op, call.args, {**call.kwargs, **spec})
    module, target = call.module, call.node.target
    weight = graph.get_attr(f"{target}.weight")
    bias = graph.get_attr(f"{target}.bias") if module.bias is not None else None
    x, spec = call.args[0], {**spec, **{f: getattr(module, f) for f in kind.module_fields}}
    if getattr(module, "padding_mode", "zeros") != "zeros":  # as nn.Conv's own forward: pad, then convolve unpadded
        x = graph.call_function(F.pad, (x, module._reversed_padding_repeated_twice), {"mode": module.padding_mode})
        spec["padding"] = 0
    return graph.call_function(kind.op, (x, weight, bias), spec)


def _lower_attention(kind: OpKind, call: Call, graph: torch.fx.Graph, spec: dict) -> torch.fx.Node:
    why = unsupported_attention(call.module)
    if why is not None:
        target = call.node.target
        raise LoweringError(f"node {call.node.name} (module {target}, {type(call.module).__name__}): {why}; keep it "
                            f"in fp32 with a rule (match: {{name: {target}}}, keep: fp32)")
    return graph.call_function(kind.op, (graph.get_attr(call.node.target), *call.args), {**call.kwargs, **spec})


def _lower_einsum(kind: OpKind, call: Call, graph: torch.fx.Graph, spec: dict) -> torch.fx.Node:
    equation, a, b = einsum_operands(call.args)
    return graph.call_function(kind.op, (equation, a, b), spec)


def einsum_operands(args: tuple) -> tuple | None:
    """(equation, a, b) from ``torch.einsum``'s arguments (nodes, or their values), where
    ``ops.einsum`` emulates them; None otherwise."""
    equation, *operands = args
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):  # torch.einsum(eq, [a, b])
        operands = list(operands[0])
    if not isinstance(equation, str) or len(operands) != 2 or einsum_plan(equation) is None:
        return None
    return equation, *operands


def _einsum_refuses(call: Call) -> str | None:
    if not call.kwargs and einsum_operands(call.args) is not None:
        return None
    return f"einsum {call.args[0]!r} is not emulated: only two operands whose product is a matrix product"


# -- the kinds ------------------------------------------------------------------------------------
_LINEAR = {"input": (0, "input"), "weight": (1, "weight"), "bias": (2, "bias")}
_CONV_FIELDS = ("stride", "padding", "dilation", "groups")


def _conv(n: int) -> OpKind:
    return OpKind(f"conv{n}d", GEMM, modules=(getattr(nn, f"Conv{n}d"),), functions=(getattr(F, f"conv{n}d"),),
                  aten=(getattr(aten, f"conv{n}d").default,), params=_LINEAR, op=getattr(api, f"conv{n}d"),
                  bilinear=True, recomputes=True, module_fields=_CONV_FIELDS)


def _output_size_refused(call: Call) -> str | None:
    if call.node.op == "call_module" and (len(call.args) > 1 or call.kwargs.get("output_size") is not None):
        return f"{type(call.module).__name__} called with output_size is not emulated"
    return None


def _tensor_overload(name: str):
    """The ATen overload of ``name`` that takes tensors (conv_transpose1d's is .default, 2d's .input)."""
    packet = getattr(aten, name)
    return getattr(packet, "input" if "input" in packet.overloads() else "default")


def _conv_transpose(n: int, op: Callable) -> OpKind:
    return OpKind(f"conv_transpose{n}d", GEMM, modules=(getattr(nn, f"ConvTranspose{n}d"),),
                  functions=(getattr(F, f"conv_transpose{n}d"),), aten=(_tensor_overload(f"conv_transpose{n}d"),),
                  params=_LINEAR, refuses=_output_size_refused, op=op, bilinear=True,
                  module_fields=("stride", "padding", "output_padding", "groups", "dilation"))


def _scaled_refused(call: Call) -> str | None:
    if call.kwargs.get("alpha", 1) == 1 and call.kwargs.get("beta", 1) == 1:
        return None
    return f"{_name(call)} with alpha or beta other than 1 is not emulated"


def _name(call: Call) -> str:
    target = call.node.target
    return f"Tensor.{target}" if call.node.op == "call_method" else getattr(target, "__name__", str(target))


def _unemulated(name: str, modules=(), functions=(), methods=(), overloads=()) -> OpKind:
    return OpKind(name, None, modules=modules, functions=functions, methods=methods, aten=overloads, emulated=False)


KINDS: tuple[OpKind, ...] = (
    OpKind("linear", GEMM, modules=(nn.Linear,), functions=(F.linear,), aten=(aten.linear.default,), params=_LINEAR,
           op=api.linear, bilinear=True, recomputes=True),
    _conv(1), _conv(2), _conv(3),
    _conv_transpose(1, conv_transpose1d), _conv_transpose(2, conv_transpose2d), _conv_transpose(3, conv_transpose3d),
    OpKind("matmul", GEMM, functions=(torch.matmul, torch.mm, torch.bmm, operator.matmul),
           methods=("matmul", "mm", "bmm"), aten=(aten.matmul.default, aten.mm.default, aten.bmm.default),
           params={"input": (0, "input"), "weight": (1, "other")}, op=api.matmul, bilinear=True, recomputes=True),
    OpKind("addmm", GEMM, functions=(torch.addmm,), methods=("addmm",), aten=(aten.addmm.default,),
           params={"bias": (0, "input"), "input": (1, "mat1"), "weight": (2, "mat2")}, refuses=_scaled_refused,
           op=addmm, bilinear=True),
    OpKind("baddbmm", GEMM, functions=(torch.baddbmm,), methods=("baddbmm",), aten=(aten.baddbmm.default,),
           params={"bias": (0, "input"), "input": (1, "batch1"), "weight": (2, "batch2")}, refuses=_scaled_refused,
           op=baddbmm, bilinear=True),
    OpKind("einsum", GEMM, functions=(torch.einsum,), aten=(aten.einsum.default,), refuses=_einsum_refuses,
           op=einsum, lower=_lower_einsum, bilinear=True, recomputes=True),
    OpKind("sdpa", GEMM, functions=(F.scaled_dot_product_attention,), aten=(aten.scaled_dot_product_attention.default,),
           params={"input": (0, "query"), "weight": (1, "key")}, op=scaled_dot_product_attention),
    OpKind("attention", GEMM, modules=(nn.MultiheadAttention,), op=multi_head_attention,
           lower=_lower_attention),
    _unemulated("rnn", modules=(nn.RNNBase, nn.RNNCellBase)),
    _unemulated("bilinear", modules=(nn.Bilinear,), functions=(F.bilinear,)),
    _unemulated("products", functions=(torch.addbmm, torch.addmv, torch.addr, torch.mv, torch.dot, torch.inner,
                                       torch.outer, torch.tensordot, torch.linalg.multi_dot, torch.chain_matmul),
                methods=("addbmm", "addmv", "addr", "mv", "dot", "inner", "outer"),
                # ATen's spellings, and those that a decomposed export graph has for emulated kinds
                overloads=(aten.addbmm.default, aten.addmv.default, aten.addr.default, aten.mv.default,
                           aten.dot.default, aten.inner.default, aten.outer.default, aten.tensordot.default,
                           aten.bilinear.default, aten.convolution.default,
                           aten._scaled_dot_product_flash_attention_for_cpu.default,
                           aten._scaled_dot_product_efficient_attention.default)),
    OpKind("activation", "activation",
           modules=(nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
                    nn.LeakyReLU, nn.ELU, nn.Softmax),
           functions=(F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu, F.softmax,
                      torch.relu, torch.sigmoid, torch.tanh, torch.softmax),
           methods=("relu", "sigmoid", "tanh", "softmax", "gelu"),
           aten=(aten.relu.default, aten.gelu.default, aten.silu.default, aten.sigmoid.default, aten.tanh.default,
                 aten.hardswish.default, aten.hardsigmoid.default, aten.leaky_relu.default, aten.elu.default,
                 aten.hardtanh.default, aten.softmax.int, aten._softmax.default)),
    OpKind("norm", "norm",
           modules=(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm,
                    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LocalResponseNorm)),
    OpKind("batch_norm", "norm", functions=(F.batch_norm, F.instance_norm),
           params={"weight": (3, "weight"), "bias": (4, "bias")}),
    OpKind("aten_batch_norm", "norm", aten=(aten.batch_norm.default, aten.instance_norm.default),
           params={"weight": (1, "weight"), "bias": (2, "bias")}),
    OpKind("layer_norm", "norm", functions=(F.layer_norm, F.group_norm),
           aten=(aten.layer_norm.default, aten.group_norm.default), params={"weight": (2, "weight"), "bias": (3, "bias")}),
    OpKind("rms_norm", "norm", functions=(F.rms_norm,), aten=(aten.rms_norm.default,), params={"weight": (2, "weight")}),
    OpKind("local_response_norm", "norm", functions=(F.local_response_norm,)),
    OpKind("pool", "pool",
           modules=(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d),
           functions=(F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d), methods=("mean",),
           aten=(aten.max_pool2d.default, aten.avg_pool2d.default, aten.adaptive_avg_pool2d.default, aten.mean.dim)),
    OpKind("elementwise", "elementwise",
           functions=(operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul,
                      torch.div),
           methods=("add", "sub", "mul", "div", "add_", "mul_"),
           aten=(aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.add_.Tensor, aten.mul_.Tensor)),
)

_BY_FUNCTION = {f: k for k in KINDS for f in k.functions}
_BY_METHOD = {m: k for k in KINDS for m in k.methods}
_BY_MODULE = {m: k for k in KINDS for m in k.modules}
_BY_ATEN = {o: k for k in KINDS for o in k.aten}


def lookup(gm: torch.fx.GraphModule, node: torch.fx.Node) -> OpKind | None:
    """The kind of a call node (None for a call no entry names)."""
    if node.op == "call_module":
        mro = type(gm.get_submodule(node.target)).__mro__
        return next((_BY_MODULE[c] for c in mro if c in _BY_MODULE), None)
    if node.op == "call_method":
        return _BY_METHOD.get(node.target)
    if node.op != "call_function":
        return None
    try:
        kind = _BY_FUNCTION.get(node.target)
    except TypeError:  # an unhashable target
        return None
    if kind is None and isinstance(node.target, torch._ops.OpOverload):
        kind = _BY_ATEN.get(node.target)
    return kind


_BY_NAME = {k.name: k for k in KINDS}
_BY_MODULE_PATH = {f"{m.__module__}.{m.__qualname__}": k for m, k in _BY_MODULE.items()}


def module_kind(module_type: "type | str") -> OpKind | None:
    """The entry of a module type named exactly (a class, or its ``module.qualname`` as
    torch.export's ``nn_module_stack`` gives it); subclasses, whose forwards are their own, are not it."""
    if isinstance(module_type, type):
        module_type = f"{module_type.__module__}.{module_type.__qualname__}"
    return _BY_MODULE_PATH.get(module_type)


def kind_named(name: str | None) -> OpKind | None:
    """The entry called ``name`` (what classify records as ``MpcMeta.kind``); None for None."""
    return None if name is None else _BY_NAME[name]


def gemm_module_types() -> tuple[type, ...]:
    """Module types whose forward is GEMM work, emulated or not (a module kept whole that holds
    one of these hides GEMMs from the policy)."""
    return tuple(m for k in KINDS if k.is_gemm or not k.emulated for m in k.modules)


def role_values(kind: OpKind | None, call: Call, role: str) -> list:
    """The values of role ``weight`` or ``bias`` (or a GEMM's ``input``) at ``call``: a module's
    attribute, or the argument the kind's ``params`` name."""
    if call.node.op == "call_module":
        return [call.args[0] if role == "input" else getattr(call.module, role, None)]
    if kind is not None and kind.name == "einsum":
        _, a, b = einsum_operands(call.args)
        return [{"input": a, "weight": b}.get(role)]
    where = (kind.params or {}).get(role) if kind is not None else None
    return [] if where is None else [call.arg(*where)]


# Elementwise activations whose kappa_phi ``ops.kappa`` knows: by exact module type, function,
# method; those with a parameter: (name, attribute) of a module, (name, keyword, position, default)
# of a function.
_PHI_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh",
                nn.Hardswish: "hardswish", nn.Hardsigmoid: "hardsigmoid"}
_PHI_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", F.silu: "silu", torch.sigmoid: "sigmoid",
                  F.sigmoid: "sigmoid", torch.tanh: "tanh", F.tanh: "tanh", F.hardswish: "hardswish",
                  F.hardsigmoid: "hardsigmoid", aten.relu.default: "relu", aten.silu.default: "silu",
                  aten.sigmoid.default: "sigmoid", aten.tanh.default: "tanh", aten.hardswish.default: "hardswish",
                  aten.hardsigmoid.default: "hardsigmoid"}
_PHI_METHODS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid", "tanh": "tanh",
                "tanh_": "tanh"}
_PHI_MODULE_PARAMETERS = {nn.LeakyReLU: ("leaky_relu", "negative_slope"), nn.ELU: ("elu", "alpha")}
_PHI_FUNCTION_PARAMETERS = {F.leaky_relu: ("leaky_relu", "negative_slope", 1, 0.01), F.elu: ("elu", "alpha", 1, 1.0),
                            aten.leaky_relu.default: ("leaky_relu", "negative_slope", 1, 0.01),
                            aten.elu.default: ("elu", "alpha", 1, 1.0)}


def activation_name(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str | None:
    """The ``ops.kappa`` name of the elementwise activation ``node`` calls (``relu``,
    ``leaky_relu(0.2)``...); None if it is none that ``ops.kappa`` knows."""
    if node.op == "call_method":
        return _PHI_METHODS.get(node.target)
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if type(module) in _PHI_MODULES:
            return _PHI_MODULES[type(module)]
        if isinstance(module, nn.GELU):
            return "gelu_tanh" if module.approximate == "tanh" else "gelu"
        if type(module) in _PHI_MODULE_PARAMETERS:
            name, attribute = _PHI_MODULE_PARAMETERS[type(module)]
            return f"{name}({float(getattr(module, attribute))!r})"
        return None
    if node.op != "call_function":
        return None
    if node.target in (F.gelu, aten.gelu.default):
        return "gelu_tanh" if node.kwargs.get("approximate", "none") == "tanh" else "gelu"
    if node.target in _PHI_FUNCTION_PARAMETERS:
        name, keyword, position, default = _PHI_FUNCTION_PARAMETERS[node.target]
        value = node.args[position] if len(node.args) > position else node.kwargs.get(keyword, default)
        return f"{name}({float(value)!r})" if isinstance(value, (int, float)) else None
    return _PHI_FUNCTIONS.get(node.target)
