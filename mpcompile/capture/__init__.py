"""Capture: a model as an fx.GraphModule whose call nodes the op registry recognises."""
from .fx import capture_fx, traced_defaults
from .traceable import TRACEABLE_FORWARDS

__all__ = ["capture_fx", "traced_defaults", "TRACEABLE_FORWARDS"]
