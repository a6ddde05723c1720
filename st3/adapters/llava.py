"""LLaVA (1.5 architecture): a vision tower and projector in front of a Llama-style decoder."""

from __future__ import annotations

import torch
from torch import nn

from st3 import compat
from st3.accounting import Shape
from st3.adapters.base import Adapter


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply rotary embeddings (cos/sin [B, R, D]) to rows x [B, heads, R, D], as Llama does."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class LlavaAdapter(Adapter):
    """`LlavaForConditionalGeneration` with a Llama-style text model (Llama, Mistral, Qwen2, Vicuna)."""

    model_classes = ("LlavaForConditionalGeneration",)

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def layers(self) -> nn.ModuleList:
        return self.language_model.layers

    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        return input_ids == self.model.config.image_token_id

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return compat.rotary(self.language_model.rotary_emb, hidden, position_ids)

    def _project(self, layer: int, proj: str, hidden: torch.Tensor) -> torch.Tensor:
        decoder_layer = self.layers[layer]
        attn = decoder_layer.self_attn
        rows = getattr(attn, proj)(decoder_layer.input_layernorm(hidden))
        return rows.view(*hidden.shape[:2], -1, attn.head_dim).transpose(1, 2)

    def project_queries(self, layer: int, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return rotate(self._project(layer, "q_proj", hidden), cos, sin)

    def project_keys(self, layer: int, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return rotate(self._project(layer, "k_proj", hidden), cos, sin)

    def attention_scaling(self, layer: int) -> float:
        return self.layers[layer].self_attn.scaling

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

    def project_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.model.multi_modal_projector(features)

    @property
    def shape(self) -> Shape:
        cfg = self.text_config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return Shape(
            num_layers=cfg.num_hidden_layers,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_heads=cfg.num_attention_heads,
            num_kv_heads=cfg.num_key_value_heads,
            head_dim=head_dim,
        )
