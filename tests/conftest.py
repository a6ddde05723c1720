"""Shared fixtures: tiny random LLaVA models (fp32) and a left-padded batch of three prompts."""

from __future__ import annotations

import pytest
import torch

from st3.testing import tiny_inputs, tiny_llava

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
    """A tiny random scenes LLaVA saved with its processor (a real processor, no download): the scenes package's."""
    from st3_scenes.model import save_tiny

    return save_tiny(tmp_path_factory.mktemp("scenes-llava"))


def single(inputs: dict, sample: int) -> dict:
    """Sample `sample` of a left-padded batch, without its padding."""
    keep = inputs["attention_mask"][sample].bool()
    return {
        "input_ids": inputs["input_ids"][sample : sample + 1, keep],
        "attention_mask": inputs["attention_mask"][sample : sample + 1, keep],
        "pixel_values": inputs["pixel_values"][sample : sample + 1],
    }
