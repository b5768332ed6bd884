"""Observers of role rounding: a read-only window into the ops for monitoring.

Every rounding of a role (``bodies.round_role``, forward and backward) and every value an
optimizer stores in a format calls ``notify(role, raw, rounded, spec)`` while an observer is
installed with ``observing``. Observers only read: an observed step computes exactly what an
unobserved one does. The rounded value of a GEMM operand lives in memory the ops reuse at their
next call (``bodies.round_role``'s ``operand``): an observer that keeps it past the call keeps a
clone. With none installed, ``notify`` costs one truth test.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch

__all__ = ["Observer", "observing", "observed", "notify"]

# (role, raw value, rounded value, its QuantSpec or Format, key): key is a stored value's owner
# (an optimizer passes the parameter); None inside an op
Observer = Callable[[str, torch.Tensor, torch.Tensor, Any, Any], None]
_OBSERVERS: list[Observer] = []


@contextlib.contextmanager
def observing(observer: Observer) -> Iterator[None]:
    """Call ``observer`` for every rounding while the context is open."""
    _OBSERVERS.append(observer)
    try:
        yield
    finally:
        _OBSERVERS.remove(observer)


def observed() -> bool:
    """Whether an observer is installed: a caller whose rounded value costs extra work to form
    (an optimizer's packed states) forms it only then."""
    return bool(_OBSERVERS)


def notify(role: str, raw: torch.Tensor, rounded: torch.Tensor, spec: Any, key: Any = None) -> None:
    """Tell the installed observers that ``raw`` was rounded to ``rounded`` for ``role``."""
    for observer in _OBSERVERS:
        observer(role, raw, rounded, spec, key)
