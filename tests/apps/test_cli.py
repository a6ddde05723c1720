"""The command line: the main job, the planner, and clear errors for bad input."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from st3.cli import app

runner = CliRunner()


def test_demo_compares_unpruned_and_st3(tmp_path):
    path, plot = tmp_path / "demo.json", tmp_path / "demo.png"
    result = runner.invoke(app, ["demo", "--max-new-tokens", "3", "--json", str(path), "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    assert "KV cache at the end" in result.output
    trace = json.loads(path.read_text())["trace"]
    assert trace["kv_bytes"] < trace["kv_bytes_unpruned"]
    assert plot.stat().st_size > 10_000


def test_demo_compares_any_method_given_and_refuses_a_bad_spec(tmp_path):
    path = tmp_path / "demo.json"
    args = ["demo", "-m", "spread:keep=54", "--max-new-tokens", "3", "--json", str(path), "--plot", ""]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(path.read_text())
    assert report["method"]["name"] == "spread" and report["method"]["knobs"]["keep"] == 54
    assert set(report["trace"]["visual_per_layer"]) == {54}
    for spec, message in [("nope", "unknown method"), ("spread:keep=-1", "keep"), ("spread:colour=1", "colour")]:
        result = runner.invoke(app, ["demo", "-m", spec, "--plot", ""])
        assert result.exit_code == 2, spec
        assert message in " ".join(result.output.split()), result.output


def test_demo_without_a_trained_model_uses_the_random_llava_layout(tmp_path):
    from rich.console import Console

    from st3.demo import run_demo

    report = run_demo(max_new_tokens=3, console=Console(), model_dir=tmp_path / "absent")
    assert report["trace"]["visual_per_layer"][:3] == [576, 576, 461]


def test_demo_finds_the_scenes_model_from_a_clone_and_falls_back_without_the_package(monkeypatch):
    import sys

    import st3_scenes
    from st3.demo import scenes_model_dir

    assert scenes_model_dir() == st3_scenes.MODEL_DIR and (st3_scenes.MODEL_DIR / "config.json").is_file()
    monkeypatch.setitem(sys.modules, "st3_scenes", None)  # what `pip install st3` alone gives
    assert scenes_model_dir() is None


def test_demo_uses_a_trained_scenes_model_when_present(scenes_model_dir, tmp_path):
    from pathlib import Path

    from rich.console import Console

    from st3.demo import run_demo

    report = run_demo(
        max_new_tokens=3, plot_path=str(tmp_path / "kept.png"), console=Console(), model_dir=Path(scenes_model_dir)
    )
    assert len(report["expected"]) == len(report["questions"]) == len(report["method"]["answers"]) == 5
    assert report["questions"][-1] == "describe the image."
    assert (tmp_path / "kept.png").stat().st_size > 5_000


def test_plan_prints_the_default_arithmetic(tmp_path):
    path = tmp_path / "plan.json"
    result = runner.invoke(app, ["plan", "--json", str(path)])
    assert result.exit_code == 0, result.output
    assert "prefill FLOPs: 45.3% of unpruned" in result.output
    assert "KV cache at the end: 27.5% of unpruned" in result.output
    assert json.loads(path.read_text())["prefill_visual"][:3] == [576, 576, 461]


def test_plan_rejects_bad_input_clearly():
    for args, message in [
        (["--knob", "ratio=2"], "ratio: must be in [0, 1)"),
        (["--knob", "ratio"], "expected KNOB=VALUE"),
        (["--method", "nope"], "unknown method"),
        (["--shape", "gpt2"], "unknown shape"),
        (["--knob", "colour=1"], "colour"),
    ]:
        result = runner.invoke(app, ["plan", *args])
        assert result.exit_code == 2, args
        assert message in " ".join(result.output.split()), result.output


def test_methods_lists_st3():
    result = runner.invoke(app, ["methods"])
    assert result.exit_code == 0 and "st3" in result.output.split()
