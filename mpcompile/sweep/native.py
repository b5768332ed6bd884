"""How a network runs natively: the torch dtype itself, torch's autocast, or fp8 GEMMs.

- ``cast`` (the CPU's way): weights, data and every op in the dtype (``module.to(dtype)``).
- ``autocast`` (CUDA, bf16 / fp16): what GPU users run, torch's automatic mixed precision:
  fp32 weights, GEMMs and convolutions in the dtype under ``torch.autocast``, and for fp16 a
  ``GradScaler`` that keeps small gradients from flushing to zero.
- ``fp8`` (CUDA devices with fp8 tensor cores, compute capability 8.9 and up, for the fp8
  precisions): every ``nn.Linear`` multiplies in float8 through ``torch._scaled_mm``, its input
  and weight scaled per tensor by their amax into e4m3 (e5m2 for an e5m2 precision), the rest
  under bf16 autocast; gradients come from the bf16 operands (fp8 forward, as in the first fp8
  training recipes), weights stay fp32.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .precision import Precision

__all__ = ["NativePlan", "native_plan", "run_modes", "Float8Linear"]

_FP8 = {"fp8_e4m3": torch.float8_e4m3fn, "e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2,
        "e5m2": torch.float8_e5m2}


@dataclass(frozen=True)
class NativePlan:
    """One way of running natively: ``kind`` (cast, autocast, fp8) and the dtype it computes in."""

    kind: str
    dtype: torch.dtype
    fp8: torch.dtype | None = None  # the float8 dtype of fp8 GEMMs

    def __str__(self) -> str:
        name = str(self.fp8 or self.dtype).removeprefix("torch.")
        return {"cast": f"the model in {name}", "autocast": f"torch.autocast({name})"
                + (" with a GradScaler" if self.dtype == torch.float16 else ""),
                "fp8": f"torch._scaled_mm in {name}, the rest under torch.autocast(bfloat16)"}[self.kind]

    def prepare(self, module: nn.Module, x: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
        """The module and inputs as this plan runs them."""
        if self.kind == "cast":
            return module.to(self.dtype), x.to(self.dtype)
        if self.kind == "fp8":
            _swap_linears(module, self.fp8)
        return module, x.float()

    @contextlib.contextmanager
    def forward(self, device: torch.device) -> Iterator[None]:
        """The context of a forward (and the loss)."""
        if self.kind == "cast":
            yield
            return
        with torch.autocast(device.type, dtype=self.dtype):
            yield

    def scaler(self, device: torch.device) -> torch.amp.GradScaler | None:
        """fp16 autocast's loss scaler (None where none is needed)."""
        return torch.amp.GradScaler(device.type) if self.kind == "autocast" and self.dtype == torch.float16 else None


def native_plan(precision: Precision, device: torch.device) -> NativePlan | None:
    """How ``precision`` runs natively on ``device``, or None where it does not (emulated only).

    On the CPU a dtype is cast; on CUDA bf16 and fp16 are autocast, fp64 and fp32 cast, and the
    fp8 formats run fp8 GEMMs where the device has them (compute capability 8.9 and up).
    """
    if device.type == "cuda" and precision.name in _FP8 and torch.cuda.get_device_capability(device) >= (8, 9):
        return NativePlan("fp8", torch.bfloat16, _FP8[precision.name])
    if precision.dtype is None:
        return None
    if device.type == "cuda" and precision.dtype in (torch.float16, torch.bfloat16):
        return NativePlan("autocast", precision.dtype)
    return NativePlan("cast", precision.dtype)


def run_modes(precision: Precision, device: torch.device) -> tuple[str, ...]:
    """The modes ``precision`` runs in on ``device``: native where ``native_plan`` has a way,
    emulated where it has a policy."""
    return tuple(m for m, ok in (("native", native_plan(precision, device) is not None),
                                 ("emulated", precision.policy is not None)) if ok)


class _ScaledMM(torch.autograd.Function):
    """``x @ w.T`` with both operands in float8 (per-tensor amax scales) through ``torch._scaled_mm``;
    the backward multiplies the incoming gradient with the operands as they came (fp32 or bf16)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, fp8: torch.dtype) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        (xq, sx), (wq, sw) = _to_fp8(x, fp8), _to_fp8(w, fp8)
        out = torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=sw, out_dtype=torch.float32)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w = ctx.saved_tensors
        return grad @ w.to(grad.dtype), grad.t() @ x.to(grad.dtype), None


def _to_fp8(t: torch.Tensor, fp8: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` divided by its per-tensor scale amax / fp8 max, as ``fp8``, and that scale (fp32)."""
    amax = t.detach().abs().amax().float().clamp_min(1e-12)
    scale = amax / torch.finfo(fp8).max
    return (t.float() / scale).to(fp8), scale


class Float8Linear(nn.Linear):
    """An ``nn.Linear`` whose matrix product runs in float8 through ``torch._scaled_mm``.

    ``_scaled_mm`` wants both dims of the product multiples of 16: the batch (and the features)
    are zero-padded to them, which changes no output row kept.
    """

    fp8: torch.dtype = torch.float8_e4m3fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        rows, (out_f, in_f) = x2.shape[0], self.weight.shape
        pad = lambda n: -n % 16  # noqa: E731
        w = F.pad(self.weight, (0, pad(in_f), 0, pad(out_f)))
        x2 = F.pad(x2, (0, pad(in_f), 0, pad(rows)))
        y = _ScaledMM.apply(x2, w.to(x2.dtype), self.fp8)[:rows, :out_f]
        y = y + self.bias.to(y.dtype) if self.bias is not None else y
        return y.reshape(*shape[:-1], out_f)


def _swap_linears(module: nn.Module, fp8: torch.dtype) -> None:
    """Make every ``nn.Linear`` inside ``module`` a ``Float8Linear`` (same parameters) in place."""
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = Float8Linear
            m.fp8 = fp8
