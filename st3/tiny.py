"""A small LLaVA built from config with random weights: the embedded default and the tests' model."""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN = 3
PAD_TOKEN = 0


def tiny_llava(
    *,
    layers: int = 6,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 128,
    image_size: int = 48,
    patch_size: int = 8,
    attn: str = "sdpa",
    seed: int = 0,
) -> LlavaForConditionalGeneration:
    """A LLaVA-1.5-shaped model (CLIP tower, MLP projector, Llama decoder with GQA), fp32, eval mode."""
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=patch_size,
        ),
        text_config=LlamaConfig(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            vocab_size=vocab,
            max_position_embeddings=1024,
            pad_token_id=PAD_TOKEN,
        ),
        image_token_index=IMAGE_TOKEN,
        image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_layer=-2,
    )
    model = LlavaForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn)
    model.generation_config.eos_token_id = None  # random weights would stop at random
    model.generation_config.pad_token_id = PAD_TOKEN
    return model


def tiny_inputs(
    model: LlavaForConditionalGeneration,
    text_lengths: tuple[tuple[int, int], ...] = ((4, 6),),
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A left-padded batch: per sample, (text before, text after) the image tokens, plus pixel values."""
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.text_config.vocab_size
    image_tokens = model.config.image_seq_length
    rows = []
    for before, after in text_lengths:
        text = torch.randint(IMAGE_TOKEN + 1, vocab, (before + after,), generator=generator)
        rows.append(torch.cat([text[:before], torch.full((image_tokens,), IMAGE_TOKEN), text[before:]]))
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), PAD_TOKEN)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = row
        attention_mask[i, width - len(row) :] = 1
    size = model.config.vision_config.image_size
    pixel_values = torch.randn(len(rows), 3, size, size, generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}
