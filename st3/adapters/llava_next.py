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

from typing import TYPE_CHECKING

import torch
from torch import nn

import st3.adapters.build as build
from st3.adapters.base import Adapter, Grid
from st3.adapters.llava import LLAVA_IMAGE_TOKEN, LlavaAdapter

if TYPE_CHECKING:
    from st3.models import ModelSpec


class LlavaNextAdapter(Adapter):
    """`LlavaNextForConditionalGeneration` with a Llama-style text model (Vicuna, Mistral, Llama 3, Qwen)."""

    model_classes = ("LlavaNextForConditionalGeneration",)
    decoder_layers = LlavaAdapter.decoder_layers
    compression_refused = (
        "LLaVA-NeXT has a [CLS] token, but it places its anyres tiles unpadded and interleaved with newline tokens, "
        "which that compression does not map"
    )
    summary = (
        "LLaVA-NeXT",
        "`LlavaNextForConditionalGeneration` (anyres tiles, newline tokens)",
        "supported, proven by the family matrix on tiny models; VisionZip refused; no real checkpoint run here",
    )
    #: (text before, text after, image (height, width)): 30, 37 and 51 visual tokens (base 3 x 3 + tiles + newlines).
    example_samples = ((4, 6, (12, 24)), (2, 9, (16, 24)), (5, 3, (24, 24)))

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    def visual_token_ids(self) -> tuple[int, ...]:
        return (self.model.config.image_token_id,)

    def image_grids(self, image_size) -> list[Grid]:
        """The grids of one image of `image_size` (height, width): base image, then its unpadded tiles."""
        return anyres_grids(self.model.config, image_size, self._side())

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

    # ----------------------------------------------------------------------------------- family facts
    @classmethod
    def tiny(cls, *, layers: int = 6, hidden: int = 64, attn: str = "sdpa", seed: int = 0, **options) -> nn.Module:
        """A LLaVA-NeXT model (CLIP tower 12 px / patch 4, anyres tiles up to 2 x 2, Llama decoder with GQA), fp32."""
        import transformers as tf

        torch.manual_seed(seed)
        config = tf.LlavaNextConfig(
            vision_config=tf.CLIPVisionConfig(**build.tiny_vision(12)),
            text_config=tf.LlamaConfig(**build.tiny_text(hidden, layers)),
            image_grid_pinpoints=[[12, 24], [24, 12], [24, 24]], image_token_index=build.IMAGE_TOKEN,
            vision_feature_layer=-2, vision_feature_select_strategy="default", pad_token_id=build.PAD_TOKEN,
        )  # fmt: skip
        return build.finish(tf.LlavaNextForConditionalGeneration(config), attn)

    @classmethod
    def tiny_inputs(cls, model: nn.Module, samples=None, seed: int = 0) -> dict[str, torch.Tensor]:
        """A left-padded batch built without a processor: per sample (text before, text after, (height, width)).

        Each sample has one image of that size in pixels; its crops (base image + anyres tiles) are random pixels
        padded to the batch's most crops, as the processor pads them, and its number of image tokens is the
        model's own feature count for that size.
        """
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        samples = samples or cls.example_samples
        generator = torch.Generator().manual_seed(seed)
        config = model.config
        side = config.vision_config.image_size
        sizes = torch.tensor([size for _, _, size in samples])
        crops = [image_size_to_num_patches(size, config.image_grid_pinpoints, side) for size in sizes.tolist()]
        pixel_values = torch.zeros(len(samples), max(crops), 3, side, side)
        for i, n in enumerate(crops):
            pixel_values[i, :n] = torch.randn(n, 3, side, side, generator=generator)
        with torch.no_grad():
            features = model.model.get_image_features(pixel_values, sizes).pooler_output
        rows = []
        vocab = config.text_config.vocab_size
        for (before, after, _), image in zip(samples, features):
            text = torch.randint(build.IMAGE_TOKEN + 1, vocab, (before + after,), generator=generator)
            rows.append(torch.cat([text[:before], torch.full((len(image),), build.IMAGE_TOKEN), text[before:]]))
        input_ids, attention_mask = build.left_padded(rows)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
                "image_sizes": sizes}  # fmt: skip

    @classmethod
    def tiny_processor(cls, model: nn.Module):
        """`LlavaNextProcessor` with its PIL image processor at the tiny tower's size and pinpoints."""
        from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

        config = model.config
        side, patch = config.vision_config.image_size, config.vision_config.patch_size
        images = LlavaNextImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                                            image_grid_pinpoints=config.image_grid_pinpoints)  # fmt: skip
        tokenizer = build.word_tokenizer(["<pad>", "<unk>", "<s>", "<image>"], config.text_config.vocab_size)
        return LlavaNextProcessor(image_processor=images, tokenizer=tokenizer, patch_size=patch,
                                  vision_feature_select_strategy=config.vision_feature_select_strategy,
                                  chat_template=build.chat_template("<image>"), image_token="<image>",
                                  num_additional_image_tokens=1)  # fmt: skip

    @classmethod
    def real_config(cls, spec: ModelSpec):
        """LLaVA-NeXT's anyres pinpoints (the stock config's: 336 px tiles up to 672 x 672 or 1008 x 336) with the
        spec's decoder and CLIP tower; the feature layer and strategy of the 1.6 checkpoints (-2, default)."""
        import transformers as tf

        return tf.LlavaNextConfig(
            vision_config=tf.CLIPVisionConfig(**build.vision_dims(spec)),
            text_config=build.text_config_class(spec.text_model)(**build.text_dims(spec)),
            image_token_index=LLAVA_IMAGE_TOKEN, vision_feature_layer=spec.feature_layer,
            vision_feature_select_strategy="default", pad_token_id=build.PAD_TOKEN,
        )  # fmt: skip

    @classmethod
    def image_tokens(cls, config, size: tuple[int, int]) -> int:
        """Base grid + unpadded tiles with one newline per row, as the model packs them."""
        vision = config.vision_config
        return sum(g.tokens for g in anyres_grids(config, size, vision.image_size // vision.patch_size))

    def bench_inputs(self, size, batch_size, text_before, text_after, generator) -> dict[str, torch.Tensor]:
        """Text, one anyres image's tokens (newlines included), text; its crops and `image_sizes`."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        config = self.model.config
        side = config.vision_config.image_size
        crops = image_size_to_num_patches(list(size), config.image_grid_pinpoints, side)
        image = torch.full((self.image_tokens(config, size),), config.image_token_id)
        ids, mask = build.bench_prompt(image, batch_size, text_before, text_after, config.text_config.vocab_size,
                                       self.visual_token_ids(), generator)  # fmt: skip
        return {"input_ids": ids, "attention_mask": mask,
                "pixel_values": torch.randn(batch_size, crops, 3, side, side, generator=generator),
                "image_sizes": torch.tensor([list(size)] * batch_size)}  # fmt: skip


def anyres_grids(config, image_size, side: int) -> list[Grid]:
    """LLaVA-NeXT's grids of one image of `image_size` (height, width): a base grid of `side` x `side` patches, then
    its tiles stitched into one grid, the resized image's padding cut away, each row ended by a newline."""
    from transformers.models.llava_next import modeling_llava_next as next_model

    vision = config.vision_config
    tiles_h, tiles_w = next_model.get_anyres_image_grid_shape(
        list(image_size), config.image_grid_pinpoints, vision.image_size
    )
    stitched = torch.empty(0, tiles_h * side, tiles_w * side, device="meta")
    rows, cols = next_model.unpad_image(stitched, list(image_size)).shape[1:]
    return [Grid(1, side, side), Grid(1, rows, cols, newline=True)]
