"""Qwen2.5-VL in vLLM with an st3 rule before the language model, the kept tokens at their original M-RoPE
positions (as st3's transformers engine keeps them).

vLLM's own Qwen2.5-VL classes, subclassed at four points:
- the processor's prompt update and `get_num_image_tokens` give each image K placeholders instead of N;
- `_process_image_input` returns the K kept rows of each image's merged embeddings, in raster order;
- `get_mrope_input_positions` lays the prompt out as transformers' `get_rope_index` lays out the unpruned one:
  each kept token at its patch's (t, h, w) position and the text after an image where it was, so the positions
  of text and kept tokens are those of the full prompt. vLLM asks for them when a request arrives, before the
  encoder runs, so the rule's choice must be known from the image's grid alone: `stratified` (its default
  jitter), `random`, `raster`, `lattice`. Rules that read the features (`spread`, `divprune`, `cdpruner`) are
  refused here: vLLM recomputes M-RoPE positions after the encoder only for its own video pruning
  (docs/vllm.md, the design's last point); VisionZip is refused too (the tower has no [CLS] token).
Images only (video is refused by the processor's limits).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property

import torch
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement

from st3.plugins.vllm import selection
from st3.plugins.vllm.config import Pruning


def check_family(pruning: Pruning) -> None:
    """Refuse what Qwen2.5-VL in vLLM cannot run exactly, naming the setting."""
    if pruning.rule.needs_cls:
        raise ValueError("st3.method: visionzip ranks patches by the tower's [CLS] attention; Qwen2.5-VL has no [CLS]")
    if selection.reads_features(pruning.method, pruning.knobs):
        raise ValueError(
            f"st3.method: {pruning.method!r} chooses by the image's features, known only after the encoder runs, but "
            "vLLM fixes a Qwen2.5-VL request's M-RoPE positions when it arrives (it recomputes them only for its "
            "video pruning; docs/vllm.md); on Qwen2.5-VL use stratified, random, raster or lattice"
        )


def kept_patches(pruning: Pruning, frames: int, rows: int, cols: int) -> torch.Tensor:
    """The patches (raster order of the merged grid) a grid-only rule keeps of an image: known before encoding."""
    count = frames * rows * cols
    keep = pruning.tokens(count)
    return selection.select(pruning.selector(keep), torch.zeros(count, 1), selection.Grid(frames, rows, cols), keep)


class St3Qwen2_5_VLProcessingInfo(Qwen2_5_VLProcessingInfo):
    @cached_property
    def pruning(self) -> Pruning:
        pruning = Pruning.of(self.get_hf_config())
        check_family(pruning)
        return pruning

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def get_num_image_tokens(self, **kwargs) -> int:
        return self.pruning.tokens(super().get_num_image_tokens(**kwargs))


class St3Qwen2_5_VLMultiModalProcessor(Qwen2_5_VLMultiModalProcessor):
    """Each image's placeholder run cut to the K tokens the rule keeps."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        return [self._pruned(update) if update.modality == "image" else update for update in updates]

    def _pruned(self, update: PromptReplacement) -> PromptReplacement:
        full = update.replacement

        def replacement(item_idx: int):
            tokens = full(item_idx)
            return tokens[: self.info.pruning.tokens(len(tokens))]

        return PromptReplacement(modality=update.modality, target=update.target, replacement=replacement)


@MULTIMODAL_REGISTRY.register_processor(
    St3Qwen2_5_VLMultiModalProcessor, info=St3Qwen2_5_VLProcessingInfo, dummy_inputs=Qwen2_5_VLDummyInputsBuilder
)
class St3Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL returning K embeddings per image at their original M-RoPE positions."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        pruning = Pruning.of(vllm_config.model_config.hf_config)
        check_family(pruning)
        if vllm_config.model_config.multimodal_config.is_multimodal_pruning_enabled():
            raise ValueError("st3: turn vLLM's video pruning off (video_pruning_rate); the plugin serves images")
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.st3 = pruning
        self.st3_grids: dict[tuple[int, int, int], torch.Tensor] = {}
        self.st3_kept: list[torch.Tensor] = []
        """The kept patch indices of each image of the last `embed_multimodal` call (for tests and tracing)."""

    def _kept(self, frames: int, rows: int, cols: int) -> torch.Tensor:
        key = (frames, rows, cols)
        if key not in self.st3_grids:
            self.st3_grids[key] = kept_patches(self.st3, *key)
        return self.st3_grids[key]

    def _merged_grid(self, grid_thw) -> tuple[int, int, int]:
        merge = self.config.vision_config.spatial_merge_size
        t, h, w = (int(x) for x in grid_thw)
        return t, h // merge, w // merge

    def _process_image_input(self, image_input) -> tuple[torch.Tensor, ...]:
        embeds = super()._process_image_input(image_input)
        kept = [self._kept(*self._merged_grid(grid)) for grid in image_input["image_grid_thw"].tolist()]
        self.st3_kept = kept
        return tuple(rows[index.to(rows.device)] for rows, index in zip(embeds, kept))

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list) -> tuple[torch.Tensor, int]:
        """[3, L] positions of the pruned prompt: those of the unpruned prompt at the rows that remain."""
        pieces, cursor, following = [], 0, 0
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            if feature.modality != "image":
                raise ValueError(f"st3: the plugin serves images, not {feature.modality}")
            frames, rows, cols = self._merged_grid(feature.data["image_grid_thw"].data.tolist())
            text = feature.mm_position.offset - cursor
            pieces.append(torch.arange(text).expand(3, text) + following)
            grid = torch.stack(torch.meshgrid(*map(torch.arange, (frames, rows, cols)), indexing="ij")).reshape(3, -1)
            grid = grid + following + text
            kept = self._kept(frames, rows, cols)
            pieces.append(grid[:, kept])
            cursor = feature.mm_position.offset + len(kept)
            following = int(grid.max()) + 1  # where the unpruned prompt's next text token sits
        rest = len(input_tokens) - cursor
        pieces.append(torch.arange(rest).expand(3, rest) + following)
        positions = torch.cat(pieces, dim=1)
        return positions, int(positions.max()) + 1 - len(input_tokens)
