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
from st3.adapters.build import PAD_TOKEN
from st3.compat import LOAD_KWARGS
from st3.models import ModelSpec, config_for, model_class

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
    model.bench_image = spec.bench_image  # the image bench_inputs builds prompts around
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
    """A batch of identical-length prompts: text, one image's visual tokens, text (LLaVA-1.5's chat template puts
    about 35 system/user tokens before the image), with random pixel values, as the model's family lays them out
    (`Adapter.bench_inputs`). No padding, so every sample costs the same and tokens per second is well defined.

    The image is the shape's (`ModelSpec.image`) for a built shape, else the family's typical image."""
    adapter = adapter_for(model)
    size = getattr(model, "bench_image", None) or adapter.typical_image(model.config)
    generator = torch.Generator().manual_seed(seed)
    inputs = adapter.bench_inputs(size, batch_size, text_before, text_after, generator)
    return {k: v.to(model.device, model.dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}
