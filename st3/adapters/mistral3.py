"""Mistral3 (Mistral Small 3.1 / 3.2, Ministral 3 with a Pixtral tower): a Pixtral vision tower, a patch merger
and a Mistral (or Llama) decoder.

What differs from LLaVA, and where it is handled:
- images keep their own size: an image is rows x cols merged patches (`image_sizes` // (patch x merge)), each
  row of image tokens followed by an `[IMG_BREAK]` text token, the last by `[IMG_END]`: an image is the next
  runs of image tokens that hold its count (`image_layout`), one `Grid(1, rows, cols)`.
- Mistral's `sliding_window` (4096 in the stock config): every layer slides, declared as LLaVA declares it (a
  window counts original columns; docs/families.md, Gemma 3 section).
- compression before the decoder (VisionZip) is refused: Pixtral has no [CLS] token to rank patches by.
"""

from __future__ import annotations

import torch
from torch import nn

from st3.adapters.base import Adapter, Grid
from st3.adapters.llava import LlavaAdapter


class Mistral3Adapter(Adapter):
    """`Mistral3ForConditionalGeneration` with a Mistral (sliding window or not) or Llama decoder."""

    model_classes = ("Mistral3ForConditionalGeneration",)
    decoder_layers = LlavaAdapter.decoder_layers
    layer_kinds = LlavaAdapter.layer_kinds
    layer_types = LlavaAdapter.layer_types  # the same decoders, so the same window convention
    mask_rule = LlavaAdapter.mask_rule

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    def visual_token_ids(self) -> tuple[int, ...]:
        return (self.model.config.image_token_id,)

    def image_layout(self, inputs: dict, visual: torch.Tensor, position_ids: torch.Tensor) -> list[list[Grid]]:
        """Per sample, one grid per image: the runs of image tokens (rows) that hold its token count.

        The counts come from `image_sizes` (a plain forward) or from the images generate encoded before the
        prefill (it drops `image_sizes`).
        """
        encoded = (inputs.get("mm_encoder_outputs") or {}).get("image")
        if inputs.get("image_sizes") is not None:
            merged = self.model.model.vision_tower.patch_size * self.model.config.spatial_merge_size
            counts = (inputs["image_sizes"] // merged).prod(-1).tolist()
        elif encoded is not None:
            counts = [len(features) for features in encoded.pooler_output]
        else:
            raise ValueError("neither image_sizes nor encoded images: the images' sizes are unknown")
        layout = []
        for row in visual.tolist():
            runs, run = [], 0
            for flag in row + [False]:
                if flag:
                    run += 1
                elif run:
                    runs.append(run)
                    run = 0
            grids = []
            while runs:
                if not counts:
                    raise ValueError("more image tokens than images")
                count, cols, rows = counts.pop(0), runs[0], 0
                while count > 0 and runs and runs[0] == cols:
                    count -= runs.pop(0)
                    rows += 1
                if count:
                    raise ValueError(f"an image's rows of {cols} image tokens do not hold its token count")
                grids.append(Grid(1, rows, cols))
            layout.append(grids)
        return layout
