"""Run a traced graph on calibration data and hand each call node's inputs and output to a
callback (used by the condition and stats passes; eval mode, no gradients, modes and random
number generators restored, so analysing a model never changes how training goes on)."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator

import torch

__all__ = ["observe", "evaluating"]


@contextlib.contextmanager
def evaluating(gm: torch.fx.GraphModule) -> Iterator[torch.fx.GraphModule]:
    """``gm`` in eval mode without gradients (batch norms keep their statistics), every
    module's mode and every buffer (amax histories move even in eval) restored afterwards."""
    modes = [(m, m.training) for m in gm.modules()]
    buffers = [(b, b.clone()) for b in gm.buffers()]
    try:
        with torch.no_grad():
            yield gm.eval()
    finally:
        for module, training in modes:
            module.training = training
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)


class _Observer(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, callback: Callable):
        super().__init__(gm)
        self.callback = callback

    def run_node(self, node: torch.fx.Node):
        if node.op not in ("call_module", "call_function", "call_method"):
            return super().run_node(node)
        args, kwargs = self.fetch_args_kwargs_from_env(node)
        # copies: an in-place op (ReLU(inplace=True)) would otherwise overwrite what the callback sees
        args = torch.fx.node.map_aggregate(args, lambda a: a.clone() if isinstance(a, torch.Tensor) else a)
        out = super().run_node(node)
        self.callback(node, args, kwargs, out)
        return out


def observe(gm: torch.fx.GraphModule, batches: Iterable[tuple], callback: Callable) -> None:
    """``callback(node, args, kwargs, output)`` for every call node, batch after batch."""
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with evaluating(gm), torch.random.fork_rng(devices=cuda):  # stochastic rounding draws from torch's generator
        for batch in batches:
            _Observer(gm, callback).run(*batch)
