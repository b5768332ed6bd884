"""The HTML report of a run: ``mpcompile report RUN`` writes ``RUN/report.html`` and the PNGs in ``RUN/report/``.

The report reads the run folder only (``monitor.jsonl``, and where present ``summary.json``,
``memory.json`` and the trainer's ``curves.png`` / ``trust_region.png``); it never loads the
model. ``report.html`` is one self-contained page: its images are embedded as base64 data URIs
(and saved beside it), its style is inline, it has no scripts, so a browser opens it from the
disk without a server, and it can be mailed or archived as one file.

The page holds a header with the run's summary, a table of layers (one row per op and role:
the formats it had, and at the last monitored step its overflow, underflow, subnormal and zero
shares, SQNR and stagnation), the memory table when the run measured one, and two figures per
layer:

- **Exponent heat map** (``report/<op>.exponents.png``), one panel per role. x is the record's
  training step, y the binary exponent e = floor(log2|x|) of the nonzero finite values (a bin spans
  [2^e, 2^(e+1))), and the colour the log10 of the share of those values in the bin at that
  step (blank: none). The lines are the role's format at that step: log2 of its largest finite
  value (above it values overflow), of its smallest normal (below it they lose precision as
  subnormals) and of its smallest subnormal (below it they flush to zero), so the part of the
  distribution that falls outside the format reads off directly, and a drift of the
  distribution over training shows as a slope. A line more than 24 exponents beyond the data
  (fp32's, bf16's range) is not drawn; the panel names it "off scale" (at all steps or some).
- **Shares and SQNR** (``report/<op>.shares.png``): per role against the step, the share of
  the values that overflow, that underflow (flush to zero), that land subnormal (on a
  symmetric-log scale: linear below 1e-6, so a zero share shows as 0), the SQNR in dB of the
  role's values rounded to its format against fp32 (an exact rounding, +inf, and an undefined
  one are gaps), and, where the monitor measures it (weights, master weights), the stagnation:
  the share of updates lost to rounding.
"""
from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from .errors import MpcompileError
from .policy import MONITOR_ROLES

__all__ = ["Record", "Layer", "ROLES", "write_report", "read_records", "group_layers", "exponent_shares",
           "exponent_figure", "shares_figure"]

ROLES = MONITOR_ROLES  # the order the report lists a layer's roles in; others follow, alphabetically
OFF_SCALE = 24  # format lines further than this many exponents from the data are not drawn
TRAINER_PLOTS = ("curves.png", "trust_region.png")


@dataclasses.dataclass(frozen=True)
class Record:
    """One line of ``monitor.jsonl``: one role of one op at one step. Ranges, SQNR and
    stagnation are NaN where the line has null (stagnation: roles other than weights)."""

    step: int
    epoch: int
    op: str
    module: str
    role: str
    format: str
    min_subnormal: float
    min_normal: float
    max: float
    count: int
    zero: float
    overflow: float
    underflow: float
    subnormal: float
    sqnr_db: float
    stagnation: float
    hist_lo: int
    hist: tuple[int, ...]


_FLOATS = {"min_subnormal", "min_normal", "max", "zero", "overflow", "underflow", "subnormal", "sqnr_db", "stagnation"}
_OPTIONAL = {"stagnation"}  # may be left out of a line, like null


@dataclasses.dataclass
class Layer:
    """An op's records by role, each list in step order."""

    op: str
    module: str
    roles: dict[str, list[Record]]


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)


def _record(obj: Any, where: str) -> Record:
    if not isinstance(obj, dict):
        raise MpcompileError(f"{where}: a monitor record must be a JSON object, not {type(obj).__name__}")
    missing = [f.name for f in dataclasses.fields(Record) if f.name not in obj and f.name not in _OPTIONAL]
    if missing:
        raise MpcompileError(f"{where}: the record has no {', '.join(missing)}; it was not written by mpcompile's "
                             f"monitor, or by an older one: train again with --monitor")
    try:
        values = {f.name: _number(obj.get(f.name)) if f.name in _FLOATS else obj[f.name]
                  for f in dataclasses.fields(Record)}
        values.update(step=int(values["step"]), epoch=int(values["epoch"]), count=int(values["count"]),
                      hist_lo=int(values["hist_lo"]), hist=tuple(int(c) for c in values["hist"]),
                      module=values["module"] or "")
    except (TypeError, ValueError, OverflowError) as err:
        raise MpcompileError(f"{where}: a value of the wrong type ({err}); the record is damaged") from None
    return Record(**values)


def read_records(path: Path) -> list[Record]:
    """The records of a ``monitor.jsonl``, in file order.

    Args:
        path: the file. Python's ``Infinity`` and ``NaN`` tokens are read as floats.

    Raises:
        MpcompileError: a line that is not a monitor record (named ``file:line``), or no records.
    """
    records = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise MpcompileError(f"{path}:{i}: not JSON ({err.msg}, column {err.colno}); a run killed mid-write "
                                 f"leaves a cut last line: delete it") from None
        records.append(_record(obj, f"{path}:{i}"))
    if not records:
        raise MpcompileError(f"{path} holds no records: the run was monitored for no step; train longer with --monitor")
    return records


def _role_key(role: str) -> tuple[int, str]:
    return (ROLES.index(role), "") if role in ROLES else (len(ROLES), role)


def group_layers(records: list[Record]) -> list[Layer]:
    """Records by op (in the order ops first appear) and role (in ``ROLES`` order), each role's
    in step order; of two records of one step (a run resumed from a checkpoint older than its
    monitor's last lines), the later line wins."""
    by_op: dict[str, dict[str, dict[int, Record]]] = {}
    modules: dict[str, str] = {}
    for r in records:
        by_op.setdefault(r.op, {}).setdefault(r.role, {})[r.step] = r
        modules[r.op] = r.module or modules.get(r.op, "")
    return [Layer(op, modules[op], {role: [steps[s] for s in sorted(steps)]
                                    for role, steps in sorted(roles.items(), key=lambda kv: _role_key(kv[0]))})
            for op, roles in by_op.items()]


def exponent_shares(series: list[Record]) -> tuple[np.ndarray, np.ndarray]:
    """The heat map's data: the exponents and, per exponent and step, the share of the step's
    nonzero finite values with that exponent.

    Args:
        series: one role's records, in step order.

    Returns:
        ``(exponents, shares)``: the exponents from the lowest to the highest bin of the records
        that count any value (empty if none does), and an array of shape (len(exponents),
        len(series)); a step without nonzero finite values has a column of zeros.
    """
    counted = [(j, r) for j, r in enumerate(series) if sum(r.hist)]
    if not counted:
        return np.zeros(0, dtype=int), np.zeros((0, len(series)))
    lo = min(r.hist_lo for _, r in counted)
    hi = max(r.hist_lo + len(r.hist) for _, r in counted)
    shares = np.zeros((hi - lo, len(series)))
    for j, r in counted:
        hist = np.asarray(r.hist, dtype=float)
        shares[r.hist_lo - lo:r.hist_lo - lo + len(hist), j] = hist / hist.sum()
    return np.arange(lo, hi), shares


def _edges(steps: np.ndarray) -> np.ndarray:
    """Cell edges around each step: half way to its neighbours (steps may be unevenly spaced)."""
    if len(steps) == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    mid = (steps[1:] + steps[:-1]) / 2
    return np.concatenate([[2 * steps[0] - mid[0]], mid, [2 * steps[-1] - mid[-1]]])


def _grid(n: int, cols: int, width: float, height: float) -> tuple[Figure, list]:
    """A figure of ``n`` panels, ``cols`` to a row, each ``width`` x ``height`` inches."""
    cols = min(n, cols)
    rows = -(-n // cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, list(axes[:n])


_LINES = (("max", "max", "tab:red"), ("min_normal", "min normal", "tab:orange"),
          ("min_subnormal", "min subnormal", "tab:blue"))


def _format_lines(ax, series: list[Record], steps: np.ndarray, exponents: np.ndarray) -> None:
    """The format's range at each step as step lines; those far off the data are named in a corner."""
    lo, hi = (exponents[0], exponents[-1] + 1) if len(exponents) else (-OFF_SCALE / 2, OFF_SCALE / 2)
    off = []
    for field, label, colour in _LINES:
        values = np.log2([getattr(r, field) if getattr(r, field) > 0 else math.nan for r in series])
        if np.isnan(values).all():
            continue  # the format has no such bound (fixed point's subnormals) or the monitor left it null
        shown = np.where((values >= lo - OFF_SCALE) & (values <= hi + OFF_SCALE), values, math.nan)
        if np.isnan(shown).all():
            off.append(label)
        else:
            ax.step(steps, shown, where="mid", color=colour, lw=1.2)
            if np.isnan(shown).sum() > np.isnan(values).sum():  # precision changed to a wider format
                off.append(f"{label} (some steps)")
    if off:
        ax.text(0.02, 0.98, "off scale:\n" + "\n".join(off), transform=ax.transAxes, va="top", fontsize=7,
                bbox={"facecolor": "white", "alpha": 0.8, "linewidth": 0}, in_layout=False)


def exponent_figure(layer: Layer) -> Figure:
    """The exponent heat map of ``layer``, one panel per role (see the module docstring)."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    fig, axes = _grid(len(layer.roles), 4, 3.6, 2.8)
    data = {role: exponent_shares(series) for role, series in layer.roles.items()}
    positive = [s[s > 0] for _, s in data.values() if (s > 0).any()]
    vmin = math.floor(min(np.log10(p).min() for p in positive)) if positive else -1.0
    mesh = None
    for ax, (role, series) in zip(axes, layer.roles.items()):
        exponents, shares = data[role]
        steps = np.array([r.step for r in series], dtype=float)
        if len(exponents):
            mesh = ax.pcolormesh(_edges(steps), np.arange(exponents[0], exponents[-1] + 2),
                                 np.ma.log10(np.ma.masked_less_equal(shares, 0)), cmap="viridis", vmin=vmin, vmax=0)
        else:
            ax.text(0.5, 0.5, "no nonzero finite values", ha="center", va="center", transform=ax.transAxes)
        _format_lines(ax, series, steps, exponents)
        ax.set(xlabel="step", ylabel="exponent (log2 |x|)")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{role}: {_formats(series)}", fontsize=9)
    if mesh is not None:
        fig.colorbar(mesh, ax=axes, label="log10 share of nonzero values")
    fig.legend(handles=[Line2D([], [], color=colour, label=label) for _, label, colour in _LINES],
               loc="outside lower center", ncols=len(_LINES), fontsize=8)
    fig.suptitle(_layer_title(layer))
    return fig


def _role_colours(layer: Layer) -> dict[str, Any]:
    """A colour per role, the same in every layer's figure: tab20's ten dark colours for the
    monitor's first ten roles, then its light ones."""
    from matplotlib import colormaps

    order = ROLES + tuple(sorted(set(layer.roles) - set(ROLES)))
    return {role: colormaps["tab20"](order.index(role) % 10 * 2 + order.index(role) // 10 % 2) for role in layer.roles}


def shares_figure(layer: Layer) -> Figure:
    """Overflow, underflow and subnormal shares, SQNR and (where measured) stagnation of each
    role of ``layer`` against the step (see the module docstring)."""
    panels = [("overflow", "overflow share"), ("underflow", "underflow share"), ("subnormal", "subnormal share"),
              ("sqnr_db", "SQNR (dB)")]
    if any(not math.isnan(r.stagnation) for series in layer.roles.values() for r in series):
        panels.append(("stagnation", "stagnation share"))
    fig, axes = _grid(len(panels), 5, 2.8, 2.4)
    colours = _role_colours(layer)
    for ax, (field, label) in zip(axes, panels):
        for role, series in layer.roles.items():
            values = np.array([getattr(r, field) for r in series], dtype=float)
            values[~np.isfinite(values)] = math.nan  # +inf SQNR (exact) and undefined values: gaps
            if not np.isnan(values).all():
                ax.plot([r.step for r in series], values, color=colours[role], lw=1.2, marker=".", ms=3, label=role)
        if not ax.lines:
            ax.text(0.5, 0.5, "no finite values" + ("\n(exact or undefined)" if field == "sqnr_db" else ""),
                    ha="center", va="center", transform=ax.transAxes, fontsize=8)
        ax.set(xlabel="step", ylabel=label)
        if field != "sqnr_db":
            ax.set_yscale("symlog", linthresh=1e-6)
            ax.set_ylim(0, 1)
    handles = {label: h for ax in axes for h, label in zip(*ax.get_legend_handles_labels())}
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="outside right upper", fontsize=8)
    fig.suptitle(_layer_title(layer))
    return fig


def _layer_title(layer: Layer) -> str:
    return layer.op + (f" ({layer.module})" if layer.module and layer.module != layer.op else "")


def _formats(series: list[Record]) -> str:
    """The formats a role had, in the order it had them (several where precision changed)."""
    return " → ".join(dict.fromkeys(r.format for r in series))


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    return buffer.getvalue()


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _share(x: float) -> str:
    return "—" if math.isnan(x) else "0" if x == 0 else f"{100 * x:.3g} %"


def _sqnr(x: float) -> str:
    return "—" if math.isnan(x) else "exact" if x == math.inf else f"{x:.1f} dB"


def _slug(op: str) -> str:
    """``op`` as a file name and HTML id (fx node names are identifiers already; export's may not be)."""
    return re.sub(r"[^\w.-]", "_", op)


def _layers_table(layers: list[Layer]) -> str:
    head = ("op", "module", "role", "format", "overflow", "underflow", "subnormal", "zero", "SQNR", "stagnation")
    rows = []
    for layer in layers:
        for k, (role, series) in enumerate(layer.roles.items()):
            last = series[-1]
            cells = "" if k else (f'<td rowspan="{len(layer.roles)}"><a href="#op-{_slug(layer.op)}">'
                                  f'{html.escape(layer.op)}</a></td><td rowspan="{len(layer.roles)}">'
                                  f'{html.escape(layer.module)}</td>')
            overflow = ' class="bad"' if last.overflow > 0 else ""
            cells += (f"<td>{html.escape(role)}</td><td>{html.escape(_formats(series))}</td>"
                      f"<td{overflow}>{_share(last.overflow)}</td><td>{_share(last.underflow)}</td>"
                      f"<td>{_share(last.subnormal)}</td><td>{_share(last.zero)}</td><td>{_sqnr(last.sqnr_db)}</td>"
                      f"<td>{_share(last.stagnation)}</td>")
            rows.append(f'<tr class="op-{"first" if not k else "rest"}">{cells}</tr>')
    return ("<table class=\"layers\"><thead><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return json.dumps(v) if isinstance(v, (dict, list)) else str(v)


def _summary_table(summary: dict[str, Any]) -> str:
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(_value(v))}</td></tr>" for k, v in summary.items())
    return f'<table class="summary">{rows}</table>'


def _bytes(n: float) -> str:
    if abs(n) < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if abs(n) < 1024 or unit == "GiB":
            break
    return f"{n:.2f} {unit}"


def _memory_row(name: str, category: dict[str, int]) -> str:
    c = category
    cells = (name.replace("_", " "), _bytes(c["nominal"]), _bytes(c["held"]), _bytes(c["fp32"]),
             f"{c['held'] / c['fp32']:.3f}" if c["fp32"] else "—")
    return "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in cells) + "</tr>"


def _memory_table(memory: dict[str, Any], path: Path) -> str:
    """``memory.json`` (``runtime.memory.MemoryReport.to_dict``): bytes per category and in total
    (the categories are disjoint), the batch, the peak and how it was measured."""
    try:
        categories = memory["categories"]
        total = {k: sum(c[k] for c in categories.values()) for k in ("nominal", "held", "fp32")}
        rows = "".join(_memory_row(name, c) for name, c in (*categories.items(), ("total", total)))
    except (KeyError, TypeError, AttributeError):
        raise MpcompileError(f'{path}: not a memory table: expected {{"categories": {{NAME: {{"nominal": BYTES, '
                             f'"held": BYTES, "fp32": BYTES}}}}}}; measure it again, or delete the file') from None
    said = [f"batch size {memory['batch_size']}" if memory.get("batch_size") is not None else "",
            f"peak held during the step {_bytes(memory['peak'])}" if memory.get("peak") is not None else "",
            f"measured with {memory['measured_with']}" if memory.get("measured_with") else ""]
    return (f"<p>{html.escape(', '.join(x for x in said if x))}</p>"
            '<table class="memory"><thead><tr><th>category</th><th>nominal</th><th>held</th><th>fp32</th>'
            f"<th>held / fp32</th></tr></thead><tbody>{rows}</tbody></table>")


_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #111; background: #fff; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.6em 0; }
th, td { border: 1px solid #ccc; padding: 2px 8px; text-align: left; vertical-align: top; }
thead th { background: #eee; }
td.bad { background: #fdd; }
tr.op-first td, table.memory tr:last-child td { border-top: 2px solid #888; }
img { max-width: 100%; display: block; margin: 0.4em 0; }
figure { margin: 0.8em 0; } figcaption { color: #444; font-size: 0.9em; }
"""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise MpcompileError(f"{path}:{err.lineno}: not JSON ({err.msg}); the run wrote it incompletely: "
                             f"delete it and the report goes on without it") from None


def _page(run: Path, layers: list[Layer], figures: dict[str, tuple[bytes, bytes]], records: int) -> str:
    parts = [f"<h1>mpcompile report: {html.escape(run.resolve().name)}</h1>"]
    summary = run / "summary.json"
    parts.append(_summary_table(_read_json(summary)) if summary.is_file()
                 else "<p>No summary.json: the run has not finished (the trainer writes it at the end).</p>")
    for name in TRAINER_PLOTS:
        if (run / name).is_file():
            parts.append(_img((run / name).read_bytes(), name))
    steps = sorted({r.step for layer in layers for series in layer.roles.values() for r in series})
    parts.append(f"<h2>Layers</h2><p>{records} monitor records, {len(steps)} steps monitored "
                 f"({steps[0]} to {steps[-1]}); shares and SQNR at each role's last monitored step.</p>")
    parts.append(_layers_table(layers))
    if (run / "memory.json").is_file():
        parts.append("<h2>Memory</h2>" + _memory_table(_read_json(run / "memory.json"), run / "memory.json"))
    for layer in layers:
        heat, shares = figures[layer.op]
        parts.append(f'<h2 id="op-{_slug(layer.op)}">{html.escape(_layer_title(layer))}</h2>'
                     f"<figure>{_img(heat, f'{layer.op}: exponent heat map')}<figcaption>Share of nonzero values "
                     "per binary exponent and step; lines: the format's largest, smallest normal and smallest "
                     "subnormal value.</figcaption></figure>"
                     f"<figure>{_img(shares, f'{layer.op}: shares and SQNR')}<figcaption>Overflow, underflow and "
                     "subnormal shares, SQNR against fp32 and stagnation per role.</figcaption></figure>")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>mpcompile report: '
            f"{html.escape(run.resolve().name)}</title><style>{_CSS}</style></head><body>"
            + "\n".join(parts) + "</body></html>\n")


def write_report(run: str | Path) -> Path:
    """Write ``run/report.html`` and its figures in ``run/report/`` (see the module docstring).

    Args:
        run: a run folder that ``mpcompile train ... --monitor`` wrote.

    Returns:
        The path of ``report.html``.

    Raises:
        MpcompileError: no such folder, no ``monitor.jsonl`` in it, or a damaged file.
    """
    run = Path(run)
    if not run.is_dir():
        raise MpcompileError(f"{run}: no such run folder; give the folder `mpcompile train --out` wrote")
    monitor = run / "monitor.jsonl"
    if not monitor.is_file():
        raise MpcompileError(f"{run} has no monitor.jsonl, which the report is drawn from: train with "
                             f"`mpcompile train ... --monitor` to write it")
    records = read_records(monitor)
    layers = group_layers(records)
    folder = run / "report"
    folder.mkdir(exist_ok=True)
    figures = {}
    for layer in layers:
        pngs = _png(exponent_figure(layer)), _png(shares_figure(layer))
        for suffix, png in zip(("exponents", "shares"), pngs):
            (folder / f"{_slug(layer.op)}.{suffix}.png").write_bytes(png)
        figures[layer.op] = pngs
    path = run / "report.html"
    path.write_text(_page(run, layers, figures, len(records)))
    return path
