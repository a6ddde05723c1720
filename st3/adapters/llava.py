"""LLaVA (1.5 architecture): a vision tower and projector in front of a Llama-style decoder."""

from __future__ import annotations

import torch
from torch import nn

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
        return self.language_model.rotary_emb(hidden, position_ids=position_ids)

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
