"""The pass manager: a fixed list of passes run in order over one ``PassState``.

Each ``Pass`` states the ``MpcMeta`` fields it reads and writes; ``check_order`` holds a list to
it (every field read is written by an earlier pass of the list or of the lists run before).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn as nn

from ..capture import Inputs
from ..policy import Policy

__all__ = ["PassState", "Pass", "run_passes", "check_order"]


@dataclass
class PassState:
    """What a compile works on and produces.

    Attributes:
        model: the user's module; leaf_modules: module types kept opaque by the capture.
        policy, level: the policy in force and its level (or node name -> level).
        inputs: example inputs as the model takes them (None: no shapes, no coverage check).
        calibration: batches for the condition and stats passes (none: they do not run).
        capture: the capture path asked for (``auto``, ``fx``, ``export``, ``graph``); after
            capture, the one taken.
        backend: which implementation the lowered ops use (``mpcompile.backends``).
        example_inputs, batches: ``inputs`` and ``calibration`` as the captured graph's
            placeholders take them (capture).
        traced: the captured, annotated graph (capture); lowered: the graph of ``mpc::`` ops (lower).
    """

    model: nn.Module
    policy: Policy
    level: "int | str | Mapping[str, int | str]" = 0
    leaf_modules: tuple[type, ...] = ()
    inputs: Inputs | None = None
    calibration: tuple[Inputs, ...] = ()
    capture: str = "auto"
    backend: str = "auto"
    example_inputs: tuple | None = None
    batches: list[tuple] = field(default_factory=list)
    traced: torch.fx.GraphModule | None = None
    lowered: torch.fx.GraphModule | None = None


@dataclass(frozen=True)
class Pass:
    """One pass: ``run(state)`` where ``applies(state)``.

    Attributes:
        name: what the pass is called in errors and docs.
        run: the pass over the state.
        reads, writes: the ``MpcMeta`` fields it reads and writes (documentation the order is checked against).
        applies: whether the pass runs for this state (default: always).
    """

    name: str
    run: Callable[[PassState], Any]
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    applies: Callable[[PassState], bool] = lambda state: True


def run_passes(passes: Sequence[Pass], state: PassState) -> PassState:
    """Run each pass that applies, in order, and return the state."""
    for p in passes:
        if p.applies(state):
            p.run(state)
    return state


def check_order(passes: Sequence[Pass], written_before: Iterable[str] = ()) -> None:
    """Raise ValueError where a pass reads a field that no earlier pass (nor ``written_before``) writes."""
    written = set(written_before)
    for p in passes:
        missing = sorted(set(p.reads) - written)
        if missing:
            raise ValueError(f"pass {p.name} reads {', '.join(missing)}, which no earlier pass writes")
        written |= set(p.writes)
