"""Views of a CompiledModel: a text table, a per-node explanation, a JSON lock file, and the
graph (networkx, DOT, SVG) coloured by the bits of each op's operands.

The lock (``to_json``) is a policy with one rule per assigned node (an exact ``name_regex``)
that sets every role and both arithmetic specs as resolved, so loading it back reproduces the
compiled model exactly, whatever rules, levels and defaults produced it.
"""
from __future__ import annotations

import html
import json
import math
from typing import TYPE_CHECKING, Any, Mapping

import networkx as nx

from .formats import BlockFormat
from .ops.registry import kind_named
from .ops.spec import ROLES, ArithSpec, QuantSpec, Recompute
from .passes import MpcMeta, mpc_meta
from .policy import Assignment, Settings, lock_policy
from .policy.lock import runtime_sections

if TYPE_CHECKING:
    from .compiler import CompiledModel

__all__ = ["table", "block_axis", "rich_table", "settings_text", "explain", "lock", "to_json", "to_networkx", "to_dot", "to_svg"]

_ROLE_COLUMNS = ("input", "weight", "output", "grad_output")


def _role_text(assignment: Assignment | None, role: str, kind: str | None = None) -> str:
    """A role's format; a block format's with the axis its blocks run along where ``kind`` (the
    op's registry kind) is given."""
    setting = dict(assignment.roles).get(role) if assignment else None
    if setting is None or setting.quant is None:
        return "-" if setting is None else "fp32"
    q = setting.quant
    if kind is None or not isinstance(q.fmt, BlockFormat) or q.axis is not None:  # str(q) names a given axis
        return str(q)
    return f"{q} [blocks: {block_axis(kind, role, q)}]"


def block_axis(kind: str, role: str, q: QuantSpec) -> str:
    """Where a block format's blocks run for ``role`` of an op of registry ``kind``: a
    convolution's weight along in_channels x kernel (im2col order), its other tensors along the
    channels, a GEMM's operands along K, anything else along the last dim; or the axis given."""
    if q.axis is not None or q.fmt.axis != -1:
        return f"axis {q.axis if q.axis is not None else q.fmt.axis}"
    if kind.startswith("conv"):
        return "in_channels x kernel" if role in ("weight", "grad_weight") else "channels"
    if kind_named(kind).is_gemm and role in ("input", "weight"):
        return "K"
    return "last dim"


def _spec_text(spec: ArithSpec) -> str:
    return "torch" if spec.is_native else str(spec)


def _recompute_text(recompute: "Recompute | str") -> str:
    """``tau=100: torch`` (components whose kappa estimate exceeds 100 in torch's fp32), or ``off``."""
    return "off" if recompute == "off" else f"tau={recompute.tau:g}: {_spec_text(recompute.forward)}"


def _forward_text(assignment: Assignment | None, low_fraction: float | None) -> str:
    """The forward spec; where the op recomputes (it has a ``low_fraction``, NaN before its
    first call), the recompute spec and the share of components computed low."""
    if assignment is None:
        return "torch"
    text = _spec_text(assignment.forward)
    if assignment.recompute is not None and low_fraction is not None:
        text += f"; recompute {_recompute_text(assignment.recompute)}"
        text += "" if math.isnan(low_fraction) else f" ({100 * low_fraction:.1f}% low)"
    return text


_HEAD = ("node", "op", "module", "shape", *_ROLE_COLUMNS, "forward", "backward", "decided by", "kappa p99",
         "max ovf/ftz %", "SQNR dB")


def _table_rows(cm: "CompiledModel") -> list[tuple[tuple[str, ...], int]]:
    """(cells, operand bits) per GEMM-like op and per op a rule quantizes."""
    rows, low = [], cm.low_precision_fraction()
    for node, meta in cm.annotations():
        assignment = meta.assignment
        if meta.group != "gemm" and assignment is None and meta.unemulated is None:
            continue
        deciders = dict(assignment.decided_by) if assignment else {}
        decided = ",".join(sorted({d.split(" (")[0] for d in deciders.values()})) or "-"
        backward = assignment.backward if assignment else ArithSpec()
        shares = list((meta.stats or {}).values())
        cells = (node.name, meta.op_type, meta.name, "x".join(map(str, meta.shape)) if meta.shape else "?",
                 *(_role_text(assignment, r, meta.kind) for r in _ROLE_COLUMNS),
                 f"fp32: not emulated, {meta.unemulated}" if meta.unemulated else
                 _forward_text(assignment, low.get(node.name)),
                 _spec_text(backward), decided,
                 "-" if meta.kappa is None else f"{meta.kappa.p99:.3g}",
                 f"{100 * max(s.overflow for s in shares):.2g}/{100 * max(s.flush_to_zero for s in shares):.2g}"
                 if shares else "-", "-" if meta.sqnr_db is None else f"{meta.sqnr_db:.1f}")
        rows.append((cells, _bits(assignment)))
    return rows


def _title(cm: "CompiledModel") -> str:
    mode = "train" if cm.source.training else "eval"
    return f"policy '{cm.policy.name}' ({cm.policy.source}), level {cm.level}, captured by {cm.capture}, {mode} mode"


def table(cm: "CompiledModel") -> str:
    """One line per GEMM-like op, per op a rule quantizes and per op that runs GEMM work no
    policy reaches (``fp32: not emulated``, and why): its formats, arithmetic, the
    sections that decided them and, with calibration data, its condition number (p99), the
    largest overflow / flush-to-zero shares of its roles and its output's SQNR. An op with
    ``recompute`` shows it after its forward spec, with the share of output components it has
    computed low so far (``CompiledModel.low_precision_fraction``)."""
    rows = [cells for cells, _ in _table_rows(cm)]
    widths = [max(len(str(r[i])) for r in (_HEAD, *rows)) for i in range(len(_HEAD))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
    return "\n".join([_title(cm), line(_HEAD), line(tuple("-" * w for w in widths)), *map(line, rows), *cm.warnings])


def rich_table(cm: "CompiledModel"):
    """``table`` as a ``rich`` Table for terminals: each row coloured by its operand bits."""
    from rich.table import Table

    out = Table(title=_title(cm), caption="\n".join(cm.warnings) or None)
    for name in _HEAD:
        out.add_column(name)
    for cells, bits in _table_rows(cm):
        out.add_row(*cells, style=f"on {_colour(bits)}" if bits < 32 else None)
    return out


def settings_text(settings: Settings) -> str:
    """What one policy section sets, e.g. ``input=fp8_e4m3, forward=(acc=fp16)`` or ``keep fp32``."""
    if settings.keeps_fp32:
        return "keep fp32"
    what = [f"{r}={'fp32' if s.quant is None else s.quant}" for r, s in settings.roles]
    what += [f"{k}=({_spec_text(v)})" for k, v in (("forward", settings.forward), ("backward", settings.backward)) if v]
    if settings.recompute is not None:
        text = _recompute_text(settings.recompute)
        what.append(f"recompute={text if settings.recompute == 'off' else f'({text})'}")
    return ", ".join(what) or "nothing"


def explain(cm: "CompiledModel", name: str) -> str:
    """Every section that applied to the op with qualified name (or node name) ``name``, and
    what each set; the last line is the result."""
    found = [(node, meta) for node, meta in cm.annotations() if name in (meta.name, node.name)]
    if not found:
        names = sorted({meta.name for _, meta in cm.annotations()})
        close = [n for n in names if name in n][:5]
        raise KeyError(f"no op named {name!r} in this model" + (f"; ops containing it: {', '.join(close)}" if close else ""))
    node, meta = found[0]
    assignment = meta.assignment
    policy, lines = cm.policy, [f"{node.name}: {meta.op_type} '{meta.name}' (group {meta.group or '-'}, "
                                f"GEMM index {meta.gemm_index if meta.gemm_index is not None else '-'})"]
    sections = ([("default", policy.default)] if meta.group == "gemm" else []) + \
        [(rule.label, rule.settings) for rule in policy.rules if assignment and rule.label in assignment.matched]
    lines += [f"  {label}: {settings_text(settings)}" for label, settings in sections]
    if not sections:
        lines.append("  no section of the policy applies: the op runs as it is")
    if assignment:
        result = [f"{r}={_role_text(assignment, r)}" for r in ROLES if r in dict(assignment.roles)]
        recompute = f", recompute {_recompute_text(assignment.recompute)}" if assignment.recompute else ""
        lines.append(f"  => {', '.join(result) or 'no roles'}; forward {_spec_text(assignment.forward)}{recompute}, "
                     f"backward {_spec_text(assignment.backward)} (level {cm.level})")
    return "\n".join(lines)


def lock(cm: "CompiledModel") -> dict[str, Any]:
    """The resolved assignment as a policy (a dict) that reproduces this compiled model; its
    description lists the GEMM work that runs in fp32 because nothing emulates it."""
    policy, level = cm.policy, cm.level
    fp32 = [f"{meta.name} ({meta.unemulated})" for _, meta in cm.annotations() if meta.unemulated]
    if policy.levels and not isinstance(level, Mapping):
        level = f"{policy.level_index(level)} ({policy.levels[policy.level_index(level)].name})"
    description = (f"{policy.description}: " if policy.description else "") + \
        f"resolved from {policy.source} at level {level}, captured by {cm.capture}" + \
        (f"; fp32, not emulated: {'; '.join(fp32)}" if fp32 else "")
    return lock_policy(((meta.name, meta.assignment) for _, meta in cm.annotations() if meta.assignment is not None),
                       f"{policy.name}.lock", description,
                       runtime_sections(policy.optimizer, policy.trust_region, policy.strict,
                                        policy.monitor, policy.communication))


def to_json(cm: "CompiledModel") -> str:
    return json.dumps(lock(cm), indent=1)


# by the widest operand format of an op: 32 (or untouched) grey, 16 blue, 8 orange, fewer red
_COLOURS = ((4, "#e06666"), (8, "#f6b26b"), (16, "#9fc5e8"), (64, "#d9d9d9"))


def _bits(assignment: Assignment | None) -> int:
    widths = [s.quant.fmt.bits for role, s in (assignment.roles if assignment and assignment.quantizes else ())
              if s.quant is not None and role in ("input", "weight")]
    return max(widths, default=32)


def to_networkx(cm: "CompiledModel") -> nx.DiGraph:
    """The traced graph: a node per fx node (attributes op, module, shape, bits, roles, forward,
    backward, kappa), an edge per use."""
    g = nx.DiGraph()
    for node in cm.annotated.graph.nodes:
        meta = mpc_meta(node) or MpcMeta()
        assignment = meta.assignment
        g.add_node(node.name, op=meta.op_type or node.op, module=meta.name or node.name,
                   shape=meta.shape, bits=_bits(assignment),
                   roles={r: _role_text(assignment, r) for r, _ in assignment.roles} if assignment else {},
                   forward=_spec_text(assignment.forward) if assignment else "torch",
                   backward=_spec_text(assignment.backward) if assignment else "torch",
                   kappa=None if meta.kappa is None else meta.kappa.p99)
        g.add_edges_from((arg.name, node.name) for arg in node.all_input_nodes)
    return g


def _label(name: str, data: dict) -> list[str]:
    roles = ", ".join(f"{r}={f}" for r, f in data["roles"].items() if r in ("input", "weight", "output"))
    return [name, data["op"]] + ([roles] if roles else []) + ([data["forward"]] if data["forward"] != "torch" else [])


def _colour(bits: int) -> str:
    return next(c for limit, c in _COLOURS if bits <= limit)


def to_dot(cm: "CompiledModel") -> str:
    """Graphviz DOT text of ``to_networkx``, each op filled by its operand bits."""
    g = to_networkx(cm)
    lines = [f'digraph "{cm.policy.name}" {{', "  node [shape=box, style=filled, fontname=monospace];"]
    for name, data in g.nodes(data=True):
        label = "\\n".join(t.replace('"', '\\"') for t in _label(name, data))
        lines.append(f'  "{name}" [label="{label}", fillcolor="{_colour(data["bits"])}"];')
    lines += [f'  "{a}" -> "{b}";' for a, b in g.edges]
    return "\n".join(lines + ["}"])


def to_svg(cm: "CompiledModel") -> str:
    """A self-contained SVG: ops top to bottom in execution order, edges on the left, each box
    filled by its operand bits (no Graphviz needed)."""
    g = to_networkx(cm)
    order = {name: i for i, name in enumerate(g.nodes)}
    row, width, left = 46, 640, 40
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{row * len(order) + 20}" '
             f'font-family="monospace" font-size="11">']
    for a, b in g.edges:
        ya, yb, bend = order[a] * row + 30, order[b] * row + 30, left - 8 - 4 * min(6, order[b] - order[a])
        parts.append(f'<path d="M{left},{ya} C{bend},{ya} {bend},{yb} {left},{yb}" fill="none" stroke="#666"/>')
    for name, data in g.nodes(data=True):
        y = order[name] * row + 10
        parts.append(f'<rect x="{left}" y="{y}" width="{width - left - 10}" height="{row - 8}" rx="4" '
                     f'fill="{_colour(data["bits"])}" stroke="#444"/>')
        for i, text in enumerate(_label(name, data)[:3]):
            parts.append(f'<text x="{left + 6}" y="{y + 13 + 12 * i}">{html.escape(text)}</text>')
    return "\n".join(parts + ["</svg>"])
