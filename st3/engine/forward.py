"""The language-model loop that removes visual tokens for real.

It replaces the decoder stack's `forward` while a method is applied. Compared with the stock loop it:
- builds each layer's attention mask from that layer's own cache (layers hold different tokens);
- computes rotary embeddings once from true positions and gathers them with the surviving rows, so every
  survivor keeps its original position (cached keys carry their rotation already);
- at the layers the method names, ranks the visual tokens by re-projected attention and gathers the
  surviving rows of the hidden states (prefill), or drops entries from a layer's KV cache (decode).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers.modeling_outputs import BaseModelOutputWithPast

from st3 import compat
from st3.adapters.base import Adapter
from st3.compat import DynamicCache, DynamicLayer
from st3.engine.cache import PrunableLayer, gather, pack_index
from st3.engine.scoring import attention_of_one_row, attention_received
from st3.engine.view import View
from st3.trace import Trace

if TYPE_CHECKING:
    from st3.methods.base import Method

_UNSUPPORTED_OUTPUTS = ("output_attentions", "output_hidden_states")


@dataclass
class Rows:
    """The rows of a prefill and everything that travels with each row, all [B, S, ...]."""

    hidden: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    position_ids: torch.Tensor  # [..., B, S]
    columns: torch.Tensor
    valid: torch.Tensor
    visual: torch.Tensor
    extra: dict[str, torch.Tensor]  # per-row decoder inputs the adapter names (e.g. deepstack features)

    def keep(self, keep: torch.Tensor) -> Rows:
        """The rows where `keep` [B, S] holds, per sample in order, left-padded with invalid filler."""
        index, filled = pack_index(keep)
        return Rows(
            hidden=gather(self.hidden, index, 1),
            cos=gather(self.cos, index, 1),
            sin=gather(self.sin, index, 1),
            position_ids=gather(self.position_ids, index, -1),
            columns=gather(self.columns, index, 1),
            valid=gather(self.valid, index, 1) & filled,
            visual=gather(self.visual, index, 1) & filled,
            extra={name: gather(value, index, 1) for name, value in self.extra.items()},
        )

    def without_visual(self, kept: torch.Tensor) -> Rows:
        """Drop the visual rows not in `kept` (and padding)."""
        return self.keep((self.valid & ~self.visual) | kept)


class Engine:
    """Runs the decoder stack of one model under one method, and keeps the method's trace."""

    def __init__(self, adapter: Adapter, method: Method):
        self.adapter = adapter
        self.method = method
        self.input_ids: torch.Tensor | None = None
        self.inputs: dict = {}  # the top-level model's keyword arguments of the last call
        self.trace: Trace | None = None
        # What the adapter's vision hooks captured. generate() encodes images before its first forward, so
        # this is filled before the prefill that consumes (and clears) it.
        self.vision: dict = {}
        self._decoder_layers = adapter.layers  # re-read at every forward (`_call_kwargs`)

    # ------------------------------------------------------------------------------------ plumbing
    def capture_inputs(self, module, args, kwargs) -> None:
        """Forward pre-hook on the top-level model: remember `input_ids` to locate visual tokens."""
        self.input_ids = kwargs.get("input_ids", args[0] if args else None)
        self.inputs = {**kwargs, "input_ids": self.input_ids}
        self.adapter.check_inputs(self.inputs)

    @property
    def num_layers(self) -> int:
        return self.adapter.shape.num_layers

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
        past = compat.take_cache(kwargs)
        for name in _UNSUPPORTED_OUTPUTS:
            if kwargs.pop(name, None):
                raise ValueError(f"{name}=True is not supported while a token-trimming method is applied")
        kwargs.pop("return_dict", None)
        if inputs_embeds is None:
            inputs_embeds = adapter.embed(input_ids)
        if use_cache is None:
            use_cache = adapter.use_cache_default
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"st3 needs a 2-D padding mask [batch, tokens]; got a {attention_mask.dim()}-D one")

        cache = past if past is not None else DynamicCache(config=adapter.text_config)
        if not isinstance(cache, DynamicCache):
            raise TypeError(f"st3 needs a DynamicCache (the default of generate), got {type(cache).__name__}")
        if cache.get_seq_length() == 0 and not isinstance(cache.layers[0], PrunableLayer):
            hidden = self._prefill(inputs_embeds, attention_mask, position_ids, cache, kwargs)
        elif isinstance(cache.layers[0], PrunableLayer):
            hidden = self._decode(inputs_embeds, attention_mask, position_ids, cache, kwargs)
        else:
            raise ValueError(
                "this KV cache was filled without st3; run the prompt inside the `with method(model):` block"
            )
        return compat.decoder_output(adapter.final_norm(hidden), cache if use_cache else None)

    def _mask(self, index: int, hidden, valid, cache):
        """Layer `index`'s attention mask, sized from its own cache; `valid` [B, S+q] or None (no padding).

        Layers that hold the same slots share one mask: the caller builds it once and reuses it.
        """
        return self.adapter.layer_mask(index, hidden, valid, cache)

    def _call_kwargs(self, cache, kwargs: dict) -> dict:
        """The keyword arguments every decoder layer call of one forward shares (built once per forward)."""
        self._decoder_layers = self.adapter.layers
        return self.adapter.layer_call_kwargs(cache, kwargs)

    def _layer(self, index: int, hidden, mask, cos, sin, call: dict) -> torch.Tensor:
        """Run decoder layer `index` on `hidden` under `mask` (from `_mask`); `call` from `_call_kwargs`."""
        return self._decoder_layers[index](hidden, attention_mask=mask, position_embeddings=(cos, sin), **call)

    # ------------------------------------------------------------------------------------- prefill
    def _prefill(self, embeds, attention_mask, position_ids, cache: DynamicCache, kwargs) -> torch.Tensor:
        batch, length = embeds.shape[:2]
        device = embeds.device
        valid = (
            attention_mask.bool()
            if attention_mask is not None
            else torch.ones(batch, length, dtype=torch.bool, device=device)
        )
        if not valid[:, -1].all():
            raise ValueError("st3 needs left padding (the last prompt token must be real): set padding_side='left'")
        visual, note = self._visual_mask(batch, length, device)
        if position_ids is None:
            position_ids = self.adapter.default_positions(attention_mask, 0, batch, length, device)
        position_ids = position_ids.expand(*position_ids.shape[:-2], batch, length)
        cos, sin = (t.expand(batch, -1, -1) for t in self.adapter.rotary(embeds, position_ids))
        columns = torch.arange(length, device=device).expand(batch, length)
        extra = self.adapter.row_inputs(kwargs, visual & valid)
        kwargs = self.adapter.layer_kwargs(kwargs)
        rows = Rows(embeds, cos, sin, position_ids, columns, valid, visual & valid, extra)

        trace = self._new_trace(batch, length, valid, rows.visual, embeds.dtype, note)
        trace.image_grids = self._image_layout(rows.visual, position_ids)
        if any(type(layer) is not DynamicLayer for layer in cache.layers):
            raise TypeError("st3 supports full-attention DynamicCache layers only (no sliding window or offloading)")
        cache.layers[:] = [PrunableLayer() for _ in range(self.num_layers)]

        if self.method.compresses_vision and bool(rows.visual.any()):
            rows = self._compress_before_decoder(rows)
        previous = rows.hidden
        counts = mask = None
        call = self._call_kwargs(cache, kwargs)
        for index in range(self.num_layers):
            if counts is None:  # once per set of rows: the device counts and their host copy (one sync)
                counts = self._counts(rows)
            held = counts[0]
            keep = self.method.prefill_keep(index, self.num_layers, held)
            if keep is not None and bool((keep < held).any()):
                rows = rows.without_visual(self.method.choose(self._prefill_view(index, rows, previous, cache, keep)))
                counts = self._counts(rows)
                mask = None
            if mask is None:  # every layer until the next removal holds the same rows: one mask for all
                padded = any(r < rows.valid.shape[-1] for r in counts[1])
                mask = self._mask(index, rows.hidden, rows.valid if padded else None, cache)
            previous = rows.hidden
            rows.hidden = self._layer(index, rows.hidden, mask, rows.cos, rows.sin, call)
            rows.hidden = self.adapter.after_layer(index, rows.hidden, rows.extra)
            layer = cache.layers[index]
            layer.record(rows.columns, rows.valid, rows.visual, real=counts[1], held=counts[2])
            layer.visual_after_prefill, layer.held_after_prefill = counts[0], counts[2]
            layer.next_column, layer.steps = length, 0
            if self._accumulates:
                layer.received = torch.zeros(layer.valid.shape, device=device)
            trace.log_prefill_layer(rows.columns, rows.valid, rows.visual)
        trace.explain(self.method)  # why a sample kept every visual token, if one did
        self._measure_kv(cache)
        return rows.hidden

    @staticmethod
    def _counts(rows: Rows) -> tuple[torch.Tensor, list[int], list[int]]:
        """(visual rows per sample [B], and on the host: real rows, visual rows per sample)."""
        held = rows.visual.sum(-1)
        real, host_held = torch.stack([rows.valid.sum(-1), held]).tolist()
        return held, real, host_held

    def _compress_before_decoder(self, rows: Rows) -> Rows:
        """Let the method merge visual tokens from the vision tower's view; return the surviving rows."""
        hidden, visual = rows.hidden, rows.visual
        if "features" not in self.vision:
            raise ValueError(f"{type(self.method).__name__} needs the image itself: pass pixel_values to the model")
        saliency, keys, features = self.adapter.vision_saliency(self.vision)
        self.vision.clear()
        keep, replaced, merged = self.method.compress(saliency, keys, features)
        positions = visual.nonzero(as_tuple=True)  # row-major: the order LLaVA scatters image features in
        repeats, rest = divmod(len(positions[0]), keep.numel())
        if rest or (repeats > 1 and keep.shape[0] * repeats != visual.shape[0]):
            raise ValueError(f"{len(positions[0])} visual tokens in the prompt but {keep.numel()} image patches")
        if repeats > 1:  # generate() expanded one image per sample for beams / num_return_sequences
            keep, replaced, merged = (t.repeat_interleave(repeats, dim=0) for t in (keep, replaced, merged))
        hidden = hidden.clone()
        flat = replaced.reshape(-1)
        if bool(flat.any()):
            projected = self.adapter.project_features(merged[replaced].unsqueeze(0))[0]
            hidden[positions[0][flat], positions[1][flat]] = projected.to(hidden.dtype)
        kept = torch.zeros_like(visual)
        kept[positions] = keep.reshape(-1)
        self.trace.note = (
            f"{type(self.method).__name__} merged visual tokens before the decoder: {int(keep[0].sum())} of "
            f"{keep.shape[1]} per image reach it ({int(replaced[0].sum())} of them merges of several patches)"
        )
        rows.hidden = hidden
        return rows.without_visual(kept)

    def _visual_mask(self, batch: int, length: int, device) -> tuple[torch.Tensor, str]:
        ids = self.input_ids
        if ids is None or tuple(ids.shape) != (batch, length):
            empty = torch.zeros(batch, length, dtype=torch.bool, device=device)
            return empty, "no input_ids reached the model: visual tokens cannot be located, nothing was pruned"
        visual = self.adapter.visual_mask(ids).to(device)
        return visual, "" if visual.any() else "the input has no visual tokens: nothing to prune"

    def _image_layout(self, visual: torch.Tensor, position_ids: torch.Tensor) -> list | None:
        """Per sample, the grids its visual tokens tile (for spatial methods), or None where unknown."""
        if not bool(visual.any()):
            return None
        try:
            return self.adapter.image_layout(self.inputs, visual, position_ids)
        except (NotImplementedError, ValueError, KeyError):
            return None

    def _new_trace(self, batch, length, valid, visual, dtype, note) -> Trace:
        self.trace = Trace(
            method=self.method.name,
            shape=self.adapter.shape,
            batch_size=batch,
            prompt_columns=length,
            prompt_tokens=valid.sum(-1).tolist(),
            visual_tokens=visual.sum(-1).tolist(),
            dtype_bytes=torch.finfo(dtype).bits // 8,
            note=note,
            decode_visual_positions=[] if self.method.record_positions else None,
        )
        self.method.begin(self.trace)
        return self.trace

    @property
    def _accumulates(self) -> bool:
        """Whether each decode step's attention is summed into the cache (for eviction rules that read it)."""
        annealing = self.method.annealing
        return annealing is not None and annealing.accumulates

    def _prefill_view(self, index: int, rows: Rows, previous: torch.Tensor, cache, keep: torch.Tensor) -> View:
        """What a selector may read entering layer `index` (each part computed only if read)."""
        return View(
            layer=index,
            candidates=rows.visual,
            keep=keep,
            attention=lambda query: self._prefill_scores(index, rows, previous, cache, query),
            hidden=lambda: rows.hidden,
            keys=lambda: self.adapter.project_keys(index, rows.hidden, rows.cos, rows.sin),
            text=lambda: self._query_rows(rows.columns, rows.valid, rows.visual, "text"),
            grids=self.trace.image_grids,
        )

    def _query_rows(self, columns, valid, visual, mode: str) -> torch.Tensor:
        """BoolTensor [B, S]: the rows whose attention ranks the visual tokens."""
        last = torch.zeros_like(valid)
        last[:, -1] = True
        if mode == "last":
            return last
        if mode == "all":
            return valid
        image_end = torch.where(visual, columns, -1).amax(-1, keepdim=True)
        text = valid & ~visual & (columns > image_end)
        return torch.where(text.any(-1, keepdim=True), text, last)

    def _prefill_scores(self, index: int, rows: Rows, previous: torch.Tensor, cache, query: str) -> torch.Tensor:
        """Attention each current row received at layer index - 1 (at layer 0: its own attention).

        `previous` holds the rows' inputs to layer index - 1: nothing was removed since that layer ran.
        """
        scored = max(index - 1, 0)
        project_keys = self.adapter.project_keys
        keys = cache.layers[scored].keys if index > 0 else project_keys(0, rows.hidden, rows.cos, rows.sin)
        picked, picked_valid = pack_index(self._query_rows(rows.columns, rows.valid, rows.visual, query))
        queries = self.adapter.project_queries(
            scored, gather(previous, picked, 1), gather(rows.cos, picked, 1), gather(rows.sin, picked, 1)
        )
        query_columns = gather(rows.columns, picked, 1)
        visible = rows.valid[:, None, :] & (rows.columns[:, None, :] <= query_columns[:, :, None])
        return attention_received(queries, keys, self.adapter.attention_scaling(scored), visible, picked_valid)

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
        device = embeds.device
        first = cache.layers[0]
        step = first.steps
        if position_ids is None:
            position_ids = self.adapter.default_positions(attention_mask, first.next_column, batch, 1, device)
        kwargs = self.adapter.layer_kwargs(kwargs)
        cos, sin = self.adapter.rotary(embeds, position_ids)
        column = first.next_column

        # Nothing below waits for the device unless a layer evicts: masks are shared by the layers that hold
        # the same slots, the new slot is counted rather than recorded, counts and budgets live on the host.
        masks: dict = {}
        accumulates = self._accumulates
        checks = None if self.method.evicts_exactly else []  # the evictions whose counts need a check
        budgets: dict = {}  # host budget -> its tensor, built once per step
        call = self._call_kwargs(cache, kwargs)
        visual_log, keys_log, positions = [], [], []
        hidden = embeds
        for index in range(self.num_layers):
            layer = cache.layers[index]
            layer_input = hidden
            owner = layer._valid if layer.padded else None  # what the mask depends on besides the length
            if layer.padded:
                key = (id(owner), layer.extra)
            else:  # an unpadded one-row mask that transformers skips (None) is skipped at every key length
                key = "skipped" if "skipped" in masks else (None, layer.get_seq_length())
            shared = masks.get(key)
            if shared is None or shared[0] is not owner:
                masks[key] = shared = (owner, self._mask(index, hidden, layer.valid_with(1), cache))
                if owner is None and shared[1] is None:
                    masks["skipped"] = shared
            hidden = self._layer(index, hidden, shared[1], cos, sin, call)
            layer.record_step(column)
            layer.next_column, layer.steps = column + 1, step + 1
            visual_log.append(layer.held)
            keys_log.append(layer.real)
            if self.method.record_positions:
                positions.append([c[m] for c, m in zip(layer.columns, layer.valid & layer.visual)])
            current = None
            if accumulates:
                current = self._current_attention(index, layer, layer_input, cos, sin)
                layer.received = layer.received + current
            budget = self.method.host_decode_budget(index, step + 1, layer.held_after_prefill)
            if budget is not None and any(h > b for h, b in zip(layer.held, budget)):
                self._evict(index, layer, layer_input, cos, sin, budget, current, checks, budgets)
        if checks:  # a rule whose kept counts are not exact by construction: one sync for all its layers
            self.method.check_counts(checks)
        self.trace.log_decode_step(visual_log, keys_log)
        if self.method.record_positions:
            self.trace.decode_visual_positions.append(positions)
        self._measure_kv(cache)
        return hidden

    def _current_attention(self, index: int, layer: PrunableLayer, layer_input, cos, sin) -> torch.Tensor:
        """Attention [B, S] the token being written gives each slot of `layer` (its own included)."""
        queries = self.adapter.project_queries(index, layer_input, cos, sin)
        scaling = self.adapter.attention_scaling(index)
        return attention_of_one_row(queries, layer.keys, scaling, layer.valid if layer.padded else None)

    def _evict(
        self,
        index: int,
        layer: PrunableLayer,
        layer_input,
        cos,
        sin,
        budget: list[int],
        current,
        checks: list | None,
        budgets: dict,
    ) -> None:
        """Drop from `layer`'s cache the visual entries beyond `budget`, chosen by the method's eviction rule.

        The rule keeps min(budget, held) candidates per sample, so the kept counts are known on the host; a
        rule not exact by construction gets its counts checked at the end of the step (into `checks`).
        """
        valid, visual = layer.valid, layer.visual
        candidates = valid & visual
        keep = budgets.get(tuple(budget))  # layers of one step with the same budgets share one tensor
        if keep is None:
            keep = budgets[tuple(budget)] = torch.tensor(budget, device=valid.device)
        memo = {} if current is None else {"current": current}

        def attention(query: str) -> torch.Tensor:
            if "current" not in memo:
                memo["current"] = self._current_attention(index, layer, layer_input, cos, sin)
            return memo["current"]

        view = View(
            layer=index,
            candidates=candidates,
            keep=keep,
            attention=attention,
            hidden=lambda: None,
            keys=lambda: layer.keys,
            received=layer.received,
            decoding=True,
        )
        selected = self.method.evict(view)
        if checks is not None:
            checks.append((selected, view))
        held = [min(h, b) for h, b in zip(layer.held, budget)]
        real = [r - h + k for r, h, k in zip(layer.real, layer.held, held)]
        layer.keep((valid & ~visual) | selected, real=real, held=held)

    def _measure_kv(self, cache: DynamicCache) -> None:
        size = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.keys is not None)
        self.trace.kv_bytes = size
        self.trace.kv_bytes_peak = max(self.trace.kv_bytes_peak, size)
