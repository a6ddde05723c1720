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

from typing import TYPE_CHECKING

import torch
from torch import nn

import st3.adapters.build as build
from st3.adapters.base import Adapter, Grid
from st3.adapters.internvl import tile_runs
from st3.adapters.llava import LlavaAdapter

if TYPE_CHECKING:
    from st3.models import ModelSpec

SMOLVLM_IMAGE_TOKEN = 49153
"""SmolVLM-Instruct's `<image>` id (the stock Idefics3 config's 128257 lies beyond SmolVLM's vocabulary)."""


class Idefics3Adapter(Adapter):
    """`Idefics3ForConditionalGeneration` and `SmolVLMForConditionalGeneration` (Llama-style decoders)."""

    model_classes = ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")
    decoder_layers = LlavaAdapter.decoder_layers
    summary = (
        "Idefics3, SmolVLM",
        "`Idefics3ForConditionalGeneration`, `SmolVLMForConditionalGeneration` (crops)",
        "as LLaVA-NeXT (both a row of the family matrix)",
    )
    #: (text before, text after, crops): 16, 48 and 32 image tokens; the batch pads to 3 crops with all-zero ones.
    example_samples = ((4, 6, 1), (2, 9, 3), (5, 3, 2))

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.text_model

    def visual_token_ids(self) -> tuple[int, ...]:
        return (self.model.config.image_token_id,)

    def image_layout(self, inputs: dict, visual: torch.Tensor, position_ids: torch.Tensor) -> list[list[Grid]]:
        """Per sample, one square grid per run of image tokens (a crop or the global image)."""
        return tile_runs(visual, self.model.model.image_seq_len)

    # ----------------------------------------------------------------------------------- family facts
    @classmethod
    def tiny(cls, *, layers: int = 6, hidden: int = 64, attn: str = "sdpa", seed: int = 0, smolvlm: bool = False,
             **options) -> nn.Module:  # fmt: skip
        """An Idefics3 (or SmolVLM) model (SigLIP 32 px / patch 4, pixel shuffle 2: 16 tokens per crop, Llama
        decoder with GQA), fp32, eval mode."""
        import transformers as tf

        torch.manual_seed(seed)
        config_class, model_class, vision_class = (
            (tf.SmolVLMConfig, tf.SmolVLMForConditionalGeneration, tf.SmolVLMVisionConfig) if smolvlm
            else (tf.Idefics3Config, tf.Idefics3ForConditionalGeneration, tf.Idefics3VisionConfig)
        )  # fmt: skip
        config = config_class(
            vision_config=vision_class(**build.tiny_vision(32)),
            text_config=tf.LlamaConfig(**build.tiny_text(hidden, layers)),
            image_token_id=build.IMAGE_TOKEN, scale_factor=2, pad_token_id=build.PAD_TOKEN,
        )  # fmt: skip
        return build.finish(model_class(config), attn)

    @classmethod
    def tiny_inputs(cls, model: nn.Module, samples=None, seed: int = 0) -> dict[str, torch.Tensor]:
        """A left-padded batch built without a processor: per sample (text before, text after, crops).

        Each crop is `image_seq_len` image tokens after two text tokens (as `<fake_token_around_image><row_i_col_j>`
        precede it); pixel values are random crops padded with all-zero crops to the batch's most, with an
        all-ones `pixel_attention_mask`.
        """
        samples = samples or cls.example_samples
        generator = torch.Generator().manual_seed(seed)
        config = model.config
        size = config.vision_config.image_size
        per_crop = model.model.image_seq_len

        def text(n: int) -> torch.Tensor:
            return torch.randint(build.IMAGE_TOKEN + 1, config.text_config.vocab_size, (n,), generator=generator)

        rows = []
        for before, after, crops in samples:
            pieces = [text(before)]
            for _ in range(crops):
                pieces += [text(2), torch.full((per_crop,), build.IMAGE_TOKEN)]
            rows.append(torch.cat(pieces + [text(1 + after)]))
        most = max(crops for _, _, crops in samples)
        input_ids, attention_mask = build.left_padded(rows)
        out = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": torch.zeros(len(rows), most, 3, size, size),
            "pixel_attention_mask": torch.ones(len(rows), most, size, size, dtype=torch.bool),
        }
        for i, (_, _, crops) in enumerate(samples):
            out["pixel_values"][i, :crops] = torch.randn(crops, 3, size, size, generator=generator)
        return out

    @classmethod
    def tiny_processor(cls, model: nn.Module):
        """`Idefics3Processor` with its PIL image processor cutting images into crops of the tiny tower's size (up to
        2 x 2 and the global image), its image and crop tokens special; SmolVLM's processor needs torchvision."""
        from transformers import Idefics3ImageProcessorPil, Idefics3Processor

        if type(model).__name__.startswith("SmolVLM"):
            raise NotImplementedError("SmolVLMProcessor has a video processor, which needs torchvision")
        config = model.config
        side = config.vision_config.image_size
        crops = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
        specials = ["<pad>", "<unk>", "<s>", "<image>", "<fake_token_around_image>", "<global-img>",
                    "<end_of_utterance>", *crops]  # fmt: skip
        tokenizer = build.word_tokenizer(specials, config.text_config.vocab_size)
        images = Idefics3ImageProcessorPil(size={"longest_edge": 2 * side}, max_image_size={"longest_edge": side})
        return Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=_per_crop(config),
                                 chat_template=build.chat_template("<image>"))  # fmt: skip

    @classmethod
    def real_config(cls, spec: ModelSpec):
        """The spec's decoder and SigLIP tower, pixel shuffle 3 (SmolVLM-Instruct's: 81 tokens per 384 px crop)."""
        import transformers as tf

        smol = spec.architecture == "SmolVLMForConditionalGeneration"
        config_class, vision_class = ((tf.SmolVLMConfig, tf.SmolVLMVisionConfig) if smol
                                      else (tf.Idefics3Config, tf.Idefics3VisionConfig))  # fmt: skip
        return config_class(
            vision_config=vision_class(**build.vision_dims(spec)),
            text_config=build.text_config_class(spec.text_model)(**build.text_dims(spec)),
            scale_factor=3, image_token_id=SMOLVLM_IMAGE_TOKEN, pad_token_id=build.PAD_TOKEN,
        )  # fmt: skip

    @classmethod
    def image_tokens(cls, config, size: tuple[int, int]) -> int:
        """Crops x tokens per crop for an image whose sides are multiples of the crop: rows x cols crops, plus the
        global image when there are several (as the processor splits it)."""
        vision = config.vision_config
        crop = vision.image_size
        crops = (size[0] // crop) * (size[1] // crop)
        if size[0] % crop or size[1] % crop or not crops:
            raise ValueError(f"an image of {size[0]} x {size[1]} px is no grid of {crop} px crops")
        return (crops + int(crops > 1)) * _per_crop(config)

    def bench_inputs(self, size, batch_size, text_before, text_after, generator) -> dict[str, torch.Tensor]:
        """Text, then per crop two text tokens (`<fake_token_around_image><row_i_col_j>`) and its image tokens, then
        text; the crops' pixels and an all-ones `pixel_attention_mask`."""
        config = self.model.config
        per_crop = _per_crop(config)
        crops = self.image_tokens(config, size) // per_crop
        image = torch.cat([torch.tensor([1, 1] + [config.image_token_id] * per_crop)] * crops)
        ids, mask = build.bench_prompt(image, batch_size, text_before, text_after, config.text_config.vocab_size,
                                       self.visual_token_ids(), generator)  # fmt: skip
        side = config.vision_config.image_size
        return {"input_ids": ids, "attention_mask": mask,
                "pixel_values": torch.randn(batch_size, crops, 3, side, side, generator=generator),
                "pixel_attention_mask": torch.ones(batch_size, crops, side, side, dtype=torch.bool)}  # fmt: skip


def _per_crop(config) -> int:
    """Tokens per crop: the crop's patches, `scale_factor`^2 of them shuffled into one token."""
    vision = config.vision_config
    return (vision.image_size // vision.patch_size) ** 2 // config.scale_factor**2
