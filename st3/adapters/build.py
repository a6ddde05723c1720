"""What the families' builders share: their tiny models' token ids, left-padded batches, a built model's finishing,
and a real shape's decoder and vision dimensions as transformers config keywords.

Each family's own builders (its tiny model and example inputs for tests, its real shape's config and bench inputs)
live in its adapter file, declared on the adapter class (`Adapter.tiny`, `Adapter.real_config`, ...): `st3.testing`,
`st3.models` and `st3.bench` look them up there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from st3.models import ModelSpec

IMAGE_TOKEN = 3
"""The tiny models' image token (LLaVA, LLaVA-NeXT, InternVL, Idefics3, Mistral3)."""
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


def finish(model: nn.Module, attn: str) -> nn.Module:
    """A tiny model ready for tests: eval mode, the attention backend, generation that runs to max_new_tokens."""
    model.eval()
    model.set_attn_implementation(attn)
    model.generation_config.eos_token_id = None  # random weights would stop at random
    model.generation_config.pad_token_id = PAD_TOKEN
    return model


def tiny_text(hidden: int, layers: int, **extra) -> dict:
    """The tiny decoders' config keywords (GQA: 4 heads, 2 kv heads; vocabulary 128)."""
    return dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128, max_position_embeddings=1024,
                pad_token_id=PAD_TOKEN) | extra  # fmt: skip


def tiny_vision(image_size: int, patch_size: int = 4) -> dict:
    """The tiny vision towers' config keywords (2 layers of width 32)."""
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                image_size=image_size, patch_size=patch_size)  # fmt: skip


def decoder_dims(spec: ModelSpec) -> dict:
    """The spec's decoder dimensions as transformers config keywords (the same for every family)."""
    return dict(hidden_size=spec.hidden, intermediate_size=spec.intermediate, num_hidden_layers=spec.layers,
                num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads, vocab_size=spec.vocab,
                tie_word_embeddings=False)  # fmt: skip


def text_dims(spec: ModelSpec, pad_token: int = PAD_TOKEN) -> dict:
    """A Llama-style decoder config's keywords for the spec: dimensions, positions, head_dim and rotary base
    where the spec sets them (else the decoder config's own defaults)."""
    text = decoder_dims(spec) | dict(max_position_embeddings=spec.max_positions, pad_token_id=pad_token)
    if spec.head_dim is not None:
        text["head_dim"] = spec.head_dim
    if spec.rope_theta != 10000.0:
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": spec.rope_theta}
    return text


def vision_dims(spec: ModelSpec) -> dict:
    """A CLIP / SigLIP-style tower's keywords: the spec's width (the projector's input), depth and input size."""
    return dict(hidden_size=spec.vision_hidden, intermediate_size=spec.vision_intermediate or 4 * spec.vision_hidden,
                num_hidden_layers=spec.vision_layers,
                num_attention_heads=spec.vision_heads or max(1, spec.vision_hidden // 64),
                image_size=spec.image_size, patch_size=spec.patch_size)  # fmt: skip


def text_config_class(text_model: str):
    """The decoder config class of a `ModelSpec.text_model`: "llama", "qwen2", "qwen3" or "mistral"."""
    import transformers as tf

    return {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "qwen3": tf.Qwen3Config,
            "mistral": tf.MistralConfig}[text_model]  # fmt: skip


def random_text(generator: torch.Generator, batch: int, length: int, vocab: int, avoid: tuple[int, ...]):
    """[batch, length] random token ids in [1, vocab), none of them in `avoid` (visual and other special ids)."""
    text = torch.randint(1, vocab, (batch, length), generator=generator)
    text[torch.isin(text, torch.tensor(avoid))] = 1 if 1 not in avoid else max(avoid) + 1
    return text


def bench_prompt(image: torch.Tensor, batch: int, before: int, after: int, vocab: int, avoid: tuple[int, ...],
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(input_ids, attention_mask) [batch, before + len(image) + after]: random text, the image's tokens, random
    text; no padding, so every sample costs the same."""
    text = random_text(generator, batch, before + after, vocab, avoid)
    ids = torch.cat([text[:, :before], image.expand(batch, -1), text[:, before:]], dim=1)
    return ids, torch.ones_like(ids)


def word_tokenizer(specials: list[str], vocab: int = 128, **special_attributes):
    """A word-level tokenizer of `vocab` ids for a tiny model's saved checkpoint: `specials` first (id 0 pads; each
    is matched whole inside text, as a real tokenizer's added tokens are), then the words w0, w1, ...;
    `special_attributes` name special tokens the family's processor reads (e.g. boi_token="<boi>")."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {token: i for i, token in enumerate(specials + [f"w{i}" for i in range(vocab - len(specials))])}
    backend = Tokenizer(models.WordLevel(vocab=words, unk_token=specials[1]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=specials[0], unk_token=specials[1],
                                   extra_special_tokens=special_attributes or None)  # fmt: skip


#: A chat template that writes each image as `image` and each text as itself (the tiny checkpoints' processors).
def chat_template(image: str) -> str:
    return ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}" + image + " "
            "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}")  # fmt: skip
