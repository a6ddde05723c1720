"""InternVL (2.5, 3, 3.5 in the Hugging Face format): an InternViT tower, pixel shuffle and an MLP projector in
front of a Qwen2 / Qwen3 / Llama decoder.

What differs from LLaVA, and where it is handled:
- an image is cut by the processor into tiles (plus a thumbnail), each `image_seq_length` tokens: a square grid
  of the pixel-shuffled patches. The tiles of one image are consecutive image tokens between `<img>` and
  `</img>` (text tokens), so each run of image tokens is one image: `Grid(tiles, side, side)`, a tile per
  frame (the tiles' arrangement on the image is the processor's and does not reach the model). A video is a
  run per frame.
- `image_sizes=None` reaches the decoder's keyword arguments; no layer takes it.
- compression before the decoder (VisionZip) is refused: the tower's features are pixel-shuffled four to a
  token, so no [CLS] attention ranks the tokens the decoder sees.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from st3.adapters.base import Adapter, Grid
from st3.adapters.llava import LlavaAdapter


class InternVLAdapter(Adapter):
    """`InternVLForConditionalGeneration` with a Llama-style decoder (Qwen2, Qwen3, Llama)."""

    model_classes = ("InternVLForConditionalGeneration",)
    decoder_layers = LlavaAdapter.decoder_layers
    ignored_kwargs = ("image_sizes",)
    compression_refused = (
        "InternVL merges four patches into each token it feeds the decoder (pixel shuffle), so no [CLS] attention "
        "ranks them"
    )

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    def visual_token_ids(self) -> tuple[int, ...]:
        return (self.model.config.image_token_id,)

    def tokens_per_image(self) -> None:
        return None  # tiles x image_seq_length: the processor sets the tiles per image

    def image_layout(self, inputs: dict, visual: torch.Tensor, position_ids: torch.Tensor) -> list[list[Grid]]:
        """Per sample, one grid per run of image tokens: its tiles as frames of a square grid."""
        return tile_runs(visual, self.model.config.image_seq_length)


def tile_runs(visual: torch.Tensor, per_tile: int) -> list[list[Grid]]:
    """Per sample of `visual` [B, S], a `Grid(tiles, side, side)` per run of visual tokens (side^2 = per_tile)."""
    side = math.isqrt(per_tile)
    if side * side != per_tile:
        raise ValueError(f"{per_tile} tokens per tile are no square grid")
    layout = []
    for row in visual.tolist():
        grids, run = [], 0
        for flag in row + [False]:
            if flag:
                run += 1
                continue
            if run:
                if run % per_tile:
                    raise ValueError(f"a run of {run} image tokens is no whole number of {per_tile}-token tiles")
                grids.append(Grid(run // per_tile, side, side))
            run = 0
        layout.append(grids)
    return layout
