"""Tiny random models and inputs for tests, smoke runs and the demo's no-download fallback.

Every LLaVA here is built from `st3.models.llava_config` (the one config builder, also used by the bench's
real shapes and the scenes model); the Qwen-VL ones from the stock Qwen-VL configs at tiny sizes.
"""

from __future__ import annotations

import torch
from transformers import LlavaForConditionalGeneration

from st3.models import ModelSpec, llava_config

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
    text_model: str = "llama",
    **text_overrides,
) -> LlavaForConditionalGeneration:
    """A LLaVA-1.5-shaped model (CLIP tower, MLP projector, Llama decoder with GQA), fp32, eval mode.

    text_model picks another decoder ("qwen2", "qwen3", "mistral"); text_overrides go to its config.
    """
    spec = ModelSpec(
        "tiny-llava", hidden, layers, heads, kv_heads, 2 * hidden, vocab, image_size, patch_size=patch_size,
        vision_hidden=32, vision_layers=2, vision_heads=2, vision_intermediate=64, feature_layer=-2,
        max_positions=1024, text_model=text_model,
    )  # fmt: skip
    torch.manual_seed(seed)
    config = llava_config(spec, image_token=IMAGE_TOKEN, pad_token=PAD_TOKEN, **text_overrides)
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
    image_tokens = model.config.image_seq_length  # builds inputs for any LLaVA, also ones the adapters refuse
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


# ------------------------------------------------------------------------------------------- Qwen-VL
QWEN_IMAGE, QWEN_VIDEO, QWEN_START, QWEN_END = 3, 4, 5, 6
QWEN_FAMILIES = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")


def tiny_qwen_vl(family: str, *, layers: int = 4, hidden: int = 64, attn: str = "sdpa", seed: int = 0):
    """A Qwen2-VL / Qwen2.5-VL / Qwen3-VL model with a 2-layer vision tower (patch 4, merge 2), fp32, eval."""
    import transformers as tf

    torch.manual_seed(seed)
    text = dict(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=1024, pad_token_id=PAD_TOKEN,
        bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    vision = dict(depth=2, num_heads=2, patch_size=4, spatial_merge_size=2, temporal_patch_size=2)
    ids = dict(image_token_id=QWEN_IMAGE, video_token_id=QWEN_VIDEO, vision_start_token_id=QWEN_START,
               vision_end_token_id=QWEN_END)  # fmt: skip
    if family == "qwen2-vl":  # head_dim 16: mrope_section sums to 8
        config = tf.Qwen2VLConfig(
            text_config=dict(**text, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3]}),
            vision_config=dict(**vision, embed_dim=32, hidden_size=hidden, mlp_ratio=2), **ids,
        )  # fmt: skip
        cls = tf.Qwen2VLForConditionalGeneration
    elif family == "qwen2.5-vl":
        config = tf.Qwen2_5_VLConfig(
            text_config=dict(**text, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3]}),
            vision_config=dict(**vision, hidden_size=32, intermediate_size=64, out_hidden_size=hidden,
                               window_size=16, fullatt_block_indexes=[1]), **ids,
        )  # fmt: skip
        cls = tf.Qwen2_5_VLForConditionalGeneration
    elif family == "qwen3-vl":
        config = tf.Qwen3VLConfig(
            text_config=dict(**text, head_dim=16, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                                   "mrope_interleaved": True}),
            vision_config=dict(**vision, hidden_size=32, intermediate_size=64, out_hidden_size=hidden,
                               num_position_embeddings=64, deepstack_visual_indexes=[0, 1]), **ids,
        )  # fmt: skip
        cls = tf.Qwen3VLForConditionalGeneration
    else:
        raise ValueError(f"unknown Qwen-VL family {family!r}; known: {', '.join(QWEN_FAMILIES)}")
    model = cls(config).eval()
    model.set_attn_implementation(attn)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD_TOKEN
    return model


def tiny_qwen_inputs(model, samples, seed: int = 0) -> dict[str, torch.Tensor]:
    """A left-padded batch built without a processor: per sample (text before, text after, kind, (t, h, w)).

    kind is "image" or "video"; (t, h, w) is the patch grid (h, w divisible by the merge size). Each visual
    block is wrapped in vision start/end tokens, as the processor writes it; Qwen3-VL videos get one block
    per frame (its processor separates frames by timestamp text, here one random text token).
    """
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    vision = config.vision_config
    merge = vision.spatial_merge_size
    per_patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    per_frame_blocks = type(model).__name__.startswith("Qwen3")
    rows, pixels = [], {"image": [], "video": []}
    grids = {"image": [], "video": []}

    def text(n: int) -> torch.Tensor:
        return torch.randint(QWEN_END + 1, config.text_config.vocab_size, (n,), generator=generator)

    for before, after, kind, (t, h, w) in samples:
        token, code = (QWEN_IMAGE, 1) if kind == "image" else (QWEN_VIDEO, 2)
        pieces, kinds = [text(before)], [torch.zeros(before, dtype=torch.long)]
        frames = [(t, h, w)] if not per_frame_blocks or kind == "image" else [(1, h, w)] * t
        for i, (ft, fh, fw) in enumerate(frames):
            if i:
                pieces.append(text(1))
                kinds.append(torch.zeros(1, dtype=torch.long))
            n = ft * fh * fw // merge**2
            pieces += [torch.tensor([QWEN_START]), torch.full((n,), token), torch.tensor([QWEN_END])]
            kinds += [torch.zeros(1, dtype=torch.long), torch.full((n,), code), torch.zeros(1, dtype=torch.long)]
        pieces.append(text(after))
        kinds.append(torch.zeros(after, dtype=torch.long))
        rows.append((torch.cat(pieces), torch.cat(kinds)))
        pixels[kind].append(torch.randn(t * h * w, per_patch, generator=generator))
        grids[kind].append(torch.tensor([t, h, w]))
    width = max(len(r) for r, _ in rows)
    batch = len(rows)
    out = {
        "input_ids": torch.full((batch, width), PAD_TOKEN),
        "attention_mask": torch.zeros(batch, width, dtype=torch.long),
        "mm_token_type_ids": torch.zeros(batch, width, dtype=torch.long),
    }
    for i, (row, kind) in enumerate(rows):
        out["input_ids"][i, width - len(row) :] = row
        out["attention_mask"][i, width - len(row) :] = 1
        out["mm_token_type_ids"][i, width - len(row) :] = kind
    if pixels["image"]:
        out["pixel_values"] = torch.cat(pixels["image"])
        out["image_grid_thw"] = torch.stack(grids["image"])
    if pixels["video"]:
        out["pixel_values_videos"] = torch.cat(pixels["video"])
        out["video_grid_thw"] = torch.stack(grids["video"])
    return out


# ------------------------------------------------------------------------------------------- Gemma 3
GEMMA_IMAGE, GEMMA_BOI, GEMMA_EOI = 3, 4, 5


def tiny_gemma3(*, layers: int = 6, hidden: int = 64, window: int = 56, attn: str = "sdpa", seed: int = 0):
    """A Gemma 3 model (SigLIP tower of 2 layers, 16 tokens per image) whose decoder alternates two sliding-window
    layers (`window` columns) and one full-attention layer, with different rotary bases per type; fp32, eval.

    Its RMSNorm weights (zero at init, i.e. identity) are drawn at random so that the re-projection's norms matter,
    and so is the projector's weight (zero at init: every image token would be the same vector, scores all tied).
    """
    import transformers as tf

    torch.manual_seed(seed)
    text = dict(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=1024, sliding_window=window,
        query_pre_attn_scalar=24, pad_token_id=PAD_TOKEN, bos_token_id=None, eos_token_id=None,
        layer_types=["full_attention" if i % 3 == 2 else "sliding_attention" for i in range(layers)],
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}},
    )  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=4)  # fmt: skip
    ids = dict(image_token_index=GEMMA_IMAGE, boi_token_index=GEMMA_BOI, eoi_token_index=GEMMA_EOI)
    config = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=16, **ids)
    model = tf.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for module in model.model.language_model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.weight.normal_(0.0, 0.3)
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.2)
    model.set_attn_implementation(attn)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD_TOKEN
    return model


def tiny_gemma3_inputs(model, samples, seed: int = 0) -> dict[str, torch.Tensor]:
    """A left-padded batch as Gemma3Processor lays it out: per sample (text before, images, text after), each image
    its `mm_tokens_per_image` tokens between begin/end-of-image tokens; `token_type_ids` 1 on image tokens."""
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    per_image = config.mm_tokens_per_image
    vocab = config.text_config.vocab_size
    rows, images = [], 0
    for before, count, after in samples:
        text = torch.randint(GEMMA_EOI + 1, vocab, (before + after,), generator=generator)
        image = torch.tensor([GEMMA_BOI] + [GEMMA_IMAGE] * per_image + [GEMMA_EOI])
        rows.append(torch.cat([text[:before], *[image] * count, text[before:]]))
        images += count
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), PAD_TOKEN)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = row
        attention_mask[i, width - len(row) :] = 1
    size = config.vision_config.image_size
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": (input_ids == GEMMA_IMAGE).long(),
        "pixel_values": torch.randn(images, 3, size, size, generator=generator),
    }
