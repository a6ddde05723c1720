"""`st3 frontier` on the tiny shape: accuracies joined to measured speed-ups of the same budgets, the ratios
taken from the same run's medians, unreachable budgets reported, JSON and PNG written. No timing is asserted:
the machine is shared."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from st3.bench.frontier import FrontierConfig, run_frontier, write_plot
from st3.bench.report import write_json
from st3.cli import app

ACCURACY = {
    "model": "fixture", "split": "test", "first": 0, "visual_tokens": 36, "num_layers": 4,
    "rows": [
        {"method": "unpruned", "budget": 1.0, "task": "qa", "accuracy": 0.9},
        {"method": "unpruned", "budget": 1.0, "task": "caption", "accuracy": 0.8},
        {"method": "spread", "budget": 0.5, "task": "qa", "accuracy": 0.85},
        {"method": "spread", "budget": 0.5, "task": "caption", "accuracy": 0.5},
        {"method": "spread", "budget": 0.11, "task": "qa", "accuracy": 0.4},
        {"method": "pyramiddrop", "budget": 0.5, "task": "qa", "accuracy": 0.7},
        {"method": "nosuch", "budget": 0.5, "task": "qa", "accuracy": 0.1},  # e.g. a method renamed since
    ],
    "notes": ["pyramiddrop at 11%: PyramidDrop cannot reach visual_per_layer=35.64 through keep"],
}  # fmt: skip


@pytest.fixture(scope="module")
def accuracy_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("frontier") / "eval.json"
    path.write_text(json.dumps(ACCURACY))
    return str(path)


@pytest.fixture(scope="module")
def result(accuracy_file):
    config = FrontierConfig(model="tiny", dtype="fp32", budgets=[0.5, 0.11], accuracy=[accuracy_file], repeats=2,
                            warmup=1, answers=(2, 4), progress=False)  # fmt: skip
    return run_frontier(config)


def test_methods_of_the_accuracy_file_at_every_budget_joined(result):
    rows = {(r["method"], r["budget"]): r for r in result["rows"]}
    assert list(rows) == [(m, b) for m in ("spread", "pyramiddrop", "nosuch") for b in (0.5, 0.11)]
    assert (rows["spread", 0.5]["qa"], rows["spread", 0.5]["caption"]) == (0.85, 0.5)
    assert (rows["spread", 0.11]["qa"], rows["spread", 0.11]["caption"]) == (0.4, None)
    assert result["unpruned"] == {"qa": 0.9, "caption": 0.8}
    unreachable = rows["pyramiddrop", 0.11]
    assert not unreachable["reachable"] and "cannot reach" in unreachable["unreachable"]
    assert unreachable["accuracy_note"].startswith("pyramiddrop at 11%")
    assert "unknown method 'nosuch'" in rows["nosuch", 0.5]["unreachable"] and rows["nosuch", 0.5]["qa"] == 0.1
    assert list(result["runs"]) == ["unpruned", "spread @ 50%", "spread @ 11%", "pyramiddrop @ 50%"]
    for (_, budget), row in rows.items():  # the timed run keeps the budget st3 eval's accuracy was measured at
        if row["reachable"]:
            assert row["visual_per_layer"] == pytest.approx(budget * result["visual_tokens"], abs=1.0)


def test_ratios_are_the_same_runs_medians(result):
    base = result["runs"]["unpruned"]
    assert result["answer_tokens"] == {"ttft": 1, "short": 2, "long": 4} and result["times_shown"]
    for row in result["rows"]:
        if not row["reachable"]:
            continue
        run = result["runs"][f"{row['method']} @ {row['budget']:.0%}"]
        assert len(run["token_s_samples"]["long"]) == 2
        assert run["ttft_s"]["median"] == pytest.approx(run["prefill_s"]["median"])  # one stamp, two readings
        assert run["short_s"]["median"] < run["long_s"]["median"] <= run["e2e_s"]["median"]
        for name in ("ttft", "short", "long"):
            assert row[f"{name}_speedup"] == pytest.approx(base[f"{name}_s"]["median"] / run[f"{name}_s"]["median"])
            assert row[f"{name}_speedup_rounds"]["n"] == 2
        assert row["kv_ratio"] == pytest.approx(run["kv_bytes_peak"] / base["kv_bytes_peak"])
    kv = {r["budget"]: r["kv_ratio"] for r in result["rows"] if r["method"] == "spread"}
    assert kv[0.11] < kv[0.5] < 1.0


def test_json_and_plot(result, tmp_path):
    write_json(result, tmp_path / "f.json")
    write_plot(result, tmp_path / "f.png")
    data = json.loads((tmp_path / "f.json").read_text())
    assert data["rows"][0]["qa"] == 0.85 and data["meta"]["config"]["budgets"] == [0.5, 0.11]
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_without_repeats_shows_no_times(accuracy_file, tmp_path):
    out, png = tmp_path / "cli.json", tmp_path / "cli.png"
    args = ["frontier", "--model", "tiny", "--accuracy", accuracy_file, "-m", "vtw", "--budget", "0.5",
            "--budget", "0.11", "--repeats", "1", "--warmup", "0", "--dtype", "fp32", "--json", str(out),
            "--plot", str(png)]  # fmt: skip
    run = CliRunner().invoke(app, args)
    assert run.exit_code == 0, run.output
    text = " ".join(run.output.split())
    assert "times not shown" in text and "unreachable: vtw at 11%" in text and "measured seconds" not in text
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["budget"], r["reachable"]) for r in rows] == [("vtw", 0.5, True), ("vtw", 0.11, False)]
    assert all(r.get("ttft_speedup") is None for r in rows)
    assert png.exists()


@pytest.mark.parametrize(
    ("args", "error"),
    [(["-m", "spread:match"], "always matched"), (["-m", "nosuch"], "unknown method"), (["--budget", "1"], "(0, 1)"),
     (["--budget", "0.33", "--budget", "0.333"], "whole percents")],
)
def test_cli_refuses_before_building(args, error):
    run = CliRunner().invoke(app, ["frontier", "--model", "tiny", *args])
    assert run.exit_code != 0 and error in " ".join(run.output.split()), run.output
