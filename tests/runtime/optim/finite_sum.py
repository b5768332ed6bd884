"""A strongly convex finite sum with a known optimum, for the variance-reduced optimizers' tests:
f(w) = 1/n sum_i 1/2 (a_i . w - b_i)^2 + lam/2 ||w||^2 in float64, b chosen so that f* = 0 is not
forced but w* is known in closed form."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LeastSquares:
    A: torch.Tensor
    b: torch.Tensor
    lam: float

    @classmethod
    def random(cls, n: int = 64, d: int = 6, lam: float = 0.1, seed: int = 0) -> "LeastSquares":
        g = torch.Generator().manual_seed(seed)
        return cls(torch.randn(n, d, generator=g, dtype=torch.float64),
                   torch.randn(n, generator=g, dtype=torch.float64), lam)

    def loss(self, w: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        A, b = (self.A, self.b) if rows is None else (self.A[rows], self.b[rows])
        return 0.5 * (A @ w - b).square().mean() + 0.5 * self.lam * w.square().sum()

    def grad(self, w: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        A, b = (self.A, self.b) if rows is None else (self.A[rows], self.b[rows])
        return A.T @ (A @ w - b) / len(b) + self.lam * w

    @property
    def optimum(self) -> torch.Tensor:
        n, d = self.A.shape
        return torch.linalg.solve(self.A.T @ self.A / n + self.lam * torch.eye(d, dtype=torch.float64),
                                  self.A.T @ self.b / n)

    def gap(self, w: torch.Tensor) -> float:
        """f(w) - f(w*), exactly: (w - w*)^T H (w - w*) / 2 (no cancellation of two large losses)."""
        e = w.detach() - self.optimum
        n = len(self.b)
        return float(0.5 * (self.A @ e).square().sum() / n + 0.5 * self.lam * e.square().sum())

    def batches(self, size: int, epoch: int) -> list[torch.Tensor]:
        order = torch.randperm(len(self.b), generator=torch.Generator().manual_seed(epoch))
        return list(order.split(size))
