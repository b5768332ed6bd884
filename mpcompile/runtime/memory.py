"""``memory_report``: the bytes one training step of a compiled model holds, by category, three ways.

Categories: ``parameters``, ``master_weights``, ``gradients``, ``optimizer_states`` and
``activations`` (the tensors autograd saves for backward; parameters it saves are parameters,
not activations). Columns:

- ``nominal``: at the bits of the formats the policy assigns, block formats with an 8-bit scale
  per block (MX: 8 bits per 32 elements), blocks laid out as the ops lay them out (a conv
  weight's along in_channels x kernel, a GEMM operand's along K, ...). A parameter counts at the
  format its op reads it in (``weight`` / ``bias``), else at the optimizer's ``master`` format;
  the master weights are a copy of it in the ``master`` format (fp32 where unset) wherever the
  two formats differ; a gradient at the optimizer's ``gradient`` format, else its op's
  ``grad_weight`` / ``grad_bias``; an optimizer state at its ``momentum`` / ``second_moment``
  format; an activation at the format of the role under which the op that saves it reads it
  (an operand by the op registry's positions, any other operand as ``input``, its result as
  ``output``), the widest where several ops save it. Anything without a format counts at its
  dtype. Per-tensor and per-channel scale factors (a few bytes a tensor) are not counted.
- ``held``: as mpcompile holds them, measured on one real step (forward of a batch, backward,
  optimizer step) of a copy of the model: torch's MemTracker counts the live storages of each
  category, once per storage; activations are the storages ``saved_tensors_hooks`` sees saved.
  Formats are emulated in fp32 storage, so parameters, gradients and activations are held in
  fp32; ``storage: packed`` optimizer states as codes. mpcompile keeps no master copy besides
  the parameters: the optimizer updates them in place (rounding them to ``master`` where set),
  except with ``storage: packed`` and a ``master`` format, where between steps the weights are
  held as codes (``master_weights``, measured after the step) and the fp32 parameters only
  from a forward to the step (``parameters``, measured before the step).
- ``fp32``: the same tensors as fp32 (integer tensors, such as max-pool indices, as they are);
  fp32 training keeps no master copy either.
"""
from __future__ import annotations

import copy
import functools
import inspect
import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn as nn
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils._pytree import tree_leaves

from ..capture import Inputs, as_inputs
from ..compiler import CompiledModel
from ..errors import MpcompileError
from ..formats import BlockFormat
from ..ops.registry import kind_named
from ..ops.spec import QuantSpec
from ..passes import mpc_meta
from .optim.low_precision import STATE_ROLES
from .optim import unpack_parameters
from .optim.make import VARIANCE_REDUCED, make_optimizer, optimizer_kind
from .optim.swalp import SWALP

__all__ = ["CATEGORIES", "MemoryRow", "MemoryReport", "memory_report"]

CATEGORIES = ("parameters", "master_weights", "gradients", "optimizer_states", "activations")
SCALE_BITS = 8  # one E8M0 scale per block (formats.packing stores every block format's scales so)


@dataclass(frozen=True)
class MemoryRow:
    """One category's bytes: nominal (at the assigned formats), held (measured), fp32."""

    category: str
    nominal: int
    held: int
    fp32: int


@dataclass(frozen=True)
class MemoryReport:
    """What ``memory_report`` measured (the module docstring defines the columns).

    Attributes:
        batch_size: the batch of the measured step.
        rows: one ``MemoryRow`` per category of ``CATEGORIES``.
        peak: the most bytes the step held at once, the model's parameters and buffers included
            (``torch.cuda.max_memory_allocated``; None on the CPU, which keeps no such count).
        measured_with: how ``held`` and ``peak`` were measured.
        title: the model, policy and optimizer measured.
    """

    batch_size: int
    rows: tuple[MemoryRow, ...]
    peak: int | None
    measured_with: str
    title: str = ""

    def __getitem__(self, category: str) -> MemoryRow:
        for row in self.rows:
            if row.category == category:
                return row
        raise KeyError(f"no memory category {category!r}; the categories are {', '.join(CATEGORIES)}")

    @property
    def total(self) -> MemoryRow:
        return MemoryRow("total", *(sum(getattr(r, c) for r in self.rows) for c in ("nominal", "held", "fp32")))

    def table(self) -> str:
        """A text table: bytes per category and in total, then the peak and how it was measured."""
        head = ("category", "nominal", "held", "fp32")
        rows = [(r.category.replace("_", " "), f"{r.nominal:,}", f"{r.held:,}", f"{r.fp32:,}")
                for r in (*self.rows, self.total)]
        widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
        line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        lines = [f"{self.title}, batch {self.batch_size}: bytes" if self.title else f"batch {self.batch_size}: bytes",
                 line(head), line(tuple("-" * w for w in widths)), *map(line, rows[:-1]),
                 line(tuple("-" * w for w in widths)), line(rows[-1]),
                 *([] if self.peak is None else [f"peak held during the step: {self.peak:,}"]),
                 f"measured with {self.measured_with}"]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """``{"batch_size", "categories": {name: {"nominal", "held", "fp32"}}, "peak", "measured_with"}``."""
        return {"batch_size": self.batch_size,
                "categories": {r.category: {"nominal": r.nominal, "held": r.held, "fp32": r.fp32} for r in self.rows},
                "peak": self.peak, "measured_with": self.measured_with}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


# -- nominal bits ---------------------------------------------------------------------------------
def _block_dims(kind: str | None, role: str, ndim: int) -> tuple[int, ...]:
    """The dims an op of registry ``kind`` lays a block format's blocks of ``role`` along
    (``ops.bodies``, ``ops.conv_transpose``): the reduction of the GEMM the tensor feeds. A
    convolution's weight: in_channels and kernel (a transposed one's dim 0 and kernel); its
    other tensors: the channels; the second operand of a matmul: K; anything else: the last dim."""
    kind = kind or ""
    if kind.startswith("conv") and role not in ("bias", "grad_bias"):
        if role not in ("weight", "grad_weight"):
            return (1,)
        return (0, *range(2, ndim)) if kind.startswith("conv_transpose") else tuple(range(1, ndim))
    if kind in ("matmul", "addmm", "baddbmm") and role in ("weight", "grad_weight") and ndim > 1:
        return (-2,)
    return (-1,)


def _format_bits(shape: tuple[int, ...], fmt, blocks: tuple[int, ...]) -> int:
    """Bits of a tensor of ``shape`` in ``fmt``: its elements, and a scale per block of a block
    format, whose blocks run along ``blocks`` (a format's own axis, where it names one, instead)."""
    numel = math.prod(shape)
    if not isinstance(fmt, BlockFormat):
        return numel * fmt.bits
    ndim = max(len(shape), 1)
    dims = {d % ndim for d in ((fmt.axis,) if fmt.axis != -1 else blocks)} if shape else set()
    along = math.prod(shape[d] for d in dims)
    rows = numel // along if along else 0
    return numel * fmt.bits + rows * math.ceil(along / fmt.block_size) * SCALE_BITS


def _spec_bits(shape: tuple[int, ...], spec: QuantSpec, kind: str | None, role: str) -> int:
    """Bits of a role's tensor as the op rounds it (a role's ``axis`` overrides the op's blocks)."""
    blocks = (spec.axis,) if spec.axis is not None else _block_dims(kind, role, len(shape))
    return _format_bits(shape, spec.fmt, blocks)


def _dtype_bits(t: torch.Tensor) -> int:
    return t.numel() * t.element_size() * 8


def _fp32_bits(t: torch.Tensor) -> int:
    """Bits of t as fp32 (an integer tensor as it is)."""
    return t.numel() * 32 if t.is_floating_point() else _dtype_bits(t)


def _bytes(bits: int) -> int:
    return math.ceil(bits / 8)


@dataclass(frozen=True)
class _Use:
    """A parameter read by an op: the op's registry kind, the role, and the formats of the
    role and of its gradient (None: fp32)."""

    kind: str | None
    role: str
    spec: QuantSpec | None
    grad_spec: QuantSpec | None

    def bits(self, shape: tuple[int, ...], grad: bool = False) -> int | None:
        spec = self.grad_spec if grad else self.spec
        return None if spec is None else _spec_bits(shape, spec, self.kind, f"grad_{self.role}" if grad else self.role)


def _parameter_uses(cm: CompiledModel) -> dict[str, list[_Use]]:
    """Parameter name (``named_parameters``'s, one per tied parameter) -> the ops that read it
    as their ``weight`` or ``bias`` role."""
    names = {_storage(p): name for name, p in cm.named_parameters()}
    uses: dict[str, list[_Use]] = {}
    gm = cm.annotated
    for node, meta in cm.annotations():
        kind = kind_named(meta.kind)
        applied = {r: s.quant for r, s in meta.assignment.roles if r in meta.roles} if meta.assignment else {}
        for role in ("weight", "bias"):
            value = _operand(gm, node, kind, role)
            name = names.get(_storage(value)) if isinstance(value, torch.Tensor) else None
            if name is not None:
                uses.setdefault(name, []).append(_Use(meta.kind, role, applied.get(role), applied.get(f"grad_{role}")))
    return uses


def _operand(gm: torch.fx.GraphModule, node: torch.fx.Node, kind, role: str) -> Any:
    """The tensor a node reads as ``role`` where it is an attribute of the graph (a parameter),
    else None (no such operand, or an activation: the second operand of a matmul)."""
    if node.op == "call_module":
        return getattr(gm.get_submodule(node.target), role, None)
    where = (kind.params or {}).get(role) if kind is not None else None
    if where is None:
        return None
    i, key = where
    arg = node.args[i] if i < len(node.args) else node.kwargs.get(key)
    if not (isinstance(arg, torch.fx.Node) and arg.op == "get_attr"):
        return None
    return functools.reduce(getattr, arg.target.split("."), gm)


# -- the measured step ----------------------------------------------------------------------------
@dataclass
class _Saved:
    """A storage autograd saved for backward: its bits as fp32, and the nominal bits of each
    saving (the widest counts)."""

    fp32: int
    bits: list[int] = field(default_factory=list)


class _Recorder(torch.fx.Interpreter):
    """Runs a lowered graph node by node, recording what each op saves for backward and the
    nominal bits of each saving (the role under which the op reads the tensor)."""

    def __init__(self, gm: torch.fx.GraphModule, exclude: set[int]):
        super().__init__(gm)
        self.exclude = exclude  # storages of parameters and buffers: not activations
        self.saved: dict[int, _Saved] = {}
        self.live: dict[int, torch.Tensor] = {}  # a tensor of each saved storage, until measured
        self._pending: list[torch.Tensor] = []

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        if _storage(t) not in self.exclude:
            self._pending.append(t)
        return t

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.op not in ("call_function", "call_method", "call_module"):
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        self._pending = []
        out = getattr(self, n.op)(n.target, args, kwargs)
        outputs = {_storage(t) for t in tree_leaves(out) if isinstance(t, torch.Tensor)}
        for t in self._pending:
            role = _operand_role(n, args, kwargs, t) or ("output" if _storage(t) in outputs else None)
            self.live.setdefault(_storage(t), t)
            self.saved.setdefault(_storage(t), _Saved(_storage_fp32_bits(t))).bits.append(_saved_bits(n, role, t))
        self._pending = []
        return out


def _storage(t: torch.Tensor) -> int:
    """Which storage ``t`` views: its StorageImpl, not its data pointer, which is 0 for every
    freed storage (packed weights) and must not be read there."""
    return t.untyped_storage()._cdata


def _storage_fp32_bits(t: torch.Tensor) -> int:
    """Bits of t's whole storage as fp32 (an integer storage as it is)."""
    bits = t.untyped_storage().nbytes() * 8
    return bits // (t.element_size() * 8) * 32 if t.is_floating_point() else bits


def _operand_role(n: torch.fx.Node, args: tuple, kwargs: dict, t: torch.Tensor) -> str | None:
    """The role under which node ``n`` reads the saved ``t``: the op registry's position of
    the operand that shares t's storage, ``input`` for any other operand, None for no operand."""
    meta = mpc_meta(n)
    kind = kind_named(meta.kind) if meta is not None else None
    for role, (i, key) in ((kind.params or {}) if kind is not None else {}).items():
        value = args[i] if i < len(args) else kwargs.get(key)
        if isinstance(value, torch.Tensor) and _storage(value) == _storage(t):
            return role
    shares = any(isinstance(v, torch.Tensor) and _storage(v) == _storage(t) for v in tree_leaves((args, kwargs)))
    return "input" if shares else None


def _saved_bits(n: torch.fx.Node, role: str | None, t: torch.Tensor) -> int:
    """Nominal bits of a tensor node ``n`` saves: the format of ``role`` where the policy
    assigns it one and the op has the role, else t's dtype."""
    meta = mpc_meta(n)
    assignment = meta.assignment if meta is not None else None
    setting = dict(assignment.roles).get(role) if assignment is not None and role in meta.roles else None
    if setting is None or setting.quant is None or not t.is_floating_point():
        return _dtype_bits(t)
    return _spec_bits(tuple(t.shape), setting.quant, meta.kind, role)


def _batch(cm: CompiledModel, batch_size: int, inputs: Any, device: torch.device) -> Inputs:
    """``inputs`` as ``Inputs`` (their first dim must be ``batch_size``), or a batch of normal
    random values in the shapes of the compiled model's float inputs."""
    if inputs is not None:
        batch = as_inputs(inputs)
        sizes = {t.shape[0] for t in tree_leaves((batch.args, dict(batch.kwargs)))
                 if isinstance(t, torch.Tensor) and t.dim()}
        if sizes != {batch_size}:
            raise MpcompileError(f"memory_report: inputs= have batch sizes {sorted(sizes)}, not {batch_size}; give "
                                 f"a batch of {batch_size}, or leave inputs out for a random batch")
        return batch
    args = []
    for node in (n for n in cm.annotated.graph.nodes if n.op == "placeholder"):
        meta = mpc_meta(node)
        if meta is None or not meta.shape or meta.dtype is None or not meta.dtype.is_floating_point:
            raise MpcompileError(f"memory_report: the compiled model's input {node.name!r} is not a float tensor of "
                                 f"known shape (compile with example inputs records it); give inputs=, a batch of "
                                 f"{batch_size}")
        args.append(torch.randn((batch_size, *meta.shape[1:]), dtype=meta.dtype, device=device))
    return Inputs(tuple(args))


def _positional(gm: torch.fx.GraphModule, batch: Inputs) -> tuple:
    """The batch as the lowered graph's placeholders take it, in order."""
    bound = inspect.signature(gm.forward).bind(*batch.args, **dict(batch.kwargs))
    return tuple(bound.arguments.values())


def _held(*things: Any) -> int:
    """MemTracker's bytes of the storages of ``things`` (modules: parameters, buffers and
    gradients; optimizers: their states; tensors), each storage once."""
    tracker = MemTracker()
    tracker.track_external(*things)
    return sum(snap["Total"] for snap in tracker.get_tracker_snapshot().values())


def _held_as(category: str, module: nn.Module) -> int:
    """MemTracker's bytes of one category (``Parameter``, ``Gradient``) of a module's tensors."""
    tracker = MemTracker()
    tracker.track_external(module)
    return sum(v for snap in tracker.get_tracker_snapshot().values() for k, v in snap.items() if k == category)


@dataclass
class _Measured:
    """What a measured step saved for backward, and what MemTracker counted live (bytes by category)."""

    saved: dict[int, _Saved]
    held: dict[str, int]
    peak: int | None
    measured_with: str


def _step(model: CompiledModel, optimizer, batch: Inputs, device: torch.device) -> _Measured:
    """One forward (recording what is saved for backward), backward and optimizer step, and
    MemTracker's count of what is live after each. MemTracker's dispatch mode does not run
    through the step itself: the backward formulas of mpcompile's ops call ``torch.func.vjp``,
    whose wrapper tensors have no storage for it to read."""
    gm = model.graph_module
    exclude = {_storage(t) for t in (*model.parameters(), *model.buffers(), *gm.buffers())}
    recorder = _Recorder(gm, exclude)
    cuda = device.type == "cuda"
    if cuda:  # the peak above what is allocated now, plus the model's own parameters and buffers
        resident = _held(model)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    held: dict[str, int] = {}
    args = tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in _positional(gm, batch))
    with torch.autograd.graph.saved_tensors_hooks(recorder.pack, lambda t: t):
        out = recorder.run(*args)
    held["activations"] = _held(*recorder.live.values())
    recorder.live.clear()  # backward frees them
    outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
    if not outputs:
        raise MpcompileError("memory_report: no output of the model depends on its parameters: there is no "
                             "backward to measure")
    torch.autograd.backward(outputs, [torch.ones_like(t) for t in outputs])
    del out, outputs
    held["parameters"] = _held_as("Parameter", model)  # before the step: packed weights are freed by it
    held["gradients"] = _held_as("Gradient", model)
    optimizer.step()
    held["optimizer_states"] = _held(*_state_tensors(optimizer))
    held["master_weights"] = _held(*_weight_codes(optimizer))
    how = "torch's MemTracker (track_external: live storages, each once)"
    if not cuda:
        return _Measured(recorder.saved, held, None, f"{how} on {device}; activations: saved_tensors_hooks")
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before + resident
    how += f" on {device}, in the caching allocator's 512-byte blocks"
    return _Measured(recorder.saved, held, peak, f"{how}; activations: saved_tensors_hooks; "
                                                 f"peak: torch.cuda.max_memory_allocated")


# -- optimizer states -----------------------------------------------------------------------------
@dataclass(frozen=True)
class _State:
    """One optimizer state: the tensors that hold it, its value shape and dtype, and its format."""

    tensors: tuple[torch.Tensor, ...]
    shape: tuple[int, ...]
    floating: bool
    fmt: Any


def _states(optimizer) -> list[_State]:
    """Every state the optimizer keeps between steps: torch's state tensors, the codes of packed
    states, SWALP's averages."""
    swalp = optimizer if isinstance(optimizer, SWALP) else None
    low = swalp.optimizer if swalp is not None else optimizer
    params = [p for group in low.param_groups for p in group["params"]]
    settings = low.settings
    saved = low.state_dict()
    out = []
    for i, state in saved["optimizer"]["state"].items():
        for key, t in state.items():
            if isinstance(t, torch.Tensor):
                fmt = getattr(settings, STATE_ROLES[key]) if key in STATE_ROLES else None
                out.append(_State((t,), tuple(t.shape), t.is_floating_point(), fmt))
    for name, (codes, scales) in saved["packed"].items():
        i, key = name.split(":")
        param = params[int(i)]
        out.append(_State(tuple(t for t in (codes, scales) if t is not None), tuple(param.shape), True,
                          getattr(settings, STATE_ROLES[key])))
    out += [_State((avg,), tuple(avg.shape), True, None) for avg in (swalp.average if swalp is not None else ())]
    return out


def _weight_codes(optimizer) -> list[torch.Tensor]:
    """The codes (and scales) of the weights an optimizer keeps packed between steps."""
    low = optimizer.optimizer if isinstance(optimizer, SWALP) else optimizer
    return [t for pair in low.state_dict().get("weights", {}).values() for t in pair if t is not None]


def _state_tensors(optimizer) -> Iterator[torch.Tensor]:
    return (t for state in _states(optimizer) for t in state.tensors)


def _state_row(optimizer, held: int) -> MemoryRow:
    nominal = fp32 = 0
    for s in _states(optimizer):
        own = sum(_dtype_bits(t) for t in s.tensors)
        nominal += _format_bits(s.shape, s.fmt, (-1,)) if s.fmt is not None else own
        fp32 += math.prod(s.shape) * 32 if s.floating else own
    return MemoryRow("optimizer_states", _bytes(nominal), held, _bytes(fp32))


# -- the report -----------------------------------------------------------------------------------
def _parameter_rows(model: CompiledModel, uses: dict[str, list[_Use]], master, gradient,
                    held: dict[str, int]) -> list[MemoryRow]:
    """Rows for the parameters, the master weights and the gradients. A parameter counts at the
    widest format an op reads it in, where that is not the master format; the master weights
    are then a copy of it in the master format (its dtype where unset). Where every op reads it
    as stored (no role format, or the master format itself), the parameter is its master copy."""
    nominal = dict.fromkeys(("parameters", "master_weights", "gradients"), 0)
    fp32 = dict(nominal)
    for name, p in model.named_parameters():
        shape, read = tuple(p.shape), uses.get(name, [])
        stored = _format_bits(shape, master, (-1,)) if master is not None else _dtype_bits(p)
        other = [u.bits(shape) for u in read if u.spec is not None and not _reads_master(u, shape, master, stored)]
        nominal["parameters"] += max(other, default=stored)
        nominal["master_weights"] += stored if other else 0
        fp32["parameters"] += _fp32_bits(p)
        if p.grad is not None:
            grads = [b for b in (u.bits(shape, grad=True) for u in read) if b is not None]
            nominal["gradients"] += _format_bits(shape, gradient, (-1,)) if gradient is not None else \
                max(grads, default=_dtype_bits(p.grad))
            fp32["gradients"] += _fp32_bits(p.grad)
    return [MemoryRow(c, _bytes(nominal[c]), held.get(c, 0), _bytes(fp32[c])) for c in nominal]


def _reads_master(use: _Use, shape: tuple[int, ...], master, stored: int) -> bool:
    """Whether an op reads a parameter in the master format as it is stored (unscaled, the same blocks)."""
    spec = use.spec
    return master is not None and spec.fmt == master and spec.scaling == "none" and use.bits(shape) == stored


def _activation_row(saved: dict[int, _Saved], held: int) -> MemoryRow:
    return MemoryRow("activations", _bytes(sum(max(s.bits) for s in saved.values())), held,
                     _bytes(sum(s.fp32 for s in saved.values())))


def memory_report(cm: CompiledModel, batch_size: int, *, optimizer: str | None = None,
                  inputs: Any = None) -> MemoryReport:
    """Bytes per category of one training step of ``cm``: nominal, held (measured) and fp32
    (the module docstring defines them). The step runs on a copy of the model, in train mode:
    ``cm``, its parameters and torch's random state are left as they were.

    Args:
        cm: the compiled model.
        batch_size: the batch the step runs on (activations grow with it).
        optimizer: the optimizer kind (``sgd``, ``adam``, ``adamw``, ``swalp``); None: the
            policy's ``optimizer.kind``, else ``sgd``. It stores what the policy's
            ``optimizer:`` section says.
        inputs: the batch (a tensor, a tuple of positional or a mapping of keyword arguments),
            each tensor's first dim ``batch_size``; None: normal random values in the shapes of
            the example inputs ``cm`` was compiled with.

    Raises:
        MpcompileError: a batch size below 1, inputs of another batch size or none to make, an
            optimizer kind that needs a full gradient (svrg, lpsvrg, halp), an output that no
            parameter reaches.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise MpcompileError(f"memory_report: batch_size must be a positive integer, got {batch_size!r}")
    settings = cm.policy.optimizer
    kind = optimizer_kind(optimizer, settings)
    if kind in VARIANCE_REDUCED:
        raise MpcompileError(f"memory_report: optimizer {kind} takes its steps with a full gradient over a data set, "
                             f"which one step on one batch cannot measure; measure sgd, adam, adamw or swalp")
    device = next((p.device for p in cm.parameters()), torch.device("cpu"))
    uses = _parameter_uses(cm)
    unpack_parameters(cm)  # a deep copy reads them
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # the random batch too
        batch = _batch(cm, batch_size, inputs, device)
        model = copy.deepcopy(cm).train()
        if "train" not in model.modes:  # its first call in train mode captures that mode's code
            with torch.no_grad():
                model(*batch.args, **dict(batch.kwargs))
        model.zero_grad(set_to_none=True)
        opt = make_optimizer(kind, model.parameters(), 1e-3, settings, steps_per_epoch=1, module=model)
        measured = _step(model, opt, batch, device)
        rows = [*_parameter_rows(model, uses, settings.master, settings.gradient, measured.held),
                _state_row(opt, measured.held["optimizer_states"]),
                _activation_row(measured.saved, measured.held["activations"])]
    order = {c: i for i, c in enumerate(CATEGORIES)}
    title = f"{type(cm.source).__name__} under policy '{cm.policy.name}', optimizer {kind}"
    return MemoryReport(batch_size, tuple(sorted(rows, key=lambda r: order[r.category])), measured.peak,
                        measured.measured_with, title)
