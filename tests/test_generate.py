"""`st3 generate`: a checkpoint on disk, an image, prompts, a method; answers and costs side by side."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from st3.cli import app
from st3.data.scenes import scene

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
