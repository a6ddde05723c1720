"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: a merged-patch vision tower in front of a Llama-style M-RoPE decoder.

What differs from LLaVA, and where it is handled:
- positions are M-RoPE: generate passes [4, B, S] (row 0 text positions, rows 1-3 temporal/height/width).
  Rotary drops row 0; the engine gathers all rows with each surviving row, so survivors keep their own
  (t, h, w) positions, and decode positions come from generate (last + 1), never from a pruned cache length.
- visual tokens are `image_token_id` and `video_token_id`; their counts differ per sample (`image_grid_thw`,
  `video_grid_thw`).
- Qwen3-VL adds q_norm/k_norm (applied by the shared re-projection) and deepstack: the decoder receives
  `visual_pos_masks` [B, S] and `deepstack_visual_embeds` (one [N_visual, H] per early layer), added to the
  visual rows after those layers. They are turned into per-row tensors that are pruned with the rows.
"""

from __future__ import annotations

import torch
from torch import nn

from st3.adapters.base import Adapter, Grid
from st3.engine.cache import PrunableLayer


class QwenVLAdapter(Adapter):
    """The shared Qwen-VL decoder adapter; the family classes below only name their classes."""

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    def visual_token_ids(self) -> tuple[int, ...]:
        config = self.model.config
        return (config.image_token_id, config.video_token_id)

    def check_inputs(self, kwargs: dict) -> None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        pruned = any(isinstance(layer, PrunableLayer) for layer in getattr(cache, "layers", ()))
        if pruned and kwargs.get("position_ids") is None:
            raise ValueError(
                f"{self.family} would derive the new tokens' M-RoPE positions from the cache length, which a pruned "
                "cache does not equal (and from a full-width attention_mask transformers 5.24 builds positions of "
                "the wrong width); pass `position_ids` [4, batch, new tokens] to every forward that continues a "
                "pruned cache, as generate does"
            )
        ids = kwargs.get("input_ids")
        if ids is None or kwargs.get("mm_token_type_ids") is not None or not bool(self.visual_mask(ids).any()):
            return
        raise ValueError(
            f"{self.family} got image or video tokens without `mm_token_type_ids`: transformers then silently "
            "gives visual tokens 1-D text positions instead of their M-RoPE (t, h, w) positions. Pass the "
            "`mm_token_type_ids` the processor returns (0 text, 1 image, 2 video) along with `input_ids`."
        )

    def default_positions(self, attention_mask, start: int, batch: int, length: int, device) -> torch.Tensor:
        """The text model's own default: columns counted from `start` (every row of M-RoPE alike)."""
        return torch.arange(start, start + length, device=device).expand(batch, length)

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if position_ids.dim() == 3 and position_ids.shape[0] == 4:  # row 0: text positions, for masks only
            position_ids = position_ids[1:]
        return super().rotary(hidden, position_ids)

    def image_layout(self, inputs: dict, visual: torch.Tensor) -> list[list[Grid]]:
        """Per sample, one grid per image and per video (or per frame, where frames are separate blocks)."""
        config = self.model.config
        merge = config.vision_config.spatial_merge_size
        queues, pending = {}, {}
        for token, key in ((config.image_token_id, "image_grid_thw"), (config.video_token_id, "video_grid_thw")):
            grids = inputs.get(key)
            queues[token] = [] if grids is None else [tuple(g) for g in grids.tolist()]
            pending[token] = [0, None]  # frames of the current video still to come as separate blocks

        def take(token: int, run: int) -> Grid:
            left, grid = pending[token]
            if left:
                pending[token][0] -= 1
            else:
                grid = queues[token].pop(0)
            t, rows, cols = grid[0], grid[1] // merge, grid[2] // merge
            if not left and run == t * rows * cols:
                return Grid(t, rows, cols)
            if run == rows * cols:
                if not left:
                    pending[token] = [t - 1, grid]
                return Grid(1, rows, cols)
            raise ValueError(f"a block of {run} visual tokens matches neither grid {grid} nor one of its frames")

        layout = []
        for row in inputs["input_ids"].tolist():
            grids, run, token = [], 0, None
            for value in [*row, None]:
                if value == token:
                    run += 1
                    continue
                if token in queues:
                    grids.append(take(token, run))
                token, run = value, 1
            layout.append(grids)
        return layout


class Qwen2VLAdapter(QwenVLAdapter):
    model_classes = ("Qwen2VLForConditionalGeneration",)
    decoder_layers = {"Qwen2VLDecoderLayer": "Qwen2VLAttention"}


class Qwen25VLAdapter(QwenVLAdapter):
    model_classes = ("Qwen2_5_VLForConditionalGeneration",)
    decoder_layers = {"Qwen2_5_VLDecoderLayer": "Qwen2_5_VLAttention"}


class Qwen3VLAdapter(QwenVLAdapter):
    model_classes = ("Qwen3VLForConditionalGeneration",)
    decoder_layers = {"Qwen3VLTextDecoderLayer": "Qwen3VLTextAttention"}  # q_norm / k_norm, re-projected

    def row_inputs(self, kwargs: dict, visual: torch.Tensor) -> dict[str, torch.Tensor]:
        """Deepstack features as dense [B, S, depth, H] rows (zero on text rows: adding zero changes nothing)."""
        where = kwargs.pop("visual_pos_masks", None)
        embeds = kwargs.pop("deepstack_visual_embeds", None)
        if embeds is None:
            return {}
        if where is None or not torch.equal(where.to(visual.device), visual):
            raise ValueError("Qwen3-VL deepstack: visual_pos_masks does not match the image and video tokens")
        batch, length = where.shape
        dense = torch.zeros(batch, length, len(embeds), embeds[0].shape[-1], dtype=embeds[0].dtype,
                            device=embeds[0].device)  # fmt: skip
        for depth, rows in enumerate(embeds):
            dense[:, :, depth][where.to(dense.device)] = rows
        return {"deepstack": dense}

    def after_layer(self, index: int, hidden: torch.Tensor, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        deepstack = rows.get("deepstack")
        if deepstack is None or index >= deepstack.shape[2]:
            return hidden
        return hidden + deepstack[:, :, index].to(hidden.dtype)

    def layer_kwargs(self, kwargs: dict) -> dict:
        kwargs = dict(kwargs)
        kwargs.pop("visual_pos_masks", None)
        kwargs.pop("deepstack_visual_embeds", None)  # decode forwards carry none; prefill popped them
        return super().layer_kwargs(kwargs)


FAMILIES = (Qwen2VLAdapter, Qwen25VLAdapter, Qwen3VLAdapter)
