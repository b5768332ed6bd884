"""Capture: a model as an fx.GraphModule whose call nodes the op registry recognises (fx
symbolic tracing, a GraphModule as it is, or torch.export's ATen graph)."""
from .export import capture_export
from .fx import capture_fx, traced_defaults
from .inputs import Inputs, as_inputs, flat_inputs
from .paths import CAPTURES, capture
from .traceable import TRACEABLE_FORWARDS

__all__ = ["capture", "CAPTURES", "capture_fx", "capture_export", "traced_defaults", "Inputs", "as_inputs",
           "flat_inputs", "TRACEABLE_FORWARDS"]
