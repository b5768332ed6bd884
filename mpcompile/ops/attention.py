"""Attention as emulated GEMMs, for policies that quantize it.

torch runs attention as one fused kernel, which has no place for formats. Here it is written
out, every GEMM an ``mpc::`` op with the same roles and arithmetic (``input`` the left
operand, ``weight`` the right one):

- ``multi_head_attention`` (``nn.MultiheadAttention``, four GEMMs), as
  ``F.multi_head_attention_forward`` writes it out when it returns weights: input projection,
  q·kᵀ on q scaled by 1/sqrt(head_dim), additive masks, softmax, dropout, probabilities·v,
  output projection;
- ``scaled_dot_product_attention`` (two GEMMs), as torch documents its reference: q·kᵀ, then
  scaled, masked, softmax, dropout, probabilities·v.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .api import Formats, Spec, fx_leaf, linear, matmul

__all__ = ["multi_head_attention", "scaled_dot_product_attention", "unsupported_attention"]


def unsupported_attention(module: nn.MultiheadAttention) -> str | None:
    """Why ``module`` cannot be decomposed here (None if it can)."""
    if module.bias_k is not None or module.add_zero_attn:
        return "add_bias_kv / add_zero_attn are not emulated"
    return None


def _additive(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """A boolean mask (True = not allowed) as -inf / 0, a float mask as it is."""
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros_like(mask, dtype=like.dtype).masked_fill_(mask, -math.inf)


@fx_leaf
def multi_head_attention(module: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor,
                         value: torch.Tensor, key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                         attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                         is_causal: bool = False, *, formats: Formats = None, forward: Spec = None,
                         backward: Spec = None, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor | None]:
    """``module(query, key, value, ...)`` with per-role formats and emulated arithmetic.

    Args:
        module: the attention module (its parameters, heads, dropout, batch_first).
        query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
            is_causal: as ``nn.MultiheadAttention.forward`` (``is_causal`` is a hint there:
            the causal mask itself comes in ``attn_mask``).
        formats, forward, backward, backend: roles, arithmetic and backend of all four GEMMs (see
            ``linear``).
    """
    why = unsupported_attention(module)
    if why is not None:
        raise ValueError(f"mpcompile.ops.multi_head_attention: {why}")
    if is_causal and attn_mask is None:
        raise ValueError("mpcompile.ops.multi_head_attention: is_causal needs the causal attn_mask, as in torch")
    batched = query.dim() == 3
    if not batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
    elif module.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    gemm = {"formats": formats, "forward": forward, "backward": backward, "backend": backend}
    e, heads = module.embed_dim, module.num_heads
    bias = (None,) * 3 if module.in_proj_bias is None else module.in_proj_bias.chunk(3)
    if module._qkv_same_embed_dim and query is key is value:
        q, k, v = linear(query, module.in_proj_weight, module.in_proj_bias, **gemm).chunk(3, dim=-1)
    else:
        weights = module.in_proj_weight.chunk(3) if module._qkv_same_embed_dim else \
            (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
        q, k, v = (linear(t, w, b, **gemm) for t, w, b in zip((query, key, value), weights, bias))
    # (L, N, E) -> (N, heads, L, head_dim)
    q, k, v = (t.unflatten(-1, (heads, e // heads)).permute(1, 2, 0, 3) for t in (q, k, v))
    scores = matmul(q * math.sqrt(1.0 / (e // heads)), k.transpose(-2, -1), **gemm)
    mask = _additive(attn_mask, scores)
    if mask is not None:
        scores = scores + (mask.unflatten(0, (-1, heads)) if mask.dim() == 3 else mask)
    padding = _additive(key_padding_mask, scores)
    if padding is not None:
        scores = scores + padding[:, None, None, :]
    probs = F.softmax(scores, dim=-1)
    if module.training and module.dropout > 0:
        probs = F.dropout(probs, module.dropout)
    out = matmul(probs, v, **gemm).permute(2, 0, 1, 3).flatten(2)
    out = linear(out, module.out_proj.weight, module.out_proj.bias, **gemm)
    out = out.squeeze(1) if not batched else out.transpose(0, 1) if module.batch_first else out
    if not need_weights:
        return out, None
    weights = probs.mean(dim=1) if average_attn_weights else probs
    return out, weights if batched else weights.squeeze(0)


@fx_leaf
def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
                                 scale: float | None = None, enable_gqa: bool = False, *, formats: Formats = None,
                                 forward: Spec = None, backward: Spec = None, backend: str = "auto") -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with its two GEMMs emulated.

    Args:
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa: as
            ``F.scaled_dot_product_attention`` (a boolean mask: True where a query may attend).
        formats, forward, backward, backend: roles, arithmetic and backend of both GEMMs (see
            ``matmul``).
    """
    if is_causal and attn_mask is not None:
        raise ValueError("mpcompile.ops.scaled_dot_product_attention: is_causal and attn_mask exclude each other, as "
                         "in torch")
    if enable_gqa:  # each group of query heads shares one key and value head
        key = key.repeat_interleave(query.size(-3) // key.size(-3), -3)
        value = value.repeat_interleave(query.size(-3) // value.size(-3), -3)
    gemm = {"formats": formats, "forward": forward, "backward": backward, "backend": backend}
    scores = matmul(query, key.transpose(-2, -1), **gemm) * (1 / math.sqrt(query.size(-1)) if scale is None else scale)
    if is_causal:
        attn_mask = torch.ones(query.size(-2), key.size(-2), dtype=torch.bool, device=query.device).tril()
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool else scores + attn_mask
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    return matmul(probs, value, **gemm)
