"""`st3 search` (G-Search on the scenes validation split) writes a schedule spec that keeps its target."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import st3
from st3.cli import app

scenes = pytest.importorskip("st3_scenes", reason="needs the scenes package (make install installs it)")


def test_search_keeps_the_unpruned_accuracy_on_its_questions_and_writes_a_spec(tmp_path):
    path = tmp_path / "schedule.json"
    arguments = ["--qa", "2", "--tolerance", "0", "--first-layer", "3", "--json", str(path)]
    result = CliRunner().invoke(app, ["search", str(scenes.MODEL_DIR), *arguments])
    assert result.exit_code == 0, result.output
    found = json.loads(path.read_text())
    assert found["split"] == "validation" and found["accuracy"] >= found["unpruned"]
    counts = found["counts_per_layer"]
    assert counts[:3] == [324, 324, 324] and counts[3] <= 324  # one layer searched: a bisection, ~9 trials
    assert f"-m {found['spec']}" in result.output
    spec = found["spec"]
    method = st3.get("schedule", counts=spec.split("counts=")[1])  # the spec builds the searched schedule
    assert [list(p) for p in method.counts] == found["counts"]


def test_search_with_everything_allowed_drops_every_token_after_the_first_layer():
    from st3_scenes.search import search

    found = search(scenes.MODEL_DIR, qa=1, tolerance=1.0, first_layer=2)
    assert found["counts_per_layer"] == [324, 324, 0, 0] and found["spec"] == "schedule:counts=2:0"
    with pytest.raises(ValueError, match="^first_layer: must be in"):
        search(scenes.MODEL_DIR, qa=2, first_layer=4)


def test_psigmoid_fit_matches_the_budget_and_writes_a_spec(tmp_path):
    path = tmp_path / "psigmoid.json"
    arguments = ["--form", "psigmoid", "--budget", "0.5", "--qa", "2", "--json", str(path)]
    result = CliRunner().invoke(app, ["search", str(scenes.MODEL_DIR), *arguments])
    assert result.exit_code == 0, result.output
    found = json.loads(path.read_text())
    assert found["form"] == "psigmoid" and found["accuracy"] == max(t["accuracy"] for t in found["trials"])
    assert len(found["trials"]) == 10 and f"-m {found['spec']}" in result.output
    assert st3.get("psigmoid", **{k: found["best"][k] for k in ("steepness", "floor", "midpoint", "start_layer")})
    reached = [t for t in found["trials"] if "accuracy" in t]
    assert reached and all(0.0 <= t["midpoint"] <= 1.0 for t in reached)
    refused = CliRunner().invoke(app, ["search", str(scenes.MODEL_DIR), "--form", "psigmoid", "--budget", "1.5"])
    assert refused.exit_code != 0 and "budget: a share of the visual tokens" in refused.output
