"""An independent, straightforward computation to check pruned runs against.

The unpatched model, eager attention, the full sequence (prompt + fed tokens) in one pass, every row
computed at every layer. Pruning is expressed only as per-layer attention masks: a query row may see a
visual key iff the pruned run's trace says that layer held it when that row was processed (the prefill
kept set for prompt rows, the decode forward's attended set for fed tokens). Nothing of st3's engine is
used here.
"""

from __future__ import annotations

import copy

import torch


def visible_visual_keys(trace, layer: int, sample: int, prompt_len: int, steps: int) -> list[set[int]]:
    """For each query row (prompt rows share one set), the visual columns it may attend to at `layer`."""
    prefill = set(trace.prefill_visual_positions[layer][sample].tolist())
    rows = [prefill] * prompt_len
    for t in range(steps):
        rows.append(set(trace.decode_visual_positions[t][layer][sample].tolist()))
    return rows


def eager_copy(model):
    """A deep copy of `model` that runs eager attention (which returns its probabilities)."""
    model = copy.deepcopy(model)
    model.set_attn_implementation("eager")
    return model


def reference_logits(model, inputs: dict, trace, fed: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [B, L + T, V] of the masked reference; `fed` [B, T] are the tokens the decode forwards fed."""
    return masked_forward(eager_copy(model), inputs, trace, fed)


def attention_weights(model, inputs: dict, trace, fed: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Per layer, the masked reference's attention probabilities [B, heads, L + T, L + T]."""
    model = eager_copy(model)
    captured: list[torch.Tensor] = []
    for layer in model.model.language_model.layers:
        layer.self_attn.register_forward_hook(lambda module, args, output: captured.append(output[1]))
    masked_forward(model, inputs, trace, fed)
    return captured


def masked_forward(model, inputs: dict, trace, fed: torch.Tensor | None) -> torch.Tensor:
    """The reference pass itself, on an eager `model`."""
    ids, attention = inputs["input_ids"], inputs["attention_mask"]
    batch, prompt_len = ids.shape
    steps = 0 if fed is None else fed.shape[1]
    visual = ids == model.config.image_token_id
    if steps:
        ids = torch.cat([ids, fed], dim=1)
        attention = torch.cat([attention, torch.ones_like(fed)], dim=1)
        visual = torch.cat([visual, torch.zeros_like(fed, dtype=torch.bool)], dim=1)
    length = ids.shape[1]

    lm = model.model.language_model
    embeds = lm.embed_tokens(ids.masked_fill(visual, 0))
    if visual.any():
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        embeds[visual] = torch.cat(list(features)).to(embeds.dtype)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    cos, sin = lm.rotary_emb(embeds, positions)

    causal = torch.tril(torch.ones(length, length, dtype=torch.bool))
    hidden = embeds
    for index, layer in enumerate(lm.layers):
        allowed = causal[None].repeat(batch, 1, 1) & attention.bool()[:, None, :]
        for b in range(batch):
            for row, keys in enumerate(visible_visual_keys(trace, index, b, prompt_len, steps)):
                hidden_visual = visual[b].clone()
                hidden_visual[list(keys)] = False
                allowed[b, row] &= ~hidden_visual
        mask = torch.zeros(batch, 1, length, length).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
        hidden = layer(hidden, attention_mask=mask, position_embeddings=(cos, sin))
    return model.lm_head(lm.norm(hidden))
