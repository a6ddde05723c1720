"""`st3 generate`: a checkpoint on disk, an image, prompts, a method; answers and costs side by side."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from st3.cli import app
from st3_scenes.scenes import scene

runner = CliRunner()


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "scene.png"
    scene(2_000_000).image.save(path)
    return str(path)


def test_generate_compares_and_draws(scenes_model_dir, image_path, tmp_path):
    out, plot = tmp_path / "answers.json", tmp_path / "kept.png"
    args = ["generate", scenes_model_dir, "--image", image_path, "-p", "what is at the top left?", "-p",
            "describe the image.", "-m", "fastv", "--knob", "ratio=0.75", "--max-new-tokens", "4",
            "--json", str(out), "--plot", str(plot)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["method"]["knobs"]["ratio"] == 0.75
    assert len(report["method"]["answers"]) == len(report["unpruned"]["answers"]) == 2
    assert report["trace"]["visual_per_layer"][-1] == 81  # ceil(0.25 * 324)
    assert plot.stat().st_size > 5_000


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model": "/nonexistent/dir"}, "cannot load"),
        ({"image": "/nonexistent.png"}, "image: cannot read"),
        ({"method": "nope"}, "unknown method"),
        ({"knob": "ratio=7"}, "ratio: must be in"),
    ],
)
def test_generate_rejects_bad_input_clearly(change, message, scenes_model_dir, image_path):
    values = {"model": scenes_model_dir, "image": image_path, "method": "st3", "knob": "ratio=0.5"} | change
    args = ["generate", values["model"], "--image", values["image"], "-p", "what?", "-m", values["method"],
            "--knob", values["knob"], "--max-new-tokens", "2"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())


def test_load_picks_the_checkpoints_own_supported_class_and_refuses_others(tmp_path):
    from transformers import BertConfig, BertModel

    from st3.compare import load
    from st3.testing import tiny_qwen_vl

    qwen = tmp_path / "qwen"
    tiny_qwen_vl("qwen2.5-vl", layers=2).save_pretrained(qwen)
    with pytest.raises(ValueError, match="cannot load .*'s processor"):  # the model loads; no processor saved
        load(str(qwen))
    bert = tmp_path / "bert"
    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertModel(config).save_pretrained(bert)
    with pytest.raises(ValueError, match="st3 does not support BertModel; supported: LlavaForConditionalGeneration"):
        load(str(bert))
