"""The seam between the engine and a model family.

An adapter answers the few model-specific questions the engine has: where the decoder stack is, which
input tokens are visual, how positions become rotary embeddings, and how one layer projects query (and
key) rows for scoring. Nothing model-specific lives anywhere else.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from st3.accounting import Shape


class Adapter(ABC):
    """Model-family specifics for one loaded model."""

    #: Class names of the top-level models this adapter serves.
    model_classes: tuple[str, ...] = ()

    def __init__(self, model: nn.Module):
        self.model = model

    @property
    @abstractmethod
    def language_model(self) -> nn.Module:
        """The decoder stack (e.g. `LlamaModel`) whose forward the engine replaces."""

    @property
    @abstractmethod
    def layers(self) -> nn.ModuleList:
        """The decoder layers, in order."""

    @abstractmethod
    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """BoolTensor [B, L]: which prompt columns hold visual tokens."""

    @abstractmethod
    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each [B, L, head_dim], for `position_ids`."""

    @abstractmethod
    def project_queries(self, layer: int, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotated query rows [B, heads, R, head_dim] of layer `layer` for its input rows `hidden` [B, R, H]."""

    @abstractmethod
    def project_keys(self, layer: int, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotated key rows [B, kv_heads, R, head_dim] of layer `layer` (as the layer would cache them)."""

    @abstractmethod
    def attention_scaling(self, layer: int) -> float:
        """The factor applied to q.k in layer `layer`."""

    @property
    @abstractmethod
    def shape(self) -> Shape:
        """Decoder dimensions, for FLOPs and KV accounting."""

    # ----------------------------------------------------- vision side (methods that act before the decoder)
    def capture_vision(self, store: dict) -> list:
        """Register removable hooks that put the vision tower's saliency inputs in `store`; return the handles."""
        raise NotImplementedError(f"{type(self).__name__} cannot compress visual tokens before the decoder")

    def vision_saliency(self, store: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """From a capture: ([CLS] attention [images, P], keys [images, P, d], projector inputs [images, P, d_v])."""
        raise NotImplementedError(f"{type(self).__name__} cannot compress visual tokens before the decoder")

    def project_features(self, features: torch.Tensor) -> torch.Tensor:
        """Vision features [images, P, d_v] -> decoder embeddings [images, P, H] (the multimodal projector)."""
        raise NotImplementedError(f"{type(self).__name__} cannot compress visual tokens before the decoder")

    @property
    def text_config(self):
        """The decoder's config."""
        return self.language_model.config
