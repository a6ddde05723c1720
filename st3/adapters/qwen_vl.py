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


class QwenVLAdapter(Adapter):
    """The shared Qwen-VL decoder adapter; the family classes below only name their classes."""

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    def visual_token_ids(self) -> tuple[int, ...]:
        config = self.model.config
        return (config.image_token_id, config.video_token_id)

    def check_inputs(self, kwargs: dict, continuing: bool) -> None:
        if continuing and kwargs.get("position_ids") is None:
            raise ValueError(
                f"{self.model_name} would derive the new tokens' M-RoPE positions from the cache length, which a "
                "pruned cache does not equal (and from a full-width attention_mask transformers 5.24 builds "
                "positions of the wrong width); pass `position_ids` [4, batch, new tokens] to every forward that "
                "continues a pruned cache, as generate does"
            )
        ids = kwargs.get("input_ids")
        if ids is None or kwargs.get("mm_token_type_ids") is not None or not bool(self.visual_mask(ids).any()):
            return
        raise ValueError(
            f"{self.model_name} got image or video tokens without `mm_token_type_ids`: transformers then silently "
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

    def image_layout(self, inputs: dict, visual: torch.Tensor, position_ids: torch.Tensor) -> list[list[Grid]]:
        """Per sample, one grid per contiguous block of image or video tokens, read off its M-RoPE positions.

        The positions are the geometry (generate passes no `image_grid_thw` to the forward in 5.24): a block's
        distinct temporal / height / width positions are its frames / rows / columns.
        """
        if position_ids.dim() != 3 or position_ids.shape[0] < 3:
            raise ValueError("no M-RoPE positions: the image layout is unknown")
        thw = position_ids[-3:]
        ids = inputs["input_ids"]
        layout = []
        for b in range(ids.shape[0]):
            columns = visual[b].nonzero().squeeze(-1).tolist()
            blocks, grids = [], []
            for column in columns:  # contiguous runs of one visual token id
                if blocks and column == blocks[-1][-1] + 1 and ids[b, column] == ids[b, blocks[-1][-1]]:
                    blocks[-1].append(column)
                else:
                    blocks.append([column])
            for block in blocks:
                t, h, w = (len(torch.unique(thw[axis, b, block])) for axis in range(3))
                if t * h * w != len(block):
                    raise ValueError(f"a block of {len(block)} visual tokens is no {t} x {h} x {w} grid")
                grids.append(Grid(t, h, w))
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

    def stock_inputs(self, visual: torch.Tensor, rows: dict[str, torch.Tensor]) -> dict:
        """Deepstack back in the decoder's own form: the surviving visual rows' mask and features, per depth."""
        deepstack = rows.get("deepstack")
        if deepstack is None:
            return {}
        return {"visual_pos_masks": visual,
                "deepstack_visual_embeds": [deepstack[:, :, d][visual] for d in range(deepstack.shape[2])]}  # fmt: skip

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

