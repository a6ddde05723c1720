"""Idefics3 and SmolVLM: a SigLIP tower, pixel shuffle and a linear connector in front of a Llama decoder at
`model.model.text_model`.

What differs from LLaVA, and where it is handled:
- the decoder stack is `model.model.text_model` (not `language_model`).
- an image is split by the processor into crops plus a global image, each `image_seq_len` image tokens (a
  square grid of pixel-shuffled patches) between text tokens (`<fake_token_around_image>`, `<row_i_col_j>`,
  `<global-img>`): each run of image tokens is one crop, `Grid(1, side, side)` (`tile_runs`). All-zero padding
  crops never reach the decoder; `pixel_attention_mask` stays with the vision tower.
- compression before the decoder (VisionZip) is refused: SigLIP has no [CLS] token to rank patches by.
"""

from __future__ import annotations

import torch
from torch import nn

from st3.adapters.base import Adapter, Grid
from st3.adapters.internvl import tile_runs
from st3.adapters.llava import LlavaAdapter


class Idefics3Adapter(Adapter):
    """`Idefics3ForConditionalGeneration` and `SmolVLMForConditionalGeneration` (Llama-style decoders)."""

    model_classes = ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")
    decoder_layers = LlavaAdapter.decoder_layers

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.text_model

    def visual_token_ids(self) -> tuple[int, ...]:
        return (self.model.config.image_token_id,)

    def image_layout(self, inputs: dict, visual: torch.Tensor, position_ids: torch.Tensor) -> list[list[Grid]]:
        """Per sample, one square grid per run of image tokens (a crop or the global image)."""
        return tile_runs(visual, self.model.model.image_seq_len)
