"""HALP (De Sa, Leszczynski et al. 2018, "High-Accuracy Low-Precision Training"): SVRG with
bit centering.

The weights are w = w~ + z: the anchor w~ in high precision and an offset z stored as
``bits``-bit integers times one scale s. Every ``T`` steps

    w~ <- w~ + z,   g~ = grad f(w~),   z <- 0,   s = ||g~|| / (mu (2^(bits-1) - 1))

and each step on batch i is

    z <- Q_s(z - lr (grad f_i(w~ + z) - grad f_i(w~) + g~))

with Q_s rounding to the grid {k s : -2^(bits-1) <= k <= 2^(bits-1) - 1} (saturating). For a
mu-strongly convex f the optimum lies within ||g~|| / mu of w~, so the grid covers it, and as
the full gradient shrinks so does s: the grid refines as the optimum nears and HALP converges
linearly in ``bits`` bits where LP-SVRG stalls at its fixed grid. The model always computes
with w~ + z; z is stored as integers, so every value it takes is exactly on its grid.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

from ...formats import FixedFormat
from .full_gradient import FullGradient
from .svrg import VarianceReduced

__all__ = ["HALP"]


def _code_dtype(bits: int) -> torch.dtype:
    return torch.int8 if bits <= 8 else torch.int16 if bits <= 16 else torch.int32


class HALP(VarianceReduced):
    """SVRG with bit centering (equations in the module docstring).

    Args:
        params, lr, T, full_grad: as ``VarianceReduced`` (so are its keyword arguments).
        mu: the strong-convexity constant the scale divides by (> 0).
        bits: word length of the offset's integers (2..32).
        rounding: rounding of the offset (``nearest``, ``stochastic``, ...).
    """

    def __init__(self, params: Iterable, lr: float, T: int, full_grad: FullGradient, mu: float, bits: int = 8,
                 **kwargs):
        if not 0 < mu < float("inf"):
            raise ValueError(f"mu {mu} must be positive and finite")
        if not isinstance(bits, int) or not 2 <= bits <= 32:
            raise ValueError(f"bits {bits} must be an integer in 2..32")
        super().__init__(params, lr, T, full_grad, **kwargs)
        self.mu, self.bits = mu, bits
        self.grid = FixedFormat(bits, 0)

    def _anchor(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        # w~ + z is what the parameters hold, computed in their dtype: it is the new anchor as is
        super()._anchor(params, grads)
        decay = {id(p): group["weight_decay"] for group in self.param_groups for p in group["params"]}
        # the objective's gradient includes the L2 term the steps add: without it the grid
        # would stop refining at the regularised optimum, where g~ = -weight_decay * w~
        full = [g.double() + decay[id(p)] * p.double() for p, g in zip(params, grads)]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in full]))
        scale = norm / (self.mu * (2 ** (self.bits - 1) - 1))
        for p in params:
            self.state[p].update(codes=torch.zeros_like(p, dtype=_code_dtype(self.bits)),
                                 scale=scale.to(device=p.device, dtype=p.dtype))

    def _apply(self, params: list[torch.Tensor], deltas: list[torch.Tensor]) -> None:
        scale = self.state[params[0]]["scale"]  # one scale for all: the full gradient's norm
        if not float(scale) > 0:  # g~ = 0: the anchor is the optimum, z stays 0
            return
        codes = [self.state[p]["codes"] for p in params]
        target = torch.cat([d.reshape(-1).div_(scale).add_(c.reshape(-1)) for d, c in zip(deltas, codes)])
        rounded = self._round(target, self.grid, saturate=True).split([p.numel() for p in params])  # one call a step
        for p, c, r in zip(params, codes, rounded):
            c.copy_(r.view_as(c))
            p.copy_(r.view_as(p).mul_(scale).add_(self.state[p]["anchor"]))  # w = w~ + z, z = codes * s

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for p_state in self.state.values():  # torch casts every state tensor to its parameter's dtype
            if "codes" in p_state:
                p_state["codes"] = p_state["codes"].to(_code_dtype(self.bits))
