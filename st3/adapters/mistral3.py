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

import st3.adapters.build as build
from st3.adapters.base import Adapter, Grid, tower_square
from st3.adapters.llava import LlavaAdapter

MISTRAL_BREAK, MISTRAL_END = 4, 5
"""The tiny Mistral3's `[IMG_BREAK]` and `[IMG_END]` tokens."""


class Mistral3Adapter(Adapter):
    """`Mistral3ForConditionalGeneration` with a Mistral (sliding window or not) or Llama decoder."""

    model_classes = ("Mistral3ForConditionalGeneration",)
    decoder_layers = LlavaAdapter.decoder_layers
    layer_kinds = LlavaAdapter.layer_kinds
    layer_types = LlavaAdapter.layer_types  # the same decoders, so the same window convention
    mask_rule = LlavaAdapter.mask_rule
    summary = (
        "Mistral3",
        "`Mistral3ForConditionalGeneration` (Pixtral tower)",
        "supported, its sliding window included (declared as LLaVA's Mistral; proven with a 16-column window); "
        "attention ranking refused where every layer slides; otherwise as LLaVA-NeXT",
    )
    #: (text before, text after, image (height, width)): 4 x 6, 6 x 6 and 8 x 5 merged patches (24, 36, 40 tokens).
    example_samples = ((4, 6, (32, 48)), (2, 9, (48, 48)), (5, 3, (64, 40)))

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

    # ----------------------------------------------------------------------------------- family facts
    @classmethod
    def tiny(cls, *, layers: int = 6, hidden: int = 64, attn: str = "sdpa", seed: int = 0, **text_overrides):
        """A Mistral3 model (Pixtral tower up to 64 px / patch 4, merge 2, Mistral decoder with GQA and, unless
        `text_overrides` set one, no sliding window), fp32, eval mode."""
        import transformers as tf

        torch.manual_seed(seed)
        text = build.tiny_text(hidden, layers, sliding_window=None)
        config = tf.Mistral3Config(
            vision_config=tf.PixtralVisionConfig(**build.tiny_vision(64)),
            text_config=tf.MistralConfig(**(text | text_overrides)),
            image_token_index=build.IMAGE_TOKEN, spatial_merge_size=2, pad_token_id=build.PAD_TOKEN,
        )  # fmt: skip
        return build.finish(tf.Mistral3ForConditionalGeneration(config), attn)

    @classmethod
    def tiny_inputs(cls, model: nn.Module, samples=None, seed: int = 0) -> dict[str, torch.Tensor]:
        """A left-padded batch built without a processor (Pixtral's needs torchvision): per sample (text before, text
        after, (height, width) in pixels). Each row of merged patches is followed by `[IMG_BREAK]`, the last by
        `[IMG_END]`; pixel values are random images zero-padded to the batch's largest, with `image_sizes`."""
        samples = samples or cls.example_samples
        generator = torch.Generator().manual_seed(seed)
        config = model.config
        merged = config.vision_config.patch_size * config.spatial_merge_size
        sizes = torch.tensor([size for _, _, size in samples])
        height, width = (int(v) for v in sizes.max(0).values)
        pixel_values = torch.zeros(len(samples), 3, height, width)
        rows = []
        for i, (before, after, (h, w)) in enumerate(samples):
            pixel_values[i, :, :h, :w] = torch.randn(3, h, w, generator=generator)
            text = torch.randint(MISTRAL_END + 1, config.text_config.vocab_size, (before + after,), generator=generator)
            image = []
            for r in range(h // merged):
                image += [build.IMAGE_TOKEN] * (w // merged) + [MISTRAL_END if r == h // merged - 1 else MISTRAL_BREAK]
            rows.append(torch.cat([text[:before], torch.tensor(image), text[before:]]))
        input_ids, attention_mask = build.left_padded(rows)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
                "image_sizes": sizes}  # fmt: skip

    @classmethod
    def tiny_processor(cls, model: nn.Module):
        raise NotImplementedError("PixtralProcessor needs torchvision")

    @classmethod
    def image_tokens(cls, config, size: tuple[int, int]) -> int:
        """Merged patches of an image within the tower's size (its sides multiples of patch x merge)."""
        merged = config.vision_config.patch_size * config.spatial_merge_size
        return (size[0] // merged) * (size[1] // merged)

    @classmethod
    def typical_image(cls, config) -> tuple[int, int]:
        """The tower's largest image (1024 x 1024 px for Pixtral: 1024 tokens)."""
        return tower_square(config)
