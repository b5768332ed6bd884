"""The full gradient a variance-reduced optimizer anchors to: from a closure or from a data loader."""
from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch

__all__ = ["FullGradient", "full_gradient"]

# a closure that leaves the full gradient in .grad, or re-iterable batches (with a grad_fn)
FullGradient = Callable[[], Any] | Iterable[Any]


def _batch_size(batch: Any) -> int:
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    return len(first)


def full_gradient(params: Sequence[torch.Tensor], full_grad: FullGradient,
                  grad_fn: Callable[[Any], Any] | None = None) -> list[torch.Tensor]:
    """The gradient of the whole objective at the current parameters, one tensor per parameter.

    Args:
        params: the parameters.
        full_grad: a closure that evaluates the objective over all the data and leaves its
            gradient in each ``.grad`` (zeroed before it runs; it may call ``backward`` batch by
            batch), or a re-iterable of batches (a DataLoader, a list), whose mean is taken
            weighted by batch size (the first tensor's length).
        grad_fn: for batches: computes one batch's mean loss and calls ``backward`` on it.

    Raises:
        TypeError: batches without ``grad_fn``, or a one-shot iterator (the full gradient is
            taken again every epoch).
    """
    for p in params:
        p.grad = None
    if callable(full_grad):
        full_grad()
        return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]
    if grad_fn is None:
        raise TypeError("a full gradient from batches needs grad_fn(batch): the batch's mean loss, backward called")
    if iter(full_grad) is full_grad:
        raise TypeError("full_grad is a one-shot iterator; the full gradient is taken every epoch: pass a "
                        "DataLoader, a list of batches or a closure")
    total = [torch.zeros_like(p) for p in params]
    seen = 0
    for batch in full_grad:
        n = _batch_size(batch)
        for p in params:
            p.grad = None
        grad_fn(batch)
        for t, p in zip(total, params):
            if p.grad is not None:
                t.add_(p.grad, alpha=n)
        seen += n
    if not seen:
        raise ValueError("full_grad gave no batches")
    for p in params:
        p.grad = None
    return [t.div_(seen) for t in total]
