"""Generated GEMM kernels of the emulated ops: a registry, and what one call asks of a kernel.

A GEMM backend computes ``emulated_matmul``'s batched ``a @ b`` (B, M, K) @ (B, K, N) for
operands rounded to the two role formats given (None: unknown), or returns None where it does
not emulate that arithmetic. A ``GemmFusion`` asks it for more in the same kernel: rounding raw
operands to their roles as they are loaded (the prologue), and adding a bias and rounding the
result to its role before it is stored (the epilogue), so that no separate pass over memory
does either. A backend that cannot fuse what is asked returns None quietly; the op then rounds
in memory and calls again without a fusion.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..backends import current_backend, resolve_backend
from .spec import ArithSpec, QuantSpec

__all__ = ["GemmFusion", "GemmBackend", "register_gemm_backend", "has_gemm_backend", "backend_gemm",
           "rounds_in_kernel"]


@dataclass(frozen=True)
class GemmFusion:
    """The rounding work around a GEMM's product that its kernel does in registers.

    Attributes:
        round_a, round_b: round that raw operand to its role in the prologue (False: it is
            rounded already).
        seed_a, seed_b: the seeds of the operands' stochastic rounding, drawn as ``quantize_role``
            draws them from the role tensor's flat index.
        a_transposed, b_transposed: that operand's role tensor is its transpose (a linear weight
            (N, K) read as (K, N); grad_output (M, N) read as (N, M) for the weight's gradient).
        bias: (N,) or (B, N), already rounded to its role: one more rounded add into the
            accumulator, as the reference adds a bias.
        out_role, seed_out: the result's role, rounded before the store. A stochastic one needs
            the result's flat index (B, M, N) to be its role tensor's; the caller checks that.
    """

    round_a: bool = False
    round_b: bool = False
    seed_a: int = 0
    seed_b: int = 0
    a_transposed: bool = False
    b_transposed: bool = False
    bias: torch.Tensor | None = None
    out_role: QuantSpec | None = None
    seed_out: int = 0


@dataclass(frozen=True)
class GemmBackend:
    """A backend's generated GEMM.

    Attributes:
        gemm: ``(a, b, spec, a_role, b_role, fusion=None, seed=None, index=None)`` -> the
            float32 result holding acc values, or None where it does not emulate the call
            (``seed``, ``index``: the random bits of stochastic products and sums, as
            ``emulated_matmul`` takes them).
        rounds: whether its kernels round to an unscaled role format in registers.
    """

    gemm: Callable[..., "torch.Tensor | None"]
    rounds: Callable[[QuantSpec], bool]


_BACKENDS: dict[str, GemmBackend] = {}


def register_gemm_backend(name: str, backend: GemmBackend) -> None:
    """Add the emulated GEMM of backend ``name`` (``triton``: ``codegen.triton_gemm``)."""
    _BACKENDS[name] = backend


def _kernel(device: torch.device) -> GemmBackend | None:
    return _BACKENDS.get(resolve_backend(current_backend(), device))


def has_gemm_backend(device: torch.device) -> bool:
    """Whether the op's backend (``current_backend`` on ``device``) has a generated GEMM: where it
    has none, work prepared for a fusion would be thrown away."""
    return _kernel(device) is not None


def backend_gemm(a: torch.Tensor, b: torch.Tensor, spec: ArithSpec, roles: tuple[QuantSpec | None, QuantSpec | None],
                 fusion: GemmFusion | None = None, *, seed: int | None = None,
                 index: torch.Tensor | None = None) -> torch.Tensor | None:
    """The GEMM of the op's backend (``current_backend`` on a's device), or None where that
    backend has no generated GEMM, or does not emulate this call. ``seed`` and ``index`` number
    the random bits of stochastic products and sums, as for ``emulated_matmul``."""
    backend = _kernel(a.device)
    if backend is None or spec.is_native:
        return None
    return backend.gemm(a, b, spec, *roles, fusion=fusion, seed=seed, index=index)


def rounds_in_kernel(role: QuantSpec | None, device: torch.device, index_is_the_roles: bool, *,
                     padded: bool = False) -> bool:
    """Whether the GEMM kernel of the op's backend on ``device`` may round an operand (as it
    loads it) or its result (before the store) to ``role``: an unscaled role its kernels
    round; stochastic rounding needs the tensor's flat index to be its role tensor's (not a
    broadcast, unfolded or permuted view), and zeros an unfold pads in must stay zeros (a
    format without zero rounds them away)."""
    backend = _kernel(device)
    if backend is None or role is None or role.scaling != "none" or not backend.rounds(role):
        return False
    if role.rounding == "stochastic" and not index_is_the_roles:
        return False
    return not padded or getattr(role.fmt, "has_zero", True)
