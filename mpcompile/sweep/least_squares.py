"""Linear regression by least squares, solved in a chosen precision.

A classical model for the precision sweep. torch.linalg has no float16/bfloat16 CPU kernels,
and its float32 ones accumulate as they like, so the two solvers are written out here with
every intermediate result rounded by the ``Arithmetic``:

- ``"normal"``: the normal equations ``A^T A w = A^T y``, formed and solved by Cholesky in the
  precision. Forming ``A^T A`` squares the condition number, and its sums can leave a narrow
  range (on diabetes, ``sum(y)`` exceeds fp16's 65504).
- ``"qr"``: Householder QR of ``[A | y]`` in the precision, then back substitution. The
  reflectors are scaled to a leading 1 as LAPACK's ``larfg`` does, which keeps the products
  with ``y`` inside fp16's range.

``A`` is ``x`` with a column of ones appended, whose coefficient is the bias. Dot products are
pairwise sums (``Arithmetic.sum``), so the operation order is the same in every precision and
emulated fp16 equals native fp16 to the bit.
"""
from __future__ import annotations

from typing import Literal

import torch

from .arithmetic import Arithmetic

__all__ = ["least_squares", "r2_score"]


def least_squares(x: torch.Tensor, y: torch.Tensor, arith: Arithmetic,
                  method: Literal["qr", "normal"] = "qr") -> tuple[torch.Tensor, torch.Tensor]:
    """The weights and bias minimising ``||x w + b - y||``, computed in ``arith``.

    Where the precision overflows the result is not finite; nothing is checked or retried.

    Args:
        x: (n, p) features of full column rank, with n > p (anything ``torch.as_tensor`` reads).
        y: (n,) targets.
        arith: the precision every operation rounds to.
        method: ``"qr"`` (Householder) or ``"normal"`` (normal equations and Cholesky).

    Returns:
        (p,) weights and a 0-d bias, in ``arith.dtype``.

    Raises:
        torch.linalg.LinAlgError: ``"normal"``, and ``A^T A`` rounded is not positive definite.
    """
    x, y = arith(torch.as_tensor(x)), arith(torch.as_tensor(y))
    if x.dim() != 2 or y.shape != x.shape[:1] or x.shape[0] <= x.shape[1]:
        raise ValueError(f"least_squares: x must be (n, p) and y (n,) with n > p, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    a = torch.cat([x, arith(torch.ones(len(x), 1))], 1)
    if method == "normal":
        coef = _normal_equations(a, y, arith)
    elif method == "qr":
        coef = _householder(a, y, arith)
    else:
        raise ValueError(f"least_squares: method={method!r} is not 'qr' or 'normal'")
    return coef[:-1], coef[-1]


def r2_score(pred: torch.Tensor, y: torch.Tensor) -> float:
    """The coefficient of determination ``1 - SS_res / SS_tot``, in float64 so that the metric
    adds no rounding of its own (NaN where ``pred`` is not finite).

    Args:
        pred: (n,) predictions.
        y: (n,) true targets (note the order: scikit-learn's takes the targets first).
    """
    pred, y = torch.as_tensor(pred).double(), torch.as_tensor(y).double()
    return (1 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum()).item()


def _normal_equations(a: torch.Tensor, y: torch.Tensor, r: Arithmetic) -> torch.Tensor:
    """Solve ``A^T A w = A^T y``: form both sides, Cholesky ``A^T A = L L^T``, two triangular solves."""
    gram = r.sum(r(a[:, :, None] * a[:, None, :]), 0)
    rhs = r.sum(r(a * y[:, None]), 0)
    p = len(gram)
    low = torch.zeros_like(gram)
    for j in range(p):
        pivot = r(gram[j, j] - r.sum(r(low[j, :j] * low[j, :j]), 0))
        if not pivot > 0:
            raise torch.linalg.LinAlgError(
                f"least_squares(method='normal'): A^T A rounded to {r} is not positive definite "
                f"(Cholesky pivot {j} is {pivot.item()}); use method='qr' or a wider precision")
        low[j, j] = r.sqrt(pivot)
        low[j + 1:, j] = r(r(gram[j + 1:, j] - r.sum(r(low[j + 1:, :j] * low[j, :j]), 1)) / low[j, j])
    # L z = rhs is the upper-triangular system of the reversed rows and columns
    z = _solve_upper(low.flip(0, 1), rhs.flip(0), r).flip(0)
    return _solve_upper(low.T, z, r)


def _householder(a: torch.Tensor, y: torch.Tensor, r: Arithmetic) -> torch.Tensor:
    """Reduce ``[A | y]`` to ``[R | Q^T y]`` by Householder reflections, then solve ``R w = (Q^T y)[:p]``."""
    m = torch.cat([a, y[:, None]], 1)
    p = a.shape[1]
    for j in range(p):
        col, rest = m[j:, j], m[j:, j + 1:]
        beta = -torch.copysign(r.sqrt(r.sum(r(col * col), 0)), col[0])  # -sign(col[0]) ||col||
        tail = r(col[1:] / r(col[0] - beta))  # the reflector (1, tail): col[0] - beta does not cancel
        tau = r(r(beta - col[0]) / beta)
        dots = r(rest[0] + r.sum(r(tail[:, None] * rest[1:]), 0))  # (1, tail) . rest
        scaled = r(tau * dots)
        m[j + 1:, j + 1:] = r(rest[1:] - r(tail[:, None] * scaled))
        m[j, j + 1:] = r(rest[0] - scaled)
        m[j, j] = beta
        m[j + 1:, j] = 0
    return _solve_upper(m[:p, :p], m[:p, p], r)


def _solve_upper(u: torch.Tensor, c: torch.Tensor, r: Arithmetic) -> torch.Tensor:
    """Back substitution for an upper-triangular ``u w = c``, row by row from the last."""
    w = torch.zeros_like(c)
    for i in reversed(range(len(c))):
        w[i] = r(r(c[i] - r.sum(r(u[i, i + 1:] * w[i + 1:]), 0)) / u[i, i])
    return w
