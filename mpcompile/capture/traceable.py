"""Traceable forwards for torch.nn modules whose own forward torch.fx cannot trace.

torch.fx keeps every torch.nn module whole, so the Linear layers and attention inside
``nn.TransformerEncoderLayer`` and its kin would never meet a policy; and their forwards choose
between torch's fused fast path and the layer-by-layer one by tests on tensor values, which a
trace cannot make. The tracer runs these instead: the layer-by-layer path torch takes in
training, written with the modules' own blocks (``_sa_block``, ``_mha_block``, ``_ff_block``), so
each GEMM becomes a node of its own. Masks go to the attention modules as given (they
canonicalise them). ``is_causal``, a hint that a mask is causal, is dropped and the mask used;
as in torch, the hint without its mask is an error. In fp32 the traced model equals the module
bit for bit in training mode; in eval mode torch may take its fused fast path, which rounds
differently.
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

__all__ = ["TRACEABLE_FORWARDS"]


def _hints_have_masks(**hints: tuple) -> None:
    """Refuse an ``is_causal`` hint without its mask, as torch's attention does (None: detect it)."""
    for name, (hint, mask) in hints.items():
        if hint is True and mask is None:
            raise ValueError(f"{name}=True is a hint that comes with the causal mask itself, as in torch; pass the mask")


def _encoder_layer(layer: nn.TransformerEncoderLayer, src, src_mask=None, src_key_padding_mask=None,
                   is_causal=False):
    _hints_have_masks(is_causal=(is_causal, src_mask))
    x = src
    if layer.norm_first:
        x = x + layer._sa_block(layer.norm1(x), src_mask, src_key_padding_mask)
        return x + layer._ff_block(layer.norm2(x))
    x = layer.norm1(x + layer._sa_block(x, src_mask, src_key_padding_mask))
    return layer.norm2(x + layer._ff_block(x))


def _decoder_layer(layer: nn.TransformerDecoderLayer, tgt, memory, tgt_mask=None, memory_mask=None,
                   tgt_key_padding_mask=None, memory_key_padding_mask=None, tgt_is_causal=False,
                   memory_is_causal=False):
    _hints_have_masks(tgt_is_causal=(tgt_is_causal, tgt_mask), memory_is_causal=(memory_is_causal, memory_mask))
    x = tgt
    if layer.norm_first:
        x = x + layer._sa_block(layer.norm1(x), tgt_mask, tgt_key_padding_mask)
        x = x + layer._mha_block(layer.norm2(x), memory, memory_mask, memory_key_padding_mask)
        return x + layer._ff_block(layer.norm3(x))
    x = layer.norm1(x + layer._sa_block(x, tgt_mask, tgt_key_padding_mask))
    x = layer.norm2(x + layer._mha_block(x, memory, memory_mask, memory_key_padding_mask))
    return layer.norm3(x + layer._ff_block(x))


def _encoder(encoder: nn.TransformerEncoder, src, mask=None, src_key_padding_mask=None, is_causal=None):
    _hints_have_masks(is_causal=(is_causal, mask))
    output = src
    for layer in encoder.layers:
        output = layer(output, src_mask=mask, src_key_padding_mask=src_key_padding_mask)
    return output if encoder.norm is None else encoder.norm(output)


def _decoder(decoder: nn.TransformerDecoder, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
             memory_key_padding_mask=None, tgt_is_causal=None, memory_is_causal=False):
    _hints_have_masks(tgt_is_causal=(tgt_is_causal, tgt_mask), memory_is_causal=(memory_is_causal, memory_mask))
    output = tgt
    for layer in decoder.layers:
        output = layer(output, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                       tgt_key_padding_mask=tgt_key_padding_mask, memory_key_padding_mask=memory_key_padding_mask)
    return output if decoder.norm is None else decoder.norm(output)


def _transformer(model: nn.Transformer, src, tgt, src_mask=None, tgt_mask=None, memory_mask=None,
                 src_key_padding_mask=None, tgt_key_padding_mask=None, memory_key_padding_mask=None,
                 src_is_causal=None, tgt_is_causal=None, memory_is_causal=False):
    _hints_have_masks(src_is_causal=(src_is_causal, src_mask), tgt_is_causal=(tgt_is_causal, tgt_mask),
                      memory_is_causal=(memory_is_causal, memory_mask))
    memory = model.encoder(src, mask=src_mask, src_key_padding_mask=src_key_padding_mask)
    return model.decoder(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                         tgt_key_padding_mask=tgt_key_padding_mask, memory_key_padding_mask=memory_key_padding_mask)


# exact types: a subclass may have a forward of its own, which the tracer then follows
TRACEABLE_FORWARDS: dict[type[nn.Module], Callable] = {
    nn.TransformerEncoderLayer: _encoder_layer, nn.TransformerDecoderLayer: _decoder_layer,
    nn.TransformerEncoder: _encoder, nn.TransformerDecoder: _decoder, nn.Transformer: _transformer,
}
