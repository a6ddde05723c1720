"""Model-family adapters, found by the class name of the loaded model, then checked against its decoder."""

from __future__ import annotations

from torch import nn

from st3.adapters.base import Adapter, Grid, MaskRule, UnsupportedModel
from st3.adapters.gemma3 import Gemma3Adapter
from st3.adapters.idefics3 import Idefics3Adapter
from st3.adapters.internvl import InternVLAdapter
from st3.adapters.llava import LlavaAdapter
from st3.adapters.llava_next import LlavaNextAdapter
from st3.adapters.llava_onevision import LlavaOnevisionAdapter
from st3.adapters.mistral3 import Mistral3Adapter
from st3.adapters.qwen_vl import Qwen2VLAdapter, Qwen3VLAdapter, Qwen25VLAdapter

ADAPTERS: tuple[type[Adapter], ...] = (
    LlavaAdapter, Qwen2VLAdapter, Qwen25VLAdapter, Qwen3VLAdapter, LlavaNextAdapter, LlavaOnevisionAdapter,
    InternVLAdapter, Idefics3Adapter, Mistral3Adapter, Gemma3Adapter,
)  # fmt: skip


def supported_models() -> list[str]:
    return [name for adapter in ADAPTERS for name in adapter.model_classes]


def adapter_class(model_class: str) -> type[Adapter]:
    """The adapter class that serves the top-level model class named `model_class` (its family's facts)."""
    for adapter in ADAPTERS:
        if model_class in adapter.model_classes:
            return adapter
    raise UnsupportedModel(f"st3 does not support {model_class}. Supported models: {', '.join(supported_models())}.")


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter for `model`, or an `UnsupportedModel` (a TypeError) naming what is supported."""
    name = type(model).__name__
    for adapter in ADAPTERS:
        if name in adapter.model_classes:
            return adapter(model)
    raise UnsupportedModel(
        f"st3 does not support {name}. Supported models: {', '.join(supported_models())}. "
        "Load one with e.g. LlavaForConditionalGeneration.from_pretrained(...)."
    )


__all__ = [
    "Adapter", "Gemma3Adapter", "Grid", "Idefics3Adapter", "InternVLAdapter", "LlavaAdapter", "LlavaNextAdapter",
    "LlavaOnevisionAdapter", "MaskRule", "Mistral3Adapter",
    "Qwen25VLAdapter", "Qwen2VLAdapter", "Qwen3VLAdapter", "UnsupportedModel",
    "adapter_class", "adapter_for", "supported_models",
]  # fmt: skip
