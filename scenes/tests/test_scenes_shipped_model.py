"""The scenes model that ships with the scenes package: it loads like a hub checkpoint and answers test questions."""

from __future__ import annotations

import pytest
import torch

from st3_scenes import MODEL_DIR as SHIPPED
from st3_scenes.evaluate import answers
from st3_scenes.tasks import ANSWER_TOKENS, example, parse_caption


@pytest.fixture(scope="module")
def shipped():
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from st3.compat import LOAD_KWARGS  # transformers' own layers (5.25 kernelizes by default)

    model = LlavaForConditionalGeneration.from_pretrained(SHIPPED, **LOAD_KWARGS).eval()
    return model, AutoProcessor.from_pretrained(SHIPPED)


def test_shipped_model_is_small_and_has_the_documented_shape(shipped):
    model, processor = shipped
    assert sum(f.stat().st_size for f in SHIPPED.iterdir()) <= 30 * 2**20
    assert model.config.image_seq_length == 324 and type(processor).__name__ == "LlavaProcessor"
    assert model.dtype == torch.float32


def test_shipped_model_answers_test_questions_unpruned(shipped):
    model, processor = shipped
    questions = [example("test", i) for i in range(24)]
    got, _ = answers(model, processor, questions, max_new_tokens=ANSWER_TOKENS["qa"])
    right = [g == e.answer for e, g in zip(questions, got)]
    assert sum(right) >= 23, list(zip([e.question for e in questions], [e.answer for e in questions], got))


def test_shipped_model_writes_test_captions_unpruned(shipped):
    model, processor = shipped
    captions = [example("test", i, "caption") for i in range(4)]
    got, _ = answers(model, processor, captions, max_new_tokens=ANSWER_TOKENS["caption"])
    assert all(parse_caption(g) is not None for g in got), got
    assert all(g == e.answer for e, g in zip(captions, got)), got
