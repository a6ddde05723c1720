"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: a merged-patch vision tower in front of a Llama-style M-RoPE decoder.

What differs from LLaVA, and where it is handled:
- positions are M-RoPE: generate passes [4, B, S] (row 0 text positions, rows 1-3 temporal/height/width).
  Rotary drops row 0; the engine gathers all rows with each surviving row, so survivors keep their own
  (t, h, w) positions, and decode positions come from generate (last + 1), never from a pruned cache length.
- visual tokens are `image_token_id` and `video_token_id`; their counts differ per sample (`image_grid_thw`,
  `video_grid_thw`).
- Qwen3-VL adds q_norm/k_norm (applied by the shared re-projection) and deepstack: the decoder receives
  `visual_pos_masks` [B, S] and `deepstack_visual_embeds` (one [N_visual, H] per early layer), added to the
  visual rows after those layers. They are turned into per-row tensors that are pruned with the rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

import st3.adapters.build as build
from st3.adapters.base import Adapter, Grid

if TYPE_CHECKING:
    from st3.models import ModelSpec

QWEN_IMAGE, QWEN_VIDEO, QWEN_START, QWEN_END = 3, 4, 5, 6
"""The tiny Qwen-VL models' image, video, vision start and vision end tokens."""
QWEN_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)
"""The real checkpoints' ids of the same tokens."""


class QwenVLAdapter(Adapter):
    """The shared Qwen-VL decoder adapter; the family classes below only name their classes."""

    #: The family's name in `tiny` and the bench shapes ("qwen2-vl", "qwen2.5-vl", "qwen3-vl").
    family: str = ""
    summary = (
        "Qwen2-VL, Qwen2.5-VL, Qwen3-VL",
        "`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`, `Qwen3VLForConditionalGeneration` "
        "(images and video; M-RoPE, deepstack)",
        "supported, proven by the family matrix on tiny models; VisionZip, FasterVLM and VTC-CLS refused (no [CLS]); "
        "no real checkpoint run here",
    )
    #: (text before, text after, kind, (t, h, w) patch grid): 16, 24 and 32 visual tokens after the 2x2 merge.
    example_samples = ((3, 5, "image", (1, 8, 8)), (2, 7, "image", (1, 8, 12)), (4, 2, "video", (2, 8, 8)))

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    def visual_token_ids(self) -> tuple[int, ...]:
        config = self.model.config
        return (config.image_token_id, config.video_token_id)

    def check_inputs(self, kwargs: dict, continuing: bool) -> None:
        if continuing and kwargs.get("position_ids") is None:
            raise ValueError(
                f"{self.model_name} would derive the new tokens' M-RoPE positions from the cache length, which a "
                "pruned cache does not equal (and from a full-width attention_mask transformers 5.24 builds "
                "positions of the wrong width); pass `position_ids` [4, batch, new tokens] to every forward that "
                "continues a pruned cache, as generate does"
            )
        ids = kwargs.get("input_ids")
        if ids is None or kwargs.get("mm_token_type_ids") is not None or not bool(self.visual_mask(ids).any()):
            return
        raise ValueError(
            f"{self.model_name} got image or video tokens without `mm_token_type_ids`: transformers then silently "
            "gives visual tokens 1-D text positions instead of their M-RoPE (t, h, w) positions. Pass the "
            "`mm_token_type_ids` the processor returns (0 text, 1 image, 2 video) along with `input_ids`."
        )

    def default_positions(self, attention_mask, start: int, batch: int, length: int, device) -> torch.Tensor:
        """The text model's own default: columns counted from `start` (every row of M-RoPE alike)."""
        return torch.arange(start, start + length, device=device).expand(batch, length)

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if position_ids.dim() == 3 and position_ids.shape[0] == 4:  # row 0: text positions, for masks only
            position_ids = position_ids[1:]
        return super().rotary(hidden, position_ids)

    def image_layout(self, inputs: dict, visual: torch.Tensor, position_ids: torch.Tensor) -> list[list[Grid]]:
        """Per sample, one grid per contiguous block of image or video tokens, read off its M-RoPE positions.

        The positions are the geometry (generate passes no `image_grid_thw` to the forward in 5.24): a block's
        distinct temporal / height / width positions are its frames / rows / columns.
        """
        if position_ids.dim() != 3 or position_ids.shape[0] < 3:
            raise ValueError("no M-RoPE positions: the image layout is unknown")
        thw = position_ids[-3:]
        ids = inputs["input_ids"]
        layout = []
        for b in range(ids.shape[0]):
            columns = visual[b].nonzero().squeeze(-1)
            kinds = ids[b, columns]
            # A block starts where the column is not the last one + 1 or the token id changes: found in a few
            # operations, not a Python step per visual token (a 32-frame video has ~10^4 of them).
            starts = torch.ones_like(columns, dtype=torch.bool)
            starts[1:] = (columns[1:] != columns[:-1] + 1) | (kinds[1:] != kinds[:-1])
            first = starts.nonzero().squeeze(-1).tolist()
            grids = []
            for block in columns.split([end - start for start, end in zip(first, [*first[1:], len(columns)])]):
                t, h, w = (len(torch.unique(thw[axis, b, block])) for axis in range(3))
                if t * h * w != len(block):
                    raise ValueError(f"a block of {len(block)} visual tokens is no {t} x {h} x {w} grid")
                grids.append(Grid(t, h, w))
            layout.append(grids)
        return layout

    # ----------------------------------------------------------------------------------- family facts
    @classmethod
    def tiny(cls, *, layers: int = 4, hidden: int = 64, attn: str = "sdpa", seed: int = 0, **options) -> nn.Module:
        """A tiny model of this Qwen-VL family with a 2-layer vision tower (patch 4, merge 2), fp32, eval."""
        import transformers as tf

        torch.manual_seed(seed)
        text = build.tiny_text(hidden, layers, bos_token_id=None, eos_token_id=None)
        vision = dict(depth=2, num_heads=2, patch_size=4, spatial_merge_size=2, temporal_patch_size=2)
        ids = dict(image_token_id=QWEN_IMAGE, video_token_id=QWEN_VIDEO, vision_start_token_id=QWEN_START,
                   vision_end_token_id=QWEN_END)  # fmt: skip
        if cls.family == "qwen2-vl":  # head_dim 16: mrope_section sums to 8
            config = tf.Qwen2VLConfig(
                text_config=dict(**text, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3]}),
                vision_config=dict(**vision, embed_dim=32, hidden_size=hidden, mlp_ratio=2), **ids,
            )  # fmt: skip
        elif cls.family == "qwen2.5-vl":
            config = tf.Qwen2_5_VLConfig(
                text_config=dict(**text, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3]}),
                vision_config=dict(**vision, hidden_size=32, intermediate_size=64, out_hidden_size=hidden,
                                   window_size=16, fullatt_block_indexes=[1]), **ids,
            )  # fmt: skip
        else:
            rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True}
            config = tf.Qwen3VLConfig(
                text_config=dict(**text, head_dim=16, rope_parameters=rope),
                vision_config=dict(**vision, hidden_size=32, intermediate_size=64, out_hidden_size=hidden,
                                   num_position_embeddings=64, deepstack_visual_indexes=[0, 1]), **ids,
            )  # fmt: skip
        return build.finish(getattr(tf, cls.model_classes[0])(config), attn)

    @classmethod
    def tiny_inputs(cls, model: nn.Module, samples=None, seed: int = 0) -> dict[str, torch.Tensor]:
        """A left-padded batch built without a processor: per sample (text before, text after, kind, (t, h, w)).

        kind is "image" or "video"; (t, h, w) is the patch grid (h, w divisible by the merge size). Each visual
        block is wrapped in vision start/end tokens, as the processor writes it; Qwen3-VL videos get one block
        per frame (its processor separates frames by timestamp text, here one random text token).
        """
        generator = torch.Generator().manual_seed(seed)
        config = model.config
        vision = config.vision_config
        merge = vision.spatial_merge_size
        per_patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        per_frame_blocks = type(model).__name__.startswith("Qwen3")
        rows, pixels = [], {"image": [], "video": []}
        grids = {"image": [], "video": []}

        def text(n: int) -> torch.Tensor:
            return torch.randint(QWEN_END + 1, config.text_config.vocab_size, (n,), generator=generator)

        for before, after, kind, (t, h, w) in samples or cls.example_samples:
            token, code = (QWEN_IMAGE, 1) if kind == "image" else (QWEN_VIDEO, 2)
            pieces, kinds = [text(before)], [torch.zeros(before, dtype=torch.long)]
            frames = [(t, h, w)] if not per_frame_blocks or kind == "image" else [(1, h, w)] * t
            for i, (ft, fh, fw) in enumerate(frames):
                if i:
                    pieces.append(text(1))
                    kinds.append(torch.zeros(1, dtype=torch.long))
                n = ft * fh * fw // merge**2
                pieces += [torch.tensor([QWEN_START]), torch.full((n,), token), torch.tensor([QWEN_END])]
                kinds += [torch.zeros(1, dtype=torch.long), torch.full((n,), code), torch.zeros(1, dtype=torch.long)]
            pieces.append(text(after))
            kinds.append(torch.zeros(after, dtype=torch.long))
            rows.append((torch.cat(pieces), torch.cat(kinds)))
            pixels[kind].append(torch.randn(t * h * w, per_patch, generator=generator))
            grids[kind].append(torch.tensor([t, h, w]))
        out = dict(zip(("input_ids", "attention_mask"), build.left_padded([row for row, _ in rows])))
        out["mm_token_type_ids"] = build.left_padded([kind for _, kind in rows])[0]
        if pixels["image"]:
            out["pixel_values"] = torch.cat(pixels["image"])
            out["image_grid_thw"] = torch.stack(grids["image"])
        if pixels["video"]:
            out["pixel_values_videos"] = torch.cat(pixels["video"])
            out["video_grid_thw"] = torch.stack(grids["video"])
        return out

    @classmethod
    def tiny_processor(cls, model: nn.Module):
        raise NotImplementedError(
            "Qwen-VL processors have a video processor, which needs torchvision (st3 generate then loads the same "
            "processor without its video slot: tests/apps/test_generate.py builds such a checkpoint)"
        )

    @classmethod
    def real_config(cls, spec: ModelSpec):
        """A config with the spec's decoder and a vision tower of the spec's width (Qwen2.5-VL or Qwen3-VL)."""
        import transformers as tf

        text = build.decoder_dims(spec) | dict(max_position_embeddings=32768, pad_token_id=build.PAD_TOKEN)
        vision = dict(depth=spec.vision_layers, hidden_size=spec.vision_hidden, out_hidden_size=spec.hidden,
                      num_heads=16 if spec.vision_hidden >= 1024 else 2, patch_size=spec.patch_size,
                      spatial_merge_size=2, temporal_patch_size=2)  # fmt: skip
        if cls.family == "qwen2.5-vl":
            sections = mrope_sections([16, 24, 24], spec.hidden // spec.heads)
            rope = {"rope_type": "default", "rope_theta": spec.rope_theta, "mrope_section": sections}
            return tf.Qwen2_5_VLConfig(text_config=dict(**text, rope_parameters=rope),
                                       vision_config=dict(**vision, intermediate_size=3420, fullatt_block_indexes=[0]),
                                       **QWEN_IDS)  # fmt: skip
        if cls.family == "qwen3-vl":
            sections = mrope_sections([24, 20, 20], spec.head_dim or spec.hidden // spec.heads)
            rope = {"rope_type": "default", "rope_theta": spec.rope_theta, "mrope_section": sections,
                    "mrope_interleaved": True}  # fmt: skip
            return tf.Qwen3VLConfig(text_config=dict(**text, head_dim=spec.head_dim, rope_parameters=rope),
                                    vision_config=dict(**vision, intermediate_size=4304, deepstack_visual_indexes=[0]),
                                    **QWEN_IDS)  # fmt: skip
        return super().real_config(spec)

    @classmethod
    def image_tokens(cls, config, size: tuple[int, int]) -> int:
        """The merged patches of an image whose sides are multiples of patch x merge (the processor's rounding)."""
        vision = config.vision_config
        merged = vision.patch_size * vision.spatial_merge_size
        return (size[0] // merged) * (size[1] // merged)

    @classmethod
    def typical_image(cls, config) -> tuple[int, int]:
        """24 x 24 merged patches: 576 tokens, LLaVA-1.5's count (the image decides; the processor's range is wide)."""
        vision = config.vision_config
        side = 24 * vision.patch_size * vision.spatial_merge_size
        return side, side

    def bench_inputs(
        self, size, batch_size, text_before, text_after, generator, frames: int = 0
    ) -> dict[str, torch.Tensor]:
        """Text, <vision_start>, the merged image tokens, <vision_end>, text, with flattened patches, the image grid
        and the token types M-RoPE needs. `frames` > 0: a video of that many frames of `size` instead (video tokens,
        `pixel_values_videos`, `video_grid_thw`): the tower folds each `temporal_patch_size` frames into one grid,
        so it yields frames / 2 x the image's tokens."""
        config = self.model.config
        vision = config.vision_config
        rows, cols = size[0] // vision.patch_size, size[1] // vision.patch_size
        if frames < 0 or frames % vision.temporal_patch_size:
            raise ValueError(f"frames must be a multiple of {vision.temporal_patch_size} (0: an image), got {frames}")
        video = frames > 0
        groups = frames // vision.temporal_patch_size if video else 1
        token, kind = (config.video_token_id, 2) if video else (config.image_token_id, 1)
        visual = groups * self.image_tokens(config, size)
        image = torch.tensor([config.vision_start_token_id, *[token] * visual, config.vision_end_token_id])
        special = tuple(QWEN_IDS.values()) if config.image_token_id == QWEN_IDS["image_token_id"] else (3, 4, 5, 6)
        ids, mask = build.bench_prompt(image, batch_size, text_before, text_after, config.text_config.vocab_size,
                                       special, generator)  # fmt: skip
        per_patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "mm_token_type_ids": (ids == token).long() * kind,
            "pixel_values_videos" if video else "pixel_values": torch.randn(
                batch_size * groups * rows * cols, per_patch, generator=generator
            ),
            "video_grid_thw" if video else "image_grid_thw": torch.tensor([[groups, rows, cols]] * batch_size),
        }


def mrope_sections(real: list[int], head_dim: int) -> list[int]:
    """The real (t, h, w) rotary sections (for head_dim 128) scaled to `head_dim` (smaller test shapes)."""
    half = head_dim // 2
    scaled = [x * half // sum(real) for x in real]
    scaled[-1] += half - sum(scaled)
    return scaled


class Qwen2VLAdapter(QwenVLAdapter):
    family = "qwen2-vl"
    model_classes = ("Qwen2VLForConditionalGeneration",)
    decoder_layers = {"Qwen2VLDecoderLayer": "Qwen2VLAttention"}


class Qwen25VLAdapter(QwenVLAdapter):
    family = "qwen2.5-vl"
    model_classes = ("Qwen2_5_VLForConditionalGeneration",)
    decoder_layers = {"Qwen2_5_VLDecoderLayer": "Qwen2_5_VLAttention"}


class Qwen3VLAdapter(QwenVLAdapter):
    family = "qwen3-vl"
    model_classes = ("Qwen3VLForConditionalGeneration",)
    decoder_layers = {"Qwen3VLTextDecoderLayer": "Qwen3VLTextAttention"}  # q_norm / k_norm, re-projected

    def row_inputs(self, kwargs: dict, visual: torch.Tensor) -> dict[str, torch.Tensor]:
        """Deepstack features as dense [B, S, depth, H] rows (zero on text rows: adding zero changes nothing)."""
        where = kwargs.pop("visual_pos_masks", None)
        embeds = kwargs.pop("deepstack_visual_embeds", None)
        if embeds is None:
            return {}
        if where is None or not torch.equal(where.to(visual.device), visual):
            raise ValueError("Qwen3-VL deepstack: visual_pos_masks does not match the image and video tokens")
        batch, length = where.shape
        dense = torch.zeros(batch, length, len(embeds), embeds[0].shape[-1], dtype=embeds[0].dtype,
                            device=embeds[0].device)  # fmt: skip
        for depth, rows in enumerate(embeds):
            dense[:, :, depth][where.to(dense.device)] = rows
        return {"deepstack": dense}

    def stock_inputs(self, visual: torch.Tensor, rows: dict[str, torch.Tensor]) -> dict:
        """Deepstack back in the decoder's own form: the surviving visual rows' mask and features, per depth."""
        deepstack = rows.get("deepstack")
        if deepstack is None:
            return {}
        return {"visual_pos_masks": visual,
                "deepstack_visual_embeds": [deepstack[:, :, d][visual] for d in range(deepstack.shape[2])]}  # fmt: skip

    def after_layer(self, index: int, hidden: torch.Tensor, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        deepstack = rows.get("deepstack")
        if deepstack is None or index >= deepstack.shape[2]:
            return hidden
        return hidden + deepstack[:, :, index].to(hidden.dtype)

    def layer_kwargs(self, kwargs: dict) -> dict:
        kwargs = dict(kwargs)
        kwargs.pop("visual_pos_masks", None)
        kwargs.pop("deepstack_visual_embeds", None)  # decode forwards carry none; prefill popped them
        return super().layer_kwargs(kwargs)

