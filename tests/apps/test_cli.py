"""The command line: the main job, the planner, and clear errors for bad input."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import st3
from st3.cli import app

runner = CliRunner()


def test_demo_compares_unpruned_and_st3(tmp_path):
    path, plot = tmp_path / "demo.json", tmp_path / "demo.png"
    args = ["demo", "--max-new-tokens", "3", "--repeats", "2", "--json", str(path), "--plot", str(plot)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "KV cache at the end" in result.output and "wall time (s): 2 runs of each" in " ".join(result.output.split())
    report = json.loads(path.read_text())
    assert report["trace"]["kv_bytes"] < report["trace"]["kv_bytes_unpruned"]
    wall = report["wall"]
    assert wall["repeats"] == 2 and wall["new_tokens"] == 3 and len(wall["seconds"]["method"]) == 2
    assert plot.stat().st_size > 10_000


def recorded(**kwargs) -> tuple[dict, str]:
    """`run_demo(**kwargs)`'s report and what it printed (wide, so rows do not wrap)."""
    import io

    from rich.console import Console

    from st3.demo import run_demo

    out = io.StringIO()
    report = run_demo(console=Console(file=out, width=250), **kwargs)
    return report, out.getvalue()


def test_a_method_that_prunes_nothing_is_never_shown_faster(scenes_model_dir):
    """A no-op ST3 (ratio 0, annealing to 1: every token, FLOP and KV byte of unpruned) is timed like any method,
    on whatever load the machine has: what is printed may say 'within noise' or 'slower', never a speed-up."""
    from pathlib import Path

    noop = st3.ST3(ratio=0.0, anneal_final=1.0)
    report, printed = recorded(method=noop, model_dir=Path(scenes_model_dir), max_new_tokens=3, repeats=2)
    wall = report["wall"]
    assert wall["same_work"] and "faster" not in wall["verdict"] and "faster" not in printed
    assert wall["verdict"].startswith(("within noise", "one run")) or "slower" in wall["verdict"]
    assert "note: nothing pruned: ratio=0.0 on" in printed  # the CLI line of the trace's note


@pytest.mark.parametrize(
    ("unpruned", "method", "same_work", "shown"),
    [
        ([1.0, 1.2, 1.1], [0.5, 0.6, 0.55], False, "50% (faster every run)"),
        ([1.0, 1.2, 1.1], [0.5, 0.6, 0.55], True, "within noise (the same work: no FLOPs or KV saved)"),
        ([1.0, 1.2, 1.1], [0.9, 1.05, 0.95], False, "within noise (the runs overlap)"),
        ([1.0, 1.2, 1.1], [1.5, 1.6, 1.7], True, "145% (slower every run)"),
        ([4.06], [1.20], False, "one run each: too few to compare"),  # the single unpaired 29.5 %
    ],
)
def test_a_wall_time_ratio_is_claimed_only_beyond_noise(unpruned, method, same_work, shown):
    from st3.compare import verdict

    assert verdict(unpruned, method, same_work) == shown


def test_wall_times_are_interleaved_and_of_equal_length(model, inputs, monkeypatch):
    import st3.compare as compare

    method, order, original = st3.FastV(ratio=0.5), [], compare.timed_generate

    def recording(model, inputs, applied=None, **kwargs):
        order.append("M" if applied is method else "U")
        return original(model, inputs, applied, **kwargs)

    monkeypatch.setattr(compare, "timed_generate", recording)
    wall = compare.wall_times(model, inputs, method, new_tokens=4, repeats=4)
    assert "".join(order) == "UMMUUMMU"  # ABBA: a load that grows or fades hits both sides alike
    assert all(len(v) == 4 for v in wall["seconds"].values()) and wall["repeats"] == 4
    assert method.trace.decode_steps == 3  # exactly new_tokens - 1 decode forwards, whatever the model writes
    assert not wall["same_work"]


def test_demo_shows_expected_answers_in_a_column_with_marks(scenes_model_dir):
    from pathlib import Path

    report, printed = recorded(model_dir=Path(scenes_model_dir), max_new_tokens=3, repeats=0)
    assert "│ expected" in printed.replace("┃", "│") and "expected: " not in printed
    marks = printed.count("✓") + printed.count("✗ wrong")
    assert marks == 2 * len(report["expected"])  # both runs, every question
    assert "right (exact match): unpruned " in printed and "wall time: not measured" in printed


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


def test_plan_prices_each_shape_at_its_familys_visual_tokens():
    """Without --visual, a shape is priced at its bench image's tokens as its adapter counts them (anyres newlines,
    tiles, crops), not LLaVA-1.5's 576."""
    for shape, visual in (("llava-1.5-7b", 576), ("llava-next-7b", 2928), ("internvl3-8b", 1280)):
        result = runner.invoke(app, ["plan", "--shape", shape])
        assert result.exit_code == 0 and f"on {shape}: {visual} visual" in result.output, result.output


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


def test_methods_lists_each_method_with_its_description_and_knobs():
    result = runner.invoke(app, ["methods"])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    named = [line.split()[0] for line in lines if not line.startswith(" ")]
    assert named == st3.methods()
    spread = lines.index(next(line for line in lines if line.startswith("spread ")))
    assert "keep=192, layer=0, selector=spread(spatial=2.0" in lines[spread + 1]


def test_the_methods_catalogue_is_the_registry():
    """`st3 methods` reads a generated table (no torch import); it must be what the registry says today."""
    from pathlib import Path

    import st3.catalogue as catalogue

    fresh = catalogue.build()
    assert fresh == catalogue.CATALOGUE, "a method or knob changed: run `python -m st3.catalogue`"
    assert Path(catalogue.__file__).read_text() == catalogue.render(fresh)


def test_help_and_methods_start_without_importing_torch():
    """`import torch` alone takes ~2 s on a 2-core machine: --help and methods must not pay it."""
    import subprocess
    import sys

    code = ("import sys\nfrom typer.testing import CliRunner\nfrom st3.cli import app\n"
            "for args in (['--help'], ['methods'], ['plan', '--help']):\n"
            "    assert CliRunner().invoke(app, args).exit_code == 0, args\n"
            "print(sorted(m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stderr


def test_every_command_takes_a_method_spec_and_knobs(tmp_path):
    """One convention: `-m name:knob=value,...` and `--knob K=V` wherever a method is chosen."""
    path = tmp_path / "plan.json"
    result = runner.invoke(app, ["plan", "-m", "fastv:ratio=0.75", "--knob", "layer=3", "--json", str(path)])
    assert result.exit_code == 0, result.output
    assert json.loads(path.read_text())["method"].startswith("FastV(") and "layer=3, ratio=0.75" in result.output
    for command in ("demo", "generate", "plan", "bench", "eval"):
        text = " ".join(runner.invoke(app, [command, "--help"]).output.split())
        assert "--method -m" in text.replace(",", ""), command


def test_plan_matches_a_budget_or_a_token_count():
    result = runner.invoke(app, ["plan", "-m", "spread", "--budget", "0.25"])
    assert result.exit_code == 0, result.output
    assert "mean visual tokens per layer (prefill): 144.0" in result.output
    result = runner.invoke(app, ["plan", "-m", "spread", "--tokens", "100"])
    assert "keep=100" in result.output


def test_one_set_of_dtype_names():
    from st3.spec import dtype_name

    assert [dtype_name(name) for name in ("fp32", "bfloat16", "fp16", "auto")] == ["fp32", "bf16", "fp16", "auto"]
    with pytest.raises(ValueError, match="^dtype: must be one of fp32, bf16, fp16, got 'auto'"):
        dtype_name("auto", ("fp32", "bf16", "fp16"))
    for command in ("generate", "bench"):
        assert "fp32, bf16" in " ".join(runner.invoke(app, [command, "--help"]).output.split()), command


def test_eval_defaults_include_st3s_best_rule():
    import inspect

    from st3.cli import scenes_eval
    from st3_scenes.evaluate import METHODS

    default = inspect.signature(scenes_eval).parameters["method"].default.default
    assert tuple(default) == METHODS and "spread" in METHODS
