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

import torch

from st3.adapters.base import Adapter, Grid
from st3.adapters.llava_next import LlavaNextAdapter

#: A newline token on its own (after a whole image or video): one row of no patches, ended by a newline.
NEWLINE = Grid(1, 1, 0, newline=True)


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """`LlavaOnevisionForConditionalGeneration` (Qwen2 decoder; Llama-style decoders also accepted)."""

    model_classes = ("LlavaOnevisionForConditionalGeneration",)
    ignored_kwargs = ("logits_to_keep",)
    compression_refused = Adapter.compression_refused  # SigLIP: no [CLS] token

    def visual_token_ids(self) -> tuple[int, ...]:
        config = self.model.config
        return (config.image_token_id, config.video_token_id)

    def _side(self) -> int:
        vision = self.model.config.vision_config
        return vision.image_size // vision.patch_size  # SigLIP: every patch is a feature (strategy "full")

    def image_grids(self, image_size, patched: bool = True, aspect: str | None = None) -> list[Grid]:
        """The grids of one image of `image_size` (height, width), as `pack_image_features` lays it out."""
        side = self._side()
        if not patched:
            return [Grid(1, side, side), NEWLINE]
        base, tiles = super().image_grids(image_size)
        rows, cols = tiles.rows, tiles.cols
        most = int((aspect or self.model.config.vision_aspect_ratio).removeprefix("anyres_max_"))
        ratio = math.sqrt(rows * cols / (most * side**2))
        if ratio > 1.1:
            rows, cols = int(rows // ratio), int(cols // ratio)
        return [base, Grid(1, rows, cols, newline=True)]

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


def runs(tokens: list[int]) -> list[tuple[int, int]]:
    """(token, length) of each run of equal tokens."""
    out: list[tuple[int, int]] = []
    for token in tokens:
        if out and out[-1][0] == token:
            out[-1] = (token, out[-1][1] + 1)
        else:
            out.append((token, 1))
    return out
