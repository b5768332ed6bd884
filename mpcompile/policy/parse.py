"""Reading a policy: YAML text, a file, a shipped policy's name or a Python mapping, validated
into a ``schema.Policy``, with every error naming its place (file:line:column and the quoted
line with a caret for YAML; the key path for a mapping) and, where one exists, the name that
was probably meant. ``load_policy`` is the entry point; the schema is written down in
docs/policy.md.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from ..errors import FormatError, PolicyError, SpecError
from ..formats import BlockFormat, CodebookFormat
from ..formats import parse as parse_format
from ..ops.spec import DELAYED_ROLES, ROLES, SCALINGS, ArithSpec, QuantSpec, Recompute
from ..random_bits import COUNTER_BITS
from ..rounding import ROUNDING_MODES
from .cascade import Policy
from .schema import (COMM_ROUNDINGS, EPSILON_MODES, GROUPS, MONITOR_ROLES, NATIVE, OPTIMIZER_KEY_KINDS, OPTIMIZER_KINDS,
                     PERIOD_UNITS, SCHEMA_VERSION, STORAGES, TRUST_REGION_METHODS, CommunicationSettings, Level,
                     MonitorSettings, OptimizerSettings, Period, RoleSetting, Rule, Selector, Settings,
                     TrustRegionSettings)

__all__ = ["SHIPPED_POLICIES", "SECTION_KEYS", "load_policy", "shipped_policies"]

SHIPPED_POLICIES = Path(__file__).resolve().parents[1] / "policies"  # mpcompile/policies
# the keys each section takes
_TOP = ("version", "name", "description", "formats", "rounding", "saturate", "default", "rules", "levels",
        "trust_region", "optimizer", "monitor", "communication", "strict")
_SETTINGS = ROLES + ("forward", "backward", "recompute", "rounding", "saturate", "keep")
_RECOMPUTE_KEYS = ("tau", "forward")
_INF = ("inf", "infinity", "+inf")  # tau as a string: YAML reads "inf" as text (its float is .inf)
_ROLE_KEYS = ("format", "rounding", "saturate", "sr_bits", "scaling", "axis")
_ARITH_KEYS = ("mul", "acc", "order", "rounding", "mul_rounding", "fma", "kahan", "sr_bits")
_OPTIMIZER_KEYS = tuple(f.name for f in dataclasses.fields(OptimizerSettings))
_SELECTORS = ("type", "name", "name_regex", "first", "last", "index", "kappa_above", "kappa_below")
_LEVEL = ("name", "set", "keep", "rounding", "saturate")
_TRUST_REGION = tuple(f.name for f in dataclasses.fields(TrustRegionSettings))
_MONITOR = tuple(f.name for f in dataclasses.fields(MonitorSettings))
_COMMUNICATION = ("format", "scaling", "rounding", "error_feedback", "shared_scale")
_BLOCK_SCALING = re.compile(r"block\((\d+)\)")
# every key the reader takes, by the section that takes it (docs/policy.md, "Every key")
SECTION_KEYS: dict[str, tuple[str, ...]] = {
    "policy": _TOP, "settings": _SETTINGS, "role": _ROLE_KEYS, "arithmetic": _ARITH_KEYS,
    "recompute": _RECOMPUTE_KEYS, "rule": ("match",), "match": _SELECTORS, "level": _LEVEL,
    "optimizer": _OPTIMIZER_KEYS, "trust_region": _TRUST_REGION, "monitor": _MONITOR,
    "communication": _COMMUNICATION,
}
_ALIAS = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


# -- located values ------------------------------------------------------------------------------
@dataclass
class _Node:
    """A value of the policy with where it came from: a dict of _Node, a list of _Node, a scalar."""

    value: Any
    where: str
    line: str | None = None  # the YAML source line, shown under the message
    column: int = 0
    keys: dict[str, "_Node"] | None = None  # a mapping's keys, located

    def fail(self, problem: str, hint: str | None = None) -> PolicyError:
        text = f"{self.where}: {problem}"
        if self.line is not None:
            text += f"\n    {self.line}\n    {' ' * self.column}^"
        return PolicyError(text + (f"\n  {hint}" if hint else ""))


def _from_yaml(text: str, file: str) -> _Node:
    loader = yaml.SafeLoader(text)
    lines = text.splitlines()
    try:
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = _Node(None, f"{file}:{mark.line + 1}:{mark.column + 1}",
                      lines[mark.line] if mark.line < len(lines) else "", mark.column)
        raise where.fail(f"not valid YAML: {err.problem or err.context}") from None
    finally:
        loader.dispose()
    if root is None:
        raise PolicyError(f"{file}: the policy is empty; it needs at least 'version: {SCHEMA_VERSION}'")

    def convert(node) -> _Node:
        mark = node.start_mark
        located = _Node(None, f"{file}:{mark.line + 1}:{mark.column + 1}",
                        lines[mark.line] if mark.line < len(lines) else "", mark.column)
        if isinstance(node, yaml.MappingNode):
            located.value, located.keys = {}, {}
            for key_node, value_node in node.value:
                key = convert(key_node)
                if not isinstance(key.value, str):
                    raise key.fail(f"a key must be a name, got {key.value!r}")
                if key.value in located.value:
                    raise key.fail(f"'{key.value}' is given twice in this mapping")
                located.keys[key.value], located.value[key.value] = key, convert(value_node)
        elif isinstance(node, yaml.SequenceNode):
            located.value = [convert(item) for item in node.value]
        else:
            located.value = loader.construct_object(node)
        return located

    return convert(root)


def _from_python(obj: Any, where: str) -> _Node:
    if isinstance(obj, Mapping):
        keys = {str(k): _Node(k, f"{where}.{k}") for k in obj}
        for k in obj:
            if not isinstance(k, str):
                raise keys[str(k)].fail(f"a key must be a name, got {k!r}")
        return _Node({k: _from_python(v, f"{where}.{k}") for k, v in obj.items()}, where, keys=keys)
    if isinstance(obj, (list, tuple)):
        return _Node([_from_python(v, f"{where}[{i}]") for i, v in enumerate(obj)], where)
    return _Node(obj, where)


# -- checks ----------------------------------------------------------------------------------------
def _did_you_mean(word: Any, choices) -> str | None:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None


def _mapping(node: _Node, what: str, allowed: tuple[str, ...]) -> dict[str, _Node]:
    if not isinstance(node.value, dict):
        raise node.fail(f"{what} must be a mapping, got {_kind(node.value)}")
    for key, key_node in node.keys.items():
        if key not in allowed:
            hint = _did_you_mean(key, allowed) or f"the keys of {what} are: {', '.join(allowed)}"
            raise key_node.fail(f"unknown key '{key}' in {what}", hint)
    return node.value


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", type(None): "null"}.get(type(value), f"{type(value).__name__} {value!r}")


def _check(node: _Node, types: tuple[type, ...], what: str) -> Any:
    if isinstance(node.value, bool) and bool not in types or not isinstance(node.value, types):
        names = " or ".join({str: "a string", bool: "true or false", int: "an integer", float: "a number"}[t] for t in types)
        raise node.fail(f"{what} must be {names}, got {_kind(node.value)}")
    return node.value


def _choice(node: _Node, choices: tuple[str, ...], what: str) -> str:
    value = _check(node, (str,), what)
    if value not in choices:
        raise node.fail(f"{what} '{value}' is not one of {', '.join(choices)}", _did_you_mean(value, choices))
    return value


def _format(node: _Node, text: str, aliases: Mapping[str, Any], what: str, codebook: bool = False):
    """The format ``text`` names (an alias or a spec); a block-wise codebook format only where
    ``codebook`` (an optimizer state or an alias)."""
    if text in aliases:
        fmt = aliases[text]
    else:
        try:
            fmt = parse_format(text)
        except FormatError as err:
            raise node.fail(f"{what}: {err}", _did_you_mean(text, aliases)) from None
    if isinstance(fmt, CodebookFormat) and not codebook:
        raise node.fail(f"{what}: {fmt} is a block-wise codebook format, for the optimizer's states only "
                        f"(optimizer.momentum, optimizer.second_moment)",
                        "use a float, fixed-point or block format here (e.g. fp8_e4m3, mxfp8_e4m3)")
    return fmt


# -- reading ---------------------------------------------------------------------------------------
def load_policy(source: "Policy | Mapping | str | Path") -> Policy:
    """Read and validate a policy.

    Args:
        source: a ``Policy`` (returned as is), a mapping, a path to a .yaml, .yml or .json file
            (a lock file; JSON is YAML), the name of a shipped policy (``"hfp8"``:
            ``mpcompile/policies/hfp8.yaml``), or YAML text.

    Raises:
        PolicyError: naming file:line:column (a mapping: the key path), the offending text and,
            where one exists, the name that was probably meant.
    """
    if isinstance(source, Policy):
        return source
    if isinstance(source, Mapping):
        return _read(_from_python(source, "<dict>"), "<dict>")
    text, file = str(source), "<string>"
    if isinstance(source, Path) or ("\n" not in text and text.endswith((".yaml", ".yml", ".json"))):
        path = Path(source)
        if not path.is_file():
            siblings = [p.name for p in path.parent.iterdir() if p.suffix in (".yaml", ".yml", ".json")] \
                if path.parent.is_dir() else []
            hint = _did_you_mean(path.name, siblings)
            raise PolicyError(f"{path}: no such policy file" + (f"; {hint}" if hint else ""))
        text, file = path.read_text(), str(path)
    elif _ALIAS.fullmatch(text):
        names = shipped_policies()
        if text not in names:
            hint = _did_you_mean(text, names)
            raise PolicyError(f"'{text}' is neither a policy file nor a shipped policy "
                              f"({', '.join(names)})" + (f"; {hint}" if hint else ""))
        file = str(SHIPPED_POLICIES / f"{text}.yaml")
        text = Path(file).read_text()
    return _read(_from_yaml(text, file), file)


def shipped_policies() -> list[str]:
    """Names of the policies shipped with mpcompile (``load_policy`` and ``compile`` take them)."""
    return sorted(p.stem for p in SHIPPED_POLICIES.glob("*.yaml"))


def _read(root: _Node, source: str) -> Policy:
    top = _mapping(root, "the policy", _TOP)
    if "version" not in top:
        raise root.fail(f"the policy has no 'version'; add 'version: {SCHEMA_VERSION}' at the top")
    if _check(top["version"], (int,), "version") != SCHEMA_VERSION:
        raise top["version"].fail(f"schema version {top['version'].value} is not supported; this mpcompile reads version {SCHEMA_VERSION}")
    aliases = {}
    if "formats" in top:
        if not isinstance(top["formats"].value, dict):
            raise top["formats"].fail(f"formats must be a mapping of alias: format, got {_kind(top['formats'].value)}")
        for alias, node in top["formats"].value.items():
            if not _ALIAS.fullmatch(alias):
                raise top["formats"].keys[alias].fail(f"format alias '{alias}' must be a name (letters, digits, _)")
            aliases[alias] = _format(node, _check(node, (str,), f"formats.{alias}"), {}, f"formats.{alias}", True)
    inherited = _inherit(top, ("nearest", False))
    default = _settings(top["default"], "default", aliases, inherited) if "default" in top else Settings()
    rules = tuple(_rule(node, i, aliases, inherited) for i, node in enumerate(_list(top.get("rules"), "rules")))
    levels: list[Level] = []
    for i, node in enumerate(_list(top.get("levels"), "levels")):
        levels.append(_level(node, i, aliases, inherited, [lv.name for lv in levels]))
    trust_region = _trust_region(top["trust_region"]) if "trust_region" in top else None
    optimizer = _optimizer(top["optimizer"], aliases) if "optimizer" in top else OptimizerSettings()
    return Policy(_check(top["name"], (str,), "name") if "name" in top else Path(source).stem,
                  _check(top["description"], (str,), "description") if "description" in top else "",
                  default, rules, tuple(levels), source, trust_region, optimizer,
                  _check(top["strict"], (bool,), "strict") if "strict" in top else False,
                  _monitor(top["monitor"]) if "monitor" in top else None,
                  _communication(top["communication"], aliases) if "communication" in top else None)


def _communication(node: _Node, aliases: Mapping[str, Any]) -> CommunicationSettings | None:
    """The ``communication:`` section; None where gradients travel in fp32 (no format)."""
    section = _mapping(node, "communication", _COMMUNICATION)
    values: dict[str, Any] = {}
    for key in ("error_feedback", "shared_scale"):
        if key in section:
            values[key] = _check(section[key], (bool,), f"communication.{key}")
    if "rounding" in section:
        values["rounding"] = _choice(section["rounding"], COMM_ROUNDINGS, "communication.rounding")
    if "scaling" in section:
        text = _check(section["scaling"], (str,), "communication.scaling")
        block = _BLOCK_SCALING.fullmatch(text.replace(" ", ""))
        if text not in ("tensor", "none") and not (block and int(block[1]) > 0):
            raise section["scaling"].fail(f"communication.scaling '{text}' is not one of tensor, none, block(K)",
                                          "block(32): a scale per 32 elements")
        values["scaling"], values["block_size"] = ("block", int(block[1])) if block else (text, None)
    text = _check(section["format"], (str,), "communication.format") if "format" in section else "fp32"
    fmt = None if text == "fp32" else _format(section["format"], text, aliases, "communication.format")
    where = section.get("format", node)
    if fmt is None:
        if values:
            raise where.fail(f"communication: {', '.join(values)} set, but gradients travel in fp32 (no format)",
                             "give communication.format (e.g. fp8_e5m2, bf16, mxfp8_e5m2)")
        return None
    element = fmt.element if isinstance(fmt, BlockFormat) else fmt
    if element.bits > 16:
        raise where.fail(f"communication.format: {fmt} has {element.bits} bits; codes travel as uint8 or int16 "
                         f"(at most 16 bits)", "use bf16, fp16, an fp8 or an MX format")
    if isinstance(fmt, BlockFormat) and values.get("scaling", "tensor") != "none" and "scaling" in section:
        raise section["scaling"].fail(f"communication.scaling: {fmt} is a block format with its own scales",
                                      "drop scaling (a block format is scaled per block)")
    if isinstance(fmt, BlockFormat):
        if values.get("shared_scale"):
            raise section["shared_scale"].fail(f"communication.shared_scale: {fmt} scales each block on each rank",
                                               "drop shared_scale, or use an element format with scaling: block(K)")
        values["scaling"] = "none"
    if values.get("shared_scale") and values.get("scaling", "tensor") == "none" and not isinstance(fmt, BlockFormat):
        raise section["shared_scale"].fail("communication.shared_scale: scaling is none, there is no scale to share",
                                           "use scaling: tensor or block(K)")
    return CommunicationSettings(format=fmt, **values)


def _monitor(node: _Node) -> MonitorSettings:
    section = _mapping(node, "monitor", _MONITOR)
    values: dict[str, Any] = {}
    if "every" in section:
        values["every"] = _check(section["every"], (int,), "monitor.every")
        if values["every"] < 1:
            raise section["every"].fail(f"monitor.every must be a positive number of steps, got {values['every']}")
    if "ops" in section:  # one selector, or a list of them (an op is monitored if any matches)
        ops = section["ops"]
        items = ops.value if isinstance(ops.value, list) else [ops]
        values["ops"] = tuple(_selector(item, f"monitor.ops[{i}]" if isinstance(ops.value, list) else "monitor.ops")
                              for i, item in enumerate(items))
    if "roles" in section:
        values["roles"] = tuple(_choice(item, MONITOR_ROLES, "monitor.roles")
                                for item in _list(section["roles"], "monitor.roles"))
        if not values["roles"]:
            raise section["roles"].fail("monitor.roles is empty: name at least one role, or drop the key for all")
    if "histograms" in section:
        values["histograms"] = _check(section["histograms"], (bool,), "monitor.histograms")
    return MonitorSettings(**values)


def _optimizer(node: _Node, aliases) -> OptimizerSettings:
    section = _mapping(node, "optimizer", _OPTIMIZER_KEYS)
    values: dict[str, Any] = {}
    if "kind" in section:
        values["kind"] = _choice(section["kind"], OPTIMIZER_KINDS, "optimizer.kind")
    kind = values.get("kind")
    for key, kinds in OPTIMIZER_KEY_KINDS.items():
        if key in section and kind is None and "sgd" not in kinds:
            raise section[key].fail(f"optimizer.{key} is read by {' and '.join(kinds)} only; add 'kind: {kinds[0]}' "
                                    f"to this section")
        if key in section and kind is not None and kind not in kinds:
            raise section[key].fail(f"optimizer.{key} is not read by kind {kind} (only by {', '.join(kinds)}); drop it")
    for key in ("master", "gradient", "momentum", "second_moment"):
        if key in section and section[key].value is not None:
            text = _check(section[key], (str,), f"optimizer.{key}")
            values[key] = None if text == "fp32" else _format(section[key], text, aliases, f"optimizer.{key}",
                                                               key in ("momentum", "second_moment"))
    momentum = values.get("momentum")
    if isinstance(momentum, CodebookFormat) and not momentum.signed:
        raise section["momentum"].fail(f"optimizer.momentum: {momentum} is unsigned, but momentum takes negative "
                                       f"values (they would round to 0)",
                                       f"use blockwise({momentum.codebook[:-1]},{momentum.block_size})")
    if kind == "lpsvrg" and values.get("master") is None:
        raise node.fail("optimizer kind lpsvrg stores the weights in a low-precision format: set optimizer.master "
                        "(e.g. master: fixed(8,5)); with fp32 weights it is svrg")
    if "update_rounding" in section:
        values["update_rounding"] = _choice(section["update_rounding"], ROUNDING_MODES, "optimizer.update_rounding")
        codebooks = [f"optimizer.{k} ({values[k]})" for k in ("momentum", "second_moment")
                     if isinstance(values.get(k), CodebookFormat)]
        if codebooks and values["update_rounding"] != "nearest":
            raise section["update_rounding"].fail(
                f"optimizer.update_rounding: {values['update_rounding']}, but {' and '.join(codebooks)} "
                f"{'round' if len(codebooks) > 1 else 'rounds'} to the nearest codebook entry only (as bitsandbytes "
                f"does)", "use update_rounding: nearest")
    if "storage" in section:
        values["storage"] = _choice(section["storage"], STORAGES, "optimizer.storage")
        stored = {k: values[k] for k in ("master", "momentum", "second_moment") if values.get(k) is not None}
        wide = [f"{k} ({f})" for k, f in stored.items() if not _packable(f)]
        if values["storage"] == "packed" and (wide or not stored):
            raise section["storage"].fail(f"optimizer.storage: packed stores the master weights and the momentum / "
                                          f"second_moment states as codes of at most 16 bits; "
                                          f"{', '.join(wide) or 'none of them has a format'} (e.g. momentum: "
                                          f"mxfp8_e4m3, master: bf16)")
    if "weight_decay" in section:
        decay = _check(section["weight_decay"], (int, float), "optimizer.weight_decay")
        if decay < 0:
            raise section["weight_decay"].fail(f"optimizer.weight_decay must be >= 0, got {decay}")
        values["weight_decay"] = float(decay)
    for key in ("T", "swa_start", "swa_every"):
        if key in section:
            values[key] = _period(section[key], f"optimizer.{key}", allow_zero=key == "swa_start")
    if kind == "halp" and "mu" not in section:
        raise node.fail("optimizer kind halp needs mu, the strong-convexity constant its offset scale "
                        "||g~|| / (mu (2^(bits-1) - 1)) divides by (e.g. mu: 0.01)")
    if "mu" in section:
        mu = float(_check(section["mu"], (int, float), "optimizer.mu"))
        if not (0 < mu < math.inf):
            raise section["mu"].fail(f"optimizer.mu must be positive and finite, got {mu}")
        values["mu"] = mu
    if "bits" in section:
        values["bits"] = _check(section["bits"], (int,), "optimizer.bits")
        if not 2 <= values["bits"] <= 32:
            raise section["bits"].fail(f"optimizer.bits must be 2..32 (a signed integer offset), got {values['bits']}")
    return OptimizerSettings(**values)


def _packable(fmt) -> bool:
    return (fmt.element if isinstance(fmt, BlockFormat) else fmt).bits <= 16


def _period(node: _Node, what: str, allow_zero: bool = False) -> Period:
    """``2 epochs``, ``1 epoch``, ``500 steps``; a bare number is refused, its unit would be a guess."""
    if isinstance(node.value, Period):  # a Python mapping may give one
        count, unit = node.value.count, node.value.unit
    else:
        words = str(node.value).split() if isinstance(node.value, str) else []
        unit = words[1] + ("" if words[1].endswith("s") else "s") if len(words) == 2 else None
        if unit not in PERIOD_UNITS or not words[0].isdigit():
            raise node.fail(f"{what} must be a count with its unit, like '2 epochs' or '500 steps', "
                            f"got {_kind(node.value)}")
        count = int(words[0])
    if count < (0 if allow_zero else 1):
        raise node.fail(f"{what} must be {'>= 0' if allow_zero else 'positive'}, got {count}")
    return Period(count, unit)


def _trust_region(node: _Node) -> TrustRegionSettings:
    fields = {f.name: f.default for f in dataclasses.fields(TrustRegionSettings)}
    section = _mapping(node, "trust_region", _TRUST_REGION)
    values: dict[str, Any] = {}
    for key, value in section.items():
        what = f"trust_region.{key}"
        if key == "method":
            values[key] = _choice(value, TRUST_REGION_METHODS, what)
        elif key == "epsilon":
            values[key] = _choice(value, EPSILON_MODES, what)
        elif isinstance(fields[key], bool):
            values[key] = _check(value, (bool,), what)
        elif isinstance(fields[key], int):
            values[key] = _check(value, (int,), what)
            if values[key] < 1:
                raise value.fail(f"{what} must be a positive integer, got {values[key]}")
        else:
            number = float(_check(value, (int, float), what))
            low_ok = key in ("momentum", "weight_decay")
            if not (number >= 0 if low_ok else number > 0) or not math.isfinite(number):
                raise value.fail(f"{what} must be {'>= 0' if low_ok else 'positive'} and finite, got {number}")
            if key in ("eta1", "eta2", "momentum", "lower_margin") and number >= 1:
                raise value.fail(f"{what} must be below 1, got {number}")
            values[key] = number
    settings = TrustRegionSettings(**values)
    if settings.eta1 > settings.eta2:
        raise node.fail(f"trust_region: eta1 ({settings.eta1}) must not exceed eta2 ({settings.eta2}); "
                        f"steps with rho >= eta2 grow Delta, those below eta1 are rejected")
    if settings.delta0 > settings.delta_max:
        raise node.fail(f"trust_region: delta0 ({settings.delta0}) exceeds delta_max ({settings.delta_max})")
    return settings


def _list(node: _Node | None, what: str) -> list[_Node]:
    if node is None:
        return []
    if not isinstance(node.value, list):
        raise node.fail(f"{what} must be a list (lines starting with '- '), got {_kind(node.value)}")
    return node.value


def _inherit(section: dict[str, _Node], inherited: tuple[str, bool]) -> tuple[str, bool]:
    """The (rounding, saturate) defaults for what is below a section."""
    rounding = _choice(section["rounding"], ROUNDING_MODES, "rounding") if "rounding" in section else inherited[0]
    saturate = _check(section["saturate"], (bool,), "saturate") if "saturate" in section else inherited[1]
    return rounding, saturate


def _settings(node: _Node, what: str, aliases, inherited) -> Settings:
    section = _mapping(node, what, _SETTINGS)
    inherited = _inherit(section, inherited)
    if "keep" in section:
        if _check(section["keep"], (str,), "keep") != "fp32":
            raise section["keep"].fail(f"keep takes 'fp32' (every role untouched, torch's arithmetic), got "
                                       f"'{section['keep'].value}'; to set formats, name the roles")
        clash = [key for key in section if key in ROLES + ("forward", "backward", "recompute")]
        if clash:
            raise node.keys[clash[0]].fail(f"'{clash[0]}' contradicts 'keep: fp32' in the same {what}; drop one")
        return Settings(tuple((r, RoleSetting(None)) for r in ROLES), NATIVE, NATIVE, "off")
    roles = tuple((r, _role(section[r], f"{what}.{r}", aliases, inherited)) for r in ROLES if r in section)
    for r, setting in roles:
        if setting.quant is not None and setting.quant.scaling == "tensor_delayed" and r not in DELAYED_ROLES:
            raise section[r].fail(f"{what}.{r}: tensor_delayed scaling is for the GEMM operands "
                                  f"({', '.join(DELAYED_ROLES)}), whose amax is known before the op; use tensor")
    fwd, bwd = (_arith(section[k], f"{what}.{k}", aliases, inherited) if k in section else None
                for k in ("forward", "backward"))
    recompute = _recompute(section["recompute"], f"{what}.recompute", aliases, inherited) if "recompute" in section else None
    return Settings(roles, fwd, bwd, recompute)


def _recompute(node: _Node, what: str, aliases, inherited) -> "Recompute | str":
    """``recompute: {tau: 100, forward: {acc: fp32}}``; null (``"off"``) turns it off."""
    if node.value is None:
        return "off"
    fields = _mapping(node, what, _RECOMPUTE_KEYS)
    if "tau" not in fields:
        raise node.fail(f"{what} needs a 'tau': components whose condition number estimate exceeds it are "
                        f"recomputed (e.g. tau: 100; inf: none, below 1: all)")
    tau = fields["tau"].value
    if isinstance(tau, str) and tau.strip().lower() in _INF:
        tau = math.inf
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0:
        raise fields["tau"].fail(f"{what}.tau must be a positive number or inf, got {_kind(tau)}",
                                 "components whose kappa estimate exceeds tau are recomputed; inf keeps every "
                                 "component low, a tau below 1 recomputes them all")
    high = _arith(fields["forward"], f"{what}.forward", aliases, inherited) if "forward" in fields else NATIVE
    return Recompute(tau, high)


def _role(node: _Node, what: str, aliases, inherited) -> RoleSetting:
    rounding, saturate = inherited
    if node.value is None:
        return RoleSetting(None)
    scaling, extra = "none", {}
    if isinstance(node.value, str):
        head, *parts = node.value.split(":")
        fmt = _format(node, head.strip(), aliases, what)
        for part in (p.strip() for p in parts):
            key, _, number = part.partition("=")
            if part in ROUNDING_MODES:
                rounding = part
            elif part in SCALINGS:
                scaling = part
            elif part == "sat":
                saturate = True
            elif key in ("sr_bits", "axis") and re.fullmatch(r"-?\d+", number):
                extra[key] = int(number)
            else:
                raise node.fail(f"{what}: '{part}' is not a rounding mode, a scaling, 'sat', sr_bits=n or axis=n",
                                _did_you_mean(part, ROUNDING_MODES + SCALINGS + ("sat",)))
    else:
        fields = _mapping(node, what, _ROLE_KEYS)
        if "format" not in fields:
            raise node.fail(f"{what} needs a 'format'")
        fmt = _format(fields["format"], _check(fields["format"], (str,), f"{what}.format"), aliases, what)
        rounding, saturate = _inherit(fields, (rounding, saturate))
        if "scaling" in fields:
            scaling = _choice(fields["scaling"], SCALINGS, f"{what}.scaling")
        if "sr_bits" in fields:
            extra["sr_bits"] = _check(fields["sr_bits"], (int,), f"{what}.sr_bits")
            if not 1 <= extra["sr_bits"] <= COUNTER_BITS:
                raise fields["sr_bits"].fail(f"{what}.sr_bits must be in [1, {COUNTER_BITS}], got {extra['sr_bits']}")
        if "axis" in fields:
            extra["axis"] = _check(fields["axis"], (int,), f"{what}.axis")
    try:
        return RoleSetting(QuantSpec(fmt, rounding, scaling, saturate, **extra))
    except SpecError as err:
        raise node.fail(f"{what}: {err}") from None


def _arith(node: _Node, what: str, aliases, inherited) -> ArithSpec:
    fields = _mapping(node, what, _ARITH_KEYS)
    kwargs: dict[str, Any] = {"rounding": inherited[0]}
    for key, field_node in fields.items():
        if key in ("mul", "acc"):
            value = field_node.value
            kwargs[key] = None if value is None and key == "mul" else \
                _format(field_node, _check(field_node, (str,), f"{what}.{key}"), aliases, f"{what}.{key}")
        elif key in ("rounding", "mul_rounding"):
            kwargs[key] = _choice(field_node, ROUNDING_MODES, f"{what}.{key}")
        elif key in ("fma", "kahan"):
            kwargs[key] = _check(field_node, (bool,), f"{what}.{key}")
        else:
            kwargs[key] = _check(field_node, (int,) if key == "sr_bits" else (str,), f"{what}.{key}")
    try:
        return ArithSpec(**kwargs)
    except (SpecError, FormatError) as err:
        raise node.fail(f"{what}: {err}") from None


def _rule(node: _Node, i: int, aliases, inherited) -> Rule:
    label = f"rules[{i}] ({node.where})"
    fields = _mapping(node, f"rules[{i}]", ("match",) + _SETTINGS)
    if "match" not in fields:
        raise node.fail(f"rules[{i}] has no 'match'; use 'match: {{}}' to select every op")
    rest = _Node({k: v for k, v in fields.items() if k != "match"}, node.where, node.line, node.column,
                 {k: v for k, v in node.keys.items() if k != "match"})
    settings = _settings(rest, f"rules[{i}]", aliases, inherited)
    match = _selector(fields["match"], f"rules[{i}].match")
    others = [t for t in match.type if t in GROUPS and t != "gemm"]
    if isinstance(settings.recompute, Recompute) and others and len(others) == len(match.type):
        raise rest.keys["recompute"].fail(f"rules[{i}].recompute: recomputing components is for GEMM-like ops "
                                          f"(linear, conv, matmul), and this rule matches only {', '.join(others)} ops",
                                          "move it to default or to a rule that matches GEMM-like ops")
    return Rule(match, settings, label)


def _selector(node: _Node, what: str) -> Selector:
    fields = _mapping(node, what, _SELECTORS)
    kwargs: dict[str, Any] = {}
    for key, f in fields.items():
        if key == "type":
            values = f.value if isinstance(f.value, list) else [f]
            kwargs[key] = tuple(_check(v, (str,), f"{what}.type") for v in values)
        elif key == "name":
            kwargs[key] = _check(f, (str,), f"{what}.name")
        elif key == "name_regex":
            try:
                kwargs[key] = re.compile(_check(f, (str,), f"{what}.name_regex"))
            except re.error as err:
                raise f.fail(f"{what}.name_regex is not a valid regular expression: {err}") from None
        elif key in ("first", "last"):
            kwargs[key] = _check(f, (bool,), f"{what}.{key}")
        elif key == "index":
            values = f.value if isinstance(f.value, list) else [f]
            kwargs[key] = tuple(_check(v, (int,), f"{what}.index") for v in values)
        else:
            kwargs[key] = float(_check(f, (int, float), f"{what}.{key}"))
            if kwargs[key] < 1:
                raise f.fail(f"{what}.{key} must be at least 1 (a condition number), got {f.value}")
    return Selector(**kwargs)


def _level(node: _Node, i: int, aliases, inherited, taken: list[str]) -> Level:
    fields = _mapping(node, f"levels[{i}]", _LEVEL)
    if "name" not in fields:
        raise node.fail(f"levels[{i}] has no 'name'; levels are picked by name or number")
    name = _check(fields["name"], (str,), f"levels[{i}].name")
    changes = [k for k in fields if k != "name"]
    if i == 0 and changes:
        raise node.keys[changes[0]].fail("level 0 is the policy itself: put its settings in default and rules")
    if name in taken:
        raise fields["name"].fail(f"level name '{name}' is used twice; names pick a level")
    inherited = _inherit(fields, inherited)
    if "keep" in fields and "set" in fields:
        raise fields["set"].fail(f"levels[{i}] has both 'keep' and 'set'; drop one")
    body = fields.get("set")
    if "keep" in fields:
        body = _Node({"keep": fields["keep"]}, node.where, node.line, node.column, {"keep": node.keys["keep"]})
    settings = _settings(body, f"levels[{i}].set", aliases, inherited) if body is not None else Settings()
    return Level(name, settings, f"level '{name}' ({node.where})")
