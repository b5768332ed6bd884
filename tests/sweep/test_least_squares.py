"""least_squares on diabetes: the fp64 solution to 1e-8, fp32 and fp16 within their error
bounds, every intermediate rounded (emulated fp16/bf16 equal native to the bit), and the
failures of the normal equations in narrow precisions."""
from __future__ import annotations

import functools

import pytest
import sklearn.metrics
import torch
from sklearn.datasets import load_diabetes
from sklearn.linear_model import LinearRegression

from mpcompile.sweep.arithmetic import Arithmetic
from mpcompile.sweep.least_squares import least_squares, r2_score

FP64 = Arithmetic(torch.float64)


@functools.cache
def _diabetes() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_diabetes(return_X_y=True)
    return torch.tensor(x), torch.tensor(y)


@functools.cache
def _design() -> torch.Tensor:
    """The matrix A = [x | 1] that both solvers factor."""
    x, _ = _diabetes()
    return torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)


@functools.cache
def _solve(arith: Arithmetic, method: str) -> torch.Tensor:
    """(weights, bias) as one float64 vector."""
    w, b = least_squares(*_diabetes(), arith, method)
    return torch.cat([w, b[None]]).double()


def _r2(coef: torch.Tensor) -> float:
    x, y = _diabetes()
    return r2_score(x @ coef[:-1] + coef[-1], y)


def _relative_error(coef: torch.Tensor) -> float:
    exact = _solve(FP64, "qr")
    return ((coef - exact).norm() / exact.norm()).item()


def _kappa() -> float:
    s = torch.linalg.svdvals(_design())
    return (s[0] / s[-1]).item()  # 227


@pytest.mark.parametrize("method", ["qr", "normal"])
def test_fp64_equals_lstsq_and_scikit_learn(method):
    x, y = _diabetes()
    coef = _solve(FP64, method)
    lstsq = torch.linalg.lstsq(_design(), y[:, None]).solution[:, 0]
    sk = LinearRegression().fit(x.numpy(), y.numpy())
    sk_coef = torch.tensor([*sk.coef_, sk.intercept_])
    for reference in (lstsq, sk_coef):
        assert ((coef - reference).norm() / reference.norm()).item() < 1e-8


@pytest.mark.parametrize("method,power", [("qr", 1), ("normal", 2)])
def test_fp32_error_is_within_the_first_order_bound(method, power):
    """QR's forward error is of order kappa(A) u, the normal equations' kappa(A)**2 u
    (u = 2**-24; measured: 4e-7 and 3e-7, against bounds of 1.4e-5 and 3e-3)."""
    assert _relative_error(_solve(Arithmetic(torch.float32), method)) < _kappa() ** power * 2.0**-24


@pytest.mark.parametrize("dtype,unit_roundoff", [(torch.float16, 2.0**-11), (torch.bfloat16, 2.0**-8)], ids=str)
def test_low_precision_qr_loses_little_r2(dtype, unit_roundoff):
    """The fp64 residual is orthogonal to A's columns, so the R2 lost by coefficients off by d is
    exactly ||A d||**2 / SS_tot. A backward-stable solver's residual is off by about
    u ||A|| ||w||, which bounds that loss by (u ||A|| ||w||)**2 / SS_tot: 7.7e-5 for fp16 and
    4.9e-3 for bf16 (measured: 3.3e-6, R2 0.517745 against 0.517748, and 1.7e-4)."""
    _, y = _diabetes()
    exact = _solve(FP64, "qr")
    loss = _r2(exact) - _r2(_solve(Arithmetic(dtype), "qr"))
    norm_a = torch.linalg.matrix_norm(_design(), 2).item()
    bound = (unit_roundoff * norm_a * exact.norm().item()) ** 2 / ((y - y.mean()) ** 2).sum().item()
    assert 0 <= loss < bound


@pytest.mark.parametrize("native,emulated", [(torch.float16, "fp16"), (torch.bfloat16, "bf16")])
@pytest.mark.parametrize("method", ["qr", "normal"])
def test_emulated_equals_native_to_the_bit(native, emulated, method):
    """One operation order, and float32 rounded to fp16/bf16 is the correctly rounded result for
    + - * / (float32 has 2p + 2 of their p significand bits; sqrt is taken in float64)."""
    x, y = _diabetes()
    for a, b in zip(least_squares(x, y, Arithmetic(native), method),
                    least_squares(x, y, Arithmetic(torch.float32, emulated), method)):
        torch.testing.assert_close(a.float(), b, rtol=0, atol=0, equal_nan=True)


def test_fp16_normal_equations_overflow():
    """A^T y's bias entry is sum(y) = 67243, beyond fp16's largest value 65504."""
    _, y = _diabetes()
    assert y.sum() > torch.finfo(torch.float16).max
    assert not torch.isfinite(_solve(Arithmetic(torch.float16), "normal")).all()
    assert torch.isfinite(_solve(Arithmetic(torch.float16), "qr")).all()


def test_fp8_normal_equations_are_not_positive_definite():
    with pytest.raises(torch.linalg.LinAlgError, match="not positive definite"):
        _solve(Arithmetic(torch.float32, "fp8_e4m3"), "normal")


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match="'qr' or 'normal'"):
        least_squares(*_diabetes(), FP64, "svd")


def test_r2_score_equals_scikit_learn():
    _, y = _diabetes()
    pred = y + torch.linspace(-30, 30, len(y), dtype=torch.float64)
    assert r2_score(pred, y) == pytest.approx(sklearn.metrics.r2_score(y.numpy(), pred.numpy()), rel=1e-12)
