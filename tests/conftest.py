"""Shared fixtures: tiny random LLaVA models (fp32) and a left-padded batch of three prompts."""

from __future__ import annotations

import pytest
import torch

from st3.tiny import tiny_inputs, tiny_llava

torch.set_num_threads(2)

#: (text before, text after) the image tokens, per sample: three prompts of different lengths.
BATCH = ((4, 6), (2, 9), (5, 3))


@pytest.fixture(scope="session")
def model():
    return tiny_llava(attn="sdpa")


@pytest.fixture(scope="session")
def eager_model():
    return tiny_llava(attn="eager")


@pytest.fixture()
def inputs(model):
    return tiny_inputs(model, BATCH)


@pytest.fixture(scope="session")
def scenes_model_dir(tmp_path_factory) -> str:
    """A tiny random scenes LLaVA saved with its processor, loaded back like a hub checkpoint."""
    from st3.data.model import ModelSpec, build_model
    from st3.data.processor import build_processor

    spec = ModelSpec(vision_hidden=32, vision_layers=2, vision_heads=2, text_hidden=32, text_layers=4,
                     text_heads=2, text_kv_heads=1, text_intermediate=64)  # fmt: skip
    path = tmp_path_factory.mktemp("scenes-llava")
    build_model(spec).save_pretrained(path)
    build_processor().save_pretrained(path)
    return str(path)


def single(inputs: dict, sample: int) -> dict:
    """Sample `sample` of a left-padded batch, without its padding."""
    keep = inputs["attention_mask"][sample].bool()
    return {
        "input_ids": inputs["input_ids"][sample : sample + 1, keep],
        "attention_mask": inputs["attention_mask"][sample : sample + 1, keep],
        "pixel_values": inputs["pixel_values"][sample : sample + 1],
    }
