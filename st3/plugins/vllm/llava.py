"""LLaVA in vLLM with an st3 rule before the language model: K placeholder tokens per image, K embeddings.

vLLM's own LLaVA classes, subclassed at three points and nothing else:
- `get_num_image_tokens` returns K, so the prompt holds K placeholders per image and the scheduler, the KV
  cache and every later layer see a prompt K tokens long per image instead of the image's N;
- when the rule reads the prompt (CDPruner), the processor sends the prompt's token ids with each image and
  folds a digest of the prompt into the image's hash, so the encoder and prefix caches never serve one
  question's choice to another;
- `embed_multimodal` runs the tower and projector as vLLM does, asks st3's selector which K of the N rows to
  keep (`selection.select`, the engine's own rule) and returns those rows, in raster order.
By default the kept tokens take consecutive positions (vLLM lays a prompt out contiguously), as DivPrune's,
CDPruner's and VisionZip's released code do. With a position table (`supports_mrope` below) the kept tokens and the
text keep their original positions, as in st3's transformers engine, for the rules the grid decides.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import replace
from functools import cached_property

import torch
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.model_executor.models.utils import WeightsMapper
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalBatchedField, MultiModalFieldElem

from st3.plugins.vllm import selection
from st3.plugins.vllm.config import Pruning

TEXT_FIELD = "st3_prompt_ids"
"""The per-image field holding the prompt's token ids (only for rules that read the prompt)."""


def image_grid(hf_config) -> tuple[int, int]:
    """(rows, cols) of a LLaVA image's patch tokens; refuses layouts st3 cannot place on a grid."""
    vision = hf_config.vision_config
    if hf_config.vision_feature_select_strategy != "default":
        raise ValueError(
            f"st3: vision_feature_select_strategy {hf_config.vision_feature_select_strategy!r} keeps the [CLS] "
            "row among the image tokens; the plugin supports 'default' (patches only, as LLaVA-1.5)"
        )
    if vision.model_type not in ("clip_vision_model", "siglip_vision_model"):
        raise ValueError(f"st3: vision tower {vision.model_type!r} is not supported (CLIP or SigLIP: a fixed grid)")
    side = vision.image_size // vision.patch_size
    return side, side


class St3LlavaProcessingInfo(LlavaProcessingInfo):
    """LLaVA's processing info with K tokens per image: the prompt vLLM schedules is text + K per image."""

    @cached_property
    def pruning(self) -> Pruning:
        return Pruning.of(self.get_hf_config())

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        rows, cols = image_grid(self.get_hf_config())
        return self.pruning.tokens(rows * cols)


class St3LlavaMultiModalProcessor(LlavaMultiModalProcessor):
    """Sends the prompt with each image and keys the image's hash by the prompt, when the rule reads it."""

    @property
    def _reads_prompt(self) -> bool:
        return self.info.pruning.rule.reads_prompt

    def _get_mm_hashes(self, inputs):
        if not self._reads_prompt:
            return super()._get_mm_hashes(inputs)
        digest = hashlib.sha256(str(list(inputs.prompt)).encode()).hexdigest()
        salted = {**inputs.hf_processor_mm_kwargs, "st3_prompt": digest}
        return super()._get_mm_hashes(replace(inputs, hf_processor_mm_kwargs=salted))

    def apply(self, inputs, *args, **kwargs):
        result = super().apply(inputs, *args, **kwargs)
        if self._reads_prompt:
            ids = torch.tensor(list(inputs.prompt), dtype=torch.long)
            for item in result["mm_kwargs"].get("image", []):
                if item is not None:  # None: cached in the engine core, with the same prompt (same hash)
                    item[TEXT_FIELD] = MultiModalFieldElem(data=ids, field=MultiModalBatchedField())
        return result


def split_prompt(ids: torch.Tensor, image_token: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids before the first image token, ids after the last): the text rows of the engine's view, in which
    the rows after the image are the instruction a prompt-reading rule weighs the patches by."""
    images = (ids == image_token).nonzero().squeeze(-1)
    if not len(images):
        return ids, ids[:0]
    return ids[: images[0]], ids[images[-1] + 1 :]


# transformers 5 saves a LLaVA's CLIP tower without its `vision_model.` level (the scenes model is such a
# checkpoint); hub checkpoints saved before keep it and are unaffected.
_TOWER = re.compile(r"(^|\.)vision_tower\.(embeddings|encoder|pre_layrnorm|post_layernorm)\.")


@MULTIMODAL_REGISTRY.register_processor(
    St3LlavaMultiModalProcessor, info=St3LlavaProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class St3LlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """vLLM's LLaVA returning K embeddings per image, chosen by an st3 rule (see the module docstring)."""

    hf_to_vllm_mapper = LlavaForConditionalGeneration.hf_to_vllm_mapper | WeightsMapper(
        orig_to_new_regex={_TOWER: r"\1vision_tower.vision_model.\2."}
    )

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        config = vllm_config.model_config.hf_config
        pruning = Pruning.of(config)  # validated before any weight is allocated
        rows, cols = image_grid(config)
        keep = pruning.tokens(rows * cols)
        selector = pruning.selector(keep)
        if pruning.rule.needs_cls and get_tensor_model_parallel_world_size() > 1:
            raise ValueError("st3.method: visionzip reads every head of the tower's attention: tensor_parallel_size 1")
        if vllm_config.model_config.uses_mrope and selection.reads_features(pruning.method, pruning.knobs):
            raise ValueError(
                f"st3.method: {pruning.method!r} chooses by the image's features, known only after the encoder runs, "
                "but original positions (the rope_parameters override) are fixed when a request arrives: use "
                "stratified, random, raster or lattice, or drop the override (consecutive positions; docs/vllm.md)"
            )
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.st3, self.st3_keep, self.st3_selector = pruning, keep, selector
        self.st3_grid = selection.Grid(1, rows, cols)
        self.st3_kept: list[torch.Tensor] = []
        """The kept patch indices of each image of the last `embed_multimodal` call (for tests and tracing)."""

    supports_mrope = True
    """vLLM builds a position table per request only for a config that declares an M-RoPE section: with
    `"rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 1]}` in hf_overrides (the language model
    reads its own rotary settings, untouched), the kept tokens and the text keep their original positions."""

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list) -> tuple[torch.Tensor, int]:
        """[3, L] positions (three equal rows) of the pruned prompt: the unpruned prompt's, at the rows that remain."""
        count = self.st3_grid.tokens
        kept = selection.select(self.st3_selector, torch.zeros(count, 1), self.st3_grid, self.st3_keep)
        pieces, cursor, following = [], 0, 0
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            text = feature.mm_position.offset - cursor
            pieces += [torch.arange(text) + following, kept + following + text]
            cursor, following = feature.mm_position.offset + len(kept), following + text + count
        pieces.append(torch.arange(len(input_tokens) - cursor) + following)
        positions = torch.cat(pieces).expand(3, -1)
        return positions, int(positions.max()) + 1 - len(input_tokens)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        if positions.ndim == 2:  # the position table's rows are equal: LLaVA's language model takes one
            positions = positions[0]
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)

    def embed_multimodal(self, **kwargs):
        text_ids = kwargs.pop(TEXT_FIELD, None)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if image_input["type"] != "pixel_values":
            raise ValueError("st3: the plugin selects from the image's patches; pass images, not image_embeds")
        pixels = image_input["pixel_values"]
        if self.st3.rule.needs_cls:
            embeds, kept = self._visionzip(pixels)
        else:
            embeds = self.multi_modal_projector(self._image_pixels_to_features(self.vision_tower, pixels))
            kept = [self._select(embeds[i], None if text_ids is None else text_ids[i]) for i in range(len(embeds))]
            embeds = [embeds[i, index] for i, index in enumerate(kept)]
        self.st3_kept = [index.cpu() for index in kept]
        return torch.stack(embeds)

    def _select(self, embeds: torch.Tensor, prompt_ids: torch.Tensor | None) -> torch.Tensor:
        if prompt_ids is None:
            return selection.select(self.st3_selector, embeds, self.st3_grid, self.st3_keep)
        before, after = (
            self.language_model.embed_input_ids(part.to(embeds.device))
            for part in split_prompt(prompt_ids, self.config.image_token_index)
        )
        return selection.select(self.st3_selector, embeds, self.st3_grid, self.st3_keep, after, before)

    def _visionzip(self, pixels: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """VisionZip: the feature layer's [CLS] attention and keys from vLLM's tower, st3's merge rule."""
        tower = self.vision_tower.vision_model
        hidden = tower.pre_layrnorm(tower.embeddings(pixels.to(tower.pre_layrnorm.weight.dtype)))
        *before, last = tower.encoder.layers
        for layer in before:
            hidden = layer(hidden)
        attn = last.self_attn
        qkv, _ = attn.qkv_proj(last.layer_norm1(hidden))
        query, keys, _ = qkv.chunk(3, dim=-1)
        images, tokens, _ = keys.shape
        query = query[:, :1].view(images, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
        keys = keys.view(images, tokens, attn.num_heads, attn.head_dim).transpose(1, 2)
        probs = torch.softmax((query @ keys.transpose(-1, -2)).float() * attn.scale, dim=-1)
        saliency, keys = probs.mean(1)[:, 0, 1:], keys[:, :, 1:].mean(1)
        features = last(hidden)[:, 1:]  # 'default' strategy: the patches of the feature layer
        if tower.post_layernorm is not None:
            features = tower.post_layernorm(features)
        keep, merged = selection.compress(self.st3_selector, saliency, keys, features)
        kept = [row.nonzero().squeeze(-1) for row in keep]
        embeds = self.multi_modal_projector(merged)
        return [embeds[i, index] for i, index in enumerate(kept)], kept
