"""Models at real shapes (`st3.models.SPECS`) with random weights, built in seconds, and prompts that fit them.

Speed does not depend on weight values, so the benchmark builds a `LlavaForConditionalGeneration` whose
language model and projector have a real model's dimensions and fills them with cheap random numbers.
The vision tower is not what is measured: it is one CLIP layer of the real width (1024, so the projector
has its real shape) instead of 24, with an image size chosen so it yields the real number of visual
tokens. Its cost (well under 1% of the language model's prefill at 7B shape) is paid identically by
every method, which makes the measured speed-ups slightly conservative.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import LlavaForConditionalGeneration

from st3.adapters import adapter_for
from st3.compat import LOAD_KWARGS
from st3.models import PAD_TOKEN, ModelSpec, config_for, model_class

FILL_STD = 0.02
"""Standard deviation of the random weights: small enough that activations stay finite in bf16."""
POOL = (1 << 20) + 7
"""Length of the block of random values that weights are tiled with."""

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_model(
    spec: ModelSpec, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu", attn: str = "sdpa"
) -> LlavaForConditionalGeneration:
    """Build the model on the meta device, then give it real (uninitialised) storage and a cheap random fill.

    The normal constructor's per-module random init takes about 35 s per 8 layers at 7B shape; this takes a
    few seconds for the whole model. Buffers (rotary frequencies, position ids) are built for real, since
    `init_empty_weights` leaves them alone, and keep their own dtype.
    """
    with init_empty_weights(include_buffers=False):
        model = model_class(spec)(config_for(spec))
    model.bench_grid = spec.grid  # the Qwen-VL image grid bench_inputs builds
    materialize(model, dtype, torch.device(device))
    fill_random(model)
    return prepare(model, attn)


def materialize(model: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    """Replace every meta parameter by an empty one of `dtype` on `device` (`to_empty`, parameters only).

    `Module.to_empty` would also wipe the buffers, which hold computed values. Shared (tied) parameters
    stay shared.
    """
    done: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is None:
                continue
            if id(param) not in done:
                empty = torch.empty(param.shape, dtype=dtype, device=device)
                done[id(param)] = nn.Parameter(empty, requires_grad=False)
            module._parameters[name] = done[id(param)]
    model.to(device)  # buffers only: parameters are there already


@torch.no_grad()
def fill_random(model: nn.Module, seed: int = 0) -> None:
    """Norm scales 1, biases 0, everything else N(0, FILL_STD^2) values, tiled.

    Drawing 7 billion normal numbers takes minutes on a small CPU; copying a block of 2^20 + 7 of them
    (a length no weight row divides, so rows do not repeat in lockstep), from a different offset per
    tensor, runs at memory speed. The values only need to be finite and varied: speed does not depend on
    them.
    """
    generator = torch.Generator().manual_seed(seed)
    pools: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
    for name, param in model.named_parameters():
        if param.dim() == 1 and "norm" in name and name.endswith("weight"):
            param.fill_(1.0)
        elif param.dim() == 1 and name.endswith("bias"):
            param.zero_()
        else:
            key = (param.dtype, param.device)
            if key not in pools:
                pools[key] = (torch.randn(2 * POOL, generator=generator) * FILL_STD).to(param.device, param.dtype)
            offset = int(torch.randint(POOL, (1,), generator=generator))
            tile(param, pools[key][offset : offset + POOL])


def tile(param: torch.Tensor, block: torch.Tensor) -> None:
    """Fill `param` with `block` repeated, in one broadcast copy."""
    flat = param.view(-1)
    whole = flat.numel() // block.numel()
    if whole:
        flat[: whole * block.numel()].view(whole, -1).copy_(block.expand(whole, -1))
    rest = flat.numel() - whole * block.numel()
    if rest:
        flat[-rest:].copy_(block[:rest])


def prepare(model: LlavaForConditionalGeneration, attn: str) -> LlavaForConditionalGeneration:
    """Eval mode, the attention backend, and a generation config that always runs to max_new_tokens."""
    model.eval()
    model.requires_grad_(False)
    model.set_attn_implementation(attn)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = model.config.text_config.pad_token_id or PAD_TOKEN
    return model


def load_model_dir(
    path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    layers: int | None = None,
    attn: str = "sdpa",
) -> LlavaForConditionalGeneration:
    """A local LLaVA checkpoint, optionally truncated to its first `layers` decoder layers."""
    model = LlavaForConditionalGeneration.from_pretrained(str(path), dtype=dtype, **LOAD_KWARGS).to(device)
    if layers is not None:
        truncate(model, layers)
    return prepare(model, attn)


def truncate(model: LlavaForConditionalGeneration, layers: int) -> None:
    """Keep the first `layers` decoder layers (weights of the others are freed)."""
    lm = model.model.language_model
    total = len(lm.layers)
    if not 1 <= layers <= total:
        raise ValueError(f"--layers must be in [1, {total}], got {layers}")
    lm.layers = lm.layers[:layers]
    for config in (lm.config, model.config.text_config):
        config.num_hidden_layers = layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:layers]


def shape_name(model: LlavaForConditionalGeneration) -> str:
    """A short description of a loaded model's decoder shape."""
    cfg = model.config.text_config
    return (
        f"hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} heads "
        f"({cfg.num_key_value_heads} kv), MLP {cfg.intermediate_size}, vocab {cfg.vocab_size}"
    )


def bench_inputs(
    model: LlavaForConditionalGeneration, batch_size: int, text_before: int = 35, text_after: int = 40, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A batch of identical-length prompts: text, the image tokens, text (LLaVA-1.5's chat template puts
    about 35 system/user tokens before the image), with random pixel values. No padding, so every sample
    costs the same and tokens per second is well defined."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    if getattr(config, "video_token_id", None) is not None:
        return qwen_bench_inputs(model, batch_size, text_before, text_after, generator)
    adapter = adapter_for(model)
    vocab = config.text_config.vocab_size
    [image_token] = adapter.visual_token_ids()
    low = 1
    text = torch.randint(low, vocab, (batch_size, text_before + text_after), generator=generator)
    text[text == image_token] = low  # random text must not contain extra image tokens
    image = torch.full((batch_size, adapter.tokens_per_image()), image_token)
    input_ids = torch.cat([text[:, :text_before], image, text[:, text_before:]], dim=1)
    size = config.vision_config.image_size
    device, dtype = model.device, model.dtype
    pixel_values = torch.randn(batch_size, 3, size, size, generator=generator).to(device, dtype)
    inputs = {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids, device=device),
        "pixel_values": pixel_values,
    }
    if getattr(config, "mm_tokens_per_image", None) is not None:  # Gemma 3: each image attends to itself both ways
        inputs["token_type_ids"] = (input_ids == image_token).long().to(device)
    return inputs


def qwen_bench_inputs(model, batch_size: int, text_before: int, text_after: int, generator) -> dict[str, torch.Tensor]:
    """The same prompt layout for Qwen-VL: text, <vision_start>, the merged image tokens, <vision_end>, text,
    with flattened patches, the image grid and the token types M-RoPE needs."""
    config = model.config
    rows, cols = model.bench_grid
    vision = config.vision_config
    visual = rows * cols // vision.spatial_merge_size**2
    text = torch.randint(1, config.vision_start_token_id, (batch_size, text_before + text_after), generator=generator)
    image = torch.tensor([config.vision_start_token_id, *[config.image_token_id] * visual, config.vision_end_token_id])
    input_ids = torch.cat([text[:, :text_before], image.expand(batch_size, -1), text[:, text_before:]], dim=1)
    types = (input_ids == config.image_token_id).long()
    per_patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    device, dtype = model.device, model.dtype
    pixels = torch.randn(batch_size * rows * cols, per_patch, generator=generator).to(device, dtype)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids, device=device),
        "mm_token_type_ids": types.to(device),
        "pixel_values": pixels,
        "image_grid_thw": torch.tensor([[1, rows, cols]] * batch_size, device=device),
    }
