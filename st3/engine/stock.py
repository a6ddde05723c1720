"""The stock-decoder path: a method that chooses only before the decoder, then the model's own decoder.

When a method's schedule prunes nowhere but entering layer 0 and evicts nothing while decoding, nothing inside
the decoder needs st3: the prompt's surviving rows (their embeddings, their original positions, 1-D or M-RoPE,
and whatever the adapter says travels with them) go through the decoder stack's own, unmodified forward. So
every transformers feature keeps working: a static cache, `torch.compile`, any attention backend.

Two translations keep the shortened prefill consistent with what `generate` tracks for the full prompt:
- prefill (here): the survivors are chosen by the engine's own prefill view at layer 0, packed left-padded, and
  passed with a 2-D mask over them; the padding mask of the full prompt is remembered.
- decode (`prepare`, around `prepare_inputs_for_generation`): generate's 2-D mask covers the full prompt plus
  the new tokens; it is rewritten to the survivors' mask plus the new tokens before generate turns it into
  the 4-D mask of a static cache. Positions need nothing: generate keeps the full prompt's positions.

A decode forward (one that continues a cache) is passed through untouched, so a compiled forward sees the same
shapes at every step and is not recompiled; after it, an eager function records it in the trace (what every
layer attended to, known on the host; the cache's bytes, measured).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.modeling_outputs import BaseModelOutputWithPast

from st3 import compat
from st3.compat import DynamicCache
from st3.engine.cache import cache_bytes
from st3.engine.forward import Engine
from st3.engine.rows import Rows

MODES = ("auto", "stock", "engine")


class StockDecoder:
    """The decoder stack's forward while a pre-decoder method is applied: the stock decoder, or st3's loop."""

    def __init__(self, engine: Engine, mode: str):
        self.engine = engine
        self.stock: Callable = engine.forward  # the decoder stack's own forward, bound (set by the session)
        self.mode = mode
        self.prompt_mask: torch.Tensor | None = None  # the full prompt's 2-D mask (from generate)
        self.kept_mask: torch.Tensor | None = None  # [B, K]: the survivors' mask, after a stock prefill
        # After a stock prefill, per sample: the visual survivors, all survivors (host counts), and the visual
        # survivors' columns where the method records positions: what every decode forward attends to, plus the fed.
        self.survivors: tuple[list[int], list[int], list[torch.Tensor] | None] | None = None

    def uses_stock(self, cache) -> bool:
        """Whether this forward runs the stock decoder (the mode, else what st3's loop cannot run)."""
        if self.mode != "auto":
            return self.mode == "stock"
        return torch.compiler.is_compiling() or not (cache is None or type(cache) is DynamicCache)

    def forward(self, *args, **kwargs) -> BaseModelOutputWithPast:
        """Drop-in replacement for the decoder stack's forward."""
        cache = compat.cache_in(kwargs)
        if not self.uses_stock(cache):
            return self.engine.forward(*args, **kwargs)
        if args:
            raise TypeError("st3's stock decoder path takes the decoder stack's arguments by keyword")
        embeds = kwargs.get("inputs_embeds")
        length = (embeds if embeds is not None else kwargs["input_ids"]).shape[1]
        if _continues(cache, length):
            if kwargs.get("position_ids") is None:
                raise ValueError(
                    "a forward that continues a cache shortened by st3 needs `position_ids` (the full prompt's "
                    "positions continue; the cache is shorter): generate passes them"
                )
            out = self.stock(**kwargs)
            self._log_decode(out)
            return out
        return self._prefill(**kwargs)

    @torch.compiler.disable
    def _prefill(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **kwargs):
        """Choose the survivors (eagerly: data-dependent), then run the stock decoder on them."""
        engine, adapter = self.engine, self.engine.adapter
        if attention_mask is not None and attention_mask.dim() != 2:
            attention_mask = self.prompt_mask
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("st3 needs the prompt's 2-D padding mask [batch, tokens]")
        embeds = adapter.embed(input_ids) if inputs_embeds is None else inputs_embeds
        rows, note = engine._prompt_rows(embeds, attention_mask, position_ids, kwargs)  # pops what rows carry
        trace = engine._new_trace(rows, embeds.dtype, note)
        if engine.method.compresses_vision and bool(rows.visual.any()):
            rows = engine._compress_before_decoder(rows)
        rows = self._choose(rows)
        for _ in adapter.layers:
            trace.log_prefill_layer(rows.columns, rows.valid, rows.visual)
        trace.explain(engine.method)
        kwargs.update(adapter.stock_inputs(rows.visual, rows.carried))
        dtype = attention_mask.dtype if attention_mask is not None else torch.long
        self.kept_mask = rows.valid.to(dtype)
        held = rows.valid & rows.visual
        positions = [c[m] for c, m in zip(rows.columns, held)] if engine.method.record_positions else None
        self.survivors = (held.sum(-1).tolist(), rows.valid.sum(-1).tolist(), positions)
        out = self.stock(inputs_embeds=rows.hidden, attention_mask=self.kept_mask, position_ids=rows.position_ids,
                         **kwargs)  # fmt: skip
        cache = compat.cache_of(out)
        trace.log_kv(0 if cache is None else cache_bytes(cache))  # no cache kept: nothing held
        return out

    @torch.compiler.disable
    def _log_decode(self, out: BaseModelOutputWithPast) -> None:
        """Record a decode forward of the stock decoder: every layer attended to the survivors and every token fed
        so far (it evicts nothing, and has no window: see `Session`), and the cache's bytes measured after it.
        Runs eagerly (a graph break under `torch.compile`; it reads only host state, so nothing recompiles)."""
        trace = self.engine.trace
        if trace is None or self.survivors is None:  # a cache this path did not fill: nothing to add to
            return
        held, real, positions = self.survivors
        step = trace.decode_steps + 1
        trace.log_decode_step([(held, [r + step for r in real], positions)] * len(self.engine.adapter.layers))
        trace.log_kv(cache_bytes(compat.cache_of(out)))

    def _choose(self, rows: Rows) -> Rows:
        """The rows that enter the decoder: the method's choice at layer 0 (text, and padding dropped)."""
        engine = self.engine
        visual = rows.visual.sum(-1)
        keep = engine.method.prefill_keep(0, len(engine.adapter.layers), visual)
        if keep is None or not bool((keep < visual).any()):
            return rows.without_visual(rows.visual)
        view = engine._prefill_view(0, rows, rows.hidden, None, keep, (rows.hidden, rows.visual, rows.valid))
        return rows.without_visual(engine.method.choose(view))

    def prepare(self, original: Callable) -> Callable:
        """`prepare_inputs_for_generation` with generate's full-prompt mask rewritten to the shortened cache's."""

        def prepare_inputs_for_generation(*args, **kwargs):
            mask = kwargs.get("attention_mask")
            if kwargs.get("is_first_iteration"):
                self.prompt_mask, self.kept_mask = mask, None
                inputs = original(*args, **kwargs)
                if mask is not None and inputs.get("attention_mask") is not None:
                    inputs["attention_mask"] = mask  # the prefill chooses, then builds its own mask
                return inputs
            if self.kept_mask is not None and mask is not None and mask.dim() == 2:
                new = mask.shape[-1] - self.prompt_mask.shape[-1]
                kwargs["attention_mask"] = torch.cat([self.kept_mask, mask[:, mask.shape[-1] - new :]], dim=-1)
            return original(*args, **kwargs)

        return prepare_inputs_for_generation


def _continues(cache, length: int) -> bool:
    """Whether a forward of `length` rows continues a filled cache (decided without a device sync per step)."""
    if cache is None:
        return False
    layer = cache.layers[0] if getattr(cache, "layers", None) else None
    if layer is not None and not getattr(layer, "is_initialized", True):
        return False
    if length == 1:
        return True
    return int(cache.get_seq_length()) > 0
