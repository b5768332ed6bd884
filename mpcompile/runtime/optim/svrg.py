"""SVRG and LP-SVRG (Johnson & Zhang 2013; De Sa et al. 2018): SGD whose gradient noise is
cancelled by the gradient at an anchor point.

Every ``T`` steps the anchor moves to the current weights, w~ = w, and the full gradient
g~ = grad f(w~) is taken over all the data. A step on batch i is then

    w <- w - lr (grad f_i(w) - grad f_i(w~) + g~)

whose direction is unbiased and whose variance vanishes as w and w~ approach the optimum. The
two batch gradients come from two calls of the step's closure, the second with the parameters'
data swapped to the anchor (no copy of the model) and with the random state of the first (the
same dropout masks). LP-SVRG stores w in a low-precision format after each step.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from ...formats import Format
from .full_gradient import FullGradient, full_gradient
from .low_precision import StoredRounding

__all__ = ["VarianceReduced", "SVRG", "LPSVRG"]


class _SameRandomness:
    """Replays torch's random state: ``replay()`` rewinds to where it was made, ``resume()``
    goes on from where the first run left it."""

    def __init__(self, devices: set[torch.device]):
        self.cuda = sorted({d.index or 0 for d in devices if d.type == "cuda"})
        self.start = self._get()
        self.after = None

    def _get(self):
        return torch.get_rng_state(), [torch.cuda.get_rng_state(i) for i in self.cuda]

    def _set(self, state) -> None:
        torch.set_rng_state(state[0])
        for i, s in zip(self.cuda, state[1]):
            torch.cuda.set_rng_state(s, i)

    def replay(self) -> None:
        self.after = self._get()
        self._set(self.start)

    def resume(self) -> None:
        self._set(self.after)


class VarianceReduced(torch.optim.Optimizer):
    """What SVRG, LP-SVRG and HALP share: the anchor, its full gradient, the two-gradient step.

    Args:
        params: parameters or parameter groups (groups may set ``lr`` and ``weight_decay``).
        lr: step size.
        T: steps between anchors (an SVRG "epoch"; the first step anchors).
        full_grad: a closure or re-iterable batches giving the full gradient (``full_gradient``).
        grad_fn: with batches: one batch's mean loss, ``backward`` called on it.
        weight_decay: L2 strength; adds ``weight_decay * w`` to each step's direction.
        rounding: rounding of what the optimizer stores in low precision.
        seed: seed of stochastic rounding (its generator state is checkpointed).
    """

    def __init__(self, params: Iterable, lr: float, T: int, full_grad: FullGradient, *,
                 grad_fn: Callable[[Any], Any] | None = None, weight_decay: float = 0.0,
                 rounding: str = "nearest", seed: int = 0):
        if not lr > 0:
            raise ValueError(f"lr {lr} must be positive")
        if not isinstance(T, int) or T < 1:
            raise ValueError(f"T {T} must be a positive integer (steps between full gradients)")
        if full_grad is None:
            raise ValueError(f"{type(self).__name__} needs the full gradient: full_grad= a closure, or batches "
                             "with grad_fn=")
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        self.T, self.full_grad, self.grad_fn = T, full_grad, grad_fn
        self.steps = 0
        self._round = StoredRounding(rounding, seed)

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any]) -> Any:  # type: ignore[override]
        """One step; ``closure`` computes the batch's loss and calls ``backward`` (``.grad`` is
        zeroed before each call). Returns the loss at w. A step whose gradients are not finite
        changes nothing; one whose closure raises leaves the parameters as they were."""
        params = self._params()
        if self.steps % self.T == 0 and not self._anchored_at_step():
            with torch.enable_grad():
                anchor_grad = full_gradient(params, self.full_grad, self.grad_fn)
            self._anchor(params, anchor_grad)
        randomness = _SameRandomness({p.device for p in params})
        loss, at_w = self._gradient(params, closure)
        randomness.replay()
        swapped = [p.data for p in params]
        try:
            for p in params:
                p.data = self.state[p]["anchor"]
            _, at_anchor = self._gradient(params, closure)
        finally:
            for p, data in zip(params, swapped):
                p.data = data
            randomness.resume()
        full = [self.state[p]["full_grad"] for p in params]
        torch._foreach_sub_(at_w, at_anchor)
        torch._foreach_add_(at_w, full)  # the directions; a non-finite gradient carries into them
        if not bool(torch.stack(torch._foreach_norm(at_w, float("inf"))).isfinite().all()):
            return loss
        deltas, i = [], 0
        for group in self.param_groups:
            n = len(group["params"])
            if group["weight_decay"]:
                torch._foreach_add_(at_w[i:i + n], group["params"], alpha=group["weight_decay"])
            torch._foreach_mul_(at_w[i:i + n], -group["lr"])
            deltas += at_w[i:i + n]
            i += n
        self._apply(params, deltas)
        self.steps += 1
        return loss

    def _anchored_at_step(self) -> bool:
        return any(s.get("anchored_at") == self.steps for s in self.state.values())

    def _gradient(self, params: list[torch.Tensor], closure) -> tuple[Any, list[torch.Tensor]]:
        for p in params:
            p.grad = None
        with torch.enable_grad():
            loss = closure()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        for p in params:  # the optimizer owns these tensors now
            p.grad = None
        return loss, grads

    def _anchor(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        """w~ = w, g~ = the full gradient there."""
        for p, g in zip(params, grads):
            self.state[p].update(anchor=p.detach().clone(), full_grad=g, anchored_at=self.steps)

    def _apply(self, params: list[torch.Tensor], deltas: list[torch.Tensor]) -> None:
        """w <- w + delta, delta = -lr (the step's direction)."""
        torch._foreach_add_(params, deltas)

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {"steps": self.steps, "generators": self._round.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        self.steps = state.pop("steps")
        self._round.load_state_dict(state.pop("generators"))
        super().load_state_dict(state)


class SVRG(VarianceReduced):
    """Stochastic variance-reduced gradient: w <- w - lr (grad f_i(w) - grad f_i(w~) + g~), with
    w~ = w and g~ = grad f(w~) renewed every ``T`` steps (arguments as ``VarianceReduced``)."""


class LPSVRG(VarianceReduced):
    """LP-SVRG: SVRG's step, then w <- Q(w) in ``master`` (the stored weights are low precision;
    the anchor, a copy of them, is too). Rounding is ``rounding`` (stochastic keeps steps below
    half a grid spacing alive in expectation).

    Args:
        master: the weights' format.
        Other arguments as ``VarianceReduced``.
    """

    def __init__(self, params: Iterable, lr: float, T: int, full_grad: FullGradient, master: Format, **kwargs):
        super().__init__(params, lr, T, full_grad, **kwargs)
        self.master = master
        with torch.no_grad():
            for p in self._params():
                p.copy_(self._round(p, master))

    def _apply(self, params: list[torch.Tensor], deltas: list[torch.Tensor]) -> None:
        super()._apply(params, deltas)
        rounded = self._round(torch.cat([p.reshape(-1) for p in params]), self.master)  # one rounding call a step
        torch._foreach_copy_(params, [r.view_as(p) for r, p in zip(rounded.split([p.numel() for p in params]), params)])
