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


def left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [B, longest]: the token rows left-padded with PAD_TOKEN, as st3 needs them."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), PAD_TOKEN)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = row
        attention_mask[i, width - len(row) :] = 1
    return input_ids, attention_mask


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
    input_ids, attention_mask = left_padded(rows)
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


# ------------------------------------------------------------------------------------------ LLaVA-NeXT
def tiny_llava_next(*, layers: int = 6, hidden: int = 64, attn: str = "sdpa", seed: int = 0):
    """A LLaVA-NeXT model (CLIP tower 12 px / patch 4, anyres tiles up to 2 x 2, Llama decoder with GQA), fp32."""
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.LlavaNextConfig(
        vision_config=tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, image_size=12, patch_size=4),
        text_config=tf.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                   max_position_embeddings=1024, pad_token_id=PAD_TOKEN),
        image_grid_pinpoints=[[12, 24], [24, 12], [24, 24]], image_token_index=IMAGE_TOKEN,
        vision_feature_layer=-2, vision_feature_select_strategy="default", pad_token_id=PAD_TOKEN,
    )  # fmt: skip
    model = tf.LlavaNextForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD_TOKEN
    return model


def tiny_next_inputs(model, samples, seed: int = 0) -> dict[str, torch.Tensor]:
    """A left-padded batch built without a processor: per sample (text before, text after, (height, width)).

    Each sample has one image of that size in pixels; its crops (base image + anyres tiles) are random pixels
    padded to the batch's most crops, as the processor pads them, and its number of image tokens is the
    model's own feature count for that size.
    """
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    generator = torch.Generator().manual_seed(seed)
    config = model.config
    side = config.vision_config.image_size
    sizes = torch.tensor([size for _, _, size in samples])
    crops = [image_size_to_num_patches(size, config.image_grid_pinpoints, side) for size in sizes.tolist()]
    pixel_values = torch.zeros(len(samples), max(crops), 3, side, side)
    for i, n in enumerate(crops):
        pixel_values[i, :n] = torch.randn(n, 3, side, side, generator=generator)
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values, sizes).pooler_output
    rows = []
    for (before, after, _), image in zip(samples, features):
        text = torch.randint(IMAGE_TOKEN + 1, config.text_config.vocab_size, (before + after,), generator=generator)
        rows.append(torch.cat([text[:before], torch.full((len(image),), IMAGE_TOKEN), text[before:]]))
    input_ids, attention_mask = left_padded(rows)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
            "image_sizes": sizes}  # fmt: skip


# ------------------------------------------------------------------------------------- LLaVA-OneVision
OV_IMAGE, OV_VIDEO = 3, 4


def tiny_llava_onevision(*, layers: int = 6, hidden: int = 64, attn: str = "sdpa", seed: int = 0):
    """A LLaVA-OneVision model (SigLIP tower 12 px / patch 4, anyres_max_2 so large tile grids shrink, Qwen2
    decoder with GQA), fp32, eval mode."""
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.LlavaOnevisionConfig(
        vision_config=tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, image_size=12, patch_size=4),
        text_config=tf.Qwen2Config(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                   max_position_embeddings=1024, pad_token_id=PAD_TOKEN),
        image_grid_pinpoints=[[12, 24], [24, 12], [24, 24]], image_token_index=OV_IMAGE, video_token_index=OV_VIDEO,
        vision_aspect_ratio="anyres_max_2", vision_feature_layer=-1, vision_feature_select_strategy="full",
        pad_token_id=PAD_TOKEN,
    )  # fmt: skip
    model = tf.LlavaOnevisionForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD_TOKEN
    return model


def tiny_onevision_inputs(model, samples, seed: int = 0) -> dict[str, torch.Tensor]:
    """A left-padded batch built without a processor: per sample (text before, text after, kind, what).

    kind "image": what is its (height, width) in pixels (one image per sample, anyres crops padded to the
    batch's most); kind "video": what is its number of frames. Token counts are the model's own feature counts.
    """
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    generator = torch.Generator().manual_seed(seed)
    config = model.config
    side = config.vision_config.image_size
    images = [what for _, _, kind, what in samples if kind == "image"]
    videos = [what for _, _, kind, what in samples if kind == "video"]
    out: dict[str, torch.Tensor] = {}
    counts: dict[str, list[int]] = {"image": [], "video": []}
    with torch.no_grad():
        if images:
            sizes = torch.tensor(images)
            crops = [image_size_to_num_patches(size, config.image_grid_pinpoints, side) for size in images]
            pixels = torch.zeros(len(images), max(crops), 3, side, side)
            for i, n in enumerate(crops):
                pixels[i, :n] = torch.randn(n, 3, side, side, generator=generator)
            per_sample = torch.tensor([int(kind == "image") for _, _, kind, _ in samples])
            out |= {"pixel_values": pixels, "image_sizes": sizes, "batch_num_images": per_sample}
            features = model.model.get_image_features(pixels, sizes, batch_num_images=per_sample).pooler_output
            counts["image"] = [len(f) for f in features]
        if videos:
            if len(set(videos)) > 1:
                raise ValueError("the videos of one batch share their number of frames (one tensor)")
            clips = torch.randn(len(videos), videos[0], 3, side, side, generator=generator)
            out["pixel_values_videos"] = clips
            counts["video"] = [f.shape[0] for f in model.model.get_video_features(clips).pooler_output]
    rows = []
    for before, after, kind, _ in samples:
        token = OV_IMAGE if kind == "image" else OV_VIDEO
        text = torch.randint(OV_VIDEO + 1, config.text_config.vocab_size, (before + after,), generator=generator)
        rows.append(torch.cat([text[:before], torch.full((counts[kind].pop(0),), token), text[before:]]))
    out["input_ids"], out["attention_mask"] = left_padded(rows)
    return out


# ------------------------------------------------------------------------------------------------ InternVL
INTERNVL_START, INTERNVL_END = 4, 5


def tiny_internvl(*, layers: int = 6, hidden: int = 64, attn: str = "sdpa", seed: int = 0):
    """An InternVL model (InternViT 32 px / patch 4, pixel shuffle 0.5: 16 tokens per tile, Qwen2 decoder), fp32."""
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.InternVLConfig(
        vision_config=tf.InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=2, image_size=32, patch_size=4),
        text_config=tf.Qwen2Config(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                   max_position_embeddings=1024, pad_token_id=PAD_TOKEN),
        image_token_id=IMAGE_TOKEN, image_seq_length=16, downsample_ratio=0.5, pad_token_id=PAD_TOKEN,
    )  # fmt: skip
    model = tf.InternVLForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD_TOKEN
    return model


def tiny_internvl_inputs(model, samples, seed: int = 0) -> dict[str, torch.Tensor]:
    """A left-padded batch built without a processor: per sample (text before, text after, tiles per image).

    Each image is `<img>` + tiles x `image_seq_length` image tokens + `</img>`, images separated by a text token
    (as the processor writes "Frame2:" between a video's frames); pixel values are random, one per tile.
    """
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    size = config.vision_config.image_size[0]

    def text(n: int) -> torch.Tensor:
        return torch.randint(INTERNVL_END + 1, config.text_config.vocab_size, (n,), generator=generator)

    rows, tiles = [], 0
    for before, after, images in samples:
        pieces = [text(before)]
        for i, n in enumerate(images):
            pieces += [text(1)] if i else []
            pieces += [torch.tensor([INTERNVL_START]), torch.full((n * config.image_seq_length,), IMAGE_TOKEN),
                       torch.tensor([INTERNVL_END])]  # fmt: skip
            tiles += n
        rows.append(torch.cat(pieces + [text(after)]))
    input_ids, attention_mask = left_padded(rows)
    pixel_values = torch.randn(tiles, 3, size, size, generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}


# ------------------------------------------------------------------------------------- Idefics3 / SmolVLM
def tiny_idefics3(*, layers: int = 6, hidden: int = 64, attn: str = "sdpa", seed: int = 0, smolvlm: bool = False):
    """An Idefics3 (or SmolVLM) model (SigLIP 32 px / patch 4, pixel shuffle 2: 16 tokens per crop, Llama
    decoder with GQA), fp32, eval mode."""
    import transformers as tf

    torch.manual_seed(seed)
    config_class, model_class, vision_class = (
        (tf.SmolVLMConfig, tf.SmolVLMForConditionalGeneration, tf.SmolVLMVisionConfig) if smolvlm
        else (tf.Idefics3Config, tf.Idefics3ForConditionalGeneration, tf.Idefics3VisionConfig)
    )  # fmt: skip
    config = config_class(
        vision_config=vision_class(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   image_size=32, patch_size=4),
        text_config=tf.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                   max_position_embeddings=1024, pad_token_id=PAD_TOKEN),
        image_token_id=IMAGE_TOKEN, scale_factor=2, pad_token_id=PAD_TOKEN,
    )  # fmt: skip
    model = model_class(config).eval()
    model.set_attn_implementation(attn)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD_TOKEN
    return model


def tiny_idefics3_inputs(model, samples, seed: int = 0) -> dict[str, torch.Tensor]:
    """A left-padded batch built without a processor: per sample (text before, text after, crops).

    Each crop is `image_seq_len` image tokens after two text tokens (as `<fake_token_around_image><row_i_col_j>`
    precede it); pixel values are random crops padded with all-zero crops to the batch's most, with an
    all-ones `pixel_attention_mask`.
    """
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    size = config.vision_config.image_size
    per_crop = model.model.image_seq_len

    def text(n: int) -> torch.Tensor:
        return torch.randint(IMAGE_TOKEN + 1, config.text_config.vocab_size, (n,), generator=generator)

    rows = []
    for before, after, crops in samples:
        pieces = [text(before)]
        for _ in range(crops):
            pieces += [text(2), torch.full((per_crop,), IMAGE_TOKEN)]
        rows.append(torch.cat(pieces + [text(1 + after)]))
    width = max(len(r) for r in rows)
    most = max(crops for _, _, crops in samples)
    out = {
        "input_ids": torch.full((len(rows), width), PAD_TOKEN),
        "attention_mask": torch.zeros(len(rows), width, dtype=torch.long),
        "pixel_values": torch.zeros(len(rows), most, 3, size, size),
        "pixel_attention_mask": torch.ones(len(rows), most, size, size, dtype=torch.bool),
    }
    for i, (row, (_, _, crops)) in enumerate(zip(rows, samples)):
        out["input_ids"][i, width - len(row) :] = row
        out["attention_mask"][i, width - len(row) :] = 1
        out["pixel_values"][i, :crops] = torch.randn(crops, 3, size, size, generator=generator)
    return out


# ------------------------------------------------------------------------------------------------ Mistral3
MISTRAL_BREAK, MISTRAL_END = 4, 5


def tiny_mistral3(*, layers: int = 6, hidden: int = 64, attn: str = "sdpa", seed: int = 0, **text_overrides):
    """A Mistral3 model (Pixtral tower up to 64 px / patch 4, merge 2, Mistral decoder with GQA and, unless
    `text_overrides` set one, no sliding window: st3 refuses it), fp32, eval mode."""
    import transformers as tf

    torch.manual_seed(seed)
    text = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128, max_position_embeddings=1024, pad_token_id=PAD_TOKEN,
                sliding_window=None)  # fmt: skip
    config = tf.Mistral3Config(
        vision_config=tf.PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=64, patch_size=4),
        text_config=tf.MistralConfig(**(text | text_overrides)),
        image_token_index=IMAGE_TOKEN, spatial_merge_size=2, pad_token_id=PAD_TOKEN,
    )  # fmt: skip
    model = tf.Mistral3ForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD_TOKEN
    return model


def tiny_mistral3_inputs(model, samples, seed: int = 0) -> dict[str, torch.Tensor]:
    """A left-padded batch built without a processor (Pixtral's needs torchvision): per sample (text before, text
    after, (height, width) in pixels). Each row of merged patches is followed by `[IMG_BREAK]`, the last by
    `[IMG_END]`; pixel values are random images zero-padded to the batch's largest, with `image_sizes`."""
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    merged = config.vision_config.patch_size * config.spatial_merge_size
    sizes = torch.tensor([size for _, _, size in samples])
    height, width = (int(v) for v in sizes.max(0).values)
    pixel_values = torch.zeros(len(samples), 3, height, width)
    rows = []
    for i, (before, after, (h, w)) in enumerate(samples):
        pixel_values[i, :, :h, :w] = torch.randn(3, h, w, generator=generator)
        text = torch.randint(MISTRAL_END + 1, config.text_config.vocab_size, (before + after,), generator=generator)
        image = []
        for r in range(h // merged):
            image += [IMAGE_TOKEN] * (w // merged) + [MISTRAL_END if r == h // merged - 1 else MISTRAL_BREAK]
        rows.append(torch.cat([text[:before], torch.tensor(image), text[before:]]))
    input_ids, attention_mask = left_padded(rows)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
            "image_sizes": sizes}  # fmt: skip

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
    input_ids, attention_mask = left_padded(rows)
    size = config.vision_config.image_size
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": (input_ids == GEMMA_IMAGE).long(),
        "pixel_values": torch.randn(images, 3, size, size, generator=generator),
    }
