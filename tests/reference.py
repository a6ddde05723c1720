"""An independent, straightforward computation to check pruned runs against.

The unpatched model, eager attention, the full sequence (prompt + fed tokens) in one pass, every row
computed at every layer, through the model's own forward (its embedding, image scatter, M-RoPE positions
from its own `get_rope_index`, deepstack, Gemma 3's bidirectional image blocks and sliding windows). Pruning
is expressed only as per-layer attention masks, intersected with each layer's OWN mask (causal, padding,
windows, image blocks: whatever the model built): a query row may see a visual key iff the model lets it and
the pruned run's trace says that layer held it when that row was processed (the prefill kept set for prompt
rows, the decode forward's attended set for fed tokens). Nothing of st3's engine is used here.
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


def reference_logits(model, inputs: dict, trace, fed: torch.Tensor | None = None, method=None) -> torch.Tensor:
    """Logits [B, L + T, V] of the masked reference; `fed` [B, T] are the tokens the decode forwards fed.

    For a method that merges tokens before the decoder (VisionZip), the merged embeddings are recomputed
    independently (`visionzip_embeddings`) and the kept columns must equal the trace's.
    """
    if trace.merged:  # rows were added (SparseVLM's recycling): the reference that inserts them
        return merged_reference_logits(model, inputs, trace, fed)
    model = eager_copy(model)
    rewrite = None
    if method is not None and method.compresses_vision:
        if method.name in ("fastervlm", "vtccls"):
            kept = cls_kept(model, inputs, method.keep, getattr(method, "start", None))
        else:
            kept, rewrite = visionzip_embeddings(
                model, inputs, method.patches(), method.contextual, plus_target=method.variant == "official"
            )
        assert [k.tolist() for k in kept] == [p.tolist() for p in trace.prefill_visual_positions[0]]
    return masked_forward(model, inputs, trace, fed, rewrite)


@torch.no_grad()
def visionzip_embeddings(model, inputs: dict, dominant: int, contextual: int, plus_target: bool = False):
    """VisionZip done by hand: (kept columns per sample, a function that writes the merged rows). `dominant`
    patches by [CLS] attention; a contextual token is its group's mean, or with `plus_target` (the released
    code) its target plus the mean of the others."""
    layer = model.config.vision_feature_layer
    tower = model.model.vision_tower
    out = tower(inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
    saliency = out.attentions[layer][:, :, 0, 1:].mean(1)  # the [CLS] row, heads averaged
    encoder_layer = tower.encoder.layers[layer]
    keys = encoder_layer.self_attn.k_proj(encoder_layer.layer_norm1(out.hidden_states[layer - 1]))
    keys = keys.view(*keys.shape[:2], encoder_layer.self_attn.num_heads, -1).mean(2)[:, 1:]
    features = out.hidden_states[layer][:, 1:]
    columns = [(row == model.config.image_token_id).nonzero().squeeze(-1) for row in inputs["input_ids"]]
    kept, merged_rows = [], []
    for image in range(features.shape[0]):
        top = set(saliency[image].topk(dominant).indices.tolist())
        rest = [p for p in range(features.shape[1]) if p not in top]
        targets = rest[:: max(1, len(rest) // contextual)][:contextual]
        groups = {t: [t] for t in targets}
        for p in rest:
            if p not in groups:
                sims = [torch.cosine_similarity(keys[image, p], keys[image, t], dim=0) for t in targets]
                groups[targets[int(torch.stack(sims).argmax())]].append(p)
        for t, members in groups.items():
            merged = features[image, members].mean(0)
            if plus_target:
                others = members[1:]
                merged = features[image, t] + (features[image, others].mean(0) if others else 0)
            row = model.model.multi_modal_projector(merged[None, None])[0, 0]
            merged_rows.append((image, int(columns[image][t]), row))
        kept.append(columns[image][sorted(top | set(targets))])

    def rewrite(embeds: torch.Tensor) -> None:
        for image, column, row in merged_rows:
            embeds[image, column] = row

    return kept, rewrite


@torch.no_grad()
def cls_kept(model, inputs: dict, keep: int, start: int | None) -> list[torch.Tensor]:
    """FasterVLM / VTC-CLS done by hand from the tower's own attention maps: per image, the columns of the
    `keep` patches with the highest [CLS] attention (heads averaged) at the feature layer, or summed over the
    layers from `start` through it (ties: the lower patch)."""
    out = model.model.vision_tower(inputs["pixel_values"], output_attentions=True)
    feature = model.config.vision_feature_layer % len(out.attentions)
    layers = out.attentions[feature : feature + 1] if start is None else out.attentions[start : feature + 1]
    saliency = sum(a[:, :, 0, 1:].mean(1) for a in layers)
    columns = [(row == model.config.image_token_id).nonzero().squeeze(-1) for row in inputs["input_ids"]]
    kept = []
    for image in range(saliency.shape[0]):
        top = sorted(saliency[image].tolist(), reverse=True)[keep - 1] if keep <= saliency.shape[1] else -1.0
        chosen = [p for p, value in enumerate(saliency[image].tolist()) if value > top]
        chosen += [p for p, value in enumerate(saliency[image].tolist()) if value == top][: keep - len(chosen)]
        kept.append(columns[image][sorted(chosen)])
    return kept


def attention_weights(model, inputs: dict, trace, fed: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Per layer, the masked reference's attention probabilities [B, heads, L + T, L + T]."""
    model = eager_copy(model)
    captured: list[torch.Tensor] = []
    for layer in decoder(model).layers:
        layer.self_attn.register_forward_hook(lambda module, args, output: captured.append(output[1]))
    masked_forward(model, inputs, trace, fed)
    return captured


def decoder(model):
    """The model's decoder stack: `language_model`, or Idefics3's / SmolVLM's `text_model`."""
    inner = model.model
    return inner.language_model if hasattr(inner, "language_model") else inner.text_model


def visual_token_ids(config) -> list[int]:
    """The token ids that hold image or video features, read off the model's config."""
    names = ("image_token_id", "video_token_id")
    return [getattr(config, name) for name in names if getattr(config, name, None) is not None]


def full_positions(model, inputs: dict, ids: torch.Tensor, attention: torch.Tensor, types) -> torch.Tensor:
    """Position ids of the whole sequence as the model defines them: M-RoPE [4, B, L] (text row first) from
    the model's own `get_rope_index` where it has one, else 1-D positions counted over real tokens."""
    text = (attention.cumsum(-1) - 1).clamp(min=0)
    if types is None:
        return text
    grids = {key: inputs.get(key) for key in ("image_grid_thw", "video_grid_thw")}
    rope, _ = model.model.get_rope_index(ids, mm_token_type_ids=types, attention_mask=attention, **grids)
    return torch.cat([text[None], rope])


def masked_forward(model, inputs: dict, trace, fed: torch.Tensor | None, rewrite=None) -> torch.Tensor:
    """The reference pass itself, on an eager `model`; `rewrite(embeds)` may replace rows first.

    The model runs its own forward (embedding, image features, positions, deepstack, norms); only each
    decoder layer's attention mask is replaced, by a forward pre-hook, with the per-row mask of the trace.
    """
    ids, attention = inputs["input_ids"], inputs["attention_mask"]
    types = inputs.get("mm_token_type_ids")
    token_types = inputs.get("token_type_ids")  # Gemma 3: image tokens attend to their image both ways
    batch, prompt_len = ids.shape
    steps = 0 if fed is None else fed.shape[1]
    visual = torch.isin(ids, torch.tensor(visual_token_ids(model.config)))
    if steps:
        # A generated token that happens to be a visual id is text (decode forwards carry no image): feed
        # a neutral id and put the generated token's own embedding back (below) so the model scatters nothing.
        fed_visual = torch.isin(fed, torch.tensor(visual_token_ids(model.config)))
        ids = torch.cat([ids, fed.masked_fill(fed_visual, 0)], dim=1)
        attention = torch.cat([attention, torch.ones_like(fed)], dim=1)
        visual = torch.cat([visual, torch.zeros_like(fed, dtype=torch.bool)], dim=1)
        types = None if types is None else torch.cat([types, torch.zeros_like(fed)], dim=1)
        token_types = None if token_types is None else torch.cat([token_types, torch.zeros_like(fed)], dim=1)
    length = ids.shape[1]

    pruned = []  # per layer [B, L, L]: False where the trace says a row could not see a visual key
    for index in range(len(decoder(model).layers)):
        allowed = torch.ones(batch, length, length, dtype=torch.bool)
        for b in range(batch):
            for row, keys in enumerate(visible_visual_keys(trace, index, b, prompt_len, steps)):
                hidden_visual = visual[b].clone()
                hidden_visual[list(keys)] = False
                allowed[b, row] &= ~hidden_visual
        pruned.append(allowed)

    def set_mask(index):
        def hook(module, args, kwargs):
            own = kwargs["attention_mask"]  # the eager model's additive mask for this layer, [B, 1, L, L]
            assert own is not None and own.shape == (batch, 1, length, length), "expected the model's eager mask"
            lowest = torch.finfo(own.dtype).min
            return args, {**kwargs, "attention_mask": own.masked_fill(~pruned[index][:, None], lowest)}

        return hook

    lm = decoder(model)
    hooks = [layer.register_forward_pre_hook(set_mask(i), with_kwargs=True) for i, layer in enumerate(lm.layers)]
    if steps and fed_visual.any():
        where = torch.cat([torch.zeros(batch, prompt_len, dtype=torch.bool), fed_visual], dim=1)

        def embed_fed(module, args, output):
            output = output.clone()
            output[where] = type(module).forward(module, fed[fed_visual]).to(output.dtype)  # bypasses this hook
            return output

        hooks.append(model.get_input_embeddings().register_forward_hook(embed_fed))
    if rewrite is not None:

        def rewrite_embeds(module, args, kwargs):
            embeds = kwargs["inputs_embeds"].clone()
            rewrite(embeds)
            return args, {**kwargs, "inputs_embeds": embeds}

        hooks.append(lm.register_forward_pre_hook(rewrite_embeds, with_kwargs=True))
    vision = {k: v for k, v in inputs.items()
              if k not in ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")}  # fmt: skip
    extra = {} if types is None else {"mm_token_type_ids": types}
    extra.update({} if token_types is None else {"token_type_ids": token_types})
    try:
        return model(input_ids=ids, attention_mask=attention, position_ids=full_positions(model, inputs, ids, attention,
                     types), use_cache=False, **vision, **extra).logits  # fmt: skip
    finally:
        for hook in hooks:
            hook.remove()


@torch.no_grad()
def merged_reference_logits(model, inputs: dict, trace, fed: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [B, L + T, V] of the masked reference of a run that merged visual rows (SparseVLM's recycling),
    for 1-D-position, plain causal decoders; columns of padding are zeros.

    Each sample alone, eager, layer by layer over the whole sequence (prompt + fed tokens) with the model's own
    decoder layers, rotary and norm: entering each layer where the trace says rows were merged, each merged row
    is computed here as the mean of its members' rows (`trace.merged`) and inserted before the instruction, with
    the position of the prompt's last visual token; every row then attends causally (in row order) to the rows
    before it, a visual key (merged ones included) only where the trace says that layer held it when the row
    was processed. Nothing of st3's engine is used.
    """
    model = eager_copy(model)
    lm = decoder(model)
    ids, attention = inputs["input_ids"], inputs["attention_mask"]
    batch, prompt_len = ids.shape
    steps = 0 if fed is None else fed.shape[1]
    full = ids if not steps else torch.cat([ids, fed], 1)
    attention = attention if not steps else torch.cat([attention, torch.ones_like(fed)], 1)
    visual = torch.isin(ids, torch.tensor(visual_token_ids(model.config)))
    embeds = _decoder_inputs(model, inputs)  # [B, L, d]: the prompt's rows as the decoder receives them
    if steps:
        embeds = torch.cat([embeds, model.get_input_embeddings()(fed).to(embeds.dtype)], 1)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    merged = trace.merged
    out = torch.zeros(batch, full.shape[1], model.config.get_text_config().vocab_size)
    for b in range(batch):
        real = attention[b].bool().nonzero().squeeze(-1).tolist()
        rows = list(real)  # each row's id: its column, or a merged row's negative id
        hidden = embeds[b, real]
        pos = positions[b, real]
        image_end = int(visual[b].nonzero().max())
        for index, layer in enumerate(lm.layers):
            for merged_id, members in merged.get(index, [{}] * batch)[b].items():
                row = sum(hidden[rows.index(m)] for m in members) / (len(members) + 1e-6)
                at = next(i for i, r in enumerate(rows) if r > image_end)
                rows.insert(at, merged_id)
                hidden = torch.cat([hidden[:at], row[None], hidden[at:]])
                pos = torch.cat([pos[:at], positions[b, image_end, None], pos[at:]])
            held = set(trace.prefill_visual_positions[index][b].tolist()) | set(
                trace.prefill_merged_positions[index][b]
            )
            seen = []
            for r in rows:
                if r >= prompt_len:
                    t = r - prompt_len
                    seen.append(set(trace.decode_visual_positions[t][index][b].tolist()))
                else:
                    seen.append(held)
            keys_visual = torch.tensor([r < 0 or (r < prompt_len and bool(visual[b, r])) for r in rows])
            n = len(rows)
            allowed = torch.ones(n, n, dtype=torch.bool).tril()
            for q in range(n):
                hidden_keys = keys_visual & ~torch.tensor([r in seen[q] for r in rows])
                allowed[q] &= ~hidden_keys
            mask = torch.zeros(n, n, dtype=hidden.dtype).masked_fill(~allowed, torch.finfo(hidden.dtype).min)
            rotary = lm.rotary_emb(hidden[None], pos[None])
            result = layer(hidden[None], attention_mask=mask[None, None], position_ids=pos[None],
                           position_embeddings=rotary)  # fmt: skip
            hidden = (result[0] if isinstance(result, tuple) else result)[0]
        logits = model.lm_head(lm.norm(hidden))
        keep = [i for i, r in enumerate(rows) if r >= 0]
        out[b, [rows[i] for i in keep]] = logits[keep].float()
    return out


def _decoder_inputs(model, inputs: dict) -> torch.Tensor:
    """The decoder's input embeddings [B, L, d] for `inputs` (images scattered in), from the model's own forward."""
    captured = {}

    class Stop(Exception):
        pass

    def grab(module, args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"]
        raise Stop

    hook = decoder(model).register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(**inputs, use_cache=False)
    except Stop:
        pass
    finally:
        hook.remove()
    return captured["embeds"]
