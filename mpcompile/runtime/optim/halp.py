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
        self._flat: dict[str, torch.Tensor] = {}
        self._weight_views: list[torch.Tensor] = []
        self._at_optimum = False

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
        self._flatten(params)

    def _flatten(self, params: list[torch.Tensor]) -> None:
        """Keep codes and anchors each in one tensor, the state's entries views of it: a step
        then rounds, stores and rebuilds w with a few ops instead of a few per parameter."""
        self._at_optimum = not float(self.state[params[0]]["scale"]) > 0  # g~ = 0: z stays 0
        sizes = [p.numel() for p in params]
        for key in ("codes", "anchor"):
            flat = torch.cat([self.state[p][key].reshape(-1) for p in params])
            for p, view in zip(params, flat.split(sizes)):
                self.state[p][key] = view.view_as(p)
            self._flat[key] = flat
        self._flat["weights"] = torch.empty_like(self._flat["anchor"])  # w~ + z, then copied into the parameters
        self._weight_views = [v.view_as(p) for v, p in zip(self._flat["weights"].split(sizes), params)]

    def _apply(self, params: list[torch.Tensor], deltas: list[torch.Tensor]) -> None:
        if self._at_optimum:
            return
        scale = self.state[params[0]]["scale"]  # one scale for all: the full gradient's norm
        codes, anchor = self._flat["codes"], self._flat["anchor"]
        target = torch.cat([d.view(-1) for d in deltas]).div_(scale).add_(codes)  # in units of s
        rounded = self._round(target, self.grid, saturate=True)  # one call a step
        codes.copy_(rounded)
        torch.add(anchor, rounded.mul_(scale), out=self._flat["weights"])  # w = w~ + z, z = codes * s
        torch._foreach_copy_(params, self._weight_views)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for p_state in self.state.values():  # torch casts every state tensor to its parameter's dtype
            if "codes" in p_state:
                p_state["codes"] = p_state["codes"].to(_code_dtype(self.bits))
        params = self._params()
        if all("codes" in self.state[p] for p in params):
            self._flatten(params)
