"""Tiny random models and inputs for tests, smoke runs and the demo's no-download fallback.

Each family declares its tiny model and example inputs on its adapter (`Adapter.tiny`, `Adapter.tiny_inputs`,
`Adapter.example_samples`, in its file in `st3/adapters/`); the names below find them there, so a new family
needs nothing here. `example_inputs` builds the inputs of any tiny model through the adapter registry.
"""

from __future__ import annotations

import torch
from torch import nn

from st3.adapters import adapter_class
from st3.adapters.build import IMAGE_TOKEN, PAD_TOKEN, left_padded
from st3.adapters.gemma3 import GEMMA_BOI, GEMMA_EOI, GEMMA_IMAGE, Gemma3Adapter
from st3.adapters.idefics3 import Idefics3Adapter
from st3.adapters.internvl import INTERNVL_END, INTERNVL_START, InternVLAdapter
from st3.adapters.llava import LlavaAdapter
from st3.adapters.llava_next import LlavaNextAdapter
from st3.adapters.llava_onevision import OV_IMAGE, OV_VIDEO, LlavaOnevisionAdapter
from st3.adapters.mistral3 import MISTRAL_BREAK, MISTRAL_END, Mistral3Adapter
from st3.adapters.qwen_vl import (
    QWEN_END,
    QWEN_IMAGE,
    QWEN_START,
    QWEN_VIDEO,
    Qwen2VLAdapter,
    Qwen3VLAdapter,
    Qwen25VLAdapter,
)

QWEN_FAMILIES = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")


def example_inputs(model: nn.Module, samples=None, seed: int = 0) -> dict[str, torch.Tensor]:
    """A left-padded batch for any tiny model, from its family's adapter (default: its `example_samples`)."""
    return adapter_class(type(model).__name__).tiny_inputs(model, samples, seed)


def tiny_llava(*, layers: int = 6, hidden: int = 64, heads: int = 4, kv_heads: int = 2, vocab: int = 128,
               image_size: int = 48, patch_size: int = 8, attn: str = "sdpa", seed: int = 0, text_model: str = "llama",
               **text_overrides) -> nn.Module:  # fmt: skip
    """A LLaVA-1.5-shaped model (`LlavaAdapter.tiny`)."""
    return LlavaAdapter.tiny(layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, vocab=vocab,
                             image_size=image_size, patch_size=patch_size, attn=attn, seed=seed, text_model=text_model,
                             **text_overrides)  # fmt: skip


def tiny_inputs(model: nn.Module, text_lengths: tuple[tuple[int, int], ...] = ((4, 6),), seed: int = 0) -> dict:
    """A left-padded LLaVA batch: per sample, (text before, text after) the image tokens (`LlavaAdapter`)."""
    return LlavaAdapter.tiny_inputs(model, text_lengths, seed)


def tiny_qwen_vl(family: str, *, layers: int = 4, hidden: int = 64, attn: str = "sdpa", seed: int = 0) -> nn.Module:
    """A Qwen2-VL / Qwen2.5-VL / Qwen3-VL model (`QwenVLAdapter.tiny`)."""
    adapters = {adapter.family: adapter for adapter in (Qwen2VLAdapter, Qwen25VLAdapter, Qwen3VLAdapter)}
    if family not in adapters:
        raise ValueError(f"unknown Qwen-VL family {family!r}; known: {', '.join(QWEN_FAMILIES)}")
    return adapters[family].tiny(layers=layers, hidden=hidden, attn=attn, seed=seed)


def tiny_qwen_inputs(model: nn.Module, samples, seed: int = 0) -> dict:
    """Per sample (text before, text after, kind, (t, h, w)) (`QwenVLAdapter.tiny_inputs`)."""
    return example_inputs(model, samples, seed)


def tiny_llava_next(*, layers: int = 6, hidden: int = 64, attn: str = "sdpa", seed: int = 0) -> nn.Module:
    return LlavaNextAdapter.tiny(layers=layers, hidden=hidden, attn=attn, seed=seed)


def tiny_next_inputs(model: nn.Module, samples, seed: int = 0) -> dict:
    return LlavaNextAdapter.tiny_inputs(model, samples, seed)


def tiny_llava_onevision(*, layers: int = 6, hidden: int = 64, attn: str = "sdpa", seed: int = 0) -> nn.Module:
    return LlavaOnevisionAdapter.tiny(layers=layers, hidden=hidden, attn=attn, seed=seed)


def tiny_onevision_inputs(model: nn.Module, samples, seed: int = 0) -> dict:
    return LlavaOnevisionAdapter.tiny_inputs(model, samples, seed)


def tiny_internvl(*, layers: int = 6, hidden: int = 64, attn: str = "sdpa", seed: int = 0) -> nn.Module:
    return InternVLAdapter.tiny(layers=layers, hidden=hidden, attn=attn, seed=seed)


def tiny_internvl_inputs(model: nn.Module, samples, seed: int = 0) -> dict:
    return InternVLAdapter.tiny_inputs(model, samples, seed)


def tiny_idefics3(*, layers: int = 6, hidden: int = 64, attn: str = "sdpa", seed: int = 0, smolvlm: bool = False):
    return Idefics3Adapter.tiny(layers=layers, hidden=hidden, attn=attn, seed=seed, smolvlm=smolvlm)


def tiny_idefics3_inputs(model: nn.Module, samples, seed: int = 0) -> dict:
    return Idefics3Adapter.tiny_inputs(model, samples, seed)


def tiny_mistral3(*, layers: int = 6, hidden: int = 64, attn: str = "sdpa", seed: int = 0, **text_overrides):
    return Mistral3Adapter.tiny(layers=layers, hidden=hidden, attn=attn, seed=seed, **text_overrides)


def tiny_mistral3_inputs(model: nn.Module, samples, seed: int = 0) -> dict:
    return Mistral3Adapter.tiny_inputs(model, samples, seed)


def tiny_gemma3(*, layers: int = 6, hidden: int = 64, window: int = 56, attn: str = "sdpa", seed: int = 0):
    return Gemma3Adapter.tiny(layers=layers, hidden=hidden, window=window, attn=attn, seed=seed)


def tiny_gemma3_inputs(model: nn.Module, samples, seed: int = 0) -> dict:
    return Gemma3Adapter.tiny_inputs(model, samples, seed)


__all__ = [
    "GEMMA_BOI", "GEMMA_EOI", "GEMMA_IMAGE", "IMAGE_TOKEN", "INTERNVL_END", "INTERNVL_START", "MISTRAL_BREAK",
    "MISTRAL_END", "OV_IMAGE", "OV_VIDEO", "PAD_TOKEN", "QWEN_END", "QWEN_FAMILIES", "QWEN_IMAGE", "QWEN_START",
    "QWEN_VIDEO", "example_inputs", "left_padded", "tiny_gemma3", "tiny_gemma3_inputs", "tiny_idefics3",
    "tiny_idefics3_inputs", "tiny_inputs", "tiny_internvl", "tiny_internvl_inputs", "tiny_llava", "tiny_llava_next",
    "tiny_llava_onevision", "tiny_mistral3", "tiny_mistral3_inputs", "tiny_next_inputs", "tiny_onevision_inputs",
    "tiny_qwen_inputs", "tiny_qwen_vl",
]  # fmt: skip
