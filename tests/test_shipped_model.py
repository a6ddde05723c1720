"""The scenes model that ships in st3/assets: it loads like a hub checkpoint and answers test questions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import st3
from st3.data.evaluate import answers
from st3.data.tasks import ANSWER_TOKENS, example, parse_caption

SHIPPED = Path(st3.__file__).parent / "assets" / "scenes-llava"
pytestmark = pytest.mark.skipif(not (SHIPPED / "config.json").is_file(), reason="no trained model in st3/assets")


@pytest.fixture(scope="module")
def shipped():
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(SHIPPED).eval()
    return model, AutoProcessor.from_pretrained(SHIPPED)


def test_shipped_model_is_small_and_has_the_documented_shape(shipped):
    model, processor = shipped
    assert sum(f.stat().st_size for f in SHIPPED.iterdir()) <= 30 * 2**20
    assert model.config.image_seq_length == 324 and type(processor).__name__ == "LlavaProcessor"
    assert model.dtype == torch.float32


def test_shipped_model_answers_test_questions_unpruned(shipped):
    model, processor = shipped
    questions = [example("test", i) for i in range(24)]
    got = answers(model, processor, questions, max_new_tokens=ANSWER_TOKENS["qa"])
    right = [g == e.answer for e, g in zip(questions, got)]
    assert sum(right) >= 23, list(zip([e.question for e in questions], [e.answer for e in questions], got))


def test_shipped_model_writes_test_captions_unpruned(shipped):
    model, processor = shipped
    captions = [example("test", i, "caption") for i in range(4)]
    got = answers(model, processor, captions, max_new_tokens=ANSWER_TOKENS["caption"])
    assert all(parse_caption(g) is not None for g in got), got
    assert all(g == e.answer for e, g in zip(captions, got)), got
