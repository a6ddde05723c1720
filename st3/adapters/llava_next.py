"""LLaVA-NeXT (LLaVA-1.6): LLaVA's decoder, with "anyres" images (a base image plus a grid of tiles).

What differs from LLaVA-1.5, and where it is handled:
- an image is a base image (a square grid of patches) followed by its tiles stitched into one grid, the
  padding of the resized image cut away ("unpad"), each row ending with one `image_newline` token that sits
  in an image-token slot: the layout is two grids, the second with newline tokens (`image_layout`).
- the number of visual tokens varies per image with `image_sizes` (no fixed `tokens_per_image`).
- compression before the decoder (VisionZip) is refused: the tiles' patches are unpadded and interleaved
  with newline tokens, not LLaVA-1.5's one-to-one raster scatter.
"""

from __future__ import annotations

import torch
from torch import nn

from st3.adapters.base import Adapter, Grid
from st3.adapters.llava import LlavaAdapter


class LlavaNextAdapter(Adapter):
    """`LlavaNextForConditionalGeneration` with a Llama-style text model (Vicuna, Mistral, Llama 3, Qwen)."""

    model_classes = ("LlavaNextForConditionalGeneration",)
    decoder_layers = LlavaAdapter.decoder_layers
    compression_refused = (
        "LLaVA-NeXT has a [CLS] token, but it places its anyres tiles unpadded and interleaved with newline tokens, "
        "which that compression does not map"
    )

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    def visual_token_ids(self) -> tuple[int, ...]:
        return (self.model.config.image_token_id,)

    def image_grids(self, image_size) -> list[Grid]:
        """The grids of one image of `image_size` (height, width): base image, then its unpadded tiles."""
        from transformers.models.llava_next import modeling_llava_next as next_model

        config = self.model.config
        vision = config.vision_config
        side = self._side()
        tiles_h, tiles_w = next_model.get_anyres_image_grid_shape(
            image_size, config.image_grid_pinpoints, vision.image_size
        )
        stitched = torch.empty(0, tiles_h * side, tiles_w * side, device="meta")
        rows, cols = next_model.unpad_image(stitched, image_size).shape[1:]
        return [Grid(1, side, side), Grid(1, rows, cols, newline=self.model.model.image_newline is not None)]

    def grids_of_features(self, features: torch.Tensor) -> list[Grid]:
        """The grids of one image from its packed features [tokens, H] (what generate's pre-encoding keeps: it
        drops `image_sizes`): the rows after the base image that equal `image_newline` end the tile grid's rows."""
        side = self._side()
        newline = self.model.model.image_newline
        tiles = features[side * side :]
        ends = (tiles == newline.to(tiles)).all(-1).nonzero().squeeze(-1).tolist()
        rows = len(ends)
        width = len(tiles) // max(rows, 1)
        if not rows or ends != [y * width + width - 1 for y in range(rows)] or rows * width != len(tiles):
            raise ValueError(f"{len(features)} image features are no base image plus rows ended by newlines")
        return [Grid(1, side, side), Grid(1, rows, width - 1, newline=True)]

    def _side(self) -> int:
        config = self.model.config
        if config.vision_feature_select_strategy != "default":
            raise ValueError("the layout of an image with its [CLS] token kept (strategy 'full') is not a grid")
        return config.vision_config.image_size // config.vision_config.patch_size

    def image_layout(self, inputs: dict, visual: torch.Tensor, position_ids: torch.Tensor) -> list[list[Grid]]:
        """Per sample, the grids of its images in order (images are assigned to samples by token counts).

        From `image_sizes` (a plain forward), or from the pre-encoded features generate passes instead.
        """
        encoded = (inputs.get("mm_encoder_outputs") or {}).get("image")
        if inputs.get("image_sizes") is not None:
            images = [self.image_grids(size) for size in inputs["image_sizes"].tolist()]
        elif encoded is not None and isinstance(encoded.pooler_output, (list, tuple)):
            images = [self.grids_of_features(features) for features in encoded.pooler_output]
        else:
            raise ValueError("neither image_sizes nor encoded images: the anyres layout is unknown")
        layout, next_image = [], 0
        for count in visual.sum(-1).tolist():
            grids: list[Grid] = []
            while sum(g.tokens for g in grids) < count and next_image < len(images):
                grids += images[next_image]
                next_image += 1
            if sum(g.tokens for g in grids) != count:
                raise ValueError(f"{count} visual tokens are not whole anyres images")
            layout.append(grids)
        return layout
