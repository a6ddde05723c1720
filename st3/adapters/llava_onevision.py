"""LLaVA-OneVision: a SigLIP tower (no [CLS]) in front of a Qwen2 decoder; anyres images and videos.

What differs from LLaVA-NeXT, and where it is handled:
- images: a base grid, then the unpadded tile grid shrunk (bilinear) to at most `anyres_max_N` base grids'
  area, one newline per row; an image of a multi-image sample (`batch_num_images` > 1) is its base grid
  followed by one newline token. Videos: each frame's grid pooled 2 x 2, frames in order, then one newline.
- visual tokens are `image_token_id` and `video_token_id`; each sample's runs of them are matched to its images
  and videos in prompt order (`image_layout`).
- `logits_to_keep` reaches the decoder's keyword arguments; no layer takes it.
- compression before the decoder (VisionZip) is refused: SigLIP has no [CLS] token to rank patches by.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

import st3.adapters.build as build
from st3.adapters.base import Adapter, Grid
from st3.adapters.llava_next import LlavaNextAdapter, anyres_grids

if TYPE_CHECKING:
    from st3.models import ModelSpec

OV_IMAGE, OV_VIDEO = 3, 4
"""The tiny LLaVA-OneVision's image and video tokens."""

#: A newline token on its own (after a whole image or video): one row of no patches, ended by a newline.
NEWLINE = Grid(1, 1, 0, newline=True)


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """`LlavaOnevisionForConditionalGeneration` (Qwen2 decoder; Llama-style decoders also accepted)."""

    model_classes = ("LlavaOnevisionForConditionalGeneration",)
    ignored_kwargs = ("logits_to_keep",)
    compression_refused = Adapter.compression_refused  # SigLIP: no [CLS] token
    summary = (
        "LLaVA-OneVision",
        "`LlavaOnevisionForConditionalGeneration` (images and video)",
        "as LLaVA-NeXT (VisionZip refused: SigLIP has no [CLS])",
    )
    #: (text before, text after, kind, (height, width) or frames): 30 and 29 image tokens (the second's 6 x 6 tiles
    #: shrunk to 4 x 4 by anyres_max_2), a video of 4 frames of 2 x 2 pooled patches plus a newline (17).
    example_samples = ((4, 6, "image", (12, 24)), (2, 9, "image", (24, 24)), (5, 3, "video", 4))

    def visual_token_ids(self) -> tuple[int, ...]:
        config = self.model.config
        return (config.image_token_id, config.video_token_id)

    def _side(self) -> int:
        vision = self.model.config.vision_config
        return vision.image_size // vision.patch_size  # SigLIP: every patch is a feature (strategy "full")

    def image_grids(self, image_size, patched: bool = True, aspect: str | None = None) -> list[Grid]:
        """The grids of one image of `image_size` (height, width), as `pack_image_features` lays it out."""
        return onevision_grids(self.model.config, image_size, patched, aspect)

    def grids_of_features(self, features: torch.Tensor) -> list[Grid]:
        side = self._side()
        if len(features) == side * side + 1:
            return [Grid(1, side, side), NEWLINE]
        return super().grids_of_features(features)

    def video_grids(self, tokens: int) -> list[Grid]:
        """The grids of one video of `tokens` visual tokens: frames of the pooled grid, then one newline."""
        pooled = math.ceil(self._side() / 2)
        frames, rest = divmod(tokens - 1, pooled * pooled)
        if rest or frames < 1:
            raise ValueError(f"{tokens} video tokens are no frames of {pooled} x {pooled} plus a newline")
        return [Grid(frames, pooled, pooled), NEWLINE]

    def image_layout(self, inputs: dict, visual: torch.Tensor, position_ids: torch.Tensor) -> list[list[Grid]]:
        """Per sample, the grids of its images and videos in prompt order (matched by token id and count)."""
        encoded = inputs.get("mm_encoder_outputs") or {}
        images: list[list[Grid]] = []
        if inputs.get("image_sizes") is not None and inputs.get("pixel_values") is not None:
            counts = inputs.get("batch_num_images")
            sizes = inputs["image_sizes"].tolist()
            patched = [True] * len(sizes) if counts is None else [n == 1 for n in counts.tolist() for _ in range(n)]
            aspect = inputs.get("vision_aspect_ratio")
            images = [self.image_grids(size, p, aspect) for size, p in zip(sizes, patched)]
        elif encoded.get("image") is not None:
            images = [self.grids_of_features(features) for features in encoded["image"].pooler_output]
        if encoded.get("video") is not None:
            videos = [self.video_grids(len(features)) for features in encoded["video"].pooler_output]
        elif inputs.get("pixel_values_videos") is not None:
            pooled = math.ceil(self._side() / 2)
            shape = inputs["pixel_values_videos"].shape
            videos = [self.video_grids(shape[1] * pooled * pooled + 1)] * shape[0]
        else:
            videos = []
        queues = {self.model.config.image_token_id: images, self.model.config.video_token_id: videos}
        ids = inputs["input_ids"]
        layout = []
        for b in range(ids.shape[0]):
            grids: list[Grid] = []
            for token, count in runs(ids[b][visual[b]].tolist()):
                covered = 0
                while covered < count and queues[token]:
                    part = queues[token].pop(0)
                    grids += part
                    covered += sum(g.tokens for g in part)
                if covered != count:
                    raise ValueError(f"a run of {count} visual tokens is not whole images or videos")
            layout.append(grids)
        return layout


    # ----------------------------------------------------------------------------------- family facts
    @classmethod
    def tiny(cls, *, layers: int = 6, hidden: int = 64, attn: str = "sdpa", seed: int = 0, **options) -> nn.Module:
        """A LLaVA-OneVision model (SigLIP tower 12 px / patch 4, anyres_max_2 so large tile grids shrink, Qwen2
        decoder with GQA), fp32, eval mode."""
        import transformers as tf

        torch.manual_seed(seed)
        config = tf.LlavaOnevisionConfig(
            vision_config=tf.SiglipVisionConfig(**build.tiny_vision(12)),
            text_config=tf.Qwen2Config(**build.tiny_text(hidden, layers)),
            image_grid_pinpoints=[[12, 24], [24, 12], [24, 24]], image_token_index=OV_IMAGE, video_token_index=OV_VIDEO,
            vision_aspect_ratio="anyres_max_2", vision_feature_layer=-1, vision_feature_select_strategy="full",
            pad_token_id=build.PAD_TOKEN,
        )  # fmt: skip
        return build.finish(tf.LlavaOnevisionForConditionalGeneration(config), attn)

    @classmethod
    def tiny_inputs(cls, model: nn.Module, samples=None, seed: int = 0) -> dict[str, torch.Tensor]:
        """A left-padded batch built without a processor: per sample (text before, text after, kind, what).

        kind "image": what is its (height, width) in pixels (one image per sample, anyres crops padded to the
        batch's most); kind "video": what is its number of frames. Token counts are the model's own feature counts.
        """
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        samples = samples or cls.example_samples
        generator = torch.Generator().manual_seed(seed)
        config = model.config
        side = config.vision_config.image_size
        images = [what for _, _, kind, what in samples if kind == "image"]
        videos = [what for _, _, kind, what in samples if kind == "video"]
        out: dict[str, torch.Tensor] = {}
        counts: dict[str, list[int]] = {"image": [], "video": []}
        with torch.no_grad():
            if images:
                sizes = torch.tensor(images)
                crops = [image_size_to_num_patches(size, config.image_grid_pinpoints, side) for size in images]
                pixels = torch.zeros(len(images), max(crops), 3, side, side)
                for i, n in enumerate(crops):
                    pixels[i, :n] = torch.randn(n, 3, side, side, generator=generator)
                per_sample = torch.tensor([int(kind == "image") for _, _, kind, _ in samples])
                out |= {"pixel_values": pixels, "image_sizes": sizes, "batch_num_images": per_sample}
                features = model.model.get_image_features(pixels, sizes, batch_num_images=per_sample).pooler_output
                counts["image"] = [len(f) for f in features]
            if videos:
                if len(set(videos)) > 1:
                    raise ValueError("the videos of one batch share their number of frames (one tensor)")
                clips = torch.randn(len(videos), videos[0], 3, side, side, generator=generator)
                out["pixel_values_videos"] = clips
                counts["video"] = [f.shape[0] for f in model.model.get_video_features(clips).pooler_output]
        rows = []
        vocab = config.text_config.vocab_size
        for before, after, kind, _ in samples:
            token = OV_IMAGE if kind == "image" else OV_VIDEO
            text = torch.randint(OV_VIDEO + 1, vocab, (before + after,), generator=generator)
            rows.append(torch.cat([text[:before], torch.full((counts[kind].pop(0),), token), text[before:]]))
        out["input_ids"], out["attention_mask"] = build.left_padded(rows)
        return out

    @classmethod
    def tiny_processor(cls, model: nn.Module):
        raise NotImplementedError("LlavaOnevisionProcessor has a video processor, which needs torchvision")

    @classmethod
    def real_config(cls, spec: ModelSpec):
        """The stock config's anyres_max_9 layout (384 px tiles, pinpoints up to 6 x 6 tiles; image and video ids of
        the hf checkpoints) with the spec's decoder (Qwen2) and SigLIP tower."""
        import transformers as tf

        return tf.LlavaOnevisionConfig(
            vision_config=tf.SiglipVisionConfig(**build.vision_dims(spec)),
            text_config=build.text_config_class(spec.text_model)(**build.text_dims(spec)),
            vision_feature_layer=spec.feature_layer, vision_feature_select_strategy="full",
            pad_token_id=build.PAD_TOKEN,
        )  # fmt: skip

    @classmethod
    def image_tokens(cls, config, size: tuple[int, int]) -> int:
        """Base grid + the unpadded tiles, shrunk to anyres_max_N base grids' area, one newline per row."""
        return sum(g.tokens for g in onevision_grids(config, size))

    def bench_inputs(self, size, batch_size, text_before, text_after, generator) -> dict[str, torch.Tensor]:
        """Text, one anyres image's tokens, text; its crops, `image_sizes` and one image per sample."""
        inputs = super().bench_inputs(size, batch_size, text_before, text_after, generator)
        return inputs | {"batch_num_images": torch.ones(batch_size, dtype=torch.long)}


def onevision_grids(config, image_size, patched: bool = True, aspect: str | None = None) -> list[Grid]:
    """The grids of one image of `image_size` (height, width) under a LLaVA-OneVision `config`: its base grid and
    newline where the image is one of several (not `patched`), else the base grid and the tile grid (as LLaVA-NeXT's)
    shrunk to at most `anyres_max_N` base grids' area, one newline per row."""
    vision = config.vision_config
    side = vision.image_size // vision.patch_size  # SigLIP: every patch is a feature (strategy "full")
    if not patched:
        return [Grid(1, side, side), NEWLINE]
    base, tiles = anyres_grids(config, image_size, side)
    rows, cols = tiles.rows, tiles.cols
    most = int((aspect or config.vision_aspect_ratio).removeprefix("anyres_max_"))
    ratio = math.sqrt(rows * cols / (most * side**2))
    if ratio > 1.1:
        rows, cols = int(rows // ratio), int(cols // ratio)
    return [base, Grid(1, rows, cols, newline=True)]


def runs(tokens: list[int]) -> list[tuple[int, int]]:
    """(token, length) of each run of equal tokens."""
    out: list[tuple[int, int]] = []
    for token in tokens:
        if out and out[-1][0] == token:
            out[-1] = (token, out[-1][1] + 1)
        else:
            out.append((token, 1))
    return out
