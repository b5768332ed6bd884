"""Monitoring while training: what the assigned formats do to the numbers, every few steps.

On a monitored step the trainer runs the compiled model's forward through ``Monitor.forward``,
an fx interpreter over the lowered graph that notes which op runs, and hooks each op's backward
node so that its backward is noted too. Every rounding of a role in the step, forward and
backward, and every value the optimizer stores in a format, reaches the monitor through
``mpcompile.ops.observe`` with its value before and after rounding. The monitor only reads:
a monitored step computes exactly what an unmonitored one does.

Per op (a parameter, for the optimizer's roles) and role, a row of ``monitor.jsonl`` holds:

- ``zero``: the share of exact zeros in the value before rounding;
- ``overflow``: finite values beyond the format's largest (saturated, or inf/NaN after rounding);
- ``underflow``: nonzero values that rounded to zero;
- ``subnormal``: values that rounded to a nonzero value below the format's smallest normal;
- ``sqnr_db``: 10 log10(sum x^2 / sum (q - x)^2) of the rounded q against the value x (inf
  where exact; null where x is all zero or not finite);
- ``stagnation`` (``master`` rows): the share of the weights whose update, nonzero, is below
  half a unit in the last place of the weight in its stored format, so rounding loses it;
- ``hist_lo`` and ``hist``: counts of floor(log2|x|) for the nonzero finite values, bin i
  holding exponent ``hist_lo + i``, beside the format's ``min_subnormal``, ``min_normal`` and
  ``max`` (null for a role scaled before rounding, whose values the range does not bound).

``update`` rows hold the step the optimizer applied to each parameter (after minus before), and
its ``stagnation`` the share of parameters with a nonzero gradient that did not move. Rows also
go to TensorBoard event files in ``tb/`` (one histogram and scalars per op/role).
"""
from __future__ import annotations

import contextlib
import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from ..compiler import CompiledModel
from ..formats import FixedFormat, FloatFormat, parse
from ..ops.observe import observing
from ..ops.registry import kind_named
from ..policy import MonitorSettings
from .optim import unpack_parameters

__all__ = ["Monitor", "RoleRecord", "number_stats"]

_MPC_BACKWARD = "GeneratedBackwardFor_mpc_"  # autograd's name for an mpc:: op's backward node
_DTYPE_FORMATS = {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass
class RoleRecord:
    """One row of ``monitor.jsonl``: one op's role at one step (see the module docstring)."""

    step: int
    epoch: int
    op: str
    module: str
    role: str
    format: str
    min_subnormal: float | None
    min_normal: float | None
    max: float | None
    count: int
    zero: float
    overflow: float
    underflow: float
    subnormal: float
    sqnr_db: float | None
    stagnation: float | None
    hist_lo: int
    hist: list[int]


def number_stats(raw: torch.Tensor, rounded: torch.Tensor, fmt, *, scaled: bool = False,
                 histograms: bool = True) -> dict[str, Any]:
    """Shares, SQNR and the exponent histogram of ``raw`` rounded to ``rounded`` in ``fmt``.

    Args:
        raw, rounded: the value before and after rounding (same shape).
        fmt: the format (a value of ``mpcompile.formats``).
        scaled: the value was scaled before rounding: the format's range does not bound it.
        histograms: compute the histogram (else ``hist`` is empty).
    """
    x, q = raw.detach().double().flatten(), rounded.detach().double().flatten()
    n = max(x.numel(), 1)
    finite = torch.isfinite(x)
    nonzero = finite & (x != 0)
    top = math.inf if scaled else fmt.max
    overflow = finite & ((x.abs() > top) | ~torch.isfinite(q))
    underflow = nonzero & (q == 0)
    subnormal = (q != 0) & (q.abs() < fmt.min_normal) if not scaled else torch.zeros_like(finite)
    signal, noise = (x[finite] ** 2).sum(), ((q - x)[finite] ** 2).sum()
    sqnr = None
    if bool(finite.all()) and signal > 0 and math.isfinite(float(noise)):
        sqnr = math.inf if noise == 0 else 10 * math.log10(float(signal / noise))
    lo, hist = 0, []
    if histograms and bool(nonzero.any()):
        exponents = torch.frexp(x[nonzero]).exponent - 1  # floor(log2|x|)
        lo = int(exponents.min())
        hist = torch.bincount(exponents - lo).tolist()
    limits = (None, None, None) if scaled else (fmt.min_subnormal, fmt.min_normal, fmt.max)
    return dict(format=str(fmt), min_subnormal=limits[0], min_normal=limits[1], max=limits[2], count=x.numel(),
                zero=float(((x == 0).sum()) / n), overflow=float(overflow.sum() / n),
                underflow=float(underflow.sum() / n), subnormal=float(subnormal.sum() / n), sqnr_db=sqnr,
                hist_lo=lo, hist=hist)


def _ulp(w: torch.Tensor, fmt) -> torch.Tensor | None:
    """The spacing of ``fmt`` at each value of ``w`` (None for a format without one fixed grid)."""
    if isinstance(fmt, FixedFormat):
        return torch.full_like(w, 2.0 ** -fmt.fl)
    if isinstance(fmt, FloatFormat):
        exponent = torch.clamp_min(torch.frexp(w).exponent - 1, fmt.emin)
        return torch.ldexp(torch.ones_like(w), exponent - fmt.man)
    return None


class Monitor:
    """Records ``settings.roles`` of the ops ``settings.ops`` selects, every ``settings.every`` steps.

    Args:
        model: the compiled model being trained (a plain module: the optimizer's roles only).
        settings: the policy's ``monitor:`` section.
        out: the run folder: ``monitor.jsonl`` and ``tb/`` are written there.
        append: add to the rows already there (a resumed run) instead of starting them anew.
    """

    def __init__(self, model, settings: MonitorSettings, out: Path, *, append: bool = False):
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only where monitoring is on

        self.model, self.settings, self.out = model, settings, Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(str(self.out / "tb"))
        self.rows = (self.out / "monitor.jsonl").open("a" if append else "w")
        self._names = {id(p): name for name, p in model.named_parameters()}
        self._current: tuple[str, str] | None = None  # (op, module) whose roundings arrive now
        self._seen: dict[tuple[str, str], dict] = {}
        self._before: dict[str, torch.Tensor] = {}  # the weights as the monitored step found them
        self._step = self._epoch = 0
        unrecorded = [meta.name for meta in self._quantized_elsewhere()]
        if unrecorded:
            warnings.warn(f"mpcompile monitor: records the roles of GEMM-like ops and the optimizer's; the quantized "
                          f"roles of {', '.join(unrecorded)} (elementwise, norm, activation ops) are not recorded",
                          stacklevel=2)

    def _quantized_elsewhere(self) -> list:
        """The metadata of selected ops with quantized roles that are not GEMM-like: their
        roundings are ``mpc::quant`` nodes, which do not say which op and role they round for."""
        if not isinstance(self.model, CompiledModel):  # a plain module: only the optimizer's roles are recorded
            return []
        metas = [node.meta.get("mpc") for node in self.model.graph_module.graph.nodes
                 if self._selected(node) is not None]
        return [m for m in metas if (kind_named(m.kind) is None or not kind_named(m.kind).is_gemm)]

    def due(self, step: int) -> bool:
        """Whether training step ``step`` (counted from 0 over the run) is monitored."""
        return step % self.settings.every == 0

    def _selected(self, node: torch.fx.Node) -> tuple[str, str] | None:
        meta = node.meta.get("mpc")
        if meta is None or meta.assignment is None or not meta.assignment.quantizes:
            return None
        if self.settings.ops and not any(selector.matches(meta.facts) for selector in self.settings.ops):
            return None
        return node.name if meta.source is None else meta.source, meta.name

    @contextlib.contextmanager
    def step(self, step: int, epoch: int) -> Iterator[None]:
        """Observe one training step (forward through ``forward``, backward, optimizer step)."""
        self._step, self._epoch, self._seen = step, epoch, {}
        params = dict(self.model.named_parameters())
        unpack_parameters(self.model)  # packed weights (optimizer.storage: packed) are read here, not by a forward
        self._before = {name: p.detach().clone() for name, p in params.items()}
        with observing(self._observe):
            yield
        self.attribute(None)
        unpack_parameters(self.model)
        if "update" in self.settings.roles:
            for name, p in params.items():
                self._record_update(name, p, self._before[name])
        self._before = {}
        self._flush()

    def forward(self, *args) -> Any:
        """The compiled model's forward on ``args``, each op's roundings attributed to it."""
        if not self.model.mode_captured:  # this call captures the mode's graph: the ops go unrecorded this once
            return self.model(*args)
        return _Attributing(self.model.graph_module, self).run(*args)

    def attribute(self, where: tuple[str, str] | None) -> None:
        """Roundings that arrive from now on are op ``where`` = (op, module)'s (None: no op's)."""
        self._current = where

    def _observe(self, role: str, raw: torch.Tensor, rounded: torch.Tensor, spec, key) -> None:
        if role not in self.settings.roles:
            return
        if key is not None:  # an optimizer's store: key is the parameter
            name = self._names[id(key)]
            where = (name, name.rpartition(".")[0])
        elif self._current is None:
            return
        else:
            where = self._current
        if (where, role) in self._seen:  # a role rounded twice in a step (both GEMMs of a backward)
            return
        fmt, scaled = (spec.fmt, spec.scaling != "none") if hasattr(spec, "scaling") else (spec, False)
        stats = number_stats(raw, rounded, fmt, scaled=scaled, histograms=self.settings.histograms)
        stats["stagnation"] = None
        if role == "master":
            stats["stagnation"] = self._stagnation(where[0], raw, fmt)
        self._seen[where, role] = stats

    def _stagnation(self, name: str, raw: torch.Tensor, fmt) -> float | None:
        """Share of the weights whose nonzero update is below half a ulp of the stored weight."""
        p = self._before[name]
        update = raw.detach() - p  # raw: the weight after torch's step, before its rounding
        ulp = _ulp(p, fmt)
        moved = update != 0
        if ulp is None or not bool(moved.any()):
            return None if ulp is None else 0.0
        return float((moved & (update.abs() < ulp / 2)).sum() / moved.sum())

    def _record_update(self, name: str, p: torch.Tensor, before: torch.Tensor) -> None:
        update = p.detach() - before
        stats = number_stats(update, update, parse(_DTYPE_FORMATS[p.dtype]), histograms=self.settings.histograms)
        pushed = None if p.grad is None else p.grad != 0
        stats["stagnation"] = (float((pushed & (update == 0)).sum() / pushed.sum())
                               if pushed is not None and bool(pushed.any()) else None)
        stats["sqnr_db"] = None  # the update is what was applied: nothing rounded it here
        self._seen[(name, name.rpartition(".")[0]), "update"] = stats

    def _flush(self) -> None:
        for ((op, module), role), stats in self._seen.items():
            record = RoleRecord(self._step, self._epoch, op, module, role, **stats)
            self.rows.write(json.dumps(asdict(record)) + "\n")
            tag = f"{op}/{role}"
            for key in ("zero", "overflow", "underflow", "subnormal", "sqnr_db", "stagnation"):
                value = stats[key]
                if value is not None and math.isfinite(value):
                    self.writer.add_scalar(f"{tag}/{key}", value, self._step)
            if record.hist:
                self._histogram(tag, record)
        self.rows.flush()
        self.writer.flush()

    def _histogram(self, tag: str, record: RoleRecord) -> None:
        exponents = torch.arange(record.hist_lo, record.hist_lo + len(record.hist), dtype=torch.float64)
        counts = torch.tensor(record.hist, dtype=torch.float64)
        self.writer.add_histogram_raw(f"{tag}/log2_abs", min=float(exponents[counts > 0].min()),
                                      max=float(exponents[counts > 0].max()), num=int(counts.sum()),
                                      sum=float((exponents * counts).sum()),
                                      sum_squares=float((exponents ** 2 * counts).sum()),
                                      bucket_limits=(exponents + 1).tolist(), bucket_counts=record.hist,
                                      global_step=self._step)

    def close(self) -> None:
        self.rows.close()
        self.writer.close()


class _Attributing(torch.fx.Interpreter):
    """Runs the lowered graph node by node (the same calls the graph's code makes), noting the
    op whose roundings arrive, in forward and, through hooks on the ops' backward nodes, backward."""

    def __init__(self, gm: torch.fx.GraphModule, monitor: Monitor):
        super().__init__(gm)
        self.monitor = monitor

    def run_node(self, node: torch.fx.Node) -> Any:
        where = self.monitor._selected(node)
        self.monitor.attribute(where)
        out = super().run_node(node)
        self.monitor.attribute(None)
        if where is not None and isinstance(out, torch.Tensor) and out.grad_fn is not None:
            backward = _mpc_backward(out.grad_fn)
            if backward is not None:  # autograd runs one node at a time: its roundings are this op's
                backward.register_prehook(lambda grads, where=where: self.monitor.attribute(where))
                backward.register_hook(lambda grads_in, grads_out: self.monitor.attribute(None))
        return out


def _mpc_backward(grad_fn, depth: int = 4):
    """The backward node of the ``mpc::`` op behind an output (a few view / copy nodes deep)."""
    frontier = [grad_fn]
    for _ in range(depth):
        for fn in frontier:
            if fn is not None and fn.name().startswith(_MPC_BACKWARD):
                return fn
        frontier = [nxt for fn in frontier if fn is not None for nxt, _ in fn.next_functions]
    return None
