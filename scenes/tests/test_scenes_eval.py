"""`st3 eval` end to end on a tiny scenes model saved and loaded like a hub checkpoint, and its errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from st3.budget import depth_scaled
from st3.cli import app

runner = CliRunner()


def test_eval_runs_end_to_end_and_writes_json_and_png(scenes_model_dir, tmp_path):
    out, plot = tmp_path / "eval.json", tmp_path / "eval.png"
    args = ["eval", scenes_model_dir, "--split", "validation", "-m", "st3", "-m", "fastv", "--budget", "1.0",
            "--budget", "0.5", "--qa", "3", "--captions", "2", "--json", str(out), "--plot", str(plot)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    assert {(r["method"], r["budget"], r["task"]) for r in rows} == {
        (m, b, t) for m, b in [("unpruned", 1.0), ("st3", 0.5), ("fastv", 0.5)] for t in ("qa", "caption")
    }
    for row in rows:
        if row["method"] != "unpruned":
            assert abs(row["visual_per_layer"] - 0.5 * 324) <= 1
            assert row["prefill_flops_ratio"] < 1 and row["kv_ratio"] < 1
    assert plot.stat().st_size > 10_000


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["/nonexistent/model"], "no model at"),
        (["MODEL", "-m", "nope"], "unknown method"),
        (["MODEL", "-m", "st3:query=all"], "method 'st3:query=all': query: must be 'last' or 'text'"),
        (["MODEL", "-m", "st3:bogus=1"], "bogus: not a knob of st3"),
        (["MODEL", "--budget", "1.5"], "budget"),
        (["MODEL", "--split", "dev"], "split"),
    ],
)
def test_eval_rejects_bad_input_clearly(args, message, scenes_model_dir):
    result = runner.invoke(app, ["eval", *[scenes_model_dir if a == "MODEL" else a for a in args]])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())


def test_layer_knobs_scale_with_depth():
    assert depth_scaled("st3", 32) == {"start_layer": 2, "stride": 3}
    assert depth_scaled("st3", 4) == {"start_layer": 1, "stride": 1}
    assert depth_scaled("fastv", 16) == {"layer": 1}
    assert depth_scaled("visionzip", 4) == {}


def test_eval_keeps_knobs_given_in_the_method_spec(scenes_model_dir, tmp_path):
    out = tmp_path / "eval.json"
    args = ["eval", scenes_model_dir, "-m", "st3:query=text", "-m", "fastv:layer=2", "--budget", "0.5", "--qa", "2",
            "--captions", "0", "--json", str(out)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = {row["method"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows["st3:query=text"]["knobs"]["query"] == "text"
    assert rows["fastv:layer=2"]["knobs"]["layer"] == 2
    assert abs(rows["st3:query=text"]["visual_per_layer"] - 0.5 * 324) <= 1


def test_eval_first_reads_a_held_out_range_of_the_split(scenes_model_dir, monkeypatch):
    import st3_scenes.evaluate as evaluation

    seen = []
    original = evaluation.example

    def spy(split, n, task):
        seen.append((split, n, task))
        return original(split, n, task)

    monkeypatch.setattr(evaluation, "example", spy)
    result = evaluation.evaluate(scenes_model_dir, "test", ("random",), (1.0,), qa=2, captions=1, first=5000)
    assert sorted(seen) == [("test", 5000, "caption"), ("test", 5000, "qa"), ("test", 5001, "qa")]
    assert result["first"] == 5000


def test_eval_without_the_scenes_package_says_how_to_install_it():
    import subprocess
    import sys

    code = "import sys; sys.modules['st3_scenes'] = None\nfrom st3.cli import app\napp(['eval', 'x'])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "pip install --no-deps -e scenes/" in done.stderr


def test_layer_knobs_scale_with_depth_for_compositions():
    assert depth_scaled("st3+dart", 4) == {"start_layer": 1, "stride": 1}
    assert depth_scaled("dart", 4) == {"layer": 1}
    assert depth_scaled("divprune", 4) == {} and depth_scaled("cdpruner", 4) == {}
