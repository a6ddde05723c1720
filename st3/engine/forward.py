"""The language-model loop that removes visual tokens for real.

It replaces the decoder stack's `forward` while a method is applied. Compared with the stock loop it:
- builds each layer's attention mask from that layer's own cache (layers hold different tokens), per the
  adapter's `MaskRule` of that layer (causal, sliding window, bidirectional image blocks) over original columns;
- computes rotary embeddings once from true positions (every layer type's) and gathers them with the surviving
  rows, so every survivor keeps its original position (cached keys carry their rotation already);
- at the layers the method names, ranks the visual tokens by re-projected attention and gathers the
  surviving rows of the hidden states (prefill), or drops entries from a layer's KV cache (decode).
Everything model-specific is the adapter's; every decision (how many, which) is the method's (`Policy`).

A model split over devices (accelerate's `device_map`) runs as the stock loop runs it: each layer's hook moves its
inputs to its device. The rows of a prefill follow the hidden states to the device of the layer that produced them;
decode-time scoring and eviction run on the device of the layer's cache; what is read from another device (the
layer before's keys, a projection) is moved there where it is read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers.modeling_outputs import BaseModelOutputWithPast

from st3 import compat
from st3.adapters.base import Adapter
from st3.compat import DynamicCache
from st3.engine.cache import PrunableLayer, cache_bytes, gather, make_prunable, pack_index
from st3.engine.masks import DecodeMasks, allowed, rule_mask
from st3.engine.rows import Rows
from st3.engine.scoring import attention_of_one_row, attention_received
from st3.selectors.view import View
from st3.trace import Trace

if TYPE_CHECKING:
    from st3.engine.protocol import Policy

_UNSUPPORTED_OUTPUTS = ("output_attentions", "output_hidden_states")


class Engine:
    """Runs the decoder stack of one model under one method, and keeps the method's trace."""

    def __init__(self, adapter: Adapter, method: Policy):
        self.adapter = adapter
        self.method = method
        self.input_ids: torch.Tensor | None = None
        self.inputs: dict = {}  # the top-level model's keyword arguments of the last call
        self.trace: Trace | None = None
        # What the adapter's vision hooks captured. generate() encodes images before its first forward, so
        # this is filled before the prefill that consumes (and clears) it.
        self.vision: dict = {}
        self.rules: list = []  # each decoder layer's MaskRule, read once per prefill

    def capture_inputs(self, module, args, kwargs) -> None:
        """Forward pre-hook on the top-level model: remember `input_ids` to locate visual tokens."""
        self.input_ids = kwargs.get("input_ids", args[0] if args else None)
        self.inputs = {**kwargs, "input_ids": self.input_ids}
        cache = compat.cache_in(kwargs)
        continuing = any(isinstance(layer, PrunableLayer) for layer in getattr(cache, "layers", ()))
        self.adapter.check_inputs(self.inputs, continuing)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """Drop-in replacement for the decoder stack's forward (same arguments, same output type).

        The cache comes as `cache` or `past_key_values` (the keyword changed in transformers 5.24).
        """
        adapter = self.adapter
        cache = compat.take_cache(kwargs)
        if cache is not None and not isinstance(cache, DynamicCache):
            if not adapter.causal_only():
                why = "this model's sliding windows or image blocks run exactly only on st3's own loop"
            else:
                why = (f"{type(self.method).__name__} prunes inside the decoder or while decoding, which needs st3's "
                       "own loop; methods that choose only before the decoder (spread, stratified, divprune, ...) "
                       "run on any cache")  # fmt: skip
            raise TypeError(
                f"st3 needs a DynamicCache (the default of generate) here, got a {type(cache).__name__}: {why} "
                "(docs/fast-paths.md)"
            )
        for name in _UNSUPPORTED_OUTPUTS:
            if kwargs.pop(name, None):
                raise ValueError(f"{name}=True is not supported while a token-trimming method is applied")
        kwargs.pop("return_dict", None)
        attention_mask = adapter.padding_mask(attention_mask, self.inputs)
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"st3 needs a 2-D padding mask [batch, tokens]; got a {attention_mask.dim()}-D one")
        embeds = adapter.embed(input_ids) if inputs_embeds is None else inputs_embeds
        cache = DynamicCache(config=adapter.text_config) if cache is None else cache
        pruned = isinstance(cache.layers[0], PrunableLayer)
        if not pruned and cache.get_seq_length() > 0:
            raise ValueError("this KV cache was filled without st3; run the prompt inside `with method(model):`")
        hidden = (self._decode if pruned else self._prefill)(embeds, attention_mask, position_ids, cache, kwargs)
        use_cache = adapter.use_cache_default if use_cache is None else use_cache
        return compat.decoder_output(adapter.final_norm(hidden), cache if use_cache else None)

    # ------------------------------------------------------------------------------------- prefill
    def _prefill(self, embeds, attention_mask, position_ids, cache: DynamicCache, kwargs) -> torch.Tensor:
        rows, note = self._prompt_rows(embeds, attention_mask, position_ids, kwargs)
        width = embeds.shape[1]
        prompt = (rows.hidden, rows.visual, rows.valid)  # what the decoder got, before any row leaves
        trace = self._new_trace(rows, embeds.dtype, note)
        layers = self.adapter.layers
        rules = self.rules = [self.adapter.mask_rule(index) for index in range(len(layers))]
        trace.windows = [rule.window for rule in rules]
        make_prunable(cache, [rule.window for rule in rules])
        if self.method.compresses_vision and bool(rows.visual.any()):
            rows = self._compress_before_decoder(rows)
        call = self.adapter.layer_call_kwargs(cache, self.adapter.layer_kwargs(kwargs))
        counts, masks, previous = rows.counts(), {}, rows.hidden
        first, made = rows, None  # the prompt's rows (merged rows take a position from them); merged so far
        for index, decoder_layer in enumerate(layers):
            keep = self.method.prefill_keep(index, len(layers), counts.visual)
            if keep is not None and bool((keep < counts.visual).any()):
                view = self._prefill_view(index, rows, previous, cache, keep, prompt)
                kept = self.method.choose(view)
                merged = self.method.merge_pruned(view, kept)
                rows = rows.without_visual(kept)
                if merged is not None and merged[0].shape[1] > 0:
                    rows, made = self._insert_merged(index, rows, first, view, merged, made)
                counts, masks = rows.counts(), {}
            rule = rules[index]
            if rule not in masks:  # the layers of one rule hold the same rows until the next removal: one mask
                masks[rule] = self._prefill_mask(index, rule, rows, counts.padded, cache)
            previous = rows.hidden
            rotary = self.adapter.layer_rotary(index, rows.cos, rows.sin)
            hidden = decoder_layer(rows.hidden, attention_mask=masks[rule], position_embeddings=rotary, **call)
            if hidden.device != rows.valid.device:  # the layer ran on another device: the rows follow its output
                rows, masks = rows.to(hidden.device), {}
                counts = rows.counts()
            rows.hidden = self.adapter.after_layer(index, hidden, rows.carried)
            cache.layers[index].end_prefill(
                rows.columns, rows.valid, rows.visual, counts.real, counts.held, self.method.accumulates, width
            )
            trace.log_prefill_layer(rows.columns, rows.valid, rows.visual)
            if index > 0:  # the layer before is read no more (scores and keys come from the one before this one)
                cache.layers[index - 1].slide()  # a sliding layer drops what no later token sees
        cache.layers[-1].slide()
        trace.explain(self.method)  # why a sample kept every visual token, if one did
        self._measure_kv(cache)
        return rows.hidden

    def _prefill_mask(self, index: int, rule, rows: Rows, padded: bool, cache):
        """Layer `index`'s prefill mask: transformers' causal mask where the rule is plain causal (slots keep column
        order, so slot order is column order), else the rule evaluated over the rows' columns and blocks."""
        if rule.causal:
            return self.adapter.layer_mask(index, rows.hidden, rows.valid if padded else None, cache)
        valid = rows.valid if padded else None
        return rule_mask(self.adapter, rule, rows.hidden, rows.columns, rows.columns, valid, rows.blocks, rows.blocks)

    def _prompt_rows(self, embeds, attention_mask, position_ids, kwargs) -> tuple[Rows, str]:
        """The prompt's rows (positions, rotary, visual flags, carried inputs), and why nothing can be pruned."""
        batch, length = embeds.shape[:2]
        device = embeds.device
        valid = torch.ones(batch, length, dtype=torch.bool, device=device)
        valid = attention_mask.bool() if attention_mask is not None else valid
        if not valid[:, -1].all():
            raise ValueError("st3 needs left padding (the last prompt token must be real): set padding_side='left'")
        visual, note = self._visual_mask(batch, length, device)
        if position_ids is None:
            position_ids = self.adapter.default_positions(attention_mask, 0, batch, length, device)
        position_ids = position_ids.expand(*position_ids.shape[:-2], batch, length)
        cos, sin = (t.expand(batch, *t.shape[1:]) for t in self.adapter.rotary(embeds, position_ids))
        columns = torch.arange(length, device=device).expand(batch, length)
        carried = self.adapter.row_inputs(kwargs, visual & valid)
        blocks = self.adapter.row_blocks(self.inputs, visual & valid)
        return Rows(embeds, cos, sin, position_ids, columns, valid, visual & valid, carried, blocks=blocks), note

    def _visual_mask(self, batch: int, length: int, device) -> tuple[torch.Tensor, str]:
        ids = self.input_ids
        if ids is None or tuple(ids.shape) != (batch, length):
            empty = torch.zeros(batch, length, dtype=torch.bool, device=device)
            return empty, "no input_ids reached the model: visual tokens cannot be located, nothing was pruned"
        visual = self.adapter.visual_mask(ids).to(device)
        return visual, "" if visual.any() else "the input has no visual tokens: nothing to prune"

    def _new_trace(self, rows: Rows, dtype, note: str) -> Trace:
        self.trace = Trace(
            method=self.method.label,
            shape=self.adapter.shape,
            batch_size=rows.valid.shape[0],
            prompt_columns=rows.valid.shape[1],
            prompt_tokens=rows.valid.sum(-1).tolist(),
            visual_tokens=rows.visual.sum(-1).tolist(),
            dtype_bytes=torch.finfo(dtype).bits // 8,
            note=note,
            decode_visual_positions=[] if self.method.record_positions else None,
        )
        self.trace.image_grids = self._image_layout(rows.visual, rows.position_ids)
        self.method.begin(self.trace)
        return self.trace

    def _image_layout(self, visual: torch.Tensor, position_ids: torch.Tensor) -> list | None:
        """Per sample, the grids its visual tokens tile (for spatial methods), or None where unknown."""
        if not bool(visual.any()):
            return None
        try:
            return self.adapter.image_layout(self.inputs, visual, position_ids)
        except (NotImplementedError, ValueError, KeyError):
            return None

    def _compress_before_decoder(self, rows: Rows) -> Rows:
        """Let the method merge visual tokens from the vision tower's view; return the surviving rows."""
        if "features" not in self.vision:
            raise ValueError(f"{type(self.method).__name__} needs the image itself: pass pixel_values to the model")
        saliency, keys, features = (t.to(rows.hidden.device) for t in self.adapter.vision_saliency(self.vision))
        self.vision.clear()
        keep, replaced, merged = self.method.compress(saliency, keys, features)
        rows.hidden, kept = self.adapter.place_compressed(rows.hidden, rows.visual, keep, replaced, merged)
        self.trace.note = (
            f"{type(self.method).__name__} merged visual tokens before the decoder: {int(keep[0].sum())} of "
            f"{keep.shape[1]} per image reach it ({int(replaced[0].sum())} of them merges of several patches)"
        )
        return rows.without_visual(kept)

    def _insert_merged(self, index: int, rows: Rows, first: Rows, view: View, merged: tuple, made) -> tuple:
        """`rows` plus the method's merged rows (hidden [B, M, d], members [B, M, S] over the view's slots), placed
        before each sample's instruction with the position of its prompt's last visual token; their ids are
        -1 - i, i counting the sample's merged rows of this prefill. Returns (rows, merged so far [B])."""
        hidden, members = merged
        self._check_merging(rows)
        valid = members.any(-1)  # each sample's real merged rows come first
        made = valid.new_zeros(valid.shape[0], dtype=torch.long) if made is None else made
        ids = -made[:, None] - valid.long().cumsum(-1)
        self.trace.log_merged(index, ids, valid, members, view.columns)
        return rows.insert_merged(hidden, valid, ids, first.source_row()), made + valid.sum(-1)

    def _check_merging(self, rows: Rows) -> None:
        """Refuse merged rows where a row needs more than a 1-D position and a slot under plain causal masks."""
        why = None
        if rows.position_ids.dim() != 2:
            why = "its rotary positions are M-RoPE (t, h, w), and a merged token has no place in the image grid"
        elif rows.carried:
            why = f"its visual rows carry decoder inputs of their own ({', '.join(rows.carried)})"
        elif not self.adapter.causal_only():
            why = "its masks have sliding windows or image blocks, counted in prompt columns a merged token has none of"
        if why is not None:
            raise ValueError(
                f"{type(self.method).__name__} merges pruned visual tokens into new rows, which st3 runs on "
                f"decoders with 1-D positions and plain causal masks only; {self.adapter.model_name}: {why}. Apply it "
                "without merging (st3.SparseVLM: recycle=False)"
            )

    def _prefill_view(self, index: int, rows: Rows, previous: torch.Tensor, cache, keep: torch.Tensor,
                      prompt: tuple) -> View:  # fmt: skip
        """What a selector may read entering layer `index` (each part computed only if read)."""
        return View(
            layer=index,
            candidates=rows.visual,
            keep=keep,
            attention=lambda query=None: self._prefill_scores(index, rows, previous, cache, query),
            own_attention=lambda query=None: self._prefill_scores(index, rows, rows.hidden, cache, query, own=True),
            hidden=lambda: rows.hidden,
            keys=lambda: self.adapter.project_keys(index, rows.hidden, rows.cos, rows.sin),
            text=rows.text,
            valid=rows.valid,
            grids=self.trace.image_grids,
            previous_keys=lambda: self._previous_keys(index, rows, cache),
            normed=lambda: self.adapter.final_norm(rows.hidden).to(rows.hidden.device),
            columns=rows.columns,
            prompt=lambda: tuple(t.to(rows.hidden.device) for t in prompt),
        )

    def _previous_keys(self, index: int, rows: Rows, cache) -> torch.Tensor:
        """The rows' keys at layer index - 1 (cached: nothing was removed since it ran); at layer 0 its own."""
        if index > 0:
            return cache.layers[index - 1].keys.to(rows.hidden.device)
        return self.adapter.project_keys(0, rows.hidden, rows.cos, rows.sin)

    def _prefill_scores(
        self, index: int, rows: Rows, previous, cache, query: torch.Tensor | None, own: bool = False
    ) -> torch.Tensor:
        """Attention each current row received at layer index - 1 (at layer 0, or with `own`: at layer `index`
        itself, its own norm and q/k projections applied to its input rows) from the `query` rows (a sample
        without any: its last prompt token).

        `previous` holds the rows' inputs to the scored layer: nothing was removed since layer index - 1 ran.
        """
        scored = index if own else max(index - 1, 0)
        adapter, previous = self.adapter, previous.to(rows.hidden.device)
        if scored < index:
            keys = cache.layers[scored].keys.to(rows.hidden.device)
        else:
            keys = adapter.project_keys(scored, rows.hidden, rows.cos, rows.sin)
        last = rows.last()
        query = last if query is None else torch.where(query.any(-1, keepdim=True), query, last)
        picked, picked_valid = pack_index(query)
        queries = adapter.project_queries(
            scored, gather(previous, picked, 1), gather(rows.cos, picked, 1), gather(rows.sin, picked, 1)
        )
        rule = adapter.mask_rule(scored)
        query_blocks = None if rows.blocks is None else gather(rows.blocks, picked, 1)
        visible = allowed(rule, gather(rows.columns, picked, 1), rows.columns, rows.valid, query_blocks, rows.blocks)
        if rule.window is not None and rows.columns.shape[-1] > rule.window:
            self._check_window_covers(scored, rule.window, rows, visible, picked_valid)
        return attention_received(queries, keys, adapter.attention_scaling(scored), visible, picked_valid)

    @staticmethod
    def _check_window_covers(scored: int, window: int, rows: Rows, visible, picked_valid) -> None:
        """Refuse to rank visual tokens by a sliding layer's attention when some lie outside the window of every
        query row: that layer computed no attention for them (a score of 0 would drop them for being far, not
        for being unimportant, and ties among them would be broken by position)."""
        weighted = visible if picked_valid is None else visible & picked_valid[:, :, None].bool()
        unseen = rows.visual & ~weighted.any(1)
        if bool(unseen.any()):
            raise ValueError(
                f"the method ranks visual tokens by layer {scored}'s attention, a sliding-window layer (window "
                f"{window} columns) whose query rows never attended to {int(unseen.sum())} of them: that attention "
                "was never computed. Score at a full-attention layer (prune one layer after it), use query rows "
                "inside the window, or a method that does not read attention (e.g. spread, divprune)"
            )

    # -------------------------------------------------------------------------------------- decode
    def _decode(self, embeds, attention_mask, position_ids, cache: DynamicCache, kwargs) -> torch.Tensor:
        batch, length = embeds.shape[:2]
        if length != 1:
            raise NotImplementedError(
                "st3 decodes one token per forward; continuing a pruned cache with several tokens "
                "(chunked prefill, assisted decoding) is not supported"
            )
        if self.trace is None:
            raise ValueError("this KV cache was pruned under another application of the method; run the prompt again")
        adapter, method, first = self.adapter, self.method, cache.layers[0]
        step = first.steps + 1  # this forward's number since prefill
        if position_ids is None:
            position_ids = adapter.default_positions(attention_mask, first.next_column, batch, 1, embeds.device)
        cos, sin = adapter.rotary(embeds, position_ids)  # every layer type's; each layer takes its own below
        call = adapter.layer_call_kwargs(cache, adapter.layer_kwargs(kwargs))
        # Nothing below waits for the device unless a layer evicts: masks are shared by the layers that hold
        # the same slots, the new slot is counted rather than recorded, counts and budgets live on the host.
        masks, evictions, budgets, attended = DecodeMasks(adapter, cache, self.rules), [], {}, []
        hidden = embeds
        for index, decoder_layer in enumerate(adapter.layers):
            layer, layer_input = cache.layers[index], hidden
            hidden = decoder_layer(hidden, attention_mask=masks(index, hidden, layer),
                                   position_embeddings=adapter.layer_rotary(index, cos, sin), **call)  # fmt: skip
            layer.step()
            attended.append(self._attended(layer))
            current = self._current_attention(index, layer, layer_input, cos, sin) if method.accumulates else None
            if current is not None:
                layer.receive(current)
            if layer.slide():  # a sliding layer drops what no later token sees; eviction ranks the rest
                current = None  # computed over the slots before the drop
            budget = method.host_decode_budget(index, step, layer.held_after_prefill)
            if budget is not None and any(h > b for h, b in zip(layer.held, budget)):
                evictions.append(self._evict(index, layer, layer_input, cos, sin, budget, current, budgets))
        if evictions:
            self.trace.evicted = True
            if not method.evicts_exactly:  # one sync for every evicting layer of the step
                method.check_counts(evictions)
        self.trace.log_decode_step(attended)
        self._measure_kv(cache)
        return hidden

    def _attended(self, layer: PrunableLayer) -> tuple:
        """What the new row of `layer` attended to: (visual slots, keys) per sample, and the visual columns when
        the method records positions."""
        if not self.method.record_positions:
            return layer.held, layer.real, None
        return layer.held, layer.real, [c[m] for c, m in zip(layer.columns, layer.valid & layer.visual)]

    def _current_attention(self, index: int, layer: PrunableLayer, layer_input, cos, sin) -> torch.Tensor:
        """Attention [B, S] the token being written gives each slot of `layer` (its own included), on its device."""
        device = layer.keys.device
        queries = self.adapter.project_queries(index, layer_input.to(device), cos.to(device), sin.to(device))
        scaling = self.adapter.attention_scaling(index)
        visible = layer.valid if layer.padded else None
        if layer.window is not None:  # the new row's window over original columns (it is at next_column - 1 now)
            inside = layer.columns > layer.next_column - 1 - layer.window
            visible = inside if visible is None else visible & inside
        return attention_of_one_row(queries, layer.keys, scaling, visible)

    def _evict(self, index: int, layer: PrunableLayer, layer_input, cos, sin, budget: list[int], current,
               budgets: dict) -> tuple[torch.Tensor, View]:  # fmt: skip
        """Drop from `layer`'s cache the visual entries beyond `budget`, chosen by the method's eviction rule;
        return (kept, view) for the step's count check. Layers of one step with equal budgets share a tensor."""
        key = (tuple(budget), layer.keys.device)
        keep = budgets.get(key)
        if keep is None:
            keep = budgets[key] = torch.tensor(budget, device=layer.keys.device)
        memo = [current]

        def attention(rows: torch.Tensor | None = None) -> torch.Tensor:
            if memo[0] is None:
                memo[0] = self._current_attention(index, layer, layer_input, cos, sin)
            return memo[0]

        view = View(layer=index, candidates=layer.valid & layer.visual, keep=keep, attention=attention,
                    hidden=lambda: None, keys=lambda: layer.keys, received=layer.received, decoding=True)  # fmt: skip
        selected = self.method.evict(view)
        layer.evict(selected, budget)
        return selected, view

    def _measure_kv(self, cache: DynamicCache) -> None:
        self.trace.log_kv(cache_bytes(cache))
