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
from typing import TYPE_CHECKING

import torch
from torch import nn

import st3.adapters.build as build
from st3.adapters.base import Adapter, Grid
from st3.adapters.llava import LlavaAdapter

if TYPE_CHECKING:
    from st3.models import ModelSpec

INTERNVL_START, INTERNVL_END = 4, 5
"""The tiny InternVL's `<img>` and `</img>` tokens."""


class InternVLAdapter(Adapter):
    """`InternVLForConditionalGeneration` with a Llama-style decoder (Qwen2, Qwen3, Llama)."""

    model_classes = ("InternVLForConditionalGeneration",)
    decoder_layers = LlavaAdapter.decoder_layers
    ignored_kwargs = ("image_sizes",)
    compression_refused = (
        "InternVL merges four patches into each token it feeds the decoder (pixel shuffle), so no [CLS] attention "
        "ranks them"
    )
    summary = ("InternVL", "`InternVLForConditionalGeneration` (tiles)", "as LLaVA-NeXT")
    #: (text before, text after, tiles per image): 16, 48 (three tiles) and 32 (two images of one tile) image tokens.
    example_samples = ((4, 6, [1]), (2, 9, [3]), (5, 3, [1, 1]))

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


    # ----------------------------------------------------------------------------------- family facts
    @classmethod
    def tiny(cls, *, layers: int = 6, hidden: int = 64, attn: str = "sdpa", seed: int = 0, **options) -> nn.Module:
        """An InternVL model (InternViT 32 px / patch 4, pixel shuffle 0.5: 16 tokens per tile, Qwen2 decoder), fp32."""
        import transformers as tf

        torch.manual_seed(seed)
        config = tf.InternVLConfig(
            vision_config=tf.InternVLVisionConfig(**build.tiny_vision(32)),
            text_config=tf.Qwen2Config(**build.tiny_text(hidden, layers)),
            image_token_id=build.IMAGE_TOKEN, image_seq_length=16, downsample_ratio=0.5, pad_token_id=build.PAD_TOKEN,
        )  # fmt: skip
        return build.finish(tf.InternVLForConditionalGeneration(config), attn)

    @classmethod
    def tiny_inputs(cls, model: nn.Module, samples=None, seed: int = 0) -> dict[str, torch.Tensor]:
        """A left-padded batch built without a processor: per sample (text before, text after, tiles per image).

        Each image is `<img>` + tiles x `image_seq_length` image tokens + `</img>`, images separated by a text token
        (as the processor writes "Frame2:" between a video's frames); pixel values are random, one per tile.
        """
        generator = torch.Generator().manual_seed(seed)
        config = model.config
        size = config.vision_config.image_size[0]

        def text(n: int) -> torch.Tensor:
            return torch.randint(INTERNVL_END + 1, config.text_config.vocab_size, (n,), generator=generator)

        rows, tiles = [], 0
        for before, after, images in samples or cls.example_samples:
            pieces = [text(before)]
            for i, n in enumerate(images):
                pieces += [text(1)] if i else []
                image = torch.full((n * config.image_seq_length,), build.IMAGE_TOKEN)
                pieces += [torch.tensor([INTERNVL_START]), image, torch.tensor([INTERNVL_END])]
                tiles += n
            rows.append(torch.cat(pieces + [text(after)]))
        input_ids, attention_mask = build.left_padded(rows)
        pixel_values = torch.randn(tiles, 3, size, size, generator=generator)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}

    @classmethod
    def tiny_processor(cls, model: nn.Module):
        raise NotImplementedError("InternVLProcessor has a video processor, which needs torchvision")

    @classmethod
    def real_config(cls, spec: ModelSpec):
        """The spec's decoder and an InternViT tower of its width, pixel shuffle 0.5: (side / 2)^2 tokens per tile
        (256 at 448 px, patch 14); the hf checkpoints' image token id."""
        import transformers as tf

        side = spec.image_size // spec.patch_size
        vision = build.vision_dims(spec) | dict(image_size=[spec.image_size] * 2, patch_size=[spec.patch_size] * 2)
        return tf.InternVLConfig(
            vision_config=tf.InternVLVisionConfig(**vision),
            text_config=build.text_config_class(spec.text_model)(**build.text_dims(spec)),
            image_seq_length=(side // 2) ** 2, downsample_ratio=0.5, pad_token_id=build.PAD_TOKEN,
        )  # fmt: skip

    @classmethod
    def image_tokens(cls, config, size: tuple[int, int]) -> int:
        """Tiles x `image_seq_length` for an image whose sides are multiples of the tile (at most 12 tiles, as the
        processor cuts it: rows x cols tiles, plus a thumbnail when there are several)."""
        tile = config.vision_config.image_size[0]
        tiles = (size[0] // tile) * (size[1] // tile)
        if size[0] % tile or size[1] % tile or not 1 <= tiles <= 12:
            raise ValueError(f"an image of {size[0]} x {size[1]} px is no grid of 1 to 12 tiles of {tile} px")
        return (tiles + int(tiles > 1)) * config.image_seq_length

    def bench_inputs(self, size, batch_size, text_before, text_after, generator) -> dict[str, torch.Tensor]:
        """Text, `<img>`, the image's tiles' tokens, `</img>` (text tokens here), text; one pixel tile per tile."""
        config = self.model.config
        visual = self.image_tokens(config, size)
        image = torch.full((visual,), config.image_token_id)
        ids, mask = build.bench_prompt(image, batch_size, text_before, text_after, config.text_config.vocab_size,
                                       self.visual_token_ids(), generator)  # fmt: skip
        side = config.vision_config.image_size[0]
        tiles = batch_size * visual // config.image_seq_length
        return {"input_ids": ids, "attention_mask": mask,
                "pixel_values": torch.randn(tiles, 3, side, side, generator=generator)}  # fmt: skip


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
