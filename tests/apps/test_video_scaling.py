"""benchmarks/video_scaling.py at a tiny shape: it runs, and the visual token counts it reports are the inputs'."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "video_scaling.py"


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("video_scaling", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("scaling") / "out.json"
    argv = ["--tiny", "--layers", "3", "--image", "4x4", "--large", "6x8", "--frame", "2x3", "--frames", "2", "4",
            "--new-tokens", "2", "--repeats", "1", "--warmup", "0", "--json", str(out)]  # fmt: skip
    returned = module.main(argv)
    assert json.loads(out.read_text())["cases"] == json.loads(json.dumps(returned["cases"]))
    return returned


def test_reports_the_visual_tokens_of_each_case(result):
    # 4x4 and 6x8 merged grids; videos of 2 and 4 frames fold into 1 and 2 grids of 2x3 (temporal patch 2)
    assert [(c["label"], c["visual_tokens"]) for c in result["cases"]] == [
        ("image", 16), ("large image", 48), ("video 2 frames", 6), ("video 4 frames", 12)
    ]  # fmt: skip
    for case in result["cases"]:
        assert case["prompt_tokens"] == case["visual_tokens"] + 35 + 2 + 40  # text, vision start and end, text


def test_each_method_beside_its_bound(result):
    for case in result["cases"]:
        assert set(case["methods"]) == {"st3", "fastv", "spread"}
        spread = case["methods"]["spread"]
        assert spread["visual_per_layer"][0] == round(case["visual_tokens"] / 3)  # a share, not a fixed count
        for row in case["methods"].values():
            assert row["prefill_bound"] >= 1 and row["e2e_bound"] >= 1
            assert row["prefill_efficiency"] == pytest.approx(row["prefill_speedup"] / row["prefill_bound"])
            assert row["e2e_efficiency"] == pytest.approx(row["e2e_speedup"] / row["e2e_bound"])
