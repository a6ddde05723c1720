"""The scenes trainer end to end on a tiny spec: both phases, checkpoint/resume, export through save_pretrained."""

from __future__ import annotations

import json
import re
import runpy
from pathlib import Path

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from st3.compat import LOAD_KWARGS
from st3_scenes.model import ScenesSpec
from st3_scenes.tasks import ALWAYS_ASKED
from st3_scenes.train import CONTENT, COUNT, FOCUS_KINDS, WORD, focus_plan, main, parse_args

TINY = '{"vision_layers": 2, "text_layers": 2, "vision_hidden": 32, "text_hidden": 32, "text_intermediate": 64}'
WIDE_HEADS = TINY[:-1] + ', "text_head_dim": 16}'  # heads wider than text_hidden // text_heads


def script(name: str):
    """`main` of scripts/NAME.py, run as its users run it."""
    return runpy.run_path(str(Path(__file__).parents[1] / "scripts" / f"{name}.py"))["main"]


def test_colour_lookup_errors_script(scenes_model_dir, capsys):
    script("colour_lookup_errors")([scenes_model_dir, "--examples", "40"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["unique shape", "named by size"]
    assert all(re.search(r"\d+/\d+ right; \d+/\d+ wrong answers", line) for line in lines)


# counts: probes, count head, word focus, kind weights, and decoder heads of a width of their own
@pytest.mark.parametrize("counts", [False, True], ids=["cells", "counts"])
def test_trainer_runs_resumes_and_exports(tmp_path, capsys, counts):
    out, export = tmp_path / "run", tmp_path / "export"
    argv = ["--out", str(out), "--export", str(export), "--steps", "4", "--vision-steps", "2", "--vision-images", "2",
            "--images", "1", "--questions", "2", "--warmup", "1", "--eval-every", "100", "--eval-qa", "2",
            "--eval-captions", "1", "--spec", WIDE_HEADS if counts else TINY]  # fmt: skip
    argv += (
        ["--count-probes", "--count-layer", "0", "--word-focus", "--kind-weights", '{"count_colour": 3}']
        if counts
        else []
    )
    assert main(argv + ["--stop-at", "3"]) == {"step": 3}
    assert (out / "checkpoint.pt").exists() and not export.exists()
    if not counts:  # a checkpoint from before a ScenesSpec field or a flag existed resumes with its default
        state = torch.load(out / "checkpoint.pt", weights_only=False)
        del state["spec"]["text_head_dim"], state["args"]["word_focus"]
        torch.save(state, out / "checkpoint.pt")
    changed = [] if counts else ["--caption-weight", "2"]  # a resume may change the recipe, and says so
    assert main(argv + changed) == {"step": 4}
    printed = capsys.readouterr()
    assert "at step 3" in printed.out  # resumed, not restarted
    if counts:  # the first run's --stop-at only said where to stop: no change
        assert "flags changed" not in printed.out
    else:
        assert re.search(r"flags changed since: --caption-weight 1.0 -> 2.0$", printed.out, flags=re.M)
    assert "focus_position=" in printed.err and "focus_content=" in printed.err  # each lookup's own focus loss
    model = LlavaForConditionalGeneration.from_pretrained(export, **LOAD_KWARGS)
    assert model.config.text_config.hidden_size == 32
    assert model.config.text_config.head_dim == (16 if counts else 8)
    final = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()][-1]
    assert final["step"] == 4 and 0 <= final["qa_accuracy"] <= 1
    script("focus_by_kind")([str(out / "checkpoint.pt"), "--scenes", "8"])  # 16 questions on fixed seeds
    kinds = re.findall(r"^  (\w+) +focus loss", capsys.readouterr().out, flags=re.M)
    assert kinds == (["position", "content", "word", "count"] if counts else ["position", "content"])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--count-layer", "1"], "layer of its own"),  # the focus layer of a 2-layer decoder is 1
        (["--count-layer", "2"], "must be in [0, 2)"),
        (["--count-layer", "0", "--focus-weight", "0"], "needs the focus loss"),
        (["--kind-weights", '{"counts": 2}'], "unknown kinds ['counts']"),
        (["--kind-weights", '{"count_colour": -1}'], "numbers >= 0"),
        (["--kind-weights", '{"count_colour": 3'], "--kind-weights: not valid JSON"),
        (["--kind-weights", json.dumps(dict.fromkeys(ALWAYS_ASKED, 0))], "give one of ['shape_at'"),
        (["--spec", "[1]"], "--spec: expected a JSON object"),
        (["--spec", '{"text_hiden": 64}'], "--spec: unknown fields ['text_hiden']"),
    ],
)
def test_bad_training_flags_are_refused_before_training(tmp_path, flags, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        main(["--out", str(tmp_path / "run"), "--spec", TINY, *flags])
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_focus_plan_reads_the_flags_as_parsed_or_as_saved_in_a_checkpoint():
    spec = ScenesSpec(**json.loads(TINY))
    flags = vars(parse_args(["--out", "run", "--count-layer", "0", "--word-focus"]))
    plan = focus_plan(flags, spec)
    content, word, count = (FOCUS_KINDS.index(kind) for kind in (CONTENT, WORD, COUNT))
    assert plan[word] == plan[content] and plan[content].layer == 1  # the middle of 2 layers
    assert plan[count].layer == 0 and plan[count].uniform
    older = {name: value for name, value in flags.items() if name != "word_focus"}  # saved before --word-focus
    assert word not in focus_plan(older, spec) and content in focus_plan(older, spec)
    assert focus_plan(flags | {"focus_weight": 0.0, "count_layer": -1}, spec) == {}
