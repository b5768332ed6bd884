"""The precision sweep: models trained in many precisions, natively and emulated, timed and scored.

``mpcompile.sweep(...)`` (this package, called) and ``mpcompile sweep`` run
``sweep.runner.sweep``. Its parts, lowest first: ``arithmetic`` (a precision for a solver),
``precision`` (what a precision's name means), ``native`` (how it runs natively on a device:
cast, autocast, fp8 GEMMs), ``data`` (the data sets),
``least_squares`` and ``tree`` (classical solvers in a precision), ``models`` (the models by
name), ``training`` (one timed run), ``results`` (rows, table, plots) and ``runner``.
"""
from __future__ import annotations

import sys
import types
from typing import Any


class _CallableModule(types.ModuleType):
    """The package, callable: ``mpcompile.sweep(...)`` is ``mpcompile.sweep.runner.sweep(...)``."""

    def __call__(self, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        from .runner import sweep

        return sweep(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
