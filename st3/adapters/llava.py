"""LLaVA (1.5 architecture): a CLIP vision tower and projector in front of a Llama-style decoder."""

from __future__ import annotations

import math

import torch
from torch import nn

from st3.adapters.base import Adapter, Grid, MaskRule


class LlavaAdapter(Adapter):
    """`LlavaForConditionalGeneration` with a Llama-style text model (Llama, Mistral, Qwen2, Qwen3, Vicuna)."""

    model_classes = ("LlavaForConditionalGeneration",)
    decoder_layers = {
        "LlamaDecoderLayer": "LlamaAttention",
        "MistralDecoderLayer": "MistralAttention",
        "Qwen2DecoderLayer": "Qwen2Attention",
        "Qwen3DecoderLayer": "Qwen3Attention",  # q_norm / k_norm, applied by the re-projection
    }
    compresses_vision = True
    layer_kinds = ("full_attention", "sliding_attention")  # Mistral's and Qwen2's windows, counted in columns

    @property
    def layer_types(self) -> tuple[str, ...]:
        """Mistral has no `layer_types`: with `sliding_window` set, every layer slides (its model's convention)."""
        config = self.text_config
        if getattr(config, "layer_types", None) is None and getattr(config, "sliding_window", None) is not None:
            return ("sliding_attention",) * len(self.layers)
        return Adapter.layer_types.fget(self)  # explicit: Mistral3's adapter borrows this property

    def mask_rule(self, index: int) -> MaskRule:
        sliding = self.layer_types[index] == "sliding_attention"
        return MaskRule(window=self.text_config.sliding_window if sliding else None)

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    def visual_token_ids(self) -> tuple[int, ...]:
        return (self.model.config.image_token_id,)

    def tokens_per_image(self) -> int:
        return self.model.config.image_seq_length

    def image_layout(self, inputs: dict, visual: torch.Tensor, position_ids: torch.Tensor) -> list[list[Grid]]:
        """One square grid per image (CLIP patches in raster order)."""
        per_image = self.tokens_per_image()
        side = math.isqrt(per_image)
        if side * side != per_image:
            raise ValueError(f"{per_image} image tokens do not form a square grid of patches")
        return [[Grid(1, side, side)] * (int(n) // per_image) for n in visual.sum(-1).tolist()]

    # ------------------------------------------------------------------------------------ vision side
    def _feature_layer(self) -> int:
        """Index of the vision encoder layer whose output LLaVA feeds the projector."""
        config = self.model.config
        layer = config.vision_feature_layer
        if not isinstance(layer, int) or config.vision_feature_select_strategy != "default":
            raise ValueError(
                "compressing before the decoder needs a single vision_feature_layer and the 'default' feature "
                f"strategy (CLS dropped); this model has {layer!r} / {config.vision_feature_select_strategy!r}"
            )
        return (layer % (len(self._vision_layers) + 1)) - 1  # hidden_states[i] is the output of encoder layer i - 1

    @property
    def _vision_layers(self) -> nn.ModuleList:
        tower = self.model.model.vision_tower
        return getattr(tower, "vision_model", tower).encoder.layers

    def capture_vision(self, store: dict) -> list:
        encoder_layer = self._vision_layers[self._feature_layer()]

        def layer_input(module, args, kwargs):
            store["layer_input"] = kwargs.get("hidden_states", args[0] if args else None)

        def projector_input(module, args):
            store["features"] = args[0]

        return [
            encoder_layer.register_forward_pre_hook(layer_input, with_kwargs=True),
            self.model.model.multi_modal_projector.register_forward_pre_hook(projector_input),
        ]

    def vision_saliency(self, store: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        layer = self._vision_layers[self._feature_layer()]
        attn = layer.self_attn
        normed = layer.layer_norm1(store["layer_input"])
        images, tokens, _ = normed.shape
        query = attn.q_proj(normed[:, :1]).view(images, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
        keys = attn.k_proj(normed).view(images, tokens, attn.num_heads, attn.head_dim).transpose(1, 2)
        probs = torch.softmax((query @ keys.transpose(-1, -2)).float() * attn.scale, dim=-1)  # [N, heads, 1, 1+P]
        cls_attention = probs.mean(1)[:, 0, 1:]
        return cls_attention, keys[:, :, 1:].mean(1), store["features"]

    def place_compressed(
        self, hidden: torch.Tensor, visual: torch.Tensor, keep: torch.Tensor, replaced: torch.Tensor,
        merged: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """LLaVA scatters each image's patches, in raster order, into its image-token slots (row-major)."""
        positions = visual.nonzero(as_tuple=True)
        repeats, rest = divmod(len(positions[0]), keep.numel())
        if rest or (repeats > 1 and keep.shape[0] * repeats != visual.shape[0]):
            raise ValueError(f"{len(positions[0])} visual tokens in the prompt but {keep.numel()} image patches")
        if repeats > 1:  # generate() expanded one image per sample for beams / num_return_sequences
            keep, replaced, merged = (t.repeat_interleave(repeats, dim=0) for t in (keep, replaced, merged))
        hidden = hidden.clone()
        flat = replaced.reshape(-1)
        if bool(flat.any()):
            projected = self.model.model.multi_modal_projector(merged[replaced].unsqueeze(0))[0]
            hidden[positions[0][flat], positions[1][flat]] = projected.to(hidden.dtype)
        kept = torch.zeros_like(visual)
        kept[positions] = keep.reshape(-1)
        return hidden, kept
