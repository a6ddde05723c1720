"""Model-family adapters, found by the class name of the loaded model."""

from __future__ import annotations

from torch import nn

from st3.adapters.base import Adapter
from st3.adapters.llava import LlavaAdapter

ADAPTERS: tuple[type[Adapter], ...] = (LlavaAdapter,)


def supported_models() -> list[str]:
    return [name for adapter in ADAPTERS for name in adapter.model_classes]


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter for `model`, or a TypeError that names the supported classes."""
    name = type(model).__name__
    for adapter in ADAPTERS:
        if name in adapter.model_classes:
            return adapter(model)
    raise TypeError(
        f"st3 does not support {name}. Supported models: {', '.join(supported_models())}. "
        "Load one with e.g. LlavaForConditionalGeneration.from_pretrained(...)."
    )


__all__ = ["Adapter", "LlavaAdapter", "adapter_for", "supported_models"]
