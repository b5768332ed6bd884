"""Tiny random-weight models and their example inputs, for the capture tests.

Three dictionaries, keyed by a short name: ``HF`` (Hugging Face transformers models built from their config
classes), ``TIMM`` and ``TORCHVISION``. Each entry is a ``ZooModel``: ``build()`` makes a fresh model seeded
with ``torch.manual_seed(0)`` (nothing is downloaded), ``args()`` and ``kwargs()`` make its example inputs
from a generator seeded 0, and ``gemms`` is how many GEMM-like calls (linear, convolution, matmul, mm, bmm,
addmm, baddbmm, einsum and scaled_dot_product_attention, one each) the eval-mode ``torch.export`` graph of one
forward holds. Text models are fed a padding mask (the second row ends in padding). Every model has dropout
or stochastic depth (set where its config defaults to none), so train and eval modes differ. The models are
tiny (widths 16-32, one or two layers, two heads; batch 2 of 8 tokens or 32x32 images), so the whole zoo
exports in seconds on a CPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import timm
import torch
import torch.nn as nn
import transformers
from torchvision.models.maxvit import MaxVit
from torchvision.models.regnet import BlockParams, RegNet
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.models.vision_transformer import VisionTransformer

__all__ = ["BATCH", "CLASSES", "HF", "IMAGE", "SEQ", "TIMM", "TORCHVISION", "VOCAB", "ZooModel"]

BATCH = 2
SEQ = 8
VOCAB = 64
IMAGE = 32
CLASSES = 10


@dataclass(frozen=True)
class ZooModel:
    """A model of the zoo: how to build it, its example inputs, and the GEMM-like calls one forward makes."""

    name: str
    build: Callable[[], nn.Module]
    args: Callable[[], tuple[Any, ...]]
    kwargs: Callable[[], dict[str, Any]]
    gemms: int


def _seeded(make: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """``make`` run after ``torch.manual_seed(0)``, so every build has the same weights."""

    def build() -> nn.Module:
        torch.manual_seed(0)
        return make()

    return build


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _no_args() -> tuple[Any, ...]:
    return ()


def _no_kwargs() -> dict[str, Any]:
    return {}


def _image() -> tuple[torch.Tensor]:
    return (torch.randn(BATCH, 3, IMAGE, IMAGE, generator=_generator()),)


def _pixel_values() -> dict[str, torch.Tensor]:
    return {"pixel_values": _image()[0]}


def _text() -> dict[str, torch.Tensor]:
    """Token ids above the special ones (0-2) and an attention mask whose second row ends in 3 pad tokens."""
    input_ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=_generator())
    attention_mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    attention_mask[1, -3:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _text_to_text() -> dict[str, torch.Tensor]:
    """``_text`` and 5 decoder tokens (from a second generator, seeded 1) led by T5's decoder start token (0)."""
    decoder_input_ids = torch.randint(3, VOCAB, (BATCH, 5), generator=torch.Generator().manual_seed(1))
    decoder_input_ids[:, 0] = 0
    return {**_text(), "decoder_input_ids": decoder_input_ids}


def _hf(name: str, model: Callable[[], nn.Module], kwargs: Callable[[], dict[str, Any]], gemms: int) -> ZooModel:
    return ZooModel(name, _seeded(model), _no_args, kwargs, gemms)


def _vision(name: str, model: Callable[[], nn.Module], gemms: int) -> ZooModel:
    return ZooModel(name, _seeded(model), _image, _no_kwargs, gemms)


# --- Hugging Face transformers ------------------------------------------------------------------------------

_BERT = dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
             max_position_embeddings=32)


def _bert(attn_implementation: str | None = None) -> Callable[[], nn.Module]:
    return lambda: transformers.BertModel(transformers.BertConfig(**_BERT, attn_implementation=attn_implementation))


def _roberta() -> nn.Module:  # RoBERTa's positions start after the padding index (1)
    return transformers.RobertaModel(transformers.RobertaConfig(**{**_BERT, "max_position_embeddings": 34}))


def _gpt2() -> nn.Module:
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=1, n_head=2, bos_token_id=1, eos_token_id=2,
        use_cache=False))


_LLAMA = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=32, attention_dropout=0.1, use_cache=False)


def _llama() -> nn.Module:
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**_LLAMA))


def _mistral() -> nn.Module:
    return transformers.MistralForCausalLM(transformers.MistralConfig(**_LLAMA, sliding_window=4))


def _t5() -> nn.Module:
    return transformers.T5Model(transformers.T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, use_cache=False))


def _bart() -> nn.Module:
    return transformers.BartModel(transformers.BartConfig(
        vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
        use_cache=False))


_VISION = dict(image_size=IMAGE, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=32)


def _vit() -> nn.Module:
    return transformers.ViTModel(transformers.ViTConfig(**_VISION, hidden_dropout_prob=0.1,
                                                        attention_probs_dropout_prob=0.1))


def _clip_text() -> nn.Module:
    return transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=SEQ, attention_dropout=0.1, pad_token_id=0, bos_token_id=1, eos_token_id=2))


def _clip_vision() -> nn.Module:
    return transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**_VISION, attention_dropout=0.1))


_MEL_BINS = 8
_SOURCE_POSITIONS = 8  # the encoder's two convolutions halve 2 * 8 frames to 8 positions


def _whisper_encoder() -> nn.Module:
    return transformers.WhisperModel(transformers.WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=_MEL_BINS, d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        max_source_positions=_SOURCE_POSITIONS, max_target_positions=16, dropout=0.1, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, decoder_start_token_id=1, use_cache=False)).get_encoder()


def _input_features() -> dict[str, torch.Tensor]:
    return {"input_features": torch.randn(BATCH, _MEL_BINS, 2 * _SOURCE_POSITIONS, generator=_generator())}


HF: dict[str, ZooModel] = {m.name: m for m in [
    _hf("bert", _bert(), _text, 8),
    _hf("bert_eager", _bert("eager"), _text, 9),
    _hf("roberta", _roberta, _text, 8),
    _hf("gpt2", _gpt2, _text, 6),
    _hf("llama", _llama, _text, 9),
    _hf("mistral", _mistral, _text, 9),
    _hf("t5", _t5, _text_to_text, 19),
    _hf("bart", _bart, _text, 19),
    _hf("vit", _vit, _pixel_values, 9),
    _hf("clip_text", _clip_text, _text, 7),
    _hf("clip_vision", _clip_vision, _pixel_values, 8),
    _hf("whisper_encoder", _whisper_encoder, _input_features, 9),
]}


# --- timm: its tiny test models, with dropout and stochastic depth ------------------------------------------

def _timm(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(name, pretrained=False, num_classes=CLASSES, drop_rate=0.1,
                                     drop_path_rate=0.1, **kwargs)


TIMM: dict[str, ZooModel] = {m.name: m for m in [
    _vision("resnet", _timm("test_resnet", stem_width=8, channels=(16, 16, 32, 32)), 16),
    _vision("efficientnet", _timm("test_efficientnet", channel_multiplier=0.5), 18),  # BatchNormAct2d
    _vision("convnext", _timm("test_convnext", depths=[1, 1, 1, 1], dims=[16, 16, 32, 32]), 17),
    _vision("vit", _timm("test_vit", img_size=IMAGE, patch_size=8, embed_dim=16, depth=2, num_heads=2,
                         dynamic_img_size=False), 12),
]}


# --- torchvision: the model classes with tiny configurations ------------------------------------------------

def _swin_t() -> nn.Module:  # 8x8 patches in windows of 4: the second block of the first stage is shifted
    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4],
                           num_classes=CLASSES)


def _tv_vit() -> nn.Module:  # nn.MultiheadAttention: under no_grad, eager eval runs its fused fast path
    model = VisionTransformer(image_size=IMAGE, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32,
                              dropout=0.1, num_classes=CLASSES)
    nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision starts the head at zero: every output 0
    return model


def _maxvit() -> nn.Module:
    return MaxVit(input_size=(IMAGE, IMAGE), stem_channels=8, partition_size=2, block_channels=[16, 32],
                  block_layers=[1, 1], head_dim=8, stochastic_depth_prob=0.1, num_classes=CLASSES)


def _regnet() -> nn.Module:
    return RegNet(BlockParams.from_init_params(depth=2, w_0=8, w_a=8.0, w_m=2.0, group_width=8, se_ratio=0.25),
                  num_classes=CLASSES, stem_width=8)


TORCHVISION: dict[str, ZooModel] = {m.name: m for m in [
    _vision("swin_t", _swin_t, 27),
    _vision("vit", _tv_vit, 7),
    _vision("maxvit", _maxvit, 40),
    _vision("regnet", _regnet, 14),
]}
