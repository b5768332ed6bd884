"""Emulated low-precision arithmetic: arithmetic specs, ``mpc::`` custom ops and their entry points."""
from .addmm import addmm, baddbmm
from .api import conv1d, conv2d, conv3d, linear, matmul, mean, quant, sum
from .attention import multi_head_attention, scaled_dot_product_attention
from .conv_transpose import conv_transpose1d, conv_transpose2d, conv_transpose3d
from .einsum import einsum
from .emulate import chunk_is_exact, emulated_matmul
from .spec import ROLES, ArithSpec, QuantSpec, Recompute, RoleFormats, SpecError

__all__ = ["ArithSpec", "QuantSpec", "RoleFormats", "Recompute", "ROLES", "SpecError", "matmul", "linear", "conv1d",
           "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "addmm", "baddbmm",
           "einsum", "multi_head_attention", "scaled_dot_product_attention", "quant", "sum", "mean",
           "emulated_matmul", "chunk_is_exact"]
